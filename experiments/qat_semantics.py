"""HAWQV3's QAT statistics against grassq's, on the same float run, schemes and seeds.

  python -m experiments.qat_semantics --fp_workdir runs/fmnist_resnet20 --out results/qat_semantics
  python -m experiments.qat_semantics --fp_workdir W --epochs 0.5 --seeds 0,1   # shorter

For each scheme (W8A8, W4A4), QAT semantics (`grassq.quant.qat.SEMANTICS`: "grassq" = BatchNorm
momentum 0.9, biased batch variance, range EMA 0.99; "hawq" = 0.99, unbiased, 0.95) and seed, the
float run is fine-tuned with `experiments.stages.run_qat` (``OUT/runs/SCHEME_SEMANTICS_sSEED``,
resumable; a finished one is reused), converted to its integer program and evaluated
integer-only on the whole test set. ``OUT/table.md`` and ``OUT/results.json``: integer-only and
fake-quant accuracy per run, and per scheme the mean and seed spread of each semantics and of
their difference.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from experiments.stages import read_cache, run_qat
from grassq import files

flags.DEFINE_string("fp_workdir", "runs/fmnist_resnet20", "Float run to quantize.")
flags.DEFINE_string("out", "results/qat_semantics", "Output directory.")
flags.DEFINE_list("schemes", ["w8a8", "w4a4"], "Uniform schemes.")
flags.DEFINE_list("seeds", ["0", "1"], "QAT seeds.")
flags.DEFINE_float("epochs", 1.0, "QAT fine-tuning epochs.")
flags.DEFINE_float("learning_rate", 0.005, "QAT learning rate (cosine to 0).")
FLAGS = flags.FLAGS

SCHEMES = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
SEMANTICS = ("grassq", "hawq")


def run(scheme, semantics, seed, out):
  name = f"{scheme}_{semantics}_s{seed}"
  path = os.path.join(out, "rows", f"{name}.json")
  row = read_cache(path, "QAT result", "it is recomputed")
  if row is None:
    w, a = SCHEMES[scheme]
    row = run_qat(name, out, FLAGS.fp_workdir,
                  dict(default_bits=w, default_act_bits=a, semantics=semantics), FLAGS.epochs,
                  FLAGS.learning_rate, seed=seed)
    row = dict(row, semantics=semantics, seed=seed, scheme=scheme)
    files.write_json(path, row, indent=1)
  return row


def table(rows):
  import numpy as np

  lines = ["| scheme | semantics | seed | integer-only acc. (%) | fake-quant acc. (%) |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['scheme']} | {r['semantics']} | {r['seed']} | "
                 f"{100 * r['integer_accuracy']:.2f} | {100 * r['fake_quant_accuracy']:.2f} |")
  lines += ["", "| scheme | grassq (%) | hawq (%) | hawq − grassq, per seed (pts) |",
            "|---|---|---|---|"]
  summary = {}
  for scheme in dict.fromkeys(r["scheme"] for r in rows):
    acc = {s: {r["seed"]: r["integer_accuracy"] for r in rows
               if r["scheme"] == scheme and r["semantics"] == s} for s in SEMANTICS}
    seeds = sorted(set(acc["grassq"]) & set(acc["hawq"]))
    if not seeds:
      continue
    diff = [100 * (acc["hawq"][s] - acc["grassq"][s]) for s in seeds]
    ms = lambda v: (f"{100 * np.mean(v):.2f} ± {100 * np.std(v, ddof=1):.2f}" if len(v) > 1
                    else f"{100 * v[0]:.2f}")
    lines.append(f"| {scheme} | {ms([acc['grassq'][s] for s in seeds])} | "
                 f"{ms([acc['hawq'][s] for s in seeds])} | "
                 f"{', '.join(f'{d:+.2f}' for d in diff)} (mean {np.mean(diff):+.2f}) |")
    summary[scheme] = dict(seeds=seeds, hawq_minus_grassq_pts=diff)
  return "\n".join(lines) + (
      f"\n\nResNet-20 on Fashion-MNIST, QAT {FLAGS.epochs:g} epoch(s) from `{FLAGS.fp_workdir}`; "
      "mean ± sample std over seeds.\n"), summary


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for seed in (int(s) for s in FLAGS.seeds):
    for scheme in FLAGS.schemes:
      if scheme not in SCHEMES:
        raise app.UsageError(f"unknown scheme {scheme!r}; available: {', '.join(SCHEMES)}")
      for semantics in SEMANTICS:
        rows.append(run(scheme, semantics, seed, FLAGS.out))
        text, summary = table(rows)
        files.atomic_write(os.path.join(FLAGS.out, "table.md"), text)
        files.write_json(os.path.join(FLAGS.out, "results.json"),
                         dict(rows=rows, summary=summary, epochs=FLAGS.epochs,
                              fp_workdir=FLAGS.fp_workdir), indent=1)
  print(table(rows)[0])


if __name__ == "__main__":
  app.run(main)
