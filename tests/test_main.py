"""The main job end to end on its smoke config (ResNet-8 on digits), through its command line."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _main(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_bad_budget_is_refused_before_any_stage(tmp_path):
  r = _main("--config", "experiments/configs/main.py:smoke", "--config.budget=bops:most",
            "--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), timeout=120)
  assert r.returncode != 0
  assert "bops:most" in r.stderr and "fraction" in r.stderr
  assert not (tmp_path / "w").exists()


def test_main_job_smoke_writes_report_and_resumes(tmp_path):
  pytest.importorskip("tvm", reason="the main job needs the `tvm` extra")
  work, res = tmp_path / "work", tmp_path / "results"
  args = ("--config", "experiments/configs/main.py:smoke", "--workdir", str(work),
          "--results", str(res))
  first = _main(*args)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for i in range(1, 6):
    assert f"[{i}/5]" in first.stdout
  report = (res / "report.md").read_text()
  out = json.loads((res / "main" / "results.json").read_text())
  assert (res / "main" / "summary.png").stat().st_size > 1000
  assert (res / "main" / "bits.png").stat().st_size > 1000
  for name in ("w8a8", "mixed"):
    d = out["deployed"][name]
    assert d["bit_exact"] and d["mismatches"] == 0
    # the TVM module's predictions are the interpreter's, so the accuracies are equal
    assert d["accuracy_tvm"] == pytest.approx(out[name]["integer_accuracy"])
    assert os.path.exists(d["module_path"])
  assert 0.0 < out["fp32"]["accuracy"] <= 1.0
  assert set(out["bits"].values()) <= {4, 8}
  assert out["mixed"]["gbops"] < out["w8a8"]["gbops"] < out["w8a8"]["gbops_fp32"]
  for path, ms in out["latency_ms"].items():
    assert all(v > 0 for v in ms.values()), path
  assert report.count("| yes |") == 2
  assert "XLA float32" in report and "TVM W8A8" in report

  # A second run reuses every stage's results instead of training again.
  second = _main(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("reusing") >= 3
  again = json.loads((res / "main" / "results.json").read_text())
  assert again["mixed"] == out["mixed"] and again["bits"] == out["bits"]
