#!/usr/bin/env bash
# Fusing a rank-64 LoRA (every attention/transformer layer, 192 layers) into the SD1.5-size
# UNet: wall time and peak RSS, with the weights copied and hard-linked.
#
#   PYTHON=venv/bin/python benches/lora_sd15.sh
# Needs the release build and the local SD1.5 export (models/export/unets.py --full sd15).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
MODEL=models/large/sd15/unet.onnx
LORA=models/large/lora_r64.safetensors
OUT=models/large/bench/lora
[ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
[ -f "$LORA" ] || "$PYTHON" models/export/loras.py --sd15-rank 64 --out "$LORA"
mkdir -p "$OUT"
for weights in link copy; do
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" target/release/attune compile "$MODEL" -o "$OUT/$weights/unet.onnx" \
    --lora "$LORA" --weights "$weights" > "$OUT/$weights.log"
  read -r wall kb < "$OUT/time.txt"
  changed=$(du -m "$OUT/$weights/unet.onnx.data" | cut -f1)
  printf 'fuse rank-64 LoRA, --weights %-5s %6.1f s  peak RSS %5d MiB  (%s)\n' "$weights" "$wall" "$((kb / 1024))" "$(head -1 "$OUT/$weights.log")"
done
echo "changed tensors written with --weights link: $(du -h "$OUT/link/unet.onnx.data" | cut -f1)"
