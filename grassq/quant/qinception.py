"""InceptionV3 with HAWQV3 quantization-aware layers, and the float -> QAT mapping.

`QInception` reads the same description as `grassq.models.inception.InceptionV3`
(`inception.network`) with:

* the input quantized to signed int8 (``input_act``);
* every conv + BatchNorm unit a `qat.QuantConvBN` named as the float conv
  (``Conv2d_1a_3x3/conv``, ``Mixed_5b/branch5x5_2/conv``): these are the layers of the bit dict;
* one activation quantizer per tensor that convs read, at the bit-width of the layer that reads
  it (HAWQV3): ``X_act`` in front of unit (or split) ``X``; a block's input is quantized once,
  ``BLOCK/act_in``, and every branch reads it, so the first convs of all branches (the pool
  branch's 1x1 conv too) are tied to one bit-width (`tie_groups`); so are the two convs after
  each InceptionE split;
* pools: a max-pool reads whatever precedes it (it commutes with the monotone quantizer); an
  average pool reads quantized values and computes the integer program's rule,
  floor(window sum / window size) of the integers, with a straight-through gradient
  (`int_avg_pool`), so fake-quant and integer agree;
* a block's branches concatenated in float; the next quantizer (the next block's ``act_in``, or
  ``final_act`` after the last block, 8-bit) rounds the concatenation, which the integer
  program does branch by branch (`grassq.quant.program`, ``concat``);
* global average pooling (the integer rule, floor of the mean, as `int_global_avg_pool`),
  ``head_act`` and a `qat.QuantDense` (or `qat.QuantGrassmannHead`).

Post-ReLU activations are unsigned; HAWQV3's signed 8-bit variant is not supported here. The
first conv and the classifier are pinned at 8 bits (`PINNED_8BIT`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grassq.models import inception
from grassq.models.inception import Conv, InceptionV3, Pool, Split
from grassq.quant import qat, quantizers

PINNED_8BIT = ("Conv2d_1a_3x3/conv", "head")  # first conv and the classifier stay 8-bit
FINAL_ACT_BITS = 8  # the last block's output, before global pooling


@jax.custom_jvp
def floor_ste(x):
  """jnp.floor with a straight-through gradient (d/dx = 1)."""
  return jnp.floor(x)


@floor_ste.defjvp
def _floor_ste_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return floor_ste(x), t


def int_avg_pool(a, scale, step: Pool, calibrated=True):
  """The integer average pool on fake-quant values `a` = q·scale: floor(Σ q / |window|)·scale.

  The window sum of integers is exact in float32 and the division by the window size rounds
  correctly, so the floor is the integer program's (`intops.avg_pool_int`, padding counted).
  Where `calibrated` is False (a quantizer that has not seen data) it is the float average.
  """
  # One pool for both cases: selecting between two pools would leave XLA a pool of a constant
  # zero cotangent to fold at compile time (seconds per pool).
  z = jnp.where(calibrated, quantizers.round_ste(a / scale), a)
  mean = nn.avg_pool(z, step.window, step.strides, step.padding, count_include_pad=True)
  return jnp.where(calibrated, floor_ste(mean) * scale, mean)


def int_global_avg_pool(a, scale, calibrated=True):
  """Global average pool as the integer program's: floor(Σ_hw q / (H·W))·scale, q = a/scale.

  With 8-bit inputs the floor matters (half an LSB low on average), so fake-quant computes it
  too (exact in float32 as in `int_avg_pool`); the float mean while not `calibrated`.
  """
  z = jnp.where(calibrated, quantizers.round_ste(a / scale), a)
  mean = jnp.mean(z, axis=(1, 2))
  return jnp.where(calibrated, floor_ste(mean) * scale, mean)


def block_groups(prefix: str, branches) -> list[tuple[str, list[str]]]:
  """[(quantizer, [layers reading it])] of a block: ``act_in`` first, then each split's."""
  groups = [(f"{prefix}act_in", [f"{prefix}{n}/conv" for br in branches
                                 for n in inception.readers(br)])]

  def splits(steps):
    for step in steps:
      if isinstance(step, Split):
        readers = [n for br in step.branches for n in inception.readers(br)]
        groups.append((f"{prefix}{step.name}_act", [f"{prefix}{n}/conv" for n in readers]))
        for br in step.branches:
          splits(br)

  for br in branches:
    splits(br)
  return groups


class _Ctx:
  """What every layer of one forward pass needs: the model's bit lookups and the train flag."""

  def __init__(self, model, train):
    self.model, self.train = model, train

  def act(self, x, bits, name, signed=False):
    """Quantizes x; returns (fake-quant x, its scale, whether it was calibrated)."""
    quant = qat.QuantAct(bits, signed, self.model.range_momentum(), name=name)
    y = quant(x, self.train)
    r = quant.variables["batch_stats"]["range"]
    return y, quantizers.activation_scale(r["lo"], r["hi"], bits, signed), r["initialized"]


class _QUnit(nn.Module):
  """A unit's `qat.QuantConvBN` (scope named as the float unit) and the ReLU."""

  unit: Conv
  layer: str
  ctx: Any = None

  @nn.compact
  def __call__(self, x):
    u, c = self.unit, self.ctx
    y = qat.QuantConvBN(u.features, u.kernel, u.strides, u.padding,
                        c.model.weight_bits_of(self.layer), c.model.fix_bn,
                        epsilon=inception.BN_EPSILON, name="conv",
                        **c.model.bn_kwargs())(x, c.train)
    return nn.relu(y)


