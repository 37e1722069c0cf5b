"""Quantization-aware training layers (HAWQV3), as Flax linen modules.

Training is fake-quant in float with straight-through gradients; the integer program built from
these modules' variables runs integer-only. The pieces:

* `fold_bn`: BatchNorm folded into the preceding convolution, W·γ/σ and β − μ·γ/σ. One function
  serves the QAT forward pass and the conversion to integers.
* `QuantConvBN`: convolution + BatchNorm whose *folded* weight is fake-quantized per output
  channel. In training it folds with the batch statistics (a float convolution with the
  unquantized weight computes them, as HAWQV3 does) and updates the running ones; with
  ``fix_bn=True`` and at evaluation it folds with the running statistics.
* `QuantDense`: dense layer with per-channel fake-quant weights (the classifier).
* `QuantAct`: activation quantizer with a range tracked on the first batch, then by EMA
  (momentum 0.99), frozen at evaluation. Non-negative activations (after ReLU) are unsigned.
* `QuantAdd`: the residual join. Each branch is rounded to the output scale separately, the two
  are added and the sum is clamped once (16-bit block outputs, unsigned when a ReLU follows:
  the clamp at 0 is the ReLU).
* What the QAT networks (`QResNet`, `QInception`) share: `QuantBits`, the bit-width fields and
  lookups they mix in after their float architecture, `quantized_fields` to fill them,
  `architecture_fields` / `float_twin` between a QAT network and its float model,
  `quant_head_outputs` (the quantized head), and `from_float` (a float model's variables onto
  its QAT twin's).

Variables: parameters in ``params``; BatchNorm running statistics and activation ranges (``lo``,
``hi``, ``initialized``) are both running statistics of the data and live in ``batch_stats``, so
a training loop written for float BatchNorm models (mutable ``batch_stats``) trains these
unchanged. The bias is kept in float here; the integer program
quantizes it to int32 at scale S_w·S_in, an error far below one output LSB.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from grassq.quant import quantizers

RESIDUAL_BITS = 16  # HAWQV3's block-output width


class QuantSemantics(NamedTuple):
  """Training-time statistics of the QAT layers (the integer program is the same either way).

  Attributes:
    bn_momentum: BatchNorm running statistics: running <- m * running + (1 - m) * batch.
    bn_unbiased_var: normalize (and update the running variance) with the unbiased batch
      variance N / (N - 1) * var, as HAWQV3's `QuantBnConv2d` does with ``torch.var``.
    range_momentum: EMA momentum of every tracked activation range (after the first batch).
  """

  bn_momentum: float
  bn_unbiased_var: bool
  range_momentum: float


# "grassq": the float ResNets' BatchNorm momentum (0.9) and a slow range EMA (0.99, the value of
# HAWQV3's README); "hawq": HAWQV3's code (`QuantBnConv2d` sets bn.momentum to 0.99, i.e. 0.01
# of the batch, torch.var is unbiased, `QuantAct` defaults to act_range_momentum=0.95).
# docs/differences.md measures the two on ResNet-20 W8A8 and W4A4.
SEMANTICS = {
    "grassq": QuantSemantics(bn_momentum=0.9, bn_unbiased_var=False, range_momentum=0.99),
    "hawq": QuantSemantics(bn_momentum=0.99, bn_unbiased_var=True, range_momentum=0.95),
}


def semantics_of(name: str) -> QuantSemantics:
  if name not in SEMANTICS:
    raise ValueError(f"unknown QAT semantics {name!r}; available: {', '.join(SEMANTICS)}")
  return SEMANTICS[name]


def fold_bn(kernel, gamma, beta, mean, var, epsilon: float = 1e-5, bias=None):
  """BatchNorm folded into the conv/dense before it (output channels on the last axis).

  Returns (folded_kernel, folded_bias) with conv(x, W_f) + b_f = BN(conv(x, W) + bias).
  """
  inv = gamma * jax.lax.rsqrt(var + epsilon)
  b = jnp.zeros_like(beta) if bias is None else bias
  return kernel * inv, (b - mean) * inv + beta


def _conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=tuple(strides), padding=tuple(map(tuple, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _RangeTracker(nn.Module):
  """Running [lo, hi] of its input: first batch, then EMA; frozen when not training."""

  momentum: float = 0.99

  @nn.compact
  def __call__(self, x, train: bool):
    lo = self.variable("batch_stats", "lo", lambda: jnp.zeros((), jnp.float32))
    hi = self.variable("batch_stats", "hi", lambda: jnp.zeros((), jnp.float32))
    seen = self.variable("batch_stats", "initialized", lambda: jnp.zeros((), jnp.bool_))
    if train and not self.is_initializing():
      xs = jax.lax.stop_gradient(x).astype(jnp.float32)
      blo, bhi = jnp.min(xs), jnp.max(xs)
      m = self.momentum
      lo.value = jnp.where(seen.value, m * lo.value + (1 - m) * blo, blo)
      hi.value = jnp.where(seen.value, m * hi.value + (1 - m) * bhi, bhi)
      seen.value = jnp.ones((), jnp.bool_)
    return lo.value, hi.value, seen.value


class QuantAct(nn.Module):
  """Fake-quantizes activations to `bits` with a tracked range.

  Before it has seen a training batch it passes its input through unchanged; converting such a
  never-calibrated quantizer to integers is refused.

  Attributes:
    bits: one of `quantizers.SUPPORTED_BITS`.
    signed: False for non-negative inputs (after ReLU): range [0, 2^b − 1], zero point 0.
    momentum: EMA momentum of the range.
  """

  bits: int
  signed: bool
  momentum: float = 0.99

  @nn.compact
  def __call__(self, x, train: bool = False):
    quantizers.qrange(self.bits, self.signed)  # validates bits at trace time
    lo, hi, seen = _RangeTracker(self.momentum, name="range")(x, train)
    scale = quantizers.activation_scale(lo, hi, self.bits, self.signed)
    return jnp.where(seen, quantizers.fake_quant(x, scale, self.bits, self.signed), x)


class QuantConvBN(nn.Module):
  """Convolution + BatchNorm trained with the folded weight fake-quantized per channel.

  Attributes:
    features: output channels.
    kernel_size, strides: as in `nn.Conv`.
    padding: explicit ((top, bottom), (left, right)).
    weight_bits: one of `quantizers.SUPPORTED_BITS`.
    fix_bn: fold with the running statistics even in training (late QAT).
    momentum, epsilon: BatchNorm's, as in the float ResNets.
    unbiased_var: normalize with the unbiased batch variance (HAWQV3's code).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))
  weight_bits: int = 8
  fix_bn: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_var: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    quantizers.qrange(self.weight_bits, True)
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                        (*self.kernel_size, cin, self.features), jnp.float32)
    gamma = self.param("bn_scale", nn.initializers.ones, (self.features,), jnp.float32)
    beta = self.param("bn_bias", nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((self.features,), jnp.float32))
    x = x.astype(jnp.float32)
    if train and not self.fix_bn:
      y = _conv(x, kernel, self.strides, self.padding)
      mu = jnp.mean(y, axis=(0, 1, 2))
      v = jnp.mean(jnp.square(y - mu), axis=(0, 1, 2))
      if self.unbiased_var:
        count = y.shape[0] * y.shape[1] * y.shape[2]
        v = v * (count / max(count - 1, 1))
      if not self.is_initializing():
        m = self.momentum
        mean.value = m * mean.value + (1 - m) * jax.lax.stop_gradient(mu)
        var.value = m * var.value + (1 - m) * jax.lax.stop_gradient(v)
    else:
      mu, v = mean.value, var.value
    w, b = fold_bn(kernel, gamma, beta, mu, v, self.epsilon)
    return _conv(x, quantizers.fake_quant_weight(w, self.weight_bits), self.strides,
                 self.padding) + b


