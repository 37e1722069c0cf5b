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
  ``saturate`` (the ReLU of unsigned outputs is this clamp at 0). ``relu`` (default False,
  also for programs saved before it) records that the QAT model applies a ReLU before this
  quantizer: the lower clamp is then max(qmin, 0). It is set wherever the model has that ReLU
  (after every conv + BN that a ReLU follows: ``stem_act``, ``act1``/``act2``, Inception's
  ``*_act`` and the requantizations of its joins), for unsigned outputs too, where it changes
  nothing; with HAWQV3's signed 8-bit activations (``hawq_signed8``) it is the ReLU.
  `requantize_range` reads the clamp from these attributes; every back end uses it.
* ``add``: int32 add of two requantized (unsaturated) branches, clamped once to [lo, hi].
* ``concat``: the inputs joined along channels (the last axis), in the order given. Each input
  is already requantized and saturated to the common output scale and to the ``bits``/``signed``
  range named in the attributes (Inception: every branch's accumulator is requantized with its
  own per-channel multipliers to the scale of the quantizer after the block, and the clamp at 0
  is the branch's ReLU; the op is named after that quantizer).
* ``grassmann_head``: p = requantize(Sᵀx) per basis column (``multiplier``, ``shift``) clamped to
  [−proj_max, proj_max] (``proj_max`` = 2^(proj_bits−1) − 1, the QAT model's symmetric clamp;
  programs saved without it keep the signed ``proj_bits`` range), then the int32 logits
  ⌊isqrt(Σ_k p²)·M / max(isqrt(Σ x²), 1)⌋ with M = ``norm_multiplier``.
* ``max_pool``, ``avg_pool``, ``global_avg_pool``: integer pools (floor division for averages).
  ``max_pool`` also runs on int32 accumulators (per-channel positive scales: max commutes with
  the requantization that follows). ``avg_pool`` takes optional ``padding`` (zeros; default
  none) and ``count_include_pad`` (default False: divide by the unpadded count; Inception's 3x3/1
  pools set True and divide by 9). ResNet-D's 2x2/2 shortcut pool is the model's
  ``padding="SAME"``, ``count_include_pad=False`` written out: on an odd size the last window
  hangs over the edge by one and averages the values inside it.

The program's output is int32 logits at one per-tensor ``output_scale``, so their argmax is the
prediction and ``logits · output_scale`` approximates the float logits.

int32 bounds: `value_bounds(program)` proves, for every int8 input, that each value the
interpreter and the TVM lowering form in int32 fits, by interval analysis over the ops from the
program's own integers (per channel), and raises ValueError naming the op otherwise. It runs at
the end of `to_program` and in `load`. What it checks:

* conv / dense / the head's projection: the input's bounds lie in its declared (``in_bits``,
  ``in_signed``) range (it is narrowed to that storage type); every partial sum fits:
  A·Σ|w| + 128·|Σw| + |bias| per output channel, where A = 255 for inputs stored in 8 bits (the
  kernels see x ⊕ 0x80 or x + 128, with 128·Σw added back) and max|x| otherwise. The output's
  bounds are exact for the weights: Σ max(w·lo, w·hi) + bias (0 included when padded).
* requantize: output bounds rq(lo), rq(hi) (it is monotone), clamped; without a narrower clamp
  (unsaturated, or 32 bits) the exact result must fit int32, since a clamp there would be
  silent. Shifts lie in [1, 62].
* add: the sum of the two branches' bounds fits int32; then the op's clamp.
* avg_pool / global_avg_pool: the window sum, count·max|x| (H·W·max|x| for the global pool).
* grassmann_head: Σp² per class and Σx² fit, and isqrt(max Σp²)·M ≤ 2^31 − 1.
* max_pool and concat carry their inputs' bounds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grassq import files
from grassq.quant import intops, qat, quantizers
from grassq.quant.dyadic import MAX_SHIFT, MIN_SHIFT, clip_range, dyadic, requantize

PROGRAM_VERSION = 1
_INT32_MIN, _INT32_MAX = -2**31, 2**31 - 1


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
  def requant(self, x, name, out_scale, bits, signed, saturate=True, relu=False):
    """A requantize op; `relu` records a ReLU of the model before this quantizer."""
    scale, _, _ = self.meta[x]
    ratio = np.broadcast_to(np.asarray(scale, np.float64) / out_scale, np.shape(scale))
    try:
      m, c = dyadic(ratio)
    except ValueError as e:
      raise ValueError(f"{name}: cannot requantize from scale {np.max(scale):.3g} to "
                       f"{out_scale:.3g}: {e}") from None
    return self.emit("requantize", name, [x],
                     dict(bits=bits, signed=signed, saturate=saturate, relu=bool(relu)),
                     dict(multiplier=np.asarray(m, np.int32), shift=np.asarray(c, np.int32)),
                     (out_scale, bits, signed))

  def act(self, x, path, bits, signed, relu=False):
    return self.requant(x, path, self.act_scale(path, bits, signed), bits, signed, relu=relu)

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
    try:
      bias = quantizers.quantize_bias(bias_f, s_w * s_in)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
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

  The program is checked with `value_bounds` before it is returned.

  Raises ValueError for a never-calibrated activation quantizer, an int32 bound that cannot be
  proved (`value_bounds`: an accumulator, a residual add, a pool sum or the Grassmann head
  could overflow; the message names the layer), a requantization shift outside [1, 62], or an
  unsupported bit-width.
  """
  from grassq.quant import qinception, qresnet

  if isinstance(model, qinception.QInception):
    return _checked(_inception_program(model, variables, image_shape))
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
      if i > 1:  # the model: relu(stem_bn{i-1}) -> stem_act{i-1}
        bits = b.act_bits(f"stem_conv{i}")
        x = b.act(x, f"stem_act{i - 1}", bits, s8 and bits == 8, relu=True)
      x = b.conv(x, f"stem_conv{i}", (s, s), _pad(3))
  x = b.act(x, "stem_act", 8, s8, relu=True)  # relu(stem_bn) -> stem_act
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

  return _checked(_pool_and_head(b, model, x, image_shape))


def _checked(program):
  value_bounds(program)
  return program


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
      if is_acc:  # a conv unit's output: relu(bn(conv)) in the model
        x = b.act(x, f"{prefix}{step.name}_act", b.act_bits(layer), False, relu=True)
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
        x = b.act(x, f"{prefix}{step.name}_act", b.act_bits(first), False, relu=True)
      return [t for br in step.branches for t in _inception_branch(b, x, br, prefix)]
    else:
      raise ValueError(f"unknown step {step!r}")
  return [x]


def _join(b, leaves, name, bits):
  """Requantizes every leaf to quantizer `name`'s scale (saturated, unsigned) and concatenates
  them; a single leaf is just requantized. Either op is named `name`. Accumulator leaves are
  conv units' outputs, which the model passes through a ReLU (``relu``); pooled quantized
  leaves are non-negative already."""
  scale = b.act_scale(name, bits, False)
  relu = lambda t: b.meta[t][1] == 32
  if len(leaves) == 1:
    return b.requant(leaves[0], name, scale, bits, False, relu=relu(leaves[0]))
  producer = {op.output: op.name for op in b.ops}
  parts = [b.requant(t, f"{producer[t]}/requant", scale, bits, False, relu=relu(t))
           for t in leaves]
  return b.emit("concat", name, parts, dict(bits=bits, signed=False), {}, (scale, bits, False))


def _grassmann_head(b, model, h):
  """Integer GCR logits: ⌊‖p_i‖·M / ‖x‖⌋ with p = requantized Sᵀx and both norms by isqrt.

  The projections are requantized to the model's ``proj_bits`` (PROJECTION_BITS) and clamped
  to ±proj_max = ±(2^(proj_bits−1) − 1), as `qat.QuantGrassmannHead` clamps them, so that
  Σ_k p² fits int32 (`value_bounds` checks it, and Σ x² of the features). M =
  round(γ·s_p/s_x·2^F) puts the logits at the output scale 2^−F, with F the largest for which
  isqrt(k·proj_max²)·M ≤ 2^31 − 1 (‖p‖ can reach that bound exactly; F is lowered when the
  rounding of M overshoots).
  """
  kw = dict(model.head_kwargs)
  k, gamma = int(kw.get("subspace_dim", 8)), float(kw.get("scale", 25.0))
  pbits = int(kw.get("proj_bits", qat.PROJECTION_BITS))
  bases = b.params["head"]["bases"]
  num_classes, n, _ = bases.shape
  w_bits = b.model_bits("head")
  q, s_w = quantizers.quantize_weight(qat.bases_as_kernel(bases), w_bits)
  q, s_w = np.asarray(q), np.asarray(s_w, np.float64)
  s_x, a_bits, a_signed = b.meta[h]
  qmax = 2**(pbits - 1) - 1  # proj_max: the model's clamp is symmetric
  if k * qmax * qmax > _INT32_MAX:
    raise ValueError(f"head: {k} projections of {pbits} bits overflow int32 when squared")
  r = b._sub(b.stats, "head/proj_range")
  if not bool(np.asarray(r["initialized"])):
    raise ValueError("head/proj_range was never calibrated")
  amax = max(abs(float(np.asarray(r["lo"]))), abs(float(np.asarray(r["hi"]))))
  s_p = amax / qmax if amax > 0 else 1.0
  m, c = dyadic(s_w * s_x / s_p)
  big_m, frac = norm_multiplier(gamma * s_p / s_x, k, qmax)
  weight = intops.pack_int4(q) if w_bits <= 4 else q.astype(np.int8)
  out = b.emit("grassmann_head", "head", [h],
               dict(num_classes=num_classes, subspace_dim=k, proj_bits=pbits, proj_max=qmax,
                    w_bits=w_bits, cout=num_classes * k, in_bits=a_bits, in_signed=a_signed,
                    norm_multiplier=big_m),
               dict(weight=weight, multiplier=np.asarray(m, np.int32),
                    shift=np.asarray(c, np.int32)),
               (2.0**-frac, 32, True))
  return out, 2.0**-frac


def norm_multiplier(ratio: float, subspace_dim: int, proj_max: int) -> tuple:
  """(M, F) of the integer Grassmann head: M = round(ratio·2^F) with F the largest for which
  ‖p‖·M ≤ 2^31 − 1 for every ‖p‖ ≤ isqrt(k·proj_max²) (the exact largest norm the clamp
  allows); F is lowered while the rounding of M overshoots.

  Args:
    ratio: γ·s_p/s_x, the real factor between ‖p‖/‖x‖ in integers and the logit.
    subspace_dim: k, projections per class.
    proj_max: the projections' symmetric clamp.

  Returns:
    (M, F) python ints; the logits' scale is 2^−F.
  """
  norm_max = math.isqrt(subspace_dim * proj_max * proj_max)
  if not (np.isfinite(ratio) and ratio > 0):
    raise ValueError(f"head: the logit scale factor {ratio!r} must be positive and finite")
  frac = int(np.floor(np.log2(_INT32_MAX / norm_max / ratio)))
  big_m = int(round(ratio * 2.0**frac))
  while big_m > 0 and norm_max * big_m > _INT32_MAX:  # round() overshot: one bit less
    frac -= 1
    big_m = int(round(ratio * 2.0**frac))
  if big_m < 1:
    raise ValueError(f"head: logit scale factor {ratio:.3g} leaves no multiplier M")
  return big_m, frac


def _block(b, model, x, path, filters, strides):
  s8 = model.hawq_signed8
  bottleneck = model.block == "bottleneck"

  def act(t, name, conv_name, relu=False):
    bits = b.act_bits(f"{path}/{conv_name}")
    return b.act(t, f"{path}/{name}", bits, s8 and bits == 8, relu=relu)

  # act_in reads the block input (a residual join's clamped output, or the stem's): no ReLU
  # of its own in the model. act1/act2 read relu(bn(conv)).
  a = act(x, "act_in", "conv1")
  if bottleneck:
    s1, s3 = (strides, 1) if model.stride_on == "1x1" else (1, strides)
    y = b.conv(a, f"{path}/conv1", (s1, s1), _pad(1))
    y = act(y, "act1", "conv2", relu=True)
    y = b.conv(y, f"{path}/conv2", (s3, s3), _pad(3))
    y = act(y, "act2", "conv3", relu=True)
    y = b.conv(y, f"{path}/conv3", (1, 1), _pad(1))
  else:
    y = b.conv(a, f"{path}/conv1", (strides, strides), _pad(3))
    y = act(y, "act1", "conv2", relu=True)
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


# ----------------------------------------------------------------------------- int32 bounds


def requantize_range(op: Op) -> tuple:
  """[lo, hi] of a requantize op's output as its attributes record it (``bits``, ``signed``,
  ``saturate``, ``relu``; a missing ``relu`` is False). The interpreter, the TVM lowering and
  the ONNX export all clamp to this."""
  a = op.attrs
  return clip_range(a["bits"], a["signed"], a["saturate"], bool(a.get("relu", False)))


def projection_range(op: Op) -> tuple:
  """[lo, hi] of a grassmann_head's projections: [−proj_max, proj_max], or for programs saved
  before ``proj_max`` the signed ``proj_bits`` range they were built with."""
  a = op.attrs
  if "proj_max" in a:
    return -int(a["proj_max"]), int(a["proj_max"])
  return clip_range(a["proj_bits"], True)


def _unpacked_weight(op: Op) -> np.ndarray:
  """The op's integer weights as int64 (int4 unpacked on the host, as `intops.unpack_int4`)."""
  w = np.asarray(op.arrays["weight"]).astype(np.int64)
  if op.attrs["w_bits"] <= 4:
    low, high = ((w & 15) ^ 8) - 8, w >> 4
    w = np.stack([low, high], axis=-1).reshape(*w.shape[:-1], -1)[..., :op.attrs["cout"]]
  return w


