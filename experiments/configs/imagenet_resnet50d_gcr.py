"""GCR at paper scale: ResNet50-D with the Grassmann head (k=8) on ImageNet (TFDS imagenet2012).

The paper's SGD recipe for ResNets: SGD + momentum 0.9 for the network, lr 0.1 per 256 images with
a cosine schedule over 100 epochs; Riemannian SGD (lr 0.1, momentum 0.9, QR retraction here) for
the bases, no weight decay on them; scale 25, the same k for every class. Needs a prepared
imagenet2012 copy and a streaming loader (see README, "Paper-scale runs").
"""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "imagenet2012"
  config.model = "resnet50d"
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 8
  config.head_kwargs.scale = 25.0
  config.batch_size = 256
  config.eval_batch_size = 1000
  config.num_epochs = 100.0
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.nesterov = False
  config.weight_decay = 1e-4
  config.schedule = "cosine"
  config.warmup_epochs = 5.0
  config.grassmann_learning_rate = 0.1
  config.grassmann_momentum = 0.9
  config.dtype = "bfloat16"  # bases and their optimizer state stay float32
  config.checkpoint_every_steps = 2000
  return config