class QuantDense(nn.Module):
  """Dense layer with per-output-channel fake-quant weights and a float bias."""

  features: int
  weight_bits: int = 8

  @nn.compact
  def __call__(self, x):
    quantizers.qrange(self.weight_bits, True)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return x.astype(jnp.float32) @ quantizers.fake_quant_weight(kernel, self.weight_bits) + bias


def fake_quant_add(a, b, scale, bits: int = RESIDUAL_BITS, signed: bool = False):
  """The integer residual join in float: round(a/s) + round(b/s), clamped once, times s."""
  qmin, qmax = (-2**(bits - 1), 2**(bits - 1) - 1) if signed else (0, 2**bits - 1)
  q = quantizers.round_ste(a / scale) + quantizers.round_ste(b / scale)
  # Clamp with a straight-through gradient inside the range (as `fake_quant`).
  return jnp.clip(q, qmin, qmax) * scale


class QuantAdd(nn.Module):
  """Residual join: both branches requantized to a tracked 16-bit output scale, then added.

  Attributes:
    bits: output width (16 in HAWQV3).
    signed: False when a ReLU follows (the clamp at 0 is the ReLU).
  """

  bits: int = RESIDUAL_BITS
  signed: bool = False
  momentum: float = 0.99

  @nn.compact
  def __call__(self, a, b, train: bool = False):
    if self.bits not in (8, RESIDUAL_BITS):
      raise ValueError(f"residual join bits must be 8 or {RESIDUAL_BITS}, got {self.bits}")
    total = a + b
    if not self.signed:
      total = jax.nn.relu(total)
    lo, hi, seen = _RangeTracker(self.momentum, name="range")(total, train)
    qmax = 2**(self.bits - 1) - 1 if self.signed else 2**self.bits - 1
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if self.signed else jnp.maximum(hi, 0.0)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return jnp.where(seen, fake_quant_add(a, b, scale, self.bits, self.signed), total)