def _matvec(x, m):
  """Exact x @ m for integer vectors x (K,) and matrices m (K, N): int64 where it cannot
  overflow, python ints otherwise."""
  x, m = np.asarray(x), np.asarray(m, np.int64)
  big = int(np.abs(m).sum(axis=0).max(initial=0)) * int(np.abs(x).max(initial=0))
  if big < 2**62:
    return x.astype(np.int64) @ m
  return np.asarray(x, object) @ m.astype(object)


def _fits(v) -> bool:
  v = np.asarray(v)
  return v.size == 0 or (int(v.min()) >= _INT32_MIN and int(v.max()) <= _INT32_MAX)


def _rq(v, m, c):
  """(v·m + 2^(c−1)) >> c elementwise, exact in int64 (|v|, |m| ≤ 2^31, c ≤ 62)."""
  v, m, c = (np.asarray(t, np.int64) for t in (v, m, c))
  return (v * m + (np.int64(1) << (c - 1))) >> c


def _op_bounds(op: Op, ins, in_hw):
  """Per-channel (lo, hi) int64 bounds of `op`'s output from its inputs' (`value_bounds`);
  raises ValueError naming the op when an int32 bound cannot be proved."""
  a = op.attrs

  def fail(what):
    raise ValueError(f"{op.name} ({op.kind}): {what}; the integer program cannot guarantee "
                     "its int32 arithmetic, so it is refused")

  if op.kind in ("conv", "dense", "grassmann_head"):
    x_lo, x_hi = ins[0]
    q_lo, q_hi = clip_range(a["in_bits"], a["in_signed"])
    if int(x_lo.min()) < q_lo or int(x_hi.max()) > q_hi:
      fail(f"its input lies in [{int(x_lo.min())}, {int(x_hi.max())}], outside its declared "
           f"{'signed' if a['in_signed'] else 'unsigned'} {a['in_bits']}-bit range "
           f"[{q_lo}, {q_hi}] (it would wrap when narrowed)")
    w = _unpacked_weight(op)
    w2 = w.reshape(-1, w.shape[-1])  # rows ordered (kh, kw, cin) or (n,)
    cin = w.shape[-2]
    reps = w2.shape[0] // cin
    if len(x_lo) not in (1, cin):
      fail(f"its input has {len(x_lo)} channels, its weights {cin}")
    x_lo, x_hi = (np.broadcast_to(t, (cin,)) for t in (x_lo, x_hi))
    if op.kind == "conv":  # zero padding can enter any window
      x_lo, x_hi = np.minimum(x_lo, 0), np.maximum(x_hi, 0)
    bias = (np.asarray(op.arrays["bias"], np.int64) if "bias" in op.arrays
            else np.zeros(w2.shape[1], np.int64))
    amax = 255 if a["in_bits"] <= 8 else int(max(-int(x_lo.min()), int(x_hi.max())))
    formed = (amax * np.abs(w2).sum(axis=0) + 128 * np.abs(w2.sum(axis=0)) * (amax == 255)
              + np.abs(bias))
    if int(formed.max(initial=0)) > _INT32_MAX:
      c = int(np.argmax(formed))
      fail(f"the accumulator of output channel {c} can reach {int(formed[c])} in its partial "
           f"sums (Σ|w| = {int(np.abs(w2[:, c]).sum())} over fan-in {w2.shape[0]}, inputs up "
           f"to {amax}, |bias| {abs(int(bias[c]))}) and overflows int32")
    pos, neg = np.maximum(w2, 0), np.minimum(w2, 0)
    xl, xh = np.tile(x_lo, reps), np.tile(x_hi, reps)
    acc_hi = _matvec(xh, pos) + _matvec(xl, neg) + bias
    acc_lo = _matvec(xl, pos) + _matvec(xh, neg) + bias
    if op.kind != "grassmann_head":
      out = (acc_lo, acc_hi)
    else:
      p_lo, p_hi = projection_range(op)
      m, c = np.asarray(op.arrays["multiplier"]), np.asarray(op.arrays["shift"])
      if c.size and (int(c.min()) < MIN_SHIFT or int(c.max()) > MAX_SHIFT):
        fail(f"shifts outside [{MIN_SHIFT}, {MAX_SHIFT}]")
      r1, r2 = _rq(acc_lo, m, c), _rq(acc_hi, m, c)
      pl = np.clip(np.minimum(r1, r2), p_lo, p_hi)
      ph = np.clip(np.maximum(r1, r2), p_lo, p_hi)
      k, n_cls = int(a["subspace_dim"]), int(a["num_classes"])
      sq = np.maximum(pl * pl, ph * ph).reshape(n_cls, k).sum(axis=1)
      if int(sq.max()) > _INT32_MAX:
        fail(f"Σp² of {k} projections can reach {int(sq.max())} and overflows int32")
      xsq = sum(max(lv * lv, hv * hv) for lv, hv in zip(x_lo.tolist(), x_hi.tolist()))
      if xsq > _INT32_MAX:
        fail(f"the feature norm² Σx² can reach {xsq} and overflows int32")
      norm = np.asarray([math.isqrt(int(v)) for v in sq], np.int64)
      big_m = int(a["norm_multiplier"])
      top = norm * abs(big_m)
      if int(top.max()) > _INT32_MAX:
        fail(f"‖p‖·M can reach {int(top.max())} (‖p‖ ≤ {int(norm.max())}, M = {big_m}) and "
             "overflows int32")
      out = (np.minimum(norm * big_m, 0), np.maximum(norm * big_m, 0))
  elif op.kind == "requantize":
    x_lo, x_hi = ins[0]
    m, c = np.asarray(op.arrays["multiplier"]), np.asarray(op.arrays["shift"])
    if c.size and (int(c.min()) < MIN_SHIFT or int(c.max()) > MAX_SHIFT):
      fail(f"shifts outside [{MIN_SHIFT}, {MAX_SHIFT}]")
    r1, r2 = _rq(x_lo, m, c), _rq(x_hi, m, c)
    q_lo, q_hi = requantize_range(op)
    if (q_lo, q_hi) == (_INT32_MIN, _INT32_MAX) and not _fits([r1, r2]):
      fail(f"the requantized values can reach [{int(np.minimum(r1, r2).min())}, "
           f"{int(np.maximum(r1, r2).max())}], beyond int32, where nothing saturates them "
           "(they would be clamped silently)")
    out = (np.clip(np.minimum(r1, r2), q_lo, q_hi), np.clip(np.maximum(r1, r2), q_lo, q_hi))
  elif op.kind == "add":
    (a_lo, a_hi), (b_lo, b_hi) = ins
    s_lo, s_hi = a_lo + b_lo, a_hi + b_hi
    if not _fits([s_lo, s_hi]):
      fail(f"the sum of its two branches can reach [{int(s_lo.min())}, {int(s_hi.max())}] "
           f"(branches within [{int(a_lo.min())}, {int(a_hi.max())}] and "
           f"[{int(b_lo.min())}, {int(b_hi.max())}]) and overflows int32")
    out = (np.clip(s_lo, a["lo"], a["hi"]), np.clip(s_hi, a["lo"], a["hi"]))
  elif op.kind == "max_pool":
    return ins[0]
  elif op.kind in ("avg_pool", "global_avg_pool"):
    x_lo, x_hi = ins[0]
    if op.kind == "avg_pool":
      count = int(np.prod(a["window"]))
      padded = any(p for pair in a.get("padding", ((0, 0), (0, 0))) for p in pair)
    else:
      count, padded = int(np.prod(in_hw)), False
    if padded:  # zeros enter the window sums (and, counted, the averages)
      x_lo, x_hi = np.minimum(x_lo, 0), np.maximum(x_hi, 0)
    total = count * np.maximum(-x_lo, x_hi)
    if int(total.max()) > _INT32_MAX:
      fail(f"its window sum of {count} values up to {int(np.maximum(-x_lo, x_hi).max())} "
           f"can reach {int(total.max())} and overflows int32")
    out = (x_lo, x_hi)
  elif op.kind == "concat":
    out = (np.concatenate([t[0] for t in ins]), np.concatenate([t[1] for t in ins]))
  else:
    raise ValueError(f"{op.name}: unknown op kind {op.kind!r}")
  return out


