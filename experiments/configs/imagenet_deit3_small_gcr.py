"""GCR at paper scale: DeiT III ViT-S/16 with the Grassmann head (k=8) on ImageNet (imagenet2012).

DeiT III's recipe (Touvron et al. 2022, "DeiT III: Revenge of the ViT") for ViT-S at 224: LAMB
(lr 4e-3 for batch 2048, weight decay 0.05, none on norms, biases, layer scales, the class token,
the position embedding and the bases), 5 epochs of linear warmup then cosine over 800 epochs,
stochastic depth 0.05, layer scale 1e-4, no label smoothing, Mixup (alpha 0.8) or CutMix
(alpha 1.0) on every batch, switched with probability 0.5 (on device, `grassq.data.mixup_cutmix`);
Riemannian SGD (lr 0.3, momentum 0.9) for the bases. Needs a prepared imagenet2012 copy and a
streaming loader (see README, "Paper-scale runs").

What grassq does not express (besides Mixup/CutMix its data layer only flips imagenet2012 images,
and its loss is softmax cross-entropy): the simple random crop, 3-Augment (one of grayscale,
solarization, Gaussian blur per image), colour jitter 0.3, repeated augmentation (3 repeats), and
DeiT III's binary cross-entropy loss (the Grassmann head is trained with softmax cross-entropy
here, as in GCR). Random erasing is off in DeiT III, so nothing is lost there.

Optimizer variant (docs/differences.md): the released update as the released config
deit3-small-p16_8xb256_in1k-224px_gcr8.py runs it (`RLambOptimizer`: geodesic step, torch's
unsigned QR every step, the bases' rate LAMB's current one times lr_factor = 0.3 / 0.004).
"""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "imagenet2012"
  config.model = "deit3_small"
  config.model_kwargs.drop_path_rate = 0.05
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 8
  config.head_kwargs.scale = 25.0
  config.batch_size = 2048
  config.eval_batch_size = 1000
  config.num_epochs = 800.0
  config.optimizer = "lamb"
  config.learning_rate = 4e-3
  config.b1, config.b2 = 0.9, 0.999
  config.weight_decay = 0.05
  config.schedule = "cosine"
  config.warmup_epochs = 5.0
  config.label_smoothing = 0.0
  config.mixup_alpha = 0.8
  config.cutmix_alpha = 1.0
  config.mixup_switch_prob = 0.5
  config.grassmann_learning_rate = 0.3
  config.grassmann_momentum = 0.9
  config.grassmann_update = "released"  # the released RLambOptimizer step
  config.grassmann_reorth_every = 1
  config.dtype = "bfloat16"  # bases and their optimizer state stay float32
  config.checkpoint_every_steps = 2000
  return config
