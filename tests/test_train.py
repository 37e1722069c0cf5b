"""Training loop: multi-device equivalence, exact resume after a kill, saved-run API, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import digits_smoke
from grassq import train

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "train_runner.py")


def run(workdir, out, devices=1, check=True, **flags):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, RUNNER, str(workdir), str(out)]
  for k, v in flags.items():
    cmd += [f"--{k.replace('_', '-')}", str(v)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      result = json.loads(line)
  return proc, result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 40-step run on one device."""
  d = tmp_path_factory.mktemp("ref")
  _, result = run(d / "work", d / "params.npz")
  return d, result, dict(np.load(d / "params.npz"))


def test_reference_run_learns_and_writes_outputs(reference):
  d, result, params = reference
  assert result["devices"] == 1 and result["step"] == 40
  # 40 steps learn a little; how much depends on the CPU's float rounding (0.197 to above 0.2
  # on the machines seen). Chance is 0.1 (360 test images: sd 0.016) and a loss of ln 10.
  assert result["test_accuracy"] > 0.15 and result["test_loss"] < np.log(10)
  rows = [json.loads(l) for l in open(d / "work" / "metrics.jsonl")]
  train_losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert train_losses[-1] < train_losses[0] - 0.1, train_losses
  assert [r["step"] for r in rows if "train_loss" in r] == [8, 16, 24, 32, 40]
  assert any("test_accuracy" in r for r in rows)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(d / "work" / "tensorboard"))
  assert sorted(os.listdir(d / "work" / "checkpoints"))[-1] == "40"


def test_eight_devices_match_one(tmp_path):
  # Short runs: over long ones, float rounding differences (the order of cross-device
  # reductions) are amplified by training itself. A real difference in what is computed (e.g.
  # BatchNorm statistics per device instead of over the global batch) shows at once.
  runs = {}
  for devices in (1, 8):
    _, result = run(tmp_path / f"w{devices}", tmp_path / f"p{devices}.npz", devices=devices,
                    steps=3, lr=0.02)
    assert result["devices"] == devices
    runs[devices] = result, dict(np.load(tmp_path / f"p{devices}.npz"))
  (r1, p1), (r8, p8) = runs[1], runs[8]
  assert p1.keys() == p8.keys()
  for k in p1:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-4, atol=1e-6, err_msg=k)
  assert r8["test_loss"] == pytest.approx(r1["test_loss"], abs=1e-5)
  assert r8["test_accuracy"] == pytest.approx(r1["test_accuracy"], abs=1 / 360 + 1e-9)


