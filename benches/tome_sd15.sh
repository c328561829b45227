#!/usr/bin/env bash
# Token merging on the SD1.5-size UNet, ONNX Runtime CPU, batch 2: the original export vs
# `--tome 0.5` vs `--tome-mode todo` at 512 px, and the same with `--attention flash` at
# 1024 px (the unfused attention's 16k x 16k score matrices do not fit in memory there).
# Each candidate runs alternately with its baseline in one process (two 3.4 GB sessions at a
# time fit in 24 GB; more do not).
#
#   PYTHON=venv/bin/python benches/tome_sd15.sh [ITERS_512 [ITERS_1024]]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
I512=${1:-3}
I1024=${2:-2}
MODEL=models/large/sd15/unet.onnx
OUT=models/large/bench/tome
ATTUNE=target/release/attune
[ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
mkdir -p "$OUT"
build() { # name, flags...
  local name=$1; shift
  [ -f "$OUT/$name/unet.onnx" ] || $ATTUNE compile "$MODEL" -o "$OUT/$name/unet.onnx" --weights link "$@" > "$OUT/$name.log"
}
build tome --tome 0.5
build todo --tome-mode todo
build flash --attention flash
build flash_tome --attention flash --tome 0.5
build flash_todo --attention flash --tome-mode todo
DIMS="--dim batch=2 --dim sequence=77"
for m in tome todo; do
  echo "== 512 px (latent 64x64), batch 2: A original, B $m"
  $ATTUNE bench "$MODEL" --vs "$OUT/$m/unet.onnx" $DIMS --dim height=64 --dim width=64 --iters "$I512" --warmup 1
done
for m in flash_tome flash_todo; do
  echo "== 1024 px (latent 128x128), batch 2: A flash, B $m"
  $ATTUNE bench "$OUT/flash/unet.onnx" --vs "$OUT/$m/unet.onnx" $DIMS --dim height=128 --dim width=128 --iters "$I1024" --warmup 1
done
