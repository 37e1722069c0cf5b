"""The GCR model zoo: ResNeXt50, DeiT III-S and Swin-T backbones and their ImageNet recipes.

Parameter counts at 224x224 come from `jax.eval_shape` (no compute). Everything that runs uses
tiny widths on 28x28 digits. Each recipe config, shrunk, is trained for a few steps by
`grassq.train.train_and_evaluate`: ResNeXt in this process, DeiT and Swin sharded over 8 forced
CPU devices in a subprocess that runs this file as a script (XLA_FLAGS must be set before JAX
starts). The same subprocess computes each tiny backbone's loss and gradients on one device and
data-parallel over the 8 (``parity:NAME``), for the parent to compare. It is started when the
module's first test runs, so it overlaps the others.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_zoo.py deit3_small \
      swin_tiny parity:deit3_small
"""

import functools
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import imagenet_deit3_small_gcr  # noqa: E402
from experiments.configs import imagenet_resnext50_gcr  # noqa: E402
from experiments.configs import imagenet_swin_tiny_gcr  # noqa: E402
from grassq import data as gdata  # noqa: E402
from grassq import grassmann, optim, train  # noqa: E402
from grassq.models import create_model, swin  # noqa: E402
from grassq.models.vit import DropPath, EncoderBlock  # noqa: E402

RECIPES = {
    "resnext50": imagenet_resnext50_gcr,
    "swin_tiny": imagenet_swin_tiny_gcr,
    "deit3_small": imagenet_deit3_small_gcr,
}

# Tiny widths for 28x28 inputs. Swin: 14x14 tokens, window 7 with shifted windows in stage 1,
# patch merging, then one 7x7 window in stage 2.
TINY = {
    "resnext50": dict(stage_sizes=(1, 1), num_filters=16, groups=4, width_per_group=16),
    "deit3_small": dict(patch_size=7, embed_dim=16, depth=2, num_heads=2),
    "swin_tiny": dict(patch_size=2, embed_dim=16, depths=(2, 1), num_heads=(2, 4),
                      window_size=7),
}


