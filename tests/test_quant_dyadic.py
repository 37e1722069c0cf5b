"""Tests for grassq.quant.dyadic: dyadic scales and exact integer requantization."""

from fractions import Fraction
import functools
import math

import hypothesis
from hypothesis import strategies as st
import jax

from grassq.quant import intops
import jax.numpy as jnp
import numpy as np
import pytest

from grassq import quant
from grassq.quant import dyadic, requantize, requantize_reference

SETTINGS = hypothesis.settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**32 - 1)

I32_MIN, I32_MAX = -2**31, 2**31 - 1
N = 512  # one batch shape, so each static combination compiles once

# (bits, signed, saturate) combinations exercised under jit.
COMBOS = [(8, False, True), (8, True, True), (4, True, True), (4, False, True), (16, True, True),
          (2, True, True), (32, True, True), (32, True, False)]
combos = st.sampled_from(COMBOS)

jit_requantize = jax.jit(requantize, static_argnames=("bits", "signed", "saturate"))


def exact_rule(acc, m, c):
  """floor(acc * m / 2^c + 1/2) in rational arithmetic: the rule, written independently."""
  return math.floor(Fraction(acc * m, 2**c) + Fraction(1, 2))


def check(acc, m, c, bits, signed, saturate):
  got = np.asarray(jit_requantize(acc, m, c, bits=bits, signed=signed, saturate=saturate))
  want = requantize_reference(acc, m, c, bits, signed, saturate)
  assert got.dtype == np.int32
  bad = np.flatnonzero(got.ravel() != want.ravel())
  if bad.size:
    a, mm, cc = (np.broadcast_to(x, got.shape).ravel() for x in (acc, m, c))
    i = bad[0]
    pytest.fail(f"{bad.size} mismatches, e.g. acc={a[i]} m={mm[i]} shift={cc[i]}: "
                f"got {got.ravel()[i]}, want {want.ravel()[i]}")


def random_inputs(seed, n=N):
  """Random accumulators (full range, small, extremes), multipliers in [2^30, 2^31-1], shifts."""
  rng = np.random.default_rng(seed)
  acc = rng.integers(I32_MIN, I32_MAX, n, endpoint=True)
  small = rng.integers(-2**12, 2**12, n)
  acc = np.where(rng.random(n) < 0.3, small, acc)
  acc = np.where(rng.random(n) < 0.05, rng.choice([I32_MIN, I32_MAX, -1, 0, 1], n), acc)
  m = rng.integers(2**30, 2**31 - 1, n, endpoint=True)
  m = np.where(rng.random(n) < 0.1, rng.choice([2**30, 2**31 - 1], n), m)
  c = rng.integers(1, 62, n, endpoint=True)
  return acc.astype(np.int32), m.astype(np.int32), c.astype(np.int32)


def test_x64_is_off():
  assert jax.config.jax_enable_x64 is False
  assert jnp.asarray(np.int64(1)).dtype == jnp.int32


def test_reference_matches_rational_rule_and_hand_values():
  acc, m, c = random_inputs(1, 200)
  ref = requantize_reference(acc, m, c, 32, True, saturate=False)
  for a, mm, cc, r in zip(acc, m, c, ref):
    want = min(max(exact_rule(int(a), int(mm), int(cc)), I32_MIN), I32_MAX)
    assert r == want
  # Ties round up (towards +inf), also for negative values.
  assert requantize_reference(3, 2**30, 31, 8, True) == 2   # 1.5 -> 2
  assert requantize_reference(-3, 2**30, 31, 8, True) == -1  # -1.5 -> -1
  assert requantize_reference(-1, 2**30, 31, 8, True) == 0   # -0.5 -> 0
  assert requantize_reference(1000, 2**30, 31, 8, True) == 127  # saturates
  assert requantize_reference(-1000, 2**30, 31, 8, False) == 0


@SETTINGS
@hypothesis.given(seed=seeds, combo=combos)
def test_requantize_is_bit_exact_on_random_inputs(seed, combo):
  acc, m, c = random_inputs(seed)
  check(acc, m, c, *combo)


