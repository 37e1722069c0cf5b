#!/usr/bin/env bash
# The GPU checks, run on a GPU machine that has JAX (CUDA) but no registry to install TVM from.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Before: on the CPU machine, `python -m benchmarks.deploy_gpu prepare` (runs/gpu_bundle, or
# packed as runs/gpu_env/bundle.tgz to travel), and a runtime-only TVM in runs/gpu_env: tvm_slim.tgz (the `tvm` package without libtvm_compiler.so,
# 3.6 MB instead of 100 MB) and the apache-tvm-ffi wheel for the GPU machine's Python. Where pip
# works, `pip install apache-tvm` replaces both. Writes OUT_DIR/{gpu.json,gpu.md,retraction*.json,
# *.log}.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out" /tmp/site
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
tar xzf runs/gpu_env/tvm_slim.tgz -C /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  runs/gpu_env/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import jax, tvm; print('jax', jax.__version__, jax.devices(), '| tvm', tvm.__version__,
'runtime only' if tvm.base._RUNTIME_ONLY else 'full')" 2>&1 | tee -a "$out/gpu.txt"
[ -f runs/gpu_env/bundle.tgz ] && { tar xzf runs/gpu_env/bundle.tgz -C runs || exit 1; }
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # TVM allocates on the same GPU
timeout 330 python3 -m benchmarks.deploy_gpu run --bundle runs/gpu_bundle --out "$out" \
  --only r20_w8a8 r18_int8 r20_mixed r20_w4a4 2>&1 | tee "$out/deploy_gpu.log"
for shape in "1000 2048 8" "1000 2048 32"; do
  set -- $shape
  timeout 90 python3 -m benchmarks.retraction --classes "$1" --n "$2" --k "$3" \
    --out "$out/retraction_$1_$2_$3.json" 2>&1 | tee -a "$out/retraction.log"
done
