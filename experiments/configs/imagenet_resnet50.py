"""ResNet-50 v1.5 on ImageNet (TFDS imagenet2012): the standard 90-epoch SGD recipe.

Paper scale: needs a prepared imagenet2012 copy and a streaming loader (see README, "Data").
"""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 90.0
  config.learning_rate = 0.4  # 0.1 x batch/256
  config.warmup_epochs = 5.0
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  config.dtype = "bfloat16"
  config.checkpoint_every_steps = 2000
  return config
