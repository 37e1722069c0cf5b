"""The integer program: an explicit, immutable integer-only network, and its int32 interpreter.

`to_program(model, variables, image_shape)` turns a calibrated (QAT) `QResNet` or `QInception`
into an `IntegerProgram`: an ordered tuple of `Op`s over named tensors with int8 weights (int4
packed two per byte), int32 biases, per-channel dyadic multipliers and shifts, and clip ranges.
Everything a back end needs is in the program; `run` (pure int32 jnp, jit-compiled, no
floating-point op between the input quantization and the int32 logits) and the TVM lowering
consume it and must agree bit for bit.

Op kinds and their semantics (all tensors NHWC, values held in int32 between ops):

* ``quantize_input``: the boundary. clamp(round_half_even(x / scale)) to signed int8.
* ``conv``: int32 accumulation of conv(x, W) + bias; x is narrowed to its declared (bits,
  signed) storage type first. Attributes ``strides``, ``padding``, ``w_bits``.
* ``dense``: the same for a matrix product.
* ``requantize``: (acc·m + 2^(c−1)) >> c per channel, then clamp to (bits, signed) when
  ``saturate`` (the ReLU of unsigned outputs is this clamp at 0).
* ``add``: int32 add of two requantized (unsaturated) branches, clamped once to [lo, hi].
* ``concat``: the inputs joined along channels (the last axis), in the order given. Each input
  is already requantized and saturated to the common output scale and to the ``bits``/``signed``
  range named in the attributes (Inception: every branch's accumulator is requantized with its
  own per-channel multipliers to the scale of the quantizer after the block, and the clamp at 0
  is the branch's ReLU; the op is named after that quantizer).
* ``max_pool``, ``avg_pool``, ``global_avg_pool``: integer pools (floor division for averages).
  ``max_pool`` also runs on int32 accumulators (per-channel positive scales: max commutes with
  the requantization that follows). ``avg_pool`` takes optional ``padding`` (zeros; default
  none) and ``count_include_pad`` (default False: divide by the unpadded count; Inception's 3x3/1
  pools set True and divide by 9). ResNet-D's 2x2/2 shortcut pool is the model's
  ``padding="SAME"``, ``count_include_pad=False`` written out: on an odd size the last window
  hangs over the edge by one and averages the values inside it.

The program's output is int32 logits at one per-tensor ``output_scale``, so their argmax is the
prediction and ``logits · output_scale`` approximates the float logits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grassq.quant import intops, qat, quantizers
from grassq.quant.dyadic import dyadic, requantize

PROGRAM_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Op:
  """One integer op: ``kind`` reads ``inputs`` and writes ``output``.

  ``attrs`` are static python values (ints, bools, tuples); ``arrays`` are read-only numpy
  arrays (weights, biases, multipliers, shifts).
  """

  kind: str
  name: str
  inputs: tuple
  output: str
  attrs: Mapping[str, Any]
  arrays: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class IntegerProgram:
  """An integer-only network: ops in order, its input shape and the output's scale."""

  ops: tuple
  input_shape: tuple
  output: str
  output_scale: float
  num_classes: int

  def __post_init__(self):
    for op in self.ops:
      for a in op.arrays.values():
        a.setflags(write=False)

  def layer(self, name: str) -> Op:
    for op in self.ops:
      if op.name == name:
        return op
    raise KeyError(f"no op named {name!r}")


# ----------------------------------------------------------------------------- conversion


