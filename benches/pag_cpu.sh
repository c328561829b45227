#!/usr/bin/env bash
# Perturbed-attention guidance's cost on the SD1.5-size UNet (random weights), ONNX Runtime
# CPU: `attune sample` steps with CFG alone (batch 2), with CFG + PAG (batch 3: the perturbed
# conds' rows) at diffusers' default layers (mid) and at every up-block self-attention, and
# the PAG-gated UNet run without --pag-scale (what idle gates cost). Per run: the mean of the
# steps' wall times after the first (a fresh process each, one after another).
#
#   PYTHON=venv/bin/python benches/pag_cpu.sh [SIZES]   (latent sides: 32 = 256 px, 64 = 512 px)
# EP=cuda and EXTRA_COMPILE="--target cuda ..." run it on another provider (conditioning_cuda.sh);
# the export row is then the export compiled with EXTRA_COMPILE alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SIZES=${1:-"32 64"}
STEPS=${STEPS:-4}
ATTUNE=${ATTUNE:-target/release/attune}
EP=${EP:-cpu}
MODEL=models/large/sd15/unet.onnx
OUT=models/large/bench/pag_$EP
mkdir -p "$OUT"
[ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
if [ -n "${EXTRA_COMPILE:-}" ]; then
  # shellcheck disable=SC2086
  [ -f "$OUT/base/unet.onnx" ] || $ATTUNE compile "$MODEL" -o "$OUT/base/unet.onnx" --weights link $EXTRA_COMPILE > "$OUT/base.log"
  MODEL=$OUT/base/unet.onnx
fi
for v in "mid mid_block.*.attn1" "up up_blocks.*.attn1"; do
  name=${v%% *} globs=${v#* }
  # shellcheck disable=SC2086
  [ -f "$OUT/$name/unet.onnx" ] || $ATTUNE compile models/large/sd15/unet.onnx -o "$OUT/$name/unet.onnx" --weights link \
    ${EXTRA_COMPILE:-} --hooks pag --hooks-layers "$globs" > "$OUT/$name.log"
  grep -h "hooks:" "$OUT/$name.log"
done
"$PYTHON" - "$OUT" <<'PY'
import sys, numpy as np
g = np.random.default_rng(0)
for n in ("cond", "uncond"):
    np.save(f"{sys.argv[1]}/{n}.npy", g.standard_normal((1, 77, 768), dtype=np.float32))
PY
# step NAME MODEL SIZE [flags]: the mean step time after the first.
step() {
  local name=$1 model=$2 size=$3; shift 3
  $ATTUNE sample --unet "$model" --cond "$OUT/cond.npy" --uncond "$OUT/uncond.npy" --steps "$STEPS" \
    --height "$size" --width "$size" --seed 0 --ep "$EP" --out "$OUT/$name" "$@" 2> "$OUT/$name.err" > /dev/null
  "$PYTHON" - "$OUT/$name.err" <<'PY'
import re, sys
t = [float(m) for m in re.findall(r"([0-9.]+) s/step", open(sys.argv[1]).read())][1:]
print(f"{sum(t) / len(t):.4f}")
PY
}
row() { printf "%-5s %-44s %8s %8s\n" "$@"; }
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), attune $(git rev-parse --short HEAD), $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $MODEL, --ep $EP ${EXTRA_COMPILE:-}, $STEPS steps, mean of steps 2..$STEPS"
row px run "s/step" "vs CFG"
for size in $SIZES; do
  px=$((size * 8))
  base=$(step "cfg_$size" "$MODEL" "$size")
  row "$px" "CFG 7.5 (batch 2), the export" "$base" "1.00x"
  for name in mid up; do
    t=$(step "idle_${name}_$size" "$OUT/$name/unet.onnx" "$size")
    row "$px" "CFG, PAG-gated at $name, no --pag-scale" "$t" "$("$PYTHON" -c "print(f'{$t/$base:.2f}x')")"
    t=$(step "pag_${name}_$size" "$OUT/$name/unet.onnx" "$size" --pag-scale 3)
    row "$px" "CFG + PAG 3 at $name (batch 3)" "$t" "$("$PYTHON" -c "print(f'{$t/$base:.2f}x')")"
  done
done
