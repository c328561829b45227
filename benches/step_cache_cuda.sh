#!/usr/bin/env bash
# The CUDA rows of the step-caching table: benches/step_cache_cpu.sh on ONNX Runtime's CUDA EP,
# models compiled for it (--target cuda --precision fp16 --attention flash), at 512 and
# 1024 px, DDIM and DPM-Solver++: the SD1.5-size UNet with DeepCache, PixArt-α XL-2 with the
# first-block cache and TeaCache. The full-size models are exported there with torch
# (models/export/unets.py, dits.py) when absent.
#
# On the CUDA host (../shared/gpu/README.md), after its chunks are assembled:
#   bash .gpu/bin/assemble.sh && . /tmp/ort/env.sh && export ORT_DYLIB_PATH=/tmp/ort/libonnxruntime.so.1.31.1
#   ATTUNE=.gpu/bin/attune benches/step_cache_cuda.sh [sd15 pixart]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# SKIP=2: the loop times leave out each run's first two steps, where the GPU warms up the
# computed and the cached branch (they dominated a 512 px run otherwise).
for kind in ${*:-sd15 pixart}; do
  SKIP=2 EP=cuda EXTRA_COMPILE="--target cuda --precision fp16 --attention flash" \
    benches/step_cache_cpu.sh "$kind" "64 128" "${SCHEDULERS:-ddim dpm}"
done