class _Builder:
  """Walks a calibrated QResNet's variables and emits ops, tracking each tensor's scale."""

  def __init__(self, model, variables, image_shape=None):
    self.model = model
    self.params = variables["params"]
    self.stats = variables["batch_stats"]
    self.ops: list[Op] = []
    self.meta: dict[str, tuple] = {}  # tensor -> (scale, bits, signed)
    self.hw: dict[str, tuple | None] = {}  # tensor -> spatial (H, W), None for vectors
    self.image_hw = tuple(image_shape[:2]) if image_shape is not None else None
    self.count = 0

  def _tensor(self, hint):
    self.count += 1
    return f"t{self.count}_{hint.replace('/', '.')}"

  def emit(self, kind, name, inputs, attrs, arrays, meta):
    out = self._tensor(name)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    op = Op(kind, name, tuple(inputs), out, dict(attrs), arrays)
    self.ops.append(op)
    self.meta[out] = meta
    self.hw[out] = _out_hw(op, self.hw[inputs[0]] if inputs else self.image_hw)
    return out

  # -- variables
  def _sub(self, tree, path):
    for key in path.split("/"):
      tree = tree[key]
    return tree

  def act_scale(self, path, bits, signed):
    r = self._sub(self.stats, path + "/range")
    if not bool(np.asarray(r["initialized"])):
      raise ValueError(f"activation quantizer {path} was never calibrated: run training "
                       "batches through the QAT model (train=True) before converting")
    return float(np.asarray(quantizers.activation_scale(r["lo"], r["hi"], bits, signed)))

  def add_scale(self, path):
    """Output scale of the residual join `path` (unsigned, `qat.RESIDUAL_BITS` wide)."""
    r = self._sub(self.stats, path + "/range")
    if not bool(np.asarray(r["initialized"])):
      raise ValueError(f"residual join {path} was never calibrated")
    hi = float(np.asarray(r["hi"]))
    return hi / (2**qat.RESIDUAL_BITS - 1) if hi > 0 else 1.0

  # -- ops
  def requant(self, x, name, out_scale, bits, signed, saturate=True):
    scale, _, _ = self.meta[x]
    ratio = np.broadcast_to(np.asarray(scale, np.float64) / out_scale, np.shape(scale))
    try:
      m, c = dyadic(ratio)
    except ValueError as e:
      raise ValueError(f"{name}: cannot requantize from scale {np.max(scale):.3g} to "
                       f"{out_scale:.3g}: {e}") from None
    return self.emit("requantize", name, [x], dict(bits=bits, signed=signed, saturate=saturate),
                     dict(multiplier=np.asarray(m, np.int32), shift=np.asarray(c, np.int32)),
                     (out_scale, bits, signed))

  def act(self, x, path, bits, signed):
    return self.requant(x, path, self.act_scale(path, bits, signed), bits, signed)

  def conv(self, x, path, strides, padding, epsilon=1e-5):
    p = self._sub(self.params, path)
    s = self._sub(self.stats, path)
    w_bits = self.model_bits(path)
    q, s_w, bf = _fold_and_quantize(p["kernel"], p["bn_scale"], p["bn_bias"], s["mean"],
                                    s["var"], bits=w_bits, epsilon=epsilon)
    return self._affine("conv", x, path, np.asarray(q), np.asarray(s_w, np.float64),
                        np.asarray(bf, np.float64), w_bits,
                        dict(strides=tuple(strides), padding=tuple(map(tuple, padding))))

  def dense(self, x, path):
    p = self._sub(self.params, path)
    w_bits = self.model_bits(path)
    q, s_w = quantizers.quantize_weight(p["kernel"], w_bits)
    return self._affine("dense", x, path, np.asarray(q), np.asarray(s_w, np.float64),
                        np.asarray(p["bias"], np.float64), w_bits, {})

  def _affine(self, kind, x, path, q, s_w, bias_f, w_bits, attrs):
    s_in, a_bits, a_signed = self.meta[x]
    bias = quantizers.quantize_bias(bias_f, s_w * s_in)
    fan_in = int(np.prod(q.shape[:-1]))
    intops.check_accumulator_fits(fan_in, w_bits, a_bits, a_signed,
                                  bias_bound=int(np.abs(bias).max(initial=0)), what=path)
    weight = intops.pack_int4(q) if w_bits <= 4 else q.astype(np.int8)
    attrs = dict(attrs, w_bits=w_bits, cout=q.shape[-1], in_bits=a_bits, in_signed=a_signed)
    return self.emit(kind, path, [x], attrs, dict(weight=weight, bias=bias),
                     (s_w * s_in, 32, True))

  def model_bits(self, path):
    return self.model.weight_bits_of(path)

  def act_bits(self, path):
    return self.model.act_bits_of(path)


