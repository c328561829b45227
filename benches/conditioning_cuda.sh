#!/usr/bin/env bash
# The CUDA rows of the PAG and ControlNet tables: benches/pag_cpu.sh and controlnet_cpu.sh on
# ONNX Runtime's CUDA EP, every model compiled for it (--target cuda --precision fp16
# --attention flash), at 512 and 1024 px. The full-size models are exported there with torch
# when absent.
#
# On the CUDA host (../shared/gpu/README.md), after its chunks are assembled:
#   bash .gpu/bin/assemble.sh && . /tmp/ort/env.sh && export ORT_DYLIB_PATH=/tmp/ort/libonnxruntime.so.1.31.1
#   ATTUNE=.gpu/bin/attune benches/conditioning_cuda.sh [pag controlnet]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for kind in ${*:-pag controlnet}; do
  EP=cuda EXTRA_COMPILE="--target cuda --precision fp16 --attention flash" "benches/${kind}_cpu.sh" "64 128"
done
