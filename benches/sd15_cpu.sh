#!/usr/bin/env bash
# SD1.5-size UNet on ONNX Runtime CPU: attune's attention modes against the original export
# and ONNX Runtime's Python transformers optimizer (the peer, with its CPU-safe options).
# Compile time and peak RSS with /usr/bin/time; latency with `attune bench`, all models
# alternating in one process on the same inputs.
#
#   PYTHON=venv/bin/python benches/sd15_cpu.sh [ITERS_256 [ITERS_512]]
# SKIP_COMPILE=1 reuses the compiled models of an earlier run (latency only).
# Needs: the release build (cargo build --release), python with onnxruntime==1.31.1 for the peer,
# and the model from `models/export/unets.py --full sd15 --out models/large/sd15` (3.4 GB, never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ITERS_256=${1:-10}
ITERS_512=${2:-3}
MODEL=models/large/sd15/unet.onnx
OUT=models/large/bench
ATTUNE=target/release/attune
[ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
mkdir -p "$OUT"

. benches/measure.sh

if [ -z "${SKIP_COMPILE:-}" ]; then
echo "== compile (wall time, peak RSS)"
for mode in flash onnx; do
  measure "attune compile --attention $mode" $ATTUNE compile "$MODEL" -o "$OUT/$mode/unet.onnx" --attention $mode --target cpu
done
measure "attune compile --attention flash --weights link" $ATTUNE compile "$MODEL" -o "$OUT/flash_link/unet.onnx" --attention flash --weights link
PEER_CPU="--disable_group_norm --disable_skip_group_norm --disable_nhwc_conv --disable_bias_splitgelu --disable_bias_add --disable_packed_kv --disable_packed_qkv"
measure "ORT optimizer --model_type unet (CPU-safe)" "$PYTHON" -m onnxruntime.transformers.optimizer \
  --input "$MODEL" --output "$OUT/peer_cpu/unet.onnx" --model_type unet --use_external_data_format $PEER_CPU
mkdir -p "$OUT/peer_cpu"
measure "ORT optimizer --model_type unet (default)" "$PYTHON" -m onnxruntime.transformers.optimizer \
  --input "$MODEL" --output "$OUT/peer_default/unet.onnx" --model_type unet --use_external_data_format
for m in flash onnx peer_cpu peer_default; do
  printf '%-14s %s\n' "$m" "$($ATTUNE inspect "$OUT/$m/unet.onnx" --json | "$PYTHON" -c 'import json,sys; d=json.load(sys.stdin); o=d["ops"]; print("nodes", d["nodes"], {k: v for k, v in o.items() if "Attention" in k or "Softmax" in k or "Group" in k or "Nhwc" in k})')"
done
echo "== does the peer's default output run on the CPU EP?"
$ATTUNE run "$OUT/peer_default/unet.onnx" --dim batch=2 --dim height=32 --dim width=32 --dim sequence=77 --out "$OUT/run" 2>&1 | tail -2 || true
fi

DIMS="--dim batch=2 --dim sequence=77"
echo "== ORT CPU latency, 256 px (latent 32x32), batch 2: A original, B flash, C onnx, D peer (CPU-safe)"
$ATTUNE bench "$MODEL" --vs "$OUT/flash/unet.onnx" --vs "$OUT/onnx/unet.onnx" --vs "$OUT/peer_cpu/unet.onnx" \
  $DIMS --dim height=32 --dim width=32 --iters "$ITERS_256" --warmup 1
# Four 3.4 GB sessions at 512 px do not fit in 24 GB: each candidate against the original.
for m in flash onnx peer_cpu; do
  echo "== ORT CPU latency, 512 px (latent 64x64), batch 2: A original, B $m"
  $ATTUNE bench "$MODEL" --vs "$OUT/$m/unet.onnx" $DIMS --dim height=64 --dim width=64 --iters "$ITERS_512" --warmup 1
done
