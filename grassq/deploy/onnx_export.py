"""ONNX export of an integer program: the same quantized network for onnxruntime (a CPU int8 peer).

`to_onnx(program)` writes the program as a standard quantized ONNX graph (default domain, opset
21) that onnxruntime's CPU kernels run in int8: ``QLinearConv`` where a convolution's only reader
is a saturating ≤8-bit requantization (the common conv → ReLU → 8-bit case), ``ConvInteger``
(uint8 weights w + 128 with zero point 128: onnxruntime's fast path) / ``MatMulInteger`` (exact
int32 accumulators) followed by ``DequantizeLinear`` otherwise, and
``QuantizeLinear`` / ``DequantizeLinear`` for requantizations between quantized tensors. The
16-bit residual joins of HAWQV3 have no int8 ONNX op; they stay float32 (values in LSBs of the
join's scale: exact integers up to 2^24), added and clamped once, as in the program.

Scales: every tensor is expressed in LSBs of its own scale, so an ONNX scale is 1 except where a
requantization's ratio m·2^−c (the program's multiplier and shift, per channel) goes: the
``w_scale`` of a ``QLinearConv`` or the scale of a ``DequantizeLinear`` / ``QuantizeLinear``.
onnxruntime multiplies in float32 and rounds half to even where the program multiplies exactly
and rounds half up, so the two are close (a few LSBs), not bit-exact: use this as a speed and
accuracy peer, never for the exactness checks (those are TVM's).

Clamps are the program's own (`grassq.quant.program.requantize_range`: a requantization that
records ``relu`` clamps at 0, also when signed; the Grassmann head's projections are clamped to
±``proj_max`` by `projection_range`), read, never re-inferred.

The graph takes the program's int8 input, NHWC ``x: int8 (B, H, W, C)`` (`program.quantize_input`
of the images), transposes it to NCHW, and returns ``logits: int32 (B, num_classes)`` at
``program.output_scale``, as `grassq.quant.program.run`. Unsigned tensors are uint8, signed ones
int8; a ``QLinearConv`` keeps its input's type and shifts the zero point by 128 when its output's
signedness differs (the signed int8 image into the unsigned stem output).

`to_float_onnx(program)` is the float32 network with the same structure (convolutions with BN
folded, ReLUs, residual adds, pool, classifier): the program's integer weights times their
ratios, no rounding and no saturation except the ReLUs. It takes normalized float images NHWC and
returns float logits in the program's output LSBs; it is what TVM's ONNX frontend lowers for the
float32 rows of the deployment benchmark.

Needs the ``onnx`` extra (``pip install grassq[onnx]``: onnx and onnxruntime), imported only when
a function is called.
"""

from __future__ import annotations

import numpy as np

from grassq.quant.program import projection_range, requantize_range

ONNX_OPSET = 21
IR_VERSION = 10  # opset 21's; newer onnx packages write IRs that older onnxruntimes refuse
INPUT_NAME, OUTPUT_NAME = "x", "logits"
_INSTALL = "pip install grassq[onnx]"


def require_onnx():
  """Imports ``onnx``, or raises an ImportError naming the extra."""
  try:
    import onnx
  except ImportError as e:
    raise ImportError(f"ONNX export needs the onnx package: {_INSTALL} "
                      "(onnx and onnxruntime)") from e
  return onnx


def require_onnxruntime():
  """Imports ``onnxruntime``, or raises an ImportError naming the extra."""
  try:
    import onnxruntime
  except ImportError as e:
    raise ImportError(f"running ONNX models needs onnxruntime: {_INSTALL}") from e
  return onnxruntime


# ----------------------------------------------------------------------------- graph building


class _Graph:
  """Nodes and initializers of one ONNX graph, with unique names."""

  def __init__(self):
    self.nodes, self.inits, self.count = [], {}, 0

  def name(self, hint):
    self.count += 1
    return f"{hint.replace('/', '.')}_{self.count}"

  def const(self, value, dtype, hint="c"):
    name = self.name(hint)
    self.inits[name] = np.asarray(value, dtype)
    return name

  def node(self, op, inputs, hint=None, domain=None, output=None, **attrs):
    onnx = require_onnx()
    out = output or self.name(hint or op)
    self.nodes.append(onnx.helper.make_node(op, list(inputs), [out], domain=domain, **attrs))
    return out

  def model(self, input_type, input_shape, output_type, output_shape, opset=ONNX_OPSET,
            doc=""):
    onnx = require_onnx()
    h = onnx.helper
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in self.inits.items()]
    graph = h.make_graph(self.nodes, "grassq_program",
                         [h.make_tensor_value_info(INPUT_NAME, input_type, input_shape)],
                         [h.make_tensor_value_info(OUTPUT_NAME, output_type, output_shape)],
                         inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)],
                         producer_name="grassq", doc_string=doc, ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    return model


