"""Float checkpoint -> QAT fine-tune -> integer program -> integer-only evaluation.

  python -m experiments.quantize --fp_workdir runs/fmnist_resnet20 --out results/quant
  python -m experiments.quantize --fp_workdir runs/fmnist_resnet20 --schemes w8a8 --epochs 0.5

For every scheme (uniform W8A8, W4A8 and W4A4; the first conv and the classifier stay 8-bit)
it fine-tunes the float run with fake-quant layers (``OUT/runs/SCHEME``, resumable), converts the
result to an integer program (``OUT/programs/SCHEME``), runs the int32 interpreter on the whole
test set, and writes ``OUT/table.md`` / ``OUT/results.json``: accuracy (float, fake-quant,
integer-only), top-1 agreement of integer vs fake-quant, the largest per-layer difference in
LSBs (``OUT/layers_SCHEME.json`` has every layer's), model size and BOPs.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments.stages import read_cache, run_qat
from grassq import files

flags.DEFINE_string("fp_workdir", "runs/fmnist_resnet20", "Float run to quantize.")
flags.DEFINE_string("out", "results/quant", "Output directory.")
flags.DEFINE_list("schemes", ["w8a8", "w4a8", "w4a4"], "Uniform schemes to run.")
flags.DEFINE_float("epochs", 1.0, "QAT fine-tuning epochs.")
flags.DEFINE_float("learning_rate", 0.005, "QAT learning rate (cosine to 0).")
FLAGS = flags.FLAGS

SCHEMES = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}  # (weight bits, activation bits)


def run_scheme(name, bits, out):
  w_bits, a_bits = bits
  row = run_qat(name, out, FLAGS.fp_workdir, dict(default_bits=w_bits, default_act_bits=a_bits),
                FLAGS.epochs, FLAGS.learning_rate)
  return dict(row, w_bits=w_bits, a_bits=a_bits)


def _lsb(row):
  if "max_act_lsb" not in row:  # a row from before the per-layer report
    return "n/a"
  return f"{row['max_act_lsb']} ({row['max_act_lsb_layer']}; mean {row['mean_act_lsb']:.3f})"


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from grassq import train

  os.makedirs(FLAGS.out, exist_ok=True)
  fp = train.evaluate_checkpoint(FLAGS.fp_workdir)
  unknown = set(FLAGS.schemes) - set(SCHEMES)
  if unknown:
    raise app.UsageError(f"unknown schemes {sorted(unknown)}; available: {list(SCHEMES)}")
  path = os.path.join(FLAGS.out, "results.json")
  done = {}
  old = read_cache(path, "results file", "the rows of schemes not run this time are dropped")
  if old is not None and old.get("fp_workdir") == FLAGS.fp_workdir:  # keep the other rows
    done = {r["scheme"]: r for r in old.get("schemes", [])}
  for s in FLAGS.schemes:
    done[s] = run_scheme(s, SCHEMES[s], FLAGS.out)
  rows = [done[s] for s in SCHEMES if s in done]
  results = dict(fp_workdir=FLAGS.fp_workdir, fp32_accuracy=fp["accuracy"], schemes=rows)
  files.write_json(os.path.join(FLAGS.out, "results.json"), results, indent=1)
  lines = ["| scheme | QAT epochs | FP32 acc. (%) | fake-quant acc. (%) | integer-only acc. (%) | "
           "integer = fake-quant top-1 (%) | largest activation Δ, LSB (layer) | size (MiB) | GBOPs |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['scheme'].upper()} | {r['epochs']:g} | {100 * fp['accuracy']:.2f} | "
                 f"{100 * r['fake_quant_accuracy']:.2f} | {100 * r['integer_accuracy']:.2f} | "
                 f"{100 * r['integer_vs_fake_agreement']:.2f} | {_lsb(r)} | {r['size_mib']:.4f} "
                 f"(FP32 {r['size_fp32_mib']:.4f}) | {r['gbops']:.3f} (FP32 {r['gbops_fp32']:.2f}) |")
  table = "\n".join(lines) + "\n"
  files.atomic_write(os.path.join(FLAGS.out, "table.md"), table)
  print(table)


if __name__ == "__main__":
  app.run(main)
