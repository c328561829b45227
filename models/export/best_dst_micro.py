"""Two one-op models for ToMe's best-dst choice on ONNX Runtime's CUDA EP (benches/sd15_cuda.sh):
ArgMax + GatherElements (what the ToMe pass emits) against TopK(k=1), over fp16 similarity
scores [batch, src, dst]. ORT's CUDA ArgMax casts fp16 to fp32 before cuDNN's reduce; its
TopK(k=1) runs one thread block per row. Which is faster decides the pass's form.

    python models/export/best_dst_micro.py   # writes benches/micro/best_dst_{argmax,topk}.onnx
"""
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUT = Path(__file__).resolve().parents[2] / "benches" / "micro"


def model(name, nodes, inits):
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT16, ["batch", "src", "dst"])
    outs = [
        helper.make_tensor_value_info("best", TensorProto.FLOAT16, ["batch", "src", 1]),
        helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", "src", 1]),
    ]
    g = helper.make_graph(nodes, name, [scores], outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="attune", ir_version=8)
    onnx.checker.check_model(m)
    onnx.save(m, OUT / f"{name}.onnx")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    model(
        "best_dst_argmax",
        [
            helper.make_node("ArgMax", ["scores"], ["index"], axis=-1, keepdims=1),
            helper.make_node("GatherElements", ["scores", "index"], ["best"], axis=-1),
        ],
        [],
    )
    model(
        "best_dst_topk",
        [helper.make_node("TopK", ["scores", "k"], ["best", "index"], axis=-1, largest=1, sorted=1)],
        [helper.make_tensor("k", TensorProto.INT64, [1], [1])],
    )


if __name__ == "__main__":
    main()
