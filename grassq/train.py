"""Training: train state, jitted steps, data-parallel sharding, orbax checkpoints.

Read top to bottom: `default_config` lists every knob; `make_optimizer` builds the optax chain;
`train_step` / `eval_step` are pure functions that `train_and_evaluate` jits over a device mesh;
`load_checkpoint` / `predict` / `evaluate_checkpoint` are the public API for a saved run.

Parallelism: one 1-D mesh axis ``data`` over every device of every process. The train state is
replicated, batches are sharded along their leading axis, and XLA's SPMD partitioner inserts the
gradient all-reduce (and the cross-device BatchNorm statistics), so a run on N devices computes
the same function as on one device. Multi-host: call ``jax.distributed.initialize()`` first
(``config.distributed = True`` does it); each process then feeds its slice of every global batch.

Exact resume: the data order is a pure function of (seed, step) and the augmentation key is
``fold_in(key, step)``, so restoring a checkpoint at step s and continuing reproduces the
uninterrupted run bit for bit.

What a run writes stays consistent under a kill at any moment: ``config.json`` is written only
after the checkpoint it describes was restored (a refused resume leaves it untouched, and a
changed config on resume keeps the old one in ``config_history.jsonl``); the metrics of step s
(training summary and evaluation) are on disk, fsync'ed, before the checkpoint of step s is
saved; on resume ``metrics.jsonl`` is cut back to the restored step and ``tensorboard/`` is
rebuilt from it, so every row and every TensorBoard scalar appears exactly once.

Non-finite steps: a step whose loss, gradients, new parameters or new batch statistics are not
all finite leaves the whole train state as it was (the step counter still advances, so the data
order is unchanged); after ``config.max_nonfinite_steps`` such steps in a row the run stops with
`TrainingDivergedError`, and no checkpoint is saved while such a streak lasts, so the checkpoints
it keeps are the last finite states.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import flax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grassq import data as gdata
from grassq import files
from grassq import models

PyTree = Any


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, or does not fit the model being restored."""


class TrainingDivergedError(FloatingPointError):
  """Too many consecutive training steps had a non-finite loss, gradient or parameter."""


# ----------------------------------------------------------------------------- configuration


def default_config() -> ml_collections.ConfigDict:
  """Every training knob with its default. Experiment configs start from this and override."""
  c = ml_collections.ConfigDict()
  c.dataset = gdata.DEFAULT_DATASET
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.model = "resnet20"
  c.model_kwargs = ml_collections.ConfigDict()
  c.head = "linear"
  c.head_kwargs = ml_collections.ConfigDict()
  c.dtype = "float32"  # compute dtype; parameters stay float32

  c.seed = 0
  c.batch_size = 128  # global, over all devices and processes
  c.eval_batch_size = 500
  c.num_epochs = 1.0
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.augment = True

  c.optimizer = "sgd"  # sgd | adamw | lamb
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 5e-4  # masked off BatchNorm parameters and biases
  c.grad_clip_norm = 0.0  # 0 disables
  c.schedule = "cosine"  # cosine | step | constant
  c.warmup_epochs = 0.0
  c.step_epochs = (30.0, 60.0, 90.0)  # for schedule="step"
  c.step_factor = 0.1
  c.label_smoothing = 0.0
  # Batch-level Mixup / CutMix on device (grassq.data.mixup_cutmix); 0 disables each.
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.mixup_switch_prob = 0.5  # P(CutMix) when both are enabled
  # Grassmann head (head="grassmann"): its bases get Riemannian SGD with their own learning
  # rate, following the network's schedule shape; no weight decay or clipping on them.
  c.grassmann_learning_rate = 0.1
  c.grassmann_momentum = 0.9
  c.grassmann_retraction = "qr"  # qr | qr_householder | qr_cholesky | polar | exp | geodesic
  # "grassq": `optim.riemannian_sgd` with the retraction above every step (the default, see
  # docs/differences.md); "released": `optim.released_rsgd`, the released GCR code's geodesic
  # step with torch's unsigned QR every `grassmann_reorth_every` steps (its RSGD: 5; its AdamW
  # and LAMB wrappers: 1). Either way the bases' rate is grassmann_learning_rate at the
  # schedule's peak and follows the network's schedule (the released lr_factor coupling).
  c.grassmann_update = "grassq"
  c.grassmann_reorth_every = 5

  # HAWQV3 quantization-aware training (grassq.quant.qresnet): a per-layer bit dict; layers
  # not in it get default_bits, except the first conv and the classifier (8 unless given).
  c.quant = ml_collections.ConfigDict()
  c.quant.enabled = False
  c.quant.bits = ml_collections.ConfigDict()
  c.quant.default_bits = 8
  c.quant.act_bits = ml_collections.ConfigDict()
  c.quant.default_act_bits = 0  # 0: each layer's activations at its weight bits (W4A8: 8)
  c.quant.hawq_signed8 = False
  c.quant.fix_bn = False
  # Training-time statistics (grassq.quant.qat.SEMANTICS): "grassq" (BatchNorm momentum 0.9,
  # biased batch variance, range EMA 0.99) or "hawq" (HAWQV3's code: 0.99, unbiased, 0.95).
  c.quant.semantics = "grassq"
  # Start from another run's weights (e.g. a float checkpoint for QAT); ignored when resuming.
  c.init_from = ml_collections.FieldReference(None, field_type=str)

  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.eval_every_epochs = 1.0
  c.progress_bar = True
  # Steps with a non-finite loss/gradient/parameter are skipped (the state is kept); more than
  # this many in a row stop the run with TrainingDivergedError. 0 stops at the first one; -1
  # turns the guard off (non-finite values then spread silently: for measuring its cost).
  c.max_nonfinite_steps = 5
  c.distributed = False  # call jax.distributed.initialize() (multi-host)
  return c


