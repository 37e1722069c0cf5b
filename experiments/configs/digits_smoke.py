"""A seconds-long smoke run on scikit-learn digits (always present): tests and quick checks."""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "digits"
  config.model = "resnet20"
  config.model_kwargs.stage_sizes = (1, 1, 1)  # the 6n+2 family at n = 1 (ResNet-8)
  config.batch_size = 32
  config.eval_batch_size = 40
  config.num_train_steps = 40
  config.learning_rate = 0.2
  config.log_every_steps = 8
  config.checkpoint_every_steps = 8
  config.progress_bar = False
  return config
