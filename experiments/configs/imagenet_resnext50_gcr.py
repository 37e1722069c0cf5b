"""GCR at paper scale: ResNeXt50 (32x4d) with the Grassmann head (k=8) on ImageNet (imagenet2012).

The GCR paper trains ResNeXt50 with its ResNet recipe (imagenet_resnet50d_gcr.py, only the backbone
changes): SGD + momentum 0.9 for the network, lr 0.1 per 256 images, cosine over 100 epochs, weight
decay 1e-4; Riemannian SGD (lr 0.1, momentum 0.9) for the bases, no weight decay on
them; scale 25. Needs a prepared imagenet2012 copy and a streaming loader (see README,
"Paper-scale runs").

Augmentation: the recipe uses random-resized crops and horizontal flips. grassq's data layer
applies the flips only (imagenet2012 has crop_padding=0: no crops at all), so a run with this
config trains on centre-sized images without scale augmentation.

Optimizer variant (docs/differences.md): the released update (`grassmann_update="released"`:
geodesic step, torch's unsigned QR every 5 steps, lr_factor 1), as the released RSGD recipe.
"""

from experiments.configs import imagenet_resnet50d_gcr


def get_config():
  config = imagenet_resnet50d_gcr.get_config()
  config.model = "resnext50"
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.schedule = "cosine"
  config.num_epochs = 100.0
  config.grassmann_learning_rate = 0.1
  config.grassmann_update = "released"  # the released RSGD step
  config.grassmann_reorth_every = 5
  return config