def _ratio(op) -> np.ndarray:
  """A requantize op's m·2^−c (float64, its multiplier's shape: () or (C,))."""
  m = np.asarray(op.arrays["multiplier"], np.float64)
  c = np.asarray(op.arrays["shift"], np.float64)
  return m * np.exp2(-c)


def _channel_shape(rank):
  return (1, -1, 1, 1) if rank == 4 else (1, -1)


def _weights(op) -> np.ndarray:
  """The op's integer weights as int8 (int4 unpacked), HWIO / (n, cout)."""
  w = np.asarray(op.arrays["weight"])
  if op.attrs["w_bits"] <= 4:
    from grassq.quant import intops
    w = np.asarray(intops.unpack_int4(w, op.attrs["cout"]))
  return w.astype(np.int8)


def _conv_attrs(op):
  (pt, pb), (pl, pr) = op.attrs["padding"]
  return dict(pads=[int(pt), int(pl), int(pb), int(pr)], strides=[int(s) for s in
                                                                   op.attrs["strides"]])


def _shape_of(program, batch_size):
  b = "batch" if batch_size is None else int(batch_size)
  return [b, *map(int, program.input_shape)]


def _pool_attrs(op):
  (pt, pb), (pl, pr) = op.attrs.get("padding", ((0, 0), (0, 0)))
  return dict(kernel_shape=[int(k) for k in op.attrs["window"]],
              strides=[int(k) for k in op.attrs["strides"]],
              pads=[int(pt), int(pl), int(pb), int(pr)])


def _readers(program):
  readers = {}
  for op in program.ops:
    for t in op.inputs:
      readers.setdefault(t, []).append(op)
  return readers


# ----------------------------------------------------------------------------- int8 graph


class _Q:
  """A quantized tensor: uint8/int8 `name`, value = stored − zp."""

  def __init__(self, name, dtype, zp, rank):
    self.name, self.dtype, self.zp, self.rank = name, np.dtype(dtype), int(zp), rank


class _Acc:
  """An int32 accumulator `name` (no bias yet): value = name + bias (per channel)."""

  def __init__(self, name, bias, rank):
    self.name, self.bias, self.rank = name, bias, rank


class _F:
  """A float32 tensor in LSBs of its scale: value = name + offset (per channel, or None)."""

  def __init__(self, name, offset, rank):
    self.name, self.offset, self.rank = name, offset, rank


def _natural(signed):
  return (np.dtype(np.int8), 0) if signed else (np.dtype(np.uint8), 0)


def _zp_in(dtype, signed):
  """Zero point that stores (bits, signed) values in `dtype` (8-bit ranges shift by 128)."""
  if dtype == np.uint8:
    return 128 if signed else 0
  return 0 if signed else -128


