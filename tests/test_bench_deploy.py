"""benchmarks/deploy.py end to end on the smallest setting: the report, its ratios and bench.md."""

import json
import os

import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")


def test_deploy_benchmark_writes_consistent_report(tmp_path):
  from benchmarks import deploy as B

  out = str(tmp_path / "bench")
  B.main(["--models", "resnet20", "--batch", "2", "--repeats", "2", "--warmup", "0",
          "--variants", "tvm_int8", "onnxruntime_int8", "--eval_images", "0", "--no-convs",
          "--r20_program", str(tmp_path / "none"), "--r20_mixed", str(tmp_path / "none"),
          "--fp_workdir", str(tmp_path / "none"), "--out", out])
  with open(os.path.join(out, "bench_resnet20.json")) as f:
    report = json.load(f)
  rows = report["batches"]["2"]
  assert set(rows) == {"xla_float32", "tvm_int8", "onnxruntime_int8"}
  assert rows["tvm_int8"]["check"] == "bit-exact"  # the benchmark refuses a differing module
  for row in rows.values():
    assert row["ms"] > 0
    assert row["x_vs_xla_float32"] == pytest.approx(rows["xla_float32"]["ms"] / row["ms"])
  assert report["sources"]["int8"] == "random, calibrated"
  md = open(os.path.join(out, "bench.md")).read()
  assert "**ResNet-20**" in md and f"{rows['tvm_int8']['ms']:.2f}" in md
  assert md.count("| TVM int8, untuned") == 1 and "MetaSchedule" not in md
