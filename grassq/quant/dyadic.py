"""Dyadic arithmetic for integer-only requantization (HAWQV3).

A real scale r (for a layer: S_w * S_in / S_out) is replaced by a dyadic number
m / 2^c with an integer multiplier m in [2^30, 2^31 - 1] and a right shift c in
[1, 62]. An int32 accumulator is then requantized with integers only:

    q = (acc * m + 2^(c - 1)) >> c        (exact product, arithmetic shift)

which is round-half-up of acc * m / 2^c, then clamped to the output range
(`clip_range`: the signed/unsigned `bits` range when saturating, its lower end
raised to 0 with ``relu`` for a signed quantizer that a ReLU precedes). This one
rule is used by every back end (the JAX interpreter here, TVM's int64 path) and is
checked against Python big-int arithmetic (`requantize_reference`). It rounds once:
gemmlowp's high-multiply followed by a rounding shift rounds twice and can differ
by 1 LSB.

JAX runs with x64 off by default, where int32 products wrap, so `requantize` forms
the up-to-62-bit product from 16-bit limbs in uint32 arithmetic: no int64 and no
floating-point operation anywhere in its jaxpr.
"""

import functools

import numpy as np
import jax
from jax import lax
import jax.numpy as jnp

MIN_SHIFT = 1
MAX_SHIFT = 62
MIN_MULTIPLIER = 2**30
MAX_MULTIPLIER = 2**31 - 1

# Output bit-widths `requantize` can saturate to; 32 means the int32 range (signed only).
REQUANTIZE_BITS = tuple(range(2, 17)) + (32,)

_INT32_MIN = -2**31
_INT32_MAX = 2**31 - 1


def _is_tracer(x):
  return isinstance(x, jax.core.Tracer)


def dyadic(scale):
  """Dyadic approximation multiplier * 2^-shift of a positive scale.

  Computed on the host in float64 from frexp: scale = mantissa * 2^e with
  mantissa in [0.5, 1); multiplier = round_half_up(mantissa * 2^31) and
  shift = 31 - e. When rounding yields 2^31 the multiplier is halved and the shift
  decreased by one (same value). The relative error is at most 2^-31.

  Args:
    scale: a positive finite python float, or an array of them (e.g. per-channel
      scales). Must be concrete: jax tracers are refused.

  Returns:
    (multiplier, shift): numpy int32 arrays with the shape of `scale` (0-d arrays
    for a scalar), multiplier in [2^30, 2^31 - 1] and shift in [1, 62].

  Raises:
    TypeError: if `scale` is a jax tracer or not numeric.
    ValueError: if a scale is not positive and finite, or needs a shift outside
      [1, 62] (scales outside about [2^-32, 2^30)).
  """
  if _is_tracer(scale):
    raise TypeError(
        "dyadic() runs on the host in float64 and cannot be traced; call it on "
        "concrete scales outside jit/grad/vmap")
  try:
    r = np.asarray(scale, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"dyadic() needs real numeric scales; got {scale!r}") from e
  bad = ~(np.isfinite(r) & (r > 0))
  if np.any(bad):
    raise ValueError(
        f"dyadic() needs positive finite scales; got {r[bad].tolist()} "
        f"at indices {np.argwhere(bad).tolist()}" if r.ndim else
        f"dyadic() needs a positive finite scale; got {r.item()!r}")
  mantissa, exponent = np.frexp(r)
  # mantissa * 2^31 is exact in float64; floor(x + 0.5) is round half up.
  multiplier = np.floor(mantissa * 2.0**31 + 0.5).astype(np.int64)
  shift = 31 - exponent.astype(np.int64)
  edge = multiplier == 2**31
  multiplier = np.where(edge, multiplier // 2, multiplier)
  shift = np.where(edge, shift - 1, shift)
  out = (shift < MIN_SHIFT) | (shift > MAX_SHIFT)
  if np.any(out):
    bad_scales = r[out].tolist() if r.ndim else [r.item()]
    raise ValueError(
        f"dyadic(): scale(s) {bad_scales} need shift(s) {np.asarray(shift)[out].tolist()} "
        f"outside [{MIN_SHIFT}, {MAX_SHIFT}] (representable scales lie in about "
        f"[2^-32, 2^30))")
  return np.asarray(multiplier, np.int32), np.asarray(shift, np.int32)


def clip_range(bits, signed, saturate=True, relu=False):
  """Static [lo, hi] bounds of a requantized output; validates `bits`.

  Args:
    bits, signed, saturate: as in `requantize`.
    relu: raise the lower bound to 0 (a ReLU before the quantizer).

  Returns:
    (lo, hi) python ints: the signed/unsigned `bits` range when `saturate`, else the
    int32 range; lo = max(lo, 0) with `relu`.
  """
  lo, hi = _clip_range(bits, signed, saturate)
  return (max(lo, 0), hi) if relu else (lo, hi)


def _clip_range(bits, signed, saturate):
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f"bits must be an int in {REQUANTIZE_BITS}; got {bits!r}")
  bits = int(bits)
  if bits not in REQUANTIZE_BITS:
    raise ValueError(f"requantize supports bits in {REQUANTIZE_BITS}; got {bits}")
  if bits == 32 and not signed:
    raise ValueError("requantize: unsigned output with bits=32 does not fit int32; use signed=True")
  if not saturate:
    return _INT32_MIN, _INT32_MAX
  if signed:
    return -2**(bits - 1), 2**(bits - 1) - 1
  return 0, 2**bits - 1


