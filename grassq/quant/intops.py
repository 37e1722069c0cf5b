"""Integer primitives of the integer-only network (HAWQV3), in pure int32 jnp.

These are the ops the integer-program interpreter calls: convolution and dense
layers with int32 accumulation, bias and residual adds, pooling, int4 packing,
an exact integer square root, and the host-side accumulator-width check. Every
function takes integer arrays and returns integer arrays, is jit-able (shapes,
strides, paddings and window sizes are static), works with x64 off, and has no
floating-point value anywhere in its jaxpr.

Convolution is im2col from KH*KW strided slices followed by one int8 x int8 ->
int32 `lax.dot_general` (XLA's CPU backend has a fast kernel for exactly that; an
int32 x int32 dot or XLA's integer convolution is several times slower). On GPUs a
contraction shorter than `GPU_INT8_DOT_MIN_K` goes to an int32 dot instead: XLA's CUDA int8
dot is wrong there (`benchmarks/int_exactness.py` checks a backend).
`lax.conv_general_dilated_patches` is not used: it is itself a convolution, slow
on integers, and puts a float op in the jaxpr. Unsigned 8-bit activations are
fed to the same int8 kernel as x ^ 0x80 = x - 128, with 128 * sum_k w[k, :]
added back (exact, as for x86 VNNI).

int32 arithmetic wraps silently, and the primitives cannot know the ranges of
their inputs (e.g. that an int8 array holds int4 values, or how large int32
values get). An integer program's bounds are proved once on the host, from its
actual weights and clamps, by `grassq.quant.program.value_bounds` (every
accumulator, residual add, pool sum and the Grassmann head's norms); `to_program`
and `program.load` run it. `accumulator_range` / `check_accumulator_fits` give the
shape-only worst case over all weights of given bit-widths and fan-in (for
choosing layer shapes and bit-widths before there are weights).
"""

import numpy as np
import jax
from jax import lax
import jax.numpy as jnp

_INT32_MIN = -2**31
_INT32_MAX = 2**31 - 1
INT4_MIN = -8
INT4_MAX = 7


def _is_tracer(x):
  return isinstance(x, jax.core.Tracer)


def _int_array(x, name):
  """x as a jax array of an integer dtype of at most 32 bits (no value change)."""
  if not _is_tracer(x) and not isinstance(x, jax.Array):
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
      raise TypeError(f"{name} must be an integer array; got dtype {a.dtype}")
    if a.dtype.itemsize > 4:  # e.g. python ints / int64 numpy: must fit int32
      if a.size and (a.min() < _INT32_MIN or a.max() > _INT32_MAX):
        raise ValueError(f"{name} has values outside the int32 range")
      a = a.astype(np.int32)
    x = a
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.int32)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must be an integer array; got dtype {x.dtype}")
  return x


def _to_int32(x, name):
  """Integer array as int32; uint32 is refused (it may not fit)."""
  x = _int_array(x, name)
  if x.dtype == jnp.uint32:
    raise TypeError(f"{name} of dtype uint32 may not fit int32; cast it first")
  return x.astype(jnp.int32)


def _pair(v, name):
  if isinstance(v, (int, np.integer)):
    return (int(v), int(v))
  v = tuple(int(t) for t in v)
  if len(v) != 2:
    raise ValueError(f"{name} must be an int or a pair of ints; got {v!r}")
  return v


def _spatial_padding(padding, in_hw, window, strides):
  """((top, bottom), (left, right)) from explicit pairs or 'SAME' / 'VALID'."""
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, window, strides, padding))
  if isinstance(padding, (int, np.integer)):
    p = int(padding)
    return ((p, p), (p, p))
  pads = tuple(_pair(p, "padding") for p in padding)
  if len(pads) != 2 or any(p < 0 for pair in pads for p in pair):
    raise ValueError(f"padding must be ((top, bottom), (left, right)) of non-negative ints; "
                     f"got {padding!r}")
  return pads


