"""Lowering of the integer program to a TVM Relax IRModule, bit for bit as the JAX interpreter.

`to_relax(program, input_shape)` writes one Relax function ``main(x: int8 (B, H, W, C)) -> int32
(B, num_classes)`` from the program's ops with explicit integer Relax ops only (TVM 0.27 has no
QNN dialect, and its int4 dtype gives wrong numbers on llvm):

* conv / dense: ``conv2d`` (NHWC x HWIO) / ``matmul`` of the input narrowed to its (bits, signed)
  storage type (int8 / uint8) and int8 weights, ``out_dtype="int32"``, then the int32 bias. int4
  weights stay packed two per int8 byte in the module's constants and are unpacked in the graph
  with and/xor/shift (sign extension without overflow); ``tvm.compile`` folds the unpacking.
* requantize: astype int64, multiply by the per-channel multiplier, add 2^(c−1), arithmetic
  right shift by c, clamp to the (bits, signed) range (the int32 range when unsaturated; the
  lower end raised to 0 when the op records ``relu``), astype int32: (acc·m + 2^(c−1)) >> c
  exactly, round half up, as `grassq.quant.requantize`.
* add: int32 add, clamped once; concat: ``concat`` along channels; max_pool: ``max_pool2d``
  (padding never wins); avg_pool (zero padding, divided by the unpadded count unless
  ``count_include_pad``) and global_avg_pool: int32 window sums and ``floor_divide`` (rounding
  towards −inf).
* grassmann_head: the projection matmul, requantize clamped to [−proj_max, proj_max] (the op's
  symmetric clamp; programs saved without ``proj_max`` keep the signed proj_bits range), Σp²
  and Σx² in int32, an exact integer square root, ⌊‖p‖·M / max(‖x‖, 1)⌋. The square root is
  the one floating-point op in the module: a float64 estimate followed by two exact integer
  correction steps (see `isqrt`).

With ``layout="NCHW16c"`` activations live in 16-channel blocks (N, C/16, H, W, 16), channels
zero-padded to a multiple of 16 (padded channels meet zero weights and are sliced off before the
head), and every ≤8-bit convolution becomes `conv2d_nchwc_int8`: uint8 activations (signed ones
as x ⊕ 0x80 = x + 128, padded with 128, with 128·Σw taken from the bias: exact), int8 weights
OIHW4i16o4i, padding as its own op: the shape of x86 VNNI's ``vpdpbusd`` (`grassq.deploy.vnni`).
Convolutions on wider inputs stay NHWC ``conv2d`` between layout changes.

A second function ``io_shapes()`` returns the input and output shapes, so a compiled module that
was saved and loaded still knows what it takes.

The lowering reads every clamp from the program (``relu``, ``proj_max``, ``lo``/``hi``) and forms
the same int32 intermediates as the interpreter; `grassq.quant.program.value_bounds` proves them
in range when the program is made or loaded.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from grassq.quant.dyadic import clip_range
from grassq.quant.program import projection_range, requantize_range

INPUT_DTYPE = "int8"
LAYOUTS = ("NHWC", "NCHW16c")
BLOCK = 16
OUTPUT_DTYPE = "int32"


def physical_cores() -> int:
  """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  cores = set()
  for cpu in cpus:
    try:
      with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
        core = f.read().strip()
      with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
        cores.add((f.read().strip(), core))
    except OSError:
      cores.add(("cpu", cpu))
  return max(1, len(cores) or os.cpu_count() or 1)


def default_tvm_threads() -> None:
  """Sets ``TVM_NUM_THREADS`` to `physical_cores()` unless it (or ``OMP_NUM_THREADS``) is set.

  Without it TVM's CPU thread pool takes half the logical CPUs on x86, assuming 2-way SMT: on a
  machine without SMT that is half the cores. Measured here (2 cores, no SMT): TVM ran 1 worker
  thread, and ResNet-18 int8 at batch 8 took 38.4 ms instead of 20.2 ms with 2. TVM reads the
  variable when its pool starts, so this runs before TVM executes anything."""
  if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["TVM_NUM_THREADS"] = str(physical_cores())


