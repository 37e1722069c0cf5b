"""grassq's requantization against HAWQV3's released arithmetic, on real accumulators.

  python -m benchmarks.hawq_rounding [--images 500] [--out F.json]

A ResNet-20 QAT model (W8A8, unsigned activations) calibrated on one training batch of
Fashion-MNIST, converted to its integer program; the int32 accumulators that every `requantize`
op of the program reads on the first test images are requantized three ways:

* grassq: `program.interpreter`'s own output (exact round half up of acc * M / 2^s, int32
  emulation, as `dyadic.requantize_reference` in Python integers);
* HAWQ rounding: the same M and s through HAWQV3's `fixedpoint_mul` (quant_utils.py, case 0):
  the product in float64, `torch.round` (half to even) of it divided by 2^s;
* HAWQ rounding and scale: additionally the scale M * 2^-s rounded to float32 before `frexp`, as
  HAWQV3 casts the composed scale (`_A.type(torch.float)`), and its multiplier not halved when
  rounding gives 2^31.

Prints, per op and overall, the fraction of outputs that differ from grassq's and the largest
difference in output LSBs. No torch: the two HAWQ variants are a numpy transcription.
"""

import argparse
import json

import jax
import numpy as np

from grassq import data, files
from grassq.models import create_model
from grassq.quant import qresnet
from grassq.quant.dyadic import clip_range
from grassq.quant import program as P


def hawq_requant(acc, multiplier, shift, lo, hi, relu, float32_scale):
  acc = acc.astype(np.float64)
  m = multiplier.astype(np.float64)
  e = shift.astype(np.float64)
  if float32_scale:
    scale = (m * 2.0**-e).astype(np.float32).astype(np.float64)
    mant, ex = np.frexp(scale)
    m = np.floor(mant * 2.0**31 + 0.5)  # Decimal ROUND_HALF_UP; may be 2^31
    e = 31.0 - ex
  out = np.round(acc * m / 2.0**e)
  if relu:
    lo = max(lo, 0)
  return np.clip(out, lo, hi)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--images", type=int, default=500)
  ap.add_argument("--out", help="also write the results here as JSON")
  args = ap.parse_args()
  spec = data.get_spec("grassq_fashion_mnist")
  xtr, _ = data.load_arrays("grassq_fashion_mnist", "train")
  xte, _ = data.load_arrays("grassq_fashion_mnist", "test")
  norm = lambda x: np.asarray(data.normalize(jax.numpy.asarray(x), spec))
  model = create_model("resnet20", spec.num_classes)
  q = qresnet.quantized(model)
  batch = norm(xtr[:256])
  v = jax.jit(q.init)(jax.random.key(0), batch[:1])
  _, upd = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["batch_stats"]))(v, batch)
  v = {**v, "batch_stats": upd["batch_stats"]}
  prog = P.to_program(q, v, batch.shape[1:])
  x = np.asarray(P.quantize_input(prog, norm(xte[:args.images])))
  outs = P.interpreter(prog, all_outputs=True)(P.program_arrays(prog), x)
  producer = {op.output: op.name for op in prog.ops}
  rows, total = {}, {"n": 0, "rounding": 0, "rounding_and_scale": 0}
  for op in prog.ops:
    if op.kind != "requantize":
      continue
    acc = np.asarray(outs[producer[op.inputs[0]]]).astype(np.int64)
    got = np.asarray(outs[op.name]).astype(np.int64)
    m, s = (np.asarray(op.arrays[k]).astype(np.int64) for k in ("multiplier", "shift"))
    m, s = np.broadcast_to(m, acc.shape[-1:]), np.broadcast_to(s, acc.shape[-1:])
    lo, hi = clip_range(op.attrs["bits"], op.attrs["signed"], op.attrs["saturate"])
    # grassq's rule in Python integers, to show the interpreter is that rule
    exact = np.floor_divide(acc * m + (1 << (s - 1)), 1 << s)
    exact = np.clip(exact, max(lo, 0) if op.attrs.get("relu") else lo, hi)
    assert np.array_equal(exact, got), op.name
    row = {"n": int(got.size)}
    for key, f32 in (("rounding", False), ("rounding_and_scale", True)):
      h = hawq_requant(acc, m, s, lo, hi, op.attrs.get("relu"), f32)
      diff = np.abs(h - got)
      row[key] = {"frac_differ": float(np.mean(diff > 0)), "max_lsb": float(diff.max())}
      total[key] += int(np.sum(diff > 0))
    total["n"] += row["n"]
    rows[op.name] = row
    print(f"{op.name:28s} n={row['n']:9d}  rounding: {row['rounding']['frac_differ']:.2e} "
          f"(max {row['rounding']['max_lsb']:.0f} LSB)  +float32 scale: "
          f"{row['rounding_and_scale']['frac_differ']:.2e} "
          f"(max {row['rounding_and_scale']['max_lsb']:.0f} LSB)")
  summary = {k: total[k] / total["n"] for k in ("rounding", "rounding_and_scale")}
  print(f"all {total['n']} requantized values: differ from grassq's with HAWQ's rounding "
        f"{summary['rounding']:.2e}, with its rounding and float32 scale "
        f"{summary['rounding_and_scale']:.2e}")
  if args.out:
    files.write_json(args.out, {"layers": rows, "overall": summary, "images": args.images},
                     indent=1)


if __name__ == "__main__":
  main()
