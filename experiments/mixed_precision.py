"""HAWQV3 mixed precision end to end: checkpoint -> Hessian traces -> ILP -> QAT -> integer-only.

  python -m experiments.mixed_precision --fp_workdir runs/fmnist_resnet20 --out results/mixed
  python -m experiments.mixed_precision --budgets bops:medium --epochs 0.5   # one budget, shorter

1. Hutchinson traces of every conv/dense layer of the float run, in BN-folded coordinates, over
   `hessian_batches` training batches (``OUT/sensitivity.json``, reused when present).
2. Omega = trace × ||Q_b(W) − W||² for b in {4, 8}; the first conv and the classifier stay 8-bit;
   each block's conv1 and projection shortcut are tied.
3. For every budget (``family:fraction``, fraction a number or low/medium/high = 0.25/0.5/0.75 of
   the way from all-4-bit to all-8-bit, as in HAWQV3) the ILP's bit dict is QAT fine-tuned
   (``OUT/runs/NAME``, resumable), converted to an integer program and evaluated integer-only on
   the whole test set (`experiments.quantize.run_qat`, the code path of the uniform schemes).
   The naive baseline: for each of ``--random_budgets``, the same ILP and budget with random
   sensitivities, QAT-trained and evaluated the same way.
4. ``OUT/table.md``, ``OUT/results.json``, ``OUT/pareto.png`` (accuracy vs BOPs and vs size,
   uniform W8A8 / W4A4 marked) and ``OUT/bits.png`` (bits per layer for each budget). The
   uniform points come from the rows of ``--uniform`` (`experiments.quantize`'s results.json
   for the same float run) and are QAT-trained here when missing.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments import stages
# --fp_workdir, --out, --epochs and --learning_rate are experiments.quantize's flags.
from experiments.quantize import FLAGS
from experiments.stages import allocations, read_cache, run_qat
from grassq import files

FLAGS.set_default("out", "results/mixed")
flags.DEFINE_list("budgets", ["bops:low", "bops:medium", "bops:high", "size:medium"],
                  "Budgets family:fraction, one ILP + QAT run each.")
flags.DEFINE_list("random_budgets", ["bops:medium"],
                  "Budgets also allocated at random (same ILP and budget, random sensitivities): "
                  "the naive baseline the Hessian-aware allocation is compared with.")
flags.DEFINE_string("uniform", "results/quant/results.json",
                    "experiments.quantize results to take the uniform W8A8/W4A4 points from.")
flags.DEFINE_integer("hessian_batches", 4, "Training batches the Hessian traces average over.")
flags.DEFINE_integer("hessian_batch_size", 128, "Images per Hessian batch.")
flags.DEFINE_float("tol", 0.05, "Hutchinson stop: relative standard error of every layer.")
flags.DEFINE_integer("max_probes", 96, "Hutchinson probes at most.")


def plot(rows, uniform, out, order):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], "gbops", "GBOPs"), (axes[1], "size_mib", "size (MiB)")):
    for kind, marker in (("ILP", "o"), ("random", "x")):
      sel = [r for r in rows if r["allocation"] == kind]
      if sel:
        ax.scatter([r[key] for r in sel], [100 * r["integer_accuracy"] for r in sel],
                   marker=marker, zorder=3,
                   label="Hessian-aware ILP" if kind == "ILP" else "random, same budget")
    for r in rows:
      ax.annotate(r["scheme"], (r[key], 100 * r["integer_accuracy"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
    for u in uniform:
      ax.scatter([u[key]], [100 * u["integer_accuracy"]], marker="s",
                 label=f"uniform {u['scheme'].upper()}", zorder=3)
    ax.set_xlabel(label)
    ax.set_ylabel("integer-only test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  stages.save_figure(fig, os.path.join(out, "pareto.png"), dpi=120)

  stages.plot_bits([r["scheme"] for r in rows], [r["bits"] for r in rows], order,
                   os.path.join(out, "bits.png"))


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from grassq import data, train

  os.makedirs(FLAGS.out, exist_ok=True)
  for text in FLAGS.budgets + FLAGS.random_budgets:
    try:  # refuse bad flags before the long stages
      stages.parse_budget(text)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  model, _, config = train.load_checkpoint(FLAGS.fp_workdir)
  spec = data.get_spec(config.dataset)
  fp = train.evaluate_checkpoint(FLAGS.fp_workdir)

  print("[1/3] Hessian traces", flush=True)
  sens = stages.hessian_sensitivity(
      os.path.join(FLAGS.out, "sensitivity.json"), FLAGS.fp_workdir,
      batches=FLAGS.hessian_batches, batch_size=FLAGS.hessian_batch_size, tol=FLAGS.tol,
      max_probes=FLAGS.max_probes)
  print("[2/3] ILP", flush=True)
  if sens["negative_traces"]:
    print(f"warning: negative Hessian trace estimates (counted as 0): {sens['negative_traces']}")
  allocs = allocations(sens["sensitivity"], model, spec.image_shape, FLAGS.budgets)
  naive = allocations(sens["sensitivity"], model, spec.image_shape, FLAGS.random_budgets,
                      random_seed=0)

  uniform = []
  u = read_cache(FLAGS.uniform, "results file of experiments.quantize",
                 "its uniform W8A8/W4A4 points are QAT-trained here instead")
  if u is not None and u.get("fp_workdir") == FLAGS.fp_workdir:
    uniform = [r for r in u.get("schemes", []) if r["scheme"] in ("w8a8", "w4a4")]
  for name, (w, a) in (("w8a8", (8, 8)), ("w4a4", (4, 4))):
    if not any(r["scheme"] == name for r in uniform):
      uniform.append(run_qat(name, FLAGS.out, FLAGS.fp_workdir,
                             dict(default_bits=w, default_act_bits=a), FLAGS.epochs,
                             FLAGS.learning_rate))

  print("[3/3] QAT + integer-only evaluation per budget", flush=True)
  rows = []
  runs = [(f"{f}_{r:g}", "ILP", t, f, r, b) for t, (f, r, b) in allocs.items()]
  runs += [(f"{f}_{r:g}_random", "random", t, f, r, b) for t, (f, r, b) in naive.items()]
  for name, kind, text, family, r, bits in runs:
    row = run_qat(name, FLAGS.out, FLAGS.fp_workdir, dict(bits=bits, default_bits=8),
                  FLAGS.epochs, FLAGS.learning_rate)
    rows.append(dict(row, allocation=kind, budget=text, family=family, fraction=r, bits=bits,
                     layers_at_4=sum(b == 4 for b in bits.values())))

  results = dict(fp_workdir=FLAGS.fp_workdir, fp32_accuracy=fp["accuracy"], rows=rows,
                 uniform=uniform, negative_traces=sens["negative_traces"])
  files.write_json(os.path.join(FLAGS.out, "results.json"), results, indent=1)
  lines = ["| configuration | layers at 4 bit | fake-quant acc. (%) | integer-only acc. (%) | "
           "integer = fake-quant top-1 (%) | size (MiB) | GBOPs |", "|---|---|---|---|---|---|---|"]
  for r in sorted(uniform, key=lambda r: -r["gbops"])[:1] + rows + \
      sorted(uniform, key=lambda r: r["gbops"])[:1]:
    if "budget" in r:
      label = f"{'Hessian-aware ILP' if r['allocation'] == 'ILP' else 'random'}, {r['budget']}"
    else:
      label = f"uniform {r['scheme'].upper()}"
    at4 = r.get("layers_at_4", "all free" if "4" in r["scheme"] else 0)
    lines.append(f"| {label} | {at4} | {100 * r['fake_quant_accuracy']:.2f} | "
                 f"{100 * r['integer_accuracy']:.2f} | {100 * r['integer_vs_fake_agreement']:.2f} | "
                 f"{r['size_mib']:.4f} | {r['gbops']:.3f} |")
  table = (f"FP32: {100 * fp['accuracy']:.2f}% ({FLAGS.fp_workdir}); QAT {FLAGS.epochs:g} epoch(s) "
           f"per row; first conv and classifier at 8 bits.\n\n" + "\n".join(lines) + "\n")
  files.atomic_write(os.path.join(FLAGS.out, "table.md"), table)
  from grassq.quant import qresnet

  plot(rows, uniform, FLAGS.out, qresnet.layer_names(qresnet.quantized(model), spec.image_shape))
  print(table)


if __name__ == "__main__":
  app.run(main)