def num_params(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def shrink(config, steps=3, batch_size=32):
  """A recipe config cut down to a seconds-long run on digits: same optimizers, tiny model."""
  config.dataset = "digits"
  config.model_kwargs.update(TINY[config.model])
  config.head_kwargs.subspace_dim = 4
  config.batch_size = batch_size
  config.eval_batch_size = 360  # digits' whole test split in one batch
  config.num_train_steps = steps
  spe = gdata.steps_per_epoch(1437, batch_size)  # digits has 1437 training images
  config.warmup_epochs = min(config.warmup_epochs, 1.0) / spe  # one warmup step at most
  config.log_every_steps = config.checkpoint_every_steps = steps
  config.eval_every_epochs = 100.0
  config.progress_bar = False
  return config


# ----------------------------------------------------------------------------- architectures


def abstract_variables(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("name,expected", [
    ("resnext50", 25_028_904),    # torchvision resnext50_32x4d
    ("deit3_small", 22_059_496),  # timm deit3_small_patch16_224 (no position embedding for cls)
    ("swin_tiny", 28_288_354),    # timm / Swin swin_tiny_patch4_window7_224
])
def test_param_counts_as_published(name, expected):
  model = create_model(name, 1000)
  variables = abstract_variables(model, (1, 224, 224, 3))
  assert num_params(variables["params"]) == expected
  assert ("batch_stats" in variables) == (name == "resnext50")
  width = {"resnext50": 2048, "deit3_small": 384, "swin_tiny": 768}[name]
  logits, features = jax.eval_shape(functools.partial(model.apply, return_features=True),
                                    variables, jnp.zeros((2, 224, 224, 3)))
  assert (logits.shape, logits.dtype, features.shape) == ((2, 1000), jnp.float32, (2, width))


def test_architecture_details():
  resnext = abstract_variables(create_model("resnext50", 10), (1, 64, 64, 3))["params"]
  # 32 groups of 4 channels in stage 1 (width 128), of 32 in stage 4 (width 1024).
  assert resnext["stage1_block0"]["conv2"]["kernel"].shape == (3, 3, 4, 128)
  assert resnext["stage4_block0"]["conv2"]["kernel"].shape == (3, 3, 32, 1024)
  assert resnext["stage4_block0"]["conv3"]["kernel"].shape == (1, 1, 1024, 2048)

  deit = abstract_variables(create_model("deit3_small", 10), (1, 224, 224, 3))["params"]
  assert deit["pos_embed"].shape == (1, 196, 384) and deit["cls_token"].shape == (1, 1, 384)
  assert deit["block0"]["attn"]["qkv"]["kernel"].shape == (384, 1152)
  assert deit["block11"]["mlp"]["fc1"]["kernel"].shape == (384, 1536)
  block = jax.jit(EncoderBlock(num_heads=2).init)(jax.random.key(0), jnp.zeros((1, 3, 8)))
  block = block["params"]
  np.testing.assert_array_equal(block["gamma_1"], np.float32(1e-4))  # DeiT III's layer scale
  np.testing.assert_array_equal(block["gamma_2"], np.float32(1e-4))

  sw = abstract_variables(create_model("swin_tiny", 10), (1, 224, 224, 3))["params"]
  assert sw["stage1_block0"]["attn"]["relative_position_bias_table"].shape == (169, 3)
  assert sw["stage4_block1"]["attn"]["relative_position_bias_table"].shape == (169, 24)
  assert sw["stage3_merge"]["reduction"]["kernel"].shape == (4 * 384, 768)
  assert "stage4_merge" not in sw and "stage3_block5" in sw


def test_bad_sizes_are_refused():
  with pytest.raises(ValueError, match="multiple of patch_size=16"):
    abstract_variables(create_model("deit3_small", 10), (1, 40, 40, 3))
  with pytest.raises(ValueError, match="not a multiple of the window size 7"):
    abstract_variables(create_model("swin_tiny", 10), (1, 64, 64, 3))
  with pytest.raises(ValueError, match="bottleneck width 0"):
    abstract_variables(create_model("resnext50", 10, num_filters=8), (1, 32, 32, 3))


def test_window_partition_round_trip_and_relative_index():
  x = jnp.arange(2 * 14 * 21 * 3.0).reshape(2, 14, 21, 3)
  windows = swin.window_partition(x, 7)
  assert windows.shape == (2, 6, 49, 3)
  np.testing.assert_array_equal(windows[0, 1, 0], x[0, 0, 7])  # second window: columns 7..13
  np.testing.assert_array_equal(swin.window_merge(windows, 14, 21), x)
  index = swin.relative_position_index(3)
  # Token pairs with the same offset share a table row; offsets (dy, dx) give 5 x 5 rows.
  assert index.shape == (9, 9) and index.max() == 24 and len(np.unique(index)) == 25
  assert np.all(np.diag(index) == 12)  # offset (0, 0) is the centre row


@pytest.mark.parametrize("shift", [0, 3])
def test_swin_block_attends_within_windows_and_regions(shift):
  """Perturbing token (0, 0) changes exactly the outputs that may attend to it.

  Without shift: its 7x7 window. With the cyclic shift of 3: only the 3x3 top-left region,
  never the tokens it wraps around to (that is what the attention mask is for).
  """
  block = swin.SwinBlock(num_heads=2, window_size=7, shift=shift)
  x = jax.random.normal(jax.random.key(0), (1, 14, 14, 8))
  params = jax.jit(block.init)(jax.random.key(1), x)
  apply = jax.jit(block.apply)
  changed = np.any(apply(params, x.at[0, 0, 0, 0].add(1.0)) != apply(params, x),
                   axis=(0, 3))
  expected = np.zeros((14, 14), bool)
  expected[:shift or 7, :shift or 7] = True
  np.testing.assert_array_equal(changed, expected)


def test_drop_path():
  x = jnp.ones((2000, 3, 4))
  layer = DropPath(0.25)
  np.testing.assert_array_equal(layer.apply({}, x), x)  # identity at eval
  y = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y[:, 0, 0] != 0)
  # Whole examples are dropped, the others rescaled.
  assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
  assert np.all(y == y[:, :1, :1]) and abs(kept.mean() - 0.75) < 0.03
  with pytest.raises(Exception, match="dropout"):
    layer.apply({}, x, train=True)  # a 'dropout' RNG is required


# ----------------------------------------------------------------------------- optimizers


def test_weight_decay_mask_of_transformers():
  for name in ("deit3_small", "swin_tiny"):
    params = abstract_variables(create_model(name, 10, **TINY[name]), (1, 28, 28, 1))["params"]
    flat = jax.tree_util.tree_flatten_with_path(train.weight_decay_mask(params))[0]
    for path, decayed in flat:
      key = jax.tree_util.keystr(path)
      assert decayed == ("'kernel'" in key), key  # not norms, biases, gamma, embeddings, tables


def _grassmann_config(optimizer, clip):
  config = imagenet_swin_tiny_gcr.get_config()
  config.optimizer, config.grad_clip_norm = optimizer, clip
  config.learning_rate, config.momentum, config.weight_decay = 1.0, 0.0, 0.0
  return config


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_gradient_clipping_leaves_the_bases_alone(optimizer):
  params = {"stem": {"kernel": jnp.ones((4, 5))},
            "head": {"bases": grassmann.random_bases(jax.random.key(0), 3, 6, 2)}}
  grads = {"stem": {"kernel": jnp.full((4, 5), 10 / np.sqrt(20))},  # norm 10
           "head": {"bases": 1e3 * jax.random.normal(jax.random.key(1), (3, 6, 2))}}

  def update(clip):
    tx = train.make_optimizer(_grassmann_config(optimizer, clip), optax.constant_schedule(1.0))
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)

  clipped, free = update(5.0), update(0.0)
  np.testing.assert_array_equal(clipped["head"]["bases"], free["head"]["bases"])
  assert float(jnp.max(jnp.abs(free["head"]["bases"]))) > 1e-2  # the bases did move
  if optimizer == "sgd":  # lr 1: the update is minus the clipped gradient, clipped to norm 5
    assert float(jnp.linalg.norm(clipped["stem"]["kernel"])) == pytest.approx(5.0, rel=1e-5)
    assert float(jnp.linalg.norm(free["stem"]["kernel"])) == pytest.approx(10.0, rel=1e-5)


