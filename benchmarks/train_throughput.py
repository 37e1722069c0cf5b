"""Throughput of grassq's training loop vs a plain flax/optax step, measured in one run.

  python -m benchmarks.train_throughput [--batch-size 128] [--steps 60] [--repeats 5]
  python -m benchmarks.train_throughput --compare-guard [--rounds 4]

"plain" is the bare jitted step (same ResNet-20, SGD + momentum, one batch already on the
device, no data pipeline, no augmentation, no logging, no checkpoints): an upper bound for any
loop. "grassq loop" is `grassq.train.train_and_evaluate` on grassq_fashion_mnist with
everything on (host batching, prefetch, on-device augmentation, metrics, checkpoints at the end),
timed from its own images/s log after warm-up. Run it on an otherwise idle machine.

``--compare-guard`` times the loop with its non-finite step guard on (the default,
``max_nonfinite_steps=5``) and off (``-1``), in alternating runs of the same process: the
guard's cost as the ratio of the two medians.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import optax

from experiments.configs import fmnist_resnet20
from grassq import data as gdata
from grassq import models, train


def plain_images_per_sec(batch_size, steps, repeats):
  model = models.create_model("resnet20", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (batch_size, 28, 28, 1))
  y = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
  variables = model.init(jax.random.key(2), x[:1])
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), upd["batch_stats"], opt_state, loss

  carry = (variables["params"], variables["batch_stats"], opt_state)
  for _ in range(3):  # warm-up (compile)
    *carry, loss = step(*carry)
  jax.block_until_ready(loss)
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      *carry, loss = step(*carry)
    jax.block_until_ready(loss)
    rates.append(steps * batch_size / (time.perf_counter() - t))
  return statistics.median(rates), rates


def loop_images_per_sec(batch_size, steps, repeats, max_nonfinite_steps=5):
  config = fmnist_resnet20.get_config()
  config.max_nonfinite_steps = max_nonfinite_steps
  config.batch_size = batch_size
  config.log_every_steps = steps
  config.num_train_steps = steps * (repeats + 1)
  config.eval_every_epochs = 1e9  # evaluate only at the end
  config.checkpoint_every_steps = 10**9
  config.progress_bar = False
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [r["images_per_sec"] for r in rows if "images_per_sec" in r][1:]  # first has compile
  return statistics.median(rates), rates


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch-size", type=int, default=128)
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--compare-guard", action="store_true")
  ap.add_argument("--rounds", type=int, default=4)
  args = ap.parse_args()
  gdata.prepare()
  if args.compare_guard:
    rates = {5: [], -1: []}
    for _ in range(args.rounds):  # interleaved: on, off, on, off, ...
      for setting in rates:
        got = loop_images_per_sec(args.batch_size, args.steps, args.repeats, setting)[1]
        rates[setting] += got
        print(f"max_nonfinite_steps={setting}: " + ", ".join(f"{r:.0f}" for r in got)
              + " images/s", flush=True)
    on, off = (statistics.median(rates[k]) for k in (5, -1))
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch "
          f"{args.batch_size}, {args.rounds} interleaved rounds of {args.repeats} windows")
    print(f"guard on  : {on:8.1f} images/s  ({', '.join(f'{r:.0f}' for r in rates[5])})")
    print(f"guard off : {off:8.1f} images/s  ({', '.join(f'{r:.0f}' for r in rates[-1])})")
    print(f"step time on / off: {off / on:.3f}")
    return
  plain, plain_all = plain_images_per_sec(args.batch_size, args.steps, args.repeats)
  loop, loop_all = loop_images_per_sec(args.batch_size, args.steps, args.repeats)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch_size}")
  print(f"plain flax/optax step : {plain:8.1f} images/s  (repeats: "
        f"{', '.join(f'{r:.0f}' for r in plain_all)})")
  print(f"grassq training loop  : {loop:8.1f} images/s  (repeats: "
        f"{', '.join(f'{r:.0f}' for r in loop_all)})")
  print(f"ratio loop / plain    : {loop / plain:.3f}")


if __name__ == "__main__":
  main()
