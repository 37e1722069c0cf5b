"""The small InceptionV3-shaped network (1/8 width, "small" stem) on Fashion-MNIST, 2 epochs.

The float run that experiments/inception_fmnist.py quantizes (HAWQV3 W8A8, integer-only).
"""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "grassq_fashion_mnist"
  config.model = "inception_v3_small"
  config.head = "linear"
  config.batch_size = 128
  config.num_epochs = 2.0
  config.learning_rate = 0.1
  config.warmup_epochs = 0.2
  config.schedule = "cosine"
  config.weight_decay = 5e-4
  config.checkpoint_every_steps = 469  # once an epoch
  return config