class _IntLowering:

  def __init__(self, program):
    self.p, self.g = program, _Graph()
    self.readers = _readers(program)
    self.one = self.g.const(1.0, np.float32, "one")

  # -- helpers
  def zp_const(self, dtype, zp, n=None):
    return self.g.const(np.full(n, zp) if n else zp, dtype, "zp")

  def scale_const(self, scale, hint="scale"):
    s = np.asarray(scale, np.float64)
    return self.g.const(s if s.ndim else float(s), np.float32, hint), s.ndim > 0

  def clip_q(self, name, dtype, zp, bits, signed, relu=False):
    lo, hi = (-(2**(bits - 1)), 2**(bits - 1) - 1) if signed else (0, 2**bits - 1)
    lo = max(lo, 0) if relu else lo
    info = np.iinfo(dtype)
    lo, hi = max(lo + zp, info.min), min(hi + zp, info.max)
    if (lo, hi) == (info.min, info.max):
      return name
    return self.g.node("Clip", [name, self.g.const(lo, dtype), self.g.const(hi, dtype)],
                       "clip")

  def offset_const(self, offset, rank):
    return self.g.const(np.asarray(offset, np.float32).reshape(_channel_shape(rank)),
                        np.float32, "offset")

  def to_float(self, t, keep_offset=False) -> _F:
    """Any tensor as float32 LSBs; its offset added unless `keep_offset`."""
    if isinstance(t, _Q):
      f = _F(self.g.node("DequantizeLinear", [t.name, self.one, self.zp_const(t.dtype, t.zp)],
                         "dq"), None, t.rank)
    elif isinstance(t, _Acc):
      f = _F(self.g.node("DequantizeLinear", [t.name, self.one], "dq"),
             None if t.bias is None else np.asarray(t.bias, np.float64), t.rank)
    else:
      f = t
    if keep_offset or f.offset is None:
      return f
    return _F(self.g.node("Add", [f.name, self.offset_const(f.offset, f.rank)], "bias"), None,
              f.rank)

  def to_q(self, t, dtype, zp, bits, signed, relu=False) -> _Q:
    if isinstance(t, _Q) and t.dtype == dtype and t.zp == zp and not relu:
      return t
    f = self.to_float(t)
    q = self.g.node("QuantizeLinear", [f.name, self.one, self.zp_const(dtype, zp)], "q")
    return _Q(self.clip_q(q, dtype, zp, bits, signed, relu), dtype, zp, t.rank)

  # -- ops
  def lower(self):
    ops = self.p.ops
    if ops[0].kind != "quantize_input":
      raise ValueError("the program must start with quantize_input")
    env = {ops[0].output: _Q(self.g.node("Transpose", [INPUT_NAME], "nchw", perm=[0, 3, 1, 2]),
                             np.int8, 0, 4)}
    for op in ops[1:]:
      if op.output in env:  # written by a fused conv
        continue
      fn = getattr(self, "op_" + op.kind, None)
      if fn is None:
        raise NotImplementedError(f"ONNX export: op kind {op.kind!r} ({op.name}) is not supported")
      fn(op, env)
    out = self.to_float(env[self.p.output])
    out = self.g.node("Round", [out.name], "round")
    return self.g.node("Cast", [out], output=OUTPUT_NAME, to=require_onnx().TensorProto.INT32)

  def quantized_input(self, op, env):
    if op.attrs["in_bits"] > 8:
      raise NotImplementedError(f"ONNX export: {op.name} reads {op.attrs['in_bits']}-bit "
                                "activations; ONNX's integer convolutions take 8 bits at most")
    x = env[op.inputs[0]]
    if not isinstance(x, _Q):
      x = self.to_q(x, *_natural(op.attrs["in_signed"]), op.attrs["in_bits"],
                    op.attrs["in_signed"])
    return x

  def op_conv(self, op, env):
    x = self.quantized_input(op, env)
    attrs = _conv_attrs(op)
    readers = self.readers.get(op.output, [])
    rq = readers[0] if len(readers) == 1 else None
    if (rq is not None and rq.kind == "requantize" and rq.attrs["saturate"]
        and rq.attrs["bits"] <= 8 and op.output != self.p.output):
      cout, bits, signed = op.attrs["cout"], rq.attrs["bits"], rq.attrs["signed"]
      zp = _zp_in(x.dtype, signed)
      ratio = np.broadcast_to(_ratio(rq), (cout,))
      w = self.g.const(_weights(op).transpose(3, 2, 0, 1), np.int8, op.name + "/w")
      y = self.g.node("QLinearConv", [
          x.name, self.one, self.zp_const(x.dtype, x.zp), w,
          self.g.const(ratio, np.float32, rq.name + "/ratio"),
          self.g.const(np.zeros(cout), np.int8, "wzp"), self.one, self.zp_const(x.dtype, zp),
          self.g.const(op.arrays["bias"], np.int32, op.name + "/b")], op.name, **attrs)
      relu = requantize_range(rq)[0] >= 0 and signed  # the ReLU of a signed quantizer
      env[rq.output] = _Q(self.clip_q(y, x.dtype, zp, bits, signed, relu), x.dtype, zp, 4)
      return
    # onnxruntime's ConvInteger is ~6x faster with uint8 weights (w + 128, zero point 128; still
    # exact) than with int8 ones (measured with onnxruntime 1.30)
    wu = self.g.const((_weights(op).astype(np.int16) + 128).transpose(3, 2, 0, 1), np.uint8,
                      op.name + "/w_u8")
    acc = self.g.node("ConvInteger", [x.name, wu, self.zp_const(x.dtype, x.zp),
                                      self.zp_const(np.uint8, 128)], op.name, **attrs)
    env[op.output] = _Acc(acc, np.asarray(op.arrays["bias"]), 4)

  def op_dense(self, op, env):
    x = self.quantized_input(op, env)
    w = self.g.const(_weights(op), np.int8, op.name + "/w")
    acc = self.g.node("MatMulInteger", [x.name, w, self.zp_const(x.dtype, x.zp)], op.name)
    env[op.output] = _Acc(acc, np.asarray(op.arrays["bias"]), 2)

  def op_requantize(self, op, env):
    x, r = env[op.inputs[0]], _ratio(op)
    bits, signed, saturate = op.attrs["bits"], op.attrs["signed"], op.attrs["saturate"]
    lo, hi = requantize_range(op)  # the clamp the program records (``relu`` included)
    relu = lo >= 0 and signed
    if isinstance(x, _Q):
      scale, per_axis = self.scale_const(r)
      n = r.size if per_axis else None
      zp = self.zp_const(x.dtype, x.zp, n)
      f = _F(self.g.node("DequantizeLinear", [x.name, scale, zp], op.name,
                         **(dict(axis=1) if per_axis else {})), None, x.rank)
    elif isinstance(x, _Acc):
      scale, per_axis = self.scale_const(r)
      f = _F(self.g.node("DequantizeLinear", [x.name, scale], op.name,
                         **(dict(axis=1) if per_axis else {})),
             None if x.bias is None else x.bias * r, x.rank)
    elif saturate and bits <= 8 and x.offset is None:  # one QuantizeLinear at scale 1/r
      dtype, zp = _natural(signed)
      scale, per_axis = self.scale_const(1.0 / r)
      q = self.g.node("QuantizeLinear", [x.name, scale, self.zp_const(
          dtype, zp, r.size if per_axis else None)], op.name, **(dict(axis=1) if per_axis else {}))
      env[op.output] = _Q(self.clip_q(q, dtype, zp, bits, signed, relu), dtype, zp, x.rank)
      return
    else:
      name = x.name
      if not np.all(r == 1.0):
        name = self.g.node("Mul", [name, self.g.const(
            np.asarray(r, np.float32).reshape(_channel_shape(x.rank) if r.ndim else ()),
            np.float32, "ratio")], op.name)
      f = _F(name, None if x.offset is None else x.offset * r, x.rank)
    if not saturate and lo < 0:
      env[op.output] = f
    elif saturate and bits <= 8:
      dtype, zp = _natural(signed)
      env[op.output] = self.to_q(f, dtype, zp, bits, signed, relu)
    else:
      f = self.to_float(f)
      if bits < 32 or lo >= 0:
        f = _F(self.g.node("Clip", [f.name, self.g.const(lo, np.float32),
                                    self.g.const(hi, np.float32)], "clip"), None, f.rank)
      env[op.output] = f

  def op_add(self, op, env):
    a = self.to_float(env[op.inputs[0]], keep_offset=True)
    b = self.to_float(env[op.inputs[1]], keep_offset=True)
    s = self.g.node("Add", [a.name, b.name], op.name)
    offsets = [o for o in (a.offset, b.offset) if o is not None]
    if offsets:
      s = self.g.node("Add", [s, self.offset_const(sum(offsets), a.rank)], "bias")
    s = self.g.node("Clip", [s, self.g.const(op.attrs["lo"], np.float32),
                             self.g.const(op.attrs["hi"], np.float32)], "clip")
    env[op.output] = _F(s, None, a.rank)

  def op_global_avg_pool(self, op, env):
    f = self.to_float(env[op.inputs[0]])
    y = self.g.node("GlobalAveragePool", [f.name], op.name)
    y = self.g.node("Floor", [y], "floor")
    env[op.output] = _F(self.g.node("Flatten", [y], "flatten", axis=1), None, 2)

  def op_max_pool(self, op, env):
    x = env[op.inputs[0]]
    if isinstance(x, _Q):
      env[op.output] = _Q(self.g.node("MaxPool", [x.name], op.name, **_pool_attrs(op)),
                          x.dtype, x.zp, 4)
      return
    f = self.to_float(x)
    env[op.output] = _F(self.g.node("MaxPool", [f.name], op.name, **_pool_attrs(op)),
                        None, 4)

  def op_avg_pool(self, op, env):
    x = env[op.inputs[0]]
    f = self.to_float(x)
    y = self.g.node("AveragePool", [f.name], op.name, **_pool_attrs(op),
                    count_include_pad=int(bool(op.attrs.get("count_include_pad", False))))
    y = _F(self.g.node("Floor", [y], "floor"), None, 4)
    if isinstance(x, _Q):
      q = self.g.node("QuantizeLinear", [y.name, self.one, self.zp_const(x.dtype, x.zp)], "q")
      y = _Q(q, x.dtype, x.zp, 4)
    env[op.output] = y

  def op_concat(self, op, env):
    bits, signed = op.attrs["bits"], op.attrs["signed"]
    parts = [env[t] for t in op.inputs]
    first = parts[0]
    if isinstance(first, _Q) and all(isinstance(t, _Q) and t.dtype == first.dtype
                                     and t.zp == first.zp for t in parts):
      dtype, zp = first.dtype, first.zp
    else:
      dtype, zp = _natural(signed)
      parts = [self.to_q(t, dtype, zp, bits, signed) for t in parts]
    env[op.output] = _Q(self.g.node("Concat", [t.name for t in parts], op.name, axis=1),
                        dtype, zp, 4)

  def op_grassmann_head(self, op, env):
    onnx = require_onnx()
    a = op.attrs
    x = self.quantized_input(op, env)
    w = self.g.const(_weights(op), np.int8, op.name + "/w")
    acc = self.g.node("MatMulInteger", [x.name, w, self.zp_const(x.dtype, x.zp)], op.name)
    scale, per_axis = self.scale_const(_ratio(op))
    p = self.g.node("DequantizeLinear", [acc, scale], "proj",
                    **(dict(axis=1) if per_axis else {}))
    p_lo, p_hi = projection_range(op)  # ±proj_max
    p = self.g.node("Clip", [self.g.node("Round", [p]), self.g.const(p_lo, np.float32),
                             self.g.const(p_hi, np.float32)], "clip")
    p = self.g.node("Reshape", [p, self.g.const([0, a["num_classes"], a["subspace_dim"]],
                                                np.int64, "shape")], "per_class")
    double = onnx.TensorProto.DOUBLE

    def isqrt(t, axis, keepdims):
      t = self.g.node("Cast", [t], "f64", to=double)
      s = self.g.node("ReduceSumSquare", [t, self.g.const([axis], np.int64, "axes")],
                      keepdims=keepdims)
      return self.g.node("Floor", [self.g.node("Sqrt", [s])], "isqrt")

    norm = isqrt(p, -1, 0)
    xf = self.to_float(x).name
    xnorm = self.g.node("Max", [isqrt(xf, 1, 1), self.g.const(1.0, np.float64)], "xnorm")
    num = self.g.node("Mul", [norm, self.g.const(float(a["norm_multiplier"]), np.float64)])
    y = self.g.node("Floor", [self.g.node("Div", [num, xnorm])], "logits")
    env[op.output] = _F(self.g.node("Cast", [y], "f32", to=onnx.TensorProto.FLOAT), None, 2)