def value_bounds(program: IntegerProgram) -> dict:
  """Proves every int32 bound the back ends rely on, by interval analysis over the program.

  From the input's range and the program's own integers (weights, biases, multipliers,
  shifts, clamps) each tensor gets per-channel bounds [lo, hi] that hold for every int8 input,
  and every value the interpreter (`run`) and the TVM lowering form in int32 is checked
  against [−2^31, 2^31 − 1] (the module docstring lists the checks).

  Args:
    program: an `IntegerProgram`.

  Returns:
    {tensor: (lo, hi)}: tuples of python ints, one per channel (the last axis).

  Raises:
    ValueError: naming the op whose bound cannot be proved, and what could overflow.
  """
  ops = program.ops
  if not ops or ops[0].kind != "quantize_input":
    raise ValueError("the program must start with its quantize_input op")
  first = ops[0]
  lo, hi = clip_range(first.attrs["bits"], first.attrs["signed"])
  c_in = int(program.input_shape[-1])
  bounds = {first.output: (np.full(c_in, lo, np.int64), np.full(c_in, hi, np.int64))}
  hw = {first.output: tuple(program.input_shape[:2])}

  for op in ops[1:]:
    try:
      ins = [bounds[t] for t in op.inputs]
    except KeyError as e:
      raise ValueError(f"{op.name} ({op.kind}): reads tensor {e.args[0]!r}, which no earlier op "
                       "writes") from None
    try:
      out = _op_bounds(op, ins, hw[op.inputs[0]] if op.inputs else None)
    except (KeyError, TypeError, IndexError) as e:
      raise ValueError(f"{op.name} ({op.kind}): malformed op, missing or bad attribute or "
                       f"array ({type(e).__name__}: {e})") from None
    bounds[op.output] = tuple(np.asarray(t, np.int64) for t in out)
    hw[op.output] = _out_hw(op, hw[op.inputs[0]] if op.inputs else None)
  return {t: (tuple(int(v) for v in lo), tuple(int(v) for v in hi))
          for t, (lo, hi) in bounds.items()}


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
    p = jnp.clip(p, *projection_range(op))  # the symmetric ±proj_max
    p = p.reshape(*p.shape[:-1], a["num_classes"], a["subspace_dim"])
    norm = intops.isqrt(jnp.sum(p * p, axis=-1))
    xnorm = jnp.maximum(intops.isqrt(jnp.sum(x * x, axis=-1, keepdims=True)), 1)
    return (norm * a["norm_multiplier"]) // xnorm
  if op.kind == "requantize":
    return requantize(env[op.inputs[0]], arrays["multiplier"], arrays["shift"], a["bits"],
                      a["signed"], a["saturate"], relu=bool(a.get("relu", False)))
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


