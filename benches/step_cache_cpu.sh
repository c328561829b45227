#!/usr/bin/env bash
# Step caching on full-size models (random weights), ONNX Runtime CPU: the sampling loop of
# `attune sample` (20 steps, CFG 7.5, one prompt: batch 2) uncached and cached, and uncached
# with fewer steps of about the cached run's compute (the equal-compute baseline); per run the
# loop's wall time (the sum of its steps), the steps that computed the cached part, and the
# final latents' relative L2 difference from the 20-step uncached run. Each run is a fresh
# process, one after another.
#   sd15:   the SD1.5-size UNet, DeepCache branch 0 at intervals 2 and 3;
#   pixart: PixArt-α XL-2, first-block cache and TeaCache at two thresholds each.
#
#   PYTHON=venv/bin/python benches/step_cache_cpu.sh sd15|pixart [SIZES [SCHEDULERS]]
#   e.g. benches/step_cache_cpu.sh sd15 "32 64" "ddim dpm"   (latent sides: 32 = 256 px, 64 = 512 px)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
KIND=${1:?sd15 or pixart}
SIZES=${2:-"32 64"}
SCHEDULERS=${3:-"ddim dpm"}
ATTUNE=${ATTUNE:-target/release/attune}
EP=${EP:-cpu}
STEPS=20
OUT=models/large/bench/step_cache_${KIND}_$EP
mkdir -p "$OUT"
case $KIND in
  sd15)
    MODEL=models/large/sd15/unet.onnx WIDTH=768 WORDS=77
    [ -f "$MODEL" ] || "$PYTHON" models/export/unets.py --full sd15 --out models/large/sd15
    SPLITS=("deepcache --step-cache deepcache:0")
    RUNS=("deepcache|DeepCache interval 2, branch 0|--cache-interval 2"
          "deepcache|DeepCache interval 3, branch 0|--cache-interval 3") ;;
  pixart)
    MODEL=models/large/pixart/unet.onnx WIDTH=4096 WORDS=120
    [ -f "$MODEL" ] || "$PYTHON" models/export/dits.py --full pixart --out models/large/pixart
    SPLITS=("fb --step-cache first-block" "tea --step-cache teacache")
    # Random weights change far more per step than trained ones: thresholds above the
    # defaults (first-block 0.08, TeaCache 0.25, which skip nothing here).
    FB=${FB:-"0.3 0.6"} TEA=${TEA:-"0.6 1.2"} RUNS=()
    for t in $FB; do RUNS+=("fb|first-block cache, threshold $t|--cache-threshold $t"); done
    for t in $TEA; do RUNS+=("tea|TeaCache, threshold $t|--cache-threshold $t"); done ;;
  *) echo "unknown kind $KIND (sd15 or pixart)" >&2; exit 2 ;;
esac
for s in "${SPLITS[@]}"; do
  name=${s%% *} flags=${s#* }
  # shellcheck disable=SC2086
  [ -f "$OUT/$name/unet.onnx" ] || $ATTUNE compile "$MODEL" -o "$OUT/$name/unet.onnx" --weights link ${EXTRA_COMPILE:-} $flags > "$OUT/$name.log"
  grep -h -E "DeepCache branch|first-block cache:|TeaCache:" "$OUT/$name.log" | cut -c1-220
done
"$PYTHON" - "$OUT" "$WORDS" "$WIDTH" <<'PY'
import sys, numpy as np
g = np.random.default_rng(0)
for n in ("cond", "uncond"):
    np.save(f"{sys.argv[1]}/{n}.npy", g.standard_normal((1, int(sys.argv[2]), int(sys.argv[3])), dtype=np.float32))
PY
# loop NAME MODEL STEPS SIZE SCHED [flags]: runs sample; prints the loop time (sum of the steps),
# the steps run and the steps that computed the cached part.
loop() {
  local name=$1 model=$2 steps=$3 size=$4 sched=$5; shift 5
  local dir="$OUT/$name"
  $ATTUNE sample --unet "$model" --cond "$OUT/cond.npy" --uncond "$OUT/uncond.npy" --steps "$steps" \
    --scheduler "$sched" --height "$size" --width "$size" --seed 0 --ep "$EP" --out "$dir" "$@" 2> "$dir.log" > /dev/null
  "$PYTHON" - "$dir.log" <<'PY'
import os, re, sys
text = open(sys.argv[1]).read()
# SKIP drops the first steps' times (a GPU's warm-up of each branch), from every run alike.
t = [float(m) for m in re.findall(r"([0-9.]+) s/step", text)][int(os.environ.get("SKIP", "0")):]
m = re.search(r"computed on (\d+) steps", text)
print(f"{sum(t):.3f} {len(t)} {m.group(1) if m else len(t)}")
PY
}
diff_from() { # reference.npy candidate.npy
  "$PYTHON" -c "import numpy as np,sys; a=np.load(sys.argv[1]); b=np.load(sys.argv[2]); print(f'{np.linalg.norm(b-a)/np.linalg.norm(a):.4f}')" "$1" "$2"
}
ratio() { "$PYTHON" -c "print(f'{$1/$2:.2f}x')"; }
row() { printf "%-6s %-6s %-40s %9s %8s %9s %12s\n" "$@"; }
echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), attune $(git rev-parse --short HEAD), $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $MODEL, --ep $EP"
row px sched run "loop s" speedup computed "rel L2 vs 20"
for size in $SIZES; do
  for sched in $SCHEDULERS; do
    px=$((size * 8))
    read -r base n _ < <(loop "u20_${size}_$sched" "$MODEL" $STEPS "$size" "$sched")
    ref="$OUT/u20_${size}_$sched/latents.npy"
    row "$px" "$sched" "uncached, $STEPS steps" "$base" "1.00x" "$n/$n" "0"
    for r in "${RUNS[@]}"; do
      IFS='|' read -r split label flags <<< "$r"
      name="$(echo "$label" | tr -c 'a-z0-9' _)${size}_$sched"
      # shellcheck disable=SC2086
      read -r t n c < <(loop "$name" "$OUT/$split/unet.onnx" $STEPS "$size" "$sched" $flags)
      row "$px" "$sched" "$label" "$t" "$(ratio "$base" "$t")" "$c/$n" "$(diff_from "$ref" "$OUT/$name/latents.npy")"
      # Uncached with the steps the cached run's time buys.
      k=$("$PYTHON" -c "print(max(1, round($t / ($base / $STEPS))))")
      read -r t2 _ _ < <(loop "u${k}_${size}_$sched" "$MODEL" "$k" "$size" "$sched")
      row "$px" "$sched" "  uncached, $k steps (equal compute)" "$t2" "$(ratio "$base" "$t2")" "$k/$k" "$(diff_from "$ref" "$OUT/u${k}_${size}_$sched/latents.npy")"
    done
  done
done
