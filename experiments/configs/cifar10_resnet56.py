"""ResNet-56 on CIFAR-10 (needs a prepared TFDS copy of cifar10 in array_record; see README)."""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "cifar10"
  config.model = "resnet56"
  config.batch_size = 128
  config.num_epochs = 182.0
  config.learning_rate = 0.1
  config.weight_decay = 1e-4
  config.schedule = "step"
  config.step_epochs = (91.0, 136.0)
  config.checkpoint_every_steps = 1000
  return config
