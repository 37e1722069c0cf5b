"""The retraction alone at ImageNet scale: 1000 classes, n = 2048, k = 8 (float32).

  python -m benchmarks.retraction [--classes 1000 --n 2048 --k 8] [--repeats 7] [--out F.json]

Each candidate maps (S, step) to new orthonormal bases, jitted: sign-fixed Householder QR and
CholeskyQR2 (the two methods of `retract_qr`, whose default picks Householder on CPUs and
CholeskyQR2 on GPUs/TPUs), polar (SVD), and the paper's geodesic step (thin SVD of the step, cos/sin
update, then re-orthonormalisation). Prints median times and ratios to Householder QR, and the
largest subspace difference (principal angle) of each result from the geodesic; ``--out``
also writes them as JSON (atomically).
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from grassq import grassmann


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--classes", type=int, default=1000)
  ap.add_argument("--n", type=int, default=2048)
  ap.add_argument("--k", type=int, default=8)
  ap.add_argument("--lr", type=float, default=0.1)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--out", help="also write the results here as JSON")
  args = ap.parse_args()
  k1, k2 = jax.random.split(jax.random.key(0))
  bases = grassmann.random_bases(k1, args.classes, args.n, args.k)
  grad = jax.random.normal(k2, bases.shape) / jnp.sqrt(args.n)
  step = -args.lr * grassmann.project_tangent(bases, grad)
  candidates = {
      "householder QR (sign-fixed)": functools.partial(grassmann.retract_qr,
                                                       method="householder"),
      "CholeskyQR2": functools.partial(grassmann.retract_qr, method="cholesky"),
      "polar (SVD)": grassmann.retract_polar,
      "geodesic (paper, SVD)": grassmann.exp_map,
  }
  results, outputs = {}, {}
  for name, fn in candidates.items():
    f = jax.jit(fn)
    out = jax.block_until_ready(f(bases, step))
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      jax.block_until_ready(f(bases, step))
      times.append(time.perf_counter() - t)
    results[name], outputs[name] = statistics.median(times), out
  geo = outputs["geodesic (paper, SVD)"]
  base = results["householder QR (sign-fixed)"]
  print(f"device: {jax.devices()[0].device_kind}; bases ({args.classes}, {args.n}, {args.k}) "
        f"float32; median of {args.repeats}")
  rows = {}
  for name, t in results.items():
    angle = float(jnp.max(grassmann.principal_angles(outputs[name], geo)))
    err = float(jnp.max(grassmann.orthonormality_error(outputs[name])))
    rows[name] = dict(ms=1e3 * t, ratio_to_qr=t / base, max_angle_to_geodesic=angle,
                      orthonormality_error=err)
    print(f"{name:30s} {1e3 * t:9.1f} ms   x{t / base:5.2f}   "
          f"max angle to geodesic {angle:.1e} rad   |S^T S - I| {err:.1e}")
  if args.out:
    from grassq import files

    files.write_json(args.out, dict(
        device=jax.devices()[0].device_kind, shape=[args.classes, args.n, args.k],
        dtype="float32", repeats=args.repeats, results=rows), indent=1)


if __name__ == "__main__":
  main()
