"""Tests for grassq.quant.intops: integer conv/dense/pooling, int4 packing, isqrt, accumulators.

Every result is compared with an independent numpy int64 reference (windows from
`sliding_window_view` and `einsum`, not im2col), on fresh random inputs with the
extreme values of each dtype mixed in.
"""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
import pytest

from grassq.quant import intops

SETTINGS = hypothesis.settings(max_examples=12, deadline=None)
CONV_SETTINGS = hypothesis.settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**32 - 1)
I32_MIN, I32_MAX = -2**31, 2**31 - 1


def random_ints(rng, shape, dtype):
  """Uniform values of `dtype` with ~10% of its extremes (and 0) mixed in."""
  info = np.iinfo(dtype)
  lo, hi = (info.min, info.max) if info.bits < 32 else (-300, 300)
  a = rng.integers(lo, hi, shape, endpoint=True)
  a = np.where(rng.random(shape) < 0.1, rng.choice([lo, hi, 0], shape), a)
  return a.astype(dtype)


def conv_reference(x, w, strides, padding):
  """NHWC x HWIO convolution in int64 from explicit windows."""
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::strides[0], ::strides[1]]
  return np.einsum("bhwcij,ijco->bhwo", win, w.astype(np.int64))


def window_reference(x, window, strides, padding, fill, reduce):
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
  win = sliding_window_view(xp, window, axis=(1, 2))[:, ::strides[0], ::strides[1]]
  return reduce(win, axis=(-2, -1))


def assert_equal_int(got, want, dtype=np.int32):
  got = np.asarray(got)
  assert got.dtype == dtype, got.dtype
  assert got.shape == want.shape, (got.shape, want.shape)
  bad = np.argwhere(got.astype(np.int64) != want)
  if bad.size:
    i = tuple(bad[0])
    pytest.fail(f"{len(bad)} mismatches, e.g. at {i}: got {got[i]}, want {want[i]}")


def test_x64_is_off():
  assert jax.config.jax_enable_x64 is False
  assert jnp.asarray(np.int64(1)).dtype == jnp.int32


conv_jit = jax.jit(intops.conv2d_int, static_argnames=("strides", "padding"))


@CONV_SETTINGS
@hypothesis.given(seed=seeds, k=st.sampled_from([1, 3, 7]),
                  strides=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2])),
                  dtype=st.sampled_from([np.int8, np.uint8, np.int32]))
def test_conv2d_int_matches_int64_reference(seed, k, strides, dtype):
  rng = np.random.default_rng(seed)
  pads = tuple(tuple(int(p) for p in rng.integers(0, k, 2)) for _ in range(2))
  hw = [int(rng.integers(max(1, k - sum(p)), k + 7)) for p in pads]
  b, cin, cout = int(rng.integers(1, 3)), int(rng.integers(1, 9)), int(rng.integers(1, 6))
  x = random_ints(rng, (b, *hw, cin), dtype)
  w = random_ints(rng, (k, k, cin, cout), np.int8)
  got = conv_jit(x, w, strides=strides, padding=pads)
  assert_equal_int(got, conv_reference(x, w, strides, pads))


def test_conv2d_int_extremes_and_string_padding():
  rng = np.random.default_rng(0)
  for xv, wv in [(-128, -128), (127, -128), (-128, 127)]:
    x = np.full((1, 5, 5, 16), xv, np.int8)
    w = np.full((3, 3, 16, 4), wv, np.int8)
    assert_equal_int(conv_jit(x, w, padding=((1, 1), (1, 1))),
                     conv_reference(x, w, (1, 1), ((1, 1), (1, 1))))
  x = np.full((1, 5, 5, 16), 255, np.uint8)
  w = random_ints(rng, (3, 3, 16, 4), np.int8)
  w[..., 0] = -128
  assert_equal_int(conv_jit(x, w, strides=(2, 2), padding="SAME"),
                   conv_reference(x, w, (2, 2), ((1, 1), (1, 1))))
  assert_equal_int(conv_jit(x, w, padding="VALID"), conv_reference(x, w, (1, 1), ((0, 0),) * 2))