# ----------------------------------------------------------------------------- state


@struct.dataclass
class TrainState:
  """What a checkpoint holds: everything needed to continue a run bit for bit."""

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """The float model of `config`, or its QAT twin when ``config.quant.enabled``."""
  model = models.create_model(
      config.model,
      num_classes=num_classes,
      head=config.head,
      dtype=jnp.dtype(config.dtype),
      head_kwargs=flax.core.FrozenDict(config.head_kwargs.to_dict()),
      **dict(config.model_kwargs),
  )
  if config.quant.enabled:
    model = _qat_module(model).quantized(
        model, bits=config.quant.bits.to_dict(), default_bits=config.quant.default_bits,
        act_bits=config.quant.act_bits.to_dict(),
        default_act_bits=config.quant.default_act_bits,
        hawq_signed8=config.quant.hawq_signed8, fix_bn=config.quant.fix_bn,
        semantics=config.quant.get("semantics", "grassq"))
  return model


def _qat_module(model):
  """The grassq.quant module holding `model`'s QAT twin (qinception for InceptionV3)."""
  from grassq.models.inception import InceptionV3
  from grassq.quant import qinception, qresnet

  return qinception if isinstance(model, InceptionV3) else qresnet


def initial_variables(config, state: TrainState) -> dict:
  """The weights of ``config.init_from`` (a run directory), mapped onto this model's variables."""
  _, variables, source = load_checkpoint(config.init_from)
  if config.quant.enabled and not source.quant.enabled:
    float_model = build_model(source, 1)
    return _qat_module(float_model).from_float(variables, state.variables())
  return variables


# Transformer parameters that are not weights of a layer: no weight decay (as DeiT and Swin).
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "relative_position_bias_table")


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for conv/dense kernels; False for parameters with ndim <= 1 (BatchNorm and
  LayerNorm scales/offsets, biases, layer scales) and those named in `NO_WEIGHT_DECAY`."""

  def decayed(path, p):
    return p.ndim > 1 and _path_name(path).rsplit("/", 1)[-1] not in NO_WEIGHT_DECAY

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  base = config.learning_rate
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  decay_steps = max(total_steps - warmup, 1)
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(base, decay_steps)
  elif config.schedule == "step":
    boundaries = {
        int(round(e * steps_per_epoch)) - warmup: config.step_factor for e in config.step_epochs
    }
    main = optax.piecewise_constant_schedule(base, {k: v for k, v in boundaries.items() if k > 0})
  elif config.schedule == "constant":
    main = optax.constant_schedule(base)
  else:
    raise ValueError(f"unknown schedule {config.schedule!r}; available: cosine, step, constant")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The network's optax chain: optional clipping, masked weight decay, then the optimizer.

  With the Grassmann head, the class bases are split off to `grassq.optim.riemannian_sgd`.
  """
  wd = config.weight_decay
  if config.optimizer == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask=weight_decay_mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=wd, mask=weight_decay_mask)
  elif config.optimizer == "lamb":
    tx = optax.lamb(schedule, b1=config.b1, b2=config.b2, weight_decay=wd, mask=weight_decay_mask)
  else:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; available: sgd, adamw, lamb")
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.head == "grassmann":
    from grassq import optim

    ratio = config.grassmann_learning_rate / config.learning_rate
    update = config.get("grassmann_update", "grassq")
    if update == "released":
      bases_tx = optim.released_rsgd(
          schedule, momentum=config.grassmann_momentum,
          reorthonormalize_every=config.get("grassmann_reorth_every", 5), lr_factor=ratio)
    elif update == "grassq":
      bases_tx = optim.riemannian_sgd(
          lambda count: ratio * schedule(count),
          momentum=config.grassmann_momentum,
          retraction=config.grassmann_retraction,
      )
    else:
      raise ValueError(f"unknown grassmann_update {update!r}; available: grassq, released")
    tx = optim.with_grassmann(tx, bases_tx)
  return tx


