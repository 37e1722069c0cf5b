"""Per-layer latency tables measured with TVM, in the format `grassq.mixed.cost_tables` takes.

`latency_table(model_or_program, image_shape, target)` times each quantizable layer (every conv
and the classifier, named as in `grassq.quant.cost.layer_costs`) at each bit-width on a TVM
target, so that the ILP's latency budget (`grassq.mixed.allocate_bits`) can use numbers of the
machine the network is deployed on rather than BOPs:

    table = deploy.latency_table(model, (28, 28, 1), deploy.host_target())
    costs = mixed.cost_tables(model, (28, 28, 1), latency=table)

Each layer is measured as the deployed module runs it: its int32 input in the layout `build`
uses for the target (NCHW16c on an AVX-512 VNNI CPU), the narrowing to 8-bit storage (x ⊕ 0x80
for signed inputs), the convolution / matrix product with int32 accumulation, the bias and an
8-bit requantize epilogue, lowered by the same `_Lowering` and compiled by the same pipeline as
`build`. The layers are functions of one compiled module; each is warmed up once and timed with
TVM's time evaluator (no Python in the loop), the median of `repeats` runs of at least
`min_repeat_ms` each. Layers of identical shape share one measurement.

Bit-widths: a layer at b bits has b-bit weights and reads b-bit activations (HAWQV3). TVM 0.27's
int4 dtype gives wrong numbers on llvm, so b-bit weights (b ≤ 8) are stored as int8 (int4
packed two per byte and unpacked in the graph, which `tvm.compile` folds into int8 constants)
and b-bit activations as int8/uint8: on CPU targets a 4-bit layer runs the same int8 kernel as
an 8-bit one, and the table says so (equal times up to noise). It is an honest table of what
this target gives, not of what 4-bit kernels could.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from grassq.deploy.build import _device, _target, compile_relax, default_layout
from grassq.deploy.relax import BLOCK, _Lowering, require_tvm


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """One quantizable layer as a latency table times it.

  ``kind`` is "conv" (``in_shape`` (H, W, Cin), ``kernel`` (kh, kw, Cin, Cout)) or "dense"
  (``in_shape`` (rows, n) per image, ``kernel`` (n, Cout)); ``in_signed``: whether it reads
  signed activations (the input image; HAWQV3's signed 8-bit activations).
  """

  name: str
  kind: str
  in_shape: tuple
  kernel: tuple
  strides: tuple = (1, 1)
  padding: tuple = ((0, 0), (0, 0))
  in_signed: bool = False

  def key(self):
    return dataclasses.astuple(self)[1:]


def _pairs(padding, in_hw, kernel, strides):
  import flax.linen as nn
  from jax import lax

  if not isinstance(padding, (str, int)):
    padding = [p if isinstance(p, int) else tuple(p) for p in padding]
  p = nn.linear.canonicalize_padding(padding, 2)
  if isinstance(p, str):
    if p.upper() not in ("SAME", "VALID"):
      raise NotImplementedError(f"padding {p!r} has no integer lowering")
    p = lax.padtype_to_pads(in_hw, kernel, strides, p.upper())
  return tuple((int(lo), int(hi)) for lo, hi in p)


def model_layers(model, image_shape: Sequence[int]) -> list[LayerShape]:
  """The quantizable layers of a grassq model (or its QAT twin) at batch 1, in the order and
  with the names of `grassq.quant.cost.layer_costs` (shapes only: nothing is computed)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from grassq.heads import GrassmannHead
  from grassq.quant import cost, qat

  float_model = qat.float_twin(model)
  signed8 = bool(getattr(model, "hawq_signed8", False))
  found = []

  def intercept(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Conv, nn.Dense, GrassmannHead)):
      found.append((m, tuple(args[0].shape)))
    return next_fun(*args, **kwargs)

  def run():
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = float_model.init(jax.random.key(0), x)
    with nn.intercept_methods(intercept):
      float_model.apply(variables, x)

  jax.eval_shape(run)
  layers = {}
  for m, shape in found:
    keys = m.path
    name = "head" if keys[0] == "head" else "/".join(keys)
    if name in layers:
      continue  # (a head's inner Dense is the head)
    first = not layers
    if isinstance(m, nn.Conv):
      if m.feature_group_count != 1 or m.kernel_dilation not in (None, 1, (1, 1)):
        raise NotImplementedError(f"{name}: grouped or dilated convolutions have no TVM "
                                  "lowering yet")
      kernel = tuple(m.kernel_size) + (shape[-1], m.features)
      strides = m.strides or (1, 1)
      strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
      layers[name] = LayerShape(name, "conv", shape[1:], kernel, strides,
                                _pairs(m.padding, shape[1:3], kernel[:2], strides),
                                first or signed8)
    else:
      cout = (m.num_classes * m.subspace_dim if isinstance(m, GrassmannHead) else m.features)
      rows = int(np.prod(shape[1:-1], dtype=np.int64)) if len(shape) > 2 else 1
      layers[name] = LayerShape(name, "dense", (rows, shape[-1]), (shape[-1], cout),
                                in_signed=first or signed8)
  names = list(cost.layer_costs(float_model, image_shape))
  if sorted(names) != sorted(layers):
    raise ValueError(f"layers found {sorted(layers)} differ from layer_costs {sorted(names)}")
  return [layers[n] for n in names]


