#!/usr/bin/env bash
# The CUDA table: SD1.5-size UNet (random weights), batch 2, fp16, ONNX Runtime's CUDA EP at
# 512 and 1024 px. attune's conversions against ONNX Runtime's Python transformers optimizer
# (its default CUDA fusions + fp16), with PyTorch (diffusers SDPA, and tomesd) in the same run.
# ORT models are timed by one `attune bench` per size, alternating on the same inputs.
#
# On the offline CUDA host (../shared/gpu/README.md), after its chunks are assembled:
#   bash .gpu/bin/assemble.sh && . /tmp/ort/env.sh && export ORT_DYLIB_PATH=/tmp/ort/libonnxruntime.so.1.31.1
#   WHEELS=.gpu/wheels ATTUNE=.gpu/bin/attune benches/sd15_cuda.sh
# WHEELS: diffusers, tomesd (and importlib_metadata) wheels, when the host lacks them; a numpy
# < 2.4 wheel there is used for the peer alone (its attention fusion calls int() on 1-element
# arrays, which numpy 2.4 made an error).
# Work files go to $WORK (default /tmp/sd15cuda; 3.4 GB fp32 + 1.7 GB per fp16 model).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ATTUNE=${ATTUNE:-target/release/attune}
W=${WORK:-/tmp/sd15cuda}
ITERS=${ITERS:-20}
mkdir -p "$W"
PEER_PATH=${PYTHONPATH:-}
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-deps --no-index --target "$W/pylib" $(ls "$WHEELS"/*.whl | grep -v /numpy-)
  export PYTHONPATH="$W/pylib${PYTHONPATH:+:$PYTHONPATH}"
  if ls "$WHEELS"/numpy-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-index --target "$W/peerlib" "$WHEELS"/numpy-*.whl
    PEER_PATH="$W/peerlib"
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
MODEL=$W/sd15/unet.onnx

stamp() { # label, command...: wall time and peak RSS of one step
  local label=$1; shift
  local rc wall kb=0 t0
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "%e %M" -o "$W/$label.time" "$@" > "$W/$label.log" 2>&1; rc=$?
    read -r wall kb < <(tail -1 "$W/$label.time")
  else  # no GNU time on the host: wall time only
    t0=$(date +%s.%N); "$@" > "$W/$label.log" 2>&1; rc=$?
    wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  fi
  printf '%-40s %7.1f s %7.0f MiB  rc=%s\n' "$label" "$wall" "$((kb / 1024))" "$rc"
  [ $rc -eq 0 ] || tail -5 "$W/$label.log"
}

echo "== export (torch legacy exporter, fp32)"
[ -f "$MODEL" ] || "$PY" benches/sd15_cuda_peers.py --export "$W/sd15" --latents 2>&1 | grep -v -i warn
[ -f "$MODEL" ] || { echo "no export: stopping"; exit 1; }

# Before the peer's optimizer loads the CPU: eager PyTorch at 512 px is bound by kernel launches.
# QUICK=1 (a rerun on a short GPU lease): no PyTorch peers, no ablation rows, no opset-23
# Attention row, no fixture numerics. SDPA=1 adds a cuDNN-attention on/off pair at 1024 px.
if [ -z "${QUICK:-}" ]; then
echo "== PyTorch peers: fp16, diffusers SDPA, then tomesd; CUDA events, median of $ITERS"
"$PY" benches/sd15_cuda_peers.py --latents 64 128 --iters "$ITERS" 2>&1 | grep -v -i warn
fi

echo "== compile (wall time, peak RSS)"
# The peer in the background: it is CPU-only and slow; attune compiles meanwhile.
mkdir -p "$W/peer"
( export PYTHONPATH="$PEER_PATH"
  stamp "ORT optimizer unet --float16 --use_gpu" timeout "${PEER_TIMEOUT:-300}" "$PY" -m onnxruntime.transformers.optimizer \
    --input "$MODEL" --output "$W/peer/unet.onnx" --model_type unet --use_external_data_format \
    --opt_level 0 --float16 --use_gpu > "$W/peer.txt" ) &
PEER=$!
FP16="--precision fp16 --keep-io-types"   # the peer keeps fp32 I/O too
# QUICK: only the rows the last runs left open (the default, ToMe and ToDo, fixed shapes, CUDA graphs).
if [ -z "${QUICK:-}" ]; then
stamp "attune fp16 (no fusion)" $ATTUNE compile "$MODEL" -o "$W/fp16/unet.onnx" --target cpu $FP16
stamp "attune flash fp16 (no GroupNorm)" $ATTUNE compile "$MODEL" -o "$W/mha/unet.onnx" --target cpu $FP16 --attention flash
# Ablations: with packed QKV/KV projections (opt-in); with only GroupNorm + NhwcConv (the
# residual and GEGLU fusions left out).
stamp "attune cuda flash packed fp16" $ATTUNE compile "$MODEL" -o "$W/packed/unet.onnx" --target cuda $FP16 --attention flash \
  --enable-fusions packed-qkv
stamp "attune cuda flash gn+conv fp16" $ATTUNE compile "$MODEL" -o "$W/gnconv/unet.onnx" --target cuda $FP16 --attention flash \
  --disable-fusions skip-group-norm,skip-layer-norm,bias-add,bias-split-gelu,static-reshapes,sink-transposes
stamp "attune cuda onnx-attention fp16" $ATTUNE compile "$MODEL" -o "$W/onnx/unet.onnx" --target cuda $FP16 --attention onnx
stamp "attune cuda flash nosink fp16" $ATTUNE compile "$MODEL" -o "$W/nosink/unet.onnx" --target cuda $FP16 --attention flash \
  --disable-fusions sink-transposes
# Idle hooks: capture and P2P keep the cross sites unfused; the self sites fuse with their controls.
stamp "attune cuda flash hooks fp16" $ATTUNE compile "$MODEL" -o "$W/hooks/unet.onnx" --target cuda $FP16 --attention flash \
  --hooks capture,p2p,masactrl
fi
stamp "attune cuda flash fp16" $ATTUNE compile "$MODEL" -o "$W/flash/unet.onnx" --target cuda $FP16 --attention flash
stamp "attune cuda flash+tome0.5 fp16" $ATTUNE compile "$MODEL" -o "$W/tome/unet.onnx" --target cuda $FP16 --attention flash --tome 0.5
# ToDo with dynamic shapes only in the full run (QUICK times its fixed-shape CUDA-graph rows).
[ -n "${QUICK:-}" ] || stamp "attune cuda flash+todo fp16" $ATTUNE compile "$MODEL" -o "$W/todo/unet.onnx" --target cuda $FP16 \
  --attention flash --tome-mode todo
# Fixed shapes (one model per size): no size computed at run time, so no node on the CPU and
# the session can replay a CUDA graph.
for latent in 64 128; do
  FIX="--fix-shapes sample=2x4x${latent}x${latent},sequence=77"
  stamp "attune cuda flash fixed $latent fp16" $ATTUNE compile "$MODEL" -o "$W/fixed$latent/unet.onnx" --target cuda $FP16 \
    --attention flash $FIX
  stamp "attune cuda flash+tome fixed $latent fp16" $ATTUNE compile "$MODEL" -o "$W/tomefixed$latent/unet.onnx" --target cuda \
    $FP16 --attention flash --tome 0.5 $FIX
  stamp "attune cuda flash+todo fixed $latent fp16" $ATTUNE compile "$MODEL" -o "$W/todofixed$latent/unet.onnx" --target cuda \
    $FP16 --attention flash --tome-mode todo $FIX
done
wait $PEER; cat "$W/peer.txt"

DIMS="--dim batch=2 --dim sequence=77"
for latent in 64 128; do
  # The models of one size, lettered A, B, ... as `attune bench` reports them.
  MODELS=(); GRAPH=(); LEGEND=""
  add() { # path, description[, graph]
    [ -f "$1" ] || return 0
    local letter; letter=$(printf "\\$(printf %o $((65 + ${#MODELS[@]})))")
    MODELS+=("$1"); LEGEND+="   $letter: $2${3:+ (CUDA graph)}"$'\n'
    [ -n "${3:-}" ] && GRAPH+=("$letter")
  }
  add "$W/fp16/unet.onnx" "fp16 only"
  add "$W/mha/unet.onnx" "+ MultiHeadAttention"
  add "$W/flash/unet.onnx" "--target cuda --attention flash (default fusions)"
  add "$W/tome/unet.onnx" "the same + ToMe 0.5"
  add "$W/todo/unet.onnx" "the same + ToDo (2x2 average keys/values)"
  add "$W/hooks/unet.onnx" "the same + --hooks capture,p2p,masactrl (idle)"
  add "$W/packed/unet.onnx" "the same + packed QKV/KV"
  add "$W/gnconv/unet.onnx" "the same with only GroupNorm + NhwcConv"
  add "$W/nosink/unet.onnx" "the same without sink-transposes (74 Transposes left)"
  add "$W/fixed$latent/unet.onnx" "--target cuda --attention flash --fix-shapes"
  add "$W/fixed$latent/unet.onnx" "--target cuda --attention flash --fix-shapes" graph
  add "$W/tomefixed$latent/unet.onnx" "the same + ToMe 0.5" graph
  add "$W/todofixed$latent/unet.onnx" "the same + ToDo (2x2 average keys/values)" graph
  add "$W/peer/unet.onnx" "ORT optimizer (fp16, default fusions)"
  echo "== ORT CUDA, $((latent * 8)) px (latent ${latent}x${latent}), batch 2"
  printf '%s' "$LEGEND"
  VS=(); for m in "${MODELS[@]:1}"; do VS+=(--vs "$m"); done
  GRAPHS=(); [ ${#GRAPH[@]} -gt 0 ] && GRAPHS=(--cuda-graph "$(IFS=,; echo "${GRAPH[*]}")")
  $ATTUNE bench "${MODELS[0]}" "${VS[@]}" "${GRAPHS[@]}" --ep cuda $DIMS \
    --dim height=$latent --dim width=$latent --iters "$ITERS" --warmup 3
done
if [ -z "${QUICK:-}" ]; then
echo "== ORT CUDA, 512 px: A --target cuda flash (MultiHeadAttention), B --target cuda onnx (opset-23 Attention)"
$ATTUNE bench "$W/flash/unet.onnx" --vs "$W/onnx/unet.onnx" --ep cuda $DIMS --dim height=64 --dim width=64 \
  --iters "$ITERS" --warmup 3
fi
PEER_VS=(); [ -f "$W/peer/unet.onnx" ] && PEER_VS=(--vs "$W/peer/unet.onnx")
# SDPA=1: which attention kernels MultiHeadAttention gets (recent ORT may prefer cuDNN's on
# SM >= 90 by itself); the same setting for both models.
if [ -n "${SDPA:-}" ]; then
  for v in 0 1; do
    echo "== 1024 px, ORT_ENABLE_CUDNN_FLASH_ATTENTION=$v: A --target cuda flash, B ORT optimizer"
    ORT_ENABLE_CUDNN_FLASH_ATTENTION=$v $ATTUNE bench "$W/flash/unet.onnx" "${PEER_VS[@]}" --ep cuda $DIMS \
      --dim height=128 --dim width=128 --iters "$ITERS" --warmup 3 | tail -4
  done
fi
# ToMe's best dst per src: the pass emits ArgMax (ORT's CUDA kernel casts fp16 to fp32 first);
# TopK(k=1) is the alternative. One-op models (models/export/best_dst_micro.py), merge sizes of
# 512 and 1024 px.
for sizes in "3072 1024" "12288 4096"; do
  set -- $sizes
  echo "== ToMe's best dst, fp16 scores [2, $1, $2]: A ArgMax + GatherElements, B TopK(k=1)"
  $ATTUNE bench benches/micro/best_dst_argmax.onnx --vs benches/micro/best_dst_topk.onnx --ep cuda \
    --dim batch=2 --dim src=$1 --dim dst=$2 --iters 50 --warmup 5 | tail -4
done
echo "== where the time goes at 1024 px: A --target cuda flash, B the same + ToMe 0.5 (fixed shapes), C the same + ToDo, D ORT optimizer"
echo "   (CUDA_LAUNCH_BLOCKING=1, no CUDA graphs: per-node times)"
TOME_VS=(); for m in tomefixed128 todofixed128; do [ -f "$W/$m/unet.onnx" ] && TOME_VS+=(--vs "$W/$m/unet.onnx"); done
CUDA_LAUNCH_BLOCKING=1 $ATTUNE bench "$W/flash/unet.onnx" "${TOME_VS[@]}" "${PEER_VS[@]}" --ep cuda $DIMS --dim height=128 --dim width=128 \
  --iters 2 --warmup 2 --profile "$W/profile" --profile-runs 3 | sed -n '/time per op/,$p' | head -40
echo "== numerics on CUDA: fused vs the original (rel L2 of out_sample; sd_widths: of every output)"
[ -n "${QUICK:-}" ] || for m in sd15_legacy sd15_dynamo sdxl_legacy sd15_fp16_legacy sd_widths_legacy sd_widths_dynamo; do
  case $m in sd_widths*) FIXDIMS="--dim batch=2 --dim sequence=16"; FLAGS="";;
             *) FIXDIMS="$DIMS --dim height=16 --dim width=16"; FLAGS="--attention flash";; esac
  for p in fp32 fp16; do
    $ATTUNE compile models/$m/unet.onnx -o "$W/fx/$m-$p.onnx" --target cuda --precision $p $FLAGS > /dev/null
    printf '%-18s %s  ' "$m" "$p"
    $ATTUNE diff --numeric models/$m/unet.onnx "$W/fx/$m-$p.onnx" --ep cuda --tol 5e-3 $FIXDIMS 2>&1 | grep -E "^(out_sample|gated) |rror" | tr -s ' ' | tr '\n' ';'
    echo
  done
done
echo "SD1.5 512 px, --target cuda flash fp16 vs the fp32 export:"
$ATTUNE diff --numeric "$MODEL" "$W/flash/unet.onnx" --ep cuda --tol 5e-3 $DIMS --dim height=64 --dim width=64 2>&1 | grep -i -E "rel|out_sample|error" | tail -2