def _out_size(n, k, s):
  if n < k:
    raise ValueError(f"window {k} larger than the padded input {n}")
  return (n - k) // s + 1


def _as_dot_operands(x, w):
  """Operands for the int8 kernel: (lhs, rhs, correction) with lhs @ rhs + correction == x @ w.

  int8 x int8 goes as is; uint8 x int8 as (x - 128) x int8 plus 128 * sum_k w (the
  correction, int32 over the last axis of w); anything else in int32.
  """
  if w.dtype == jnp.int8 and x.dtype == jnp.int8:
    return x, w, None
  if w.dtype == jnp.int8 and x.dtype == jnp.uint8:
    shifted = lax.bitcast_convert_type(x ^ jnp.uint8(0x80), jnp.int8)
    correction = jnp.sum(w.astype(jnp.int32), axis=0) * jnp.int32(128)
    return shifted, w, correction
  return _to_int32(x, "x"), _to_int32(w, "w"), None


# XLA's GPU int8 x int8 -> int32 dot gives wrong sums for short contractions: measured with
# JAX 0.11.2 on an H200, K = 7 and K = 9 (a 3x3 conv over one channel) were wrong in every
# element; K = 64-96 and the longer K tried (up to 576) exact (`benchmarks/int_exactness.py`).
# Below this K, GPUs get the int32 dot.
GPU_INT8_DOT_MIN_K = 64


def _dot_int32(lhs, rhs):
  return lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def _matmul_int(x2, w2):
  """(M, K) x (K, N) integer matmul with int32 accumulation."""
  lhs, rhs, correction = _as_dot_operands(x2, w2)
  if lhs.dtype == jnp.int8 and lhs.shape[1] < GPU_INT8_DOT_MIN_K:
    acc = lax.platform_dependent(
        lhs, rhs, default=_dot_int32,
        cuda=lambda a, b: _dot_int32(a.astype(jnp.int32), b.astype(jnp.int32)),
        rocm=lambda a, b: _dot_int32(a.astype(jnp.int32), b.astype(jnp.int32)))
  else:
    acc = _dot_int32(lhs, rhs)
  if correction is not None:
    acc = acc + correction
  return acc