_INTERPRETERS: dict = {}  # structure key -> jitted fn, most recently used last
_INTERPRETERS_KEPT = 16


def _structure_key(program: IntegerProgram, all_outputs: bool) -> str:
  """Everything the interpreter's trace depends on: ops, attributes and array names, not the
  array values (those are arguments). Programs with equal keys share one jitted function."""
  return json.dumps([list(program.input_shape), program.output, bool(all_outputs),
                     [_op_json(op) for op in program.ops]], sort_keys=True, default=repr)


def interpreter(program: IntegerProgram, all_outputs: bool = False):
  """A jitted ``fn(arrays, x_int8) -> int32 logits`` for this program's structure.

  With ``all_outputs`` it returns {op name: output} for every op (layer-by-layer comparisons).
  Programs of the same structure (a program and its saved-and-loaded copy, or QAT checkpoints
  of one model converted again) get the same function, so XLA compiles each input shape once
  per structure; the last 16 structures are kept.
  """
  key = _structure_key(program, all_outputs)
  fn = _INTERPRETERS.pop(key, None)
  if fn is None:
    fn = _build_interpreter(program, all_outputs)
    while len(_INTERPRETERS) >= _INTERPRETERS_KEPT:
      _INTERPRETERS.pop(next(iter(_INTERPRETERS)))
  _INTERPRETERS[key] = fn
  return fn


