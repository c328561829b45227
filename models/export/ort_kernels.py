"""Writes passes/src/lower/ort_cpu_kernels.tsv: what the pinned ONNX Runtime's CPU execution
provider can run, from its own kernel registry, plus the ONNX ops it runs by expanding their
function bodies. attune's target check (passes/src/lower/support.rs) reads it.

    python models/export/ort_kernels.py   # with onnxruntime==1.31.1 (the pinned version) and onnx
"""
import collections
import pathlib

import onnx.defs
import onnxruntime
from onnxruntime.capi import onnxruntime_pybind11_state as ort

OUT = pathlib.Path(__file__).resolve().parents[2] / "passes/src/lower/ort_cpu_kernels.tsv"
FLOATS = {"tensor(float)": "f32", "tensor(float16)": "f16", "tensor(bfloat16)": "bf16", "tensor(double)": "f64"}
FOREVER = 2147483647


def main():
    rows = collections.defaultdict(set)  # (domain, op, since, until) -> float types
    for k in ort.get_all_opkernel_def():
        if k.provider != "CPUExecutionProvider":
            continue
        since, until = k.version_range
        types = {FLOATS[t] for ts in k.type_constraints.values() for t in ts if t in FLOATS}
        rows[(k.domain or "ai.onnx", k.op_name, since, until)] |= types or {"-"}
    kernels = {(d, op) for d, op, _, _ in rows}
    # ONNX ops without a CPU kernel that ORT runs by inlining their function body.
    functions = []
    for s in onnx.defs.get_all_schemas_with_history():
        domain = s.domain or "ai.onnx"
        if domain == "ai.onnx" and (domain, s.name) not in kernels and (s.has_function or s.has_context_dependent_function):
            functions.append((domain, s.name, s.since_version))
    with OUT.open("w") as f:
        f.write(f"# ONNX Runtime {onnxruntime.__version__} CPUExecutionProvider, made by models/export/ort_kernels.py\n")
        f.write("# domain\top\tsince\tuntil\tfloat types (kernel) or 'function' (inlined body)\n")
        for (d, op, since, until), types in sorted(rows.items()):
            f.write(f"{d}\t{op}\t{since}\t{'' if until == FOREVER else until}\t{','.join(sorted(types))}\n")
        for d, op, since in sorted(functions):
            f.write(f"{d}\t{op}\t{since}\t\tfunction\n")
    print(f"wrote {OUT} ({len(rows)} kernels, {len(functions)} function ops)")


if __name__ == "__main__":
    main()
