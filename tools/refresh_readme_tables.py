"""Copies the results tables (results/*/table.md) into README.md between their markers."""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
from grassq import files  # noqa: E402  (the checkout's, installed or not)

readme = os.path.join(ROOT, "README.md")
text = files.read_text(readme)
for tag, src in (("gcr-table", "results/gcr/table.md"), ("quant-table", "results/quant/table.md"),
                 ("quant-gcr-table", "results/quant_gcr/table.md"),
                 ("mixed-table", "results/mixed/table.md"), ("main-table", "results/main/table.md"),
                 ("deploy-table", "results/deploy/table.md"),
                 ("bench-table", "results/deploy/bench.md")):
  if not os.path.exists(os.path.join(ROOT, src)):
    print(f"{src} does not exist yet: {tag} left as it is")
    continue
  table = files.read_text(os.path.join(ROOT, src)).strip()
  pattern = re.compile(rf"(<!-- {tag} [^>]*-->\n).*?(\n<!-- /{tag} -->)", re.S)
  text, n = pattern.subn(lambda m: m.group(1) + table + m.group(2), text)
  assert n == 1, f"marker {tag} not found exactly once"
files.atomic_write(readme, text)