RELEASED_PERIODS = {"imagenet_resnet50d_gcr": 5, "imagenet_resnext50_gcr": 5,  # RSGD
                    "imagenet_swin_tiny_gcr": 1, "imagenet_deit3_small_gcr": 1}  # R-AdamW, R-LAMB


@pytest.mark.parametrize("recipe", sorted(RELEASED_PERIODS))
def test_recipes_train_the_bases_with_the_released_update(recipe):
  """Each paper recipe's optimizer moves the bases exactly as `optim.released_rsgd` with the
  released config's period and lr coupling (rate = grassmann_learning_rate at the peak of the
  network's schedule), over 6 steps of the recipe's own warmup/cosine schedule."""
  import importlib

  config = importlib.import_module(f"experiments.configs.{recipe}").get_config()
  assert config.grassmann_update == "released"
  assert config.grassmann_reorth_every == RELEASED_PERIODS[recipe]
  schedule = train.make_schedule(config, 10, 60)
  tx = train.make_optimizer(config, schedule)
  ref = optim.released_rsgd(schedule, config.grassmann_momentum,
                            RELEASED_PERIODS[recipe],
                            lr_factor=config.grassmann_learning_rate / config.learning_rate)
  params = {"stem": {"kernel": jnp.ones((4, 5))},
            "head": {"bases": grassmann.random_bases(jax.random.key(0), 3, 6, 2)}}
  bases = params["head"]["bases"]
  state, ref_state = tx.init(params), ref.init(bases)
  for t in range(6):
    grads = {"stem": {"kernel": jax.random.normal(jax.random.key(10 + t), (4, 5))},
             "head": {"bases": jax.random.normal(jax.random.key(20 + t), (3, 6, 2))}}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ref_updates, ref_state = ref.update(grads["head"]["bases"], ref_state, bases)
    bases = optax.apply_updates(bases, ref_updates)
    np.testing.assert_allclose(params["head"]["bases"], bases, atol=1e-6)
  assert float(grassmann.orthonormality_error(bases)) < 1e-4


# ----------------------------------------------------------------------------- Mixup / CutMix