def create_train_state(rng, model, tx, image_shape: Sequence[int]) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
  )


# ----------------------------------------------------------------------------- steps


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


# Keys of a step beside `augment`'s: the 'dropout' RNG (stochastic depth) and Mixup/CutMix's are
# fold_in(step_key, stream). `augment` gives example i split(step_key, B)[i], which equals
# fold_in(step_key, i): the streams are indices that no batch reaches.
DROPOUT_STREAM, MIXUP_STREAM = 0xFFFFFFFF, 0xFFFFFFFE


def train_step(state: TrainState, batch, key, *, model, tx, spec, config) -> tuple[TrainState, dict]:
  """One optimizer step on a (sharded) global batch of uint8 images. Pure; jit it."""
  images = batch["image"]
  step_key = jax.random.fold_in(key, state.step)
  dropout_key = jax.random.fold_in(step_key, DROPOUT_STREAM)
  if config.augment:
    images = gdata.augment(step_key, images, spec)
  targets = jax.nn.one_hot(batch["label"], spec.num_classes)
  if config.label_smoothing:
    targets = optax.smooth_labels(targets, config.label_smoothing)
  images, targets = gdata.mixup_cutmix(
      jax.random.fold_in(step_key, MIXUP_STREAM), gdata.normalize(images, spec), targets,
      config.get("mixup_alpha", 0.0), config.get("cutmix_alpha", 0.0),
      config.get("mixup_switch_prob", 0.5))
  images = images.astype(jnp.dtype(config.dtype))

  def loss_fn(params):
    logits, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": dropout_key},
    )
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The guard over the whole update: a non-finite loss, gradient, parameter or BatchNorm
  # statistic keeps every part of the state (optax.apply_if_finite would guard the optimizer
  # alone and let NaN batch statistics through).
  if config.get("max_nonfinite_steps", 5) >= 0:
    finite = jnp.isfinite(loss) & all_finite((grads, params, batch_stats))
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new,
                                                   old)
  else:
    finite, keep = jnp.array(True), lambda new, old: new
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "finite": finite,
  }
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats), opt_state=keep(opt_state, state.opt_state)
  )
  return new_state, metrics


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (a scalar bool array)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def eval_step(variables, batch, *, model, spec, dtype="float32") -> dict:
  """Sums over the valid (mask=True) examples of a padded batch: correct, loss, count."""
  images = gdata.normalize(batch["image"], spec).astype(jnp.dtype(dtype))
  logits = model.apply(variables, images, train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"], spec.num_classes)
  correct = (jnp.argmax(logits, -1) == batch["label"]) & mask
  return {
      "correct": jnp.sum(correct),
      "loss": jnp.sum(jnp.where(mask, loss, 0.0)),
      "count": jnp.sum(mask),
  }


# ----------------------------------------------------------------------------- devices


def make_mesh(devices=None) -> Mesh:
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, ("data",))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise ValueError(
        f"{what}={batch_size} is not divisible by the number of devices ({n}); "
        f"choose a multiple of {n}."
    )
  if batch_size % jax.process_count():
    raise ValueError(f"{what}={batch_size} is not divisible by the process count")


