"""Compiling the Relax module of an integer program with TVM, running it, saving and loading it.

`build(program, target, input_shape)` lowers the program (`to_relax`), compiles it with
`tvm.compile` and returns a `Deployed` module: a callable over numpy arrays, int8 images
(B, H, W, C) (the output of `program.quantize_input`) to int32 logits (B, num_classes), bit for
bit as `grassq.quant.program.run`. Targets are TVM target dicts:

* `host_target()`: ``{"kind": "llvm", "mcpu": <this CPU as LLVM names it>}`` (e.g. znver4/znver5,
  with AVX-512 VNNI), the default; on a VNNI CPU the convolutions are lowered in NCHW16c and
  tensorized with ``vpdpbusd`` by a hand schedule (`grassq.deploy.vnni`), no tuning needed;
* `GENERIC_TARGET`: ``{"kind": "llvm"}``, any x86-64;
* `CUDA_T4_TARGET`: ``{"kind": "cuda", "arch": "sm_75"}``; `build` for it needs a CUDA device
  (else a RuntimeError), `export` does not: it cross-compiles on any machine. `cuda_source`
  shows the kernels (and `cuda_ptx` compiles them with nvcc).

`save(module, path)` writes a built module as one shared library (atomically, by
`grassq.files.atomic_path`) and its SHA-256 beside it (``path.sha256``); `export(program, path,
target, input_shape)` compiles and writes one the same way without running it, so a GPU module
can be made on a CPU-only machine; `load(path, device)` checks the SHA-256 before the library is
mapped (a truncated or modified library can kill the process with SIGBUS or SIGILL, or run and
return wrong logits) and reads it with TVM's runtime alone (the machine that runs it needs no TVM
compiler, LLVM or nvcc: a CUDA module's kernels are compiled by NVRTC when it is loaded).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from grassq import files
from grassq.deploy.relax import INPUT_DTYPE, require_tvm, require_tvm_runtime, to_relax

GENERIC_TARGET = {"kind": "llvm"}
CUDA_T4_TARGET = {"kind": "cuda", "arch": "sm_75"}


def host_target() -> dict:
  """This CPU as an llvm target dict (``mcpu`` as LLVM detects it), or `GENERIC_TARGET`."""
  tvm, _ = require_tvm()
  try:
    from tvm.target import codegen
    cpu = codegen.llvm_get_system_cpu()
    if cpu and codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
      return {"kind": "llvm", "mcpu": str(cpu)}
  except (AttributeError, RuntimeError, TypeError):
    pass
  return dict(GENERIC_TARGET)


def has_avx512_vnni() -> bool:
  """Whether this CPU has AVX-512 VNNI (``vpdpbusd``), from /proc/cpuinfo."""
  try:
    with open("/proc/cpuinfo") as f:
      return "avx512_vnni" in f.read()
  except OSError:
    return False


def _target(target):
  tvm, _ = require_tvm()
  if target is None:
    target = host_target()
  if isinstance(target, tvm.target.Target):
    return target
  if isinstance(target, str):
    return tvm.target.Target(target)
  if isinstance(target, Mapping):
    return tvm.target.Target(dict(target))
  raise TypeError(f"target must be a TVM target dict (e.g. {GENERIC_TARGET}); got {target!r}")


def _check_kind(kind):
  if kind not in ("llvm", "cuda"):
    raise ValueError(f"unsupported target kind {kind!r}: use llvm or cuda")
  return kind


def _load_cuda_runtime():
  """Loads TVM's CUDA runtime library (the loader of CUDA modules). A full TVM loads it at
  import; a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1`` or no compiler library) does not."""
  from tvm.base import _LOADED_LIBS

  if "tvm_runtime_cuda" in _LOADED_LIBS:
    return
  from pathlib import Path

  from tvm_ffi.libinfo import load_lib_ctypes

  runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
  try:
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
        package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
        mode="RTLD_LOCAL")
  except (OSError, RuntimeError) as e:
    raise RuntimeError(
        f"no CUDA device: TVM's CUDA runtime (libtvm_runtime_cuda) did not load ({e}); a CUDA "
        "module can be compiled here (grassq.deploy.export) but not run.") from e
  import tvm

  if tvm.base._RUNTIME_ONLY:
    _register_runtime_cuda_compiler(tvm)


def _register_runtime_cuda_compiler(tvm):
  """A module's CUDA kernels are compiled when it is loaded, by the global function
  ``tvm_callback_cuda_compile``. TVM's own one asks the compiler library's current Target for
  the GPU architecture, which a runtime-only TVM lacks; this one names the architecture of the
  GPU at hand and compiles with NVRTC (the ``cuda-bindings`` package)."""
  import tvm_ffi
  from tvm.support import nvcc

  @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
  def _compile(code, *_):
    dev = tvm.cuda(0)
    if not dev.exist:
      raise RuntimeError("no CUDA device to compile this module's kernels for")
    arch = "sm_" + dev.compute_version.replace(".", "")
    return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")


def _device(kind):
  tvm = require_tvm_runtime()
  if _check_kind(kind) == "llvm":
    return tvm.cpu(0)
  if kind == "cuda":
    _load_cuda_runtime()
    dev = tvm.cuda(0)
    if not dev.exist:
      raise RuntimeError(
          "no CUDA device: TVM found no GPU or CUDA driver (libcuda) on this machine, so a CUDA "
          "module can be compiled (grassq.deploy.export) but not run here.")
    return dev


class Deployed:
  """A compiled integer program: ``module(x_int8) -> int32 logits`` as numpy arrays.

  Attributes:
    executable: the `tvm.runtime.Executable` (or loaded `tvm.runtime.Module`).
    input_shape, output_shape: the static (B, H, W, C) and (B, num_classes).
    device: the TVM device it runs on.
  """

  def __init__(self, executable, device, target=None):
    require_tvm_runtime()
    from tvm.runtime.vm import VirtualMachine

    self.executable, self.device, self.target = executable, device, target
    self.vm = VirtualMachine(executable, device)
    in_shape, out_shape = self.vm["io_shapes"]()
    self.input_shape = tuple(int(d) for d in in_shape)
    self.output_shape = tuple(int(d) for d in out_shape)

  def check_input(self, x) -> np.ndarray:
    """x as a C-contiguous int8 numpy array of the compiled shape, or a ValueError."""
    x = np.asarray(x)
    if x.dtype != INPUT_DTYPE or x.shape != self.input_shape:
      raise ValueError(f"the module takes int8 images of shape {self.input_shape} (quantized by "
                       f"program.quantize_input; the batch is fixed at build time); got "
                       f"{x.dtype} {x.shape}")
    return np.ascontiguousarray(x)

  def __call__(self, x) -> np.ndarray:
    tvm = require_tvm_runtime()
    out = self.vm["main"](tvm.runtime.tensor(self.check_input(x), self.device))
    return out.numpy()

  def time(self, x, number: int = 10, repeat: int = 3) -> float:
    """Median seconds per call on `x` (TVM's time evaluator: no Python in the loop; on a GPU
    the input stays on the device and the clock stops when the device has finished)."""
    tvm = require_tvm_runtime()
    arg = tvm.runtime.tensor(self.check_input(x), self.device)
    timer = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
    return float(np.median(timer(arg).results))

  def __repr__(self):
    return (f"Deployed(input int8 {self.input_shape} -> int32 {self.output_shape}, "
            f"device={self.device}, target={self.target})")


def target_has_vnni(target) -> bool:
  """Whether an llvm target's CPU has AVX-512 VNNI (``vpdpbusd``)."""
  tvm, _ = require_tvm()
  target = _target(target)
  if target.kind.name != "llvm":
    return False
  from tvm.target import codegen
  try:
    return bool(codegen.llvm_cpu_has_features("avx512vnni", target))
  except (AttributeError, RuntimeError, TypeError):
    return False


