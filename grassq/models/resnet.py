"""Flax linen ResNets (CIFAR- and ImageNet-style) with a pluggable head.

One `ResNet` class covers the variants by its fields:

- stem: "cifar" (3x3/1 conv, no pooling), "imagenet" (7x7/2 conv + 3x3/2
 max-pool), "deep" (ResNet-D: 3x3/2(32) - 3x3(32) - 3x3(64) convs + max-pool);
- stride_on: where a downsampling bottleneck strides; "1x1" is the original
 ResNet v1 (HAWQV3's model), "3x3" is v1.5 (torchvision, Flax examples);
- shortcut: "conv" (strided 1x1 conv + BN projection) or "avgpool" (ResNet-D:
 2x2/2 average pool, then 1x1 conv + BN);
- head: a name from `grassq.heads.HEADS`, built as submodule `head`.

`ResNeXt` (Xie et al. 2017) is the same network with grouped 3x3 convolutions
in its bottlenecks (cardinality `groups`, `width_per_group` channels each).

Convolutions have no bias and use explicit PyTorch-style padding, so weights
ported from torchvision/timm give the same outputs. Parameters are float32;
`dtype` sets the compute dtype; logits are always float32.
"""

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from grassq.models.common import head_outputs

Dtype = Any

# He-normal with fan_out, as torchvision initializes ResNet convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel, strides, dtype, name, groups=1):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 feature_group_count=groups, kernel_init=conv_init, dtype=dtype,
                 name=name)


def _bn(train, dtype, name, zero_scale=False):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      dtype=dtype, name=name)