def conv2d_int(x, w, strides=(1, 1), padding=((0, 0), (0, 0))):
  """Integer 2-D convolution (NHWC x HWIO) with int32 accumulation.

  Zero padding (the zero point of symmetric-signed and of unsigned activations),
  then im2col from KH*KW strided slices and one int8 x int8 -> int32 dot.

  Args:
    x: (B, H, W, Cin) int8 or uint8 activations (other integer dtypes of at most
      32 bits are computed in int32: exact, but slower).
    w: (KH, KW, Cin, Cout) int8 weights (a Flax kernel).
    strides: (sh, sw) or an int.
    padding: ((top, bottom), (left, right)), an int, or 'SAME' / 'VALID'.

  Returns:
    int32 array (B, Ho, Wo, Cout), exact while the accumulator fits int32 (see
    `grassq.quant.program.value_bounds`).

  Raises:
    ValueError: on rank or channel mismatch (grouped convolution is not supported).
  """
  x = _int_array(x, "x")
  w = _int_array(w, "w")
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f"conv2d_int wants x (B, H, W, Cin) and w (KH, KW, Cin, Cout); "
                     f"got shapes {x.shape} and {w.shape}")
  kh, kw, cin, cout = w.shape
  if x.shape[3] != cin:
    raise ValueError(f"conv2d_int: x has {x.shape[3]} input channels but w expects {cin} "
                     f"(grouped/depthwise convolution is not supported)")
  sh, sw = _pair(strides, "strides")
  if sh < 1 or sw < 1:
    raise ValueError(f"strides must be positive; got {(sh, sw)}")
  (pt, pb), (pl, pr) = _spatial_padding(padding, x.shape[1:3], (kh, kw), (sh, sw))
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  b, hp, wp, _ = x.shape
  ho, wo = _out_size(hp, kh, sh), _out_size(wp, kw, sw)
  if (kh, kw, sh, sw) == (1, 1, 1, 1):
    patches = x
  else:
    slices = [
        lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                  (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    # (B, Ho, Wo, KH*KW*Cin): features ordered (kh, kw, cin), as w.reshape below.
    patches = jnp.concatenate(slices, axis=3)
  patches = patches.reshape(b * ho * wo, kh * kw * cin)
  acc = _matmul_int(patches, w.reshape(kh * kw * cin, cout))
  return acc.reshape(b, ho, wo, cout)


def dense_int(x, w):
  """Integer dense layer x @ w with int32 accumulation.

  Args:
    x: (B, n) int8 or uint8 (other integer dtypes are computed in int32).
    w: (n, m) int8.

  Returns:
    int32 array (B, m), exact while the accumulator fits int32.
  """
  x = _int_array(x, "x")
  w = _int_array(w, "w")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"dense_int wants x (B, n) and w (n, m); got {x.shape} and {w.shape}")
  return _matmul_int(x, w)


def add_bias(acc, bias):
  """acc + bias per output channel (the last axis), in int32.

  Args:
    acc: int32 accumulators (..., C).
    bias: int32 (C,).

  Returns:
    int32 array of acc's shape (wraps on overflow, like the accumulation).
  """
  acc = _to_int32(acc, "acc")
  bias = _to_int32(bias, "bias")
  if bias.ndim != 1 or bias.shape[0] != acc.shape[-1]:
    raise ValueError(f"bias must have shape ({acc.shape[-1]},); got {bias.shape}")
  return acc + bias


def add_clamp(a, b, lo, hi):
  """Residual join: int32 a + b, clamped once to [lo, hi].

  Args:
    a, b: integer arrays (broadcastable), each within int32; their sum must not
      overflow int32 (`grassq.quant.program.value_bounds` proves it for a program).
    lo, hi: ints (or int32 arrays) bounding the result.

  Returns:
    int32 array.
  """
  s = _to_int32(a, "a") + _to_int32(b, "b")
  return jnp.clip(s, _to_int32(lo, "lo"), _to_int32(hi, "hi"))


def _window_args(x, window, strides, padding):
  window = _pair(window, "window")
  strides = window if strides is None else _pair(strides, "strides")
  pads = _spatial_padding(padding, x.shape[1:3], window, strides)
  return (1,) + window + (1,), (1,) + strides + (1,), ((0, 0),) + pads + ((0, 0),)


def max_pool_int(x, window, strides=None, padding=((0, 0), (0, 0))):
  """Max pooling of (B, H, W, C) integers; padding never wins.

  Args:
    x: integer array (B, H, W, C), any integer dtype (kept).
    window: (wh, ww) or an int.
    strides: (sh, sw), an int, or None (= window).
    padding: ((top, bottom), (left, right)), an int, or 'SAME' / 'VALID'; padded
      positions hold the dtype's minimum. ResNet stem: window 3, strides 2, padding 1.

  Returns:
    array of x's dtype (B, Ho, Wo, C).
  """
  x = _int_array(x, "x")
  dims, strides, pads = _window_args(x, window, strides, padding)
  init = jnp.array(jnp.iinfo(x.dtype).min, x.dtype)
  return lax.reduce_window(x, init, lax.max, dims, strides, pads)


def _floor_div(s, n):
  """floor(s / n) for int32 s and positive int32 n (also for negative s)."""
  q = lax.div(s, n)  # truncates towards zero
  return q - ((q * n != s) & (s < 0)).astype(jnp.int32)


def _check_window_sum(dtype, count, what):
  """Refuses windows whose int32 sum could overflow, when the dtype bounds the values."""
  if jnp.iinfo(dtype).bits >= 32:
    return  # int32 values: the caller's responsibility (documented)
  info = jnp.iinfo(dtype)
  worst = count * max(abs(int(info.min)), int(info.max))
  if worst > _INT32_MAX:
    raise ValueError(f"{what}: summing {count} values of dtype {dtype} may overflow int32")


def avg_pool_int(x, window, strides=None, padding=((0, 0), (0, 0)), count_include_pad=True):
  """Average pooling as floor(window sum / count), in int32.

  Args:
    x: integer array (B, H, W, C); sums are formed in int32, so count * max|x|
      must stay below 2^31 (checked when x's dtype is narrower than 32 bits).
    window: (wh, ww) or an int.
    strides: (sh, sw), an int, or None (= window; ResNet-D shortcut: 2x2/2).
    padding: ((top, bottom), (left, right)), an int, or 'SAME' / 'VALID'; zeros.
    count_include_pad: divide by wh * ww (True) or by the number of unpadded
      positions in each window (False).

  Returns:
    int32 array (B, Ho, Wo, C), rounded towards -inf.
  """
  x = _int_array(x, "x")
  dims, strides, pads = _window_args(x, window, strides, padding)
  _check_window_sum(x.dtype, dims[1] * dims[2], "avg_pool_int")
  x = _to_int32(x, "x")
  s = lax.reduce_window(x, jnp.int32(0), lax.add, dims, strides, pads)
  if count_include_pad or all(p == (0, 0) for p in pads):
    count = jnp.int32(dims[1] * dims[2])
  else:
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), jnp.int32)
    count = lax.reduce_window(ones, jnp.int32(0), lax.add, dims, strides, pads)
  return _floor_div(s, count)


