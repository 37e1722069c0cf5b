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

Its flag-free core is `experiments.stages.deploy_and_check` (the main job and
`experiments.inception_fmnist` call it too).
"""

from __future__ import annotations

import json
import os
from absl import app, flags, logging

from experiments.stages import deploy_and_check, read_cache, target_spec
from grassq import files

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
               f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on "
               f"{os.cpu_count()} cores when the run ended, this job's own threads included.")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from grassq import data, deploy, train
  from grassq.quant import program as P

  deploy.require_tvm()
  batches = [int(b) for b in FLAGS.batch_sizes]
  target = target_spec(FLAGS.target)
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
  old = read_cache(path, "results file", "the rows of programs not run this time are dropped")
  # keep the rows of programs not run this time
  done = {r["name"]: r for r in (old or {}).get("programs", [])}
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
    files.write_json(os.path.join(FLAGS.out, "latency_table.json"), dict(
        target=str(target), program=first, unit="seconds per call, batch 1",
        note="4-bit layers run int8 kernels on llvm (TVM 0.27's int4 is broken there); "
             "each layer timed alone, so fixed per-kernel costs are counted per layer",
        sum_of_layers_ms={b: 1e3 * sum(t[b] for t in table.values()) for b in (4, 8)},
        whole_module_b1_ms=whole, load_average=list(os.getloadavg()), table=table), indent=1)
  files.write_json(path, results, indent=1)
  table_md = _table(rows, batches, os.getloadavg())
  files.atomic_write(os.path.join(FLAGS.out, "table.md"), table_md)
  print(table_md)


if __name__ == "__main__":
  app.run(main)