def test_mixup_and_cutmix():
  """Mixup: one lam for images and targets. CutMix: a box pasted whole, targets mixed by its
  area. Both enabled: each batch gets one of the two. All alphas 0: nothing happens."""
  images = jax.random.uniform(jax.random.key(0), (6, 16, 12, 2))
  targets = jax.nn.one_hot(jnp.arange(6), 6)  # example i has class i: lam is readable
  mix = jax.jit(jax.vmap(lambda k: gdata.mixup_cutmix(k, images, targets, 0.8, 1.0)))
  all_mixed, all_targets = jax.device_get(mix(jax.random.split(jax.random.key(1), 16)))
  images, flipped, eye = np.asarray(images), np.asarray(images)[::-1], np.eye(6)
  kinds, lams = [], []
  for mixed, t in zip(all_mixed, all_targets):
    lam = t[0, 0]
    np.testing.assert_allclose(t, lam * eye + (1 - lam) * eye[::-1], atol=1e-6)
    pasted = np.all(mixed == flipped, axis=(0, 3))
    kept = np.all(mixed == images, axis=(0, 3))
    if np.all(pasted ^ kept):  # CutMix: every pixel comes whole from one of the two images
      kinds.append("cutmix")
      rows, cols = np.nonzero(pasted)
      if rows.size:  # a rectangle
        assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
      np.testing.assert_allclose(lam, 1.0 - pasted.mean(), atol=1e-6)
    else:
      kinds.append("mixup")
      np.testing.assert_allclose(mixed, lam * images + (1 - lam) * flipped, atol=1e-6)
    lams.append(lam)
  assert set(kinds) == {"cutmix", "mixup"} and len(set(lams)) > 8
  assert all(0.0 <= lam <= 1.0 for lam in lams)
  same_images, same_targets = gdata.mixup_cutmix(jax.random.key(0), images, targets)
  assert same_images is images and same_targets is targets


# ----------------------------------------------------------------------------- training


def smoke_run(name, workdir, devices=None):
  """Trains the shrunk recipe of `name` for 3 steps; returns what the tests check, as JSON."""
  config = shrink(RECIPES[name].get_config())
  snapshot = {}

  def keep_first(step, state):  # step 0 has learning rate 0: the params after it are the init
    if step == 1:
      snapshot["params"] = jax.device_get(state.params)

  result = train.train_and_evaluate(config, workdir, hooks=[keep_first], devices=devices)
  state = result["state"]
  params = jax.device_get(state.params)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  first = dict(jax.tree_util.tree_flatten_with_path(snapshot["params"])[0])
  _, variables, loaded = train.load_checkpoint(workdir)
  bases = params["head"]["bases"]
  return {
      "devices": len(state.params["head"]["bases"].sharding.device_set),
      "step": result["step"],
      "train_loss": rows[0]["train_loss"],
      "test_accuracy": result["test_accuracy"],
      "test_loss": result["test_loss"],
      "bases_dtype": str(bases.dtype),
      "orthonormality_error": float(np.max(grassmann.orthonormality_error(bases))),
      "bases_moved": float(np.max(grassmann.principal_angles(snapshot["params"]["head"]["bases"],
                                                            bases))),
      "untrained": [jax.tree_util.keystr(p) for p, v in flat if np.array_equal(v, first[p])],
      "batch_stats_empty": not jax.tree_util.tree_leaves(state.batch_stats),
      "restored": loaded.model == name and all(
          np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(variables["params"]),
                                               jax.tree_util.tree_leaves(params))),
  }


