#!/usr/bin/env bash
# Pass combinations on the SD1.5-size UNet, ONNX Runtime CPU, 256 or 512 px: attune's
# attention + token merging (+ a fused LoRA) against the original export and ONNX Runtime's
# optimizer (CPU-safe options; its output from benches/sd15_cpu.sh). Compile wall time and
# peak RSS with /usr/bin/time; latency with alternating `attune bench` runs: at 256 px one run
# of all four 3.4 GB sessions, at 512 px (where four sessions do not fit in 24 GB) one run per
# model against the original.
#
#   benches/sd15_cpu_combos.sh [ITERS] [PX]
# Needs the release build, the SD1.5 export, the rank-64 LoRA (benches/lora_sd15.sh makes it)
# and models/large/bench/peer_cpu (benches/sd15_cpu.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERS=${1:-10}
PX=${2:-256}
LATENT=$((PX / 8))
MODEL=models/large/sd15/unet.onnx
LORA=models/large/lora_r64.safetensors
OUT=models/large/bench/combos
ATTUNE=target/release/attune
mkdir -p "$OUT"
. benches/measure.sh
echo "== compile (--weights link: unchanged weights are hard-linked)"
measure "flash+tome0.5" $ATTUNE compile "$MODEL" -o "$OUT/flash_tome/unet.onnx" --weights link \
  --attention flash --tome 0.5
measure "lora+flash+tome0.5" $ATTUNE compile "$MODEL" -o "$OUT/lora_flash_tome/unet.onnx" --weights link \
  --lora "$LORA" --attention flash --tome 0.5
DIMS="--dim batch=2 --dim sequence=77 --dim height=$LATENT --dim width=$LATENT"
PEER=models/large/bench/peer_cpu/unet.onnx
if [ "$PX" -le 256 ]; then
  echo "== ORT CPU latency, $PX px (latent ${LATENT}x$LATENT), batch 2: A original, B flash+tome0.5, C lora+flash+tome0.5, D peer (CPU-safe)"
  $ATTUNE bench "$MODEL" --vs "$OUT/flash_tome/unet.onnx" --vs "$OUT/lora_flash_tome/unet.onnx" \
    --vs "$PEER" $DIMS --iters "$ITERS" --warmup 1
else
  for m in "$OUT/flash_tome/unet.onnx" "$OUT/lora_flash_tome/unet.onnx" "$PEER"; do
    echo "== ORT CPU latency, $PX px (latent ${LATENT}x$LATENT), batch 2: A original, B $m"
    $ATTUNE bench "$MODEL" --vs "$m" $DIMS --iters "$ITERS" --warmup 1
  done
fi
