#!/usr/bin/env bash
# Which attention each tool fuses on the diffusion-transformer fixtures: attune
# (`--attention flash`) against ONNX Runtime's Python transformers optimizer with its
# MMDiT model type (`--model_type mmdit`, for SD3 and Flux). Counts MultiHeadAttention
# nodes and the Softmax nodes left.
#
#   PYTHON=venv/bin/python benches/dit_peer_fusions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ATTUNE=target/release/attune
OUT=$(mktemp -d)
count() { # model, op: how many nodes of that op
  $ATTUNE inspect "$1" --json | "$PYTHON" -c "import json, sys; print(json.load(sys.stdin)['ops'].get('$2', 0))"
}
printf '%-16s %28s %28s\n' fixture "attune: MHA / Softmax left" "ORT mmdit: MHA / Softmax left"
for m in pixart_legacy sd3_legacy sd3_dynamo sd35_legacy sd35_dynamo flux_dynamo; do
  $ATTUNE compile "models/$m/unet.onnx" -o "$OUT/$m/attune.onnx" --attention flash -q
  "$PYTHON" -m onnxruntime.transformers.optimizer --input "models/$m/unet.onnx" \
    --output "$OUT/$m/peer.onnx" --model_type mmdit > "$OUT/$m.log" 2>&1 || tail -2 "$OUT/$m.log"
  printf '%-16s %28s %28s\n' "$m" \
    "$(count "$OUT/$m/attune.onnx" com.microsoft.MultiHeadAttention) / $(count "$OUT/$m/attune.onnx" Softmax)" \
    "$(count "$OUT/$m/peer.onnx" com.microsoft.MultiHeadAttention) / $(count "$OUT/$m/peer.onnx" Softmax)"
done
rm -rf "$OUT"
