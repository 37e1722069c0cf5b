"""TVM CUDA modules cross-compiled on a CPU machine, checked and timed on a GPU machine.

  python -m benchmarks.deploy_gpu prepare [--bundle runs/gpu_bundle]   # here: needs full TVM
  python -m benchmarks.deploy_gpu run [--bundle runs/gpu_bundle] [--out results/deploy_gpu]

``prepare`` (a CPU machine with TVM's compiler and the Fashion-MNIST files) exports, with
`grassq.deploy.export`, the CUDA (`CUDA_T4_TARGET`, sm_75) modules of the trained ResNet-20
programs (W8A8, the ILP's mixed INT4/8, W4A4) and of a random calibrated ResNet-18 (ImageNet
shapes, int8), together with their int8 inputs and the JAX interpreter's logits computed here on
the CPU: the reference. For ResNet-20 that is the whole Fashion-MNIST test set.

``run`` (the GPU machine; TVM's runtime alone is enough: NVRTC compiles the kernels when a module
is loaded) loads every module on the GPU and checks it bit for bit against those logits, runs the
JAX integer interpreter on the GPU against the same logits (integer jnp arithmetic must be exact
on every backend), and times, with `grassq._timing.median_ms` (median after warm-up):

* ``tvm_int8_cuda``: the module on device-resident input (TVM's time evaluator), and numpy in /
  numpy out (host-device copies included);
* ``xla_float32``: ``jax.jit`` of the float Flax model on the GPU (random weights: same speed),
  device-resident and numpy in / out; XLA's default float32 precision on the GPU (TF32 tensor
  cores where the GPU has them);
* ``jax_interpreter``: `grassq.quant.program.interpreter` on the GPU, device-resident.

It also counts the int8 instructions (``IDP4A``, ``IMMA``) in the SASS that NVRTC makes of each
module's CUDA source for sm_75 (T4) and for the GPU at hand, when ``cuobjdump`` is there. Results:
``<out>/gpu.json`` and ``<out>/gpu.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time

import numpy as np

from grassq._timing import median_ms

R20_PROGRAMS = {  # key: (program directory, label)
    "r20_w8a8": ("results/quant/programs/w8a8", "ResNet-20 W8A8 (trained)"),
    "r20_mixed": ("results/mixed/programs/bops_0.5", "ResNet-20 mixed INT4/8 (ILP bops_0.5)"),
    "r20_w4a4": ("results/quant/programs/w4a4", "ResNet-20 W4A4 (trained)"),
}
TEST_BATCH = 500  # batch of the ResNet-20 modules that run the test set: 20 calls


def _save_npz(path, **arrays):
  from grassq import files

  with files.atomic_path(path, ".npz") as tmp:
    np.savez_compressed(tmp, **arrays)


# ----------------------------------------------------------------------------- prepare (CPU)


def _test_set(n_random):
  """Fashion-MNIST's test split (uint8 images, labels), or random images without labels."""
  from grassq import data

  try:
    return data.read_fashion_mnist_split(
        os.environ.get("GRASSQ_FASHION_MNIST_DIR", data.FASHION_MNIST_SYSTEM_DIR), "test")
  except (OSError, ValueError) as e:
    print(f"note: no Fashion-MNIST test split ({type(e).__name__}); {n_random} random images")
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n_random, 28, 28, 1)).astype(np.uint8), None


