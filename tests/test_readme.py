"""Every ```python block of README.md runs (blocks that cannot run here are fenced as bash/text)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)


def test_readme_has_python_examples():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