def test_conv2d_int_keeps_int8_operands_in_the_dot():
  # K = 3*3*8 = 72: long enough for the int8 dot on every platform (shorter ones: below)
  x = jnp.zeros((1, 6, 6, 8), jnp.uint8)
  w = jnp.zeros((3, 3, 8, 8), jnp.int8)
  jaxpr = jax.make_jaxpr(lambda a, b: intops.conv2d_int(a, b, padding=1))(x, w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1
  assert [v.aval.dtype for v in dots[0].invars] == [jnp.int8, jnp.int8]
  assert dots[0].outvars[0].aval.dtype == jnp.int32
  assert not any(e.primitive.name.startswith("conv_general") for e in jaxpr.jaxpr.eqns)


def test_conv2d_int_refuses_channel_mismatch():
  with pytest.raises(ValueError, match="input channels"):
    intops.conv2d_int(np.zeros((1, 4, 4, 3), np.int8), np.zeros((3, 3, 4, 8), np.int8))
  with pytest.raises(TypeError):
    intops.conv2d_int(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 8), np.int8))


@SETTINGS
@hypothesis.given(seed=seeds, dtype=st.sampled_from([np.int8, np.uint8, np.int32]))
def test_dense_int_matches_int64_reference(seed, dtype):
  rng = np.random.default_rng(seed)
  x = random_ints(rng, (int(rng.integers(1, 5)), 37), dtype)
  w = random_ints(rng, (37, 11), np.int8)
  assert_equal_int(jax.jit(intops.dense_int)(x, w), x.astype(np.int64) @ w.astype(np.int64))


def test_add_bias_and_add_clamp():
  rng = np.random.default_rng(1)
  acc = rng.integers(-2**30, 2**30, (2, 3, 3, 5)).astype(np.int32)
  bias = rng.integers(-2**20, 2**20, 5).astype(np.int32)
  assert_equal_int(jax.jit(intops.add_bias)(acc, bias), acc.astype(np.int64) + bias)
  with pytest.raises(ValueError, match="bias"):
    intops.add_bias(acc, bias[:4])
  a = rng.integers(-2**17, 2**17, (4, 50)).astype(np.int32)
  b = rng.integers(-2**17, 2**17, (4, 50)).astype(np.int32)
  got = jax.jit(intops.add_clamp, static_argnums=(2, 3))(a, b, -2**15, 2**15 - 1)
  want = np.clip(a.astype(np.int64) + b, -2**15, 2**15 - 1)
  assert_equal_int(got, want)
  assert (want == 2**15 - 1).any() and (want == -2**15).any()


@SETTINGS
@hypothesis.given(seed=seeds, dtype=st.sampled_from([np.int8, np.uint8, np.int32]))
def test_max_pool_int_matches_reference(seed, dtype):
  rng = np.random.default_rng(seed)
  x = random_ints(rng, (2, 9, 8, 3), dtype)
  x[0, 0, 0, 0] = np.iinfo(dtype).min  # a corner where only padding competes
  pool = jax.jit(intops.max_pool_int, static_argnames=("window", "strides", "padding"))
  got = pool(x, window=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # ResNet stem
  want = window_reference(x, (3, 3), (2, 2), ((1, 1), (1, 1)), np.iinfo(dtype).min, np.max)
  assert_equal_int(got, want, dtype)


@SETTINGS
@hypothesis.given(seed=seeds, dtype=st.sampled_from([np.uint8, np.int8, np.int32]),
                  include_pad=st.booleans())
def test_avg_pool_int_floors(seed, dtype, include_pad):
  rng = np.random.default_rng(seed)
  x = random_ints(rng, (2, 7, 6, 3), dtype)
  pads = ((0, 1), (1, 0))
  pool = jax.jit(intops.avg_pool_int,
                 static_argnames=("window", "strides", "padding", "count_include_pad"))
  got = pool(x, window=2, strides=2, padding=pads, count_include_pad=include_pad)
  sums = window_reference(x, (2, 2), (2, 2), pads, 0, np.sum)
  ones = np.ones((1, 7, 6, 1), np.int64)
  count = 4 if include_pad else window_reference(ones, (2, 2), (2, 2), pads, 0, np.sum)
  want = sums // count  # numpy // floors, also for negative sums
  assert_equal_int(got, want)
  if dtype != np.uint8:
    assert ((sums % count != 0) & (sums < 0)).any()  # negative non-integral means were exercised


@SETTINGS
@hypothesis.given(seed=seeds, dtype=st.sampled_from([np.uint8, np.uint16, np.int32]),
                  hw=st.sampled_from([(7, 7), (1, 1), (3, 5)]))
def test_global_avg_pool_int_floors(seed, dtype, hw):
  rng = np.random.default_rng(seed)
  hi = 2**16 - 1 if dtype == np.int32 else np.iinfo(dtype).max
  x = rng.integers(0, hi, (3, *hw, 6), endpoint=True).astype(dtype)
  x[0, ..., 0] = hi  # the overflow bound's worst case
  got = jax.jit(intops.global_avg_pool_int)(x)
  s = x.astype(np.int64).sum(axis=(1, 2))
  assert_equal_int(got, s // (hw[0] * hw[1]))
  assert int(np.asarray(got)[0, 0]) == hi


def test_global_avg_pool_int_floor_by_hand_and_overflow_guard():
  x = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0], np.uint8).reshape(1, 3, 3, 1)
  assert int(intops.global_avg_pool_int(x)[0, 0]) == 0  # 2/9 floors to 0
  x = np.full((1, 3, 3, 1), -1, np.int8)
  assert int(intops.global_avg_pool_int(x + np.int8(0))[0, 0]) == -1
  x[0, 0, 0, 0] = 0  # -8/9 floors to -1, not 0
  assert int(intops.global_avg_pool_int(x)[0, 0]) == -1
  with pytest.raises(ValueError, match="overflow"):
    intops.global_avg_pool_int(jnp.zeros((1, 256, 256, 1), jnp.uint16))