def prepare(args):
  from benchmarks.deploy import _load_or_none
  from grassq.deploy.bench import random_program
  from experiments.stages import _batched, program_input, target_spec
  from grassq import deploy, files
  from grassq.quant import program as P

  target = deploy.CUDA_T4_TARGET if args.target == "cuda" else target_spec(args.target)
  os.makedirs(args.bundle, exist_ok=True)
  manifest = {"entries": [], "made_on": platform.node(), "target": target,
              "device": "cuda" if target["kind"] == "cuda" else "cpu"}
  rng = np.random.default_rng(0)

  def add(key, label, model, prog, batches, test=None):
    P.save(prog, os.path.join(args.bundle, "programs", key), overwrite=True)
    fn, arrays = P.interpreter(prog), P.program_arrays(prog)
    entry = dict(key=key, label=label, model=model, modules={}, arrays=f"{key}.npz")
    io = {}
    for b in batches:
      t = time.perf_counter()
      so = f"{key}_b{b}.so"
      deploy.export(prog, os.path.join(args.bundle, so), target, b)
      entry["modules"][str(b)] = so
      x = rng.integers(-128, 128, (b, *prog.input_shape)).astype(np.int8)
      io[f"x_b{b}"], io[f"want_b{b}"] = x, np.asarray(fn(arrays, x))
      print(f"{key} batch {b}: exported in {time.perf_counter() - t:.0f} s", flush=True)
    if test is not None:
      images, labels = test
      xq = program_input(prog, images)
      io["test_x"], io["test_want"] = xq, _batched(lambda c: fn(arrays, c), xq, args.test_batch)
      if labels is not None:
        io["test_labels"] = np.asarray(labels)
      entry["test_batch"] = args.test_batch
    _save_npz(os.path.join(args.bundle, entry["arrays"]), **io)
    if target["kind"] == "cuda":
      files.atomic_write(os.path.join(args.bundle, f"{key}.cu"),
                         deploy.cuda_source(prog, batches[0]))
    manifest["entries"].append(entry)

  if "resnet20" in args.models:
    test = _test_set(2 * args.test_batch)
    for key, (path, label) in R20_PROGRAMS.items():
      prog = _load_or_none(path)
      if prog is None:  # not trained here: a random calibrated one runs the same checks
        bits = 4 if key == "r20_w4a4" else 8
        prog = random_program("resnet20", image_shape=(28, 28, 1), default_bits=bits,
                              seed=len(manifest["entries"]))
        label = f"{label.split(' (')[0]} (random, calibrated)"
      add(key, label, "resnet20", prog, [1, 8, args.test_batch], test=test)
  if "resnet18" in args.models:
    r18 = random_program("resnet18", 1000, (224, 224, 3), calibration_batch=8)
    add("r18_int8", "ResNet-18 int8 (random, calibrated)", "resnet18", r18, args.r18_batch)
  files.write_json(os.path.join(args.bundle, "manifest.json"), manifest, indent=1)
  print(f"bundle in {args.bundle}: " + ", ".join(e["key"] for e in manifest["entries"]))


# ----------------------------------------------------------------------------- run (GPU)


def sass_counts(source: str, arch: str) -> dict | None:
  """IDP4A / IMMA counts in the SASS of NVRTC's cubin of `source` for `arch` (needs cuobjdump)."""
  if shutil.which("cuobjdump") is None:
    return None
  from tvm.support import nvcc

  cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch,
                            compiler=os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc"))
  with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(bytes(cubin))
    f.flush()
    sass = subprocess.run(["cuobjdump", "--dump-sass", f.name], capture_output=True, text=True,
                          check=True).stdout
  return {"IDP4A": len(re.findall(r"\bIDP\.?4A", sass)), "IMMA": len(re.findall(r"\bIMMA", sass)),
          "HMMA": len(re.findall(r"\bHMMA", sass)), "instructions": sass.count(";")}


def _load(path, device):
  """`deploy.load`; when NVRTC cannot compile the kernels, once more with nvcc."""
  from grassq import deploy, files

  try:
    return deploy.load(path, device)
  except files.CorruptFileError:  # a damaged module: another compiler will not help
    raise
  except Exception as err:  # noqa: BLE001 (retried below, or re-raised)
    if device != "cuda" or os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc":
      raise
    print(f"note: loading with NVRTC failed ({type(err).__name__}: {str(err)[:200]}); "
          "retrying with TVM_CUDA_COMPILE_MODE=nvcc", flush=True)
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    return deploy.load(path, device)