@SETTINGS
@hypothesis.given(seed=seeds, combo=combos)
def test_requantize_is_bit_exact_with_any_int32_multiplier(seed, combo):
  # Beyond the dyadic range: negative multipliers, -2^31 included, are exact too.
  acc, _, c = random_inputs(seed)
  rng = np.random.default_rng(seed + 1)
  m = rng.integers(I32_MIN, I32_MAX, N, endpoint=True)
  m = np.where(rng.random(N) < 0.1, rng.choice([I32_MIN, I32_MAX, 0, -1, 1], N), m)
  check(acc, m.astype(np.int32), c, *combo)


@pytest.mark.parametrize("combo", [(32, True, False), (8, True, True), (8, False, True)])
def test_every_shift_with_extreme_accumulators_and_multipliers(combo):
  shifts = np.arange(1, 63)
  accs = np.array([I32_MIN, I32_MIN + 1, I32_MAX, -1, 0, 1, -12345, 67890])
  mults = np.array([2**30, 2**30 + 1, 2**31 - 1])
  c, a, m = (x.ravel().astype(np.int32) for x in np.meshgrid(shifts, accs, mults, indexing="ij"))
  pad = N - c.size % N
  check(*(np.concatenate([x, x[:pad]]).reshape(-1, N) for x in (a, m, c)), *combo)


def tie_inputs(seed, n=N):
  """acc * m = odd * 2^(c-1): exact ties of the rounding, every shift 1..62 reachable."""
  rng = np.random.default_rng(seed)
  acc, m, c = [], [], []
  for _ in range(n):
    cc = int(rng.integers(1, 63))
    t = int(rng.integers(max(0, cc - 32), min(cc - 1, 30), endpoint=True))  # m = 2^t * odd
    u = int(rng.integers(2**(30 - t), 2**(31 - t) - 1, endpoint=True)) | 1 if t < 30 else 1
    e = cc - 1 - t  # acc = 2^e * odd, |acc| <= 2^31
    v = int(rng.integers(-2**(31 - e), 2**(31 - e), endpoint=False)) | 1 if e < 31 else -1
    acc.append(v << e)
    m.append(u << t)
    c.append(cc)
  return (np.asarray(x, np.int64) for x in (acc, m, c))


@SETTINGS
@hypothesis.given(seed=seeds, combo=combos)
def test_requantize_is_bit_exact_on_ties(seed, combo):
  acc, m, c = tie_inputs(seed)
  for a, mm, cc in zip(acc, m, c):
    assert I32_MIN <= a <= I32_MAX and 2**30 <= mm <= 2**31 - 1
    prod = int(a) * int(mm)
    assert prod % 2**int(cc) == 2**(int(cc) - 1)  # really a tie
  check(acc.astype(np.int32), m.astype(np.int32), c.astype(np.int32), *combo)


def test_unsaturated_overflow_clamps_to_int32_instead_of_wrapping():
  acc = np.array([I32_MAX, I32_MIN, I32_MIN, I32_MAX, 3], np.int32)
  m = np.array([2**31 - 1, 2**31 - 1, I32_MIN, 2**30, 2**30], np.int32)
  c = np.array([1, 1, 1, 31, 1], np.int32)
  got = np.asarray(requantize(acc, m, c, 32, True, saturate=False))
  np.testing.assert_array_equal(got, [I32_MAX, I32_MIN, I32_MAX, 2**30, 3 * 2**29])
  # The exact results really are out of range (so this is a clamp, not luck).
  assert (I32_MAX * (2**31 - 1) + 1) >> 1 > I32_MAX


def test_per_channel_broadcast_and_vmap():
  rng = np.random.default_rng(3)
  acc = rng.integers(-2**20, 2**20, (6, 5, 4)).astype(np.int32)
  m, c = dyadic(rng.uniform(1e-4, 1e-2, 4))
  want = requantize_reference(acc, m, c, 8, False)
  np.testing.assert_array_equal(requantize(acc, m, c, 8, False), want)
  f = jax.vmap(lambda a: requantize(a, m, c, 8, False))
  np.testing.assert_array_equal(jax.jit(f)(acc), want)
  # vmap over per-example shifts too.
  cs = np.broadcast_to(c, acc.shape).astype(np.int32)
  g = jax.vmap(functools.partial(requantize, bits=8, signed=False), in_axes=(0, None, 0))
  np.testing.assert_array_equal(g(acc, m, cs), want)


