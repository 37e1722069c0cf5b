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

Variables: parameters in ``params``; BatchNorm running statistics and activation ranges (``lo``,
``hi``, ``initialized``) are both running statistics of the data and live in ``batch_stats``, so
a training loop written for float BatchNorm models (mutable ``batch_stats``) trains these
unchanged. The bias is kept in float here; the integer program
quantizes it to int32 at scale S_w·S_in, an error far below one output LSB.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from grassq.quant import quantizers

RESIDUAL_BITS = 16  # HAWQV3's block-output width


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
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))
  weight_bits: int = 8
  fix_bn: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5

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


PROJECTION_BITS = 12  # projection coordinates: k * (2^11)^2 fits int32 for k <= 511


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
