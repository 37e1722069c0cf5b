"""Uniform quantizers for quantization-aware training (HAWQV3 conventions).

- Weights: symmetric, per output channel (the last axis of a Flax kernel of shape
  (..., in, out)), scale = max|W_c| / (2^(b-1) - 1), q in [-2^(b-1), 2^(b-1) - 1].
- Activations: unsigned [0, 2^b - 1] with zero point 0 when known non-negative
  (after ReLU), scale = hi / (2^b - 1); otherwise signed symmetric,
  scale = max(|lo|, |hi|) / (2^(b-1) - 1).
- Biases: int32 at scale S_w * S_in (per output channel).

Rounding is round half to even everywhere here (`jnp.round`, `np.rint`), as in
HAWQV3's PyTorch code. Gradients use the straight-through estimator (STE).
A scale that would be zero (an all-zero channel or range) is replaced by 1.0, so
every value quantizes to 0 and later dyadic scales stay representable.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits):
  is_int = isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)
  if not is_int or int(bits) not in SUPPORTED_BITS:
    raise ValueError(f"unsupported bit-width {bits!r}; supported: {SUPPORTED_BITS}")
  return int(bits)


def qrange(bits, signed):
  """Integer range [qmin, qmax] of a `bits`-bit signed or unsigned value.

  Args:
    bits: one of `SUPPORTED_BITS`.
    signed: symmetric-signed range if True, else unsigned with zero point 0.

  Returns:
    (qmin, qmax) as python ints: (-2^(b-1), 2^(b-1) - 1) or (0, 2^b - 1).
  """
  bits = _check_bits(bits)
  if signed:
    return -2**(bits - 1), 2**(bits - 1) - 1
  return 0, 2**bits - 1


def _as_float(x):
  x = jnp.asarray(x)
  if x.dtype in (jnp.float32, jnp.float64):
    return x
  return x.astype(jnp.float32)


def _safe_scale(s):
  """Replaces zero (degenerate) scales by 1.0."""
  return jnp.where(s > 0, s, jnp.ones_like(s))


@jax.custom_jvp
def round_ste(x):
  """Round half to even with a straight-through gradient (d/dx = 1).

  Args:
    x: float array.

  Returns:
    jnp.round(x), whose derivative is taken to be the identity.
  """
  return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return round_ste(x), t


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _fake_quant(x, scale, qmin, qmax, clip_gradient):
  return jnp.clip(jnp.round(x / scale), qmin, qmax) * scale


@_fake_quant.defjvp
def _fake_quant_jvp(qmin, qmax, clip_gradient, primals, tangents):
  x, scale = primals
  x_dot, _ = tangents  # The scale is a statistic: no gradient flows to it.
  out = _fake_quant(x, scale, qmin, qmax, clip_gradient)
  if not clip_gradient:
    return out, x_dot
  t = x / scale
  inside = (t >= qmin) & (t <= qmax)
  return out, jnp.where(inside, x_dot, jnp.zeros_like(x_dot))


def _channel_shape(w, axis):
  axis = axis % w.ndim
  return tuple(w.shape[axis] if i == axis else 1 for i in range(w.ndim))


def weight_scale(w, bits, axis=-1):
  """Symmetric per-channel weight scale max|W_c| / (2^(b-1) - 1).

  Args:
    w: float weights, e.g. a Flax kernel (..., in, out).
    bits: one of `SUPPORTED_BITS`.
    axis: the channel axis (output channels: -1 for Flax kernels).

  Returns:
    float array of shape (w.shape[axis],); all-zero channels get scale 1.0.
  """
  _, qmax = qrange(bits, True)
  w = _as_float(w)
  axis = axis % w.ndim
  reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
  amax = jnp.max(jnp.abs(w), axis=reduce_axes)
  return _safe_scale(amax / qmax)


def quantize_weight(w, bits, axis=-1):
  """Symmetric per-channel integer weights.

  Args:
    w: float weights, e.g. a Flax kernel (..., in, out).
    bits: one of `SUPPORTED_BITS`.
    axis: the channel axis.

  Returns:
    (q, scale): q int8 of the shape of `w`, clamp(round(w / scale)) in
    [-2^(b-1), 2^(b-1) - 1]; scale as from `weight_scale`. w ~ q * scale.
  """
  qmin, qmax = qrange(bits, True)
  w = _as_float(w)
  scale = weight_scale(w, bits, axis)
  q = jnp.clip(jnp.round(w / scale.reshape(_channel_shape(w, axis))), qmin, qmax)
  return q.astype(jnp.int8), scale


def fake_quant_weight(w, bits, axis=-1):
  """Quantize-dequantize of weights with a straight-through gradient.

  The scale is computed from `w` but held constant for differentiation. Every
  weight lies inside the range by construction (up to float rounding of
  w / scale at a channel's maximum), so the gradient is the plain STE: d/dw = 1.

  Args:
    w: float weights.
    bits: one of `SUPPORTED_BITS`.
    axis: the channel axis.

  Returns:
    q * scale as a float array of the shape and dtype of `w`.
  """
  qmin, qmax = qrange(bits, True)
  wf = _as_float(w)
  scale = jax.lax.stop_gradient(weight_scale(wf, bits, axis))
  out = _fake_quant(wf, scale.reshape(_channel_shape(wf, axis)), qmin, qmax, False)
  return out.astype(jnp.asarray(w).dtype)


def activation_scale(lo, hi, bits, signed):
  """Activation scale from a range [lo, hi] (e.g. running min/max).

  Args:
    lo, hi: range statistics (scalars or per-channel arrays).
    bits: one of `SUPPORTED_BITS`.
    signed: False for non-negative activations (after ReLU): unsigned, zero point
      0, scale = hi / (2^b - 1) (lo is ignored). True: symmetric,
      scale = max(|lo|, |hi|) / (2^(b-1) - 1).

  Returns:
    float scale; a zero range gives 1.0.
  """
  _, qmax = qrange(bits, signed)
  lo, hi = _as_float(lo), _as_float(hi)
  amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) if signed else jnp.maximum(hi, 0.0)
  return _safe_scale(amax / qmax)


def fake_quant(x, scale, bits, signed):
  """Quantize-dequantize clamp(round(x / scale)) * scale with a clipped STE.

  Gradient choice: d/dx = 1 where qmin <= x / scale <= qmax and 0 outside
  (the clamp passes gradient only inside the range); no gradient flows to
  `scale` (HAWQV3 takes ranges from running statistics, not learned).

  Args:
    x: float array.
    scale: positive float, broadcastable against `x`.
    bits: one of `SUPPORTED_BITS`.
    signed: signed symmetric range if True, else unsigned [0, 2^b - 1].

  Returns:
    float array of the shape and dtype of `x`.
  """
  qmin, qmax = qrange(bits, signed)
  xf = _as_float(x)
  scale = jnp.asarray(scale, xf.dtype)
  return _fake_quant(xf, scale, qmin, qmax, True).astype(jnp.asarray(x).dtype)


def quantize_activation(x, scale, bits, signed):
  """Integer activations clamp(round(x / scale)) (e.g. the network input).

  Args:
    x: float array.
    scale: positive float, broadcastable against `x`.
    bits: one of `SUPPORTED_BITS`.
    signed: int8 storage in the signed range if True, else uint8 in [0, 2^b - 1].

  Returns:
    int8 (signed) or uint8 (unsigned) array of the shape of `x`.
  """
  qmin, qmax = qrange(bits, signed)
  xf = _as_float(x)
  q = jnp.clip(jnp.round(xf / jnp.asarray(scale, xf.dtype)), qmin, qmax)
  return q.astype(jnp.int8 if signed else jnp.uint8)


def quantize_bias(b, scale):
  """int32 bias round_half_even(b / scale), computed on the host in float64.

  Args:
    b: float bias (per output channel); concrete, not traced.
    scale: positive float, broadcastable against `b`: S_w * S_in per channel.

  Returns:
    numpy int32 array of the broadcast shape.

  Raises:
    TypeError: for jax tracers.
    ValueError: for non-positive or non-finite scales, non-finite biases, or a
      quantized bias outside the int32 range.
  """
  if isinstance(b, jax.core.Tracer) or isinstance(scale, jax.core.Tracer):
    raise TypeError("quantize_bias runs on the host; call it on concrete arrays")
  b = np.asarray(b, np.float64)
  scale = np.asarray(scale, np.float64)
  if not np.all(np.isfinite(scale) & (scale > 0)):
    raise ValueError(f"quantize_bias needs positive finite scales; got {scale}")
  if not np.all(np.isfinite(b)):
    raise ValueError("quantize_bias: bias has non-finite values")
  q = np.rint(b / scale)
  over = (q < -2**31) | (q > 2**31 - 1)
  if np.any(over):
    raise ValueError(
        f"quantize_bias: {int(np.sum(over))} value(s) overflow int32, e.g. "
        f"{np.broadcast_to(b, q.shape)[over][0]!r} / {np.broadcast_to(scale, q.shape)[over][0]!r}")
  return q.astype(np.int32)
