"""x86 AVX-512 VNNI for the integer program: the corrected intrinsic and a hand schedule.

With ``layout="NCHW16c"`` the lowering writes every ≤8-bit convolution as `conv2d_nchwc_int8`
(uint8 activations in 16-channel blocks, int8 weights OIHW4i16o4i, padding as its own op), whose
innermost 16 output channels x 4 input channels are one ``vpdpbusd`` (`dot_16x4_vnni`). Two ways
to get there, both bit-exact:

* `schedule_module` (no tuning): every fused conv kernel is tiled (a row of up to 8 output
  pixels x 16 channels of int32 accumulators), tensorized with `dot_16x4_vnni`, parallel over
  (batch, channel block, row), with its requantize epilogue computed per tile; elementwise
  kernels are inlined, parallel and vectorized.
* MetaSchedule (``build(..., tune_dir=...)``, `tuning_pipeline`): the database lives on disk; a
  later build with ``trials=0`` and the same directory applies it without tuning.

The wheel's own `dot_16x4_vnni` passes ``<16 x i32>`` operands to ``llvm.x86.avx512.vpdpbusd.512``,
which LLVM 18+ wants as ``<64 x i8>``. `register_vnni_intrinsic` registers a corrected one: under
its own name for the hand schedule, and with ``builtin=True`` over TVM's `dot_16x4_vnni` (same
description) for MetaSchedule, in every process that tunes or applies a database.
"""

from __future__ import annotations

import logging

from grassq.deploy.relax import require_tvm

log = logging.getLogger(__name__)

VNNI_INTRIN = "grassq_dot_16x4_vnni"  # the hand schedule's name: no clash with TVM's
BUILTIN_VNNI_INTRIN = "dot_16x4_vnni"  # the name MetaSchedule's x86 VNNI rule looks up
CONV_BLOCK = "conv2d_NCHWc_int8"
TUNED_OPS = ["conv2d", "matmul"]  # the kernels MetaSchedule tunes on llvm (task-name substrings)
_registered = set()


def _vnni_prim_funcs():
  """(description, implementation) of a 16x4 uint8 x int8 -> int32 dot product."""
  from tvm.script import tirx as T

  @T.prim_func(s_tir=True)
  def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
           B: T.Buffer((16, 4), "int8", offset_factor=1),
           C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
      T.reads(C[0:16], A[0:4], B[0:16, 0:4])
      T.writes(C[0:16])
      for i in T.serial(0, 16):
        for k in T.serial(0, 4):
          with T.sblock("update"):
            vi, vk = T.axis.remap("SR", [i, k])
            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

  @T.prim_func(s_tir=True)
  def impl(A: T.Buffer((4,), "uint8", offset_factor=1),
           B: T.Buffer((16, 4), "int8", offset_factor=1),
           C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
    with T.sblock("root"):
      T.reads(C[0:16], A[0:4], B[0:16, 0:4])
      T.writes(C[0:16])
      a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
      a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")  # <64 x i8>
      b_i8x64 = B.vload([0, 0], dtype="int8x64")
      C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
          T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
          C.vload([0], dtype="int32x16"), a_u8x64, b_i8x64, dtype="int32x16")

  return desc, impl


def register_vnni_intrinsic(builtin: bool = False) -> str:
  """Registers the corrected VNNI dot product (idempotent) and returns its name.

  By default under `VNNI_INTRIN` (for `schedule_module`; cheap). With ``builtin`` it imports
  TVM's tensor intrinsics (~10 s) and overrides `dot_16x4_vnni` itself, the one MetaSchedule
  tensorizes with: needed in every process that tunes or applies a tuning database.
  """
  name = BUILTIN_VNNI_INTRIN if builtin else VNNI_INTRIN
  if name in _registered:
    return name
  require_tvm()
  from tvm.s_tir import TensorIntrin

  if builtin:
    import tvm.s_tir.tensor_intrin  # noqa: F401 (registers TVM's own, broken, version first)
  TensorIntrin.register(name, *_vnni_prim_funcs(), override=True)
  _registered.add(name)
  return name


def _row_tile(width, most=8):
  """The largest divisor of `width` up to `most` (e.g. output pixels sharing one weight load)."""
  return max(d for d in range(1, min(width, most) + 1) if width % d == 0)