def _host_batches(images, labels, index_iter, with_mask: bool = False):
  """Host batches for this process: its contiguous slice of every global batch."""
  pc, pi = jax.process_count(), jax.process_index()
  for item in index_iter:
    idx, mask = item if with_mask else (item, None)
    local = len(idx) // pc
    sl = slice(pi * local, (pi + 1) * local)
    batch = {"image": images[idx[sl]], "label": labels[idx[sl]]}
    if with_mask:
      batch["mask"] = mask[sl]
    yield batch


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, config=None, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if config is None else config.keep_checkpoints,
      save_interval_steps=1 if config is None else max(config.checkpoint_every_steps, 1),
      create=create,
  )
  return ocp.CheckpointManager(
      files.join(files.abspath(workdir), "checkpoints"),
      options=options,
      item_handlers=ocp.StandardCheckpointHandler(),
  )


def _path_name(path) -> str:
  """'params/stage1_block0/conv1/kernel' for dict keys, attributes and sequence indices alike."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def _flatten_shapes(tree) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): tuple(np.shape(leaf)) for path, leaf in flat}


def restore_state(manager: ocp.CheckpointManager, target: TrainState, step: int | None = None):
  """Restores `step` (default: latest) into the structure, shapes and shardings of `target`."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint found in {manager.directory}")
  where = f"checkpoint step {step} in {manager.directory}"
  try:
    meta = manager.item_metadata(step)
  except Exception as e:  # unreadable metadata: truncated or corrupt files
    raise CheckpointError(f"{where} is corrupt or unreadable: {type(e).__name__}: {e}") from e
  saved_tree = getattr(meta, "tree", meta)
  if saved_tree is not None:
    saved = _flatten_shapes(saved_tree)
    wanted = _flatten_shapes(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    wrong = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if missing or extra or wrong:
      lines = [f"{where} does not match the model being restored:"]
      lines += [f"  missing in checkpoint: {k}" for k in missing[:8]]
      lines += [f"  not in model: {k}" for k in extra[:8]]
      lines += [f"  shape {k}: checkpoint {saved[k]} vs model {wanted[k]}" for k in wrong[:8]]
      raise CheckpointError("\n".join(lines))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target,
  )
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:
    raise CheckpointError(f"{where} is corrupt or unreadable: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------- metrics


def read_metrics(path: str) -> list[dict]:
  """The rows of a run's ``metrics.jsonl``. A torn last line (a kill in the middle of a write)
  is dropped; any other line that is not JSON raises `files.CorruptFileError` naming it."""
  if not files.exists(path):
    return []
  lines = files.read_text(path).splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        break  # torn by a kill: its step is after the last checkpoint and is recomputed
      raise files.CorruptFileError(
          f"{path}, line {i + 1}, is not JSON: the metrics file was damaged; remove that line "
          "(or the file) to resume") from None
  return rows


class MetricsWriter:
  """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard event files.

  ``metrics.jsonl`` is the record; ``tensorboard/`` is derived from it. On opening, rows after
  `resume_step` (logged by a killed run after its last checkpoint: they are recomputed) are
  dropped and the event files are rebuilt from the rows that remain, so a kill at any moment,
  even in the middle of a TensorBoard flush, leaves every scalar step exactly once. `flush`
  puts everything written so far on disk; the training loop calls it before each checkpoint.
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = files.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    if files.exists(self.path):
      files.atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows))
    from tensorboardX import SummaryWriter

    tb_dir = files.join(workdir, "tensorboard")
    with files.atomic_dir(tb_dir, overwrite=True) as tmp:
      replay = SummaryWriter(tmp, filename_suffix=".replay")
      for row in rows:
        self._add(replay, row)
      replay.close()
    self._tb = SummaryWriter(tb_dir)

  @staticmethod
  def _add(tb, row):
    for k, v in row.items():
      if k != "step":
        tb.add_scalar(k, float(v), int(row["step"]))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    self._add(self._tb, row)

  def flush(self) -> None:
    """Metrics rows and TensorBoard events written so far, on disk (fsync'ed)."""
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path, "a") as f:
        os.fsync(f.fileno())
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


# ----------------------------------------------------------------------------- the loop


def _config_to_json(config) -> dict:
  return json.loads(config.to_json())


def config_from_json(obj: Mapping) -> ml_collections.ConfigDict:
  """Inverse of the ``config.json`` a run writes (JSON lists come back as tuples)."""

  def tuples(x):
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x

  config = default_config()
  config.update(ml_collections.ConfigDict(tuples(dict(obj))))
  return config


def make_eval_fn(model, spec, dtype="float32"):
  return jax.jit(lambda v, b: eval_step(v, b, model=model, spec=spec, dtype=dtype))


def evaluate(eval_fn, variables, images, labels, *, mesh, batch_size) -> dict:
  """Top-1 accuracy and mean loss of `variables` on in-memory (images, labels)."""
  check_batch_size(batch_size, mesh, "eval_batch_size")
  sharding = NamedSharding(mesh, P("data"))
  totals = {"correct": 0, "loss": 0.0, "count": 0}
  batches = _host_batches(images, labels, gdata.eval_batches(len(labels), batch_size), True)
  for batch in gdata.prefetch_to_device(batches, sharding):
    out = jax.device_get(eval_fn(variables, batch))
    for k in totals:
      totals[k] += out[k].item()
  return {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss"] / totals["count"]}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Iterable[Callable[[int, TrainState], None]] = (),
    devices=None,
) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics.

  Writes ``config.json``, ``checkpoints/`` (orbax), ``metrics.jsonl`` and ``tensorboard/``
  (consistent under a kill at any moment: see the module docstring). `hooks` are called as
  ``hook(step, state)`` after every step (on the host; they see a state that may still be
  computing).

  Raises:
    CheckpointError: the workdir's checkpoint does not fit `config` (nothing is written).
    TrainingDivergedError: more than ``config.max_nonfinite_steps`` non-finite steps in a row.
    ValueError: a config that gives no training step, or bad batch sizes.
  """
  if config.distributed:
    jax.distributed.initialize()
  workdir = files.abspath(workdir)
  spec = gdata.get_spec(config.dataset)
  mesh = make_mesh(devices)
  check_batch_size(config.batch_size, mesh)
  check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")

  train_images, train_labels = gdata.load_arrays(config.dataset, spec.train_split, config.data_dir)
  test_images, test_labels = gdata.load_arrays(config.dataset, spec.eval_split, config.data_dir)
  steps_per_epoch = gdata.steps_per_epoch(len(train_labels), config.batch_size)
  if config.num_train_steps > 0:
    total_steps = int(config.num_train_steps)
  else:
    total_steps = int(round(config.num_epochs * steps_per_epoch))
  if total_steps <= 0:
    raise ValueError(f"num_epochs={config.num_epochs} with {steps_per_epoch} steps per epoch "
                     f"(num_train_steps={config.num_train_steps}) gives no training step; "
                     "choose num_epochs > 0 or num_train_steps > 0")
  eval_every = max(int(round(config.eval_every_epochs * steps_per_epoch)), 1)
  save_every = max(config.checkpoint_every_steps, 1)
  max_bad = int(config.get("max_nonfinite_steps", 5))

  model = build_model(config, spec.num_classes)
  schedule = make_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  key = jax.random.key(config.seed)
  init_key, train_key = jax.random.split(key)
  init = jax.jit(
      lambda k: create_train_state(k, model, tx, spec.image_shape), out_shardings=replicated
  )
  state = init(init_key)

  is_main = jax.process_index() == 0
  files.makedirs(workdir)
  manager = checkpoint_manager(workdir, config)
  resumed_from = manager.latest_step()
  try:
    if resumed_from is not None:
      state = restore_state(manager, state, resumed_from)
    elif config.init_from:
      variables = jax.device_put(initial_variables(config, state), replicated)
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                            opt_state=jax.jit(tx.init, out_shardings=replicated)(
                                variables["params"]))
  except BaseException:
    manager.close()
    raise
  start = int(jax.device_get(state.step))
  if is_main:  # only now: a refused resume must leave the run's record as it was
    _record_config(workdir, config, start)
  writer = MetricsWriter(workdir, resume_step=start, enabled=is_main)

  eval_fn = make_eval_fn(model, spec, config.dtype)
  step_fn = jax.jit(
      lambda s, b, k: train_step(s, b, k, model=model, tx=tx, spec=spec, config=config),
      donate_argnums=0,
      out_shardings=(replicated, replicated),
  )
  index_iter = gdata.train_batches(len(train_labels), config.batch_size, config.seed, start)
  batches = gdata.prefetch_to_device(
      _host_batches(train_images, train_labels, index_iter), batch_sharding
  )

  bar = None
  if config.progress_bar and is_main:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)

  guard = _FiniteGuard(max_bad, lambda: manager.latest_step())
  pending: list = []
  t_last, step_last = time.perf_counter(), start
  eval_metrics: dict = {}
  save_due = False
  try:
    for step in range(start, total_steps):
      batch = next(batches)
      state, metrics = step_fn(state, batch, train_key)
      pending.append(metrics)
      guard.add(step + 1, metrics["finite"])
      for hook in hooks:
        hook(step + 1, state)
      done = step + 1
      guard.check(done - 2)  # two steps behind: flags that are computed, so no stall
      row = {}
      if done % config.log_every_steps == 0 or done == total_steps:
        host = jax.device_get(pending)
        ok = [bool(m["finite"]) for m in host]
        now = time.perf_counter()
        ips = (done - step_last) * config.batch_size / (now - t_last)
        t_last, step_last = now, done
        mean = lambda key: float(np.mean([m[key] for m, f in zip(host, ok) if f])) if any(
            ok) else float("nan")
        summary = {
            "train_loss": mean("loss"),
            "train_accuracy": mean("accuracy"),
            "learning_rate": float(schedule(done - 1)),
            "images_per_sec": ips,
            "epoch": done / steps_per_epoch,
            "skipped_steps": float(len(ok) - sum(ok)),
        }
        pending = []
        row.update(summary)
        if bar is not None:
          bar.set_postfix(
              loss=f"{summary['train_loss']:.3f}", img_s=f"{ips:.0f}", refresh=False
          )
      if bar is not None:
        bar.update(1)
      evaluating = done % eval_every == 0 or done == total_steps
      save_due = save_due or done % save_every == 0 or done == total_steps
      if save_due or evaluating:
        guard.check(done)
      if evaluating:  # the state is finite even inside a streak: the last finite one
        res = evaluate(eval_fn, state.variables(), test_images, test_labels, mesh=mesh,
                       batch_size=config.eval_batch_size)
        eval_metrics = {"test_accuracy": res["accuracy"], "test_loss": res["loss"]}
        row.update(eval_metrics, epoch=done / steps_per_epoch)
        if bar is not None:
          bar.write(f"step {done} (epoch {done / steps_per_epoch:.2f}): "
                    f"test accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}")
      if row:
        writer.write(done, row)  # one row per step: training summary and evaluation together
      # A checkpoint only after the metrics of its step are on disk (a kill in between
      # recomputes both), and never inside a streak of skipped steps (deferred to the next
      # finite step; the last step is always saved).
      if save_due and (guard.clean or done == total_steps):
        writer.flush()
        manager.save(done, args=ocp.args.StandardSave(state), force=True)
        save_due = False
    guard.check(total_steps)
    if start >= total_steps and resumed_from is not None:
      res = evaluate(eval_fn, state.variables(), test_images, test_labels, mesh=mesh,
                     batch_size=config.eval_batch_size)
      eval_metrics = {"test_accuracy": res["accuracy"], "test_loss": res["loss"]}
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if bar is not None:
      bar.close()
    batches.close() if hasattr(batches, "close") else None
  return {"step": total_steps, "resumed_from": resumed_from or 0, **eval_metrics, "state": state}


class _FiniteGuard:
  """Host side of the non-finite step guard: reads each step's ``finite`` flag (lagging, so
  the device pipeline keeps running) and raises `TrainingDivergedError` after too many
  non-finite steps in a row. `clean` is False while such a streak lasts."""

  def __init__(self, max_bad: int, last_checkpoint: Callable[[], int | None]):
    self.max_bad, self.last_checkpoint = max_bad, last_checkpoint
    self.flags: list = []
    self.bad = 0

  def add(self, step, flag):
    self.flags.append((step, flag))

  def check(self, upto: int):
    if self.max_bad < 0:
      self.flags.clear()
      return
    while self.flags and self.flags[0][0] <= upto:
      step, flag = self.flags.pop(0)
      self.bad = 0 if bool(jax.device_get(flag)) else self.bad + 1
      if self.bad > self.max_bad:
        raise TrainingDivergedError(
            f"training diverged: the loss, a gradient or a parameter was not finite at "
            f"{self.bad} consecutive steps (steps {step - self.bad + 1}-{step}); each was "
            f"skipped (max_nonfinite_steps={self.max_bad}). {self._kept()}; lower the learning "
            "rate or clip gradients (grad_clip_norm) and resume or restart")

  def _kept(self):
    last = self.last_checkpoint()
    if last is None:
      return "No checkpoint was saved before it"
    return f"The last checkpoint, step {last}, holds the last finite state"

  @property
  def clean(self) -> bool:
    return self.bad == 0


def _record_config(workdir: str, config, step: int) -> None:
  """Writes ``config.json``; a different config already there (a resume with overrides) is
  appended to ``config_history.jsonl`` with the step it ran up to, and the change is logged."""
  path = files.join(workdir, "config.json")
  new = _config_to_json(config)
  if files.exists(path):
    try:
      old = files.read_json(path, "run config")
    except files.CorruptFileError:
      old = None  # replaced by the config that the restored checkpoint now runs under
    if old == new:
      return
    if old is not None:
      changed = sorted(_changed_fields(old, new))
      logging.warning("%s: resuming at step %d with changed config fields %s; the previous "
                      "config is kept in config_history.jsonl", workdir, step, changed)
      history = files.join(workdir, "config_history.jsonl")
      lines = files.read_text(history) if files.exists(history) else ""
      entry = json.dumps({"until_step": step, "changed": changed, "config": old})
      files.atomic_write(history, lines + entry + "\n")
  files.write_json(path, new, sort_keys=True)


def _changed_fields(old, new, prefix=""):
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      yield from _changed_fields(a, b, f"{prefix}{k}.")
    elif a != b:
      yield prefix + k


# ----------------------------------------------------------------------------- saved runs


def load_checkpoint(workdir: str, step: int | None = None):
  """Loads a saved run: returns (model, variables, config). Raises CheckpointError on problems."""
  cfg_path = files.join(workdir, "config.json")
  if not files.exists(cfg_path):
    raise CheckpointError(f"{workdir} is not a grassq run directory (no config.json)")
  try:
    config = config_from_json(files.read_json(cfg_path, "run config"))
  except files.CorruptFileError as e:
    raise CheckpointError(f"{e}. Restore it from a copy, or rewrite it with the config the run "
                          "was started with (experiments/configs/...)") from None
  spec = gdata.get_spec(config.dataset)
  model = build_model(config, spec.num_classes)
  # The optimizer state's structure depends only on the optimizer, not on the schedule values.
  tx = make_optimizer(config, optax.constant_schedule(config.learning_rate))
  target = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, tx, spec.image_shape))
  target = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), target)
  manager = checkpoint_manager(workdir, create=False)
  try:
    state = restore_state(manager, target, step)
  finally:
    manager.close()
  return model, state.variables(), config


def predict(model, variables, images, dataset: str, batch_size: int = 500, dtype="float32",
            features: bool = False):
  """Logits (N, C) for uint8 images (N, H, W, C) of `dataset`'s format.

  With ``features=True`` returns the pre-logit features (N, n) instead (for analysis and
  linear probes).
  """
  spec = gdata.get_spec(dataset)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1:] != tuple(spec.image_shape):
    raise ValueError(f"images must have shape (N, {', '.join(map(str, spec.image_shape))}), "
                     f"got {images.shape}")

  @jax.jit
  def fn(v, x):
    logits, feats = model.apply(v, gdata.normalize(x, spec).astype(dtype), train=False,
                                return_features=True)
    return feats if features else logits

  outs = []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    pad = batch_size - len(chunk)
    chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
    outs.append(np.asarray(fn(variables, chunk))[: batch_size - pad])
  return np.concatenate(outs)


def evaluate_checkpoint(workdir: str, dataset: str | None = None, split: str | None = None,
                        data_dir: str | None = None, step: int | None = None) -> dict:
  """Accuracy and loss of a saved run on a dataset split (default: its own test split)."""
  model, variables, config = load_checkpoint(workdir, step)
  dataset = dataset or config.dataset
  spec = gdata.get_spec(dataset)
  trained = gdata.get_spec(config.dataset)
  if spec.image_shape != trained.image_shape or spec.num_classes != trained.num_classes:
    raise ValueError(f"run was trained on {config.dataset} {trained.image_shape}/"
                     f"{trained.num_classes} classes; {dataset} is {spec.image_shape}/"
                     f"{spec.num_classes} classes")
  images, labels = gdata.load_arrays(dataset, split or spec.eval_split, data_dir or config.data_dir)
  mesh = make_mesh()
  bs = config.eval_batch_size
  return evaluate(make_eval_fn(model, spec, config.dtype), variables, images, labels, mesh=mesh,
                  batch_size=bs)
