"""QAT ResNets: layer names for the bit dict, float -> QAT mapping, W8A8 tracks the float model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassq.models import create_model
from grassq.quant import qat, qresnet


@pytest.fixture(scope="module")
def float_resnet20():
  model = create_model("resnet20", 10, zero_init_residual=False)
  x = jax.random.normal(jax.random.key(0), (16, 28, 28, 1))
  v = jax.jit(model.init)(jax.random.key(1), x)
  # give BatchNorm realistic running statistics: a few training-mode passes
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  for i in range(3):
    xi = jax.random.normal(jax.random.key(10 + i), (32, 28, 28, 1))
    _, upd = step(v, xi)
    v = {"params": v["params"], "batch_stats": upd["batch_stats"]}
  return model, v


def test_layer_names_of_resnet20():
  q = qresnet.quantized(create_model("resnet20", 10))
  names = qresnet.layer_names(q, (28, 28, 1))
  assert names[0] == "stem_conv" and names[-1] == "head"
  assert len(names) == 1 + 9 * 2 + 2 + 1  # stem, 18 block convs, 2 projections, classifier
  assert "stage2_block0/proj_conv" in names and "stage1_block0/proj_conv" not in names


def test_from_float_fills_weights_and_leaves_ranges_uncalibrated(float_resnet20):
  model, v = float_resnet20
  q = qresnet.quantized(model)
  init = jax.jit(q.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  mapped = qresnet.from_float(v, init)
  shapes = lambda t: jax.tree_util.tree_map(jnp.shape, qat.mutable_copy(t))
  assert shapes(mapped["params"]) == shapes(init["params"])
  assert shapes(mapped["batch_stats"]) == shapes(init["batch_stats"])
  blk = mapped["params"]["stage2_block0"]
  np.testing.assert_array_equal(blk["proj_conv"]["kernel"],
                                v["params"]["stage2_block0"]["proj_conv"]["kernel"])
  np.testing.assert_array_equal(blk["conv2"]["bn_scale"],
                                v["params"]["stage2_block0"]["bn2"]["scale"])
  np.testing.assert_array_equal(mapped["batch_stats"]["stage2_block0"]["conv1"]["var"],
                                v["batch_stats"]["stage2_block0"]["bn1"]["var"])
  np.testing.assert_array_equal(mapped["params"]["head"]["kernel"],
                                v["params"]["head"]["dense"]["kernel"])
  assert not bool(mapped["batch_stats"]["stage1_block0"]["act_in"]["range"]["initialized"])
  other = create_model("resnet56", 10)
  v56 = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  with pytest.raises(ValueError, match="different"):
    qresnet.from_float(v56, init)


def _calibrated(q, v, n=4):
  variables = qresnet.from_float(v, jax.jit(q.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  step = jax.jit(lambda v, x: q.apply(v, x, train=True, mutable=["batch_stats"]))
  for i in range(n):
    x = jax.random.normal(jax.random.key(20 + i), (32, 28, 28, 1))
    _, upd = step(variables, x)
    variables = {**variables, "batch_stats": upd["batch_stats"]}
  return variables


def test_w8a8_tracks_the_float_model_and_w4a4_less(float_resnet20):
  model, v = float_resnet20
  x = jax.random.normal(jax.random.key(99), (64, 28, 28, 1))
  ref = model.apply(v, x)
  errors = {}
  for bits in (8, 4):
    q = qresnet.quantized(model, default_bits=bits, fix_bn=True)
    variables = _calibrated(q, v)
    out = jax.jit(q.apply)(variables, x)
    errors[bits] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert errors[8] < 0.05, errors
  assert errors[4] > 2 * errors[8], errors


def test_uncalibrated_quantizers_pass_through_and_bits_reach_layers(float_resnet20):
  model, v = float_resnet20
  q = qresnet.quantized(model, bits={"stage1_block0/conv1": 4}, default_bits=8)
  variables = _calibrated(q, v, n=1)
  # act_in of stage1_block0 reads at conv1's 4 bits: at most 16 distinct levels
  inter = q.apply(variables, jax.random.normal(jax.random.key(5), (8, 28, 28, 1)),
                  capture_intermediates=lambda m, _: m.name == "act_in",
                  mutable=["intermediates"])[1]["intermediates"]
  levels = np.unique(np.asarray(inter["stage1_block0"]["act_in"]["__call__"][0]))
  assert len(levels) <= 16
  levels8 = np.unique(np.asarray(inter["stage1_block1"]["act_in"]["__call__"][0]))
  assert len(levels8) > 16


def test_other_model_families_are_refused():
  from grassq.models import create_model
  with pytest.raises(TypeError, match="ResNeXt"):
    qresnet.quantized(create_model("resnext50", 10))
  with pytest.raises(TypeError, match="VisionTransformer"):
    qresnet.quantized(create_model("deit3_small", 10))
