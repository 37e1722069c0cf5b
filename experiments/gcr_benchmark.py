"""The GCR paper's comparison at small scale: ResNet-20 on Fashion-MNIST, identical schedules.

  python -m experiments.gcr_benchmark                 # all runs, then the report
  python -m experiments.gcr_benchmark --runs softmax gcr_k8 --seeds 0
  python -m experiments.gcr_benchmark --report-only   # table and plots from finished runs
  python -m experiments.gcr_benchmark --config.num_epochs=2 --out results/gcr_short

Runs: softmax (linear head with bias) and GCR k=8 with 3 seeds each; cosine softmax (scale 25),
label smoothing 0.1 and GCR k in {1, 4, 16} with one seed. Each run lives in
``OUT/runs/NAME_sSEED`` and resumes from its checkpoints when interrupted; a finished run (one
with ``summary.json``) is skipped. For every run the summary holds test accuracy, intra-class
variability and class separation R^2 of the test features, linear-probe transfer accuracy to
scikit-learn digits (and to MNIST when a prepared TFDS copy exists) and, for GCR, the principal
angles between class subspaces. ``OUT/table.md`` and ``OUT/*.png`` are rewritten from all finished
summaries after every run.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.stages import read_cache, save_figure
from grassq import files

config_flags.DEFINE_config_file("config", "experiments/configs/gcr_fmnist.py", "Base config.")
flags.DEFINE_string("out", "results/gcr", "Output directory.")
flags.DEFINE_list("runs", [], "Variants to run (default: all).")
flags.DEFINE_list("seeds", [], "Restrict to these seeds.")
flags.DEFINE_bool("report_only", False, "Only rebuild the table and plots.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  label: str
  head: str
  seeds: tuple
  head_kwargs: tuple = ()
  label_smoothing: float = 0.0
  config: tuple = ()  # further config overrides


VARIANTS = (
    Variant("softmax", "softmax (linear head)", "linear", (0, 1, 2)),
    Variant("gcr_k8", "GCR k=8", "grassmann", (0, 1, 2), (("subspace_dim", 8),)),
    # The released code's update (geodesic + torch's unsigned QR every 5 steps) on the same run.
    Variant("gcr_k8_released", "GCR k=8, released update", "grassmann", (0, 1, 2),
            (("subspace_dim", 8),), config=(("grassmann_update", "released"),
                                            ("grassmann_reorth_every", 5))),
    Variant("cosine", "cosine softmax (scale 25)", "cosine", (0,), (("scale", 25.0),)),
    Variant("label_smoothing", "softmax + label smoothing 0.1", "linear", (0,), (),
            label_smoothing=0.1),
    Variant("gcr_k1", "GCR k=1", "grassmann", (0,), (("subspace_dim", 1),)),
    Variant("gcr_k4", "GCR k=4", "grassmann", (0,), (("subspace_dim", 4),)),
    Variant("gcr_k16", "GCR k=16", "grassmann", (0,), (("subspace_dim", 16),)),
)


def run_config(base, variant: Variant, seed: int):
  config = base.copy_and_resolve_references()
  config.head = variant.head
  config.head_kwargs = dict(variant.head_kwargs)
  config.label_smoothing = variant.label_smoothing
  config.seed = seed
  for key, value in variant.config:
    config[key] = value
  return config


def _probe(model, variables, dataset: str, dtype) -> float | None:
  """Linear-probe accuracy on `dataset` from frozen features; None when it is not on disk."""
  from grassq import analysis, data, train

  spec = data.get_spec(dataset)
  try:
    xtr, ytr = data.load_arrays(dataset, spec.train_split)
    xte, yte = data.load_arrays(dataset, spec.eval_split)
  except data.DatasetNotFoundError:
    return None
  feats = [train.predict(model, variables, x, dataset, dtype=dtype, features=True)
           for x in (xtr, xte)]
  return analysis.linear_probe(feats[0], ytr, feats[1], yte)["accuracy"]


def run_one(base, variant: Variant, seed: int, out: str) -> dict:
  from grassq import analysis, data, train

  workdir = os.path.join(out, "runs", f"{variant.name}_s{seed}")
  summary_path = os.path.join(workdir, "summary.json")
  summary = read_cache(summary_path, "run summary", "it is recomputed from the run")
  if summary is not None:
    return summary
  config = run_config(base, variant, seed)
  print(f"== {variant.name} seed {seed}: {workdir}", flush=True)
  result = train.train_and_evaluate(config, workdir)
  state = result["state"]
  model = train.build_model(config, data.get_spec(config.dataset).num_classes)
  variables = state.variables()
  images, labels = data.load_arrays(config.dataset, "test", config.data_dir)
  feats = train.predict(model, variables, images, config.dataset, dtype=config.dtype,
                        features=True)
  summary = {
      "variant": variant.name,
      "seed": seed,
      "epochs": config.num_epochs,
      "test_accuracy": result["test_accuracy"],
      **analysis.class_separation(feats, labels),
      "probe_digits": _probe(model, variables, "digits", config.dtype),
      "probe_mnist": _probe(model, variables, "mnist", config.dtype),
  }
  if variant.head == "grassmann":
    angles = analysis.pairwise_principal_angles(variables["params"]["head"]["bases"])
    summary["principal_angles_deg"] = [float(a) for a in (angles * 180 / 3.141592653589793).ravel()]
    from grassq import grassmann

    summary["orthonormality_error"] = float(
        grassmann.orthonormality_error(variables["params"]["head"]["bases"]))
    summary["grassmann_update"] = config.get("grassmann_update", "grassq")
  files.write_json(summary_path, summary, indent=1)
  return summary


def _mean_std(values):
  import numpy as np

  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  if len(values) == 1:
    return f"{100 * values[0]:.2f}"
  return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"


def report(out: str) -> str:
  """Rewrites OUT/table.md and the plots from every finished summary; returns the table."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  found = {}
  for v in VARIANTS:
    rows = []
    for seed in v.seeds:
      row = read_cache(os.path.join(out, "runs", f"{v.name}_s{seed}", "summary.json"),
                       "run summary", "left out of the report (rerun the benchmark to redo it)")
      if row is not None:
        rows.append(row)
    if rows:
      found[v.name] = (v, rows)
  lines = [
      "| run | seeds | test acc. (%) | variability (%) | R² (%) | probe digits (%) | probe MNIST (%) "
      "| max \\|SᵀS − I\\| at the end |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for v, rows in found.values():
    col = lambda key: _mean_std([r.get(key) for r in rows])
    orth = [r["orthonormality_error"] for r in rows if "orthonormality_error" in r]
    orth = f"{max(orth):.1e}" if orth else "n/a"
    lines.append(f"| {v.label} | {len(rows)} | {col('test_accuracy')} | {col('variability')} | "
                 f"{col('r2')} | {col('probe_digits')} | {col('probe_mnist')} | {orth} |")
  epochs = {r["epochs"] for _, rows in found.values() for r in rows}
  table = "\n".join(lines) + (
      f"\n\nResNet-20 on Fashion-MNIST, {', '.join(f'{e:g}' for e in sorted(epochs))} epochs; "
      "mean ± sample std over seeds where there are several.\n")
  files.atomic_write(os.path.join(out, "table.md"), table)

  def savefig(fig, name):
    save_figure(fig, os.path.join(out, name), dpi=120, bbox_inches="tight")

  ks = [(int(n[len("gcr_k"):]), rows) for n, (v, rows) in found.items()
        if n.startswith("gcr_k") and n[len("gcr_k"):].isdigit()]
  ks.sort()
  if ks:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [k for k, _ in ks]
    axes[0].plot(x, [100 * np.mean([r["test_accuracy"] for r in rows]) for _, rows in ks], "o-",
                 label="GCR")
    for name, style in (("softmax", "--"), ("cosine", ":"), ("label_smoothing", "-.")):
      if name in found:
        acc = 100 * np.mean([r["test_accuracy"] for r in found[name][1]])
        axes[0].axhline(acc, ls=style, color="gray", label=found[name][0].label)
    axes[0].set(xscale="log", xticks=x, xticklabels=[str(k) for k in x], xlabel="k",
                ylabel="test accuracy (%)", title="accuracy vs subspace dimension")
    axes[0].legend(fontsize=7)
    for key, label in (("variability", "variability"), ("r2", "R²")):
      axes[1].plot(x, [100 * np.mean([r[key] for r in rows]) for _, rows in ks], "o-",
                   label=f"GCR {label}")
      if "softmax" in found:
        axes[1].axhline(100 * np.mean([r[key] for r in found["softmax"][1]]), ls="--",
                        color="C1" if key == "r2" else "C0", label=f"softmax {label}")
    axes[1].set(xscale="log", xticks=x, xticklabels=[str(k) for k in x], xlabel="k",
                ylabel="%", title="feature variability and class separation")
    axes[1].legend(fontsize=7)
    savefig(fig, "accuracy_variability_vs_k.png")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, rows in ks:
      ax.hist(rows[0]["principal_angles_deg"], bins=45, range=(0, 90), histtype="step",
              label=f"k={k}")
    ax.set(xlabel="principal angle between class subspaces (degrees)", ylabel="count",
           title="principal angles, GCR heads")
    ax.legend(fontsize=7)
    savefig(fig, "principal_angles.png")
  return table


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out, exist_ok=True)
  if not FLAGS.report_only:
    from grassq import data

    data.prepare()
    unknown = set(FLAGS.runs) - {v.name for v in VARIANTS}
    if unknown:
      sys.exit(f"unknown runs {sorted(unknown)}; available: {[v.name for v in VARIANTS]}")
    # Seed 0 of every variant first, so a partial benchmark already compares all of them.
    order = sorted(((seed, i, v) for i, v in enumerate(VARIANTS) for seed in v.seeds),
                   key=lambda t: t[:2])
    for seed, _, v in order:
      if (FLAGS.runs and v.name not in FLAGS.runs) or (FLAGS.seeds and str(seed) not in FLAGS.seeds):
        continue
      run_one(FLAGS.config, v, seed, FLAGS.out)
      report(FLAGS.out)
  print(report(FLAGS.out))


if __name__ == "__main__":
  app.run(main)
