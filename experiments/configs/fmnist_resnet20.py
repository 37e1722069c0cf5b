"""ResNet-20 with the linear softmax head on Fashion-MNIST: reaches >= 92% test accuracy."""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "grassq_fashion_mnist"
  config.model = "resnet20"
  config.head = "linear"
  config.batch_size = 128
  config.num_epochs = 8.0
  config.learning_rate = 0.1
  config.warmup_epochs = 0.5
  config.schedule = "cosine"
  config.weight_decay = 5e-4
  config.checkpoint_every_steps = 469  # once an epoch
  return config