def _as_int32(x, name):
  """Integer input as an int32 jax array; concrete values are range-checked."""
  if _is_tracer(x) or isinstance(x, jax.Array):
    dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer array; got dtype {dtype}")
    if jnp.iinfo(dtype).bits > 32 or dtype == jnp.uint32:
      if _is_tracer(x):
        raise TypeError(f"{name} of dtype {dtype} may not fit int32; cast it first")
      x = np.asarray(x)
    else:
      return jnp.asarray(x, jnp.int32)
  a = np.asarray(x)
  if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
    raise TypeError(f"{name} must hold integers; got dtype {a.dtype}")
  if a.size and (a.min() < _INT32_MIN or a.max() > _INT32_MAX):
    raise ValueError(f"{name} has values outside the int32 range")
  return jnp.asarray(a.astype(np.int32))


def _check_shift(shift):
  """Refuses concrete shifts outside [1, 62] (traced shifts cannot be checked)."""
  if _is_tracer(shift):
    return
  s = np.asarray(shift)
  if s.size and (s.min() < MIN_SHIFT or s.max() > MAX_SHIFT):
    bad = s[(s < MIN_SHIFT) | (s > MAX_SHIFT)]
    raise ValueError(
        f"requantize: shifts must lie in [{MIN_SHIFT}, {MAX_SHIFT}]; got {np.unique(bad).tolist()}")


def _u32(x):
  return lax.bitcast_convert_type(x, jnp.uint32)


def _i32(x):
  return lax.bitcast_convert_type(x, jnp.int32)


def _abs_u32(x):
  """|x| of an int32 as uint32 (exact, also for -2^31) and the sign x < 0."""
  u = _u32(x)
  neg = x < 0
  return jnp.where(neg, jnp.uint32(0) - u, u), neg


def _mul_wide(a, b):
  """Exact product of magnitudes a, b <= 2^31 (uint32) as (hi, lo) uint32 words.

  Each factor is split into 16-bit limbs, so every partial product fits uint32.
  With a, b <= 2^31 the high limbs are <= 2^15 (and a high limb of 2^15 comes
  with a zero low limb), so each middle product is < 2^31 and their sum cannot
  overflow; only the low word needs an explicit carry.
  """
  a0, a1 = a & 0xFFFF, a >> 16
  b0, b1 = b & 0xFFFF, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = p01 + p10
  lo = p00 + (mid << 16)
  lo_carry = (lo < p00).astype(jnp.uint32)
  hi = p11 + (mid >> 16) + lo_carry
  return hi, lo


def _neg_wide(hi, lo):
  """Two's-complement negation of the 64-bit number (hi, lo)."""
  return ~hi + (lo == 0).astype(jnp.uint32), jnp.uint32(0) - lo