def _xla_rows(name, batches, timed, device):
  """XLA float32 times of model `name` at each batch: device-resident, numpy in/out, and with
  float32 at "highest" precision (no TF32)."""
  import jax

  from benchmarks.deploy import MODELS, float_model

  shape = MODELS[name]["image_shape"]
  xla_fn, variables, _ = float_model(name, argparse.Namespace(fp_workdir=None))
  variables = jax.device_put(variables, device)
  rows = {}
  for b in batches:
    x = np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)
    xd = jax.device_put(x, device)
    rows[str(b)] = dict(
        xla_float32_ms=timed(xla_fn, variables, xd),
        xla_float32_numpy_io_ms=timed(lambda v, x: np.asarray(xla_fn(v, x)), variables, x))
    with jax.default_matmul_precision("highest"):
      f32 = jax.jit(lambda v, x: xla_fn(v, x))
      rows[str(b)]["xla_float32_highest_ms"] = timed(f32, variables, xd)
  print(f"{name} XLA float32: {rows}", flush=True)
  return rows


def _check_entry(e, args, manifest, timed, device):
  """Loads, checks and times one bundle entry's modules; its JAX interpreter on `device`."""
  import jax

  from experiments.stages import _batched
  from grassq.quant import program as P

  key = e["key"]
  io = np.load(os.path.join(args.bundle, e["arrays"]))
  prog = P.load(os.path.join(args.bundle, "programs", key))
  fn, arrays = P.interpreter(prog), jax.device_put(P.program_arrays(prog), device)
  row = dict(label=e["label"], model=e["model"], batches={})
  tvm_dev = None
  for b, so in e["modules"].items():
    t = time.perf_counter()
    module = _load(os.path.join(args.bundle, so), manifest["device"])
    tvm_dev = module.device
    x, want = io[f"x_b{b}"], io[f"want_b{b}"]
    r = dict(load_s=round(time.perf_counter() - t, 2))
    r["tvm_bit_exact"] = bool(np.array_equal(module(x), want))
    xd = jax.device_put(x, device)
    r["interpreter_bit_exact"] = bool(np.array_equal(np.asarray(fn(arrays, xd)), want))
    if b != str(e.get("test_batch")):
      r["tvm_int8_ms"] = 1e3 * module.time(x, number=args.repeats, repeat=5)
      r["tvm_int8_numpy_io_ms"] = timed(module, x)
      r["jax_interpreter_ms"] = timed(fn, arrays, xd)
    else:  # the whole test set through the module and through the interpreter on the device
      xt, wt = io["test_x"], io["test_want"]
      got = _batched(module, xt, int(b))
      gi = _batched(lambda c: fn(arrays, jax.device_put(c, device)), xt, int(b))
      r["test_set"] = dict(images=len(xt), tvm_differing_logits=int(np.sum(got != wt)),
                           interpreter_differing_logits=int(np.sum(gi != wt)))
      if "test_labels" in io:
        r["test_set"]["tvm_top1"] = float(np.mean(got.argmax(-1) == io["test_labels"]))
        r["test_set"]["reference_top1"] = float(np.mean(wt.argmax(-1) == io["test_labels"]))
      r["tvm_bit_exact"] &= r["test_set"]["tvm_differing_logits"] == 0
      r["interpreter_bit_exact"] &= r["test_set"]["interpreter_differing_logits"] == 0
    row["batches"][b] = r
    print(f"{key} batch {b}: {r}", flush=True)
  src_path = os.path.join(args.bundle, f"{key}.cu")
  if args.sass and os.path.exists(src_path) and tvm_dev is not None:
    with open(src_path) as f:
      src = f.read()
    row["sass"] = {}
    for arch in dict.fromkeys(["sm_75", "sm_" + tvm_dev.compute_version.replace(".", "")]):
      try:
        row["sass"][arch] = sass_counts(src, arch)
      except Exception as err:  # noqa: BLE001 (reported; the rest of the run goes on)
        row["sass"][arch] = f"failed: {type(err).__name__}: {err}"[:300]
    print(f"{key} SASS: {row['sass']}", flush=True)
  return row


