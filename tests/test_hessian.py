"""Hutchinson traces vs exact Hessians, BN-folded coordinates of grassq ResNets and InceptionV3,
sensitivities."""

import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from grassq.mixed import hessian
from grassq.models import ResNet, create_model
from grassq.models import inception
from grassq.quant import cost, qinception, qresnet

BN_EPS = 1e-5  # grassq.models.resnet's BatchNorm epsilon


# ----------------------------------------------------------------------------- Hutchinson


def _xent(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))


def _mlp(key):
  """A 4-12-12-5 tanh MLP (281 parameters) on three batches from different distributions."""
  ks = jax.random.split(key, 9)
  sizes = (4, 12, 12, 5)
  params = {f"fc{i + 1}": {"w": jax.random.normal(ks[i], (a, b)) / np.sqrt(a),
                           "b": 0.1 * jax.random.normal(ks[3 + i], (b,))}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

  def loss_fn(p, batch):
    h = batch["x"]
    for name in ("fc1", "fc2"):
      h = jnp.tanh(h @ p[name]["w"] + p[name]["b"])
    return _xent(h @ p["fc3"]["w"] + p["fc3"]["b"], batch["y"])

  batches = [{"x": scale * jax.random.normal(jax.random.fold_in(ks[6], i), (32, 4)),
              "y": jax.random.randint(jax.random.fold_in(ks[7], i), (32,), 0, 5)}
             for i, scale in enumerate((0.5, 1.0, 3.0))]
  return loss_fn, params, batches


def _cnn(key):
  """A 3x3 conv (1->2, softplus) + dense (50->4) on 5x5 images: 224 parameters, one batch."""
  ks = jax.random.split(key, 6)
  params = {"conv": {"kernel": jax.random.normal(ks[0], (3, 3, 1, 2)) / 3.0,
                     "bias": 0.1 * jax.random.normal(ks[1], (2,))},
            "dense": {"kernel": jax.random.normal(ks[2], (50, 4)) / np.sqrt(50),
                      "bias": jnp.zeros((4,))}}

  def loss_fn(p, batch):
    h = jax.lax.conv_general_dilated(batch["x"], p["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.softplus(h + p["conv"]["bias"]).reshape(h.shape[0], -1)
    return _xent(h @ p["dense"]["kernel"] + p["dense"]["bias"], batch["y"])

  batches = [{"x": jax.random.normal(ks[3], (48, 5, 5, 1)),
              "y": jax.random.randint(ks[4], (48,), 0, 4)}]
  return loss_fn, params, batches


def _exact_block_traces(loss_fn, params, batches):
  flat, unravel = ravel_pytree(params)
  total = lambda f: jnp.mean(jnp.stack([loss_fn(unravel(f), b) for b in batches]))
  diag = np.diag(np.asarray(jax.jit(jax.hessian(total))(flat), np.float64))
  out, start = {}, 0
  for name in params:  # ravel_pytree flattens in sorted-key order, as params' keys are here
    n = ravel_pytree(params[name])[0].size
    out[name] = diag[start:start + n].sum() / n
    start += n
  return out


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_hutchinson_matches_the_exact_per_layer_trace(make):
  loss_fn, params, batches = make(jax.random.key(0))
  assert list(params) == sorted(params)
  exact = _exact_block_traces(loss_fn, params, batches)
  est = hessian.hutchinson_trace(loss_fn, params, batches, jax.random.key(1),
                                 probes_per_step=64, tol=1e-6, min_probes=64, max_probes=640)
  assert list(est) == list(params)
  for name, e in est.items():
    assert e.num_probes == 640
    assert e.num_params == ravel_pytree(params[name])[0].size
    assert e.stderr_per_param < 0.06 * abs(exact[name]), name  # the check below has teeth
    assert abs(e.trace_per_param - exact[name]) <= 3 * e.stderr_per_param, (name, e, exact[name])
    assert e.trace == pytest.approx(e.trace_per_param * e.num_params)
  if len(batches) > 1:  # the target is the Hessian over all the batches, not one of them
    first = _exact_block_traces(loss_fn, params, batches[:1])
    assert any(abs(first[n] - est[n].trace_per_param) > 6 * est[n].stderr_per_param
               for n in est)


@settings(max_examples=10, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=1,
                       max_size=3),
       probes_per_step=st.integers(1, 5), min_probes=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_diagonal_hessian_is_exact_and_stops_at_the_first_check(shapes, probes_per_step,
                                                                min_probes, seed):
  # v^T D v = tr(D) for every Rademacher v: zero variance, so the first check stops.
  rng = np.random.default_rng(seed)
  params = {f"layer{i}": jnp.asarray(rng.normal(size=s), jnp.float32)
            for i, s in enumerate(shapes)}
  diag = {name: jnp.asarray(rng.choice([-1, 1]) * rng.uniform(0.1, 2, size=p.shape), jnp.float32)
          for name, p in params.items()}  # a mixed-sign Hessian, every block trace away from 0
  loss_fn = lambda p, d: 0.5 * sum(jnp.sum(d[n] * p[n]**2) for n in p)
  est = hessian.hutchinson_trace(loss_fn, params, [diag], jax.random.key(seed),
                                 probes_per_step=probes_per_step, tol=1e-3,
                                 min_probes=min_probes, max_probes=100)
  steps = -(-min_probes // probes_per_step)
  for name, e in est.items():
    assert e.num_probes == steps * probes_per_step
    np.testing.assert_allclose(e.trace_per_param, float(np.mean(diag[name])), rtol=1e-5,
                               atol=1e-6)
    assert e.stderr_per_param <= 1e-6


def test_tolerance_stops_early_and_max_probes_caps():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(30, 30))
  a = jnp.asarray(a @ a.T / 30 + np.eye(30), jnp.float32)  # PSD, far from diagonal
  params = {"u": jnp.zeros((10,)), "w": jnp.zeros((4, 5))}

  def loss_fn(p, mat):
    x = ravel_pytree(p)[0]
    return 0.5 * x @ mat @ x

  exact = {"u": float(np.trace(a[:10, :10])) / 10, "w": float(np.trace(a[10:, 10:])) / 20}
  run = lambda tol, max_probes: hessian.hutchinson_trace(
      loss_fn, params, [a], jax.random.key(7), probes_per_step=4, tol=tol, min_probes=8,
      max_probes=max_probes)
  loose, tight = run(0.1, 400), run(0.01, 400)
  for name in params:
    assert 8 <= loose[name].num_probes < 400
    assert loose[name].stderr_per_param <= 0.1 * abs(loose[name].trace_per_param)
    assert loose[name].num_probes < tight[name].num_probes
    assert abs(tight[name].trace_per_param - exact[name]) <= 3 * tight[name].stderr_per_param
  capped = run(1e-9, 10)  # never reaches the tolerance: stops at exactly 10 probes
  assert all(e.num_probes == 10 for e in capped.values())


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from grassq.mixed import hessian
assert len(jax.devices()) == 2
rng = np.random.default_rng(int(__import__("sys").argv[1]))
params = {"a": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
loss = lambda p, x: jnp.mean(jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) ** 2)
ref = hessian.hutchinson_trace(loss, params, [x], jax.random.key(0), max_probes=32)
mesh = Mesh(np.array(jax.devices()), ("d",))
put = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))
sharded = {"a": put(params["a"], None, "d"), "b": put(params["b"], "d", None)}
out = hessian.hutchinson_trace(loss, sharded, [put(x, "d", None)], jax.random.key(0),
                               max_probes=32)
for n in ref:
  np.testing.assert_allclose(out[n].trace_per_param, ref[n].trace_per_param, rtol=1e-4)
  assert out[n].num_probes == ref[n].num_probes
print("ok")
"""


def test_sharded_params_give_the_same_estimate():
  # a fresh process: the host platform's device count is fixed when jax starts
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  seed = str(np.random.default_rng().integers(2**16))
  done = subprocess.run([sys.executable, "-c", _SHARDED, seed], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_bad_inputs_raise_clear_errors():
  loss_fn = lambda p, b: jnp.sum(p["w"]**2 * b)
  params = {"w": jnp.ones(3)}
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="batches is empty"):
    hessian.hutchinson_trace(loss_fn, params, [], key)
  with pytest.raises(ValueError, match="tol"):
    hessian.hutchinson_trace(loss_fn, params, [1.0], key, tol=0.0)
  with pytest.raises(ValueError, match="tol"):
    hessian.hutchinson_trace(loss_fn, params, [1.0], key, tol=-1e-3)
  with pytest.raises(TypeError, match="dict"):
    hessian.hutchinson_trace(lambda p, b: jnp.sum(p**2), jnp.ones(3), [1.0], key)
  with pytest.raises(TypeError, match="single batch"):
    hessian.hutchinson_trace(loss_fn, params, {"image": 1.0}, key)
  with pytest.raises(ValueError, match="max_probes"):
    hessian.hutchinson_trace(loss_fn, params, [1.0], key, min_probes=8, max_probes=4)
  with pytest.raises(ValueError, match="min_probes"):
    hessian.hutchinson_trace(loss_fn, params, [1.0], key, min_probes=1)
  trace = {"w": hessian.TraceEstimate(1.0, 0.1, 8, 3)}
  with pytest.raises(ValueError, match="unknown layer.*'stage9_block0/conv1'"):
    hessian.sensitivity({"stage9_block0/conv1": 1.0}, {"w": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match="bit-width"):
    hessian.sensitivity(trace, {"w": jnp.ones((3, 2))}, bits=(4, 9))


# ----------------------------------------------------------------------------- folded ResNets


def _random_variables(model, shape, seed, signed_gammas=True):
  """Fresh float variables from numpy (no compilation): He-normal kernels, orthonormal bases,
  BN with signed gammas (the first two exactly 0 in BNs of more than 4 channels; positive ones
  unless `signed_gammas`), random offsets, running means and variances."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape))))

  def fill(path, x):
    kind, shape = path[-1].key, x.shape
    if kind == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif kind == "bases":
      value = np.linalg.qr(rng.normal(size=shape))[0]
    elif kind == "scale":
      value = rng.uniform(0.3, 1.5, shape)
      if signed_gammas:
        value *= rng.choice([-1.0, 1.0], shape, p=[0.3, 0.7])
        if shape[0] > 4:
          value[:2] = 0.0
    elif kind == "var":
      value = rng.uniform(0.2, 2.0, shape)
    else:  # BN and dense biases, running means
      value = 0.3 * rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


MODELS = {
    # CIFAR stem, basic blocks, conv projection, linear head: 7 layers, ~1.3k parameters.
    "basic": (lambda: create_model("resnet20", 10, num_filters=4, stage_sizes=(1, 1),
                                   zero_init_residual=False), (8, 8, 1)),
    # deep stem, v1 bottlenecks, avgpool projections, Grassmann head.
    "bottleneck": (lambda: ResNet(stage_sizes=(1, 1), num_classes=5, block="bottleneck",
                                  num_filters=4, stem="deep", stride_on="1x1",
                                  shortcut="avgpool", head="grassmann",
                                  head_kwargs=flax.core.FrozenDict(subspace_dim=2)),
                   (16, 16, 1)),
}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny_resnet(request):
  make, shape = MODELS[request.param]
  model = make()
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return model, _random_variables(model, shape, seed=1), shape, apply


def _np_fold(variables, name, eps=BN_EPS):
  """(W * gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps)) in numpy float64."""
  path = name.split("/")
  bn = (*path[:-1], path[-1].replace("conv", "bn"))
  get = lambda tree, p: get(tree[p[0]], p[1:]) if p else tree
  as64 = lambda x: np.asarray(x, np.float64)
  p, s = get(variables["params"], bn), get(variables["batch_stats"], bn)
  inv = as64(p["scale"]) / np.sqrt(as64(s["var"]) + eps)
  return (as64(get(variables["params"], path)["kernel"]) * inv,
          as64(p["bias"]) - as64(s["mean"]) * inv)


def test_folded_names_weights_and_rebuild(tiny_resnet):
  model, v, shape, apply = tiny_resnet
  folded, rebuild = hessian.folded_weights(model, v)
  assert list(folded) == qresnet.layer_names(qresnet.quantized(model), shape)
  for name in folded:
    if name != "head":
      np.testing.assert_allclose(folded[name], _np_fold(v, name)[0], rtol=1e-5, atol=1e-7)

  x = jax.random.normal(jax.random.key(2), (6, *shape))
  rebuild = jax.jit(rebuild)
  np.testing.assert_allclose(apply(rebuild(folded), x), apply(v, x), rtol=1e-4, atol=1e-5)

  # rebuild inverts the folding for any weights (channels with gamma = 0 included) and keeps
  # the folded biases, so the rebuilt model is the folded network with the new weights.
  rng = np.random.default_rng(3)
  new = {n: w + 0.1 * rng.normal(size=w.shape).astype(np.float32) for n, w in folded.items()}
  rebuilt = rebuild(new)
  refolded, _ = hessian.folded_weights(model, rebuilt)
  for name in folded:
    np.testing.assert_allclose(refolded[name], new[name], rtol=1e-5, atol=1e-6, err_msg=name)
    if name != "head":
      np.testing.assert_allclose(_np_fold(rebuilt, name)[1], _np_fold(v, name)[1], rtol=1e-5,
                                 atol=1e-6, err_msg=name)
  assert not np.allclose(apply(rebuilt, x), apply(v, x), atol=1e-3)  # the weights took effect

  with pytest.raises(ValueError, match="unknown layer"):
    rebuild({"stage7_block0/conv1": folded["head"]})


def test_folded_loss_is_the_eval_cross_entropy(tiny_resnet):
  from grassq import data as gdata

  model, v, shape, apply = tiny_resnet
  folded, _ = hessian.folded_weights(model, v)
  rng = np.random.default_rng(4)
  batch = {"image": rng.integers(0, 256, (8, *shape), dtype=np.uint8),
           "label": rng.integers(0, model.num_classes, 8)}
  spec = gdata.get_spec("grassq_fashion_mnist")
  logits = apply(v, gdata.normalize(batch["image"], spec))
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), batch["label"][:, None], 1)
  loss_fn = jax.jit(hessian.folded_loss(model, v, spec="grassq_fashion_mnist"))
  np.testing.assert_allclose(loss_fn(folded, batch), nll.mean(), rtol=1e-5)
  mask = np.arange(8) < 5
  np.testing.assert_allclose(loss_fn(folded, {**batch, "mask": mask}), nll[:5].mean(), rtol=1e-5)
  with pytest.raises(TypeError, match="spec"):
    hessian.folded_loss(model, v)(folded, batch)


