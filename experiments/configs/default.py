"""experiments.train's default: one epoch of ResNet-20 (linear head) on offline Fashion-MNIST.

The main job (`make run`) is experiments/main.py with experiments/configs/main.py.
"""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "grassq_fashion_mnist"
  config.model = "resnet20"
  config.head = "linear"
  config.num_epochs = 1.0
  config.warmup_epochs = 0.1
  return config