def test_kill_and_resume_is_exact(reference, tmp_path):
  _, _, ref = reference
  work = tmp_path / "work"
  proc, _ = run(work, tmp_path / "killed.npz", kill_at=20, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert not (tmp_path / "killed.npz").exists()
  _, result = run(work, tmp_path / "p.npz")
  assert result["resumed_from"] in (8, 16)
  got = dict(np.load(tmp_path / "p.npz"))
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
  rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
  train_steps = [r["step"] for r in rows if "train_loss" in r]
  assert train_steps == [8, 16, 24, 32, 40]  # rows logged after the last checkpoint were dropped


def test_load_predict_and_evaluate_saved_run(reference):
  d, result, ref = reference
  model, variables, config = train.load_checkpoint(str(d / "work"))
  assert config.model_kwargs.stage_sizes == (1, 1, 1)
  res = train.evaluate_checkpoint(str(d / "work"))
  assert res["accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-6)
  from grassq import data
  images, labels = data.load_arrays("digits", "test")
  logits = train.predict(model, variables, images[:7], "digits", batch_size=4)
  assert logits.shape == (7, 10) and np.isfinite(logits).all()
  with pytest.raises(ValueError, match="shape"):
    train.predict(model, variables, images[:3, :20], "digits")


def test_batch_size_not_divisible_by_devices(tmp_path):
  proc, _ = run(tmp_path / "w", tmp_path / "p.npz", devices=8, batch_size=12, check=False)
  assert proc.returncode != 0
  assert "batch_size=12 is not divisible by the number of devices (8)" in proc.stderr


def test_unknown_names_are_clear(tmp_path):
  config = digits_smoke.get_config()
  config.model = "resnet7"
  with pytest.raises(ValueError, match="unknown model 'resnet7'"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config = digits_smoke.get_config()
  config.dataset = "no_such_data"
  with pytest.raises(ValueError, match="no_such_data"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  config = digits_smoke.get_config()
  config.optimizer = "adagrad2"
  with pytest.raises(ValueError, match="unknown optimizer"):
    train.train_and_evaluate(config, str(tmp_path / "c"))


def test_mismatched_checkpoint_is_refused(reference, tmp_path):
  d, _, _ = reference
  work = tmp_path / "work"
  shutil.copytree(d / "work", work)
  cfg = json.load(open(work / "config.json"))
  cfg["model_kwargs"]["num_filters"] = 8
  json.dump(cfg, open(work / "config.json", "w"))
  with pytest.raises(train.CheckpointError, match="does not match") as e:
    train.load_checkpoint(str(work))
  assert "shape" in str(e.value)


def test_corrupt_checkpoint_is_refused(reference, tmp_path):
  d, _, _ = reference
  work = tmp_path / "work"
  shutil.copytree(d / "work", work)
  step_dir = work / "checkpoints" / "40"
  n = 0
  for root, _, files in os.walk(step_dir):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "r+b") as fh:
        size = os.path.getsize(p)
        fh.truncate(size // 3)
      n += 1
  assert n > 0
  with pytest.raises(train.CheckpointError, match="corrupt or unreadable"):
    train.load_checkpoint(str(work))


def test_missing_run_directory(tmp_path):
  with pytest.raises(train.CheckpointError, match="not a grassq run directory"):
    train.load_checkpoint(str(tmp_path))


def test_weight_decay_mask_skips_batchnorm_and_bias():
  config = digits_smoke.get_config()
  model = train.build_model(config, 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.ones((1, 28, 28, 1)),
                                                train=False))
  mask = train.weight_decay_mask(variables["params"])
  flat, _ = jax.tree_util.tree_flatten_with_path(mask)
  for path, m in flat:
    name = jax.tree_util.keystr(path)
    assert m == ("kernel" in name), name


def test_grassmann_head_trains_on_the_manifold(tmp_path):
  from grassq import grassmann

  config = digits_smoke.get_config()
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 4
  config.num_train_steps = 6
  config.checkpoint_every_steps = 6
  config.weight_decay = 0.1  # large: must not reach the bases
  result = train.train_and_evaluate(config, str(tmp_path))
  bases = result["state"].params["head"]["bases"]
  assert bases.shape == (10, 64, 4) and bases.dtype == np.float32
  assert float(np.max(grassmann.orthonormality_error(bases))) <= 1e-5
  model = train.build_model(config, 10)
  init = model.init(jax.random.split(jax.random.key(config.seed))[0], np.zeros((1, 28, 28, 1)))
  moved = np.max(grassmann.principal_angles(init["params"]["head"]["bases"], bases))
  assert moved > 1e-3  # the bases were trained
  _, variables, loaded = train.load_checkpoint(str(tmp_path))
  np.testing.assert_array_equal(variables["params"]["head"]["bases"], bases)


@pytest.mark.parametrize("name", sorted(
    f[:-3] for f in os.listdir(os.path.join(HERE, "..", "experiments", "configs"))
    if f.endswith(".py") and not f.startswith("_")))
def test_every_config_builds_its_model_and_optimizer(name):
  import importlib

  import optax
  from grassq import data

  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  if "train" in config:  # the main job's config holds a training config
    config = config.train
  spec = data.get_spec(config.dataset)
  model = train.build_model(config, spec.num_classes)
  tx = train.make_optimizer(config, optax.constant_schedule(config.learning_rate))
  state = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), model, tx,
                                                          spec.image_shape))
  assert state.params["head"]
  assert config.batch_size > 0 and config.dataset in data.SPECS