# ----------------------------------------------------------------------------- folded InceptionV3

INCEPTION_SHAPE = (16, 16, 1)  # small stem: 8x8 into Mixed_5b, 3x3 after Mixed_6a, 1x1 after 7a


def test_folded_inception_names_weights_and_rebuild():
  # one block of each type (A, B, C, D, E: pools, InceptionE's split) at 1/8 width
  model = create_model("inception_v3_small", 5, pool_features=(32,), c7=(128,), e_blocks=1)
  v = _random_variables(model, INCEPTION_SHAPE, seed=1)
  folded, rebuild = hessian.folded_weights(model, v)
  assert list(folded) == qinception.layer_names(qinception.quantized(model))
  assert sorted(folded) == sorted(cost.layer_costs(model, INCEPTION_SHAPE))
  for name in ("Conv2d_1a_3x3/conv", "Mixed_5b/branch_pool/conv", "Mixed_7b/branch3x3_2b/conv"):
    np.testing.assert_allclose(folded[name], _np_fold(v, name, inception.BN_EPSILON)[0],
                               rtol=1e-5, atol=1e-7, err_msg=name)

  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jax.random.normal(jax.random.key(2), (4, *INCEPTION_SHAPE))
  np.testing.assert_allclose(apply(rebuild(folded), x), apply(v, x), rtol=1e-4, atol=1e-5)
  rng = np.random.default_rng(3)
  new = {n: w + 0.1 * rng.normal(size=w.shape).astype(np.float32) for n, w in folded.items()}
  refolded, _ = hessian.folded_weights(model, rebuild(new))
  for name in folded:
    np.testing.assert_allclose(refolded[name], new[name], rtol=1e-5, atol=1e-6, err_msg=name)

  with pytest.raises(TypeError, match="float grassq.models.ResNet or InceptionV3"):
    hessian.folded_weights(qinception.quantized(model), v)