def to_onnx(program, batch_size: int | None = None):
  """The program as a quantized ONNX model for onnxruntime (module docstring).

  Args:
    program: a `grassq.quant.program.IntegerProgram`.
    batch_size: a fixed batch, or None for a symbolic one.

  Returns:
    an ``onnx.ModelProto``: ``x: int8 (B, H, W, C)`` → ``logits: int32 (B, num_classes)``.

  Raises:
    ImportError: without onnx. NotImplementedError: an op kind it cannot express.
  """
  onnx = require_onnx()
  lowering = _IntLowering(program)
  lowering.lower()
  shape = _shape_of(program, batch_size)
  return lowering.g.model(onnx.TensorProto.INT8, shape, onnx.TensorProto.INT32,
                          [shape[0], program.num_classes],
                          doc="grassq integer program (int8, onnxruntime peer; not bit-exact)")


# ----------------------------------------------------------------------------- float graph


class _FF:
  """A float tensor: value (in LSBs of the program's tensor) = name · gain (per channel).

  `conv` names the (weight, bias) initializers of the convolution that wrote it, while that
  convolution's output has no other reader: its gain can still be changed by rescaling them.
  """

  def __init__(self, name, gain, rank, conv=None, nonneg=False):
    self.name, self.gain, self.rank = name, np.asarray(gain, np.float64), rank
    self.conv, self.nonneg = conv, nonneg