def test_qat_from_a_float_run_then_integer_program(reference, tmp_path):
  from grassq import data
  from grassq.quant import program as P

  d, _, _ = reference
  config = digits_smoke.get_config()
  config.quant.enabled = True
  config.init_from = str(d / "work")
  config.num_train_steps = 6
  config.learning_rate = 0.01
  result = train.train_and_evaluate(config, str(tmp_path / "qat"))
  model, variables, loaded = train.load_checkpoint(str(tmp_path / "qat"))
  assert loaded.quant.enabled and type(model).__name__ == "QResNet"
  # started from the float run's weights, not from a fresh init
  _, fp_vars, _ = train.load_checkpoint(str(d / "work"))
  k_fp = np.asarray(fp_vars["params"]["stage1_block0"]["conv1"]["kernel"])
  k_q = np.asarray(variables["params"]["stage1_block0"]["conv1"]["kernel"])
  assert np.abs(k_q - k_fp).max() < 0.1 * np.abs(k_fp).max()
  spec = data.get_spec("digits")
  images, labels = data.load_arrays("digits", "test")
  prog = P.to_program(model, variables, spec.image_shape)
  x = data.normalize(images, spec)
  int_pred = np.asarray(P.run(prog, P.quantize_input(prog, x))).argmax(-1)
  fake_pred = np.asarray(jax.jit(model.apply)(variables, x)).argmax(-1)
  assert np.mean(int_pred == fake_pred) >= 0.95
  assert abs(np.mean(fake_pred == labels) - result["test_accuracy"]) < 1e-6


# ----------------------------------------------------------------------------- the run's record


def tensorboard_scalars(logdir):
  """[(tag, step)] of every scalar in the event files of `logdir` (TFRecord framing parsed
  here; the Event protos by tensorboardX's own classes)."""
  import struct

  from tensorboardX.proto import event_pb2

  found = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("Q", data[i:i + 8])
      assert i + 16 + n <= len(data), f"torn record in {name}"
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      found += [(v.tag, event.step) for v in event.summary.value]
  return found


def metric_pairs(workdir):
  rows = train.read_metrics(str(workdir / "metrics.jsonl"))
  return [(k, r["step"]) for r in rows for k in r if k != "step"]


def test_kills_in_an_evaluation_and_a_tensorboard_write_leave_every_step_once(reference,
                                                                            tmp_path):
  _, _, ref = reference
  work = tmp_path / "work"
  # Dies in the middle of the 2nd evaluation (step 16: its row and checkpoint never written),
  # then, resumed, in the middle of writing the 30th TensorBoard record (a torn event file).
  proc, _ = run(work, tmp_path / "a.npz", eval_every=8, kill_in_eval=2, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert sorted(os.listdir(work / "checkpoints"))[-1] == "8"
  proc, _ = run(work, tmp_path / "b.npz", eval_every=8, kill_in_tb_write=30, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  with pytest.raises(AssertionError, match="torn record"):
    tensorboard_scalars(work / "tensorboard")
  _, result = run(work, tmp_path / "p.npz", eval_every=8)
  assert result["resumed_from"] > 8
  rows = train.read_metrics(str(work / "metrics.jsonl"))
  assert [r["step"] for r in rows if "train_loss" in r] == [8, 16, 24, 32, 40]
  assert [r["step"] for r in rows if "test_accuracy" in r] == [8, 16, 24, 32, 40]
  pairs = metric_pairs(work)
  assert len(pairs) == len(set(pairs))
  assert sorted(tensorboard_scalars(work / "tensorboard")) == sorted(pairs)
  got = dict(np.load(tmp_path / "p.npz"))  # evaluations and kills change nothing trained
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_diverging_run_stops_and_keeps_finite_checkpoints(tmp_path):
  work = tmp_path / "work"
  import re

  # Every step from 13 on is non-finite (an infinite learning rate: a large finite one diverges
  # at a step that depends on the CPU's rounding): the run must stop with an error naming steps
  # 13-18 and keep only checkpoints from before the streak (8; 16 would be inside it).
  proc, _ = run(work, tmp_path / "p.npz", diverge_at=13, check=False)
  assert proc.returncode != 0
  m = re.search(r"TrainingDivergedError: training diverged: .* at 6 consecutive steps "
                r"\(steps (\d+)-(\d+)\); each was skipped .* The last checkpoint, step (\d+),",
                proc.stderr)
  assert m, proc.stderr[-3000:]
  first_bad, last_bad, kept = map(int, m.groups())
  assert (first_bad, last_bad, kept) == (13, 18, 8), m.groups()
  manager = train.checkpoint_manager(str(work), create=False)
  steps = list(manager.all_steps())
  manager.close()
  assert steps and max(steps) == kept < first_bad  # nothing saved inside the streak
  for step in steps:
    _, variables, _ = train.load_checkpoint(str(work), step)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
      assert np.isfinite(np.asarray(leaf)).all(), (step, jax.tree_util.keystr(path))


def test_nonfinite_step_keeps_the_whole_state():
  import optax
  from grassq import data

  config = digits_smoke.get_config()
  config.head = "grassmann"
  config.head_kwargs.subspace_dim = 2
  spec = data.get_spec("digits")
  model = train.build_model(config, 10)
  images, labels = data.load_arrays("digits", "train")
  batch = {"image": images[:8], "label": labels[:8]}
  key = jax.random.key(0)
  for lr, finite in ((float("inf"), False), (0.1, True)):
    tx = train.make_optimizer(config, optax.constant_schedule(lr))
    state = train.create_train_state(key, model, tx, spec.image_shape)
    step = jax.jit(lambda s, b, k: train.train_step(s, b, k, model=model, tx=tx, spec=spec,
                                                    config=config))
    new, metrics = step(state, batch, key)
    assert bool(metrics["finite"]) is finite and int(new.step) == 1
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)),
                                  (state.params, state.batch_stats, state.opt_state),
                                  (new.params, new.batch_stats, new.opt_state))
    assert all(jax.tree_util.tree_leaves(same)) is (not finite)