def build(program, target: Mapping[str, Any] | None = None,
          input_shape: Sequence[int] | int | None = None, *, layout: str | None = None,
          schedule: bool = True, tune_dir: str | None = None, trials: int = 0,
          trials_per_task: int | None = None) -> Deployed:
  """Compiles the program with TVM for `target` (default `host_target()`).

  Args:
    program: a `grassq.quant.program.IntegerProgram`.
    target: a TVM target dict (`host_target()`, `GENERIC_TARGET`, `CUDA_T4_TARGET`, ...).
    input_shape: (B, H, W, C) of the int8 input, or the batch size B (default 1).
    layout: "NHWC" or "NCHW16c" (`to_relax`); default NCHW16c on a CPU with AVX-512 VNNI,
      else NHWC.
    schedule: on llvm targets, apply `grassq.deploy.vnni.schedule_module` (no tuning): VNNI
      tensorized convolutions in NCHW16c on a VNNI CPU, fused elementwise kernels everywhere.
    tune_dir: tune with MetaSchedule instead, its database in this directory
      (`grassq.deploy.vnni.tuning_pipeline`); with ``trials=0`` an existing database is applied
      and nothing is tuned.
    trials, trials_per_task: MetaSchedule's total trial budget and per-task cap.

  Returns:
    a `Deployed` module.

  Raises:
    ImportError: without TVM. RuntimeError: a CUDA target on a machine without a CUDA device.
  """
  target = _target(target)
  device = _device(target.kind.name)  # before compiling: fail fast
  executable = _compile(program, target, input_shape, layout=layout, schedule=schedule,
                        tune_dir=tune_dir, trials=trials, trials_per_task=trials_per_task)
  return Deployed(executable, device, str(target))