class _FloatLowering:

  def __init__(self, program):
    self.p, self.g = program, _Graph()
    self.readers = _readers(program)

  def gain_const(self, gain, rank):
    gain = np.asarray(gain, np.float32)
    return self.g.const(gain.reshape(_channel_shape(rank)) if gain.ndim else gain, np.float32,
                        "gain")

  def materialize(self, t, gain=1.0):
    """`t` at `gain` (a Mul, or a rescaled convolution when it owns one)."""
    gain = np.asarray(gain, np.float64)
    factor = t.gain / gain
    if np.allclose(factor, 1.0, rtol=0, atol=0):
      return t
    if t.conv is not None:
      w, b = t.conv  # OIHW weights, (O,) bias: scaled per output channel
      f = np.broadcast_to(factor, self.g.inits[b].shape)
      self.g.inits[w] = (self.g.inits[w] * f.reshape(-1, 1, 1, 1)).astype(np.float32)
      self.g.inits[b] = (self.g.inits[b] * f).astype(np.float32)
      return _FF(t.name, gain, t.rank, t.conv, t.nonneg)
    return _FF(self.g.node("Mul", [t.name, self.gain_const(factor, t.rank)], "gain"), gain,
               t.rank, None, t.nonneg)

  def lower(self):
    ops = self.p.ops
    if ops[0].kind != "quantize_input":
      raise ValueError("the program must start with quantize_input")
    x = self.g.node("Transpose", [INPUT_NAME], "nchw", perm=[0, 3, 1, 2])
    env = {ops[0].output: _FF(x, 1.0 / float(ops[0].attrs["scale"]), 4)}
    for op in ops[1:]:
      fn = getattr(self, "op_" + op.kind, None)
      if fn is None:
        raise NotImplementedError(f"float ONNX export: op kind {op.kind!r} ({op.name}) is not "
                                  "supported")
      y = fn(op, [env[t] for t in op.inputs])
      if len(self.readers.get(op.output, [])) != 1:
        y.conv = None
      env[op.output] = y
    return self.materialize(env[self.p.output]).name

  def _affine_weights(self, op, x, w):
    """Integer weights with the input's gain folded in along the input channels."""
    w = w.astype(np.float64)
    g = np.asarray(x.gain, np.float64)
    if w.ndim == 4:  # OIHW
      w = w * (g.reshape(1, -1, 1, 1) if g.ndim else g)
    else:  # (n, cout)
      w = w * (g.reshape(-1, 1) if g.ndim else g)
    return w.astype(np.float32)

  def op_conv(self, op, xs):
    x = xs[0]
    w = self.g.const(self._affine_weights(op, x, _weights(op).transpose(3, 2, 0, 1)),
                     np.float32, op.name + "/w")
    b = self.g.const(op.arrays["bias"], np.float32, op.name + "/b")
    y = self.g.node("Conv", [x.name, w, b], op.name, **_conv_attrs(op))
    return _FF(y, 1.0, 4, (w, b))

  def op_dense(self, op, xs):
    x = xs[0]
    w = self.g.const(self._affine_weights(op, x, _weights(op)), np.float32, op.name + "/w")
    b = self.g.const(op.arrays["bias"], np.float32, op.name + "/b")
    y = self.g.node("Add", [self.g.node("MatMul", [x.name, w], op.name), b], "bias")
    return _FF(y, 1.0, 2)

  def op_requantize(self, op, xs):
    x = xs[0]
    y = _FF(x.name, x.gain * _ratio(op), x.rank, x.conv, x.nonneg)
    if requantize_range(op)[0] >= 0 and not x.nonneg:  # unsigned, or a recorded ReLU
      y = _FF(self.g.node("Relu", [x.name], op.name), y.gain, x.rank, x.conv, True)
    return y

  def op_add(self, op, xs):
    a, b = xs
    if b.conv is None and a.conv is not None:
      a = self.materialize(a, b.gain)
    else:
      b = self.materialize(b, a.gain)
    s = self.g.node("Add", [a.name, b.name], op.name)
    nonneg = op.attrs["lo"] >= 0
    if nonneg:
      s = self.g.node("Relu", [s], "relu")
    return _FF(s, a.gain, a.rank, None, nonneg)

  def op_global_avg_pool(self, op, xs):
    x = xs[0]
    y = self.g.node("GlobalAveragePool", [x.name], op.name)
    return _FF(self.g.node("Flatten", [y], "flatten", axis=1), x.gain, 2, None, x.nonneg)

  def op_max_pool(self, op, xs):
    x = xs[0]
    return _FF(self.g.node("MaxPool", [x.name], op.name, **_pool_attrs(op)),
               x.gain, 4, None, x.nonneg)

  def op_avg_pool(self, op, xs):
    x = xs[0]
    y = self.g.node("AveragePool", [x.name], op.name, **_pool_attrs(op),
                    count_include_pad=int(bool(op.attrs.get("count_include_pad", False))))
    return _FF(y, x.gain, 4, None, x.nonneg)

  def op_concat(self, op, xs):
    xs = [self.materialize(t) for t in xs]
    return _FF(self.g.node("Concat", [t.name for t in xs], op.name, axis=1), 1.0, 4, None,
               all(t.nonneg for t in xs))

  def op_grassmann_head(self, op, xs):
    a = op.attrs
    x = self.materialize(xs[0])
    w = self.g.const(_weights(op).astype(np.float32) * _ratio(op).astype(np.float32),
                     np.float32, op.name + "/w")
    p = self.g.node("MatMul", [x.name, w], op.name)
    p = self.g.node("Reshape", [p, self.g.const([0, a["num_classes"], a["subspace_dim"]],
                                                np.int64, "shape")], "per_class")
    norm = self.g.node("Sqrt", [self.g.node("ReduceSumSquare", [
        p, self.g.const([-1], np.int64, "axes")], keepdims=0)])
    xnorm = self.g.node("Sqrt", [self.g.node("ReduceSumSquare", [
        x.name, self.g.const([1], np.int64, "axes")], keepdims=1)])
    xnorm = self.g.node("Max", [xnorm, self.g.const(1.0, np.float32)])
    num = self.g.node("Mul", [norm, self.g.const(float(a["norm_multiplier"]), np.float32)])
    return _FF(self.g.node("Div", [num, xnorm], "logits"), 1.0, 2)