def test_requantize_with_dyadic_scale_approximates_real_product():
  rng = np.random.default_rng(4)
  scales = 10.0**rng.uniform(-6, 2, 64)
  m, c = dyadic(scales)
  acc = rng.integers(-2**24, 2**24, (8, 64)).astype(np.int32)
  q = np.asarray(requantize(acc, m, c, 32, True, saturate=False)).astype(np.float64)
  np.testing.assert_array_less(np.abs(q - acc * scales), 0.5 + np.abs(acc) * scales * 2.0**-31 + 1e-6)


def _float_dtypes(fn, *args):
  return intops.floating_dtypes(fn, *args)


def test_jaxpr_walker_finds_nested_float_ops():
  a = jnp.zeros((3,), jnp.int32)
  nested = jax.jit(lambda x: (x.astype(jnp.float32) * 0.5).astype(jnp.int32))
  assert _float_dtypes(lambda x: nested(x) + 1, a)
  assert not _float_dtypes(lambda x: jax.jit(lambda y: y * 3)(x), a)


@pytest.mark.parametrize("combo", [(8, False, True), (4, True, True), (32, True, False)])
def test_requantize_jaxpr_has_no_floating_point(combo):
  bits, signed, saturate = combo
  acc, m, c = (jnp.zeros((2, 4), jnp.int32), jnp.zeros((4,), jnp.int32), jnp.ones((4,), jnp.int32))
  f = jax.jit(lambda a, mm, cc: requantize(a, mm, cc, bits, signed, saturate))
  jaxpr = jax.make_jaxpr(f)(acc, m, c)
  assert any(e.primitive.name in ("pjit", "jit") for e in jaxpr.jaxpr.eqns)  # nested jaxprs walked
  assert not _float_dtypes(f, acc, m, c)
  assert not _float_dtypes(jax.vmap(f, in_axes=(0, None, None)), acc[None], m, c)


@pytest.mark.parametrize(
    "bits,signed", [(1, True), (17, True), (64, True), (8.0, True), (32, False), (0, False)])
def test_requantize_refuses_unsupported_bits(bits, signed):
  with pytest.raises(ValueError, match="bits"):
    requantize(np.int32(1), 2**30, 31, bits, signed)


@pytest.mark.parametrize("shift", [0, 63, -1, 100])
def test_requantize_refuses_shifts_outside_range(shift):
  with pytest.raises(ValueError, match="shift"):
    requantize(np.array([1, 2], np.int32), 2**30, np.array([31, shift]), 8, True)
  with pytest.raises(ValueError, match="shift"):
    requantize_reference(1, 2**30, shift, 8, True)


def test_requantize_refuses_float_and_out_of_range_inputs():
  with pytest.raises(TypeError):
    requantize(jnp.ones(3), 2**30, 31, 8, True)
  with pytest.raises(ValueError, match="int32"):
    requantize(np.array([2**31]), 2**30, 31, 8, True)


# --- Why not gemmlowp: it rounds twice. -----------------------------------------------------


def gemmlowp_requantize(acc, m, c):
  """gemmlowp/TFLite: SaturatingRoundingDoublingHighMul then RoundingDivideByPOT (c >= 31)."""
  if acc == m == I32_MIN:
    high = I32_MAX
  else:
    ab = acc * m
    num = ab + ((1 << 30) if ab >= 0 else 1 - (1 << 30))
    high = abs(num) // 2**31 * (1 if num >= 0 else -1)  # C division truncates towards zero
  exponent = c - 31
  mask = (1 << exponent) - 1
  remainder = high & mask
  threshold = (mask >> 1) + (1 if high < 0 else 0)
  return (high >> exponent) + (1 if remainder > threshold else 0)


def test_gemmlowp_double_rounding_differs_by_one_lsb():
  # The textbook case: 1 * 2^30 / 2^32 = 0.25 is rounded to 0.5 by the high multiply,
  # and then to 1 by the rounding shift; the one rule gives 0.
  assert gemmlowp_requantize(1, 2**30, 32) == 1
  assert requantize_reference(1, 2**30, 32, 32, True, saturate=False) == 0
  assert int(requantize(np.int32(1), 2**30, 32, 32, True, saturate=False)) == 0
  # A search over random positive inputs (positive, so the tie direction of negative
  # values, half-away-from-zero in gemmlowp, plays no part) finds more.
  rng = np.random.default_rng(5)
  acc, m, c = random_inputs(6, 4000)
  acc = np.minimum(np.abs(acc.astype(np.int64)), I32_MAX)
  c = rng.integers(32, 62, acc.size, endpoint=True)
  ours = requantize_reference(acc, m, c, 32, True, saturate=False).astype(np.int64)
  theirs = np.array([gemmlowp_requantize(int(a), int(mm), int(cc)) for a, mm, cc in zip(acc, m, c)])
  diff = theirs - ours
  assert np.all(np.abs(diff) <= 1)
  found = np.flatnonzero(diff)
  assert found.size > 0
  i = found[0]
  assert acc[i] > 0 and exact_rule(int(acc[i]), int(m[i]), int(c[i])) == ours[i]