def _inline_all(sch, keep):
  """Inlines every block but `keep` into its consumers where it can (one pass, in order);
  returns the blocks left."""
  keep = [sch.get(k) for k in keep]
  for blk in sch.get_child_blocks(sch.get_sblock("root")):
    if any(sch.get(blk).same_as(k) for k in keep):
      continue
    try:
      sch.compute_inline(blk)
    except Exception:  # noqa: BLE001 (an output block, or a reduction: stays)
      pass
  return sch.get_child_blocks(sch.get_sblock("root"))


def _schedule_elementwise(sch, block, lanes=16):
  """Parallel outer loops, vectorized innermost (when it divides by `lanes`)."""
  loops = sch.get_loops(block)
  if not loops:
    return
  extents = [int(sch.get(lp).extent) for lp in loops]
  inner = loops[-1]
  if extents[-1] % lanes == 0 and extents[-1] >= lanes:
    outer, inner = sch.split(inner, [None, lanes])
    loops = loops[:-1] + [outer]
    sch.vectorize(inner)
  if len(loops) > 1:
    sch.parallel(sch.fuse(*loops[:max(1, len(loops) - 1)]))
  elif loops:
    sch.parallel(loops[0])


def _schedule_reduction(sch, block, lanes=16):
  """A reduction block whose loops are its spatial axes then its reduce axes (a max pool window, a
  global sum): parallel over the outer spatial loops, the reduce loops moved outside the
  innermost spatial one (a 16-channel block)."""
  kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]  # 0 spatial, 2 reduce
  loops = sch.get_loops(block)
  if 2 not in kinds:
    _schedule_elementwise(sch, block, lanes)
    return
  if len(loops) != len(kinds) or kinds != sorted(kinds):  # not spatial-then-reduce: leave it
    return
  spatial, reduce = loops[:kinds.index(2)], loops[kinds.index(2):]
  if len(spatial) > 1:
    sch.parallel(sch.fuse(*spatial[:-1]))
  inner = spatial[-1]
  if int(sch.get(inner).extent) % lanes == 0:  # (TIR refuses to vectorize it under the reduce
    sch.reorder(*reduce, inner)                 # loops; LLVM vectorizes the contiguous loop)
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])


CONV_TILE = {"oc_blocks": 2, "accumulators": 16}  # register tile of the hand conv schedule