@functools.partial(jax.jit, static_argnames=("bits", "epsilon"))
def _fold_and_quantize(kernel, gamma, beta, mean, var, bits, epsilon):
  """BatchNorm folded into the kernel, which is quantized per channel: (q, s_w, folded bias).

  One compiled call per layer shape (op-by-op it compiled a dozen tiny programs per layer);
  the same elementwise float32 ops as the QAT forward pass.
  """
  wf, bf = qat.fold_bn(kernel, gamma, beta, mean, var, epsilon)
  q, s_w = quantizers.quantize_weight(wf, bits)
  return q, s_w, bf


def _pad(k):
  p = (k - 1) // 2
  return ((p, p), (p, p))


def _same_padding(hw, window, strides):
  """Explicit ((top, bottom), (left, right)) of padding="SAME" as `lax.padtype_to_pads` has it:
  output ⌈n/s⌉, the extra row/column at the end."""
  pads = []
  for n, k, s in zip(hw, window, strides):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def _out_hw(op, hw):
  """Spatial size (H, W) of `op`'s output from its input's (None for vectors)."""
  if hw is None or op.kind in ("global_avg_pool", "dense", "grassmann_head"):
    return None
  if op.kind in ("conv", "max_pool", "avg_pool"):
    a = op.attrs
    window = op.arrays["weight"].shape[:2] if op.kind == "conv" else tuple(a["window"])
    strides = tuple(a.get("strides") or window)
    pads = a.get("padding", ((0, 0), (0, 0)))
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(hw, window, strides, pads))
  return hw


def to_program(model, variables, image_shape: Sequence[int]) -> IntegerProgram:
  """Builds the integer program of a calibrated `QResNet` or `QInception` (module docstring).

  Raises ValueError for a never-calibrated activation quantizer, an accumulator that could
  overflow int32 for a layer's shape and bit-widths, a requantization shift outside [1, 62],
  or an unsupported bit-width.
  """
  from grassq.quant import qinception, qresnet

  if isinstance(model, qinception.QInception):
    return _inception_program(model, variables, image_shape)
  if not isinstance(model, qresnet.QResNet):
    raise TypeError("to_program needs a grassq.quant.qresnet.QResNet or "
                    f"grassq.quant.qinception.QInception, got {type(model)}")
  b = _Builder(model, variables, image_shape)
  s8 = model.hawq_signed8
  in_scale = b.act_scale("input_act", 8, True)
  x = b.emit("quantize_input", "input_act", [], dict(bits=8, signed=True, scale=in_scale), {},
             (in_scale, 8, True))
  if model.stem in ("cifar", "imagenet"):
    k, s = (3, 1) if model.stem == "cifar" else (7, 2)
    x = b.conv(x, "stem_conv", (s, s), _pad(k))
  elif model.stem == "deep":
    for i, s in zip((1, 2, 3), (2, 1, 1)):
      if i > 1:
        bits = b.act_bits(f"stem_conv{i}")
        x = b.act(x, f"stem_act{i - 1}", bits, s8 and bits == 8)
      x = b.conv(x, f"stem_conv{i}", (s, s), _pad(3))
  x = b.act(x, "stem_act", 8, s8)
  if model.stem != "cifar":
    meta = b.meta[x]
    x = b.emit("max_pool", "stem_pool", [x], dict(window=(3, 3), strides=(2, 2),
                                                  padding=((1, 1), (1, 1))), {}, meta)

  for i, num_blocks in enumerate(model.stage_sizes):
    for j in range(num_blocks):
      path = f"stage{i + 1}_block{j}"
      filters = model.num_filters * 2**i
      strides = 2 if i > 0 and j == 0 else 1
      x = _block(b, model, x, path, filters, strides)

  return _pool_and_head(b, model, x, image_shape)