def global_avg_pool_int(x):
  """Global average pooling floor(sum_{h,w} x / (H * W)), in int32.

  The sum is formed in int32: H * W * max|x| must stay below 2^31 (e.g. 16-bit
  values over a 7x7 map: 2^16 * 49 ~ 2^21.6, ample). Checked when x's dtype is
  narrower than 32 bits; for int32 inputs it is the caller's bound (for a program,
  `grassq.quant.program.value_bounds` checks it).

  Args:
    x: integer array (B, H, W, C) (non-negative after ReLU; negative values are
      also floored correctly).

  Returns:
    int32 array (B, C).
  """
  x = _int_array(x, "x")
  if x.ndim != 4:
    raise ValueError(f"global_avg_pool_int wants (B, H, W, C); got shape {x.shape}")
  count = x.shape[1] * x.shape[2]
  _check_window_sum(x.dtype, count, "global_avg_pool_int")
  s = jnp.sum(_to_int32(x, "x"), axis=(1, 2), dtype=jnp.int32)
  return _floor_div(s, jnp.int32(count))


def pack_int4(q):
  """Packs int4 values two per int8 byte along the last axis.

  Element 2i goes to the low nibble and 2i+1 to the high nibble of byte i; an odd
  length is padded with one zero.

  Args:
    q: integer array (..., n) with values in [-8, 7]; numpy (host) or jax.

  Returns:
    int8 array (..., ceil(n / 2)): numpy for numpy input, else jax.

  Raises:
    ValueError: if concrete values lie outside [-8, 7].
  """
  on_host = not (_is_tracer(q) or isinstance(q, jax.Array))
  xp = np if on_host else jnp
  if on_host:
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.integer):
      raise TypeError(f"pack_int4 needs integers; got dtype {q.dtype}")
  elif not jnp.issubdtype(q.dtype, jnp.integer):
    raise TypeError(f"pack_int4 needs integers; got dtype {q.dtype}")
  if not _is_tracer(q) and q.size:
    lo_v, hi_v = int(q.min()), int(q.max())
    if lo_v < INT4_MIN or hi_v > INT4_MAX:
      raise ValueError(f"pack_int4: values must lie in [{INT4_MIN}, {INT4_MAX}]; "
                       f"got range [{lo_v}, {hi_v}]")
  if q.ndim == 0:
    raise ValueError("pack_int4 needs at least one axis")
  q = q.astype(xp.int32)
  if q.shape[-1] % 2:
    q = xp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
  byte = (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)  # in [0, 255]
  if on_host:
    return byte.astype(np.uint8).view(np.int8)
  return lax.bitcast_convert_type(byte.astype(jnp.uint8), jnp.int8)