# --- dyadic -------------------------------------------------------------------------------


def check_dyadic(r):
  m, c = dyadic(r)
  assert m.dtype == np.int32 and c.dtype == np.int32 and m.shape == np.shape(r)
  for rr, mm, cc in zip(np.ravel(r), np.ravel(m), np.ravel(c)):
    mm, cc = int(mm), int(cc)
    assert 2**30 <= mm <= 2**31 - 1 and 1 <= cc <= 62
    exact = Fraction(float(rr))
    assert abs(Fraction(mm, 2**cc) - exact) <= exact / 2**31
    _, e = math.frexp(float(rr))
    assert cc in (31 - e, 31 - e - 1)


EDGE = (2**31 - 0.5) / 2**31  # mantissas from here on round to 2^31


def representable(r):
  """Scales whose shift 31 - e (minus 1 in the edge case) lies in [1, 62]."""
  return math.ldexp(EDGE, -32) <= r < math.ldexp(EDGE, 30)


@SETTINGS
@hypothesis.given(r=st.floats(1e-12, 1e6) | st.floats(-12, 6).map(lambda x: 10.0**x))
def test_dyadic_multiplier_range_and_error(r):
  if representable(r):
    check_dyadic(r)
  else:
    with pytest.raises(ValueError, match="shift"):
      dyadic(r)


@SETTINGS
@hypothesis.given(seed=seeds)
def test_dyadic_per_channel(seed):
  r = 10.0**np.random.default_rng(seed).uniform(-9, 8, (3, 7))
  check_dyadic(r)


@pytest.mark.parametrize("e", [-30, -5, 0, 1, 29])
def test_dyadic_frexp_edge_case(e):
  # mantissa * 2^31 = 2^31 - 0.5 (and - 0.25) rounds to 2^31: halve m, shift - 1.
  for frac in (0.5, 0.25):
    r = math.ldexp((2**31 - frac) / 2**31, e)
    m, c = dyadic(r)
    assert (int(m), int(c)) == (2**30, 31 - e - 1)
    check_dyadic(r)
  m, c = dyadic(math.ldexp((2**31 - 0.75) / 2**31, e))  # just below: no edge case
  assert (int(m), int(c)) == (2**31 - 1, 31 - e)


def test_dyadic_shift_boundaries():
  assert tuple(map(int, dyadic(2.0**-32))) == (2**30, 62)
  assert int(dyadic(math.ldexp(EDGE, -32))[1]) == 62  # shift 63, then the edge case
  assert int(dyadic(np.nextafter(math.ldexp(EDGE, 30), 0))[1]) == 1
  too_small = (np.nextafter(math.ldexp(EDGE, -32), 0), 2.0**-32 * 0.99, 1e-12)
  too_large = (math.ldexp(EDGE, 30), 2.0**30, 2e9)
  for r in too_small + too_large:
    with pytest.raises(ValueError, match=r"\[1, 62\]"):
      dyadic(r)
  with pytest.raises(ValueError, match="1e-12"):
    dyadic(np.array([0.5, 1e-12]))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), -float("inf")])
def test_dyadic_refuses_non_positive_or_non_finite(bad):
  with pytest.raises(ValueError, match="positive finite"):
    dyadic(bad)
  with pytest.raises(ValueError, match="positive finite"):
    dyadic(np.array([0.1, bad]))


def test_dyadic_refuses_tracers_and_non_numbers():
  with pytest.raises(TypeError, match="traced"):
    jax.jit(dyadic)(0.5)
  with pytest.raises(TypeError):
    dyadic("half")


def test_package_exports():
  for name in ("dyadic", "requantize", "SUPPORTED_BITS", "quantize_weight", "fake_quant"):
    assert name in quant.__all__ and hasattr(quant, name)
