"""GCR on CIFAR-100 with ResNet-56: the small benchmark to run first with internet access.

Needs a prepared cifar100 copy (array_record) in the TFDS data dir, see README "Data". The full
comparison with the softmax baselines on top of this schedule:
python -m experiments.gcr_benchmark --config experiments/configs/cifar100_resnet56_gcr.py
--out results/gcr_cifar100
"""

from experiments.configs import cifar10_resnet56


def get_config():
  config = cifar10_resnet56.get_config()
  config.dataset = "cifar100"
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 8
  config.num_epochs = 200.0
  config.schedule = "cosine"
  config.learning_rate = 0.1
  config.weight_decay = 5e-4
  config.grassmann_learning_rate = 0.1
  return config