def _compile(program, target, input_shape, layout=None, **kw):
  layout = default_layout(target) if layout is None else layout
  return compile_relax(to_relax(program, input_shape, layout), target, **kw)


def export(program, path: str, target: Mapping[str, Any] | None = None,
           input_shape: Sequence[int] | int | None = None, **build_kwargs) -> None:
  """Compiles the program as `build` does (same arguments) and writes the shared library to
  `path` atomically, without running it: the target's device need not be on this machine.

  This is how a T4 module is made on a CPU-only machine: ``export(program, "r20_t4.so",
  CUDA_T4_TARGET, 8)`` here, then ``load("r20_t4.so", "cuda")`` on the GPU machine, which needs
  only TVM's runtime (its NVRTC compiles the kernels at load time). Copy ``r20_t4.so.sha256``
  (its SHA-256, checked by `load`) along with it.
  """
  target = _target(target)
  _check_kind(target.kind.name)
  executable = _compile(program, target, input_shape, **build_kwargs)
  _write_library(executable, path)


def default_layout(target) -> str:
  """The activation layout `build` uses for `target`: NCHW16c with AVX-512 VNNI, else NHWC."""
  return "NCHW16c" if target_has_vnni(target) else "NHWC"


def compile_relax(mod, target, *, schedule: bool = True, tune_dir: str | None = None,
                  trials: int = 0, trials_per_task: int | None = None):
  """`tvm.compile` of a lowered Relax module the way `build` does it (same arguments); also
  used for the one-layer modules of `grassq.deploy.latency_table`."""
  tvm, _ = require_tvm()
  from grassq.deploy import vnni

  target = _target(target)
  if tune_dir is not None:
    if target.kind.name == "llvm" and "num-cores" not in target.attrs:
      # MetaSchedule refuses a CPU target that does not state its core count
      target = tvm.target.Target(dict(target.export(), **{"num-cores": os.cpu_count() or 1}))
    mod = vnni.tuning_pipeline(target, tune_dir, trials, trials_per_task)(mod)
    return tvm.compile(mod, target)
  if target.kind.name == "llvm" and schedule:
    pipeline = vnni.scheduled_pipeline(target, tensorize=target_has_vnni(target))
    return tvm.compile(mod, target, relax_pipeline=pipeline)
  return tvm.compile(mod, target)


def _write_library(executable, path: str) -> None:
  """The shared library, atomically, then its SHA-256 beside it (``path.sha256``). A kill
  between the two leaves a library whose record is missing or stale: `load` refuses it."""
  with files.atomic_path(path, ".so") as tmp:
    executable.export_library(tmp)
  files.write_checksum(path)


