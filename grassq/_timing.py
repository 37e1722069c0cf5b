"""The one timing rule of the benchmarks: warm up, then the median wall-clock time of repeats."""

from __future__ import annotations

import statistics
import sys
import time


def _block(out):
  """Waits for JAX's asynchronous results (other outputs are already computed)."""
  jax = sys.modules.get("jax")
  return jax.block_until_ready(out) if jax is not None else out


def median_ms(fn, *args, repeats: int = 20, warmup: int = 1, max_seconds: float | None = None):
  """Median milliseconds of ``fn(*args)`` over `repeats` calls, after `warmup` calls.

  Outputs are blocked on (`jax.block_until_ready`) inside the timed region, so asynchronous
  dispatch is not mistaken for speed. With `max_seconds`, warm-up stops after half of it and
  repeats once it has been spent (at least one timed call): slow candidates still finish.

  Returns:
    (median ms, the last output).
  """
  out, start = None, time.perf_counter()
  for _ in range(max(0, warmup)):
    out = _block(fn(*args))
    if max_seconds is not None and time.perf_counter() - start > max_seconds / 2:
      break
  times, start = [], time.perf_counter()
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    out = _block(fn(*args))
    times.append(time.perf_counter() - t)
    if max_seconds is not None and time.perf_counter() - start > max_seconds:
      break
  return 1e3 * statistics.median(times), out
