"""Flax linen InceptionV3 (torchvision layout, no auxiliary classifier) with a pluggable head.

The network is described as data, so that the float model, its QAT twin
(`grassq.quant.qinception`) and the integer program read one description:

* a *unit* (`Conv`) is conv (no bias) + BatchNorm (epsilon 1e-3) + ReLU, a module named as in
  torchvision (``Mixed_5b/branch5x5_2``) holding ``conv`` and ``bn``, so torchvision weights port
  name for name;
* a *branch* is a tuple of steps: units, pools (`Pool`), and at most one final `Split` into
  parallel sub-branches whose outputs are concatenated (InceptionE's 1x3 / 3x1 pairs);
* a *block* is a tuple of branches applied to the same input and concatenated along channels;
* the stem is one branch.

`inception_a` ... `inception_e` build the five block types (InceptionA: 5b-5d, B: 6a, C: 6b-6e,
D: 7a, E: 7b-7c); `network(model)` returns the stem and the named blocks of a model. Average
pools count the padding (torchvision's ``F.avg_pool2d(x, 3, 1, 1)``).

Fields scale it down: ``width`` multiplies every channel count; ``pool_features`` (one per
InceptionA block), ``c7`` (one per InceptionC block) and ``e_blocks`` set the depth; the
"small" stem (3x3 convs at stride 1 with padding, one 3x3/2 max-pool) suits 28x28 / 32x32
inputs. At 299x299 with the "imagenet" stem the spatial sizes are torchvision's
(35 -> 17 -> 8).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from grassq.models.common import head_outputs

Dtype = Any

BN_EPSILON = 1e-3  # torchvision's BasicConv2d
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(NamedTuple):
  """A conv + BN + ReLU unit; padding is explicit ((top, bottom), (left, right))."""
  name: str
  features: int
  kernel: tuple = (1, 1)
  strides: tuple = (1, 1)
  padding: tuple = ((0, 0), (0, 0))


class Pool(NamedTuple):
  """A "max" or "avg" pool; average pools divide by the full window (padding counts)."""
  name: str
  kind: str
  window: tuple = (3, 3)
  strides: tuple = (1, 1)
  padding: tuple = ((0, 0), (0, 0))


class Split(NamedTuple):
  """Parallel sub-branches of one input, concatenated (the last step of a branch)."""
  name: str
  branches: tuple


def _conv(name, features, kernel=1, strides=1, padding=0):
  kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return Conv(name, int(features), (kh, kw), (strides, strides), ((ph, ph), (pw, pw)))


AVG_POOL = Pool("avg_pool", "avg", (3, 3), (1, 1), ((1, 1), (1, 1)))
MAX_POOL = Pool("max_pool", "max", (3, 3), (2, 2), ((0, 0), (0, 0)))


def inception_a(ch, pool_features):
  return ((_conv("branch1x1", ch(64)),),
          (_conv("branch5x5_1", ch(48)), _conv("branch5x5_2", ch(64), 5, padding=2)),
          (_conv("branch3x3dbl_1", ch(64)), _conv("branch3x3dbl_2", ch(96), 3, padding=1),
           _conv("branch3x3dbl_3", ch(96), 3, padding=1)),
          (AVG_POOL, _conv("branch_pool", ch(pool_features))))


def inception_b(ch):
  return ((_conv("branch3x3", ch(384), 3, strides=2),),
          (_conv("branch3x3dbl_1", ch(64)), _conv("branch3x3dbl_2", ch(96), 3, padding=1),
           _conv("branch3x3dbl_3", ch(96), 3, strides=2)),
          (MAX_POOL,))


def inception_c(ch, c7):
  c7 = ch(c7)
  return ((_conv("branch1x1", ch(192)),),
          (_conv("branch7x7_1", c7), _conv("branch7x7_2", c7, (1, 7), padding=(0, 3)),
           _conv("branch7x7_3", ch(192), (7, 1), padding=(3, 0))),
          (_conv("branch7x7dbl_1", c7), _conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0)),
           _conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3)),
           _conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0)),
           _conv("branch7x7dbl_5", ch(192), (1, 7), padding=(0, 3))),
          (AVG_POOL, _conv("branch_pool", ch(192))))


def inception_d(ch):
  return ((_conv("branch3x3_1", ch(192)), _conv("branch3x3_2", ch(320), 3, strides=2)),
          (_conv("branch7x7x3_1", ch(192)), _conv("branch7x7x3_2", ch(192), (1, 7), padding=(0, 3)),
           _conv("branch7x7x3_3", ch(192), (7, 1), padding=(3, 0)),
           _conv("branch7x7x3_4", ch(192), 3, strides=2)),
          (MAX_POOL,))


def _split(name, ch, a, b):
  return Split(name, ((_conv(a, ch(384), (1, 3), padding=(0, 1)),),
                      (_conv(b, ch(384), (3, 1), padding=(1, 0)),)))


def inception_e(ch):
  return ((_conv("branch1x1", ch(320)),),
          (_conv("branch3x3_1", ch(384)),
           _split("branch3x3_2", ch, "branch3x3_2a", "branch3x3_2b")),
          (_conv("branch3x3dbl_1", ch(448)), _conv("branch3x3dbl_2", ch(384), 3, padding=1),
           _split("branch3x3dbl_3", ch, "branch3x3dbl_3a", "branch3x3dbl_3b")),
          (AVG_POOL, _conv("branch_pool", ch(192))))


def stem(ch, kind):
  """The stem as one branch: "imagenet" (torchvision, 299 -> 35) or "small" (28 -> 14)."""
  if kind == "imagenet":
    pool = lambda name: Pool(name, "max", (3, 3), (2, 2), ((0, 0), (0, 0)))
    return (_conv("Conv2d_1a_3x3", ch(32), 3, strides=2), _conv("Conv2d_2a_3x3", ch(32), 3),
            _conv("Conv2d_2b_3x3", ch(64), 3, padding=1), pool("maxpool1"),
            _conv("Conv2d_3b_1x1", ch(80)), _conv("Conv2d_4a_3x3", ch(192), 3), pool("maxpool2"))
  if kind == "small":
    return (_conv("Conv2d_1a_3x3", ch(32), 3, padding=1),
            _conv("Conv2d_2a_3x3", ch(32), 3, padding=1),
            _conv("Conv2d_2b_3x3", ch(64), 3, padding=1),
            Pool("maxpool1", "max", (3, 3), (2, 2), ((1, 1), (1, 1))),
            _conv("Conv2d_3b_1x1", ch(80)), _conv("Conv2d_4a_3x3", ch(192), 3, padding=1))
  raise ValueError(f"unknown stem {kind!r}; available: imagenet, small")


def network(model):
  """(stem branch, ((block name, branches), ...)) of an InceptionV3-like `model`'s fields."""
  ch = lambda c: max(1, int(round(c * model.width)))
  letter = lambda i: chr(ord("b") + i)  # torchvision: Mixed_5b, 5c, 5d; 6a; 6b-6e; 7a; 7b, 7c
  blocks = [(f"Mixed_5{letter(i)}", inception_a(ch, p))
            for i, p in enumerate(model.pool_features)]
  blocks.append(("Mixed_6a", inception_b(ch)))
  blocks += [(f"Mixed_6{letter(i)}", inception_c(ch, c)) for i, c in enumerate(model.c7)]
  blocks.append(("Mixed_7a", inception_d(ch)))
  blocks += [(f"Mixed_7{letter(i)}", inception_e(ch)) for i in range(model.e_blocks)]
  return stem(ch, model.stem), tuple(blocks)