@functools.partial(jax.jit, static_argnames=("lo_bound", "hi_bound"))
def _requantize_int32(acc, multiplier, shift, lo_bound, hi_bound):
  """Core of `requantize` on broadcast int32 arrays; integer ops only."""
  # Exact signed product acc * multiplier as a two's-complement 64-bit (hi, lo).
  a, a_neg = _abs_u32(acc)
  m, m_neg = _abs_u32(multiplier)
  hi, lo = _mul_wide(a, m)
  neg_hi, neg_lo = _neg_wide(hi, lo)
  neg = a_neg != m_neg
  hi, lo = jnp.where(neg, neg_hi, hi), jnp.where(neg, neg_lo, lo)

  # + 2^(c - 1), with the carry from the low word.
  c = _u32(shift)
  r = c - 1
  r_lo = jnp.where(r < 32, jnp.uint32(1) << jnp.minimum(r, 31), jnp.uint32(0))
  r_hi = jnp.where(r >= 32, jnp.uint32(1) << (jnp.maximum(r, 32) - 32), jnp.uint32(0))
  lo2 = lo + r_lo
  hi = hi + r_hi + (lo2 < lo).astype(jnp.uint32)
  lo = lo2

  # Arithmetic shift right by c in [1, 62]; every shift amount used lies in [0, 31].
  hi_s = _i32(hi)
  small = c < 32
  cs = jnp.clip(c, 1, 31)
  cb = jnp.clip(c, 32, 63) - 32
  lo_small = (lo >> cs) | (hi << (32 - cs))
  hi_small = hi_s >> _i32(cs)
  lo_big = _u32(hi_s >> _i32(cb))
  hi_big = hi_s >> 31
  res_hi = jnp.where(small, hi_small, hi_big)
  res_lo = jnp.where(small, lo_small, lo_big)

  # Clamp the 64-bit result (res_hi, res_lo) to [lo_bound, hi_bound] within int32.
  low = _i32(res_lo)
  fits = res_hi == (low >> 31)
  clamped = jnp.clip(low, jnp.int32(lo_bound), jnp.int32(hi_bound))
  overflow = jnp.where(res_hi < 0, jnp.int32(lo_bound), jnp.int32(hi_bound))
  return jnp.where(fits, clamped, overflow)


def requantize(acc, multiplier, shift, bits, signed, saturate=True, relu=False):
  """Integer-only requantization (acc * multiplier + 2^(shift-1)) >> shift.

  The product is exact (up to 62 bits, formed from 16-bit limbs without int64)
  and the shift is arithmetic, so the result is acc * multiplier / 2^shift
  rounded half up, bit for bit as `requantize_reference`. Works with x64 off,
  under jit (bits, signed and saturate are static) and vmap; its jaxpr holds no
  floating-point value.

  Args:
    acc: integer array (int32 accumulators), any shape.
    multiplier: int32 array broadcastable against `acc` (per output channel on the
      last axis, typically), from `dyadic`. Any int32 value is computed exactly.
    shift: int32 array broadcastable against `acc`, in [1, 62]. Concrete shifts
      outside the range raise; traced ones are not checked (the result is then
      unspecified).
    bits: output bit-width, one of `REQUANTIZE_BITS` (2..16, or 32 = int32).
    signed: saturate to [-2^(bits-1), 2^(bits-1) - 1] if True, else to
      [0, 2^bits - 1].
    saturate: if False (the two branches of a residual add), skip the `bits`
      clamp; results beyond the int32 range are then clamped to
      [-2^31, 2^31 - 1] (never wrapped).
    relu: clamp below at 0 as well (``max(lo, 0)``): the ReLU that precedes a signed
      quantizer (HAWQV3's signed 8-bit activations); static.

  Returns:
    int32 array of the broadcast shape.

  Raises:
    ValueError: unsupported `bits`, or concrete shifts outside [1, 62].
  """
  lo_bound, hi_bound = clip_range(bits, signed, saturate, relu)
  _check_shift(shift)
  acc = _as_int32(acc, "acc")
  multiplier = _as_int32(multiplier, "multiplier")
  shift = _as_int32(shift, "shift")
  acc, multiplier, shift = jnp.broadcast_arrays(acc, multiplier, shift)
  return _requantize_int32(acc, multiplier, shift, lo_bound=lo_bound, hi_bound=hi_bound)


def requantize_reference(acc, multiplier, shift, bits, signed, saturate=True, relu=False):
  """`requantize` in Python big-int arithmetic, element by element (for tests).

  Args:
    acc, multiplier, shift, bits, signed, saturate, relu: as in `requantize`.

  Returns:
    numpy int32 array of the broadcast shape.
  """
  lo_bound, hi_bound = clip_range(bits, signed, saturate, relu)
  _check_shift(shift)
  a, m, c = np.broadcast_arrays(
      np.asarray(acc, object), np.asarray(multiplier, object), np.asarray(shift, object))
  out = [
      min(max((int(x) * int(y) + (1 << (int(s) - 1))) >> int(s), lo_bound), hi_bound)
      for x, y, s in zip(a.ravel(), m.ravel(), c.ravel())
  ]
  return np.asarray(out, np.int64).astype(np.int32).reshape(a.shape)
