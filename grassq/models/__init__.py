"""Model registry: `create_model("resnet50", num_classes=1000, head="cosine")`."""

import functools

import jax.numpy as jnp

from grassq.models.resnet import BasicBlock, BottleneckBlock, ResNet

_cifar = functools.partial(ResNet, block="basic", num_filters=16, stem="cifar")
_imagenet = functools.partial(ResNet, num_filters=64, stem="imagenet")

# name -> constructor taking the remaining ResNet fields as keywords.
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
}


def create_model(name, num_classes, head="linear", dtype=jnp.float32, **kwargs):
  """Builds the model registered under `name` in `MODELS`.

  Args:
    name: a key of `MODELS`.
    num_classes: number of classes.
    head: a head name from `grassq.heads.HEADS`.
    dtype: compute dtype (parameters stay float32).
    **kwargs: other `ResNet` fields, e.g. head_kwargs={"scale": 16.0}.

  Returns:
    An unbound `ResNet`.

  Raises:
    ValueError: if `name` is not registered.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
  return MODELS[name](num_classes=num_classes, head=head, dtype=dtype, **kwargs)


__all__ = ["BasicBlock", "BottleneckBlock", "MODELS", "ResNet", "create_model"]
