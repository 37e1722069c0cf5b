"""Model registry: `create_model("resnet50", num_classes=1000, head="cosine")`.

Every model maps normalized NHWC images to float32 logits with a head named in
`grassq.heads.HEADS`, and is called as `model(x, train=False, return_features=False)`
(features: the pooled pre-logit vector the head sees).
"""

import functools

import jax.numpy as jnp

from grassq.models.inception import InceptionV3
from grassq.models.resnet import BasicBlock, BottleneckBlock, ResNet, ResNeXt
from grassq.models.swin import SwinTransformer
from grassq.models.vit import VisionTransformer

_cifar = functools.partial(ResNet, block="basic", num_filters=16, stem="cifar")
_imagenet = functools.partial(ResNet, num_filters=64, stem="imagenet")

# name -> constructor taking the remaining model fields as keywords.
MODELS = {
  # CIFAR-style (He et al. 2016, Sec. 4.2) with projection shortcuts.
    "resnet20": functools.partial(_cifar, stage_sizes=(3, 3, 3)),
    "resnet56": functools.partial(_cifar, stage_sizes=(9, 9, 9)),
  # ImageNet-style.
    "resnet18": functools.partial(_imagenet, stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet50": functools.partial(_imagenet, stage_sizes=(3, 4, 6, 3), block="bottleneck",
                                  stride_on="3x3"),
    "resnet50_v1": functools.partial(_imagenet, stage_sizes=(3, 4, 6, 3), block="bottleneck",
                                     stride_on="1x1"),
    "resnet50d": functools.partial(_imagenet, stage_sizes=(3, 4, 6, 3), block="bottleneck",
                                   stride_on="3x3", stem="deep", shortcut="avgpool"),
    "resnext50": functools.partial(ResNeXt, stage_sizes=(3, 4, 6, 3), groups=32,
                                   width_per_group=4, num_filters=64, stem="imagenet"),
  # Transformers (no BatchNorm); stochastic depth via drop_path_rate.
    "deit3_small": functools.partial(VisionTransformer, patch_size=16, embed_dim=384, depth=12,
                                     num_heads=6, mlp_ratio=4.0, layer_scale_init=1e-4),
    "swin_tiny": functools.partial(SwinTransformer, patch_size=4, embed_dim=96,
                                   depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                                   window_size=7),
  # InceptionV3 (torchvision layout, no aux classifier); "small": 1/8 width, 28x28/32x32 stem.
    "inception_v3": InceptionV3,
    "inception_v3_small": functools.partial(InceptionV3, width=0.125, stem="small"),
}


def create_model(name, num_classes, head="linear", dtype=jnp.float32, **kwargs):
  """Builds the model registered under `name` in `MODELS`.

  Args:
    name: a key of `MODELS`.
    num_classes: number of classes.
    head: a head name from `grassq.heads.HEADS`.
    dtype: compute dtype (parameters stay float32).
    **kwargs: other fields of the model class, e.g. head_kwargs={"scale": 16.0}, or
      overrides of the registered ones (a tiny Swin for tests: embed_dim=16, ...).

  Returns:
    An unbound Flax module (the class registered in `MODELS`).

  Raises:
    ValueError: if `name` is not registered.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
  return MODELS[name](num_classes=num_classes, head=head, dtype=dtype, **kwargs)


__all__ = ["BasicBlock", "BottleneckBlock", "InceptionV3", "MODELS", "ResNeXt", "ResNet",
           "SwinTransformer", "VisionTransformer", "create_model"]