def test_pack_unpack_int4_all_values():
  q = np.arange(-8, 8, dtype=np.int8)
  packed = intops.pack_int4(q)
  assert isinstance(packed, np.ndarray) and packed.dtype == np.int8 and packed.shape == (8,)
  # Low nibble = even index, high nibble = odd index.
  assert [int(p) & 0xF for p in packed.view(np.uint8)] == [int(v) & 0xF for v in q[0::2]]
  assert [int(p) >> 4 for p in packed.view(np.uint8)] == [int(v) & 0xF for v in q[1::2]]
  assert_equal_int(jax.jit(intops.unpack_int4, static_argnums=1)(packed, 16), q, np.int8)
  # Every (low, high) pair, i.e. all 256 byte values.
  pairs = np.stack(np.meshgrid(q, q, indexing="ij"), -1).reshape(256, 2)
  bytes_ = intops.pack_int4(pairs)
  assert sorted(bytes_.view(np.uint8).ravel().tolist()) == list(range(256))
  assert_equal_int(intops.unpack_int4(bytes_, 2), pairs, np.int8)
  assert_equal_int(intops.unpack_int4(bytes_.view(np.uint8), 2), pairs, np.int8)


@SETTINGS
@hypothesis.given(seed=seeds, n=st.integers(1, 9))
def test_pack_unpack_int4_round_trip(seed, n):
  rng = np.random.default_rng(seed)
  q = rng.integers(-8, 8, (3, 2, n)).astype(np.int8)
  packed = intops.pack_int4(q)
  assert packed.shape == (3, 2, (n + 1) // 2)
  assert_equal_int(np.asarray(jax.jit(intops.pack_int4)(jnp.asarray(q))), packed, np.int8)
  assert_equal_int(intops.unpack_int4(packed, n), q, np.int8)
  assert_equal_int(intops.unpack_int4(jnp.asarray(packed), n), q, np.int8)
  if n % 2:
    assert (packed[..., -1].view(np.uint8) >> 4 == 0).all()  # padded with zero


def test_pack_int4_refuses_out_of_range():
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    intops.pack_int4(np.array([0, 8]))
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    intops.pack_int4(jnp.array([-9, 0]))
  with pytest.raises(ValueError, match="bytes"):
    intops.unpack_int4(np.zeros((4,), np.int8), 9)


def _isqrt_cases(rng, hi):
  r = rng.integers(0, math.isqrt(hi) + 1, 200, dtype=np.int64)
  squares = r * r
  vals = [rng.integers(0, hi, 300, endpoint=True, dtype=np.int64), squares, squares - 1,
          squares + 1, np.array([0, 1, 2, 3, 4, hi - 1, hi, 2**31 - 1, 2**30, 46340**2,
                                 46341**2 - 1])]
  v = np.concatenate(vals)
  return v[(v >= 0) & (v <= hi)]


@pytest.mark.parametrize("dtype,hi", [(np.int32, 2**31 - 1), (np.uint32, 2**32 - 1)])
def test_isqrt_matches_math_isqrt(dtype, hi):
  rng = np.random.default_rng(int(hi % 1000))
  v = _isqrt_cases(rng, hi)
  got = np.asarray(jax.jit(intops.isqrt)(v.astype(dtype)))
  assert got.dtype == np.int32
  want = np.array([math.isqrt(int(t)) for t in v])
  bad = np.flatnonzero(got != want)
  assert not bad.size, f"isqrt({v[bad[0]]}) = {got[bad[0]]}, want {want[bad[0]]}"
  assert_equal_int(intops.isqrt(np.arange(256, dtype=np.uint8)),
                   np.array([math.isqrt(t) for t in range(256)]))
  with pytest.raises(ValueError, match="non-negative"):
    intops.isqrt(np.array([4, -1], np.int32))


def _float_dtypes(fn, *args):
  jaxpr = jax.make_jaxpr(jax.jit(fn))(*args)
  assert jaxpr.jaxpr.eqns[0].primitive.name in ("pjit", "jit")  # the walk has to recurse
  return intops.floating_dtypes(fn, *args)


def test_jaxpr_walker_finds_nested_float_ops():
  a = jnp.zeros((3,), jnp.int32)
  assert _float_dtypes(lambda x: jax.jit(lambda y: (y * 0.5).astype(jnp.int32))(x), a)
  assert _float_dtypes(lambda x: jax.lax.fori_loop(0, 2, lambda i, y: y // 2.0, x * 1.0), a)
  assert not _float_dtypes(lambda x: x * 3, a)


U8 = jnp.zeros((2, 9, 9, 4), jnp.uint8)
S8 = jnp.zeros((2, 9, 9, 4), jnp.int8)
I32 = jnp.zeros((2, 9, 9, 4), jnp.int32)
W8 = jnp.zeros((3, 3, 4, 6), jnp.int8)
INT_OPS = {
    "conv_u8": (lambda x, w: intops.conv2d_int(x, w, (2, 2), ((1, 1), (1, 1))), U8, W8),
    "conv_s8": (lambda x, w: intops.conv2d_int(x, w, 1, "SAME"), S8, W8),
    "conv_i32": (lambda x, w: intops.conv2d_int(x, w), I32, W8),
    "dense_u8": (intops.dense_int, U8.reshape(2, -1), jnp.zeros((324, 5), jnp.int8)),
    "add_bias": (intops.add_bias, I32, jnp.zeros((4,), jnp.int32)),
    "add_clamp": (lambda a, b: intops.add_clamp(a, b, -2**15, 2**15 - 1), I32, I32),
    "max_pool": (lambda x: intops.max_pool_int(x, 3, 2, 1), U8),
    "avg_pool": (lambda x: intops.avg_pool_int(x, 2, 2, ((0, 1), (0, 1)), False), I32),
    "global_avg_pool": (intops.global_avg_pool_int, U8),
    "pack_int4": (intops.pack_int4, S8),
    "unpack_int4": (lambda p: intops.unpack_int4(p, 7), S8),
    "isqrt_u32": (intops.isqrt, jnp.zeros((5,), jnp.uint32)),
    "isqrt_i32": (intops.isqrt, jnp.zeros((5,), jnp.int32)),
}


@pytest.mark.parametrize("name", sorted(INT_OPS))
def test_jaxpr_has_no_floating_point(name):
  fn, *args = INT_OPS[name]
  assert not _float_dtypes(fn, *args)
  out = jax.eval_shape(fn, *args)
  assert jnp.issubdtype(out.dtype, jnp.integer)


def test_accumulator_bits_and_check():
  # 3x3x512 at W8 x unsigned A8: |sum| <= 4608 * 128 * 255 < 2^28.
  assert intops.accumulator_range(4608, 8, 8, False) == (-4608 * 128 * 255, 4608 * 127 * 255)
  assert intops.check_accumulator_fits(3 * 3 * 512, 8, 8, False, what="layer4.conv2") == 29
  assert intops.accumulator_bits(1, 8, 8, True) == 16  # (-128)(-128) = 2^14 needs 16 bits
  assert intops.accumulator_bits(1, 4, 4, False) == 8  # [-8*15, 7*15]
  assert intops.accumulator_bits(1, 4, 1, False) == 4  # [-8, 7]: exactly int4
  assert intops.check_accumulator_fits(2**24, 8, 1, False) == 32  # lo = -2^31 exactly
  with pytest.raises(ValueError):
    intops.check_accumulator_fits(2**24 + 1, 8, 1, False)
  with pytest.raises(ValueError, match="fc_huge.*65793"):
    intops.check_accumulator_fits(70000, 8, 8, False, what="fc_huge")
  with pytest.raises(ValueError, match="conv_bias"):  # the bias bound counts
    intops.check_accumulator_fits(65793, 8, 8, False, bias_bound=200, what="conv_bias")


@pytest.mark.parametrize("a_signed,xv,wv,fits", [
    (True, -128, -128, 2**17 - 1),   # max product 2^14: positive end
    (False, 255, -128, 65793),       # min product -32640: negative end
])
def test_accumulator_bound_is_tight(a_signed, xv, wv, fits):
  dtype = np.int8 if a_signed else np.uint8
  dense = jax.jit(intops.dense_int)
  for fan_in in (fits, fits + 1):
    x = np.full((1, fan_in), xv, dtype)
    w = np.full((fan_in, 1), wv, np.int8)
    want = fan_in * xv * wv
    got = int(dense(x, w)[0, 0])
    if fan_in == fits:
      assert intops.check_accumulator_fits(fan_in, 8, 8, a_signed) == 32
      assert got == want
    else:
      with pytest.raises(ValueError, match="overflows int32"):
        intops.check_accumulator_fits(fan_in, 8, 8, a_signed)
      assert got != want and got == (want + 2**31) % 2**32 - 2**31  # int32 wraps, as warned


def test_accumulator_worst_case_conv_3x3x512():
  x = np.full((1, 3, 3, 512), 255, np.uint8)
  w = np.full((3, 3, 512, 2), -128, np.int8)
  w[..., 1] = 127
  got = np.asarray(conv_jit(x, w))
  lo, hi = intops.accumulator_range(3 * 3 * 512, 8, 8, False)
  assert got.ravel().tolist() == [lo, hi]


def _exported_dots(k, platform):
  """Operand types of the dot_generals in `_matmul_int` (int8 (8, k) x (k, 16)) lowered for
  `platform`, without that platform's hardware (jax.export)."""
  import re

  from jax import export

  x, w = jax.ShapeDtypeStruct((8, k), np.int8), jax.ShapeDtypeStruct((k, 16), np.int8)
  text = export.export(jax.jit(intops._matmul_int), platforms=[platform])(x, w).mlir_module()
  return re.findall(r"dot_general [^:]*: \((tensor<\w+>), (tensor<\w+>)\)", text)


@pytest.mark.parametrize("k", [2, 7, 9, 27, 63])
def test_gpu_short_contractions_avoid_xla_int8_dot(k):
  """XLA's CUDA int8 x int8 -> int32 dot is wrong for short contractions (measured on an H200,
  JAX 0.11.2: K = 2, 3, 5-7, 9-11, 13-15, 33-63 not divisible by 4). On GPUs those go to an int32
  dot; the CPU keeps its fast int8 kernel; long contractions keep it everywhere."""
  assert _exported_dots(k, "cuda") == [(f"tensor<8x{k}xi32>", f"tensor<{k}x16xi32>")]
  assert _exported_dots(k, "rocm") == [(f"tensor<8x{k}xi32>", f"tensor<{k}x16xi32>")]
  assert _exported_dots(k, "cpu") == [(f"tensor<8x{k}xi8>", f"tensor<{k}x16xi8>")]
  assert _exported_dots(64, "cuda") == [("tensor<8x64xi8>", "tensor<64x16xi8>")]