PROJECTION_BITS = 12  # projection coordinates: k * 2047^2 (the symmetric clamp) fits int32 for k <= 512


def bases_as_kernel(bases):
  """(C, n, k) class bases -> an (n, C·k) kernel: one output channel per basis column."""
  c, n, k = bases.shape
  return jnp.transpose(bases, (1, 0, 2)).reshape(n, c * k)


class QuantGrassmannHead(nn.Module):
  """The GCR head with fake-quant bases and projections (the integer program's twin).

  Bases (parameter ``bases``, float32, trained by `grassq.optim` like `GrassmannHead`'s) are
  fake-quantized per basis column; the projections p = Sᵀx are fake-quantized to `proj_bits`
  signed with a tracked range; logits = scale·‖p_i‖ / ‖x‖ (safe norms).
  """

  num_classes: int
  subspace_dim: int = 8
  scale: float = 25.0
  weight_bits: int = 8
  proj_bits: int = PROJECTION_BITS
  momentum: float = 0.99

  @nn.compact
  def __call__(self, x, train: bool = False):
    from grassq import grassmann
    from grassq.heads import safe_norm

    quantizers.qrange(self.weight_bits, True)
    n = x.shape[-1]
    if not 0 < self.subspace_dim <= n:
      raise ValueError(f"subspace_dim={self.subspace_dim} must satisfy 0 < k <= n = {n}")
    bases = self.param("bases", lambda key, shape: grassmann.random_bases(key, *shape),
                       (self.num_classes, n, self.subspace_dim))
    w = quantizers.fake_quant_weight(bases_as_kernel(bases), self.weight_bits)
    x = x.astype(jnp.float32)
    p = x @ w
    lo, hi, seen = _RangeTracker(self.momentum, name="proj_range")(p, train)
    qmax = 2**(self.proj_bits - 1) - 1
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    pq = jnp.clip(quantizers.round_ste(p / s), -qmax, qmax) * s
    p = jnp.where(seen, pq, p).reshape(*x.shape[:-1], self.num_classes, self.subspace_dim)
    return self.scale * safe_norm(p, axis=-1) / safe_norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- bit bookkeeping


