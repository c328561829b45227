#!/usr/bin/env bash
# What attention-control hooks cost when idle (fed nothing): the SD1.5-size UNet with
# `--hooks capture,p2p,masactrl` against the same model without hooks, ONNX Runtime CPU,
# alternating; once unfused (against the original export) and once with `--attention flash`
# (the self-attention sites fuse with their controls; the cross sites stay unfused).
#
#   PYTHON=venv/bin/python benches/hooks_sd15.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ITERS=${1:-5}
MODEL=models/large/sd15/unet.onnx
OUT=models/large/bench/hooks
ATTUNE=target/release/attune
HOOKS="--hooks capture,p2p,masactrl"
[ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
mkdir -p "$OUT"
compile() { $ATTUNE compile "$MODEL" -o "$OUT/$1/unet.onnx" --weights link --quiet "${@:2}" > "$OUT/$1.log"; }
compile hooked $HOOKS
compile flash --attention flash
compile flash_hooked --attention flash $HOOKS
for spec in "4 32" "2 64"; do
  set -- $spec
  DIMS="--dim batch=$1 --dim height=$2 --dim width=$2 --dim sequence=77 --iters $ITERS --warmup 1"
  echo "== batch $1 (P2P's [uncond x $(( $1 / 2 )), cond x $(( $1 / 2 ))]), latent $2x$2: A original, B hooked (idle)"
  $ATTUNE bench "$MODEL" --vs "$OUT/hooked/unet.onnx" $DIMS
  echo "== batch $1, latent $2x$2: A --attention flash, B --attention flash, hooked (idle)"
  $ATTUNE bench "$OUT/flash/unet.onnx" --vs "$OUT/flash_hooked/unet.onnx" $DIMS
done
