"""Runs the digits smoke config in a fresh process (so XLA_FLAGS can set the device count).

  python tests/train_runner.py WORKDIR OUT.npz [--steps N] [--kill-at N] [--batch-size B]
      [--lr LR] [--eval-every N] [--kill-in-eval K] [--kill-in-tb-write K] [--diverge-at N]

Saves the final flattened params to OUT.npz and prints a JSON line with the run's result.
Fault injection, each a SIGKILL of this process (a real crash: no cleanup) at a deterministic
point: --kill-at right after that step; --kill-in-eval in the middle of the K-th evaluation
(after its first batch); --kill-in-tb-write in the middle of writing the K-th TensorBoard
record (its header and half its bytes reach the file, as when a flush is cut short).
--diverge-at N makes the learning rate infinite from step N on, so every step from N is
non-finite whatever the CPU's rounding (a large finite rate diverges at a step that depends on it).
"""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import digits_smoke  # noqa: E402
from grassq import train  # noqa: E402


def flat_params(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_eval(k):
  """The k-th evaluation dies after its second batch."""
  orig = train.evaluate
  evals = [0]

  def evaluate(eval_fn, *a, **kw):
    evals[0] += 1
    if evals[0] != k:
      return orig(eval_fn, *a, **kw)
    batches = [0]

    def dying(v, b):
      out = eval_fn(v, b)
      batches[0] += 1
      if batches[0] == 2:
        jax.block_until_ready(out)
        _die()
      return out

    return orig(dying, *a, **kw)

  train.evaluate = evaluate


def _kill_in_tb_write(k):
  """The k-th TensorBoard record is torn: header and half its payload, then SIGKILL."""
  import struct

  from tensorboardX import record_writer

  count = [0]
  orig = record_writer.RecordWriter.write

  def write(self, data):
    count[0] += 1
    if count[0] != k:
      return orig(self, data)
    header = struct.pack("Q", len(data))
    self._writer.write(header + struct.pack("I", record_writer.masked_crc32c(header)))
    self._writer.write(data[:len(data) // 2])
    self._writer.flush()
    _die()

  record_writer.RecordWriter.write = write


def _diverge_at(n):
  """The schedule is infinite from (0-based) step n - 1 on, i.e. the n-th update is non-finite."""
  import jax.numpy as jnp

  orig = train.make_schedule

  def make_schedule(*a, **kw):
    schedule = orig(*a, **kw)
    return lambda count: jnp.where(count >= n - 1, jnp.inf, schedule(count))

  train.make_schedule = make_schedule


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("out")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--kill-at", type=int, default=0)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--lr", type=float, default=0.0)
  ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps")
  ap.add_argument("--kill-in-eval", type=int, default=0)
  ap.add_argument("--kill-in-tb-write", type=int, default=0)
  ap.add_argument("--diverge-at", type=int, default=0)
  args = ap.parse_args()
  config = digits_smoke.get_config()
  config.num_train_steps = args.steps
  config.batch_size = args.batch_size
  if args.lr:
    config.learning_rate = args.lr
  if args.eval_every:
    from grassq import data

    steps_per_epoch = data.steps_per_epoch(1437, config.batch_size)  # digits: 1,437 train
    config.eval_every_epochs = args.eval_every / steps_per_epoch
  if args.kill_in_eval:
    _kill_in_eval(args.kill_in_eval)
  if args.kill_in_tb_write:
    _kill_in_tb_write(args.kill_in_tb_write)
  if args.diverge_at:
    _diverge_at(args.diverge_at)

  def killer(step, state):
    if step == args.kill_at:
      jax.block_until_ready(state)
      _die()

  hooks = [killer] if args.kill_at else []
  result = train.train_and_evaluate(config, args.workdir, hooks=hooks)
  np.savez(args.out, **flat_params(result["state"].params))
  print(json.dumps({k: v for k, v in result.items() if k != "state"} | {
      "devices": jax.device_count()}))


if __name__ == "__main__":
  main()