def unpack_int4(packed, last_dim):
  """Unpacks `pack_int4` bytes to int8 values in [-8, 7], with shifts only.

  Args:
    packed: int8 array (..., ceil(last_dim / 2)).
    last_dim: the unpacked length n of the last axis (static).

  Returns:
    int8 jax array (..., last_dim).
  """
  packed = jnp.asarray(packed)
  if packed.dtype == jnp.uint8:
    packed = lax.bitcast_convert_type(packed, jnp.int8)
  if packed.dtype != jnp.int8:
    raise TypeError(f"unpack_int4 needs int8 bytes; got dtype {packed.dtype}")
  last_dim = int(last_dim)
  if packed.ndim == 0 or packed.shape[-1] != (last_dim + 1) // 2:
    raise ValueError(f"unpack_int4: {last_dim} values need {(last_dim + 1) // 2} bytes on the "
                     f"last axis; got shape {packed.shape}")
  four = jnp.int8(4)
  low = lax.shift_right_arithmetic(lax.shift_left(packed, four), four)  # sign-extends
  high = lax.shift_right_arithmetic(packed, four)
  out = jnp.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
  return out[..., :last_dim]


def isqrt(n):
  """Exact floor(sqrt(n)) of non-negative integers, bitwise digit by digit.

  Sixteen unrolled steps of the restoring square root on uint32; integer ops only.

  Args:
    n: integer array; int8/16/32 values must be >= 0 (concrete negatives raise;
      traced ones give an unspecified result), uint32 covers up to 2^32 - 1.

  Returns:
    int32 array of n's shape (values <= 65535).
  """
  n = _int_array(n, "n")
  if not _is_tracer(n) and jnp.issubdtype(n.dtype, jnp.signedinteger) and n.size:
    if int(jnp.min(n)) < 0:
      raise ValueError("isqrt needs non-negative values")
  if n.dtype == jnp.int32:
    rem = lax.bitcast_convert_type(n, jnp.uint32)
  else:
    rem = n.astype(jnp.uint32)
  root = jnp.zeros_like(rem)
  for k in range(15, -1, -1):
    bit = jnp.uint32(1 << (2 * k))
    trial = root + bit  # root < 2^(17+k) and its low 2k bits are zero: no overflow
    take = rem >= trial
    rem = jnp.where(take, rem - trial, rem)
    root = jnp.where(take, (root >> 1) + bit, root >> 1)
  return root.astype(jnp.int32)


def _operand_range(bits, signed):
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
    raise ValueError(f"bit-widths must be ints in [1, 32]; got {bits!r}")
  bits = int(bits)
  if signed:
    return -2**(bits - 1), 2**(bits - 1) - 1
  return 0, 2**bits - 1


def _product_range(w_bits, a_bits, a_signed):
  """[min, max] of one product w * a."""
  products = [wv * av for wv in _operand_range(w_bits, True)
              for av in _operand_range(a_bits, a_signed)]
  return min(products), max(products)


def accumulator_range(fan_in, w_bits, a_bits, a_signed, bias_bound=0):
  """Exact worst-case [min, max] of sum_k w_k a_k (+ a bias with |bias| <= bias_bound).

  Weights are signed `w_bits` integers, activations signed or unsigned `a_bits`
  integers; both range ends are attained (all weights and activations at one
  corner of their ranges), so the range is tight.

  Args:
    fan_in: number of products (KH * KW * Cin, or n for a dense layer).
    w_bits, a_bits: bit-widths; a_signed: whether activations are signed.
    bias_bound: bound on |bias| added afterwards.

  Returns:
    (lo, hi) python ints.
  """
  fan_in = int(fan_in)
  if fan_in < 1:
    raise ValueError(f"fan_in must be positive; got {fan_in}")
  pmin, pmax = _product_range(w_bits, a_bits, a_signed)
  bias_bound = abs(int(bias_bound))
  return fan_in * pmin - bias_bound, fan_in * pmax + bias_bound


