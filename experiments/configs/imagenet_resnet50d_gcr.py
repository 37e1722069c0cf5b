"""GCR at paper scale: ResNet50-D with the Grassmann head (k=8) on ImageNet (TFDS imagenet2012).

The paper's SGD recipe for ResNets: SGD + momentum 0.9 for the network, lr 0.1 per 256 images with
a cosine schedule over 100 epochs; Riemannian SGD (lr 0.1, momentum 0.9) for
the bases, no weight decay on them; scale 25, the same k for every class. Needs a prepared
imagenet2012 copy and a streaming loader (see README, "Paper-scale runs").

Optimizer variant (docs/differences.md): the released update (`grassmann_update="released"`:
geodesic step, torch's unsigned QR every 5 steps), as the released config
resnet50d_8xb32_coslr_in1k_gcr8.py runs it with `RSGD(lr=0.1, momentum=0.9, weight_decay=1e-4)`:
the bases follow the network's cosine schedule at the same rate (lr_factor 1). Like that config,
no warmup. Left as it is: mmengine there decays every parameter but the bases, BatchNorm and
biases included; grassq masks weight decay off BatchNorm parameters and biases.
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
  config.warmup_epochs = 0.0  # the released config has none
  config.grassmann_learning_rate = 0.1
  config.grassmann_momentum = 0.9
  config.grassmann_update = "released"  # the released RSGD step
  config.grassmann_reorth_every = 5
  config.dtype = "bfloat16"  # bases and their optimizer state stay float32
  config.checkpoint_every_steps = 2000
  return config
