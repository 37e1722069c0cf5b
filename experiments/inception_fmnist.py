"""InceptionV3 (HAWQV3's third model): a small InceptionV3-shaped network on Fashion-MNIST, W8A8.

  python -m experiments.inception_fmnist
  python -m experiments.inception_fmnist --config.num_train_steps 20 --epochs 0.01 \
      --fp_workdir /tmp/inc/fp --out /tmp/inc/out                       # smoke run, minutes

1. Trains the float network of ``--config`` (default experiments/configs/fmnist_inception_small.py:
   1/8 width, "small" stem, 2 epochs) in ``--fp_workdir`` (resumable).
2. QAT W8A8 fine-tune, conversion to the integer program (branch concatenations requantized
   branch by branch, integer average pools) and integer-only evaluation on the whole test set:
   `experiments.quantize.run_qat`, the code path of the ResNet schemes (``OUT/runs/w8a8``,
   ``OUT/programs/w8a8``, ``OUT/layers_w8a8.json``).
3. With ``--tvm`` (default): the W8A8 program built with TVM for this CPU
   (`experiments.stages.deploy_and_check`, module saved in ``OUT/modules``), every test image run
   through it and through the JAX interpreter, differing logits counted (bit-exact: none).
4. ``OUT/table.md`` and ``OUT/results.json``: accuracies (float, fake-quant, integer-only in JAX
   and TVM), integer vs fake-quant agreement and LSBs, bit-exactness, size and BOPs of the small
   network, and those of the full InceptionV3 at 299x299 next to HAWQV3's published figures.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

# --fp_workdir, --out, --epochs and --learning_rate are experiments.quantize's flags.
from experiments.quantize import FLAGS
from experiments.stages import deploy_and_check, run_qat
from grassq import files

config_flags.DEFINE_config_file("config", "experiments/configs/fmnist_inception_small.py",
                                "Float training config.")
FLAGS.set_default("fp_workdir", "runs/fmnist_inception_small")
FLAGS.set_default("out", "results/inception")
flags.DEFINE_bool("tvm", True, "Also build the W8A8 program with TVM and check it bit for bit.")

HAWQV3 = dict(size_fp32_mib=90.9, gbops_fp32=5850, size_int8_mib=22.7, gbops_int8=366)




def full_inception_costs():
  """Size (MiB) and GBOPs of InceptionV3 at 299x299 (1000 classes), FP32 and INT8."""
  from grassq.models import create_model
  from grassq.quant import cost

  model, shape = create_model("inception_v3", 1000), (299, 299, 3)
  c, n = cost.layer_costs(model, shape), cost.total_params(model, shape)
  return dict(params=n, size_fp32_mib=cost.model_size_mib(c, 32, n, other_bits=32),
              gbops_fp32=cost.bops(c, 32) / 1e9, size_int8_mib=cost.model_size_mib(c, 8, n),
              gbops_int8=cost.bops(c, 8) / 1e9)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from grassq import data, deploy, train
  from grassq.quant import program as P

  if FLAGS.tvm:
    deploy.require_tvm()  # fail before training, not after, when the tvm extra is missing
  os.makedirs(FLAGS.out, exist_ok=True)
  fp = train.train_and_evaluate(FLAGS.config, FLAGS.fp_workdir)
  row = run_qat("w8a8", FLAGS.out, FLAGS.fp_workdir, dict(default_bits=8, default_act_bits=8),
                FLAGS.epochs, FLAGS.learning_rate)
  tvm = None
  if FLAGS.tvm:
    spec = data.get_spec(FLAGS.config.dataset)
    images, labels = data.load_arrays(FLAGS.config.dataset, spec.eval_split)
    tvm = deploy_and_check(P.load(os.path.join(FLAGS.out, "programs", "w8a8")), images, labels,
                           os.path.join(FLAGS.out, "modules"), "w8a8", batch_sizes=(1, 8),
                           repeats=20, dataset=FLAGS.config.dataset)
  full = full_inception_costs()
  results = dict(fp_workdir=FLAGS.fp_workdir, model=FLAGS.config.model,
                 fp32_steps=fp["step"], fp32_accuracy=fp.get("test_accuracy"), w8a8=row, tvm=tvm,
                 inception_v3_299=full, hawq_v3_published=HAWQV3)
  files.write_json(os.path.join(FLAGS.out, "results.json"), results, indent=1)
  r = row
  table = "\n".join([
      f"Small InceptionV3-shaped network ({FLAGS.config.model}) on Fashion-MNIST: "
      f"{fp['step']} float steps, QAT W8A8 {r['epochs']:g} epoch(s), integer-only evaluation "
      "on the 10,000 test images.",
      "",
      "| | FP32 acc. (%) | fake-quant acc. (%) | integer-only acc. (%) | "
      "integer = fake-quant top-1 (%) | largest activation Δ, LSB (layer; mean) | size (MiB) | "
      "GBOPs |",
      "|---|---|---|---|---|---|---|---|",
      f"| W8A8 | {100 * fp.get('test_accuracy', float('nan')):.2f} | "
      f"{100 * r['fake_quant_accuracy']:.2f} | {100 * r['integer_accuracy']:.2f} | "
      f"{100 * r['integer_vs_fake_agreement']:.2f} | {r['max_act_lsb']} "
      f"({r['max_act_lsb_layer']}; {r['mean_act_lsb']:.3f}) | {r['size_mib']:.4f} "
      f"(FP32 {r['size_fp32_mib']:.4f}) | {r['gbops']:.3f} (FP32 {r['gbops_fp32']:.2f}) |",
      "",
      *([] if tvm is None else [
          f"TVM ({tvm['target']}, {tvm['layout']}, untuned) on {tvm['eval_images']:,} test images: "
          f"bit-exact with the JAX interpreter: {'yes' if tvm['bit_exact'] else 'NO'} "
          f"({tvm['mismatches']} differing logits); accuracy {100 * tvm['accuracy_tvm']:.2f}% "
          f"(JAX integer {100 * tvm['accuracy_int']:.2f}%); median ms per call, TVM / "
          "interpreter: " + ", ".join(
              f"batch {b} {tvm['latency_ms']['tvm'][b]:.2f} / "
              f"{tvm['latency_ms']['interpreter'][b]:.2f}" for b in tvm['latency_ms']['tvm']),
          ""]),
      "Full InceptionV3 at 299x299 (grassq.quant.cost on the model; HAWQV3's published figures):",
      "",
      "| | params | size FP32 (MiB) | GBOPs FP32 | size INT8 (MiB) | GBOPs INT8 |",
      "|---|---|---|---|---|---|",
      f"| grassq | {full['params']:,} | {full['size_fp32_mib']:.1f} | {full['gbops_fp32']:.0f} | "
      f"{full['size_int8_mib']:.1f} | {full['gbops_int8']:.0f} |",
      f"| HAWQV3 | | {HAWQV3['size_fp32_mib']} | {HAWQV3['gbops_fp32']} | "
      f"{HAWQV3['size_int8_mib']} | {HAWQV3['gbops_int8']} |",
  ]) + "\n"
  files.atomic_write(os.path.join(FLAGS.out, "table.md"), table)
  print(table)


if __name__ == "__main__":
  app.run(main)