def one_vs_many_devices(name, batch_size=16):
  """Loss and gradients of the tiny `name` (Grassmann head, training mode: BatchNorm with batch
  statistics, no stochastic depth) for one batch: jitted on one device, and data-parallel (the
  batch split over all devices, parameters replicated, as `train.train_and_evaluate` shards)."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  model = create_model(name, 10, head="grassmann", head_kwargs={"subspace_dim": 4}, **TINY[name])
  images = jax.random.normal(jax.random.key(1), (batch_size, 28, 28, 1))
  labels = jnp.arange(batch_size) % 10
  variables = jax.jit(model.init)(jax.random.key(0), images[:1])

  def loss_fn(params, images, labels):
    logits, _ = model.apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  one = jax.devices()[0]
  loss1, grads1 = grad_fn(*jax.device_put((variables["params"], images, labels), one))
  mesh = train.make_mesh()
  batch = NamedSharding(mesh, P("data"))
  args = (jax.device_put(variables["params"], NamedSharding(mesh, P())),
          jax.device_put(images, batch), jax.device_put(labels, batch))
  loss8, grads8 = grad_fn(*args)
  worst = max(  # |g8 - g1| relative to the largest entry of the leaf
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))
      for a, b in zip(jax.tree_util.tree_leaves(grads8), jax.tree_util.tree_leaves(grads1)))
  return {
      "devices": [len(args[1].sharding.device_set), len(loss8.sharding.device_set)],
      "loss_1": float(loss1), "loss_8": float(loss8),
      "grad_rel_error": worst,
      "grad_norm": float(optax.global_norm(grads1)),
      "leaves": len(jax.tree_util.tree_leaves(grads1)),
  }


SHARDED = ("deit3_small", "swin_tiny")  # run on 8 devices in the subprocess
PARITY = ("resnext50", "deit3_small", "swin_tiny")  # one vs 8 devices, in the subprocess


@pytest.fixture(scope="module", autouse=True)
def eight_device_runs(request):
  """Starts the 8-device subprocess at once when a test that needs it was selected."""
  selected = {item.name for item in request.session.items}
  wanted = [n for n in SHARDED if f"test_recipe_smoke_run[{n}]" in selected]
  wanted += [f"parity:{n}" for n in PARITY
             if f"test_one_and_eight_devices_agree[{n}]" in selected]
  if not wanted:
    yield None
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *wanted], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  results = {}

  def get(name):
    if not results:
      out, err = proc.communicate(timeout=600)
      assert proc.returncode == 0, err[-4000:]
      results.update(json.loads(out.strip().splitlines()[-1]))
    return results[name]

  yield get
  if proc.poll() is None:
    proc.kill()


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_smoke_run(name, tmp_path, eight_device_runs):
  """The recipe's config, shrunk, trains through train_and_evaluate with its optimizer (SGD /
  AdamW + clipping / LAMB for the network, Riemannian SGD for the bases), bf16 compute,
  stochastic depth; every parameter is trained, the bases stay orthonormal, and the checkpoint
  (with empty batch_stats for the transformers) restores."""
  if name in SHARDED:
    r = eight_device_runs(name)
    if "error" in r:
      pytest.fail(r["error"])
    assert r["devices"] == 8
  else:
    r = smoke_run(name, str(tmp_path))
    assert r["devices"] == 1
  assert r["step"] == 3 and np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"])
  assert 0.0 <= r["test_accuracy"] <= 1.0
  assert r["bases_dtype"] == "float32" and r["orthonormality_error"] <= 1e-5
  assert r["bases_moved"] > 1e-4
  assert r["untrained"] == []
  assert r["batch_stats_empty"] == (name != "resnext50")
  assert r["restored"]


@pytest.mark.parametrize("name", PARITY)
def test_one_and_eight_devices_agree(name, eight_device_runs):
  """The same parameters and batch give the same loss and gradients (forward and backward under
  jit) on one device and data-parallel over 8 forced CPU devices: only the order of the batch
  reductions differs (float32)."""
  r = eight_device_runs(f"parity:{name}")
  if "error" in r:
    pytest.fail(r["error"])
  assert r["devices"] == [8, 8]
  assert np.isfinite(r["loss_1"]) and r["grad_norm"] > 0 and r["leaves"] > 4
  np.testing.assert_allclose(r["loss_8"], r["loss_1"], rtol=1e-5)
  assert r["grad_rel_error"] <= 1e-4, r


def _main(names):
  import tempfile
  import traceback

  out = {}
  for name in names:
    with tempfile.TemporaryDirectory() as workdir:
      try:
        if name.startswith("parity:"):
          out[name] = one_vs_many_devices(name.split(":", 1)[1])
        else:
          out[name] = smoke_run(name, workdir)
      except Exception:  # pylint: disable=broad-except
        out[name] = {"error": traceback.format_exc()[-4000:]}
  print(json.dumps(out))


if __name__ == "__main__":
  _main(sys.argv[1:])
