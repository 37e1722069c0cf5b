"""Deployment of the integer program through TVM (Relax, TVM 0.25-0.27).

`to_relax(program, input_shape)` lowers a `grassq.quant.program.IntegerProgram` to a Relax
IRModule with explicit integer ops; `build(program, target, input_shape)` compiles it and returns
a callable over numpy arrays (int8 images -> int32 logits), bit for bit as
`grassq.quant.program.run`; `save`/`load` write and read compiled modules (a SHA-256 beside
each, checked before the library is mapped), and `export` compiles one for a device this
machine lacks (a T4 module on a CPU-only machine). On a CPU with
AVX-512 VNNI the convolutions run in NCHW16c, tensorized with ``vpdpbusd`` by a hand schedule
(`grassq.deploy.vnni`, no tuning; MetaSchedule tuning is optional). `cuda_source` generates the
CUDA kernels for a T4 (sm_75) without a GPU. `latency_table` times every quantizable layer at
each bit-width on a target, for the ILP's latency budget (`grassq.mixed.cost_tables`).

TVM is an optional dependency (``pip install grassq[tvm]``); this package imports it only when a
function needs it.
"""

from grassq.deploy import onnx_export, vnni
from grassq.deploy.build import (CUDA_T4_TARGET, GENERIC_TARGET, Deployed, build, compile_relax,
                                 cuda_ptx, cuda_source, default_layout, export, has_avx512_vnni,
                                 host_target, int8_instructions, load, save, target_has_vnni)
from grassq.deploy.latency import LayerShape, latency_table, model_layers, program_layers
from grassq.deploy.relax import (LAYOUTS, requantize_module, require_tvm, require_tvm_runtime,
                                 to_relax)

__all__ = [
    "CUDA_T4_TARGET",
    "GENERIC_TARGET",
    "LAYOUTS",
    "Deployed",
    "LayerShape",
    "build",
    "compile_relax",
    "cuda_ptx",
    "cuda_source",
    "default_layout",
    "export",
    "has_avx512_vnni",
    "host_target",
    "int8_instructions",
    "latency_table",
    "load",
    "model_layers",
    "onnx_export",
    "program_layers",
    "requantize_module",
    "require_tvm",
    "require_tvm_runtime",
    "save",
    "target_has_vnni",
    "to_relax",
    "vnni",
]