def require_tvm():
  """Imports TVM (``tvm`` and ``tvm.relax``), or raises an ImportError that says how to get it."""
  default_tvm_threads()
  try:
    import tvm
    from tvm import relax
  except ImportError as e:
    raise ImportError("grassq.deploy needs Apache TVM (Relax, 0.25-0.27): "
                      "pip install grassq[tvm]") from e
  return tvm, relax


def require_tvm_runtime():
  """Imports TVM's runtime only (``tvm``), enough to load and run a module written by
  `grassq.deploy.save` / `export`: it also works with a runtime-only TVM
  (``TVM_USE_RUNTIME_LIB=1``, or a machine without TVM's compiler library)."""
  default_tvm_threads()
  try:
    import tvm
    from tvm.runtime import vm  # noqa: F401 (the Relax VM of every compiled module)
  except ImportError as e:
    raise ImportError("running a compiled grassq module needs Apache TVM's runtime (0.25-0.27): "
                      "pip install grassq[tvm]") from e
  return tvm


def _is_int(v):
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def input_shape_of(program, input_shape: Sequence[int] | int | None = None) -> tuple:
  """The full (B, H, W, C) input shape: `input_shape`, a batch size, or None (batch 1).

  Raises:
    ValueError: a batch size (an int, or the leading entry of a shape) that is not a positive
      int, or a shape whose other entries are not the program's input shape.
  """
  hwc = tuple(program.input_shape)
  if input_shape is None:
    input_shape = 1
  if _is_int(input_shape):
    shape = (input_shape,) + hwc
  else:
    try:
      shape = tuple(input_shape)
    except TypeError:
      raise ValueError(f"input_shape must be a batch size (a positive int) or (batch, "
                       f"{', '.join(map(str, hwc))}); got {input_shape!r}") from None
    if not all(_is_int(d) for d in shape):
      raise ValueError(f"input_shape must hold ints (the batch size a positive int); got "
                       f"{input_shape!r}")
    if shape[1:] != hwc or len(shape) != len(hwc) + 1:
      raise ValueError(f"input_shape must be (batch, {', '.join(map(str, hwc))}) for this "
                       f"program; got {tuple(int(d) for d in shape)}")
  if shape[0] < 1:
    raise ValueError(f"batch size must be a positive int; got {int(shape[0])}")
  return tuple(int(d) for d in shape)


def _bounds(bits, signed, saturate, relu=False):
  """[lo, hi] of a requantized output: `grassq.quant.dyadic.clip_range`, the one rule."""
  return clip_range(bits, signed, saturate, relu)


def _ndim(x):
  return len(x.ty.shape)


def _dims(x):
  return [int(d) for d in x.ty.shape]