def to_float_onnx(program, batch_size: int | None = None, opset: int = 18):
  """The float32 network of the program's structure (module docstring).

  Returns:
    an ``onnx.ModelProto``: ``x: float32 (B, H, W, C)`` (normalized images, as the float model
    takes them) → ``logits: float32 (B, num_classes)`` in the program's output LSBs.
  """
  onnx = require_onnx()
  lowering = _FloatLowering(program)
  out = lowering.lower()
  lowering.g.nodes.append(onnx.helper.make_node("Identity", [out], [OUTPUT_NAME]))
  shape = _shape_of(program, batch_size)
  return lowering.g.model(onnx.TensorProto.FLOAT, shape, onnx.TensorProto.FLOAT,
                          [shape[0], program.num_classes], opset=opset,
                          doc="grassq integer program's float32 twin (no quantization)")


# ----------------------------------------------------------------------------- files, runtime


def save(model, path: str) -> None:
  """Writes an ONNX model to `path` (a temporary file renamed into place)."""
  from grassq.files import atomic_path

  onnx = require_onnx()
  with atomic_path(path, ".onnx") as tmp:
    onnx.save(model, tmp)


class OnnxModule:
  """An onnxruntime CPU session over an exported model: ``module(x) -> logits`` (numpy)."""

  def __init__(self, model, num_threads: int | None = None, optimize: bool = True):
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    if num_threads:
      opts.intra_op_num_threads = int(num_threads)
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    inp = self.session.get_inputs()[0]
    self.input_type = inp.type

  def __call__(self, x) -> np.ndarray:
    return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x)})[0]

  def __repr__(self):
    return f"OnnxModule({self.input_type} -> {OUTPUT_NAME})"
