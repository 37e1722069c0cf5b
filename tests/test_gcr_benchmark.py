"""The GCR benchmark's report: every finished variant in the table, the released update beside
the default, the plots from the k sweep only."""

import json
import os

import numpy as np

from experiments import gcr_benchmark as B


def test_report_lists_every_variant_and_the_orthonormality_error(tmp_path):
  rng = np.random.default_rng(0)
  written = {}
  for name, seeds in (("softmax", (0, 1)), ("gcr_k8", (0, 1, 2)), ("gcr_k8_released", (0, 1, 2)),
                      ("gcr_k4", (0,))):
    for seed in seeds:
      row = {"variant": name, "seed": seed, "epochs": 2.0,
             "test_accuracy": float(rng.uniform(0.85, 0.9)),
             "variability": float(rng.uniform(0.1, 0.2)), "r2": float(rng.uniform(0.6, 0.8)),
             "probe_digits": float(rng.uniform(0.9, 0.95)), "probe_mnist": None}
      if name.startswith("gcr"):
        row["principal_angles_deg"] = rng.uniform(0, 90, 28).tolist()
        row["orthonormality_error"] = float(rng.uniform(1e-7, 1e-5))
      os.makedirs(tmp_path / "runs" / f"{name}_s{seed}")
      (tmp_path / "runs" / f"{name}_s{seed}" / "summary.json").write_text(json.dumps(row))
      written.setdefault(name, []).append(row)
  table = B.report(str(tmp_path))
  labels = {v.name: v.label for v in B.VARIANTS}
  released = [line for line in table.splitlines() if line.startswith(f"| {labels['gcr_k8_released']} |")]
  assert len(released) == 1
  cells = released[0].split(" | ")
  assert cells[1] == "3"
  acc = [100 * r["test_accuracy"] for r in written["gcr_k8_released"]]
  assert cells[2] == f"{np.mean(acc):.2f} ± {np.std(acc, ddof=1):.2f}"
  assert cells[-1].rstrip(" |") == f"{max(r['orthonormality_error'] for r in written['gcr_k8_released']):.1e}"
  softmax = next(line for line in table.splitlines() if line.startswith(f"| {labels['softmax']} |"))
  assert softmax.rstrip().endswith("| n/a |")
  assert (tmp_path / "table.md").read_text() == table
  assert (tmp_path / "accuracy_variability_vs_k.png").stat().st_size > 0
