#!/usr/bin/env bash
# A diffusion transformer at full size on ONNX Runtime CPU: PixArt-α XL-2 (611 M parameters,
# random weights), attune's attention modes against the original export and ONNX Runtime's
# Python transformers optimizer (the peer, `--model_type unet` with its CPU-safe options; it
# has no PixArt model type). Compile time and peak RSS with /usr/bin/time; latency with
# `attune bench`, all models alternating in one process on the same inputs (batch 2, 120
# text tokens).
#
#   PYTHON=venv/bin/python benches/pixart_cpu.sh [ITERS]
# Needs: the release build, python with torch + diffusers (the export) and onnxruntime==1.31.1
# (the peer). The model comes from `models/export/dits.py --full pixart` (2.4 GB, never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ITERS=${1:-5}
MODEL=models/large/pixart/unet.onnx
OUT=models/large/bench_pixart
ATTUNE=target/release/attune
[ -f "$MODEL" ] || "$PYTHON" models/export/dits.py --full pixart --out models/large/pixart
mkdir -p "$OUT"

. benches/measure.sh

echo "== compile (wall time, peak RSS)"
for mode in flash onnx; do
  measure "attune compile --attention $mode" $ATTUNE compile "$MODEL" -o "$OUT/$mode/unet.onnx" --attention $mode --target cpu
done
grep -h '^attention:' "$OUT"/attune*.log | head -2
PEER_CPU="--disable_group_norm --disable_skip_group_norm --disable_nhwc_conv --disable_bias_splitgelu --disable_bias_add --disable_packed_kv --disable_packed_qkv"
mkdir -p "$OUT/peer"
measure "ORT optimizer --model_type unet (CPU-safe)" "$PYTHON" -m onnxruntime.transformers.optimizer \
  --input "$MODEL" --output "$OUT/peer/unet.onnx" --model_type unet --use_external_data_format $PEER_CPU
PEER=(); [ -f "$OUT/peer/unet.onnx" ] && PEER=(--vs "$OUT/peer/unet.onnx")
[ -f "$OUT/peer/unet.onnx" ] && $ATTUNE inspect "$OUT/peer/unet.onnx" | grep -o 'com.microsoft.[A-Za-z]* [0-9]*' | tr '\n' ' ' && echo

for latent in 32 64; do
  echo "== ORT CPU, $((latent * 8)) px (latent ${latent}x${latent}), batch 2: A original, B flash, C onnx${PEER:+, D ORT optimizer}"
  $ATTUNE bench "$MODEL" --vs "$OUT/flash/unet.onnx" --vs "$OUT/onnx/unet.onnx" "${PEER[@]}" \
    --dim batch=2 --dim height=$latent --dim width=$latent --dim sequence=120 --iters "$ITERS" --warmup 1
  [ "$latent" = 32 ] && ITERS=$(( (ITERS + 1) / 2 ))
done
