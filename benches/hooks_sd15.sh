#!/usr/bin/env bash
# What attention-control hooks cost when idle (fed nothing): the SD1.5-size UNet with
# `--hooks capture,p2p,masactrl` against the original export, ONNX Runtime CPU, alternating.
#
#   PYTHON=venv/bin/python benches/hooks_sd15.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ITERS=${1:-5}
MODEL=models/large/sd15/unet.onnx
OUT=models/large/bench/hooks
ATTUNE=target/release/attune
[ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
mkdir -p "$OUT"
[ -f "$OUT/hooked/unet.onnx" ] || $ATTUNE compile "$MODEL" -o "$OUT/hooked/unet.onnx" --weights link --hooks capture,p2p,masactrl > "$OUT/compile.log"
for spec in "4 32" "2 64"; do
  set -- $spec
  echo "== batch $1 (P2P's [uncond x $(( $1 / 2 )), cond x $(( $1 / 2 ))]), latent $2x$2: A original, B hooked (idle)"
  $ATTUNE bench "$MODEL" --vs "$OUT/hooked/unet.onnx" --dim batch=$1 --dim height=$2 --dim width=$2 --dim sequence=77 --iters "$ITERS" --warmup 1
done