class QuantBits(nn.Module):
  """Bit-width fields of a QAT network and their lookups, shared by `QResNet` and `QInception`.

  A QAT network is ``class QNet(QuantBits, FloatNet)``: the float model's architecture fields
  come first, these after them. As in HAWQV3 a layer's bits apply to its weights and to the
  activations it reads, unless `act_bits` says otherwise.

  Attributes:
    bits: per-layer bit-widths {layer name: bits}; missing layers get `default_bits`, except
      the layers of `pinned_8bit` (first conv and classifier), at 8 unless given.
    default_bits: bit-width of layers not in `bits`.
    act_bits, default_act_bits: activation bit-widths by layer, and for the rest (0: the
      layer's weight bits). W4A8 is ``default_bits=4, default_act_bits=8``.
    hawq_signed8: signed 8-bit activations as in HAWQV3 (default: unsigned after ReLU).
    fix_bn: fold BatchNorm with running statistics in training too (late QAT).
    semantics: training-time statistics, a key of `SEMANTICS` ("grassq" or "hawq").
  """

  pinned_8bit: ClassVar[tuple[str, ...]] = ()

  bits: Mapping[str, int] = FrozenDict()
  default_bits: int = 8
  act_bits: Mapping[str, int] = FrozenDict()
  default_act_bits: int = 0
  hawq_signed8: bool = False
  fix_bn: bool = False
  semantics: str = "grassq"

  def bn_kwargs(self) -> dict[str, Any]:
    """`QuantConvBN` keyword arguments of this model's `semantics`."""
    sem = semantics_of(self.semantics)
    return dict(momentum=sem.bn_momentum, unbiased_var=sem.bn_unbiased_var)

  def range_momentum(self) -> float:
    """EMA momentum of every range tracker of this model's `semantics`."""
    return semantics_of(self.semantics).range_momentum

  def weight_bits_of(self, name: str) -> int:
    """Weight bit-width of layer `name` (first conv and classifier: 8 unless given)."""
    return int(self.bits.get(name, 8 if name in self.pinned_8bit else self.default_bits))

  def act_bits_of(self, name: str) -> int:
    """Bit-width of the activations layer `name` reads (default: its weight bit-width)."""
    if name in self.act_bits:
      return int(self.act_bits[name])
    if self.default_act_bits and name not in self.pinned_8bit:
      return int(self.default_act_bits)
    return self.weight_bits_of(name)

  def check_head(self):
    """Raises NotImplementedError unless the head has a QAT twin (linear or grassmann)."""
    if self.head not in ("linear", "grassmann"):
      raise NotImplementedError(f"{type(self).__name__} supports the linear and grassmann "
                                f"heads, not {self.head!r}")


def quant_head_outputs(model: QuantBits, q, features, train: bool, return_features: bool):
  """A QAT network's head ``head`` (`QuantDense`, or `QuantGrassmannHead` with the model's
  ``head_kwargs``) at ``weight_bits_of("head")`` on the quantized features `q`: logits, or
  (logits, features) when `return_features`. Call it inside the model's compact method."""
  bits = model.weight_bits_of("head")
  if model.head == "grassmann":
    logits = QuantGrassmannHead(model.num_classes, weight_bits=bits, name="head",
                                momentum=model.range_momentum(),
                                **dict(model.head_kwargs))(q, train)
  else:
    logits = QuantDense(model.num_classes, bits, name="head")(q)
  return (logits, features) if return_features else logits


def quantized_fields(bits: Mapping[str, int] | None = None, default_bits: int = 8,
                     act_bits: Mapping[str, int] | None = None, default_act_bits: int = 0,
                     **kwargs) -> dict[str, Any]:
  """The `QuantBits` fields of a `quantized(model, ...)` call, as hashable module fields."""
  return dict(bits=FrozenDict(bits or {}), default_bits=default_bits,
              act_bits=FrozenDict(act_bits or {}), default_act_bits=default_act_bits, **kwargs)


