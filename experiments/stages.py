"""The stages the experiments share, free of command-line flags.

`experiments.quantize`, `experiments.mixed_precision` and the main job (`experiments.main`) are
thin drivers over these: QAT fine-tuning of a float run followed by integer-only evaluation
(`run_qat`), Hessian-trace sensitivities (`hessian_sensitivity`), ILP bit allocations
(`allocations`) and the TVM build with its bit-exact check on the test set
(`deploy_and_check`, also behind `experiments.deploy`). Every file they write goes through
`grassq.files` (atomic: a kill leaves the old file or the new one); a stage cache that cannot be
read is recomputed (`read_cache`, `cached`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from grassq import files

BITS = (4, 8)  # the bit-widths the mixed-precision ILP chooses from


def read_cache(path: str, what: str = "stage cache", remedy: str = "it is recomputed"):
  """The JSON object in `path`, or None when there is none or it cannot be read.

  An unreadable file (truncated by a kill or a full disk, edited, not a JSON object) is not an
  error: a warning naming it is printed and the caller recomputes what it held.

  Args:
    path: the JSON file.
    what, remedy: for the warning ("stage cache runs/main/w8a8.json is not valid JSON ...:
      it is recomputed").

  Returns:
    the parsed dict, or None.
  """
  if not files.exists(path):
    return None
  try:
    value = files.read_json(path, what, remedy)
  except (ValueError, OSError) as e:  # CorruptFileError, or a file that is not UTF-8
    print(f"warning: {e}" if isinstance(e, files.CorruptFileError) else
          f"warning: {what} {path} cannot be read ({type(e).__name__}: {e}): {remedy}", flush=True)
    return None
  if not isinstance(value, dict):
    print(f"warning: {what} {path} holds a JSON {type(value).__name__}, not an object: {remedy}",
          flush=True)
    return None
  return value


def cached(path: str, key: Any, fn: Callable[[], Any]) -> Any:
  """fn()'s JSON result, reused from `path` when it was computed with the same `key` (JSON).

  A missing or unreadable cache, or one written for another key, is recomputed and rewritten
  atomically as ``{"key": key, "value": fn()}``.
  """
  saved = read_cache(path)
  if saved is not None and "value" in saved and saved.get("key") == json.loads(json.dumps(key)):
    print(f"reusing {path}")
    return saved["value"]
  value = fn()
  files.write_json(path, {"key": key, "value": value}, indent=1)
  return value


def save_figure(fig, path: str, **savefig_kwargs) -> None:
  """Writes a matplotlib figure to `path` atomically (format from the suffix) and closes it."""
  import matplotlib.pyplot as plt

  try:
    with files.atomic_path(path, os.path.splitext(path)[1]) as tmp:
      fig.savefig(tmp, **savefig_kwargs)
  finally:
    plt.close(fig)


def size_and_bops(qat_model, fp_model, image_shape):
  """Size (MiB) and GBOPs at the QAT model's per-layer bits, and at FP32 (grassq.quant.cost)."""
  from grassq.quant import cost

  c = cost.layer_costs(fp_model, image_shape)
  n = cost.total_params(fp_model, image_shape)
  w = {k: qat_model.weight_bits_of(k) for k in c}
  a = {k: qat_model.act_bits_of(k) for k in c}
  return dict(size_mib=cost.model_size_mib(c, w, n),
              size_fp32_mib=cost.model_size_mib(c, 32, n, other_bits=32),
              gbops=cost.bops(c, w, a) / 1e9, gbops_fp32=cost.bops(c, 32) / 1e9)


def run_qat(name, out, fp_workdir, quant, epochs, learning_rate, eval_limit=None, seed=None):
  """QAT fine-tune of `fp_workdir` with `quant` (overrides of config.quant), then integer-only.

  `seed` (default: the float run's) sets the fine-tune's data order and augmentation.

  Writes ``out/runs/name`` (resumable), ``out/programs/name`` and ``out/layers_name.json``;
  returns the result row (accuracies, integer vs fake-quant agreement and LSBs, size, BOPs).
  The integer evaluation covers the whole test set, or its first `eval_limit` images.
  """

  from grassq import data, train
  from grassq.quant import program as P

  workdir = os.path.join(out, "runs", name)
  _, _, fp_config = train.load_checkpoint(fp_workdir)
  config = fp_config.copy_and_resolve_references()
  config.quant.enabled = True
  config.quant.update(quant)
  config.init_from = fp_workdir
  config.num_epochs = epochs
  config.num_train_steps = -1
  config.learning_rate = learning_rate
  config.warmup_epochs = 0.0
  config.schedule = "cosine"
  config.eval_every_epochs = max(epochs, 1e-3)
  if seed is not None:
    config.seed = seed
  result = train.train_and_evaluate(config, workdir)
  model, variables, _ = train.load_checkpoint(workdir)
  spec = data.get_spec(config.dataset)
  program = P.to_program(model, variables, spec.image_shape)
  P.save(program, os.path.join(out, "programs", name), overwrite=True)

  images, labels = data.load_arrays(config.dataset, spec.eval_split, config.data_dir)
  images, labels = images[:eval_limit], labels[:eval_limit]
  rep = P.layer_report(program, model, variables, np.asarray(data.normalize(images, spec)))
  int_pred, fake_pred = rep["integer_pred"], rep["fake_pred"]
  acts = {k: v for k, v in rep["layers"].items() if v["bits"] <= 8}
  worst = max(acts, key=lambda k: (acts[k]["max_lsb"], acts[k]["mean_lsb"]))
  layers = {k: v for k, v in rep.items() if k not in ("integer_pred", "fake_pred")}
  files.write_json(os.path.join(out, f"layers_{name}.json"), layers, indent=1)
  row = dict(scheme=name, epochs=epochs, eval_images=int(len(labels)),
             fake_quant_accuracy=float(np.mean(fake_pred == labels)),
             integer_accuracy=float(np.mean(int_pred == labels)),
             integer_vs_fake_agreement=float(np.mean(int_pred == fake_pred)),
             max_act_lsb=acts[worst]["max_lsb"], max_act_lsb_layer=worst,
             mean_act_lsb=float(np.mean([v["mean_lsb"] for v in acts.values()])),
             qat_eval_accuracy=result.get("test_accuracy"),
             **size_and_bops(model, train.build_model(fp_config, spec.num_classes),
                             spec.image_shape))
  print(json.dumps(row), flush=True)
  return row


def parse_budget(text):
  """'bops:medium' -> ('bops', 0.5); 'size:0.3' -> ('size', 0.3).

  Raises:
    ValueError: for an unknown family or a fraction that is neither a number nor a name in
      `grassq.mixed.BUDGET_FRACTIONS`.
  """
  from grassq.mixed import BUDGET_FRACTIONS

  family, sep, frac = text.partition(":")
  if not sep or family not in ("size", "bops", "latency"):
    raise ValueError(f"budget {text!r} is not family:fraction with family size/bops/latency")
  r = BUDGET_FRACTIONS.get(frac)
  if r is None:
    try:
      r = float(frac)
    except ValueError:
      raise ValueError(f"budget {text!r}: fraction must be a number or one of "
                       f"{list(BUDGET_FRACTIONS)}") from None
  return family, r


def hessian_sensitivity(path, fp_workdir, *, batches=4, batch_size=128, tol=0.05, max_probes=96):
  """Hutchinson traces and Omega of the float run `fp_workdir`, cached in the JSON file `path`.

  The traces average over `batches` training batches of `batch_size` images; probing stops when
  every layer's relative standard error is at most `tol`, or at `max_probes`. Negative trace
  estimates count as 0 in the sensitivities and are listed under ``negative_traces``.
  """
  import jax

  from grassq import data, mixed, train

  saved = read_cache(path, "Hessian trace cache")
  if (saved is not None and saved.get("fp_workdir") == fp_workdir
      and {"sensitivity", "negative_traces"} <= set(saved)):
    print(f"reusing {path}")
    return saved
  model, variables, config = train.load_checkpoint(fp_workdir)
  spec = data.get_spec(config.dataset)
  images, labels = data.load_arrays(config.dataset, spec.train_split, config.data_dir)
  idx = data.train_batches(len(labels), batch_size, seed=1234)
  probe_batches = []
  for _ in range(batches):
    i = np.sort(next(idx))
    probe_batches.append({"image": data.normalize(images[i], spec), "label": labels[i]})
  _, traces = mixed.layer_sensitivities(
      model, variables, probe_batches, jax.random.key(0), bits=BITS, tol=tol,
      min_probes=min(16, max_probes), max_probes=max_probes)
  clipped = mixed.sensitivity(traces, mixed.folded_weights(model, variables)[0], BITS,
                              clip_negative=True)
  result = dict(
      fp_workdir=fp_workdir,
      traces={k: dict(trace_per_param=t.trace_per_param, stderr_per_param=t.stderr_per_param,
                      num_probes=t.num_probes, num_params=t.num_params)
              for k, t in traces.items()},
      sensitivity={k: {str(b): v for b, v in o.items()} for k, o in clipped.items()},
      negative_traces=[k for k, t in traces.items() if t.trace_per_param < 0])
  files.write_json(path, result, indent=1)
  return result


def allocations(sens, model, image_shape, budget_list, random_seed=None, latency=None):
  """{budget text: (family, r, bit dict)} from the ILP over the sensitivities `sens`.

  With `random_seed`, each free layer's sensitivity is replaced by a random one (Omega_4 ~ U(0, 1),
  Omega_8 = 0): a random allocation that fills the same budget, the naive baseline. `latency` is
  a measured {layer: {bits: seconds}} table for ``latency:`` budgets (`grassq.mixed.cost_tables`).
  """

  from grassq import mixed
  from grassq.quant import qresnet

  costs = mixed.cost_tables(model, image_shape, bits=BITS, latency=latency)
  pinned = {k: 8 for k in costs["size"] if k in qresnet.PINNED_8BIT}
  omega = {k: {int(b): v for b, v in o.items()} for k, o in sens.items() if k not in pinned}
  if random_seed is not None:
    rng = np.random.default_rng(random_seed)
    omega = {k: {4: float(rng.uniform()), 8: 0.0} for k in omega}
  ties = mixed.tied_layers(model, image_shape)
  out = {}
  for text in budget_list:
    family, r = parse_budget(text)
    limit = mixed.budget_from_fraction(costs[family], r, pinned=pinned, bits=BITS)
    bits = mixed.allocate_bits(omega, costs, {family: limit}, ties=ties, pinned=pinned)
    out[text] = (family, r, bits)
  return out


def plot_bits(labels, bit_dicts, order, path):
  """A grid of bits per layer (rows: `labels`, one bit dict each; columns: layers in `order`)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  layers = [k for k in order if k in bit_dicts[0]]
  fig, ax = plt.subplots(figsize=(10, 1 + 0.35 * len(labels)))
  grid = [[bits[k] for k in layers] for bits in bit_dicts]
  ax.imshow(grid, cmap="viridis", vmin=4, vmax=8, aspect="auto")
  ax.set_yticks(range(len(labels)), labels, fontsize=8)
  ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
  for i, row in enumerate(grid):
    for j, b in enumerate(row):
      ax.text(j, i, str(b), ha="center", va="center", fontsize=6,
              color="black" if b == 8 else "white")
  ax.set_title("bits per layer (weights and the activations each layer reads)")
  fig.tight_layout()
  save_figure(fig, path, format="png", dpi=120)


# ----------------------------------------------------------------------------- TVM

EVAL_BATCH = 500  # images per jitted interpreter call


def target_spec(spec):
  """A TVM target dict from "host" / None (`grassq.deploy.host_target()`), "generic", a JSON
  string or a dict."""
  from grassq import deploy

  if spec is None or (isinstance(spec, str) and spec == "host"):
    return deploy.host_target()
  if isinstance(spec, str) and spec == "generic":
    return dict(deploy.GENERIC_TARGET)
  if isinstance(spec, str):
    return json.loads(spec)
  return spec


def program_input(program, images, dataset: str | None = None) -> np.ndarray:
  """The program's int8 input: uint8 pixels are normalized with `dataset`'s mean/std first
  (default grassq_fashion_mnist); float images are taken as normalized; int8 as quantized."""
  from grassq import data
  from grassq.quant import program as P

  images = np.asarray(images)
  if images.dtype == np.int8:
    return images
  if images.dtype == np.uint8:
    spec = data.get_spec(dataset or data.DEFAULT_DATASET)
    if tuple(spec.image_shape) != tuple(program.input_shape):
      raise ValueError(f"{spec.name} images are {spec.image_shape}; the program takes "
                       f"{tuple(program.input_shape)}")
    out = [np.asarray(P.quantize_input(program, data.normalize(images[i:i + EVAL_BATCH], spec)))
           for i in range(0, len(images), EVAL_BATCH)]
    return np.concatenate(out) if out else np.zeros((0, *program.input_shape), np.int8)
  if np.issubdtype(images.dtype, np.floating):
    return np.asarray(P.quantize_input(program, images))
  raise ValueError(f"images must be uint8 pixels, normalized floats or int8; got {images.dtype}")


def _batched(fn, x, batch):
  """fn over x in batches of exactly `batch` (the last one zero-padded and cut)."""
  outs = []
  for i in range(0, len(x), batch):
    chunk = x[i:i + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
    outs.append(np.asarray(fn(chunk))[:n])
  return np.concatenate(outs)


def bits_summary(program) -> str:
  """'W8A8', 'W4A4 (first conv and classifier 8-bit)' or 'mixed: 9 of 22 layers at 4 bits'."""
  layers = [op for op in program.ops if op.kind in ("conv", "dense", "grassmann_head")]
  wa = [(op.attrs["w_bits"], op.attrs["in_bits"]) for op in layers]
  inner = wa[1:-1] if len(wa) > 2 else wa
  if len(set(inner)) == 1:
    w, a = inner[0]
    edge = "" if len(set(wa)) == 1 else " (first conv and classifier 8-bit)"
    return f"W{w}A{a}{edge}"
  low = sum(w < 8 for w, _ in wa)
  return f"mixed: {low} of {len(wa)} layers at 4 bits"


def deploy_and_check(program, images, labels, out_dir: str, name: str,
                     target: Mapping[str, Any] | str | None = None,
                     batch_sizes: Sequence[int] = (1, 8), repeats: int = 50,
                     eval_limit: int | None = None, *, dataset: str | None = None,
                     tune_dir: str | None = None, trials: int = 0,
                     trials_per_task: int | None = None) -> dict:
  """Builds `program` with TVM, saves it, and checks it against the JAX interpreter.

  Args:
    program: a `grassq.quant.program.IntegerProgram`.
    images, labels: the test set: uint8 pixels (normalized with `dataset`'s mean/std, default
      grassq_fashion_mnist), normalized float images, or the program's int8 input; int labels.
    out_dir, name: the batch-1 module is saved to ``out_dir/name.so`` (atomically), other
      batch sizes to ``out_dir/name_bB.so``.
    target: a TVM target dict, "host" / None (`grassq.deploy.host_target()`) or "generic".
    batch_sizes: batch sizes to build and time; the largest also runs the evaluation.
    repeats: timed calls per measurement (the median, after one warm-up call).
    eval_limit: only the first N images (default: all).
    dataset: see `images`.
    tune_dir, trials, trials_per_task: MetaSchedule (`grassq.deploy.build`); default untuned.

  Returns:
    {"name", "bits", "target", "layout", "eval_images", "bit_exact": no logit differs,
     "mismatches": differing logits, "images_differing", "accuracy_tvm", "accuracy_int",
     "reload_exact": the saved module, loaded back, gives the same logits,
     "latency_ms": {"tvm": {batch: ms}, "interpreter": {batch: ms}}, "build_s",
     "module_path": the batch-1 module, "module_paths": {batch: path}}.
  """
  from grassq import deploy
  from grassq._timing import median_ms
  from grassq.quant import program as P

  batch_sizes = sorted({int(b) for b in batch_sizes})
  if not batch_sizes or batch_sizes[0] < 1:
    raise ValueError(f"batch_sizes must be positive; got {batch_sizes}")
  target = target_spec(target)
  images, labels = images[:eval_limit], np.asarray(labels[:eval_limit])
  x = program_input(program, images, dataset)
  if len(x) != len(labels) or len(x) == 0:
    raise ValueError(f"{len(x)} images and {len(labels)} labels")

  start = time.perf_counter()
  modules = {b: deploy.build(program, target, b, tune_dir=tune_dir, trials=trials,
                             trials_per_task=trials_per_task) for b in batch_sizes}
  build_s = time.perf_counter() - start
  paths = {}
  for b, m in modules.items():
    paths[b] = os.path.join(out_dir, f"{name}.so" if b == 1 else f"{name}_b{b}.so")
    deploy.save(m, paths[b])

  fn, arrays = P.interpreter(program), P.program_arrays(program)
  want = _batched(lambda c: fn(arrays, c), x, min(EVAL_BATCH, len(x)))
  got = _batched(modules[batch_sizes[-1]], x, batch_sizes[-1])
  differ = got != want
  back = deploy.load(paths[batch_sizes[0]])
  probe = x[:batch_sizes[0]]
  if len(probe) < batch_sizes[0]:
    probe = np.resize(probe, (batch_sizes[0], *probe.shape[1:]))
  reload_exact = bool(np.array_equal(back(probe), modules[batch_sizes[0]](probe)))

  latency = {"tvm": {}, "interpreter": {}}
  for b in batch_sizes:
    xb = np.resize(x, (b, *x.shape[1:]))
    latency["tvm"][b] = median_ms(modules[b], xb, repeats=repeats)[0]
    latency["interpreter"][b] = median_ms(fn, arrays, xb, repeats=repeats)[0]
  return dict(
      name=name, bits=bits_summary(program), target=str(modules[batch_sizes[0]].target),
      layout=deploy.default_layout(target), eval_images=int(len(x)),
      bit_exact=not differ.any(), mismatches=int(differ.sum()),
      images_differing=int(differ.any(axis=-1).sum()),
      accuracy_tvm=float(np.mean(got.argmax(-1) == labels)),
      accuracy_int=float(np.mean(want.argmax(-1) == labels)),
      reload_exact=reload_exact, latency_ms=latency, build_s=build_s,
      module_path=paths.get(1, paths[batch_sizes[0]]), module_paths=paths)