def accumulator_bits(fan_in, w_bits, a_bits, a_signed, bias_bound=0):
  """Bits of a signed accumulator that holds every worst-case conv/dense sum.

  Args:
    fan_in, w_bits, a_bits, a_signed, bias_bound: as in `accumulator_range`.

  Returns:
    the smallest b with [lo, hi] inside [-2^(b-1), 2^(b-1) - 1] (python int).
  """
  lo, hi = accumulator_range(fan_in, w_bits, a_bits, a_signed, bias_bound)
  return max(max(-lo - 1, 0).bit_length(), max(hi, 0).bit_length()) + 1


def check_accumulator_fits(fan_in, w_bits, a_bits, a_signed, bias_bound=0, what="layer"):
  """Raises unless the layer's worst-case accumulator fits int32 for any weights.

  A shape-only bound: an integer program is checked from its actual weights by
  `grassq.quant.program.value_bounds` instead (tighter: it accepts large fan-ins whose
  weights are small).

  Args:
    fan_in, w_bits, a_bits, a_signed, bias_bound: as in `accumulator_range`.
    what: the layer's name, used in the message.

  Returns:
    the accumulator bits (`accumulator_bits`), at most 32.

  Raises:
    ValueError: naming `what`, when the worst case exceeds int32.
  """
  bits = accumulator_bits(fan_in, w_bits, a_bits, a_signed, bias_bound)
  if bits > 32:
    lo, hi = accumulator_range(fan_in, w_bits, a_bits, a_signed, bias_bound)
    pmin, pmax = _product_range(w_bits, a_bits, a_signed)
    bias_bound = abs(int(bias_bound))
    limits = [(_INT32_MAX - bias_bound) // pmax if pmax > 0 else None,
              (-_INT32_MIN - bias_bound) // -pmin if pmin < 0 else None]
    max_fan_in = min(v for v in limits if v is not None)
    sign = "signed" if a_signed else "unsigned"
    raise ValueError(
        f"{what}: worst-case accumulator range [{lo}, {hi}] needs {bits} bits and overflows "
        f"int32 (fan_in={fan_in}, W{w_bits} x {sign} A{a_bits}, |bias| <= {bias_bound}); "
        f"the largest fan_in that fits is {max(max_fan_in, 0)}")
  return bits


# ----------------------------------------------------------------------------- integer-only check


def jaxpr_dtypes(jaxpr):
  """Every dtype in a (closed) jaxpr: variables, constants, dtype parameters and nested jaxprs
  (jit, custom_jvp, loops, conds) found anywhere in an equation's parameters."""
  from jax.extend import core as jex

  if isinstance(jaxpr, jex.ClosedJaxpr):
    for c in jaxpr.consts:
      yield np.asarray(c).dtype
    jaxpr = jaxpr.jaxpr
  for v in list(jaxpr.invars) + list(jaxpr.constvars) + list(jaxpr.outvars):
    yield v.aval.dtype
  for eqn in jaxpr.eqns:
    for v in list(eqn.invars) + list(eqn.outvars):
      yield v.aval.dtype
    stack = list(eqn.params.values())
    while stack:
      p = stack.pop()
      if isinstance(p, (jex.Jaxpr, jex.ClosedJaxpr)):
        yield from jaxpr_dtypes(p)
      elif isinstance(p, (list, tuple)):
        stack.extend(p)
      elif isinstance(p, dict):
        stack.extend(p.values())
      elif isinstance(p, np.dtype):
        yield p


def floating_dtypes(fn, *args) -> set:
  """The floating-point dtypes anywhere in ``jit(fn)(*args)``'s jaxpr (empty: integer-only)."""
  jaxpr = jax.make_jaxpr(jax.jit(fn))(*args)
  return {d for d in jaxpr_dtypes(jaxpr) if jnp.issubdtype(d, jnp.inexact)}