def _exact_traces_by_hvps(loss_fn, params, batch):
  """Tr(H_ll) / n_l of each layer, exactly: one HVP per basis vector of all of `params` (params
  and basis are arguments of the jitted function, not constants for XLA to fold)."""
  sizes = [int(np.prod(p.shape)) for p in params.values()]
  starts = np.cumsum([0] + sizes)
  eye = np.eye(starts[-1], dtype=np.float32)
  basis = {n: eye[:, a:a + m].reshape(-1, *p.shape)
           for (n, p), a, m in zip(params.items(), starts, sizes)}
  grad = lambda p: jax.grad(loss_fn)(p, batch)
  hvps = jax.jit(lambda p, ts: jax.vmap(lambda t: jax.jvp(grad, (p,), (t,))[1])(ts))(params,
                                                                                    basis)
  return {n: float(np.trace(np.asarray(hvps[n][a:a + m], np.float64).reshape(m, m))) / m
          for n, a, m in zip(params, starts, sizes)}


def test_hutchinson_matches_exact_traces_of_inception_layers():
  model = create_model("inception_v3_small", 5, pool_features=(32,), c7=(), e_blocks=0)
  v = _random_variables(model, INCEPTION_SHAPE, seed=3, signed_gammas=False)  # loss ~2
  folded, _ = hessian.folded_weights(model, v)
  loss_fn = hessian.folded_loss(model, v)
  rng = np.random.default_rng(4)
  batch = {"image": rng.normal(size=(8, *INCEPTION_SHAPE)).astype(np.float32),
           "label": rng.integers(0, 5, 8)}
  # Layer blocks of the folded loss's Hessian, the other folded weights held fixed (the blocks
  # do not depend on which other layers are estimated; fewer layers, fewer cross terms).
  layers = ("Conv2d_1a_3x3/conv", "Conv2d_3b_1x1/conv", "Mixed_5b/branch5x5_1/conv")
  chosen = {n: folded[n] for n in layers}
  block_loss = lambda p, b: loss_fn({**folded, **p}, b)
  exact = _exact_traces_by_hvps(block_loss, chosen, batch)
  est = hessian.hutchinson_trace(block_loss, chosen, [batch], jax.random.key(5, impl="rbg"),
                                 probes_per_step=128, tol=1e-6, min_probes=512, max_probes=512)
  for name in layers:
    e = est[name]
    assert e.num_probes == 512 and e.num_params == folded[name].size
    assert e.stderr_per_param < 0.1 * abs(exact[name]), (name, e, exact[name])  # has teeth
    assert abs(e.trace_per_param - exact[name]) <= 3 * e.stderr_per_param, (name, e, exact[name])