def _shortcut(x, out_features, strides, kind, train, dtype):
  """Identity, or a projection when the shape changes."""
  if x.shape[-1] == out_features and strides == 1:
    return x
  if kind == "conv":
    x = _conv(out_features, 1, strides, dtype, "proj_conv")(x)
  elif kind == "avgpool":
    if strides != 1:
      # Like PyTorch's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False).
      x = nn.avg_pool(x, (strides, strides), (strides, strides), padding="SAME",
                      count_include_pad=False)
    x = _conv(out_features, 1, 1, dtype, "proj_conv")(x)
  else:
    raise ValueError(f"unknown shortcut {kind!r}; available: avgpool, conv")
  return _bn(train, dtype, "proj_bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs (expansion 1)."""
  filters: int
  strides: int = 1
  shortcut: str = "conv"
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train=False):
    y = _conv(self.filters, 3, self.strides, self.dtype, "conv1")(x)
    y = nn.relu(_bn(train, self.dtype, "bn1")(y))
    y = _conv(self.filters, 3, 1, self.dtype, "conv2")(y)
    y = _bn(train, self.dtype, "bn2", self.zero_init_residual)(y)
    r = _shortcut(x, self.filters, self.strides, self.shortcut, train, self.dtype)
    return nn.relu(y + r)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (expansion 4); strides on the 1x1 or the 3x3.

  The inner width is int(filters * width_per_group / 64) * groups, with the
  3x3 conv split into `groups` groups (torchvision's rule): the defaults give
  a ResNet bottleneck (width = filters), groups=32, width_per_group=4 the
  ResNeXt 32x4d one.
  """
  filters: int
  strides: int = 1
  stride_on: str = "3x3"
  shortcut: str = "conv"
  zero_init_residual: bool = True
  dtype: Dtype = jnp.float32
  groups: int = 1
  width_per_group: int = 64
  expansion = 4

  @nn.compact
  def __call__(self, x, train=False):
    if self.stride_on not in ("1x1", "3x3"):
      raise ValueError(f"unknown stride_on {self.stride_on!r}; available: 1x1, 3x3")
    s1, s3 = (self.strides, 1) if self.stride_on == "1x1" else (1, self.strides)
    out = self.filters * self.expansion
    width = int(self.filters * self.width_per_group / 64) * self.groups
    if width <= 0:
      raise ValueError(f"bottleneck width {width} from filters={self.filters}, groups="
                       f"{self.groups}, width_per_group={self.width_per_group}")
    y = _conv(width, 1, s1, self.dtype, "conv1")(x)
    y = nn.relu(_bn(train, self.dtype, "bn1")(y))
    y = _conv(width, 3, s3, self.dtype, "conv2", groups=self.groups)(y)
    y = nn.relu(_bn(train, self.dtype, "bn2")(y))
    y = _conv(out, 1, 1, self.dtype, "conv3")(y)
    y = _bn(train, self.dtype, "bn3", self.zero_init_residual)(y)
    r = _shortcut(x, out, self.strides, self.shortcut, train, self.dtype)
    return nn.relu(y + r)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
  """ResNet backbone + named head.

  Attributes:
    stage_sizes: blocks per stage; stage i has num_filters * 2**i filters and
      strides 2 except the first stage.
    num_classes: number of classes of the head.
    block: "basic" or "bottleneck".
    num_filters: filters of the first stage (16 CIFAR, 64 ImageNet).
    stem: "cifar", "imagenet" or "deep".
    stride_on: "1x1" (v1) or "3x3" (v1.5); bottleneck blocks only.
    shortcut: "conv" or "avgpool" projection when the shape changes.
    head: a name in `grassq.heads.HEADS`.
    head_kwargs: extra fields of the head (e.g. scale, subspace_dim). The head
      is not given `dtype`; pass it here to compute the head in low precision.
    dtype: compute dtype; parameters and batch statistics stay float32.
    zero_init_residual: initialize the last BN scale of each block to zero.
  """
  stage_sizes: Sequence[int]
  num_classes: int
  block: str = "bottleneck"
  num_filters: int = 64
  stem: str = "imagenet"
  stride_on: str = "3x3"
  shortcut: str = "conv"
  head: str = "linear"
  head_kwargs: Mapping[str, Any] = FrozenDict()
  dtype: Dtype = jnp.float32
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    """Maps images (B, H, W, C) to logits (B, num_classes) float32.

    Args:
      x: normalized images, NHWC.
      train: use batch statistics (and update `batch_stats`, which must be
        mutable) instead of the running averages.
      return_features: also return the pooled pre-logit features (B, n),
        float32.

    Returns:
      logits, or (logits, features) when `return_features`.
    """
    if self.block not in BLOCKS:
      raise ValueError(f"unknown block {self.block!r}; available: {', '.join(BLOCKS)}")
    x = x.astype(self.dtype)
    if self.stem == "cifar":
      x = _conv(self.num_filters, 3, 1, self.dtype, "stem_conv")(x)
      x = nn.relu(_bn(train, self.dtype, "stem_bn")(x))
    elif self.stem == "imagenet":
      x = _conv(self.num_filters, 7, 2, self.dtype, "stem_conv")(x)
      x = nn.relu(_bn(train, self.dtype, "stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "deep":
      widths = (self.num_filters // 2, self.num_filters // 2, self.num_filters)
      for i, (w, s) in enumerate(zip(widths, (2, 1, 1)), start=1):
        x = _conv(w, 3, s, self.dtype, f"stem_conv{i}")(x)
        x = nn.relu(_bn(train, self.dtype, f"stem_bn{i}")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"unknown stem {self.stem!r}; available: cifar, deep, imagenet")

    block_cls = functools.partial(BLOCKS[self.block], **self.block_fields())
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block_cls(
            filters=self.num_filters * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            shortcut=self.shortcut,
            zero_init_residual=self.zero_init_residual,
            dtype=self.dtype,
            name=f"stage{i + 1}_block{j}",
        )(x, train=train)

    return head_outputs(self, jnp.mean(x.astype(jnp.float32), axis=(1, 2)), return_features)

  def block_fields(self) -> dict:
    """Fields passed to every block besides its position-dependent ones."""
    return {"stride_on": self.stride_on} if self.block == "bottleneck" else {}


class ResNeXt(ResNet):
  """ResNeXt (Xie et al. 2017): a bottleneck ResNet with grouped 3x3 convs.

  A subclass rather than more `ResNet` fields, so the QAT twin and the cost
  model, which copy `ResNet`'s fields, keep working on plain ResNets.

  Attributes:
    groups: cardinality C of every 3x3 conv (32 for 32x4d).
    width_per_group: channels per group in the first stage (4 for 32x4d); it
      doubles with each stage like the filters.
  """
  groups: int = 32
  width_per_group: int = 4

  def block_fields(self) -> dict:
    if self.block != "bottleneck":
      raise ValueError(f"ResNeXt needs block='bottleneck', not {self.block!r}")
    return {"stride_on": self.stride_on, "groups": self.groups,
            "width_per_group": self.width_per_group}