def _pool_and_head(b, model, x, image_shape):
  """Global average pool, ``head_act``, the classifier and the int32 logits; the program."""
  s8 = model.hawq_signed8
  pooled = b.emit("global_avg_pool", "pool", [x], {}, {}, b.meta[x])
  head_bits = b.act_bits("head")
  h = b.act(pooled, "head_act", head_bits, s8 and head_bits == 8)
  if model.head == "grassmann":
    logits, out_scale = _grassmann_head(b, model, h)
  else:
    acc = b.dense(h, "head")
    s_acc = np.asarray(b.meta[acc][0])
    out_scale = float(s_acc.max())  # one scale for every class: argmax is the prediction
    logits = b.requant(acc, "logits", out_scale, 32, True)
  return IntegerProgram(tuple(b.ops), tuple(image_shape), logits, out_scale, model.num_classes)


def _inception_program(model, variables, image_shape):
  """The integer program of a calibrated `QInception` (same walk as its forward pass)."""
  from grassq.models import inception
  from grassq.quant import qinception

  b = _Builder(model, variables, image_shape)
  stem, blocks = inception.network(model)
  in_scale = b.act_scale("input_act", 8, True)
  x = b.emit("quantize_input", "input_act", [], dict(bits=8, signed=True, scale=in_scale), {},
             (in_scale, 8, True))
  leaves = _inception_branch(b, x, stem, "")
  for name, branches in blocks:
    groups = qinception.block_groups(name + "/", branches)
    x = _join(b, leaves, f"{name}/act_in", b.act_bits(groups[0][1][0]))
    leaves = [t for br in branches for t in _inception_branch(b, x, br, name + "/")]
  x = _join(b, leaves, "final_act", qinception.FINAL_ACT_BITS)
  return _pool_and_head(b, model, x, image_shape)


def _inception_branch(b, x, steps, prefix):
  """Ops of one branch from tensor x; returns its outputs: int32 accumulators (a conv's, maybe
  max-pooled) or, for a pool-only branch, the quantized input pooled."""
  from grassq.models import inception

  for step in steps:
    is_acc = b.meta[x][1] == 32
    if isinstance(step, inception.Conv):
      layer = f"{prefix}{step.name}/conv"
      if is_acc:
        x = b.act(x, f"{prefix}{step.name}_act", b.act_bits(layer), False)
      x = b.conv(x, layer, step.strides, step.padding, inception.BN_EPSILON)
    elif isinstance(step, inception.Pool) and step.kind == "max":
      x = b.emit("max_pool", prefix + step.name, [x], dict(
          window=tuple(step.window), strides=tuple(step.strides),
          padding=tuple(map(tuple, step.padding))), {}, b.meta[x])
    elif isinstance(step, inception.Pool) and step.kind == "avg":
      if is_acc:
        raise ValueError(f"{prefix}{step.name}: an average pool must read a quantized tensor")
      x = b.emit("avg_pool", prefix + step.name, [x], dict(
          window=tuple(step.window), strides=tuple(step.strides),
          padding=tuple(map(tuple, step.padding)), count_include_pad=True), {}, b.meta[x])
    elif isinstance(step, inception.Split):
      if is_acc:
        first = f"{prefix}{inception.readers((step,))[0]}/conv"
        x = b.act(x, f"{prefix}{step.name}_act", b.act_bits(first), False)
      return [t for br in step.branches for t in _inception_branch(b, x, br, prefix)]
    else:
      raise ValueError(f"unknown step {step!r}")
  return [x]


def _join(b, leaves, name, bits):
  """Requantizes every leaf to quantizer `name`'s scale (saturated, unsigned: the ReLU) and
  concatenates them; a single leaf is just requantized. Either op is named `name`."""
  scale = b.act_scale(name, bits, False)
  if len(leaves) == 1:
    return b.requant(leaves[0], name, scale, bits, False)
  producer = {op.output: op.name for op in b.ops}
  parts = [b.requant(t, f"{producer[t]}/requant", scale, bits, False) for t in leaves]
  return b.emit("concat", name, parts, dict(bits=bits, signed=False), {}, (scale, bits, False))