def conv2d_nchwc_int8(data, kernel, strides, out_hw):
  """TE compute of an NCHW16c x OIHW4i16o4i convolution (uint8 x int8 -> int32), no padding.

  The innermost (16 output channels) x (4 input channels) is exactly x86 VNNI's ``vpdpbusd``
  (`dot_16x4_vnni`), so MetaSchedule can tensorize it. The input block may also be 4 channels
  wide (NCHW4c x OIHW1i16o4i: a stem with ≤ 4 input channels does not multiply 12 zero ones).
  """
  from tvm import te

  n, icb, _, _, blk = data.shape
  ocb, _, kh, kw, _, _, _ = kernel.shape
  (sh, sw), (oh, ow) = strides, out_hw
  rc = te.reduce_axis((0, icb), "rc")
  ry, rx = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx")
  ra, rb = te.reduce_axis((0, int(blk) // 4), "ra"), te.reduce_axis((0, 4), "rb")
  return te.compute(
      (n, ocb, oh, ow, 16),
      lambda b, o, y, x, oc: te.sum(
          data[b, rc, y * sh + ry, x * sw + rx, ra * 4 + rb].astype("int32")
          * kernel[o, rc, ry, rx, ra, oc, rb].astype("int32"), axis=[rc, ry, rx, ra, rb]),
      name="conv2d_NCHWc_int8")


class _Lowering:
  """Emits the Relax bindings of each op into an open dataflow block of `bb`.

  Activations are NHWC, or NCHW16c (channels padded to a multiple of 16; the padded channels
  meet zero weights and are sliced off before the head) for the x86 VNNI layout.
  """

  def __init__(self, bb, relax, layout="NHWC"):
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    self.bb, self.relax, self.R = bb, relax, relax.op
    self.blocked = layout == "NCHW16c"

  def const(self, value, dtype):
    return self.relax.const(np.asarray(value, dtype), np.dtype(dtype).name)

  def emit(self, expr, name=None):
    return self.bb.emit(expr, name) if name else self.bb.emit(expr)

  # -- layouts
  def channel_array(self, values, like, dtype, fill=0):
    """Per-channel `values` (C,) (or one value) shaped to broadcast over `like`'s channels."""
    v = np.asarray(values, dtype)
    if v.size > 1 and _ndim(like) == 5:
      cb = _dims(like)[1]
      v = np.pad(v.reshape(-1), (0, cb * BLOCK - v.size), constant_values=fill)
      v = v.reshape(1, cb, 1, 1, BLOCK)
    return v

  def to_blocked(self, x):
    """(N, H, W, C) -> (N, ⌈C/16⌉, H, W, 16), padding channels with zeros."""
    R = self.R
    n, h, w, c = _dims(x)
    cb = -(-c // BLOCK)
    if cb * BLOCK != c:
      x = R.nn.pad(x, [0, 0, 0, 0, 0, 0, 0, cb * BLOCK - c])
    return self.emit(R.permute_dims(R.reshape(x, [n, h, w, cb, BLOCK]), [0, 3, 1, 2, 4]))

  def from_blocked(self, x, c):
    """(N, C/16, H, W, 16) -> (N, H, W, C) for the first c channels."""
    R = self.R
    n, cb, h, w, _ = _dims(x)
    y = R.reshape(R.permute_dims(x, [0, 2, 3, 1, 4]), [n, h, w, cb * BLOCK])
    if cb * BLOCK != c:
      y = R.strided_slice(y, axes=[3], begin=[0], end=[c])
    return self.emit(y)

  # -- building blocks
  def storage(self, x, bits, signed):
    """The interpreter's `_storage`: narrow to int8/uint8 up to 8 bits, else keep int32."""
    if bits <= 8:
      return self.emit(self.R.astype(x, "int8" if signed else "uint8"))
    return x

  def unpack_int4(self, packed, last_dim):
    """`intops.unpack_int4` in Relax: low nibble = ((p & 15) ^ 8) − 8, high nibble = p >> 4."""
    R = self.R
    p = R.astype(packed, "int32")
    low = R.subtract(R.bitwise_xor(R.bitwise_and(p, self.const(15, np.int32)),
                                   self.const(8, np.int32)), self.const(8, np.int32))
    high = R.right_shift(p, self.const(4, np.int32))
    shape = _dims(packed)
    both = self.emit(R.reshape(R.stack([low, high], axis=len(shape)),
                               shape[:-1] + [2 * shape[-1]]))
    if 2 * shape[-1] != last_dim:
      both = self.emit(R.strided_slice(both, axes=[len(shape) - 1], begin=[0], end=[last_dim]))
    return self.emit(R.astype(both, "int8"))

  def weight(self, op):
    w = op.arrays["weight"]
    if np.asarray(w).dtype != np.int8:
      raise ValueError(f"{op.name}: weights must be int8 (int4 packed two per byte); got "
                       f"{np.asarray(w).dtype}")
    w = self.relax.const(np.ascontiguousarray(w))
    if op.attrs["w_bits"] <= 4:
      return self.unpack_int4(w, op.attrs["cout"])
    return w

  def requantize(self, acc, multiplier, shift, bits, signed, saturate=True, name=None,
                 relu=False, bounds=None):
    """(acc·m + 2^(c−1)) >> c in int64, clamped to [lo, hi] (`_bounds`, or `bounds`), as int32."""
    R = self.R
    c = np.asarray(shift, np.int64)
    if c.size and (c.min() < 1 or c.max() > 62):
      raise ValueError(f"requantize {name}: shifts must lie in [1, 62]; got "
                       f"[{c.min()}, {c.max()}]")
    lo, hi = _bounds(bits, signed, saturate, relu) if bounds is None else bounds
    m = self.channel_array(multiplier, acc, np.int64)
    c = self.channel_array(c, acc, np.int64, fill=1)
    a = R.multiply(R.astype(acc, "int64"), self.const(m, np.int64))
    a = R.right_shift(R.add(a, self.const(np.left_shift(np.int64(1), c - 1), np.int64)),
                      self.const(c, np.int64))
    a = R.minimum(R.maximum(a, self.const(lo, np.int64)), self.const(hi, np.int64))
    return self.emit(R.astype(a, "int32"), name)

  def window_sum(self, x, window, strides):
    """Σ over each window (no padding) of an int32 NHWC or NCHW16c tensor, by strided slices."""
    R = self.R
    axes = [2, 3] if _ndim(x) == 5 else [1, 2]
    h, w = (_dims(x)[a] for a in axes)
    (kh, kw), (sh, sw) = window, strides
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    if ho < 1 or wo < 1:
      raise ValueError(f"pool window {window} larger than the input {h}x{w}")
    total = None
    for i in range(kh):
      for j in range(kw):
        s = R.strided_slice(x, axes=axes, begin=[i, j],
                            end=[i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1], strides=[sh, sw])
        total = s if total is None else R.add(total, s)
    return self.emit(total)

  def avg_pool(self, x, a, name):
    """⌊window sum / count⌋ (`intops.avg_pool_int`); zero padding, counted only if asked."""
    R = self.R
    window = tuple(a["window"])
    strides = tuple(a.get("strides") or window)
    (pt, pb), (pl, pr) = a.get("padding", ((0, 0), (0, 0)))
    axes = [2, 3] if _ndim(x) == 5 else [1, 2]
    h, w = (_dims(x)[i] for i in axes)
    if pt or pb or pl or pr:
      pads = [0] * (2 * _ndim(x))
      pads[2 * axes[0]:2 * axes[0] + 2], pads[2 * axes[1]:2 * axes[1] + 2] = (pt, pb), (pl, pr)
      x = self.emit(R.nn.pad(x, pads, pad_value=0))
    s = self.window_sum(x, window, strides)
    if a.get("count_include_pad", False) or not (pt or pb or pl or pr):
      count = self.const(window[0] * window[1], np.int32)
    else:  # unpadded positions per window, a static table broadcasting over batch and channels
      ones = np.pad(np.ones((h, w), np.int64), ((pt, pb), (pl, pr)))
      ho, wo = (_dims(s)[i] for i in axes)
      table = np.zeros((ho, wo), np.int32)
      for i in range(window[0]):
        for j in range(window[1]):
          table += ones[i:i + (ho - 1) * strides[0] + 1:strides[0],
                        j:j + (wo - 1) * strides[1] + 1:strides[1]].astype(np.int32)
      # (Ho, Wo, 1) broadcasts against NHWC (.., Ho, Wo, C) and NCHW16c (.., Ho, Wo, 16)
      count = self.const(table[:, :, None], np.int32)
    return self.emit(R.floor_divide(s, count), name)

  def isqrt(self, n):
    """Exact ⌊√n⌋ of int32 n ≥ 0 (`intops.isqrt`): a float64 estimate, corrected in int64.

    √n in float64 is correctly rounded, so its floor is already exact for n < 2^52; the two
    integer steps (r −= r² > n, r += (r+1)² ≤ n) make the result exact for any estimate within
    one. The interpreter's restoring square root is not used here: once fused and inlined its
    16 steps grow exponentially in TIR.
    """
    R = self.R
    one = self.const(1, np.int64)
    n64 = self.emit(R.astype(n, "int64"))
    r = self.emit(R.astype(R.floor(R.sqrt(R.astype(n, "float64"))), "int64"))
    r = self.emit(R.subtract(r, R.astype(R.greater(R.multiply(r, r), n64), "int64")))
    r1 = R.add(r, one)
    r = self.emit(R.add(r, R.astype(R.less_equal(R.multiply(r1, r1), n64), "int64")))
    return self.emit(R.astype(r, "int32"))

  # -- ops
  def conv(self, op, x, name):
    R, a = self.R, op.attrs
    if a.get("groups", 1) != 1:
      raise NotImplementedError(f"{op.name}: grouped convolution has no TVM lowering yet")
    (pt, pb), (pl, pr) = a["padding"]
    w = self.weight(op)
    cin = _dims(w)[2]
    if self.blocked and a["in_bits"] <= 8:
      acc, correction = self.conv_vnni(op, x, w)
    else:
      if self.blocked:  # > 8-bit inputs: no uint8 x int8 dot product; the generic NHWC conv
        x = self.from_blocked(x, cin)
      acc = self.emit(R.nn.conv2d(self.storage(x, a["in_bits"], a["in_signed"]), w,
                                  strides=tuple(a["strides"]), padding=(pt, pl, pb, pr),
                                  data_layout="NHWC", kernel_layout="HWIO", out_dtype="int32"))
      acc, correction = self.to_blocked(acc) if self.blocked else acc, None
    bias = self.const(self.channel_array(op.arrays["bias"], acc, np.int32), np.int32)
    if correction is not None:
      bias = R.subtract(bias, correction)
    return self.emit(R.add(acc, bias), name)

  def conv_vnni(self, op, x, w):
    """NCHW16c uint8 x OIHW4i16o4i int8 -> (int32 accumulators, bias correction or None).

    Signed inputs go in as x ⊕ 0x80 = x + 128, padded with 128 (the shifted zero), and the
    correction 128·Σw is subtracted from the bias; padding is its own op (inside the conv it
    would block tensorization). Weights are reordered in the graph (folded at compile time).
    With at most 4 input channels (an RGB or grey stem) only the block's first 4 channels go
    in (NCHW4c), a quarter of the multiply-adds of a 16-channel block.
    """
    R, a = self.R, op.attrs
    (pt, pb), (pl, pr) = a["padding"]
    (sh, sw) = tuple(a["strides"])
    kh, kw, cin, cout = _dims(w)
    n, icb, h, wd, _ = _dims(x)
    ocb = -(-cout // BLOCK)
    signed = a["in_signed"]
    blk = 4 if icb == 1 and cin <= 4 else BLOCK
    x8 = R.astype(x, "int8" if signed else "uint8")
    if blk != BLOCK:
      x8 = R.strided_slice(x8, axes=[4], begin=[0], end=[blk])
    if signed:
      x8 = R.astype(R.bitwise_xor(x8, self.const(-128, np.int8)), "uint8")
    if pt or pb or pl or pr:
      x8 = R.nn.pad(x8, [0, 0, 0, 0, pt, pb, pl, pr, 0, 0], pad_value=128 if signed else 0)
    x8 = self.emit(x8)
    wp = R.nn.pad(w, [0, 0, 0, 0, 0, icb * blk - cin, 0, ocb * BLOCK - cout])
    wb = self.emit(R.permute_dims(R.reshape(wp, [kh, kw, icb, blk // 4, 4, ocb, BLOCK]),
                                  [5, 2, 0, 1, 3, 6, 4]))
    oh, ow = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    acc = self.bb.emit_te(conv2d_nchwc_int8, x8, wb, (sh, sw), (oh, ow),
                          primfunc_name_hint="conv2d_NCHWc_int8")
    if not signed:
      return acc, None
    wsum = R.multiply(R.sum(R.astype(w, "int32"), axis=[0, 1, 2]), self.const(128, np.int32))
    wsum = R.nn.pad(wsum, [0, ocb * BLOCK - cout])
    return acc, R.reshape(wsum, [1, ocb, 1, 1, BLOCK])

  def op(self, op, env, channels):
    R, a = self.R, op.attrs
    name = re.sub(r"\W", "_", op.name)
    ins = [env[t] for t in op.inputs]
    if op.kind == "conv":
      return self.conv(op, ins[0], name)
    if op.kind == "dense":
      x = self.storage(self.flat(ins[0], channels[op.inputs[0]]), a["in_bits"], a["in_signed"])
      acc = R.matmul(x, self.weight(op), out_dtype="int32")
      return self.emit(R.add(acc, self.const(op.arrays["bias"], np.int32)), name)
    if op.kind == "requantize":
      return self.requantize(ins[0], op.arrays["multiplier"], op.arrays["shift"], a["bits"],
                             a["signed"], a["saturate"], name, bounds=requantize_range(op))
    if op.kind == "add":
      s = R.add(ins[0], ins[1])
      return self.emit(R.minimum(R.maximum(s, self.const(a["lo"], np.int32)),
                                 self.const(a["hi"], np.int32)), name)
    if op.kind == "max_pool":
      (pt, pb), (pl, pr) = a.get("padding", ((0, 0), (0, 0)))
      return self.emit(R.nn.max_pool2d(ins[0], pool_size=tuple(a["window"]),
                                       strides=tuple(a["strides"]), padding=(pt, pl, pb, pr),
                                       layout="NCHW16c" if _ndim(ins[0]) == 5 else "NHWC"), name)
    if op.kind == "avg_pool":
      return self.avg_pool(ins[0], a, name)
    if op.kind == "concat":  # along channels; blocked inputs are unblocked, joined, reblocked
      if _ndim(ins[0]) == 5:
        parts = [self.from_blocked(x, channels[t]) for t, x in zip(op.inputs, ins)]
        return self.to_blocked(self.emit(R.concat(parts, axis=3)))
      return self.emit(R.concat(ins, axis=_ndim(ins[0]) - 1), name)
    if op.kind == "global_avg_pool":
      x = ins[0]
      axes = [2, 3] if _ndim(x) == 5 else [1, 2]
      h, w = (_dims(x)[i] for i in axes)
      s = self.flat(self.emit(R.sum(x, axis=axes)), channels[op.inputs[0]])
      return self.emit(R.floor_divide(s, self.const(h * w, np.int32)), name)
    if op.kind == "grassmann_head":
      return self.grassmann_head(op, self.flat(ins[0], channels[op.inputs[0]]), name)
    raise ValueError(f"{op.name}: op kind {op.kind!r} has no TVM lowering")

  def flat(self, x, c):
    """A (N, C/16, 16) blocked vector as (N, C); other tensors unchanged."""
    if _ndim(x) != 3:
      return x
    n, cb, _ = _dims(x)
    y = self.R.reshape(x, [n, cb * BLOCK])
    if cb * BLOCK != c:
      y = self.R.strided_slice(y, axes=[1], begin=[0], end=[c])
    return self.emit(y)

  def grassmann_head(self, op, x, name):
    R, a = self.R, op.attrs
    acc = self.emit(R.matmul(self.storage(x, a["in_bits"], a["in_signed"]), self.weight(op),
                             out_dtype="int32"))
    p = self.requantize(acc, op.arrays["multiplier"], op.arrays["shift"], a["proj_bits"], True,
                        bounds=projection_range(op))
    batch = _dims(x)[0]
    p = self.emit(R.reshape(p, [batch, a["num_classes"], a["subspace_dim"]]))
    norm = self.isqrt(self.emit(R.sum(R.multiply(p, p), axis=[2])))
    xnorm = self.isqrt(self.emit(R.sum(R.multiply(x, x), axis=[1], keepdims=True)))
    xnorm = self.emit(R.maximum(xnorm, self.const(1, np.int32)))
    scaled = R.multiply(norm, self.const(a["norm_multiplier"], np.int32))
    return self.emit(R.floor_divide(scaled, xnorm), name)


def _channels(program, input_channels):
  """The channel count of every 4-D tensor of the program (for the blocked layout)."""
  ch = {program.ops[0].output: input_channels}
  for op in program.ops[1:]:
    if op.kind == "conv":
      ch[op.output] = op.attrs["cout"]
    elif op.kind == "concat":
      ch[op.output] = sum(ch[t] for t in op.inputs)
    elif op.inputs:
      ch[op.output] = ch.get(op.inputs[0])
  return ch


def to_relax(program, input_shape: Sequence[int] | int | None = None, layout: str = "NHWC"):
  """The integer program as a Relax IRModule, bit-exact with `grassq.quant.program.run`.

  Args:
    program: a `grassq.quant.program.IntegerProgram`.
    input_shape: (B, H, W, C) of the int8 input (the output of `program.quantize_input`), or a
      batch size B (a positive int); default batch 1.
    layout: "NHWC" (activations as the interpreter holds them), or "NCHW16c": activations in
      16-channel blocks and ≤8-bit convolutions as uint8 x int8 OIHW4i16o4i `conv2d_nchwc_int8`,
      the layout of x86 VNNI (`grassq.deploy.vnni`). The module's input is NHWC either way.

  Returns:
    a `tvm.IRModule` with ``main(x: int8 (B, H, W, C)) -> int32 (B, num_classes)`` and
    ``io_shapes() -> (input shape, output shape)``.

  Raises:
    ImportError: without TVM. ValueError: a malformed program or input shape.
  """
  _, relax = require_tvm()
  shape = input_shape_of(program, input_shape)
  ops = program.ops
  if not ops or ops[0].kind != "quantize_input":
    raise ValueError("the program must start with its quantize_input op")
  bb = relax.BlockBuilder()
  low = _Lowering(bb, relax, layout)
  channels = _channels(program, shape[-1])
  x = relax.Var("x", relax.TensorType(shape, INPUT_DTYPE))
  with bb.function("main", [x]):
    with bb.dataflow():
      x32 = bb.emit(relax.op.astype(x, "int32"), "input")
      env = {ops[0].output: low.to_blocked(x32) if low.blocked else x32}
      for op in ops[1:]:
        env[op.output] = low.op(op, env, channels)
      out = bb.emit_output(env[program.output])
    bb.emit_func_output(out)
  out_shape = tuple(int(d) for d in out.ty.shape)
  if out_shape != (shape[0], program.num_classes) or out.ty.dtype != OUTPUT_DTYPE:
    raise ValueError(f"program output is {out.ty.dtype} {out_shape}, not int32 "
                     f"{(shape[0], program.num_classes)}")
  with bb.function("io_shapes", []):
    bb.emit_func_output(relax.Tuple([relax.ShapeExpr(list(shape)),
                                     relax.ShapeExpr(list(out_shape))]))
  return bb.get()


def requantize_module(multiplier, shift, bits: int, signed: bool, saturate: bool = True,
                      relu: bool = False):
  """A Relax IRModule ``main(acc: int32 (N,)) -> int32 (N,)`` of the requantize op alone.

  Args:
    multiplier, shift: int32 arrays (N,) (per element, as per channel in a program).
    bits, signed, saturate, relu: as in `grassq.quant.requantize`.

  For checking the lowering's rule against `grassq.quant.requantize_reference`.
  """
  _, relax = require_tvm()
  multiplier = np.asarray(multiplier, np.int32).reshape(-1)
  shift = np.asarray(shift, np.int32).reshape(-1)
  if multiplier.shape != shift.shape:
    raise ValueError(f"multiplier {multiplier.shape} and shift {shift.shape} differ in shape")
  bb = relax.BlockBuilder()
  acc = relax.Var("acc", relax.TensorType(multiplier.shape, "int32"))
  with bb.function("main", [acc]):
    with bb.dataflow():
      out = bb.emit_output(_Lowering(bb, relax).requantize(acc, multiplier, shift, bits, signed,
                                                           saturate, relu=relu))
    bb.emit_func_output(out)
  return bb.get()
