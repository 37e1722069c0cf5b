"""GCR at paper scale: Swin-T with the Grassmann head (k=8) on ImageNet (TFDS imagenet2012).

Swin's recipe (Liu et al. 2021) with the softmax head replaced: AdamW (lr 1e-3 per 1024 images,
betas 0.9/0.999, weight decay 0.05, none on norms, biases, the relative position bias tables and
the bases), 20 epochs of linear warmup then cosine over 300 epochs, label smoothing 0.1,
stochastic depth 0.2, Mixup (alpha 0.8) or CutMix (alpha 1.0) on every batch, switched with
probability 0.5 (on device, `grassq.data.mixup_cutmix`), gradient clipping at global norm 5.
The clipping is part of the network's optax chain, which `grassq.optim.with_grassmann` never
shows the bases: the bases get Riemannian SGD (lr 0.1, momentum 0.9) on their raw gradients, and
the clipping norm is that of the network's gradients alone. Needs a prepared imagenet2012 copy
and a streaming loader (see README, "Paper-scale runs").

Augmentation that grassq's data layer does not express (besides Mixup/CutMix it only flips
imagenet2012 images): the random-resized crop, RandAugment (rand-m9-mstd0.5-inc1), random erasing
(p 0.25), colour jitter 0.4. Swin also evaluates on a 224 centre crop of the image resized to 256
(the loader's job). Without them a 300-epoch run overfits more; expect lower accuracy than the
paper's.

Optimizer variant (docs/differences.md): the released update as the released config
swin-tiny_8xb128_in1k_gcr8.py runs it (`RAdamWOptimizer`: geodesic step, torch's unsigned QR every
step, the bases' rate AdamW's current one times lr_factor = 0.1 / 0.001, i.e. 0.1 at the peak and
following warmup and cosine). Left as it is: that config warms up from 1e-3 of the rate and decays
to 1e-5; grassq's schedule goes from 0 and to 0.
"""

from grassq.train import default_config


def get_config():
  config = default_config()
  config.dataset = "imagenet2012"
  config.model = "swin_tiny"
  config.model_kwargs.drop_path_rate = 0.2
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 8
  config.head_kwargs.scale = 25.0
  config.batch_size = 1024
  config.eval_batch_size = 1000
  config.num_epochs = 300.0
  config.optimizer = "adamw"
  config.learning_rate = 1e-3
  config.b1, config.b2 = 0.9, 0.999
  config.weight_decay = 0.05
  config.grad_clip_norm = 5.0  # the network only; the bases are never clipped
  config.schedule = "cosine"
  config.warmup_epochs = 20.0
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.8
  config.cutmix_alpha = 1.0
  config.mixup_switch_prob = 0.5
  config.grassmann_learning_rate = 0.1
  config.grassmann_momentum = 0.9
  config.grassmann_update = "released"  # the released RAdamWOptimizer step
  config.grassmann_reorth_every = 1
  config.dtype = "bfloat16"  # bases and their optimizer state stay float32
  config.checkpoint_every_steps = 2000
  return config