def _grassmann_head(b, model, h):
  """Integer GCR logits: ⌊‖p_i‖·M / ‖x‖⌋ with p = requantized Sᵀx and both norms by isqrt.

  The projections are requantized to PROJECTION_BITS signed so that Σ_k p² fits int32; the
  feature norm² Σ x² of unsigned 8-bit features fits for n < 33,025. M = round(γ·s_p/s_x·2^F)
  puts the logits at the output scale 2^−F, with F chosen so that ‖p‖·M fits int32.
  """
  kw = dict(model.head_kwargs)
  k, gamma = int(kw.get("subspace_dim", 8)), float(kw.get("scale", 25.0))
  pbits = qat.PROJECTION_BITS
  bases = b.params["head"]["bases"]
  num_classes, n, _ = bases.shape
  w_bits = b.model_bits("head")
  q, s_w = quantizers.quantize_weight(qat.bases_as_kernel(bases), w_bits)
  q, s_w = np.asarray(q), np.asarray(s_w, np.float64)
  s_x, a_bits, a_signed = b.meta[h]
  intops.check_accumulator_fits(n, w_bits, a_bits, a_signed, what="head (projection)")
  qmax = 2**(pbits - 1) - 1
  if k * qmax * qmax >= 2**31:
    raise ValueError(f"head: {k} projections of {pbits} bits overflow int32 when squared")
  if a_signed or n * (2**a_bits - 1)**2 >= 2**31:
    raise ValueError("head: the integer Grassmann head needs unsigned features with n·(2^b−1)² "
                     "< 2^31")
  r = b._sub(b.stats, "head/proj_range")
  if not bool(np.asarray(r["initialized"])):
    raise ValueError("head/proj_range was never calibrated")
  amax = max(abs(float(np.asarray(r["lo"]))), abs(float(np.asarray(r["hi"]))))
  s_p = amax / qmax if amax > 0 else 1.0
  m, c = dyadic(s_w * s_x / s_p)
  ratio = gamma * s_p / s_x
  norm_max = int(np.ceil(np.sqrt(k))) * qmax
  frac = int(np.floor(np.log2((2**31 - 1) / norm_max / ratio)))
  big_m = int(round(ratio * 2.0**frac))
  weight = intops.pack_int4(q) if w_bits <= 4 else q.astype(np.int8)
  out = b.emit("grassmann_head", "head", [h],
               dict(num_classes=num_classes, subspace_dim=k, proj_bits=pbits, w_bits=w_bits,
                    cout=num_classes * k, in_bits=a_bits, in_signed=a_signed, norm_multiplier=big_m),
               dict(weight=weight, multiplier=np.asarray(m, np.int32),
                    shift=np.asarray(c, np.int32)),
               (2.0**-frac, 32, True))
  return out, 2.0**-frac


def _block(b, model, x, path, filters, strides):
  s8 = model.hawq_signed8
  bottleneck = model.block == "bottleneck"

  def act(t, name, conv_name):
    bits = b.act_bits(f"{path}/{conv_name}")
    return b.act(t, f"{path}/{name}", bits, s8 and bits == 8)

  a = act(x, "act_in", "conv1")
  if bottleneck:
    s1, s3 = (strides, 1) if model.stride_on == "1x1" else (1, strides)
    y = b.conv(a, f"{path}/conv1", (s1, s1), _pad(1))
    y = act(y, "act1", "conv2")
    y = b.conv(y, f"{path}/conv2", (s3, s3), _pad(3))
    y = act(y, "act2", "conv3")
    y = b.conv(y, f"{path}/conv3", (1, 1), _pad(1))
  else:
    y = b.conv(a, f"{path}/conv1", (strides, strides), _pad(3))
    y = act(y, "act1", "conv2")
    y = b.conv(y, f"{path}/conv2", (1, 1), _pad(3))
  if "proj_conv" not in b._sub(b.params, path):
    r = x
  else:
    src, st = a, strides
    if model.shortcut == "avgpool" and strides != 1:
      # ResNet-D: the model's nn.avg_pool(padding="SAME", count_include_pad=False), i.e.
      # PyTorch's AvgPool2d(ceil_mode=True, count_include_pad=False): on odd sizes the last
      # window hangs over the edge and averages only the values inside.
      window = (strides, strides)
      src = b.emit("avg_pool", f"{path}/proj_pool", [a],
                   dict(window=window, strides=window,
                        padding=_same_padding(b.hw[a], window, window), count_include_pad=False),
                   {}, b.meta[a])
      st = 1
    r = b.conv(src, f"{path}/proj_conv", (st, st), _pad(1))
  bits = qat.RESIDUAL_BITS
  out_scale = b.add_scale(f"{path}/add")
  ya = b.requant(y, f"{path}/add_main", out_scale, 32, True, saturate=False)
  ra = b.requant(r, f"{path}/add_shortcut", out_scale, 32, True, saturate=False)
  return b.emit("add", f"{path}/add", [ya, ra], dict(lo=0, hi=2**bits - 1), {},
                (out_scale, bits, False))


