"""Are the integer primitives exact on this JAX backend? (GPU/TPU check; prints, writes JSON)

  python -m benchmarks.int_exactness [--program DIR ...] [--out F.json]

1. `intops._matmul_int` (the int8 x int8 -> int32 product under every conv and dense layer),
   int8 / uint8 / int32 operands, over a grid of (M, K, N) — N and K multiples of 4 and not —
   against numpy int64 on the host;
   and a scan over K of XLA's raw int8 dot (wrong for short contractions on GPUs) and of
   `_matmul_int` (which avoids it there);
2. `dyadic.requantize` against Python big integers, random accumulators, multipliers and
   shifts 1..62;
3. each saved program (`grassq.quant.program.save`) through the interpreter with every
   intermediate output, on the default device and on the CPU backend, naming the first op that
   differs.
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import numpy as np

from grassq.quant import intops
from grassq.quant import program as P


def matmul_grid(device, rng):
  rows = []
  for (m, k, n), kind in itertools.product(
      [(8, 9, 16), (8, 64, 10), (8, 64, 16), (8, 147, 64), (8, 512, 1000), (8, 576, 64),
       (784, 9, 16), (3, 7, 5)], ["int8", "uint8", "int32"]):
    lo, hi = (0, 256) if kind == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (m, k)).astype(np.uint8 if kind == "uint8" else np.int8)
    if kind == "int32":
      x = x.astype(np.int32)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    want = x.astype(np.int64) @ w.astype(np.int64)
    got = np.asarray(jax.jit(intops._matmul_int)(jax.device_put(x, device),
                                                  jax.device_put(w, device)))
    bad = int(np.sum(got != want))
    rows.append(dict(m=m, k=k, n=n, x=kind, differing=bad, of=want.size,
                     max_abs_diff=int(np.max(np.abs(got - want))) if bad else 0))
    print(f"matmul {m}x{k}x{n} {kind:5s}: {bad} of {want.size} differ"
          + (f" (max |diff| {rows[-1]['max_abs_diff']})" if bad else ""), flush=True)
  return rows


def k_scan(device, rng, ks=tuple(range(1, 97)) + (127, 128, 129, 147, 255, 256, 576)):
  """Contraction lengths K at which XLA's raw int8 x int8 -> int32 dot is wrong on `device`,
  and at which `intops._matmul_int` (which works around it) is wrong."""
  from jax import lax
  import jax.numpy as jnp

  def raw(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)

  bad_raw, bad_ours = [], []
  for k in ks:
    x = rng.integers(-128, 128, (64, k)).astype(np.int8)
    w = rng.integers(-128, 128, (k, 16)).astype(np.int8)
    want = x.astype(np.int64) @ w.astype(np.int64)
    xd, wd = jax.device_put(x, device), jax.device_put(w, device)
    if not np.array_equal(np.asarray(jax.jit(raw)(xd, wd)), want):
      bad_raw.append(k)
    if not np.array_equal(np.asarray(jax.jit(intops._matmul_int)(xd, wd)), want):
      bad_ours.append(k)
  print(f"K scan ({len(ks)} lengths, M=64, N=16): raw int8 dot wrong at K = {bad_raw}; "
        f"intops._matmul_int wrong at K = {bad_ours}", flush=True)
  return dict(ks=list(ks), raw_int8_dot_wrong=bad_raw, matmul_int_wrong=bad_ours)


def requantize_grid(device, rng, n=20000):
  """`dyadic.requantize` on the device against Python big integers, shifts 1..62."""
  from grassq.quant import requantize, requantize_reference

  rows = []
  for bits, signed in [(8, False), (8, True), (4, False), (16, True), (32, True)]:
    acc = np.concatenate([rng.integers(-2**31, 2**31, n // 2),
                          rng.integers(-2**16, 2**16, n // 2)]).astype(np.int32)
    mult = rng.integers(2**30, 2**31, n).astype(np.int32)
    shift = rng.integers(1, 63, n).astype(np.int32)
    fn = jax.jit(lambda a, m, s: requantize(a, m, s, bits, signed))
    got = np.asarray(fn(*(jax.device_put(v, device) for v in (acc, mult, shift))))
    want = np.asarray(requantize_reference(acc, mult, shift, bits, signed))
    bad = int(np.sum(got != want))
    rows.append(dict(bits=bits, signed=signed, differing=bad, of=n))
    print(f"requantize {bits}-bit {'signed' if signed else 'unsigned'}: {bad} of {n} differ"
          + (f"; e.g. acc {acc[got != want][:3]}, mult {mult[got != want][:3]}, shift "
             f"{shift[got != want][:3]}: got {got[got != want][:3]}, want "
             f"{want[got != want][:3]}" if bad else ""), flush=True)
  return rows


def program_ops(path, device, rng, batch=8):
  prog = P.load(path)
  x = rng.integers(-128, 128, (batch, *prog.input_shape)).astype(np.int8)
  fn = P.interpreter(prog, all_outputs=True)
  outs = {}
  for dev in (jax.devices("cpu")[0], device):
    arrays = jax.device_put(P.program_arrays(prog), dev)
    outs[dev.platform] = jax.tree_util.tree_map(np.asarray, fn(arrays, jax.device_put(x, dev)))
  ref, got = outs["cpu"], outs[device.platform]
  first = None
  for op in prog.ops:
    name = op.name
    if not np.array_equal(ref[name], got[name]):
      first = dict(op=name, kind=op.kind, inputs=list(op.inputs), shape=list(ref[name].shape),
                   differing=int(np.sum(ref[name] != got[name])),
                   attrs={a: v for a, v in op.attrs.items() if not hasattr(v, "shape")})
      break
  print(f"{path}: first differing op: {first}", flush=True)
  return dict(program=path, first_differing=json.loads(json.dumps(first, default=str)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--program", nargs="*", default=[])
  ap.add_argument("--out")
  args = ap.parse_args(argv)
  device, rng = jax.devices()[0], np.random.default_rng()
  print(f"device: {device.device_kind} ({device.platform}), JAX {jax.__version__}", flush=True)
  report = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                matmul=matmul_grid(device, rng), k_scan=k_scan(device, rng),
                requantize=requantize_grid(device, rng),
                programs=[program_ops(p, device, rng) for p in args.program])
  if args.out:
    from grassq import files
    files.write_json(args.out, report, indent=1)


if __name__ == "__main__":
  main()