def architecture_fields(model: nn.Module, cls: type) -> dict[str, Any]:
  """{field: value} of `model` for the constructor fields of module class `cls`
  (``parent`` and ``name`` left out): a float model's fields, read from it or its QAT twin."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(cls)
          if f.init and f.name not in ("parent", "name")}


def float_twin(model: nn.Module) -> nn.Module:
  """The float model with a QAT network's architecture fields (its first base class that is
  not a `QuantBits`), whose nn.Conv/nn.Dense layers `grassq.quant.cost.layer_costs` sees under
  the QAT layer names; any other model is returned as is."""
  if not isinstance(model, QuantBits):
    return model
  cls = next(c for c in type(model).__mro__
             if issubclass(c, nn.Module) and not issubclass(c, QuantBits))
  return cls(**architecture_fields(model, cls))


def mutable_copy(tree):
  """A copy of nested mappings (FrozenDicts too) as plain dicts; the leaves are shared."""
  return {k: mutable_copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def from_float(float_variables: Mapping, qat_variables: Mapping) -> dict:
  """`qat_variables` (a fresh init of a QAT network) with the weights of its float model's.

  Each `QuantConvBN` takes the float conv at its path and the BatchNorm beside it, named as the
  conv with "conv" replaced by "bn" (ResNet: ``stage1_block0/conv1`` and ``stage1_block0/bn1``;
  InceptionV3: ``Mixed_5b/branch1x1/conv`` and ``Mixed_5b/branch1x1/bn``): kernel, BN scale and
  offset, running mean and variance. The head takes the linear head's dense layer (or the
  Grassmann head's bases). Activation ranges stay uncalibrated: training batches set them.

  Raises:
    ValueError: when the architectures differ (a missing layer, other kernel counts or shapes).
  """
  fp, fs = float_variables["params"], float_variables.get("batch_stats", {})
  params = mutable_copy(qat_variables["params"])
  stats = mutable_copy(qat_variables["batch_stats"])

  def fill(qp, qs, p, s, where):
    for name, sub in qp.items():
      try:
        if name == "head" and not where:
          if "bases" in sub:
            sub.update(bases=p["head"]["bases"])
          else:
            sub.update(kernel=p["head"]["dense"]["kernel"], bias=p["head"]["dense"]["bias"])
        elif "bn_scale" in sub:  # a QuantConvBN
          bn = name.replace("conv", "bn")
          sub.update(kernel=p[name]["kernel"], bn_scale=p[bn]["scale"], bn_bias=p[bn]["bias"])
          qs[name].update(mean=s[bn]["mean"], var=s[bn]["var"])
        else:  # a block (or an InceptionV3 unit)
          fill(sub, qs[name], p[name], s[name], where + name + "/")
      except KeyError as e:
        raise ValueError(f"float variables have no {e.args[0]!r} for the QAT layer "
                         f"{where}{name}: different architectures?") from None

  fill(params, stats, fp, fs, "")
  check_filled(fp, params, qat_variables["params"])
  return {**qat_variables, "params": params, "batch_stats": stats}


def check_filled(float_params: Mapping, params: Mapping, fresh_params: Mapping):
  """Raises ValueError unless QAT `params`, filled from `float_params`, took as many conv/dense
  kernels (and bases) as the float model has and kept the shapes of the fresh QAT init's."""
  count = lambda t: sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(t)[0]
                        if path[-1].key in ("kernel", "bases"))
  if count(float_params) != count(params):
    raise ValueError(f"float variables have {count(float_params)} conv/dense kernels, the QAT "
                     f"model {count(params)}: different architectures")
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, mutable_copy(t))
  if shapes(fresh_params) != shapes(params):
    raise ValueError("float variables have different shapes than the QAT model's")
