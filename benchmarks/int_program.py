"""The integer program's int32 interpreter vs the float model in JAX, whole network, on this device.

  python -m benchmarks.int_program [--fp_workdir runs/fmnist_resnet20]
      [--programs results/quant/programs/w8a8 results/quant/programs/w4a8] [--batches 1 128]

Times one forward pass of the float ResNet (eval mode) and of the
integer interpreter on each saved program (jitted, warmed up, median of `repeats`), and prints the
ratios to the float model. The programs come from `python -m experiments.quantize`, the float run
from `python -m experiments.train --config experiments/configs/fmnist_resnet20.py`.
"""

import argparse
import os

import jax
import numpy as np

from grassq._timing import median_ms


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--fp_workdir", default="runs/fmnist_resnet20")
  ap.add_argument("--programs", nargs="+",
                  default=["results/quant/programs/w8a8", "results/quant/programs/w4a8"])
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()

  from grassq import data, train
  from grassq.quant import program as P

  for path in [args.fp_workdir, *args.programs]:
    if not os.path.exists(path):
      raise SystemExit(f"{path} not found: run experiments.train (fmnist_resnet20 config) and "
                       "experiments.quantize first (see this module's docstring)")
  model, variables, config = train.load_checkpoint(args.fp_workdir)
  spec = data.get_spec(config.dataset)
  images, _ = data.load_arrays(config.dataset, spec.eval_split, config.data_dir)
  float_fn = jax.jit(lambda v, x: model.apply(v, x))
  programs = {os.path.basename(p.rstrip("/")): P.load(p) for p in args.programs}
  print(f"device: {jax.devices()[0].device_kind}; {config.model} on {spec.name} "
        f"{spec.image_shape}; median of {args.repeats} after warm-up")
  for batch in args.batches:
    x = np.asarray(data.normalize(images[:batch], spec))
    t_float, ref = median_ms(float_fn, variables, x, repeats=args.repeats)
    print(f"batch {batch:4d}  float32 model            {t_float:8.3f} ms  1.00x")
    for name, prog in programs.items():
      fn, arrays = P.interpreter(prog), P.program_arrays(prog)
      xq = P.quantize_input(prog, x)
      t, logits = median_ms(fn, arrays, xq, repeats=args.repeats)
      agree = float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(ref).argmax(-1)))
      print(f"batch {batch:4d}  integer program {name:8s} {t:8.3f} ms  {t / t_float:.2f}x  "
            f"(argmax = float on {100 * agree:.0f}%)")


if __name__ == "__main__":
  main()