# ----------------------------------------------------------------------------- sensitivity


def _quant_error_np(w, bits):
  w = np.asarray(w, np.float64)
  qmax = 2**(bits - 1) - 1
  amax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
  scale = np.where(amax > 0, amax / qmax, 1.0)
  q = np.clip(np.rint(w / scale), -qmax - 1, qmax)
  return float(np.sum((q * scale - w)**2))


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4), bits=st.integers(2, 8),
       seed=st.integers(0, 2**16), trace=st.floats(0.01, 100.0))
def test_sensitivity_is_trace_times_squared_quantization_error(shape, bits, seed, trace):
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  w[..., 0] = 0.0  # an all-zero channel quantizes exactly
  omega = hessian.sensitivity({"layer": trace}, {"layer": jnp.asarray(w), "other": w},
                              bits=(bits,))
  assert list(omega) == ["layer"]
  np.testing.assert_allclose(omega["layer"][bits], trace * _quant_error_np(w, bits), rtol=1e-4,
                             atol=1e-12)


def test_layer_sensitivities_on_a_tiny_resnet():
  make, shape = MODELS["basic"]
  model = make()
  v = _random_variables(model, shape, seed=5)
  rng = np.random.default_rng(6)
  batches = [{"image": rng.normal(size=(8, *shape)).astype(np.float32),
              "label": rng.integers(0, 10, 8)} for _ in range(2)]
  omega, traces = hessian.layer_sensitivities(model, v, batches, jax.random.key(7), bits=(4, 8),
                                              probes_per_step=8, min_probes=8, max_probes=16)
  names = qresnet.layer_names(qresnet.quantized(model), shape)
  assert list(omega) == list(traces) == names
  folded, _ = hessian.folded_weights(model, v)
  errors = hessian.sensitivity({n: 1.0 for n in names}, folded)  # ||Q_b(W) - W||^2
  for name in names:
    assert errors[name][4] > errors[name][8] >= 0, name
    for b in (4, 8):
      assert omega[name][b] == pytest.approx(traces[name].trace_per_param * errors[name][b])
  # the head's block of the cross-entropy Hessian is positive semi-definite
  assert traces["head"].trace_per_param > 0 and omega["head"][4] > omega["head"][8] >= 0
  # one layer, independently in numpy float64: folded weight, 4-bit error, times the trace
  w, _ = _np_fold(v, "stage2_block0/conv1")
  want = traces["stage2_block0/conv1"].trace_per_param * _quant_error_np(w, 4)
  np.testing.assert_allclose(omega["stage2_block0/conv1"][4], want, rtol=1e-3)