def _qbranch(c, x, steps, prefix, quant):
  """Fake-quant forward of one branch; `quant` = (scale, seen) while x is on a quantizer grid."""
  for step in steps:
    if isinstance(step, Conv):
      layer = f"{prefix}{step.name}/conv"
      if quant is None:
        x, s, seen = c.act(x, c.model.act_bits_of(layer), f"{step.name}_act")
      x, quant = _QUnit(step, layer, c, name=step.name)(x), None
    elif isinstance(step, Pool) and step.kind == "max":
      x = inception.pool(x, step)
    elif isinstance(step, Pool) and step.kind == "avg":
      if quant is None:
        raise ValueError(f"{prefix}{step.name}: an average pool must read a quantized tensor")
      s, seen = quant
      x = int_avg_pool(x, s, step, seen)
    elif isinstance(step, Split):
      if quant is None:
        first = f"{prefix}{inception.readers((step,))[0]}/conv"
        x, s, seen = c.act(x, c.model.act_bits_of(first), f"{step.name}_act")
        quant = (s, seen)
      return jnp.concatenate([_qbranch(c, x, br, prefix, quant) for br in step.branches], -1)
    else:
      raise ValueError(f"unknown step {step!r}")
  return x


class _QBlock(nn.Module):
  """Quantized block input (``act_in``, shared by all branches), branches, float concat."""

  branches: tuple
  ctx: Any = None

  @nn.compact
  def __call__(self, x):
    c, prefix = self.ctx, self.name + "/"
    leader = block_groups(prefix, self.branches)[0][1][0]
    a, s, seen = c.act(x, c.model.act_bits_of(leader), "act_in")
    return jnp.concatenate([_qbranch(c, a, br, prefix, (s, seen)) for br in self.branches], -1)


class QInception(qat.QuantBits, InceptionV3):
  """Quantization-aware InceptionV3 (see the module docstring): `InceptionV3`'s architecture
  fields, then the bit-width fields of `qat.QuantBits` and its lookups `weight_bits_of` /
  `act_bits_of`. A shared quantizer takes the bits of the first layer reading it; the first
  conv and the head are pinned at 8 bits unless given (`PINNED_8BIT`); ``hawq_signed8`` must
  be False (unsigned post-ReLU activations only).
  """

  pinned_8bit = PINNED_8BIT

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    self.check_head()
    if self.hawq_signed8:
      raise NotImplementedError("QInception quantizes post-ReLU activations unsigned only")
    c = _Ctx(self, train)
    stem, blocks = inception.network(self)
    x, s, seen = c.act(x.astype(jnp.float32), 8, "input_act", signed=True)
    x = _qbranch(c, x, stem, "", (s, seen))
    for name, branches in blocks:
      x = _QBlock(branches, c, name=name)(x)
    x, s, seen = c.act(x, FINAL_ACT_BITS, "final_act")
    features = int_global_avg_pool(x, s, seen)
    q, _, _ = c.act(features, self.act_bits_of("head"), "head_act")
    return qat.quant_head_outputs(self, q, features, train, return_features)


def quantized(model: InceptionV3, bits: Mapping[str, int] | None = None, default_bits: int = 8,
              act_bits: Mapping[str, int] | None = None, default_act_bits: int = 0,
              **kwargs) -> QInception:
  """The QAT twin of a float `InceptionV3` (same architecture fields)."""
  if not isinstance(model, InceptionV3):
    raise TypeError(f"quantized needs a grassq InceptionV3, got {type(model).__name__}")
  return QInception(**qat.architecture_fields(model, InceptionV3),
                    **qat.quantized_fields(bits, default_bits, act_bits, default_act_bits,
                                           **kwargs))


float_twin = qat.float_twin  # QInception -> InceptionV3 (any other model as it is)


def layer_names(model: InceptionV3, image_shape: Sequence[int] | None = None) -> list[str]:
  """Names of the quantized layers (the keys of the bit dict), in forward order.

  `image_shape` is accepted for symmetry with `qresnet.layer_names`; the names do not depend
  on it.
  """
  del image_shape
  stem, blocks = inception.network(model)
  names = []

  def walk(steps, prefix):
    for step in steps:
      if isinstance(step, Conv):
        names.append(f"{prefix}{step.name}/conv")
      elif isinstance(step, Split):
        for br in step.branches:
          walk(br, prefix)

  walk(stem, "")
  for name, branches in blocks:
    for br in branches:
      walk(br, name + "/")
  return names + ["head"]


def tie_groups(model: InceptionV3) -> list[tuple[str, ...]]:
  """Layers that must share a bit-width: those reading one quantizer (a block's ``act_in``:
  the first conv of every branch; an InceptionE split: its 1x3 and 3x1 convs)."""
  _, blocks = inception.network(model)
  return [tuple(layers) for name, branches in blocks
          for _, layers in block_groups(name + "/", branches) if len(layers) > 1]


def tied_layers(model: InceptionV3, image_shape: Sequence[int] | None = None
                ) -> list[tuple[str, str]]:
  """`tie_groups` as the pairs `grassq.mixed.allocate_bits` takes: (first, other) per member."""
  del image_shape
  return sorted((g[0], other) for g in tie_groups(model) for other in g[1:])


# A float model's variables onto a fresh init of its QAT twin (shared with the other QAT nets).
from_float = qat.from_float
