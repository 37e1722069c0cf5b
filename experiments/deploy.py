"""Integer program -> TVM module (saved) -> bit-exactness, accuracy and latency on the test set.

  python -m experiments.deploy                       # W8A8, W4A4 and a mixed INT4/8 program
  python -m experiments.deploy --programs results/quant/programs/w4a8,mixed=runs/x/programs/y
  python -m experiments.deploy --checkpoints runs/main/runs/w8a8 --batch_sizes 1,8,64
  python -m experiments.deploy --tune_dir runs/tune --trials 2000   # MetaSchedule first

For every integer program (a directory written by `grassq.quant.program.save`, or the program
of a QAT checkpoint) it builds the TVM module for this CPU (untuned: the VNNI hand schedule;
with ``--tune_dir`` MetaSchedule's database), saves it to ``OUT/modules/NAME.so`` (batch 1;
``NAME_bB.so`` for the other batch sizes), runs the whole test set through the module and the
JAX int32 interpreter, counts differing logits (bit-exact means none), and times both at each
batch size (median wall-clock ms of a numpy-in, numpy-out call). Writes ``OUT/results.json``
and ``OUT/table.md``, and ``OUT/latency_table.json``: the per-layer table that
``grassq.mixed.cost_tables(..., latency=...)`` takes, measured on the same target.

`deploy_and_check` is the flag-free core (the main job calls it).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from experiments.stages import write_atomic

flags.DEFINE_list("programs", ["results/quant/programs/w8a8", "results/quant/programs/w4a4",
                               "results/mixed/programs/bops_0.5"],
                  "Integer program directories, each PATH or NAME=PATH (name: the directory's).")
flags.DEFINE_list("checkpoints", [], "QAT run directories (NAME=PATH or PATH) to convert first.")
flags.DEFINE_string("out", "results/deploy", "Output directory.")
flags.DEFINE_string("target", "host", "'host', 'generic', or a TVM target dict as JSON.")
flags.DEFINE_string("dataset", None, "Dataset for the test images (default: the checkpoint's, "
                    "else grassq_fashion_mnist).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("repeats", 50, "Timed calls per measurement (median).")
flags.DEFINE_integer("eval_limit", None, "Only the first N test images (default: all).")
flags.DEFINE_string("tune_dir", None, "MetaSchedule database directory (tunes if --trials > 0).")
flags.DEFINE_integer("trials", 0, "MetaSchedule trial budget (0: apply --tune_dir only).")
flags.DEFINE_integer("trials_per_task", None, "MetaSchedule per-task trial cap.")
flags.DEFINE_bool("latency_table", True, "Also measure the per-layer latency table.")
FLAGS = flags.FLAGS

EVAL_BATCH = 500  # images per jitted interpreter call


def _target(spec):
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
  target = _target(target)
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


# ----------------------------------------------------------------------------- command line


def _named(entries):
  out = {}
  for e in entries:
    name, _, path = e.rpartition("=")
    name = name or os.path.basename(os.path.normpath(path))
    if name in out:
      raise app.UsageError(f"two programs named {name!r}; use NAME=PATH")
    out[name] = path
  return out


def _table(rows, batches, load):
  head = ("| program | bits | test images | TVM = JAX integer (differing logits) | "
          "JAX integer acc. (%) | TVM acc. (%) | " +
          " | ".join(f"TVM ms (b{b}) | JAX integer ms (b{b}) | speed-up (b{b})" for b in batches)
          + " |")
  lines = [head, "|" + "---|" * (6 + 3 * len(batches))]
  for r in rows:
    t, j = r["latency_ms"]["tvm"], r["latency_ms"]["interpreter"]
    cells = [r["name"], r["bits"], str(r["eval_images"]),
             f"{'yes' if r['bit_exact'] else 'NO'} ({r['mismatches']})",
             f"{100 * r['accuracy_int']:.2f}", f"{100 * r['accuracy_tvm']:.2f}"]
    for b in batches:
      tb, jb = t.get(str(b), t.get(b)), j.get(str(b), j.get(b))
      cells += ([f"{tb:.3f}", f"{jb:.3f}", f"{jb / tb:.1f}×"] if tb and jb else ["", "", ""])
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  target, layout = (rows[0]["target"], rows[0]["layout"]) if rows else ("", "")
  lines.append(f"Target: {target}, layout {layout}. "
               f"Latency: median wall-clock ms per call (numpy in, numpy out) after a warm-up, "
               f"measured on a shared machine (load average {load[0]:.2f} / {load[1]:.2f} / "
               f"{load[2]:.2f} on {os.cpu_count()} cores when the run ended): read the ratios, "
               "not the absolute times.")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from grassq import data, deploy, train
  from grassq.quant import program as P

  deploy.require_tvm()
  batches = [int(b) for b in FLAGS.batch_sizes]
  target = _target(FLAGS.target)
  programs, dataset = {}, FLAGS.dataset
  for name, path in _named(FLAGS.programs).items():
    programs[name] = P.load(path)
  for name, path in _named(FLAGS.checkpoints).items():
    model, variables, config = train.load_checkpoint(path)
    dataset = dataset or config.dataset
    programs[name] = P.to_program(model, variables, data.get_spec(config.dataset).image_shape)
  if not programs:
    raise app.UsageError("no --programs or --checkpoints given")
  dataset = dataset or data.DEFAULT_DATASET
  spec = data.get_spec(dataset)
  images, labels = data.load_arrays(dataset, spec.eval_split, FLAGS.data_dir)

  path = os.path.join(FLAGS.out, "results.json")
  done = {}
  if os.path.exists(path):  # keep the rows of programs not run this time
    with open(path) as f:
      done = {r["name"]: r for r in json.load(f).get("programs", [])}
  for name, program in programs.items():
    row = deploy_and_check(program, images, labels, os.path.join(FLAGS.out, "modules"), name,
                           target, batches, FLAGS.repeats, FLAGS.eval_limit, dataset=dataset,
                           tune_dir=FLAGS.tune_dir, trials=FLAGS.trials,
                           trials_per_task=FLAGS.trials_per_task)
    row["load_average"] = list(os.getloadavg())
    done[name] = json.loads(json.dumps(row))  # int batch keys -> strings, as reloaded rows
    print(f"{name}: bit-exact {row['bit_exact']} ({row['mismatches']} differing logits), "
          f"accuracy {100 * row['accuracy_tvm']:.2f}% (JAX integer "
          f"{100 * row['accuracy_int']:.2f}%), ms {row['latency_ms']}", flush=True)
  rows = list(done.values())
  results = dict(dataset=dataset, target=str(target), programs=rows)
  if FLAGS.latency_table:
    first = next(iter(programs))
    table = deploy.latency_table(programs[first], target=target, bits=(4, 8),
                                 tune_dir=FLAGS.tune_dir)
    whole = done[first]["latency_ms"]["tvm"].get("1")
    write_atomic(os.path.join(FLAGS.out, "latency_table.json"), json.dumps(dict(
        target=str(target), program=first, unit="seconds per call, batch 1",
        note="4-bit layers run int8 kernels on llvm (TVM 0.27's int4 is broken there); "
             "each layer timed alone, so fixed per-kernel costs are counted per layer",
        sum_of_layers_ms={b: 1e3 * sum(t[b] for t in table.values()) for b in (4, 8)},
        whole_module_b1_ms=whole, load_average=list(os.getloadavg()), table=table), indent=1))
  write_atomic(path, json.dumps(results, indent=1))
  table_md = _table(rows, batches, os.getloadavg())
  write_atomic(os.path.join(FLAGS.out, "table.md"), table_md)
  print(table_md)


if __name__ == "__main__":
  app.run(main)
