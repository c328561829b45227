#!/usr/bin/env bash
# Compile time and peak RSS of the SD1.5-size UNet (3.44 GB fp32, made by
# `python models/export/unets.py --full sd15 --out models/large/sd15`) for CUDA in fp16, the
# deployment compile: `--target cuda --precision fp16 --attention flash`, each pass's time.
#   bash benches/compile_sd15.sh [MODEL]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/large/sd15/unet.onnx}
ATTUNE=${ATTUNE:-target/release/attune}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# shellcheck source=benches/measure.sh
. benches/measure.sh
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
cat "$MODEL" "$(dirname "$MODEL")"/*.pb "$(dirname "$MODEL")"/*.data > /dev/null 2>&1 || true  # page cache warm
measure "attune compile --target cuda --precision fp16 --attention flash" \
  "$ATTUNE" compile "$MODEL" -o "$OUT/unet.onnx" --target cuda --precision fp16 --attention flash
grep -E "^[a-z-]+: .*\(.* ms\)|total" "$OUT/attune compile --target cuda --precision fp16 --attention flash.log"
