"""Tests for grassq.quant.quantizers: HAWQV3 weight, activation and bias quantization."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassq import quant as Q

SETTINGS = hypothesis.settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**32 - 1)
bits_st = st.sampled_from(Q.SUPPORTED_BITS)
shapes = st.sampled_from([(5, 3), (3, 3, 4, 6), (16, 1)])


def random_kernel(seed, shape):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape) * 10.0**rng.uniform(-3, 1, shape[-1])  # per-channel magnitudes
  return w.astype(np.float32)


def np_quantize_weight(w, bits):
  """float64 numpy reference, per output channel (last axis)."""
  w = np.asarray(w, np.float64)
  qmax = 2**(bits - 1) - 1
  amax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
  scale = np.where(amax > 0, amax / qmax, 1.0)
  ratio = w / scale
  return np.clip(np.rint(ratio), -qmax - 1, qmax), scale, ratio


@SETTINGS
@hypothesis.given(seed=seeds, bits=bits_st, shape=shapes)
def test_quantize_weight_matches_float64_reference(seed, bits, shape):
  w = random_kernel(seed, shape)
  q, scale = Q.quantize_weight(w, bits)
  q_ref, scale_ref, ratio = np_quantize_weight(w, bits)
  assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (shape[-1],)
  np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
  # float32 vs float64 may only disagree where the exact ratio is within rounding of a tie.
  near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
  np.testing.assert_array_equal(np.where(near_tie, 0, q), np.where(near_tie, 0, q_ref))
  # Round trip within half a step, each channel with its own scale; channel maxima hit qmax.
  err = np.abs(np.asarray(q, np.float64) * np.asarray(scale, np.float64) - w)
  assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-5))
  assert np.all(np.abs(np.asarray(q)).reshape(-1, shape[-1]).max(axis=0) == 2**(bits - 1) - 1)


def test_weight_scale_is_per_channel_on_any_axis_and_guards_zero_channels():
  w = np.zeros((4, 3), np.float32)
  w[:, 0] = [1.0, -3.0, 2.0, 0.5]
  w[2, 2] = -0.07
  np.testing.assert_allclose(Q.weight_scale(w, 8), [3.0 / 127, 1.0, 0.07 / 127], rtol=1e-6)
  np.testing.assert_allclose(Q.weight_scale(w, 4, axis=0), [1.0 / 7, 3.0 / 7, 2.0 / 7, 0.5 / 7], rtol=1e-6)
  q, scale = Q.quantize_weight(w, 4)
  assert np.all(np.asarray(q)[:, 1] == 0) and scale[1] == 1.0
  np.testing.assert_array_equal(np.asarray(q)[:, 0], [2, -7, 5, 1])  # 2.33, 1.17 round; 4.67 -> 5


@SETTINGS
@hypothesis.given(seed=seeds, bits=bits_st)
def test_fake_quant_weight_is_dequantized_weight_with_identity_gradient(seed, bits):
  w = jnp.asarray(random_kernel(seed, (3, 3, 4, 6)))
  q, scale = Q.quantize_weight(w, bits)
  np.testing.assert_allclose(Q.fake_quant_weight(w, bits), q.astype(jnp.float32) * scale, rtol=1e-6)
  cot = jnp.asarray(np.random.default_rng(seed).standard_normal(w.shape), jnp.float32)
  g = jax.grad(lambda v: jnp.sum(Q.fake_quant_weight(v, bits) * cot))(w)
  np.testing.assert_array_equal(g, cot)  # d/dw = 1 everywhere (all weights lie in range)
  np.testing.assert_array_equal(jax.grad(lambda v: Q.fake_quant_weight(v, bits).sum())(w), jnp.ones_like(w))


def test_round_ste():
  x = jnp.array([-1.5, -0.5, 0.5, 1.5, 2.5, 0.4999, 2.6])
  np.testing.assert_array_equal(Q.round_ste(x), [-2.0, -0.0, 0.0, 2.0, 2.0, 0.0, 3.0])  # half to even
  np.testing.assert_array_equal(jax.grad(lambda v: Q.round_ste(v).sum())(x), jnp.ones_like(x))
  np.testing.assert_array_equal(jax.jit(jax.vmap(jax.grad(lambda v: Q.round_ste(v) * 3)))(x), 3.0)


def test_activation_scale_unsigned_vs_signed():
  np.testing.assert_allclose(Q.activation_scale(0.0, 6.0, 8, signed=False), 6.0 / 255, rtol=1e-6)
  np.testing.assert_allclose(Q.activation_scale(-2.0, 6.0, 8, signed=True), 6.0 / 127, rtol=1e-6)
  np.testing.assert_allclose(Q.activation_scale(-8.0, 6.0, 4, signed=True), 8.0 / 7, rtol=1e-6)
  np.testing.assert_allclose(Q.activation_scale(0.0, 6.0, 4, signed=False), 6.0 / 15, rtol=1e-6)
  np.testing.assert_allclose(Q.activation_scale(0.0, 0.0, 8, signed=False), 1.0)
  np.testing.assert_allclose(Q.activation_scale(-9.0, 6.0, 8, signed=False), 6.0 / 255, rtol=1e-6)  # lo ignored
  np.testing.assert_allclose(
      Q.activation_scale(jnp.array([-1.0, -4.0]), jnp.array([2.0, 1.0]), 8, True), [2 / 127, 4 / 127], rtol=1e-6)
  assert Q.qrange(4, False) == (0, 15) and Q.qrange(4, True) == (-8, 7)


@SETTINGS
@hypothesis.given(seed=seeds, bits=bits_st, signed=st.booleans())
def test_fake_quant_values_and_clipped_ste(seed, bits, signed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(64) * 3).astype(np.float32)
  hi = float(np.quantile(np.abs(x), 0.8))
  scale = Q.activation_scale(-hi, hi, bits, signed)
  qmin, qmax = Q.qrange(bits, signed)
  t = x.astype(np.float64) / float(scale)
  want = np.clip(np.rint(t), qmin, qmax) * float(scale)
  got = Q.fake_quant(x, scale, bits, signed)
  near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4
  np.testing.assert_allclose(np.where(near_tie, 0, got), np.where(near_tie, 0, want), rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda v: Q.fake_quant(v, scale, bits, signed).sum())(jnp.asarray(x))
  inside = (t >= qmin) & (t <= qmax)
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(g, inside.astype(np.float32))
  # No gradient flows to the scale (a running statistic).
  assert float(jax.grad(lambda s: Q.fake_quant(x, s, bits, signed).sum())(scale)) == 0.0
  ints = Q.quantize_activation(x, scale, bits, signed)
  assert ints.dtype == (jnp.int8 if signed else jnp.uint8)
  np.testing.assert_allclose(np.where(near_tie, 0, ints * float(scale)), np.where(near_tie, 0, want), rtol=1e-6)


@pytest.mark.parametrize("bits", [1, 9, 16, 32, 0, 8.0, True, "8"])
def test_unsupported_bits_are_refused(bits):
  w = jnp.ones((2, 2))
  for f in (lambda: Q.quantize_weight(w, bits), lambda: Q.fake_quant_weight(w, bits),
            lambda: Q.weight_scale(w, bits), lambda: Q.activation_scale(0.0, 1.0, bits, False),
            lambda: Q.fake_quant(w, 0.1, bits, True)):
    with pytest.raises(ValueError, match=r"supported: \(2, 3, 4, 5, 6, 7, 8\)"):
      f()


def test_quantize_bias_rounds_half_to_even_and_refuses_overflow():
  s_w = np.array([0.25, 0.5, 0.125, 1.0])  # binary fractions: the ties below are exact
  s_in = 0.5
  b = np.array([0.3125, -0.375, 0.21875, 10.0])  # / (s_w * s_in) = 2.5, -1.5, 3.5, 20
  np.testing.assert_array_equal(Q.quantize_bias(b, s_w * s_in), [2, -2, 4, 20])
  assert Q.quantize_bias(b, s_w * s_in).dtype == np.int32
  assert Q.quantize_bias([(2**31 - 1) * 1e-6], 1e-6)[0] == 2**31 - 1
  with pytest.raises(ValueError, match="overflow int32"):
    Q.quantize_bias([1.0, 2**31 * 1e-6], 1e-6)
  with pytest.raises(ValueError, match="overflow int32"):
    Q.quantize_bias([-3.0], 1e-9)
  with pytest.raises(ValueError, match="positive"):
    Q.quantize_bias([1.0], 0.0)
  with pytest.raises(TypeError):
    jax.jit(Q.quantize_bias)(jnp.ones(2), 0.1)


def test_quantizers_jit_and_vmap():
  w = jnp.asarray(random_kernel(7, (4, 4, 5)))
  f = jax.jit(Q.fake_quant_weight, static_argnames=("bits", "axis"))
  np.testing.assert_allclose(f(w, bits=4), Q.fake_quant_weight(w, 4))
  per_example = jax.vmap(lambda v: Q.quantize_weight(v, 8)[0])(w)  # each (4, 5) slice on its own
  np.testing.assert_array_equal(per_example[1], Q.quantize_weight(w[1], 8)[0])