def program_layers(program) -> list[LayerShape]:
  """The conv / dense / Grassmann-head ops of an integer program as `LayerShape`s (their
  names are the model's layer names)."""
  from grassq.quant.program import _out_hw

  hw = {program.ops[0].output: tuple(program.input_shape[:2])}
  ch = {program.ops[0].output: program.input_shape[-1]}
  layers = []
  for op in program.ops[1:]:
    src = op.inputs[0] if op.inputs else None
    hw[op.output] = _out_hw(op, hw.get(src))
    ch[op.output] = (op.attrs["cout"] if op.kind == "conv" else
                     sum(ch[t] for t in op.inputs) if op.kind == "concat" else ch.get(src))
    a = op.attrs
    if op.kind == "conv":
      kh, kw = op.arrays["weight"].shape[:2]
      layers.append(LayerShape(op.name, "conv", hw[src] + (ch[src],), (kh, kw, ch[src], a["cout"]),
                               tuple(a["strides"]), tuple(map(tuple, a["padding"])),
                               bool(a["in_signed"])))
    elif op.kind in ("dense", "grassmann_head"):
      n = op.arrays["weight"].shape[0]
      layers.append(LayerShape(op.name, "dense", (1, n), (n, a["cout"]),
                               in_signed=bool(a["in_signed"])))
  return layers


def _layer_op(layer: LayerShape, bits: int, rng):
  """A synthetic program op of `layer` at `bits` (random weights in range, packed if ≤ 4)."""
  from grassq.quant import intops
  from grassq.quant.program import Op

  cout = layer.kernel[-1]
  q = rng.integers(-2**(bits - 1), 2**(bits - 1), layer.kernel)
  weight = intops.pack_int4(q) if bits <= 4 else q.astype(np.int8)
  bias = rng.integers(-2**12, 2**12, cout).astype(np.int32)
  attrs = dict(w_bits=bits, cout=cout, in_bits=bits, in_signed=layer.in_signed)
  if layer.kind == "conv":
    attrs.update(strides=layer.strides, padding=layer.padding)
  return Op(layer.kind, layer.name, ("x",), "acc", attrs, dict(weight=np.asarray(weight),
                                                              bias=bias))


