"""Tests for grassq.heads (baseline heads) and grassq.models (ResNets)."""

import functools

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grassq import heads
from grassq.models import MODELS, ResNet, create_model


def num_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_init(model, shape=(1, 32, 32, 3)):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


# --- safe norm -------------------------------------------------------------------------


def test_safe_norm_matches_norm_away_from_zero():
  x = jax.random.normal(jax.random.key(0), (4, 7))
  np.testing.assert_allclose(heads.safe_norm(x), jnp.linalg.norm(x, axis=-1), rtol=1e-6)
  np.testing.assert_allclose(heads.safe_norm(x, axis=0, keepdims=True),
                             jnp.linalg.norm(x, axis=0, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(heads.safe_normalize(x), axis=-1), 1.0,
                             rtol=1e-6)


def test_safe_norm_gradient_finite_at_zero():
  zero = jnp.zeros(5)
  assert float(heads.safe_norm(zero)) == pytest.approx(1e-12)
  grad = jax.grad(heads.safe_norm)(zero)
  assert np.all(np.isfinite(grad))
  jac = jax.jacobian(heads.safe_normalize)(zero)
  assert np.all(np.isfinite(jac))
  np.testing.assert_array_equal(heads.safe_normalize(zero), zero)
  # Through a whole head: zero features give finite gradients for features and kernel.
  head = heads.CosineHead(3)
  params = head.init(jax.random.key(0), jnp.ones((2, 4)))
  g_params, g_x = jax.grad(lambda p, x: head.apply(p, x).sum(), argnums=(0, 1))(
      params, jnp.zeros((2, 4)))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves((g_params, g_x)))


# --- heads -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(heads.HEADS))
def test_head_shapes_and_dtypes(name):
  head = heads.make_head(name, 5, dtype=jnp.bfloat16)
  x = jnp.ones((3, 8), jnp.bfloat16)
  params = head.init(jax.random.key(0), x)
  logits = head.apply(params, x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_linear_head_has_bias():
  params = heads.LinearHead(5).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  assert params["dense"]["kernel"].shape == (8, 5)
  assert params["dense"]["bias"].shape == (5,)


def test_make_head_unknown_name():
  with pytest.raises(ValueError, match="'nope'.*cosine.*linear"):
    heads.make_head("nope", 10)


_COSINE = heads.CosineHead(num_classes=6, scale=25.0)
_COSINE_PARAMS = _COSINE.init(jax.random.key(1), jnp.ones((4, 16)))
_cosine_apply = jax.jit(functools.partial(_COSINE.apply, _COSINE_PARAMS))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    x=hnp.arrays(np.float32, (4, 16),
                 elements=st.floats(-100, 100, width=32, allow_subnormal=False)),
    c=st.floats(1e-2, 1e2),
)
def test_cosine_head_bounded_and_scale_invariant(x, c):
  logits = np.asarray(_cosine_apply(x))
  assert np.all(np.abs(logits) <= 25.0 * (1 + 1e-5))
  scaled = np.asarray(_cosine_apply(np.float32(c) * x))
  # Rows with a norm near the clamp eps are not scale invariant by design.
  ok = np.linalg.norm(x.astype(np.float64), axis=-1) > 1e-3
  np.testing.assert_allclose(scaled[ok], logits[ok], atol=1e-3)


# --- models: parameter counts ----------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("resnet18", 11_689_512),     # torchvision
    ("resnet50", 25_557_032),     # torchvision (v1.5)
    ("resnet50_v1", 25_557_032),  # stride placement does not change the count
    ("resnet50d", 25_576_264),    # timm resnet50d
])
def test_imagenet_param_counts(name, expected):
  variables = abstract_init(create_model(name, 1000))
  assert num_params(variables["params"]) == expected


def cifar_resnet_params(blocks_per_stage, num_classes, in_channels=3, widths=(16, 32, 64)):
  """Closed-form count: conv3x3 = 9 c_in c_out, BN = 2 c, projection = c_in c_out + 2 c_out."""
  count = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv + BN
  c_in = widths[0]
  for w in widths:
    for _ in range(blocks_per_stage):
      count += 9 * c_in * w + 2 * w + 9 * w * w + 2 * w
      if c_in != w:
        count += c_in * w + 2 * w
      c_in = w
  return count + widths[-1] * num_classes + num_classes


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet56", 9)])
def test_cifar_param_counts(name, n):
  variables = abstract_init(create_model(name, 10))
  assert num_params(variables["params"]) == cifar_resnet_params(n, 10)
  # 6n + 2 weighted layers: stem, 2 convs per block, head (projections excluded).
  assert 6 * n + 2 == int(name[len("resnet"):])