# ----------------------------------------------------------------------------- interpreter


def _storage(x, bits, signed):
  """Narrows int32 values to the dtype the conv kernels take (int8/uint8 up to 8 bits)."""
  if bits <= 8:
    return x.astype(jnp.int8 if signed else jnp.uint8)
  return x


def _apply(op: Op, arrays, env):
  a = op.attrs
  if op.kind == "conv" or op.kind == "dense":
    x = _storage(env[op.inputs[0]], a["in_bits"], a["in_signed"])
    w = arrays["weight"]
    if a["w_bits"] <= 4:
      w = intops.unpack_int4(w, a["cout"])
    if op.kind == "conv":
      acc = intops.conv2d_int(x, w, a["strides"], a["padding"])
    else:
      acc = intops.dense_int(x, w)
    return intops.add_bias(acc, arrays["bias"])
  if op.kind == "grassmann_head":
    x = env[op.inputs[0]]
    w = arrays["weight"]
    if a["w_bits"] <= 4:
      w = intops.unpack_int4(w, a["cout"])
    acc = intops.dense_int(_storage(x, a["in_bits"], a["in_signed"]), w)
    p = requantize(acc, arrays["multiplier"], arrays["shift"], a["proj_bits"], True)
    p = p.reshape(*p.shape[:-1], a["num_classes"], a["subspace_dim"])
    norm = intops.isqrt(jnp.sum(p * p, axis=-1))
    xnorm = jnp.maximum(intops.isqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1)
    return (norm * a["norm_multiplier"]) // xnorm
  if op.kind == "requantize":
    return requantize(env[op.inputs[0]], arrays["multiplier"], arrays["shift"], a["bits"],
                      a["signed"], a["saturate"])
  if op.kind == "add":
    return intops.add_clamp(env[op.inputs[0]], env[op.inputs[1]], a["lo"], a["hi"])
  if op.kind == "max_pool":
    return intops.max_pool_int(env[op.inputs[0]], a["window"], a["strides"], a["padding"])
  if op.kind == "avg_pool":
    return intops.avg_pool_int(env[op.inputs[0]], a["window"], a["strides"],
                               a.get("padding", ((0, 0), (0, 0))),
                               count_include_pad=a.get("count_include_pad", False))
  if op.kind == "concat":
    return jnp.concatenate([env[t] for t in op.inputs], axis=-1)
  if op.kind == "global_avg_pool":
    return intops.global_avg_pool_int(env[op.inputs[0]])
  raise ValueError(f"unknown op kind {op.kind!r}")


def quantize_input(program: IntegerProgram, images):
  """Float (normalized) images -> the program's signed int8 input (the float/int boundary)."""
  first = program.ops[0]
  return quantizers.quantize_activation(images, np.float32(first.attrs["scale"]), 8, True)


def program_arrays(program: IntegerProgram) -> dict:
  """The program's arrays as a pytree {op index: {name: array}} (jit arguments, orbax leaves)."""
  return {str(i): dict(op.arrays) for i, op in enumerate(program.ops) if op.arrays}


def interpreter(program: IntegerProgram, all_outputs: bool = False):
  """A jitted ``fn(arrays, x_int8) -> int32 logits`` for this program's structure.

  With ``all_outputs`` it returns {op name: output} for every op (layer-by-layer comparisons).
  """
  ops = program.ops

  def fn(arrays, x):
    x = jnp.asarray(x)
    if x.dtype != jnp.int8 or x.shape[1:] != tuple(program.input_shape):
      raise ValueError(f"program input must be int8 (B, {program.input_shape}), got "
                       f"{x.dtype} {x.shape}")
    env = {ops[0].output: x.astype(jnp.int32)}
    for i, op in enumerate(ops[1:], start=1):
      env[op.output] = _apply(op, arrays.get(str(i), {}), env)
    if all_outputs:
      return {op.name: env[op.output] for op in ops}
    return env[program.output]

  return jax.jit(fn)


