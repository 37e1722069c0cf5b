"""Register tiles of the hand VNNI conv schedule, on ResNet-18's 3×3 convolutions alone.

  python -m benchmarks.conv_tile [--tiles 1x8 2x16 4x24 1x16] [--batch 8] [--repeats 10]

A tile "OxA" is up to O 16-channel output blocks and A int32 accumulators in all (so A/O output
pixels per row; `grassq.deploy.vnni.CONV_TILE`). Each 3×3 conv of a random calibrated ResNet-18
is built as `benchmarks.deploy.conv_program` (its input conversion, the conv, the requantize, a
global pool), checked bit for bit against the interpreter, and timed (median after warm-up);
the totals weight each shape by its count in the network, next to XLA float32's convs.
"""

import argparse

import numpy as np

from benchmarks.deploy import _xla_conv, conv3x3_layers, conv_program
from grassq._timing import median_ms


def main(argv=None):
  from grassq import deploy
  from grassq.deploy import vnni
  from grassq.deploy.bench import random_program
  from grassq.quant import program as P

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiles", nargs="+", default=["1x8", "2x16", "4x24", "1x16"])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args(argv)
  tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles]
  prog = random_program("resnet18", 1000, (224, 224, 3), calibration_batch=8)
  rng, b = np.random.default_rng(0), args.batch
  totals, xla = {t: 0.0 for t in tiles}, 0.0
  saved = dict(vnni.CONV_TILE)
  try:
    for (h, w, cin, cout, s), (count, conv, reader) in conv3x3_layers(prog).items():
      p = conv_program(conv, reader, (h, w, cin))
      x = rng.integers(-128, 128, (b, h, w, cin)).astype(np.int8)
      ref = np.asarray(P.run(p, x))
      wf = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
      ms = median_ms(_xla_conv(s), x.astype(np.float32), wf,
                     rng.standard_normal(cout).astype(np.float32), repeats=args.repeats,
                     warmup=2)[0]
      xla += count * ms
      row = [f"{h}x{w} {cin}->{cout}/{s} x{count}: XLA f32 {ms:.2f}"]
      for t in tiles:
        vnni.CONV_TILE.update(oc_blocks=t[0], accumulators=t[1])
        module = deploy.build(p, None, b)
        if not np.array_equal(module(x), ref):
          raise AssertionError(f"tile {t} differs from the interpreter on {row[0]}")
        ms = median_ms(module, x, repeats=args.repeats, warmup=2)[0]
        totals[t] += count * ms
        row.append(f"{t[0]}x{t[1]} {ms:.2f}")
      print(", ".join(row), flush=True)
  finally:
    vnni.CONV_TILE.update(saved)
  print(f"batch {b}, ms summed over the network's 3x3 convs: XLA float32 {xla:.2f}; " + ", ".join(
      f"tile {t[0]}x{t[1]} {v:.2f} ({xla / v:.2f}x XLA)" for t, v in totals.items()))


if __name__ == "__main__":
  main()