def test_cifar_param_count_with_grayscale_input():
  variables = abstract_init(create_model("resnet20", 10), (1, 28, 28, 1))
  assert num_params(variables["params"]) == cifar_resnet_params(3, 10, in_channels=1)


# --- models: forward -------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet20():
  model = create_model("resnet20", 10)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  return model, variables, x


def test_cifar_forward(resnet20):
  model, variables, x = resnet20
  logits, features = jax.jit(functools.partial(model.apply, return_features=True))(
      variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert features.shape == (2, 64) and features.dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), logits, rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.isfinite(logits))


def test_zero_init_residual(resnet20):
  _, variables, _ = resnet20
  params = variables["params"]
  for name, block in params.items():
    if name.startswith("stage"):
      np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
      np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
  assert "proj_conv" in params["stage2_block0"] and "proj_conv" not in params["stage1_block0"]


def test_train_mode_updates_batch_stats(resnet20):
  model, variables, x = resnet20
  logits, updates = jax.jit(
      functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.shape == (2, 10)
  old = jax.tree_util.tree_leaves(variables["batch_stats"])
  new = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert len(old) == len(new)
  assert all(not np.allclose(a, b) for a, b in zip(old, new))


def test_bfloat16_compute():
  model = create_model("resnet20", 10, dtype=jnp.bfloat16, head="cosine")
  x = jnp.ones((2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
  logits, state = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=True))(variables, x)
  assert logits.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(state["batch_stats"]))
  conv_out = state["intermediates"]["stage1_block0"]["conv1"]["__call__"][0]
  assert conv_out.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])
def test_imagenet_shapes(name):
  model = create_model(name, 7)
  x = jnp.zeros((2, 32, 32, 3))
  variables = abstract_init(model, x.shape)
  logits, features = jax.eval_shape(
      functools.partial(model.apply, return_features=True), variables, x)
  width = 512 if name == "resnet18" else 2048
  assert (logits.shape, logits.dtype) == ((2, 7), jnp.float32)
  assert features.shape == (2, width)


def test_head_params_live_under_head():
  model = create_model("resnet20", 10, head="cosine", head_kwargs={"scale": 16.0})
  params = abstract_init(model)["params"]
  assert params["head"]["kernel"].shape == (64, 10)
  x = jnp.ones((2, 8, 8, 3))
  logits = jax.jit(model.apply)(jax.jit(model.init)(jax.random.key(0), x), x)
  assert np.all(np.abs(logits) <= 16.0 * (1 + 1e-5))


def test_v1_and_v1_5_stride_placement():
  x = jnp.zeros((1, 64, 64, 3))

  def stage2_shapes(name):
    model = create_model(name, 10)
    variables = abstract_init(model, x.shape)
    _, state = jax.eval_shape(functools.partial(
        model.apply, mutable=["intermediates"], capture_intermediates=True), variables, x)
    block = state["intermediates"]["stage2_block0"]
    return [block[c]["__call__"][0].shape[1:3] for c in ("conv1", "conv2", "conv3")]

  # 64 -> stem /4 -> 16 at stage 1 -> stage 2 halves to 8.
  assert stage2_shapes("resnet50_v1") == [(8, 8), (8, 8), (8, 8)]   # stride on the 1x1
  assert stage2_shapes("resnet50") == [(16, 16), (8, 8), (8, 8)]    # stride on the 3x3


def test_resnet_d_shortcut_is_avgpool_then_conv():
  x = jnp.zeros((1, 64, 64, 3))
  params = abstract_init(create_model("resnet50d", 10), x.shape)["params"]
  assert params["stage2_block0"]["proj_conv"]["kernel"].shape == (1, 1, 256, 512)
  assert [params[f"stem_conv{i}"]["kernel"].shape for i in (1, 2, 3)] == [
      (3, 3, 3, 32), (3, 3, 32, 32), (3, 3, 32, 64)]


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model 'resnet9'; available: .*resnet20"):
    create_model("resnet9", 10)


def test_unknown_head_name_in_model():
  model = create_model("resnet20", 10, head="nope")
  with pytest.raises(ValueError, match="available: .*cosine.*linear"):
    abstract_init(model)


def test_unknown_variant_fields():
  for field in ({"stem": "x"}, {"block": "x"}, {"shortcut": "x"}):
    model = ResNet(stage_sizes=(1, 1), num_classes=3, num_filters=4, **field)
    with pytest.raises(ValueError, match="available"):
      abstract_init(model)


def test_registry_names():
  assert {"resnet20", "resnet56", "resnet18", "resnet50", "resnet50_v1",
          "resnet50d"} <= set(MODELS)
