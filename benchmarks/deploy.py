"""Deployment speed: TVM int8 / mixed / float32, XLA float32, the JAX interpreter, onnxruntime.

  python -m benchmarks.deploy [--models resnet20 resnet18] [--batch 1 8] [--repeats 20]
      [--tune_dir runs/tune --trials 2000 --trials_per_task 64] [--out results/deploy]

One process, every candidate on the same inputs; each time is the median of `repeats` wall-clock
calls from Python (numpy in, numpy out, after warm-up; `grassq._timing.median_ms`), and every
row is also given as XLA float32's time divided by its own (×: how many times faster).

Models: ResNet-20 on Fashion-MNIST shapes (28×28×1; the trained programs of
``experiments.quantize`` / ``experiments.mixed_precision`` when present, else random calibrated
ones; the trained float run for XLA when present) and ResNet-18 on ImageNet shapes (224×224×3,
1000 classes; random weights, one-batch calibration: a speed benchmark). Candidates:

* ``xla_float32``: ``jax.jit`` of the float Flax model (the user's alternative; the baseline);
* ``jax_interpreter``: `grassq.quant.program.run` (jit), the int32 reference;
* ``tvm_int8``: `grassq.deploy.build` (NCHW16c + the VNNI hand schedule on a VNNI CPU, no
  tuning); ``tvm_int8_tuned`` with ``--tune_dir`` (MetaSchedule, its database kept there);
* ``tvm_mixed``: the same build of a mixed INT4/8 program (ResNet-20: the ILP's ``bops_0.5``
  program; ResNet-18: W4A4 in stages 3-4, W8A8 elsewhere). int4 weights are unpacked to int8
  constants at build time, so its kernels are int8 ones;
* ``tvm_float32``: the program's float32 twin (`onnx_export.to_float_onnx`: same convolutions,
  BN folded, ReLUs) through TVM's Relax ONNX frontend and TVM's default CPU pipeline (no
  schedule); ``tvm_float32_tuned`` with ``--tune_dir``;
* ``onnxruntime_int8``: `onnx_export.to_onnx` (QLinearConv / ConvInteger, 16-bit residuals in
  float) on onnxruntime's CPU provider; ``onnxruntime_float32``: the float twin on it.

Every TVM int8 module's logits are checked bit for bit against the interpreter first;
onnxruntime's rounding differs (its top-1 agreement with the interpreter is reported). With
``--convs`` (default for ResNet-18) the network's 3×3 convolutions are also timed alone, TVM int8
(one conv + requantize per module) against XLA float32 (conv + bias + ReLU), summed over the
network, with TVM's int8 rate against an int8 peak estimated as 4× the float32 rate of a large
XLA GEMM measured in the same run. Results go to ``<out>/bench_<model>.json``, and
``<out>/bench.md`` holds a Markdown table per model (of every ``bench_*.json`` there).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from grassq import files
from grassq._timing import median_ms

MODELS = {
    "resnet20": dict(title="ResNet-20", num_classes=10, image_shape=(28, 28, 1)),
    "resnet18": dict(title="ResNet-18", num_classes=1000, image_shape=(224, 224, 3)),
}
LABELS = {
    "xla_float32": "XLA float32 (jax.jit, Flax model)",
    "jax_interpreter": "JAX integer interpreter (jit)",
    "tvm_int8": "TVM int8, untuned (VNNI hand schedule)",
    "tvm_int8_tuned": "TVM int8, MetaSchedule-tuned",
    "tvm_mixed": "TVM mixed INT4/8, untuned",
    "tvm_float32": "TVM float32, untuned (default pipeline)",
    "tvm_float32_tuned": "TVM float32, MetaSchedule-tuned",
    "onnxruntime_int8": "onnxruntime int8 (QLinearConv/ConvInteger)",
    "onnxruntime_float32": "onnxruntime float32",
}


# ----------------------------------------------------------------------------- programs


def _load_or_none(path):
  from grassq.quant import program as P

  if path and os.path.exists(os.path.join(path, "program.json")):
    return P.load(path)
  return None


def mixed_resnet18_bits(model, image_shape):
  """W4A4 for the convolutions of stages 3 and 4, W8A8 elsewhere (a fixed INT4/8 assignment)."""
  from grassq.quant import qresnet

  q = qresnet.quantized(model)
  return {name: 4 for name in qresnet.layer_names(q, image_shape)
          if name.startswith(("stage3", "stage4"))}


def programs(name, args):
  """(int8 program, mixed program, where each came from) for model `name`."""
  from grassq.deploy.bench import random_program
  from grassq.models import create_model

  spec = MODELS[name]
  shape, classes = spec["image_shape"], spec["num_classes"]
  if name == "resnet20":
    prog, mixed = _load_or_none(args.r20_program), _load_or_none(args.r20_mixed)
    src = [args.r20_program if prog else "random, calibrated",
           args.r20_mixed if mixed else "random W4A4 stages 2-3, calibrated"]
    prog = prog or random_program(name, classes, shape)
    if mixed is None:
      from grassq.quant import qresnet
      layers = qresnet.layer_names(qresnet.quantized(create_model(name, classes)), shape)
      mixed = random_program(name, classes, shape, bits={
          n: 4 for n in layers if n.startswith(("stage2", "stage3"))})
    return prog, mixed, src
  prog = random_program(name, classes, shape, calibration_batch=args.calibration_batch)
  bits = mixed_resnet18_bits(create_model(name, classes), shape)
  mixed = random_program(name, classes, shape, bits=bits,
                         calibration_batch=args.calibration_batch)
  return prog, mixed, ["random, calibrated", "random W4A4 stages 3-4, calibrated"]


def float_model(name, args):
  """(jitted apply, variables, where they came from) of the float Flax model."""
  import jax

  from grassq.models import create_model

  spec = MODELS[name]
  model = variables = None
  src = "random init"
  if name == "resnet20" and args.fp_workdir and os.path.exists(args.fp_workdir):
    from grassq import train
    try:
      model, variables, config = train.load_checkpoint(args.fp_workdir)
      if config.model != name:
        model = None
      else:
        src = args.fp_workdir
    except Exception as e:  # noqa: BLE001 (a stale run directory: fall back to random weights)
      print(f"note: could not load {args.fp_workdir} ({type(e).__name__}); random weights")
      model = None
  if model is None:
    model = create_model(name, spec["num_classes"])
    variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, *spec["image_shape"]),
                                                                  np.float32))
  return jax.jit(lambda v, x: model.apply(v, x)), variables, src


def eval_images(name, n, seed=0):
  """(normalized float images, labels or None): Fashion-MNIST test images for ResNet-20 when
  the IDX files are on disk, else standard normal images."""
  shape = MODELS[name]["image_shape"]
  if name == "resnet20":
    from grassq import data
    try:
      src = os.environ.get("GRASSQ_FASHION_MNIST_DIR", data.FASHION_MNIST_SYSTEM_DIR)
      images, labels = data.read_fashion_mnist_split(src, "test")
      spec = data.get_spec("grassq_fashion_mnist")
      return np.asarray(data.normalize(images[:n], spec)), np.asarray(labels[:n])
    except Exception:  # noqa: BLE001 (no data here: random images time the same)
      pass
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, *shape)).astype(np.float32), None


# ----------------------------------------------------------------------------- shapes, MACs


def tensor_shapes(program):
  """{tensor: (H, W, C)} of the program's 4-D tensors."""
  ops = program.ops
  shapes = {ops[0].output: tuple(program.input_shape)}
  for op in ops[1:]:
    s = shapes.get(op.inputs[0]) if op.inputs else None
    if s is None:
      continue
    if op.kind in ("conv", "max_pool", "avg_pool"):
      if op.kind == "conv":
        kh, kw = op.arrays["weight"].shape[:2]
        c = op.attrs["cout"]
      else:
        (kh, kw), c = op.attrs["window"], s[2]
      (pt, pb), (pl, pr) = op.attrs.get("padding", ((0, 0), (0, 0)))
      sh, sw = op.attrs["strides"]
      shapes[op.output] = ((s[0] + pt + pb - kh) // sh + 1, (s[1] + pl + pr - kw) // sw + 1, c)
    elif op.kind == "concat":
      shapes[op.output] = (s[0], s[1], sum(shapes[t][2] for t in op.inputs))
    elif op.kind not in ("global_avg_pool", "dense", "grassmann_head"):
      shapes[op.output] = s
  return shapes


def network_macs(program):
  """Multiply-accumulates of one image through the program's convolutions and dense layers."""
  shapes, total = tensor_shapes(program), 0
  for op in program.ops:
    if op.kind == "conv":
      kh, kw, cin = op.arrays["weight"].shape[:3]
      oh, ow, cout = shapes[op.output]
      total += oh * ow * kh * kw * cin * cout
    elif op.kind in ("dense", "grassmann_head"):
      total += op.arrays["weight"].shape[0] * op.attrs["cout"]
  return int(total)


def conv3x3_layers(program):
  """{(H, W, cin, cout, stride): [count, conv op, its reader]} of the 3×3 convolutions."""
  shapes = tensor_shapes(program)
  readers = {t: op for op in program.ops for t in op.inputs}
  groups = {}
  for op in program.ops:
    if op.kind != "conv" or op.arrays["weight"].shape[:2] != (3, 3):
      continue
    h, w, cin = shapes[op.inputs[0]]
    key = (h, w, cin, op.attrs["cout"], op.attrs["strides"][0])
    entry = groups.setdefault(key, [0, op, readers[op.output]])
    entry[0] += 1
  return groups


def conv_program(conv, reader, in_shape):
  """A program of one conv as the network runs it: its uint8 input, the conv, the requantize
  to 8 bits (its reader's multipliers), and a global pool so that the output is (B, C)."""
  from grassq.quant.program import IntegerProgram, Op

  one = dict(multiplier=np.asarray(2**30, np.int32), shift=np.asarray(30, np.int32))
  ops = (
      Op("quantize_input", "input_act", (), "t0", dict(bits=8, signed=True, scale=1.0), {}),
      Op("requantize", "act_in", ("t0",), "t1", dict(bits=8, signed=False, saturate=True), one),
      Op("conv", conv.name, ("t1",), "t2", dict(conv.attrs, in_bits=8, in_signed=False),
         dict(conv.arrays)),
      Op("requantize", "act", ("t2",), "t3", dict(bits=8, signed=False, saturate=True),
         dict(multiplier=reader.arrays["multiplier"], shift=reader.arrays["shift"])),
      Op("global_avg_pool", "pool", ("t3",), "t4", {}, {}),
  )
  return IntegerProgram(ops, tuple(in_shape), "t4", 1.0, conv.attrs["cout"])


# ----------------------------------------------------------------------------- candidates


def _tvm_float(program, batch, target, tune_dir=None, trials=0, trials_per_task=None):
  """A callable over float images: the float twin through TVM's ONNX frontend."""
  import tvm
  from tvm import relax
  from tvm.relax.frontend.onnx import from_onnx

  from grassq.deploy import compile_relax
  from grassq.deploy import onnx_export as OE

  mod = from_onnx(OE.to_float_onnx(program, batch),
                  shape_dict={OE.INPUT_NAME: [batch, *program.input_shape]})
  executable = compile_relax(mod, target, schedule=False, tune_dir=tune_dir or None,
                             trials=trials, trials_per_task=trials_per_task)
  vm = relax.VirtualMachine(executable, tvm.cpu())
  dev = tvm.cpu()

  def run(x):
    out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), dev))
    return out.numpy()

  return run