def _build_interpreter(program: IntegerProgram, all_outputs: bool):
  # the closure keeps the structure only, not the first program's weights
  ops = tuple(dataclasses.replace(op, arrays={}) for op in program.ops)
  program = dataclasses.replace(program, ops=ops)

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
  """Writes the program to directory `path`: ``arrays/`` (orbax), then ``program.json``.

  Local directories are assembled under a temporary name and renamed into place
  (`grassq.files.atomic_dir`), so a reader never sees half a program. A remote directory
  (``gs://...``) is written in place, ``program.json`` last: `load` refuses a directory
  without it.
  """
  import orbax.checkpoint as ocp

  meta = dict(version=PROGRAM_VERSION, input_shape=list(program.input_shape),
              output=program.output, output_scale=program.output_scale,
              num_classes=program.num_classes, ops=[_op_json(op) for op in program.ops])
  text = json.dumps(meta)
  with files.atomic_dir(path, overwrite=overwrite) as tmp:
    if files.is_remote(tmp) and files.exists(files.join(tmp, "program.json")):
      from etils import epath  # overwritten in place: no stale description over new arrays

      epath.Path(files.join(tmp, "program.json")).unlink()
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(files.join(tmp, "arrays"), program_arrays(program), force=True)
      ckptr.wait_until_finished()
    files.atomic_write(files.join(tmp, "program.json"), text + "\n")


