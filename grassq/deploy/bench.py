"""Times an integer program under TVM against the JAX int32 interpreter, checking bit-exactness.

    python -m grassq.deploy.bench --program runs/prog --batch 1 8
    python -m grassq.deploy.bench --batch 1 8          # a calibrated random ResNet-20 (W8A8)

For each batch size: the JAX interpreter (jit, CPU), TVM's default build (NHWC, untuned), and
the default `build` (NCHW16c + VNNI hand schedule on a VNNI CPU), optionally a MetaSchedule-tuned
build (``--tune_dir``). Every TVM module's logits are compared with the interpreter's first;
times are medians in one process, so their ratios are what to read on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from grassq._timing import median_ms


def random_program(model_name="resnet20", num_classes=10, image_shape=(32, 32, 3), bits=None,
                   default_bits=8, act_bits=None, calibration_batch=16, seed=0, **model_kwargs):
  """The integer program of a `create_model(model_name)` ResNet with random weights, calibrated
  on one batch of standard normal images (a speed benchmark's stand-in for a trained one).

  `bits` / `act_bits` ({layer: bits}) and `default_bits` are `qresnet.quantized`'s.
  """
  import jax

  from grassq.models import create_model
  from grassq.quant import program as P
  from grassq.quant import qresnet

  model = create_model(model_name, num_classes, **model_kwargs)
  q = qresnet.quantized(model, bits=bits, default_bits=default_bits, act_bits=act_bits,
                        fix_bn=True)
  x = jax.random.normal(jax.random.key(seed + 3), (calibration_batch, *image_shape))
  qv = jax.jit(q.init)(jax.random.key(seed), x[:1])
  _, upd = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["batch_stats"]))(qv, x)
  return P.to_program(q, {**qv, "batch_stats": upd["batch_stats"]}, image_shape)


def random_resnet20(image_shape=(32, 32, 3), bits=None, default_bits=8, **model_kwargs):
  """The integer program of a ResNet-20 with random weights and one-batch calibration."""
  return random_program("resnet20", model_kwargs.pop("num_classes", 10), image_shape, bits,
                        default_bits, **model_kwargs)


def compare(program, batches=(1, 8), repeat=20, tune_dir=None, trials=0, seed=0):
  """{batch: {variant: {"ms": median ms per call, "build_s": seconds}}}, all checked exact."""
  import tvm

  from grassq import deploy
  from grassq.quant import program as P

  rng = np.random.default_rng(seed)
  fn, arrays = P.interpreter(program), P.program_arrays(program)
  target = deploy.host_target()
  results = {}
  for b in batches:
    x = rng.integers(-128, 128, (b, *program.input_shape)).astype(np.int8)
    want = np.asarray(fn(arrays, x))
    row = {"jax_interpreter": {"ms": median_ms(fn, arrays, x, repeats=repeat)[0]}}
    variants = {"tvm_default_nhwc": None, "tvm_build": {}}
    if tune_dir:
      variants["tvm_metaschedule"] = dict(tune_dir=tune_dir, trials=trials)
    for name, kw in variants.items():
      t = time.perf_counter()
      if kw is None:  # TVM's own pipeline, no schedule: the baseline
        ex = tvm.compile(deploy.to_relax(program, b, "NHWC"), tvm.target.Target(target))
        module = deploy.Deployed(ex, tvm.cpu(), str(target))
      else:
        module = deploy.build(program, target, b, **kw)
      build_s = time.perf_counter() - t
      got = module(x)
      if not np.array_equal(got, want):
        raise AssertionError(f"{name} at batch {b} differs from the interpreter")
      row[name] = {"ms": 1e3 * module.time(x, number=max(1, repeat // 4), repeat=5),
                   "build_s": round(build_s, 1)}
    results[b] = row
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--program", help="a directory written by grassq.quant.program.save")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  p.add_argument("--repeat", type=int, default=20)
  p.add_argument("--tune_dir", help="also build with MetaSchedule, its database here")
  p.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (0: apply only)")
  args = p.parse_args(argv)
  from grassq.deploy import has_avx512_vnni, host_target
  from grassq.quant import program as P

  program = P.load(args.program) if args.program else random_resnet20()
  res = compare(program, args.batch, args.repeat, args.tune_dir, args.trials)
  print(json.dumps(dict(target=host_target(), avx512_vnni=has_avx512_vnni(),
                        input_shape=list(program.input_shape), results=res), indent=1))


if __name__ == "__main__":
  main()