def layer_module(layers: Sequence[LayerShape], bits: Sequence[int], batch: int = 1,
                 layout: str = "NHWC", seed: int = 0):
  """A Relax IRModule with one function per (layer, bits): ``f(x: int32) -> int32``, the
  layer's int32 input (in `layout`) through narrowing, conv/matmul, bias and an 8-bit
  requantize. Returns (module, {(layer index, bits): function name})."""
  _, relax = require_tvm()
  rng = np.random.default_rng(seed)
  bb = relax.BlockBuilder()
  names = {}
  for i, layer in enumerate(layers):
    for b in bits:
      fname = f"layer{i}_w{b}"
      low = _Lowering(bb, relax, layout if layer.kind == "conv" else "NHWC")
      if layer.kind == "conv":
        h, w, c = layer.in_shape
        shape = ((batch, -(-c // BLOCK), h, w, BLOCK) if low.blocked else (batch, h, w, c))
      else:
        rows, n = layer.in_shape
        shape = (batch * rows, n)
      x = relax.Var("x", relax.TensorType(shape, "int32"))
      op = _layer_op(layer, b, rng)
      cout = layer.kernel[-1]
      with bb.function(fname, [x]):
        with bb.dataflow():
          acc = low.op(op, {"x": x}, {"x": layer.kernel[-2]})
          m = np.full(cout, 2**30, np.int32)
          out = low.requantize(acc, m, np.full(cout, 40, np.int32), 8, False)
          out = bb.emit_output(out)
        bb.emit_func_output(out)
      names[(i, b)] = fname
  return bb.get(), names


def _random_input(shape, signed, bits, rng):
  lo, hi = (-2**(bits - 1), 2**(bits - 1)) if signed else (0, 2**bits)
  return rng.integers(lo, hi, shape).astype(np.int32)


def latency_table(model_or_program, image_shape: Sequence[int] | None = None,
                  target: Mapping[str, Any] | None = None, bits: Sequence[int] = (4, 8), *,
                  batch: int = 1, repeats: int = 7, min_repeat_ms: int = 20,
                  layout: str | None = None, schedule: bool = True,
                  tune_dir: str | None = None) -> dict:
  """Measured seconds of every quantizable layer at every bit-width on a TVM target.

  Args:
    model_or_program: a grassq `ResNet`/`InceptionV3` or its QAT twin (with `image_shape`), or
      a `grassq.quant.program.IntegerProgram` (its conv/dense shapes; `image_shape` unused).
    image_shape: the input shape without the batch, e.g. (28, 28, 1).
    target: a TVM target dict (default `host_target()`); its device must be present.
    bits: the bit-widths to time (each in [2, 8]: weights travel as int8, see the module
      docstring: a 4-bit layer runs an int8 kernel here).
    batch: images per call (the table is per call, e.g. batch 1 for latency).
    repeats, min_repeat_ms: the median of `repeats` timed runs, each of at least
      `min_repeat_ms` (TVM's evaluator repeats the call as often as that takes), after one
      warm-up call.
    layout, schedule, tune_dir: as in `build` (defaults: `build`'s layout for the target, the
      hand schedule; a MetaSchedule database in `tune_dir` is applied, never tuned).

  Returns:
    {layer: {bits: seconds}} with the names of `grassq.quant.cost.layer_costs(model,
    image_shape)` (in its order for a model, in program order for a program), as
    `grassq.mixed.cost_tables(model, image_shape, latency=table)` takes it.

  Raises:
    ImportError: without TVM. ValueError: bad bits. NotImplementedError: a layer the lowering
    cannot express (grouped convolutions). RuntimeError: a CUDA target without a GPU.
  """
  tvm, relax = require_tvm()
  from grassq.quant.program import IntegerProgram

  bits = tuple(bits)
  if not bits or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or
                     not 2 <= b <= 8 for b in bits):
    raise ValueError(f"bits must be integers in [2, 8] (TVM kernels here take int8 weights); "
                     f"got {bits}")
  if isinstance(model_or_program, IntegerProgram):
    layers = program_layers(model_or_program)
  else:
    if image_shape is None:
      raise ValueError("latency_table of a model needs image_shape")
    layers = model_layers(model_or_program, image_shape)
  target = _target(target)
  device = _device(target.kind.name)
  layout = default_layout(target) if layout is None else layout
  unique, index = [], {}
  for layer in layers:
    if layer.key() not in index:
      index[layer.key()] = len(unique)
      unique.append(layer)
  mod, names = layer_module(unique, bits, batch, layout)
  vm = relax.VirtualMachine(compile_relax(mod, target, schedule=schedule, tune_dir=tune_dir,
                                          trials=0), device)
  rng = np.random.default_rng(1)
  seconds = {}
  for (i, b), fname in names.items():
    shape = [int(d) for d in mod[fname].params[0].ty.shape]
    x = tvm.runtime.tensor(_random_input(shape, unique[i].in_signed, b, rng), device)
    vm[fname](x)  # warm-up
    timer = vm.time_evaluator(fname, device, number=1, repeat=repeats,
                              min_repeat_ms=min_repeat_ms)
    seconds[(i, b)] = float(np.median(timer(x).results))
  return {layer.name: {b: seconds[(index[layer.key()], b)] for b in bits} for layer in layers}
