"""Runs the digits smoke config in a fresh process (so XLA_FLAGS can set the device count).

  python tests/train_runner.py WORKDIR OUT.npz [--steps N] [--kill-at N] [--batch-size B]

Saves the final flattened params to OUT.npz and prints a JSON line with the run's result.
With --kill-at the process SIGKILLs itself right after that step (a real crash: no cleanup).
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


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("out")
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--kill-at", type=int, default=0)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--lr", type=float, default=0.0)
  args = ap.parse_args()
  config = digits_smoke.get_config()
  config.num_train_steps = args.steps
  config.batch_size = args.batch_size
  if args.lr:
    config.learning_rate = args.lr

  def killer(step, state):
    if step == args.kill_at:
      jax.block_until_ready(state)
      os.kill(os.getpid(), signal.SIGKILL)

  hooks = [killer] if args.kill_at else []
  result = train.train_and_evaluate(config, args.workdir, hooks=hooks)
  np.savez(args.out, **flat_params(result["state"].params))
  print(json.dumps({k: v for k, v in result.items() if k != "state"} | {
      "devices": jax.device_count()}))


if __name__ == "__main__":
  main()
