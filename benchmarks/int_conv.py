"""Integer convolution on XLA: im2col + int8 dot (grassq) vs XLA's float32 and integer convs.

  python -m benchmarks.int_conv [--size 56 --channels 64 --batches 1 8] [--repeats 7]

A 3x3 stride-1 'SAME' conv, C -> C channels on an S x S map, NHWC x HWIO, jitted, warmed up,
median of `repeats`. Candidates: `intops.conv2d_int` on int8 and on uint8 activations (the uint8
path runs the same int8 kernel on x ^ 0x80 plus a per-channel correction) and on int32 activations
(an int32 dot: what happens without int8 operands); XLA `lax.conv_general_dilated` in float32; and
XLA's own integer convolution (int8 and int32 operands, int32 accumulation). Prints ms and the
ratio to float32, and checks every integer result against the int8 im2col one.
"""

import argparse

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from grassq._timing import median_ms
from grassq.quant import intops

DIMS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, w, preferred=None):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DIMS,
                                  preferred_element_type=preferred)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=56)
  ap.add_argument("--channels", type=int, default=64)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  c, s = args.channels, args.size
  w8 = rng.integers(-128, 128, (3, 3, c, c)).astype(np.int8)
  conv_int = lambda x, w: intops.conv2d_int(x, w, (1, 1), ((1, 1), (1, 1)))
  print(f"device: {jax.devices()[0].device_kind}; 3x3 conv {c}->{c} on {s}x{s}, 'SAME'; "
        f"median of {args.repeats}")
  for batch in args.batches:
    u8 = rng.integers(0, 256, (batch, s, s, c)).astype(np.uint8)
    s8 = rng.integers(-128, 128, (batch, s, s, c)).astype(np.int8)
    candidates = {
        "XLA conv float32": (xla_conv, s8.astype(np.float32), w8.astype(np.float32)),
        "conv2d_int int8 x int8 (im2col)": (conv_int, s8, w8),
        "conv2d_int uint8 x int8 (im2col)": (conv_int, u8, w8),
        "conv2d_int int32 x int8 (im2col)": (conv_int, s8.astype(np.int32), w8),
        "XLA conv int8 -> int32": (lambda x, w: xla_conv(x, w, jnp.int32), s8, w8),
        "XLA conv int32 -> int32": (
            lambda x, w: xla_conv(x, w, jnp.int32), s8.astype(np.int32), w8.astype(np.int32)),
    }
    results = {}
    for name, (fn, x, w) in candidates.items():
      try:
        results[name] = median_ms(jax.jit(fn), x, w, repeats=args.repeats)
      except Exception as e:  # an XLA backend without integer convolution
        print(f"  {name}: unsupported ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    ref_s8 = np.asarray(results["conv2d_int int8 x int8 (im2col)"][1])
    ref_u8 = np.asarray(results["conv2d_int uint8 x int8 (im2col)"][1])
    for x, ref in ((u8, ref_u8), (s8, ref_s8)):  # spot check against int64: output pixel (0, 0)
      window = np.pad(x[0, :2, :2].astype(np.int64), ((1, 0), (1, 0), (0, 0)))
      assert np.array_equal(ref[0, 0, 0], np.einsum("hwc,hwco->o", window, w8.astype(np.int64)))
    base = results["XLA conv float32"][0]
    print(f"batch {batch}:")
    for name, (ms, out) in results.items():
      check = ""
      if "float32" not in name:
        ref = ref_u8 if "uint8" in name else ref_s8
        check = "  exact" if np.array_equal(np.asarray(out), ref) else "  MISMATCH"
      print(f"  {name:34s} {ms:8.2f} ms   x{ms / base:6.2f} of float32{check}")


if __name__ == "__main__":
  main()