def run(program: IntegerProgram, x_int8, fn=None):
  """int32 logits of the program on int8 inputs (build `fn` once with `interpreter`)."""
  fn = fn or interpreter(program)
  return fn(program_arrays(program), x_int8)


def _forced_interpreter(program: IntegerProgram):
  """A jitted ``fn(arrays, x, forced, teacher) -> {op name: output}``: the program, where with
  ``teacher`` every op named in `forced` passes the given values on instead of its own output
  (each op then sees the reference inputs: differences are local to it)."""
  ops = program.ops

  def fn(arrays, x, forced, teacher):
    env = {ops[0].output: x.astype(jnp.int32)}
    outs = {ops[0].name: env[ops[0].output]}
    for i, op in enumerate(ops[1:], start=1):
      y = _apply(op, arrays.get(str(i), {}), env)
      outs[op.name] = y
      env[op.output] = jnp.where(teacher, forced[op.name], y) if op.name in forced else y
    return outs

  return jax.jit(fn)


def layer_report(program: IntegerProgram, model, variables, images, batch_size: int = 500,
                 local: bool = False):
  """The integer program against its fake-quant model, activation by activation.

  Every activation quantizer and residual join of the QAT `model` has an op of the same name in
  the program (``quantize_input``/``requantize``/``add``/``concat``; the requantizations that
  feed a ``concat`` are not quantizers and are not listed). Its integer output is compared with
  the fake-quant output divided by that tensor's scale: both count the same LSBs.

  Args:
    program: `to_program(model, variables, ...)`.
    model, variables: the calibrated QAT model it was converted from.
    images: float images as the model takes them (normalized), (N, *program.input_shape).
    batch_size: images per jitted call.
    local: also run the program with every compared tensor replaced by the fake-quant values
      (teacher forcing), so that each op's difference is its own, not carried from earlier
      ops: the rounding rules alone (expected: at most 1 LSB, rarely).

  Returns:
    {"layers": {name: {"bits", "max_lsb", "mean_lsb", "frac_differ"}} in program order (LSBs
    of that tensor: residual joins are 16 bits wide, so one 8-bit LSB is 2^8 of theirs),
     "top1_agreement": integer vs fake-quant argmax, "max_logit_diff": in float logit units,
     "integer_pred", "fake_pred": the two argmax predictions (numpy int arrays)}, and with
    `local` "local_layers" as "layers" for the teacher-forced run.
  """
  b = _Builder(model, variables)
  scales, widths = {}, {}
  joined = {t for op in program.ops if op.kind == "concat" for t in op.inputs}
  for op in program.ops:
    if (op.kind in ("quantize_input", "requantize", "concat") and op.attrs.get("saturate", True)
        and op.name != "logits" and op.output not in joined):
      scales[op.name] = b.act_scale(op.name, op.attrs["bits"], op.attrs["signed"])
      widths[op.name] = op.attrs["bits"]
    elif op.kind == "add":
      scales[op.name] = b.add_scale(op.name)
      widths[op.name] = qat.RESIDUAL_BITS

  @jax.jit
  def fake(v, x):
    logits, state = model.apply(v, x, capture_intermediates=lambda m, _: isinstance(
        m, (qat.QuantAct, qat.QuantAdd)), mutable=["intermediates"])
    outs = {}
    for path, y in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
      outs["/".join(k.key for k in path[:-2])] = y
    return logits, outs

  fn = _forced_interpreter(program) if local else interpreter(program, all_outputs=True)
  arrays = program_arrays(program)
  new = lambda: {name: [0, 0.0, 0, 0] for name in scales}  # max, sum, differing, count
  stats, local_stats = new(), new()
  preds, max_logit = ([], []), 0.0
  images = np.asarray(images)

  def accumulate(st, ints, ref):
    for name in scales:
      d = np.abs(np.asarray(ints[name], np.int64) - ref[name])
      s = st[name]
      s[0] = max(s[0], int(d.max()))
      s[1] += float(d.sum())
      s[2] += int(np.count_nonzero(d))
      s[3] += d.size

  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    logits, outs = fake(variables, x)
    missing = set(scales) - set(outs)
    if missing:
      raise ValueError(f"the model has no quantizer for program ops {sorted(missing)}")
    ref = {name: np.rint(np.asarray(outs[name], np.float64) / s).astype(np.int64)
           for name, s in scales.items()}
    xq = quantize_input(program, x)
    if local:
      forced = {name: jnp.asarray(r, jnp.int32) for name, r in ref.items()
                if name != program.ops[0].name}
      ints = fn(arrays, xq, forced, False)
      accumulate(local_stats, fn(arrays, xq, forced, True), ref)
    else:
      ints = fn(arrays, xq)
    accumulate(stats, ints, ref)
    deq = np.asarray(ints[program.ops[-1].name], np.float64) * program.output_scale
    logits = np.asarray(logits, np.float64)
    preds[0].append(deq.argmax(-1))
    preds[1].append(logits.argmax(-1))
    max_logit = max(max_logit, float(np.abs(deq - logits).max()))

  def table(st):
    return {name: dict(bits=widths[name], max_lsb=s[0], mean_lsb=s[1] / s[3],
                       frac_differ=s[2] / s[3]) for name, s in st.items()}

  int_pred, fake_pred = np.concatenate(preds[0]), np.concatenate(preds[1])
  rep = dict(layers=table(stats), top1_agreement=float(np.mean(int_pred == fake_pred)),
             max_logit_diff=max_logit, integer_pred=int_pred, fake_pred=fake_pred)
  if local:
    rep["local_layers"] = table(local_stats)
  return rep