def run(args):
  import jax

  from grassq import files

  manifest = files.read_json(os.path.join(args.bundle, "manifest.json"), "bundle manifest",
                             "run `python -m benchmarks.deploy_gpu prepare` again")
  device = jax.devices()[0]
  report = dict(device=device.device_kind, jax_backend=jax.default_backend(),
                jax_version=jax.__version__, host=platform.node(), models={}, entries={})
  t_all = time.perf_counter()

  def timed(fn, *a):
    return median_ms(fn, *a, repeats=args.repeats, warmup=2, max_seconds=args.max_seconds)[0]

  def write():  # after every entry: a run cut short keeps what it measured
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    os.makedirs(args.out, exist_ok=True)
    files.write_json(os.path.join(args.out, "gpu.json"), report, indent=1)
    files.atomic_write(os.path.join(args.out, "gpu.md"), markdown(report))

  entries = {e["key"]: e for e in manifest["entries"]}
  for key in args.only or list(entries):
    e = entries[key]
    report["entries"][key] = _check_entry(e, args, manifest, timed, device)
    if e["model"] not in report["models"]:
      report["models"][e["model"]] = _xla_rows(e["model"], args.batch, timed, device)
    write()
  print(markdown(report))


def markdown(report) -> str:
  """One row per (module, batch): bit-exactness and times, with XLA float32's at that batch."""
  lines = [f"Device: {report['device']} (JAX {report['jax_version']}, "
           f"{report['jax_backend']}); ms, median after warm-up. The reference is the JAX "
           "interpreter's output computed on the CPU.", "",
           "| module | batch | TVM = reference | JAX interpreter on the device = reference "
           "| TVM int8 | TVM int8, numpy in/out | JAX interpreter | XLA float32 "
           "| XLA float32, numpy in/out | XLA float32, precision highest |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in report["entries"].values():
    for b, r in row["batches"].items():
      xla = report["models"].get(row["model"], {}).get(b, {})

      def ms(v):
        return "—" if v is None else f"{v:.3f}"
      exact = "yes" if r["tvm_bit_exact"] else "**no**"
      if "test_set" in r:
        exact += f" (whole test set, {r['test_set']['images']} images)"
      lines.append(
          f"| {row['label']} | {b} | {exact} | {'yes' if r['interpreter_bit_exact'] else '**no**'}"
          f" | {ms(r.get('tvm_int8_ms'))} | {ms(r.get('tvm_int8_numpy_io_ms'))} | "
          f"{ms(r.get('jax_interpreter_ms'))} | {ms(xla.get('xla_float32_ms'))} | "
          f"{ms(xla.get('xla_float32_numpy_io_ms'))} | "
          f"{ms(xla.get('xla_float32_highest_ms'))} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("stage", choices=["prepare", "run"])
  ap.add_argument("--bundle", default="runs/gpu_bundle")
  ap.add_argument("--out", default="results/deploy_gpu")
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="XLA float32 batches")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--max_seconds", type=float, default=10.0)
  ap.add_argument("--only", nargs="+", help="run: only these bundle keys, in this order")
  ap.add_argument("--models", nargs="+", default=["resnet20", "resnet18"],
                  choices=["resnet20", "resnet18"], help="prepare: which models")
  ap.add_argument("--target", default="cuda",
                  help="prepare: 'cuda' (CUDA_T4_TARGET), or a CPU target for a local dry run")
  ap.add_argument("--r18_batch", type=int, nargs="+", default=[8],
                  help="prepare: ResNet-18 module batches (each module holds its 11 MB of "
                  "weights: the default fits the device tool's 64 MiB transfer)")
  ap.add_argument("--test_batch", type=int, default=TEST_BATCH,
                  help="prepare: batch of the ResNet-20 test-set modules")
  ap.add_argument("--sass", action=argparse.BooleanOptionalAction, default=True)
  args = ap.parse_args(argv)
  (prepare if args.stage == "prepare" else run)(args)


if __name__ == "__main__":
  main()