def save(module: Deployed, path: str) -> None:
  """Writes the compiled module to `path` as one shared library (needs a C compiler to link),
  atomically, and its SHA-256 to ``path + ".sha256"`` (`grassq.files.write_checksum`)."""
  _write_library(module.executable, path)


def load(path: str, device: str = "cpu") -> Deployed:
  """Reads a module written by `save` or `export`, with TVM's runtime alone.

  The library's SHA-256 is checked against the one `save` / `export` wrote beside it before
  TVM maps the library: a damaged library is never run (cut short, it kills the process with
  SIGBUS; with flipped bytes it can run and return wrong logits, or die of SIGILL).

  Args:
    path: the ``.so`` file; ``path + ".sha256"`` must be beside it.
    device: "cpu" or "cuda".

  Returns:
    a `Deployed` module.

  Raises:
    FileNotFoundError: no file at `path`. grassq.files.CorruptFileError: the library does not
      match its recorded SHA-256, or the record is missing or damaged (save or export it
      again). RuntimeError: "cuda" on a machine without a CUDA device.
  """
  tvm = require_tvm_runtime()
  if not os.path.exists(path):
    raise FileNotFoundError(f"no compiled module at {path}")
  kind = {"cpu": "llvm", "llvm": "llvm", "cuda": "cuda"}.get(device)
  if kind is None:
    raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")
  try:
    files.verify_checksum(path, "compiled module")
  except files.CorruptFileError as e:
    raise files.CorruptFileError(
        f"{e} (grassq.deploy.save or grassq.deploy.export). It was not loaded: a damaged "
        "library can crash the process or compute wrong logits.") from None
  dev = _device(kind)  # before loading: a CUDA module needs the CUDA runtime's loader
  return Deployed(tvm.runtime.load_module(path), dev)


# ----------------------------------------------------------------------------- CUDA


def cuda_source(program, input_shape: Sequence[int] | int | None = None,
                arch: str = "sm_75") -> str:
  """CUDA C of the program's kernels for `arch`, generated without a GPU, nvcc or NVRTC.

  TVM's CUDA pipeline schedules the kernels with dlight's GPU rules (GEMM tiling in shared memory
  for the convolutions). TVM 0.27 keeps a CUDA module as source until it is loaded on a GPU
  machine, so nothing here needs the CUDA toolkit; `cuda_ptx` compiles the source with nvcc and
  `int8_instructions` counts dp4a and tensor-core mma in either.
  """
  tvm, _ = require_tvm()
  target = _target({"kind": "cuda", "arch": arch})
  executable = tvm.compile(to_relax(program, input_shape), target)
  sources = []

  def visit(mod):
    if mod.kind == "cuda":
      sources.append(mod.inspect_source("cuda"))
    for sub in mod.imports:
      visit(sub)

  visit(executable.mod)
  if not sources:
    raise RuntimeError("TVM produced no CUDA module for this program")
  return "\n".join(sources)


def cuda_ptx(source: str, arch: str = "sm_75") -> str:
  """PTX of `cuda_source`'s CUDA C, compiled by nvcc (needs nvcc on PATH, no GPU).

  TVM 0.27 keeps CUDA modules as source until they are loaded on a GPU machine (where NVRTC from
  ``cuda-bindings``, or nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``, compiles them); this shows what
  the device compiler makes of them, e.g. whether it forms ``dp4a`` on its own.
  """
  tvm, _ = require_tvm()
  import shutil

  if shutil.which("nvcc") is None:
    raise RuntimeError("cuda_ptx needs nvcc (the CUDA toolkit) on PATH")
  from tvm.support import nvcc

  with tvm.target.Target({"kind": "cuda", "arch": arch}):
    ptx = nvcc.compile_cuda(source, target_format="ptx", arch=arch, compiler="nvcc")
  return bytes(ptx).decode()


def int8_instructions(source: str) -> dict:
  """Counts of the int8 fast paths in CUDA C or PTX: dp4a (sm_61+) and integer mma/wmma."""
  kernels = set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\(", source))
  return {
      "kernels": len(kernels),
      "dp4a": len(re.findall(r"__dp4a|dp4a\.", source)),
      "mma": len(re.findall(r"mma\.sync|mma_sync|ptx_mma", source)),
  }
