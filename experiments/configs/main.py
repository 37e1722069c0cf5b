"""The main job (`python -m experiments.main`, `make run`): GCR ResNet-20 -> W8A8 and mixed -> TVM.

  --config experiments/configs/main.py          # the short schedules: under 20 min on 2 cores
  --config experiments/configs/main.py:full     # the benchmark schedules (8 float epochs, 1 QAT)
  --config experiments/configs/main.py:smoke    # a ResNet-8 on digits in ~2 min: the test's

Any field can be overridden on the command line, e.g. ``--config.train.dataset=grassq_mnist``
or ``--config.budget=bops:low``; ``config.train`` is an ordinary training config
(`grassq.train.default_config`).
"""

import ml_collections

from experiments.configs import gcr_fmnist


def get_config(arg: str = "short"):
  if arg not in ("short", "full", "smoke"):
    raise ValueError(f"experiments/configs/main.py takes 'short', 'full' or 'smoke', got {arg!r}")
  c = ml_collections.ConfigDict()
  # Stage 1: ResNet-20 with the Grassmann head (k = 8), bases by Riemannian SGD (lr 0.1).
  c.train = gcr_fmnist.get_config()
  # Stages 2-3: QAT fine-tuning from the float run, uniform W8A8 and the ILP's mixed INT4/8.
  c.qat_epochs = 1.0
  c.qat_learning_rate = 0.005
  c.budget = "bops:medium"  # family:fraction of the way from all-4-bit to all-8-bit
  c.hessian_batches = 4
  c.hessian_batch_size = 128
  c.hessian_tol = 0.05
  c.hessian_max_probes = 96
  # Stage 4: integer-only in JAX and through TVM on this CPU. 0 = the whole test set.
  c.eval_images = 0
  c.latency_batches = (1, 8)
  c.latency_repeats = 20
  c.tvm_target = ""  # "" = the host CPU (grassq.deploy.host_target)
  if arg == "short":
    c.train.num_epochs = 3.0
    c.train.warmup_epochs = 0.2
    c.train.eval_every_epochs = 3.0
    c.qat_epochs = 0.5
    c.hessian_batches = 2
    c.hessian_tol = 0.1
    c.hessian_max_probes = 32
  if arg == "smoke":  # every stage, in seconds each: ResNet-8 (the 6n+2 family at n = 1) on digits
    c.train.dataset = "digits"
    c.train.model_kwargs.stage_sizes = (1, 1, 1)
    c.train.batch_size = 32
    c.train.eval_batch_size = 40
    c.train.num_epochs = 1.0
    c.train.num_train_steps = 30
    c.train.warmup_epochs = 0.0
    c.train.eval_every_epochs = 1.0
    c.train.checkpoint_every_steps = 10
    c.train.progress_bar = False
    c.qat_epochs = 0.1
    c.hessian_batches = 1
    c.hessian_batch_size = 32
    c.hessian_max_probes = 4
    c.eval_images = 120
    c.latency_repeats = 3
  return c
