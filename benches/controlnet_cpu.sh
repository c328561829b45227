#!/usr/bin/env bash
# ControlNet on the SD1.5-size UNet (random weights), ONNX Runtime CPU: `attune sample` steps
# (CFG 7.5, one prompt: batch 2) of the UNet alone (its residual inputs fed zeros), the UNet
# and the ControlNet as two sessions (`--controlnet`), and the two merged into one graph
# (`compile --merge-controlnet`); per run the mean step time after the first and the
# process's peak RSS (a fresh process each, one after another).
#
#   PYTHON=venv/bin/python benches/controlnet_cpu.sh [SIZES]   (latent sides: 32 = 256 px, 64 = 512 px)
# EP=cuda and EXTRA_COMPILE="--target cuda ..." run it on another provider (conditioning_cuda.sh):
# the UNet and the ControlNet are then compiled with EXTRA_COMPILE too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SIZES=${1:-"32 64"}
STEPS=${STEPS:-4}
ATTUNE=${ATTUNE:-target/release/attune}
EP=${EP:-cpu}
SRC=models/large/sd15_controlnet
OUT=models/large/bench/controlnet_$EP
mkdir -p "$OUT"
[ -f "$SRC/unet/model.onnx" ] || "$PYTHON" models/export/controlnet.py --full "$SRC"
DIR=$SRC
if [ -n "${EXTRA_COMPILE:-}" ]; then
  DIR=$OUT/compiled
  for part in unet controlnet; do
    # shellcheck disable=SC2086
    [ -f "$DIR/$part/model.onnx" ] || $ATTUNE compile "$SRC/$part/model.onnx" -o "$DIR/$part/model.onnx" --weights link $EXTRA_COMPILE > "$OUT/$part.log"
  done
fi
# shellcheck disable=SC2086
[ -f "$OUT/merged/unet.onnx" ] || $ATTUNE compile "$SRC/unet/model.onnx" -o "$OUT/merged/unet.onnx" --weights link \
  ${EXTRA_COMPILE:-} --merge-controlnet "$SRC/controlnet" > "$OUT/merged.log"
grep -h "merge-controlnet" "$OUT/merged.log"
"$PYTHON" - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
g = np.random.default_rng(0)
for n in ("cond", "uncond"):
    np.save(f"{sys.argv[1]}/{n}.npy", g.standard_normal((1, 77, 768), dtype=np.float32))
Image.fromarray(g.integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB").save(f"{sys.argv[1]}/control.png")
PY
# step NAME MODEL SIZE [flags]: "mean-step-seconds peak-RSS-MiB".
step() {
  local name=$1 model=$2 size=$3; shift 3
  /usr/bin/time -f "%M" -o "$OUT/$name.rss" $ATTUNE sample --unet "$model" --cond "$OUT/cond.npy" \
    --uncond "$OUT/uncond.npy" --steps "$STEPS" --height "$size" --width "$size" --seed 0 --ep "$EP" \
    --out "$OUT/$name" "$@" 2> "$OUT/$name.err" > /dev/null
  "$PYTHON" - "$OUT/$name.err" "$OUT/$name.rss" <<'PY'
import re, sys
t = [float(m) for m in re.findall(r"([0-9.]+) s/step", open(sys.argv[1]).read())][1:]
print(f"{sum(t) / len(t):.4f} {int(open(sys.argv[2]).read().split()[-1]) / 1024:.0f}")
PY
}
row() { printf "%-5s %-46s %8s %8s %10s\n" "$@"; }
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), attune $(git rev-parse --short HEAD), $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $DIR, --ep $EP ${EXTRA_COMPILE:-}, $STEPS steps, mean of steps 2..$STEPS"
row px run "s/step" "vs UNet" "peak RSS"
for size in $SIZES; do
  px=$((size * 8))
  read -r base rss < <(step "unet_$size" "$DIR/unet/model.onnx" "$size")
  row "$px" "UNet alone (residuals zero)" "$base" "1.00x" "$rss MiB"
  read -r t rss < <(step "two_$size" "$DIR/unet/model.onnx" "$size" --controlnet "$DIR/controlnet:1" --control-image "$OUT/control.png")
  row "$px" "UNet + ControlNet, two sessions" "$t" "$("$PYTHON" -c "print(f'{$t/$base:.2f}x')")" "$rss MiB"
  read -r t rss < <(step "merged_$size" "$OUT/merged/unet.onnx" "$size" --controlnet-scale 1 --control-image "$OUT/control.png")
  row "$px" "merged graph (compile --merge-controlnet)" "$t" "$("$PYTHON" -c "print(f'{$t/$base:.2f}x')")" "$rss MiB"
done