def _schedule_conv(sch, conv):
  """Tiles, tensorizes and parallelizes one `conv2d_NCHWc_int8` block with its epilogue.

  The register tile (`CONV_TILE`) is up to ``oc_blocks`` 16-channel output blocks × a row of
  output pixels, ``accumulators`` zmm registers in all: each 4-channel input broadcast feeds
  every output block and each weight vector every pixel of the row
  (`python -m benchmarks.conv_tile` compares tiles)."""
  oc_blocks, accumulators = CONV_TILE["oc_blocks"], CONV_TILE["accumulators"]
  epilogue = [b for b in _inline_all(sch, [conv]) if not sch.get(b).same_as(sch.get(conv))]
  b, o, y, x, oc, rc, ry, rx, ra, rb = sch.get_loops(conv)
  ob = _row_tile(int(sch.get(o).extent), oc_blocks)
  oo, oi = sch.split(o, [None, ob])
  xo, xi = sch.split(x, [None, _row_tile(int(sch.get(x).extent), max(1, accumulators // ob))])
  sch.reorder(b, oo, y, xo, rc, ry, rx, ra, oi, xi, oc, rb)
  outer = sch.fuse(b, oo, y)
  sch.parallel(outer)
  for blk in epilogue:  # requantize per tile, while the accumulators are hot
    sch.reverse_compute_at(blk, xo)
    loops = sch.get_loops(blk)
    sch.vectorize(loops[-1])
  init = sch.decompose_reduction(conv, rc)
  sch.vectorize(sch.get_loops(init)[-1])
  sch.unroll(oi)
  sch.unroll(xi)
  sch.tensorize(oc, VNNI_INTRIN)


def schedule_func(func, tensorize: bool = True):
  """A scheduled copy of one fused PrimFunc (unchanged when no rule applies or one fails).

  With ``tensorize=False`` (a CPU without VNNI) the convolutions keep their default loops.
  Functions already scheduled (``tirx.is_scheduled``, e.g. from a MetaSchedule database) stay.
  """
  tvm, _ = require_tvm()
  from tvm import s_tir

  if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
    return func
  sch = s_tir.Schedule(func)
  try:
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
  except Exception:  # noqa: BLE001 (no root block: not a TE-made function)
    return func
  names = [sch.get(b).name_hint for b in blocks]
  try:
    if CONV_BLOCK in names:
      if not tensorize:
        return func
      _schedule_conv(sch, sch.get_sblock(CONV_BLOCK))
    elif all(int(iv.iter_type) == 0 for b in blocks for iv in sch.get(b).iter_vars):
      # only spatial iterators: elementwise / injective kernels
      for blk in _inline_all(sch, []):
        _schedule_elementwise(sch, blk)
    else:  # pools and sums: window reductions
      for blk in _inline_all(sch, []):
        _schedule_reduction(sch, blk)
  except Exception as e:  # noqa: BLE001 (a schedule that does not fit: keep the default loops)
    if CONV_BLOCK in names:
      log.warning("VNNI schedule failed for a conv kernel; it keeps its default loops: %s", e)
    return func
  return sch.mod["main"]


def schedule_module(mod, tensorize: bool = True):
  """Applies `schedule_func` to every PrimFunc of a legalized, fused Relax IRModule."""
  tvm, _ = require_tvm()
  if tensorize:
    register_vnni_intrinsic()
  out = mod.clone()
  for gv, func in list(mod.functions_items()):
    if isinstance(func, tvm.tirx.PrimFunc):
      new = schedule_func(func, tensorize)
      if new is not func:
        out.update_func(gv, new)
  return out


def scheduled_pipeline(target, tensorize: bool = True):
  """The default CPU Relax pipeline with `schedule_module` after fusion (``tensorize``: the
  target has AVX-512 VNNI)."""
  tvm, relax = require_tvm()
  from tvm.relax.backend.cpu_generic import pipeline as cpu

  @tvm.transform.module_pass(opt_level=0)
  def _pipeline(mod, _ctx):
    with target:
      seq = tvm.transform.Sequential(cpu.library_dispatch_passes(target)
                                     + cpu.legalize_passes(target))
      mod = schedule_module(seq(mod), tensorize)
      seq = tvm.transform.Sequential(cpu.dataflow_lower_passes(target)
                                     + cpu.finalize_passes(target))
      return seq(mod)

  return _pipeline


def _worker_init():
  """MetaSchedule builder/runner worker initializer: the corrected `dot_16x4_vnni`."""
  register_vnni_intrinsic(builtin=True)


def tuning_pipeline(target, work_dir: str, trials: int = 0, trials_per_task: int | None = None,
                    timeout_s: float = 60.0):
  """Legalize and fuse, tune with MetaSchedule (database in `work_dir`), apply the database.

  With ``trials=0`` nothing is tuned and an existing database is applied. On llvm only the
  convolution and matmul kernels are tuned (`TUNED_OPS`); the rest get the hand schedule (tuned,
  the input layout conversion of ResNet-18 took 13.7 ms per batch of 8, a quarter of the whole
  network: its MetaSchedule space held one candidate). Builder and runner
  workers register the corrected `dot_16x4_vnni` (TVM's own is broken under its LLVM), so
  MetaSchedule's x86 VNNI rule can tensorize the NCHW16c convolutions. On llvm, kernels that the
  database does not cover get `schedule_module`'s hand schedule.
  """
  tvm, relax = require_tvm()
  from tvm.s_tir import meta_schedule as ms

  register_vnni_intrinsic(builtin=True)
  target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target

  @tvm.transform.module_pass(opt_level=0)
  def _pipeline(mod, _ctx):
    with target:
      mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                      relax.transform.CanonicalizeBindings(),
                                      relax.get_pipeline("zero")])(mod)
      if trials > 0:
        ms.relax_integration.tune_relax(
            mod, {}, target, work_dir, int(trials), trials_per_task,
            # on llvm only the convolutions and matmuls: the hand schedule is good for the
            # elementwise kernels, while MetaSchedule's one-candidate spaces for them are not
            op_names=TUNED_OPS if target.kind.name == "llvm" else None,
            num_trials_per_iter=min(64, max(1, trials_per_task or 64)),
            builder=ms.builder.LocalBuilder(initializer=_worker_init, timeout_sec=timeout_s),
            runner=ms.runner.LocalRunner(initializer=_worker_init, timeout_sec=timeout_s))
      mod = relax.transform.MetaScheduleApplyDatabase(work_dir)(mod)
    if target.kind.name != "llvm":
      return mod
    # kernels the database does not cover (untuned tasks) get the hand schedule
    vnni = bool(tvm.target.codegen.llvm_cpu_has_features("avx512vnni", target))
    return schedule_module(mod, tensorize=vnni)

  return _pipeline