def _xla_conv(stride):
  import jax
  from jax import lax

  def f(x, w, b):
    y = lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu(y + b)

  return jax.jit(f)


def f32_gemm_gflops(repeats, n=2048):
  """The best XLA float32 GEMM rate (n×n×n) of `repeats` calls, GFLOP/s: a proxy for this
  CPU's float32 FMA peak (the fastest call: the least disturbed by other load)."""
  import jax
  import jax.numpy as jnp

  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float("inf")
  for _ in range(max(5, repeats)):
    t = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


class Bench:

  def __init__(self, args):
    from grassq import deploy

    self.args = args
    self.target = deploy.host_target()
    self.wanted = set(args.variants) if args.variants else None

  def want(self, variant):
    if variant.endswith("_tuned") and not self.args.tune_dir:
      return False
    return self.wanted is None or variant in self.wanted or variant == "xla_float32"

  def time(self, fn, *a):
    return median_ms(fn, *a, repeats=self.args.repeats, warmup=self.args.warmup,
                     max_seconds=self.args.max_seconds)

  def tune_dir(self, name, kind):
    return os.path.join(self.args.tune_dir, f"{name}_{kind}") if self.args.tune_dir else None

  def model(self, name):
    from grassq import deploy
    from grassq.deploy import onnx_export as OE
    from grassq.quant import program as P

    args, spec = self.args, MODELS[name]
    t = time.perf_counter()
    prog, mixed, sources = programs(name, args)
    xla_fn, variables, fp_src = float_model(name, args)
    print(f"{spec['title']}: programs ready in {time.perf_counter() - t:.0f} s "
          f"(int8: {sources[0]}; mixed: {sources[1]}; float: {fp_src})", flush=True)
    interp, interp_m = P.interpreter(prog), P.interpreter(mixed)
    arrays, arrays_m = P.program_arrays(prog), P.program_arrays(mixed)
    report = dict(model=name, image_shape=list(spec["image_shape"]),
                  num_classes=spec["num_classes"], sources=dict(
                      int8=sources[0], mixed=sources[1], float=fp_src),
                  gmacs_per_image=network_macs(prog) / 1e9, batches={})
    for b in args.batch:
      images, _ = eval_images(name, b, seed=b)
      xq, xq_m = np.asarray(P.quantize_input(prog, images)), np.asarray(
          P.quantize_input(mixed, images))
      want = np.asarray(interp(arrays, xq))
      want_m = np.asarray(interp_m(arrays_m, xq_m))
      rows, notes = {}, {}

      def record(variant, fn, *a, build_s=None, check=None):
        ms, out = self.time(fn, *a)
        rows[variant] = dict(ms=ms)
        if build_s is not None:
          rows[variant]["build_s"] = round(build_s, 1)
        if check is not None:
          notes[variant] = check(np.asarray(out))
          rows[variant]["check"] = notes[variant]
        print(f"  batch {b}: {variant:22s} {ms:10.3f} ms  {notes.get(variant, '')}", flush=True)

      def exact(ref):
        def check(out):
          if not np.array_equal(out, ref):
            raise AssertionError("TVM output differs from the interpreter")
          return "bit-exact"
        return check

      def agreement(out):
        return f"top-1 = interpreter on {100 * np.mean(out.argmax(-1) == want.argmax(-1)):.0f}%"

      record("xla_float32", xla_fn, variables, images)
      if self.want("jax_interpreter"):
        record("jax_interpreter", interp, arrays, xq)
      for variant, p, ref, x, kw in (
          ("tvm_int8", prog, want, xq, {}),
          ("tvm_int8_tuned", prog, want, xq, dict(
              tune_dir=self.tune_dir(name, "int8"), trials=args.trials,
              trials_per_task=args.trials_per_task)),
          ("tvm_mixed", mixed, want_m, xq_m, {})):
        if self.want(variant):
          t = time.perf_counter()
          module = deploy.build(p, self.target, b, **kw)
          record(variant, module, x, build_s=time.perf_counter() - t, check=exact(ref))
      for variant, kw in (("tvm_float32", {}), ("tvm_float32_tuned", dict(
          tune_dir=self.tune_dir(name, "float32"), trials=args.trials,
          trials_per_task=args.trials_per_task))):
        if self.want(variant):
          t = time.perf_counter()
          fn = _tvm_float(prog, b, self.target, **kw)
          record(variant, fn, images, build_s=time.perf_counter() - t, check=agreement)
      if self.want("onnxruntime_int8"):
        module = OE.OnnxModule(OE.to_onnx(prog, b), args.threads)
        record("onnxruntime_int8", module, xq, check=agreement)
      if self.want("onnxruntime_float32"):
        module = OE.OnnxModule(OE.to_float_onnx(prog, b), args.threads)
        record("onnxruntime_float32", module, images.astype(np.float32), check=agreement)
      base = rows["xla_float32"]["ms"]
      for row in rows.values():
        row["x_vs_xla_float32"] = base / row["ms"]
      report["batches"][str(b)] = rows
    if args.eval_images and name == "resnet20":
      report["accuracy"] = self.accuracy(name, prog, mixed, xla_fn, variables)
    if args.convs if args.convs is not None else name == "resnet18":
      report["conv3x3"] = self.convs(prog)
    return report

  def accuracy(self, name, prog, mixed, xla_fn, variables):
    """Top-1 on Fashion-MNIST test images: float, integer program (= TVM int8), onnxruntime."""
    from grassq.deploy import onnx_export as OE
    from grassq.quant import program as P

    images, labels = eval_images(name, self.args.eval_images)
    if labels is None:
      return None
    res = {"images": len(images)}
    chunks = range(0, len(images), 250)
    logits = np.concatenate([np.asarray(xla_fn(variables, images[i:i + 250])) for i in chunks])
    res["xla_float32"] = float(np.mean(logits.argmax(-1) == labels))
    for key, p in (("int8", prog), ("mixed", mixed)):
      xq = np.asarray(P.quantize_input(p, images))
      fn, arrays = P.interpreter(p), P.program_arrays(p)
      ints = np.concatenate([np.asarray(fn(arrays, xq[i:i + 250])) for i in chunks])
      ort = OE.OnnxModule(OE.to_onnx(p), self.args.threads)(xq)
      res[f"interpreter_{key}"] = float(np.mean(ints.argmax(-1) == labels))
      res[f"onnxruntime_{key}"] = float(np.mean(ort.argmax(-1) == labels))
      res[f"onnxruntime_{key}_agrees_with_interpreter"] = float(
          np.mean(ort.argmax(-1) == ints.argmax(-1)))
    print("  accuracy: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in res.items()), flush=True)
    return res

  def convs(self, prog):
    """The network's 3×3 convolutions alone: TVM int8 (and tuned) vs XLA float32, summed."""
    from grassq import deploy
    from grassq.quant import program as P

    groups = conv3x3_layers(prog)
    gflops = f32_gemm_gflops(self.args.repeats)
    out = dict(f32_gemm_gflops=gflops, int8_peak_gops_estimate=4 * gflops, batches={})
    print(f"  3x3 convs: {sum(g[0] for g in groups.values())} in {len(groups)} shapes; XLA "
          f"float32 GEMM {gflops:.0f} GFLOP/s (int8 peak estimate: 4x = {4 * gflops:.0f} GOP/s)",
          flush=True)
    rng = np.random.default_rng(0)
    variants = ["tvm_int8"] + (["tvm_int8_tuned"] if self.args.tune_dir else [])
    for b in self.args.batch:
      totals = {v: 0.0 for v in ["xla_float32", *variants]}
      layers, macs = [], 0
      for (h, w, cin, cout, s), (count, conv, reader) in groups.items():
        p = conv_program(conv, reader, (h, w, cin))
        x = rng.integers(-128, 128, (b, h, w, cin)).astype(np.int8)
        ref = np.asarray(P.run(p, x))
        layer = dict(shape=[h, w, cin, cout], stride=s, count=count)
        wf = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
        bf = rng.standard_normal(cout).astype(np.float32)
        layer["xla_float32_ms"] = self.time(_xla_conv(s), x.astype(np.float32), wf, bf)[0]
        for v in variants:
          kw = {} if v == "tvm_int8" else dict(
              tune_dir=self.tune_dir("conv3x3", "int8"), trials=self.args.trials,
              trials_per_task=self.args.trials_per_task)
          module = deploy.build(p, self.target, b, **kw)
          if not np.array_equal(module(x), ref):
            raise AssertionError(f"TVM conv {layer['shape']} differs from the interpreter")
          layer[f"{v}_ms"] = self.time(module, x)[0]
        for v in totals:
          totals[v] += count * layer[f"{v}_ms"]
        oh, ow = (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1
        macs += count * b * oh * ow * 9 * cin * cout
        layers.append(layer)
      row = dict(layers=layers, total_ms=totals, gmacs=macs / 1e9)
      for v in variants:
        gops = 2 * macs / (totals[v] * 1e-3) / 1e9
        row[f"{v}_gops"] = gops
        row[f"{v}_fraction_of_int8_peak"] = gops / (4 * gflops)
        row[f"{v}_x_vs_xla_float32"] = totals["xla_float32"] / totals[v]
      out["batches"][str(b)] = row
      print(f"  3x3 convs, batch {b}: " + ", ".join(
          f"{v} {ms:.2f} ms" for v, ms in totals.items()) + "; " + ", ".join(
              f"{v} {row[f'{v}_x_vs_xla_float32']:.2f}x XLA f32, {row[f'{v}_gops']:.0f} GOP/s = "
              f"{100 * row[f'{v}_fraction_of_int8_peak']:.0f}% of int8 peak" for v in variants),
            flush=True)
    return out


# ----------------------------------------------------------------------------- report


def machine():
  import jax
  import onnxruntime
  import tvm

  from grassq import deploy

  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(cpu=cpu, cores=os.cpu_count(), target=deploy.host_target(),
              avx512_vnni=deploy.has_avx512_vnni(), tvm=tvm.__version__, jax=jax.__version__,
              onnxruntime=onnxruntime.__version__, tvm_threads=tvm.runtime.num_threads())


def markdown(out_dir):
  """A Markdown table per model from every ``bench_<model>.json`` in `out_dir` (runs of
  different models may come from different invocations: each names its own settings)."""
  parts = ["Times: median wall-clock ms per call (numpy in, numpy out); × XLA f32 = XLA "
           "float32's time / this time (above 1: faster than XLA).", ""]
  for name in MODELS:
    path = os.path.join(out_dir, f"bench_{name}.json")
    if not os.path.exists(path):
      continue
    report = files.read_json(path, "benchmark report",
                             f"run `python -m benchmarks.deploy --models {name}` again")
    spec, info, args = MODELS[name], report["machine"], report["args"]
    batches = list(report["batches"])
    variants = [v for v in LABELS if any(v in report["batches"][b] for b in batches)]
    parts += [f"**{spec['title']}** ({'×'.join(map(str, spec['image_shape']))}, "
              f"{spec['num_classes']} classes, {report['gmacs_per_image']:.3f} GMAC per image; "
              f"{info['cpu']}, {info['cores']} cores"
              + (f", TVM on {info['tvm_threads']} threads" if "tvm_threads" in info else "")
              + f"; median of {args['repeats']} calls; "
              f"{report['time']}; load average {', '.join(f'{x:.2f}' for x in report.get('load_average', []))})",
              "",
              "| candidate | " + " | ".join(f"batch {b}: ms | × XLA f32" for b in batches)
              + " | check |",
              "|---|" + "---|---|" * len(batches) + "---|"]
    for v in variants:
      cells, check = [], ""
      for b in batches:
        row = report["batches"][b].get(v)
        cells += ["–", "–"] if row is None else [f"{row['ms']:.2f}",
                                                  f"{row['x_vs_xla_float32']:.2f}"]
        check = check or (row or {}).get("check", "")
      parts.append(f"| {LABELS[v]} | " + " | ".join(cells) + f" | {check} |")
    conv = report.get("conv3x3")
    if conv:
      parts.append("")
      for b, row in conv["batches"].items():
        t = row["total_ms"]
        parts.append(f"- 3×3 convolutions alone, batch {b} ({row['gmacs']:.2f} GMAC): XLA "
                     f"float32 {t['xla_float32']:.2f} ms; " + "; ".join(
                         f"{LABELS[v]} {t[v]:.2f} ms = {row[f'{v}_x_vs_xla_float32']:.2f}× "
                         f"XLA, {row[f'{v}_gops']:.0f} GOP/s = "
                         f"{100 * row[f'{v}_fraction_of_int8_peak']:.0f} % of the int8 peak "
                         f"estimate ({conv['int8_peak_gops_estimate']:.0f} GOP/s: 4× the "
                         "float32 GEMM rate)" for v in t if v != "xla_float32"))
    acc = report.get("accuracy")
    if acc:
      parts.append(f"- top-1 on {acc['images']} Fashion-MNIST test images: float "
                   f"{acc['xla_float32']:.4f}; int8 program (= TVM) "
                   f"{acc['interpreter_int8']:.4f}, onnxruntime {acc['onnxruntime_int8']:.4f}; "
                   f"mixed program (= TVM) {acc['interpreter_mixed']:.4f}, onnxruntime "
                   f"{acc['onnxruntime_mixed']:.4f}")
    parts.append("")
  return "\n".join(parts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--max_seconds", type=float, default=30.0,
                  help="stop a candidate's repeats after this many seconds (slow untuned ones)")
  ap.add_argument("--variants", nargs="+", choices=list(LABELS),
                  help="only these candidates (XLA float32, the baseline, always runs)")
  ap.add_argument("--tune_dir", help="also MetaSchedule-tuned TVM builds, databases here")
  ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trials (0: apply only)")
  ap.add_argument("--trials_per_task", type=int, default=None)
  ap.add_argument("--convs", action=argparse.BooleanOptionalAction, default=None,
                  help="time the 3x3 convolutions alone (default: for ResNet-18)")
  ap.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime threads")
  ap.add_argument("--eval_images", type=int, default=1000,
                  help="ResNet-20 top-1 on this many Fashion-MNIST test images (0: skip)")
  ap.add_argument("--calibration_batch", type=int, default=8, help="ResNet-18 calibration")
  ap.add_argument("--r20_program", default="results/quant/programs/w8a8")
  ap.add_argument("--r20_mixed", default="results/mixed/programs/bops_0.5")
  ap.add_argument("--fp_workdir", default="runs/fmnist_resnet20")
  ap.add_argument("--out", default="results/deploy")
  args = ap.parse_args(argv)

  info = machine()
  print(f"CPU: {info['cpu']} ({info['cores']} cores, AVX-512 VNNI: {info['avx512_vnni']}); "
        f"TVM {info['tvm']}, JAX {info['jax']}, onnxruntime {info['onnxruntime']}; median of "
        f"{args.repeats} after {args.warmup} warm-up calls", flush=True)
  bench = Bench(args)
  for name in args.models:
    report = bench.model(name)
    report.update(machine=info, args=vars(args), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                  load_average=list(os.getloadavg()))
    files.write_json(os.path.join(args.out, f"bench_{name}.json"), report, indent=1)
    files.atomic_write(os.path.join(args.out, "bench.md"), markdown(args.out))
  print()
  print(markdown(args.out))


if __name__ == "__main__":
  main()
