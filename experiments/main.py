"""The main job: a Grassmann-head ResNet-20 trained, quantized, and deployed integer-only.

  python -m experiments.main                                   # short schedules (make run)
  python -m experiments.main --config experiments/configs/main.py:full
  python -m experiments.main --config.train.dataset=grassq_mnist --workdir runs/main_mnist

Stages (each reuses what an earlier run of the same workdir left behind; a stage cache
``WORKDIR/*.json`` that cannot be read is recomputed, with a warning naming it):
  1. float training: ResNet-20 with the Grassmann head (k = 8), Riemannian SGD on the bases
     (``WORKDIR/float``, orbax checkpoints, resumes mid-run);
  2. QAT to uniform W8A8, then the integer program evaluated integer-only in JAX
     (``WORKDIR/runs/w8a8``, ``WORKDIR/programs/w8a8``);
  3. Hutchinson traces of the float run, the ILP's INT4/8 allocation at `config.budget`, QAT,
     integer-only in JAX (``WORKDIR/sensitivity.json``, ``runs/mixed``, ``programs/mixed``);
  4. both programs compiled with TVM for this CPU, compared bit for bit with the JAX
     interpreter on the evaluation images, and timed next to XLA float32;
  5. ``RESULTS/report.md`` with the table, ``RESULTS/main/results.json`` and PNG plots.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import stages
from grassq import files

config_flags.DEFINE_config_file("config", "experiments/configs/main.py", "Main-job config.")
flags.DEFINE_string("workdir", "runs/main", "Checkpoints, programs and compiled modules.")
flags.DEFINE_string("results", "results", "Where report.md and main/ (JSON, plots) go.")
FLAGS = flags.FLAGS

NUM_STAGES = 5


class _Stage:
  """Prints ``[i/5] title`` on entry and the elapsed time on exit."""

  def __init__(self, index, title):
    self.index, self.title = index, title

  def __enter__(self):
    self.start = time.perf_counter()
    print(f"\n[{self.index}/{NUM_STAGES}] {self.title}", flush=True)
    return self

  def __exit__(self, *exc):
    if exc[0] is None:
      print(f"[{self.index}/{NUM_STAGES}] done in {time.perf_counter() - self.start:.0f} s",
            flush=True)


def _qat(cfg, workdir, float_dir, name, quant):
  key = dict(fp_workdir=float_dir, quant=quant, epochs=cfg.qat_epochs,
             learning_rate=cfg.qat_learning_rate, eval_images=cfg.eval_images)
  return stages.cached(os.path.join(workdir, f"{name}.json"), key,
                        lambda: stages.run_qat(name, workdir, float_dir, quant, cfg.qat_epochs,
                                               cfg.qat_learning_rate,
                                               eval_limit=cfg.eval_images or None))


def _xla_float_latency(model, variables, image_shape, batches, repeats):
  """Median ms of the jitted float model (the user's alternative) per batch size."""
  import jax
  import numpy as np

  from grassq._timing import median_ms

  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  rng = np.random.default_rng(0)
  out = {}
  for b in batches:
    x = jax.device_put(rng.standard_normal((b, *image_shape), dtype=np.float32))
    out[b] = median_ms(fn, variables, x, repeats=repeats)[0]
  return out


def _plot_summary(rows, latency, batches, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  ax = axes[0]
  for r in rows:
    ax.scatter([r["gbops"]], [r["accuracy"]], s=40, zorder=3)
    ax.annotate(r["label"], (r["gbops"], r["accuracy"]), fontsize=8, xytext=(4, 4),
                textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("GBOPs (log)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("accuracy vs cost")
  ax.grid(alpha=0.3)
  ax = axes[1]
  paths = list(latency)
  width = 0.8 / len(batches)
  for j, b in enumerate(batches):
    ax.bar([i + j * width for i in range(len(paths))], [latency[p][str(b)] for p in paths],
           width, label=f"batch {b}")
  ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(paths))], paths,
                rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("ms per batch (median)")
  ax.set_yscale("log")
  ax.set_title("latency on this CPU")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  stages.save_figure(fig, path, format="png", dpi=120)


def _report(cfg, fp, w8, mixed, deployed, latency, bits, elapsed):
  batches = [str(b) for b in cfg.latency_batches]
  n_eval = w8["eval_images"]
  intro = (
      f"ResNet-20 with the Grassmann head (k = {cfg.train.head_kwargs.subspace_dim}) on "
      f"`{cfg.train.dataset}`, {cfg.train.num_epochs:g} float epochs, {cfg.qat_epochs:g} QAT "
      f"epoch(s) per quantized model; mixed precision from the Hutchinson traces and the ILP at "
      f"`{cfg.budget}`. Integer-only accuracy and the bit-exact check on {n_eval} test images. "
      f"Written by `python -m experiments.main` in {elapsed / 60:.1f} min (stages reused from "
      f"earlier runs of the same workdir are not timed again).")
  lines = [
      "| model | accuracy (%) | size (MiB) | GBOPs | TVM = JAX integer, bit for bit |",
      "|---|---|---|---|---|",
      f"| FP32 (XLA) | {100 * fp['accuracy']:.2f} | {w8['size_fp32_mib']:.4f} | "
      f"{w8['gbops_fp32']:.3f} | n/a |",
  ]
  for label, row, d in (("W8A8 integer-only", w8, deployed["w8a8"]),
                        (f"mixed INT4/8 ({mixed['layers_at_4']} layers at 4 bit)", mixed,
                         deployed["mixed"])):
    exact = "yes" if d["bit_exact"] else f"NO ({d['mismatches']} logits differ)"
    lines.append(f"| {label} | {100 * row['integer_accuracy']:.2f} (TVM "
                 f"{100 * d['accuracy_tvm']:.2f}) | {row['size_mib']:.4f} | {row['gbops']:.3f} | "
                 f"{exact} |")
  xla = latency["XLA float32"]
  lines += ["", "Latency, median ms per batch on this CPU (ratio to XLA float32):", "",
            "| path | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches)]
  for path, ms in latency.items():
    lines.append(f"| {path} | " + " | ".join(
        f"{ms[b]:.3f} ({ms[b] / xla[b]:.2f}×)" for b in batches) + " |")
  lines += ["", "Mixed bits (weights and the activations each layer reads): "
            + ", ".join(f"{k} {b}" for k, b in bits.items()) + "."]
  table = "\n".join(lines) + "\n"
  report = (f"# grassq main job\n\n{intro}\n\n{table}\nPlots: `main/summary.png` (accuracy vs "
            f"BOPs, latency per path), `main/bits.png` (the mixed model's bits per layer).\n")
  return report, table


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  cfg = FLAGS.config
  for b in cfg.latency_batches:
    if int(b) < 1:
      raise app.UsageError(f"latency_batches must be positive, got {list(cfg.latency_batches)}")
  try:
    stages.parse_budget(cfg.budget)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from grassq import data, deploy, train
  from grassq.quant import program as P
  from grassq.quant import qresnet

  deploy.require_tvm()  # fail before training, not after, when the tvm extra is missing
  spec = data.get_spec(cfg.train.dataset)
  data.load_arrays(cfg.train.dataset, spec.eval_split, cfg.train.data_dir)  # fail fast
  workdir, start = FLAGS.workdir, time.perf_counter()
  float_dir = os.path.join(workdir, "float")

  with _Stage(1, f"float training: {cfg.train.model} + {cfg.train.head} head, "
                 f"{cfg.train.num_epochs:g} epochs -> {float_dir}"):
    train.train_and_evaluate(cfg.train, float_dir)
    model, variables, _ = train.load_checkpoint(float_dir)
    images, labels = data.load_arrays(cfg.train.dataset, spec.eval_split, cfg.train.data_dir)
    n = cfg.eval_images or len(labels)
    images, labels = images[:n], labels[:n]
    fp = train.evaluate(train.make_eval_fn(model, spec), variables, images, labels,
                        mesh=train.make_mesh(), batch_size=cfg.train.eval_batch_size)
    print(f"FP32 accuracy {100 * fp['accuracy']:.2f}% on {n} test images")

  with _Stage(2, f"QAT W8A8 ({cfg.qat_epochs:g} epochs) and integer-only evaluation"):
    w8 = _qat(cfg, workdir, float_dir, "w8a8", dict(default_bits=8, default_act_bits=8))

  with _Stage(3, f"Hessian traces, ILP at {cfg.budget}, QAT mixed INT4/8"):
    sens = stages.hessian_sensitivity(
        os.path.join(workdir, "sensitivity.json"), float_dir, batches=cfg.hessian_batches,
        batch_size=cfg.hessian_batch_size, tol=cfg.hessian_tol,
        max_probes=cfg.hessian_max_probes)
    _, _, bits = stages.allocations(sens["sensitivity"], model, spec.image_shape,
                                    [cfg.budget])[cfg.budget]
    print("bits: " + ", ".join(f"{k}={b}" for k, b in bits.items()))
    mixed = dict(_qat(cfg, workdir, float_dir, "mixed", dict(bits=bits, default_bits=8)),
                 layers_at_4=sum(b == 4 for b in bits.values()))

  with _Stage(4, "TVM build for this CPU, bit-exact check against the JAX interpreter, "
                 "latency"):
    from experiments.stages import deploy_and_check

    deployed, latency = {}, {}
    xla = _xla_float_latency(model, variables, spec.image_shape, cfg.latency_batches,
                             cfg.latency_repeats)
    latency["XLA float32"] = {str(b): ms for b, ms in xla.items()}
    for name in ("w8a8", "mixed"):
      program = P.load(os.path.join(workdir, "programs", name))
      d = deploy_and_check(program, images, labels, os.path.join(workdir, "modules"), name,
                           target=cfg.tvm_target or None, batch_sizes=tuple(cfg.latency_batches),
                           repeats=cfg.latency_repeats, dataset=cfg.train.dataset)
      deployed[name] = d
      label = "W8A8" if name == "w8a8" else "mixed"
      latency[f"JAX integer {label}"] = {str(b): d["latency_ms"]["interpreter"][b]
                                         for b in cfg.latency_batches}
      latency[f"TVM {label}"] = {str(b): d["latency_ms"]["tvm"][b]
                                 for b in cfg.latency_batches}
      print(f"{name}: bit-exact {d['bit_exact']} ({d['mismatches']} differing logits), "
            f"TVM accuracy {100 * d['accuracy_tvm']:.2f}%")

  with _Stage(5, f"report -> {os.path.join(FLAGS.results, 'report.md')}"):
    elapsed = time.perf_counter() - start
    order = qresnet.layer_names(qresnet.quantized(model), spec.image_shape)
    out = os.path.join(FLAGS.results, "main")
    stages.plot_bits(["mixed"], [bits], order, os.path.join(out, "bits.png"))
    rows = [dict(label="FP32", accuracy=100 * fp["accuracy"], gbops=w8["gbops_fp32"]),
            dict(label="W8A8", accuracy=100 * w8["integer_accuracy"], gbops=w8["gbops"]),
            dict(label="mixed INT4/8", accuracy=100 * mixed["integer_accuracy"],
                 gbops=mixed["gbops"])]
    _plot_summary(rows, latency, cfg.latency_batches, os.path.join(out, "summary.png"))
    results = dict(config=json.loads(cfg.to_json_best_effort()), fp32=fp, w8a8=w8, mixed=mixed,
                   bits=bits, deployed={k: {kk: vv for kk, vv in v.items()}
                                        for k, v in deployed.items()},
                   latency_ms=latency, elapsed_s=elapsed)
    files.write_json(os.path.join(out, "results.json"), results, indent=1, default=str)
    report, table = _report(cfg, fp, w8, mixed, deployed, latency, bits, elapsed)
    files.atomic_write(os.path.join(out, "table.md"), table)
    files.atomic_write(os.path.join(FLAGS.results, "report.md"), report)
    print(report)


if __name__ == "__main__":
  app.run(main)