def test_refused_resume_keeps_the_record_and_overrides_are_kept(reference, tmp_path):
  d, _, _ = reference
  work = tmp_path / "work"
  shutil.copytree(d / "work", work)
  before = (work / "config.json").read_bytes()
  config = digits_smoke.get_config()
  config.model_kwargs.num_filters = 8
  with pytest.raises(train.CheckpointError, match="does not match"):
    train.train_and_evaluate(config, str(work))
  assert (work / "config.json").read_bytes() == before
  train.load_checkpoint(str(work))  # the run is still loadable
  config = digits_smoke.get_config()
  config.num_train_steps = 48  # a harmless override: train 8 steps more
  result = train.train_and_evaluate(config, str(work))
  assert result["resumed_from"] == 40 and result["step"] == 48
  assert json.loads((work / "config.json").read_text())["num_train_steps"] == 48
  (entry,) = [json.loads(l) for l in open(work / "config_history.jsonl")]
  assert entry["until_step"] == 40 and entry["changed"] == ["num_train_steps"]
  assert entry["config"] == json.loads(before)


def test_torn_metrics_line_resumes_and_a_damaged_one_is_named(tmp_path):
  rows = [{"step": 8, "train_loss": 1.5}, {"step": 16, "train_loss": 1.2}]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 24, "train_lo')
  assert train.read_metrics(str(path)) == rows
  writer = train.MetricsWriter(str(tmp_path), resume_step=16)
  writer.write(24, {"train_loss": 1.0})
  writer.close()
  assert [r["step"] for r in train.read_metrics(str(path))] == [8, 16, 24]
  assert sorted(tensorboard_scalars(tmp_path / "tensorboard")) == [
      ("train_loss", 8), ("train_loss", 16), ("train_loss", 24)]
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], lines[1][:5], lines[2]]) + "\n")
  from grassq import files
  with pytest.raises(files.CorruptFileError, match=r"metrics.jsonl, line 2"):
    train.MetricsWriter(str(tmp_path), resume_step=16)


def test_truncated_config_is_a_checkpoint_error_naming_the_file(reference, tmp_path):
  d, _, _ = reference
  work = tmp_path / "work"
  shutil.copytree(d / "work", work, ignore=shutil.ignore_patterns("checkpoints"))
  text = (work / "config.json").read_text()
  (work / "config.json").write_text(text[:len(text) // 2])
  with pytest.raises(train.CheckpointError, match=r"config.json is not valid JSON"):
    train.load_checkpoint(str(work))


def test_a_run_with_no_steps_is_refused(tmp_path):
  config = digits_smoke.get_config()
  config.num_train_steps = -1
  config.num_epochs = 0.0
  with pytest.raises(ValueError, match="gives no training step"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")