_REMEDY = "save the program again (grassq.quant.program.save, from to_program)"


def load(path: str) -> IntegerProgram:
  """Reads a program written by `save` and checks it (`value_bounds`).

  Raises:
    FileNotFoundError: no ``program.json`` at `path`.
    grassq.files.CorruptFileError: a truncated or damaged ``program.json``, arrays that cannot
      be read, or an op whose listed array is missing (the message names the op and array).
    ValueError: another program version, or an int32 bound `value_bounds` cannot prove.
  """
  import orbax.checkpoint as ocp

  path = files.abspath(path)
  meta_path = files.join(path, "program.json")
  if not files.exists(meta_path):
    raise FileNotFoundError(f"no integer program at {path} (missing program.json)")
  meta = files.read_json(meta_path, "integer program description", _REMEDY)
  if not isinstance(meta, dict):
    raise files.CorruptFileError(f"integer program description {meta_path} is not a JSON "
                                 f"object: {_REMEDY}")
  if meta.get("version") != PROGRAM_VERSION:
    raise ValueError(f"{path}: program version {meta.get('version')} is not {PROGRAM_VERSION}")
  arrays_path = files.join(path, "arrays")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      tree = ckptr.restore(arrays_path)
  except Exception as e:  # noqa: BLE001 (orbax raises many kinds; all mean the same here)
    raise files.CorruptFileError(f"integer program {path}: its arrays ({arrays_path}) cannot be "
                                 f"read ({type(e).__name__}: {e}): {_REMEDY}") from e

  def tup(v):
    return tuple(tup(x) for x in v) if isinstance(v, list) else v

  ops = []
  try:
    for i, o in enumerate(meta["ops"]):
      saved = tree.get(str(i), {}) if isinstance(tree, Mapping) else {}
      missing = [n for n in o["arrays"] if n not in saved]
      if missing:
        raise files.CorruptFileError(
            f"integer program {path}: op {i} {o['name']!r} ({o['kind']}) lists array(s) "
            f"{', '.join(map(repr, missing))}, which {'is' if len(missing) == 1 else 'are'} not "
            f"among the saved arrays ({arrays_path}, op {i}: {sorted(saved) or 'none'}): "
            f"{_REMEDY}")
      arrays = {n: np.asarray(saved[n]) for n in o["arrays"]}
      ops.append(Op(o["kind"], o["name"], tuple(o["inputs"]), o["output"],
                    {k: tup(v) for k, v in o["attrs"].items()}, arrays))
    program = IntegerProgram(tuple(ops), tuple(meta["input_shape"]), meta["output"],
                             float(meta["output_scale"]), int(meta["num_classes"]))
  except (KeyError, TypeError, AttributeError) as e:
    raise files.CorruptFileError(f"integer program description {meta_path} is malformed "
                                 f"({type(e).__name__}: {e}): {_REMEDY}") from None
  try:
    value_bounds(program)
  except ValueError as e:
    raise ValueError(f"integer program {path}: {e}") from None
  return program