# ----------------------------------------------------------------------------- save / load


def _op_json(op: Op) -> dict:
  def plain(v):
    if isinstance(v, (tuple, list)):
      return [plain(x) for x in v]
    if isinstance(v, (np.integer, np.bool_)):
      return v.item()
    return v

  return dict(kind=op.kind, name=op.name, inputs=list(op.inputs), output=op.output,
              attrs={k: plain(v) for k, v in op.attrs.items()}, arrays=sorted(op.arrays))


def save(program: IntegerProgram, path: str, overwrite: bool = False) -> None:
  """Writes the program to directory `path`: ``arrays/`` (orbax) and ``program.json``.

  The directory is assembled under a temporary name and renamed into place, so a reader never
  sees half a program.
  """
  import shutil
  import tempfile

  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".program-tmp-")
  meta = dict(version=PROGRAM_VERSION, input_shape=list(program.input_shape),
              output=program.output, output_scale=program.output_scale,
              num_classes=program.num_classes, ops=[_op_json(op) for op in program.ops])
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "arrays"), program_arrays(program))
    ckptr.wait_until_finished()
  with open(os.path.join(tmp, "program.json"), "w") as f:
    json.dump(meta, f)
  if os.path.exists(path):
    old = tmp + "-old"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)
  else:
    os.replace(tmp, path)


def load(path: str) -> IntegerProgram:
  """Reads a program written by `save`."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  meta_path = os.path.join(path, "program.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"no integer program at {path} (missing program.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("version") != PROGRAM_VERSION:
    raise ValueError(f"{path}: program version {meta.get('version')} is not {PROGRAM_VERSION}")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(path, "arrays"))

  def tup(v):
    return tuple(tup(x) for x in v) if isinstance(v, list) else v

  ops = []
  for i, o in enumerate(meta["ops"]):
    arrays = {n: np.asarray(tree[str(i)][n]) for n in o["arrays"]}
    ops.append(Op(o["kind"], o["name"], tuple(o["inputs"]), o["output"],
                  {k: tup(v) for k, v in o["attrs"].items()}, arrays))
  return IntegerProgram(tuple(ops), tuple(meta["input_shape"]), meta["output"],
                        float(meta["output_scale"]), int(meta["num_classes"]))
