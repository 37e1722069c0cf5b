"""One training step: GCR head + Riemannian SGD vs linear head + SGD, same model and batch.

  python -m benchmarks.gcr_step [--batch-size 128] [--steps 20] [--repeats 7]

Both steps are `grassq.train.train_step` (augmentation included) on ResNet-20 with a
Fashion-MNIST-shaped batch; only the head and the optimizer differ. Repeats alternate between the
two so that drifts in machine load hit both. Prints the median step time and the ratio.
"""

import argparse
import statistics
import time

import jax
import numpy as np

from experiments.configs import gcr_fmnist
from grassq import data as gdata
from grassq import train


def make_step(head: str, batch_size: int):
  config = gcr_fmnist.get_config()
  config.batch_size = batch_size
  config.head = head
  if head != "grassmann":
    config.head_kwargs = {}
  spec = gdata.get_spec(config.dataset)
  model = train.build_model(config, spec.num_classes)
  tx = train.make_optimizer(config, train.make_schedule(config, 468, 3744))
  state = train.create_train_state(jax.random.key(0), model, tx, spec.image_shape)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (batch_size, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)}
  batch = jax.device_put(batch)
  step = jax.jit(lambda s, b, k: train_step_fn(s, b, k, model, tx, spec, config),
                 donate_argnums=0)
  return step, state, batch


def train_step_fn(s, b, k, model, tx, spec, config):
  return train.train_step(s, b, k, model=model, tx=tx, spec=spec, config=config)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch-size", type=int, default=128)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=7)
  args = ap.parse_args()
  key = jax.random.key(1)
  runs = {}
  for head in ("linear", "grassmann"):
    step, state, batch = make_step(head, args.batch_size)
    for _ in range(3):  # compile + warm-up
      state, m = step(state, batch, key)
    jax.block_until_ready(m)
    runs[head] = [step, state, batch, []]
  for _ in range(args.repeats):
    for head, r in runs.items():
      step, state, batch, times = r
      t = time.perf_counter()
      for _ in range(args.steps):
        state, m = step(state, batch, key)
      jax.block_until_ready(m)
      times.append((time.perf_counter() - t) / args.steps)
      r[1] = state
  lin = statistics.median(runs["linear"][3])
  gcr = statistics.median(runs["grassmann"][3])
  print(f"device: {jax.devices()[0].device_kind}, ResNet-20, batch {args.batch_size}, "
        f"median of {args.repeats} x {args.steps} steps")
  print(f"linear head + SGD                 : {1e3 * lin:7.2f} ms/step")
  print(f"GCR head (k=8) + Riemannian SGD   : {1e3 * gcr:7.2f} ms/step")
  print(f"ratio GCR / linear                : {gcr / lin:.3f}")


if __name__ == "__main__":
  main()