def readers(branch):
  """Names of the units that read a branch's input: its first unit (through pools), or the
  first units of a leading split; empty for a pool-only branch."""
  for step in branch:
    if isinstance(step, Conv):
      return [step.name]
    if isinstance(step, Split):
      return [n for b in step.branches for n in readers(b)]
  return []


def pool(x, step):
  if step.kind == "max":
    return nn.max_pool(x, step.window, step.strides, step.padding)
  if step.kind == "avg":
    return nn.avg_pool(x, step.window, step.strides, step.padding, count_include_pad=True)
  raise ValueError(f"unknown pool kind {step.kind!r}")


class ConvUnit(nn.Module):
  """conv (no bias) + BatchNorm + ReLU (torchvision's BasicConv2d)."""
  unit: Conv
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    u = self.unit
    x = nn.Conv(u.features, u.kernel, strides=u.strides, padding=u.padding, use_bias=False,
                kernel_init=conv_init, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=BN_EPSILON,
                     dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _branch(x, steps, train, dtype):
  for step in steps:
    if isinstance(step, Conv):
      x = ConvUnit(step, dtype, name=step.name)(x, train)
    elif isinstance(step, Pool):
      x = pool(x, step)
    else:
      x = jnp.concatenate([_branch(x, b, train, dtype) for b in step.branches], -1)
  return x


class InceptionBlock(nn.Module):
  """Branches of one input, concatenated along channels."""
  branches: tuple
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    return jnp.concatenate([_branch(x, b, train, self.dtype) for b in self.branches], -1)


class InceptionV3(nn.Module):
  """InceptionV3 backbone + named head (see the module docstring).

  Attributes:
    num_classes: number of classes of the head.
    width: channel multiplier (counts round to the nearest integer, at least 1).
    stem: "imagenet" (299x299 inputs) or "small" (28x28 / 32x32 inputs).
    pool_features: pool-branch channels of each InceptionA block (torchvision: 32, 64, 64).
    c7: 7x7-branch channels of each InceptionC block (torchvision: 128, 160, 160, 192).
    e_blocks: number of InceptionE blocks.
    head, head_kwargs: a name in `grassq.heads.HEADS` and its extra fields.
    dtype: compute dtype; parameters and batch statistics stay float32.
  """
  num_classes: int
  width: float = 1.0
  stem: str = "imagenet"
  pool_features: Sequence[int] = (32, 64, 64)
  c7: Sequence[int] = (128, 160, 160, 192)
  e_blocks: int = 2
  head: str = "linear"
  head_kwargs: Mapping[str, Any] = FrozenDict()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    """Maps images (B, H, W, C) to logits (B, num_classes) float32 (as `ResNet`)."""
    stem_steps, blocks = network(self)
    x = _branch(x.astype(self.dtype), stem_steps, train, self.dtype)
    for name, branches in blocks:
      x = InceptionBlock(branches, self.dtype, name=name)(x, train)
    return head_outputs(self, jnp.mean(x.astype(jnp.float32), axis=(1, 2)), return_features)
