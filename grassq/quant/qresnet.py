"""The grassq ResNets with HAWQV3 quantization-aware layers, and the float -> QAT mapping.

`QResNet` mirrors `grassq.models.ResNet` field for field (same stems, blocks, shortcuts) with:

* the input quantized to signed int8;
* every conv + BatchNorm pair a `QuantConvBN` (folded, per-channel fake-quant weights) named as
  the float conv (``stem_conv``, ``stage1_block0/conv1``, ``stage2_block0/proj_conv``, ...);
* an activation quantizer in front of each conv, at that conv's bit-width (HAWQV3: a layer's
  bit-width applies to its weights and to the activations it reads). A block's ``act_in`` feeds
  both ``conv1`` and the projection shortcut, so those two are tied;
* the residual join a 16-bit `QuantAdd` (branches rounded separately, clamped once, unsigned:
  the ReLU after the add is its clamp at 0); an identity shortcut carries the block input as is;
* global average pooling, an 8-bit activation quantizer, and a `QuantDense` linear head.

Post-ReLU activations are unsigned at every bit-width; ``hawq_signed8=True`` keeps HAWQV3's
signed 8-bit activations instead. `layer_names(model, image_shape)` lists the keys of the
per-layer bit dict; `from_float(float_variables, qat_variables)` turns a float ResNet's
variables into this model's initial QAT variables.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grassq.models.resnet import ResNet
from grassq.quant import qat

PINNED_8BIT = ("stem_conv", "stem_conv1", "head")  # first conv and the classifier stay 8-bit


def _pad(k):
  p = (k - 1) // 2
  return ((p, p), (p, p))


class _Ctx:
  """What every layer of one forward pass needs: bits lookup, training flag, signedness."""

  def __init__(self, model, train):
    self.model, self.train = model, train
    self.hawq_signed8, self.fix_bn = model.hawq_signed8, model.fix_bn

  def b(self, name):
    return self.model.weight_bits_of(name)

  def a(self, name):
    return self.model.act_bits_of(name)

  def act(self, x, bits, name):
    signed = self.hawq_signed8 and bits == 8
    return qat.QuantAct(bits, signed, self.model.range_momentum(), name=name)(x, self.train)

  def convbn(self, x, features, kernel, strides, name):
    return qat.QuantConvBN(features, (kernel, kernel), (strides, strides), _pad(kernel),
                           self.b(name), self.fix_bn, name=name,
                           **self.model.bn_kwargs())(x, self.train)


class QBasicBlock(nn.Module):
  filters: int
  strides: int = 1
  shortcut: str = "conv"
  ctx: Any = None

  @nn.compact
  def __call__(self, x):
    c, prefix = self.ctx, self.name + "/"
    a = c.act(x, c.a(prefix + "conv1"), "act_in")
    y = nn.relu(c.convbn(a, self.filters, 3, self.strides, "conv1"))
    y = c.act(y, c.a(prefix + "conv2"), "act1")
    y = c.convbn(y, self.filters, 3, 1, "conv2")
    r = _qshortcut(c, x, a, self.filters, self.strides, self.shortcut)
    return qat.QuantAdd(momentum=c.model.range_momentum(), name="add")(y, r, c.train)


class QBottleneckBlock(nn.Module):
  filters: int
  strides: int = 1
  stride_on: str = "3x3"
  shortcut: str = "conv"
  ctx: Any = None

  @nn.compact
  def __call__(self, x):
    c, prefix = self.ctx, self.name + "/"
    s1, s3 = (self.strides, 1) if self.stride_on == "1x1" else (1, self.strides)
    out = self.filters * 4
    a = c.act(x, c.a(prefix + "conv1"), "act_in")
    y = nn.relu(c.convbn(a, self.filters, 1, s1, "conv1"))
    y = c.act(y, c.a(prefix + "conv2"), "act1")
    y = nn.relu(c.convbn(y, self.filters, 3, s3, "conv2"))
    y = c.act(y, c.a(prefix + "conv3"), "act2")
    y = c.convbn(y, out, 1, 1, "conv3")
    r = _qshortcut(c, x, a, out, self.strides, self.shortcut)
    return qat.QuantAdd(momentum=c.model.range_momentum(), name="add")(y, r, c.train)


def _qshortcut(c, x, a, out_features, strides, kind):
  """Identity (the block input, as is), or a projection of the quantized input `a`."""
  if x.shape[-1] == out_features and strides == 1:
    return x
  if kind == "avgpool" and strides != 1:
    a = nn.avg_pool(a, (strides, strides), (strides, strides), padding="SAME",
                    count_include_pad=False)
    strides = 1
  elif kind not in ("conv", "avgpool"):
    raise ValueError(f"unknown shortcut {kind!r}; available: avgpool, conv")
  return c.convbn(a, out_features, 1, strides, "proj_conv")


class QResNet(qat.QuantBits, ResNet):
  """Quantization-aware ResNet (see the module docstring): `grassq.models.ResNet`'s
  architecture fields, then the bit-width fields of `qat.QuantBits` (``bits``,
  ``default_bits``, ``act_bits``, ``default_act_bits``, ``hawq_signed8``, ``fix_bn``) and its
  lookups `weight_bits_of` / `act_bits_of`; the first conv and the head are pinned at 8 bits
  unless given (`PINNED_8BIT`).
  """

  pinned_8bit = PINNED_8BIT

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    self.check_head()
    c = _Ctx(self, train)
    x = qat.QuantAct(8, True, self.range_momentum(), name="input_act")(
        x.astype(jnp.float32), train)
    if self.stem in ("cifar", "imagenet"):
      k, s = (3, 1) if self.stem == "cifar" else (7, 2)
      x = nn.relu(c.convbn(x, self.num_filters, k, s, "stem_conv"))
    elif self.stem == "deep":
      widths = (self.num_filters // 2, self.num_filters // 2, self.num_filters)
      for i, (w, s) in enumerate(zip(widths, (2, 1, 1)), start=1):
        if i > 1:
          x = c.act(x, c.a(f"stem_conv{i}"), f"stem_act{i - 1}")
        x = nn.relu(c.convbn(x, w, 3, s, f"stem_conv{i}"))
    else:
      raise ValueError(f"unknown stem {self.stem!r}; available: cifar, deep, imagenet")
    x = c.act(x, 8, "stem_act")  # the stem's 8-bit output (max-pool commutes with it)
    if self.stem != "cifar":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    if self.block == "basic":
      block_cls = QBasicBlock
    elif self.block == "bottleneck":
      if self.stride_on not in ("1x1", "3x3"):
        raise ValueError(f"unknown stride_on {self.stride_on!r}; available: 1x1, 3x3")
      block_cls = functools.partial(QBottleneckBlock, stride_on=self.stride_on)
    else:
      raise ValueError(f"unknown block {self.block!r}; available: basic, bottleneck")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = block_cls(filters=self.num_filters * 2**i, strides=2 if i > 0 and j == 0 else 1,
                      shortcut=self.shortcut, ctx=c, name=f"stage{i + 1}_block{j}")(x)

    features = jnp.mean(x, axis=(1, 2))
    q = c.act(features, c.a("head"), "head_act")
    return qat.quant_head_outputs(self, q, features, train, return_features)


def quantized(model, bits: Mapping[str, int] | None = None, default_bits: int = 8,
              act_bits: Mapping[str, int] | None = None, default_act_bits: int = 0,
              **kwargs) -> QResNet:
  """The QAT twin of a float `grassq.models.ResNet` (same architecture fields).

  Raises:
    TypeError: for other model families (ResNeXt's grouped convolutions, transformers), which
      have no QAT twin here (InceptionV3 has its own: `grassq.quant.qinception`).
  """
  if type(model) is not ResNet:
    raise TypeError(f"qresnet.quantized supports grassq.models.ResNet, not "
                    f"{type(model).__name__}: quantization-aware training is implemented for "
                    "the ResNets and InceptionV3 (grassq.quant.qinception)")
  return QResNet(**qat.architecture_fields(model, ResNet),
                 **qat.quantized_fields(bits, default_bits, act_bits, default_act_bits, **kwargs))


def layer_names(model: QResNet, image_shape: Sequence[int]) -> list[str]:
  """Names of the quantized layers (the keys of the bit dict), in forward order."""
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    keys = [p.key for p in path]
    if keys[-1] in ("kernel", "bases"):
      names.append("/".join(keys[:-1]))
  return sorted(names, key=forward_order)


def forward_order(name: str) -> tuple:
  """Sort key of ResNet layer names in forward order: stem, blocks by stage and index, head."""
  if name.startswith("stem"):
    return (0, name)
  if name == "head":
    return (2, name)
  m = re.match(r"stage(\d+)_block(\d+)/", name)
  return (1, int(m.group(1)), int(m.group(2)), name) if m else (1, 0, 0, name)


# A float model's variables onto a fresh init of its QAT twin (shared with the other QAT nets).
from_float = qat.from_float
