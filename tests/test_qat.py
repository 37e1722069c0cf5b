"""QAT layers: BN folding, range tracking, fake-quant forward, straight-through gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from grassq.quant import qat, quantizers


def test_fold_bn_matches_conv_then_batchnorm_in_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 6, 3))
  w = rng.normal(size=(3, 3, 3, 5))
  gamma, beta = rng.normal(size=5), rng.normal(size=5)
  mean, var = rng.normal(size=5), rng.uniform(0.5, 2, size=5)
  with jax.enable_x64(True):
    conv = lambda k: qat._conv(jnp.asarray(x), jnp.asarray(k), (1, 1), ((1, 1), (1, 1)))
    ref = (conv(w) - mean) / np.sqrt(var + 1e-5) * gamma + beta
    wf, bf = qat.fold_bn(w, gamma, beta, mean, var)
    np.testing.assert_allclose(conv(wf) + bf, ref, rtol=1e-10, atol=1e-10)


def test_quant_conv_bn_eval_is_fake_quant_of_folded_weight():
  layer = qat.QuantConvBN(4, weight_bits=4)
  x = jax.random.normal(jax.random.key(0), (3, 5, 5, 2))
  v = layer.init(jax.random.key(1), x)
  stats = {"mean": jax.random.normal(jax.random.key(2), (4,)),
           "var": jax.random.uniform(jax.random.key(3), (4,), minval=0.5, maxval=2.0)}
  v = {"params": v["params"], "batch_stats": stats}
  got = layer.apply(v, x, train=False)
  p = v["params"]
  wf, bf = qat.fold_bn(p["kernel"], p["bn_scale"], p["bn_bias"], stats["mean"], stats["var"])
  q, s = quantizers.quantize_weight(wf, 4)
  want = qat._conv(x, q.astype(jnp.float32) * s, (1, 1), ((1, 1), (1, 1))) + bf
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # the weights really are 4-bit: at most 16 distinct values per channel
  assert max(len(np.unique(np.asarray(q)[..., c])) for c in range(4)) <= 16


def test_quant_conv_bn_training_uses_batch_stats_and_updates_running_ones():
  layer = qat.QuantConvBN(6, weight_bits=8)
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
  v = layer.init(jax.random.key(1), x)
  y, upd = layer.apply(v, x, train=True, mutable=["batch_stats"])
  # folded with batch statistics: per-channel output ~ BN output (beta = 0, gamma = 1)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(jnp.std(y, axis=(0, 1, 2)), 1.0, atol=0.05)
  y_float = qat._conv(x, v["params"]["kernel"], (1, 1), ((1, 1), (1, 1)))
  want_mean = 0.1 * jnp.mean(y_float, axis=(0, 1, 2))
  np.testing.assert_allclose(upd["batch_stats"]["mean"], want_mean, rtol=1e-4, atol=1e-5)
  # fix_bn: training folds with the running statistics and leaves them alone
  fixed = qat.QuantConvBN(6, weight_bits=8, fix_bn=True)
  y2, upd2 = fixed.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(upd2["batch_stats"]["mean"], v["batch_stats"]["mean"])
  np.testing.assert_allclose(y2, fixed.apply(v, x, train=False), rtol=1e-6)


def test_quant_conv_bn_gradients_are_finite_and_straight_through():
  layer = qat.QuantConvBN(4, weight_bits=4)
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
  v = layer.init(jax.random.key(1), x)
  loss = lambda p: jnp.sum(layer.apply({**v, "params": p}, x, train=True,
                                       mutable=["batch_stats"])[0] ** 2)
  g = jax.grad(loss)(v["params"])
  for leaf in jax.tree_util.tree_leaves(g):
    assert jnp.all(jnp.isfinite(leaf)) and float(jnp.abs(leaf).max()) > 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 4, 8]), signed=st.booleans())
def test_quant_act_tracks_range_by_ema_and_quantizes(seed, bits, signed):
  act = qat.QuantAct(bits, signed)
  k1, k2 = jax.random.split(jax.random.key(seed))
  x1 = jax.random.normal(k1, (64,)) * 2
  x2 = jax.random.normal(k2, (64,)) * 3 + 1
  v = act.init(jax.random.key(0), x1)
  assert not bool(v["batch_stats"]["range"]["initialized"])
  np.testing.assert_array_equal(act.apply(v, x1), x1)  # uncalibrated: identity
  _, v1 = act.apply(v, x1, train=True, mutable=["batch_stats"])
  r1 = v1["batch_stats"]["range"]
  assert float(r1["lo"]) == float(x1.min()) and float(r1["hi"]) == float(x1.max())
  _, v2 = act.apply(v1, x2, train=True, mutable=["batch_stats"])
  r2 = v2["batch_stats"]["range"]
  np.testing.assert_allclose(r2["hi"], 0.99 * x1.max() + 0.01 * x2.max(), rtol=1e-6)
  np.testing.assert_allclose(r2["lo"], 0.99 * x1.min() + 0.01 * x2.min(), rtol=1e-6)
  # evaluation: frozen range, values on the integer grid of the range's scale
  y = act.apply(v2, x2)
  scale = quantizers.activation_scale(r2["lo"], r2["hi"], bits, signed)
  q = np.asarray(y / scale)
  np.testing.assert_allclose(q, np.round(q), atol=1e-3)
  qmin, qmax = quantizers.qrange(bits, signed)
  assert q.min() >= qmin - 1e-3 and q.max() <= qmax + 1e-3
  _, v3 = act.apply(v2, x1, mutable=["batch_stats"])  # not training: range unchanged
  assert float(v3["batch_stats"]["range"]["hi"]) == float(r2["hi"])


def test_quant_act_refuses_unsupported_bits():
  with pytest.raises(ValueError, match="supported"):
    qat.QuantAct(16, False).init(jax.random.key(0), jnp.ones(3))
  with pytest.raises(ValueError, match="supported"):
    qat.QuantConvBN(4, weight_bits=1).init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


def test_quant_add_rounds_branches_separately_and_clamps_once():
  add = qat.QuantAdd()
  a = jnp.array([0.26, 0.26, -5.0, 3.0])
  b = jnp.array([0.26, -0.26, 1.0, 1e9])
  v = add.init(jax.random.key(0), a, b)
  _, v = add.apply(v, a, b, train=True, mutable=["batch_stats"])
  out = add.apply(v, a, b)
  scale = float(v["batch_stats"]["range"]["hi"]) / (2**16 - 1)
  want = np.clip(np.round(a / scale) + np.round(b / scale), 0, 2**16 - 1) * scale
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert float(out[2]) == 0.0  # negative sum: the unsigned clamp is the ReLU
  # separate rounding differs from rounding the sum: 0.5 + 0.5 LSB -> 1 + 1 = 2, not 1
  s = 1.0
  assert float(qat.fake_quant_add(jnp.float32(0.5000001), jnp.float32(0.5000001), s)) == 2.0


def test_quant_dense_is_per_channel_fake_quant():
  layer = qat.QuantDense(3, weight_bits=4)
  x = jax.random.normal(jax.random.key(0), (5, 7))
  v = layer.init(jax.random.key(1), x)
  q, s = quantizers.quantize_weight(v["params"]["kernel"], 4)
  np.testing.assert_allclose(layer.apply(v, x), x @ (q * s) + v["params"]["bias"], rtol=1e-5,
                             atol=1e-6)


def test_hawq_semantics_running_statistics_match_a_float64_reference():
  """"hawq": running <- 0.99 running + 0.01 batch with torch.var's unbiased variance, which also
  normalizes the batch; "grassq": 0.9 and the biased variance."""
  x = 1.5 + 2.0 * jax.random.normal(jax.random.key(4), (5, 4, 3, 2))
  for name in ("grassq", "hawq"):
    sem = qat.semantics_of(name)
    layer = qat.QuantConvBN(3, weight_bits=8, momentum=sem.bn_momentum,
                            unbiased_var=sem.bn_unbiased_var)
    v = layer.init(jax.random.key(5), x)
    stats = {"mean": jax.random.normal(jax.random.key(6), (3,)),
             "var": jax.random.uniform(jax.random.key(7), (3,), minval=0.5, maxval=2.0)}
    v = {"params": v["params"], "batch_stats": stats}
    y, upd = layer.apply(v, x, train=True, mutable=["batch_stats"])
    yf = np.asarray(qat._conv(x, v["params"]["kernel"], (1, 1), ((1, 1), (1, 1))), np.float64)
    yf = yf.reshape(-1, 3)
    var = yf.var(axis=0, ddof=1 if name == "hawq" else 0)
    m = {"grassq": 0.9, "hawq": 0.99}[name]
    np.testing.assert_allclose(upd["batch_stats"]["mean"],
                               m * np.asarray(stats["mean"]) + (1 - m) * yf.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"],
                               m * np.asarray(stats["var"]) + (1 - m) * var, rtol=1e-5)
    # the batch is normalized with that variance (gamma 1, beta 0; fake-quant adds < 1 %)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3).var(0), yf.var(0) / (var + 1e-5),
                               rtol=0.02)
  with pytest.raises(ValueError, match="unknown QAT semantics"):
    qat.semantics_of("torch")


def test_models_pass_their_semantics_to_every_tracker():
  from grassq.models import create_model
  from grassq.quant import qresnet

  model = create_model("resnet20", 4, stage_sizes=(1,), num_filters=4, head="grassmann",
                       head_kwargs={"subspace_dim": 2})
  x = jax.random.normal(jax.random.key(8), (6, 9, 9, 1))
  out = {}
  for name in ("grassq", "hawq"):
    q = qresnet.quantized(model, semantics=name)
    v = q.init(jax.random.key(9), x[:1])
    _, u1 = q.apply(v, x, train=True, mutable=["batch_stats"])
    _, u2 = q.apply({**v, "batch_stats": u1["batch_stats"]}, 2 * x, train=True,
                    mutable=["batch_stats"])
    out[name] = (u1["batch_stats"], u2["batch_stats"])
  # the input quantizer sees the images themselves: its range is exactly the EMA of theirs
  for name in ("grassq", "hawq"):
    m = qat.semantics_of(name).range_momentum
    first, second = (out[name][i]["input_act"]["range"] for i in (0, 1))
    np.testing.assert_allclose(first["hi"], x.max(), rtol=1e-6)
    np.testing.assert_allclose(second["hi"], m * x.max() + (1 - m) * (2 * x).max(), rtol=1e-6)
    np.testing.assert_allclose(second["lo"], m * x.min() + (1 - m) * (2 * x).min(), rtol=1e-6)
  # every tracker and BatchNorm follows the model's semantics: all float statistics differ
  # the two semantics give different statistics from the same batches
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(out["grassq"][1])[0],
                          jax.tree_util.tree_leaves(out["hawq"][1])):
    if a.dtype != jnp.bool_ and float(jnp.max(jnp.abs(a))) > 0:  # (lo after a ReLU is 0)
      assert float(jnp.max(jnp.abs(a - b))) > 1e-6, jax.tree_util.keystr(path)
  with pytest.raises(ValueError, match="unknown QAT semantics"):
    qresnet.quantized(model, semantics="torch").init(jax.random.key(0), x[:1])
