"""The Grassmann optimizer step alone: grassq's default vs the released code's update.

  python -m benchmarks.rsgd_update [--classes 1000 --n 2048 --k 8] [--repeats 7] [--out F.json]

Each candidate is a jitted `tx.update` + `optax.apply_updates` on (C, n, k) float32 bases with
a fresh gradient per step, timed over 10 consecutive steps (two periods of the released RSGD's
QR) after a warm-up, repeats interleaved between candidates; prints the median time per step and
the ratio to grassq's default (`riemannian_sgd`, sign-fixed QR every step), and the
orthonormality error after 200 steps. Then, in float64 on (10, 64, 8) bases with unit-normal
gradients and lr 0.1, how far the trajectories part: the largest difference of the projectors
S S^T of grassq's default and of the released update after 1, 30 and 150 steps, and of the
released update with its unsigned QR and with a sign-fixed one. ``--out`` also writes them as
JSON (atomically).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from grassq import files, grassmann, optim


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--classes", type=int, default=1000)
  ap.add_argument("--n", type=int, default=2048)
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--lr", type=float, default=0.1)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", help="also write the results here as JSON")
  args = ap.parse_args()
  candidates = {
      "grassq default (sign-fixed QR every step)": optim.riemannian_sgd(args.lr),
      "released RSGD (geodesic, unsigned QR every 5)": optim.released_rsgd(args.lr),
      "released R-AdamW/LAMB (geodesic, QR every step)": optim.released_rsgd(
          args.lr, reorthonormalize_every=1),
      "geodesic, never re-orthonormalized": optim.released_rsgd(
          args.lr, reorthonormalize_every=0),
  }
  bases = grassmann.random_bases(jax.random.key(0), args.classes, args.n, args.k)
  grads = jax.random.normal(jax.random.key(1), (10, *bases.shape)) / jnp.sqrt(args.n)
  runners, states = {}, {}
  for name, tx in candidates.items():
    def run(params, state, grads, tx=tx):
      def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
      return jax.lax.scan(body, (params, state), grads)[0]
    runners[name] = jax.jit(run)
    states[name] = jax.block_until_ready(runners[name](bases, tx.init(bases), grads))
  times = {name: [] for name in candidates}
  for _ in range(args.repeats):
    for name, f in runners.items():
      p, s = states[name]
      t = time.perf_counter()
      states[name] = jax.block_until_ready(f(p, s, grads))
      times[name].append((time.perf_counter() - t) / len(grads))
  base = statistics.median(times["grassq default (sign-fixed QR every step)"])
  print(f"device: {jax.devices()[0].device_kind}; bases ({args.classes}, {args.n}, {args.k}) "
        f"float32; median of {args.repeats} interleaved repeats of 10 steps")
  rows = {}
  for name, f in runners.items():
    p, s = bases, candidates[name].init(bases)
    for _ in range(20):  # 200 steps
      p, s = f(p, s, grads)
    err = float(grassmann.orthonormality_error(p))
    t = statistics.median(times[name])
    rows[name] = dict(ms_per_step=1e3 * t, ratio_to_default=t / base,
                      orthonormality_error_after_200=err)
    print(f"{name:50s} {1e3 * t:8.2f} ms/step  x{t / base:5.2f}   |S^T S - I| after 200 steps "
          f"{err:.1e}")
  parting = trajectories()
  for t, row in parting.items():
    print(f"after {t:3d} steps: max |P_default - P_released| {row['default_vs_released']:.2e}, "
          f"max |P_unsigned - P_signed| {row['unsigned_vs_signed_qr']:.2e}")
  if args.out:
    files.write_json(args.out, dict(device=jax.devices()[0].device_kind,
                                    shape=[args.classes, args.n, args.k], dtype="float32",
                                    repeats=args.repeats, results=rows,
                                    projector_differences=parting), indent=1)


def trajectories(steps=(1, 30, 150)):
  """{step: projector differences} of three updates on the same float64 gradients."""
  import numpy as np

  rng = np.random.default_rng(0)
  start = np.stack([np.linalg.qr(rng.normal(size=(64, 8)))[0] for _ in range(10)])
  grads = rng.normal(size=(max(steps), *start.shape))
  with jax.enable_x64(True):
    def run(tx):
      p, s = jnp.asarray(start), tx.init(jnp.asarray(start))
      f, out = jax.jit(tx.update), {}
      for t, g in enumerate(grads, 1):
        u, s = f(jnp.asarray(g), s, p)
        p = optax.apply_updates(p, u)
        if t in steps:
          out[t] = np.asarray(p @ jnp.swapaxes(p, -1, -2))
      return out
    d = run(optim.riemannian_sgd(0.1))
    r = run(optim.released_rsgd(0.1))
    rs = run(optim.released_rsgd(0.1, reorthonormalize_qr="signed"))
  return {t: dict(default_vs_released=float(np.abs(d[t] - r[t]).max()),
                  unsigned_vs_signed_qr=float(np.abs(r[t] - rs[t]).max())) for t in steps}


if __name__ == "__main__":
  main()
