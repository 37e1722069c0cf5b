"""GCR benchmark base: ResNet-20 on Fashion-MNIST, the schedule of fmnist_resnet20.py.

The benchmark (experiments/gcr_benchmark.py) varies the head, k, label smoothing and the seed on
top of this; every run uses the same schedule.
"""

from experiments.configs import fmnist_resnet20


def get_config():
  config = fmnist_resnet20.get_config()
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 8
  config.grassmann_learning_rate = 0.1  # the paper's value for SGD-trained ResNets
  config.grassmann_momentum = 0.9
  return config
