"""Export the export corpus: the fixtures' networks exported the way other people export them.

Every variant is the same network (same diffusers class and configuration) as one of the
canonical fixtures (`models/sd15_legacy`, `sd2_legacy`, `sdxl_legacy`, `pixart_legacy`,
`sd3_legacy`, `flux_dynamo`), with one difference in initialisation: the normalisation layers
(GroupNorm, LayerNorm, RMSNorm) keep diffusers' default weight 1 / bias 0, as in any model
built from a config, while every other parameter gets the fixtures' perturbation (the same
noise stream, so those weights equal the fixture's). The exporters deduplicate the identical
unit/zero tensors this leaves, which is the point: shared initializers reach their users
through Identity nodes, and constant folding may remove the unit affine. `sd15_pure` is
diffusers' pure default initialisation (no perturbation at all), what a user benchmarking a
random-init model exports.

Variants (`models/corpus/<arch>_<variant>/`):
- `default`: the legacy TorchScript exporter, opset 17, do_constant_folding=True;
- `nofold`: the same with do_constant_folding=False;
- `op14` / `op20`: the legacy exporter at opset 14 (diffusers' conversion script's and optimum's
  default) / opset 20;
- `dynamo`: torch.onnx.export(dynamo=True), opset 18, as the `*_dynamo` fixtures are made;
- `fp16`: model.half() and fp16 inputs, legacy exporter, opset 17 (default SDPA processor);
- `ortbasic`: `default` through onnxruntime's offline optimisation (ORT_ENABLE_BASIC,
  optimized_model_filepath, external initializers);
- `slim`: `default` through onnxslim (or onnxsim), when one is installed;
- `pure` (sd15 only): `default`'s export of the purely default-initialised model.
Flux's `default` is the dynamo exporter's (the legacy exporter cannot export Flux).

Each folder holds `unet.onnx` + `unet.onnx.data` (external data, size_threshold=1024),
`inputs/*.npy` (the inputs it was exported and checked with) and `spec.json` (how it was made,
its inputs, a summary of its graph, onnxruntime's output vs torch's). No reference outputs:
tests compare attune's compiled model with onnxruntime running the variant itself.
`models/corpus/README.md` is written from the spec files.

    python models/export/corpus.py                      # everything
    python models/export/corpus.py --only sd15_default sd15_ortbasic
"""
import argparse
import collections
import filecmp
import hashlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dits  # noqa: E402
import unets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "corpus"

ARCHS = {
    "sd15": {"kind": "unet", "config": unets.TINY_SD1, "fixture": "sd15_legacy"},
    "sd2": {"kind": "unet", "config": unets.TINY_SD2, "fixture": "sd2_legacy"},
    "sdxl": {"kind": "unet", "config": unets.TINY_SDXL, "fixture": "sdxl_legacy"},
    # dynamo: torchlib writes PixArt's `hidden_states.squeeze(1)` (a no-op in torch: 64 tokens)
    # as an unconditional Squeeze, which onnxruntime rejects; recorded as a failure.
    "pixart": {"kind": "dit", "fixture": "pixart_legacy"},
    "sd3": {"kind": "dit", "fixture": "sd3_legacy"},
    "flux": {"kind": "dit", "fixture": "flux_dynamo"},
}

LEGACY17 = {"exporter": "legacy", "opset": 17, "fold": True}
VARIANTS = {
    "default": dict(LEGACY17, how="legacy TorchScript exporter (dynamo=False), opset 17, do_constant_folding=True"),
    "nofold": dict(LEGACY17, fold=False, how="legacy exporter, opset 17, do_constant_folding=False"),
    "op14": dict(LEGACY17, opset=14, how="legacy exporter, opset 14 (diffusers' conversion script, optimum)"),
    "op20": dict(LEGACY17, opset=20, how="legacy exporter, opset 20"),
    "dynamo": {"exporter": "dynamo", "opset": 18, "how": "torch.onnx.export(dynamo=True), opset 18"},
    "fp16": dict(LEGACY17, fp16=True, how="model.half(), fp16 inputs, legacy exporter, opset 17, default SDPA processor"),
    "ortbasic": {"post": "ortbasic", "source": "default",
                 "how": "`default` through onnxruntime's offline optimisation: ORT_ENABLE_BASIC + optimized_model_filepath, external initializers"},
    "slim": {"post": "slim", "source": "default", "how": "`default` through onnxslim.slim, default options (onnxsim.simplify if onnxslim is missing)"},
    "pure": dict(LEGACY17, init="pure", how="legacy exporter, opset 17, folding; diffusers' pure default initialisation (nothing perturbed)"),
}
# Flux: the legacy exporter has no export for torch's rms_norm, so its `default` is dynamo's.
FLUX_DEFAULT = dict(VARIANTS["dynamo"], how="torch.onnx.export(dynamo=True), opset 18 (the legacy exporter cannot export Flux)")
PLAN = {
    "sd15": ["default", "nofold", "op14", "op20", "dynamo", "fp16", "ortbasic", "slim", "pure"],
    "sd2": ["default", "dynamo"],
    "sdxl": ["default", "dynamo"],
    "pixart": ["default", "dynamo"],
    "sd3": ["default", "dynamo"],
    "flux": ["default"],
}
# Why a variant is missing, where known (shown in the README next to the error).
FAILURE_NOTES = {
    "pixart_dynamo": "onnxscript's torchlib writes aten.squeeze.dim as an unconditional Squeeze; "
                     "PixArt's `hidden_states.squeeze(1)` is a no-op in torch at 64 tokens, and the "
                     "Squeeze fails there",
}
INIT_TEXT = {
    "norms_default": "normalisation layers (GroupNorm/LayerNorm/RMSNorm) at diffusers' default weight 1, bias 0; "
                     "every other parameter perturbed as the fixture's (same noise, same values)",
    "pure": "diffusers' default initialisation, nothing perturbed (norm weights 1, norm biases 0, "
            "every other layer as torch/diffusers initialise it)",
}


def variant(arch, name):
    v = FLUX_DEFAULT if (arch, name) == ("flux", "default") else VARIANTS[name]
    return dict({"init": "norms_default"}, **v)


# ---------------------------------------------------------------- building and exporting

def build(arch, init, fp16):
    """(torch module taking the positional inputs, {input name: tensor}, fixture spec)."""
    a = ARCHS[arch]
    dtype = torch.float16 if fp16 else torch.float32
    if a["kind"] == "unet":
        config = a["config"]
        model = unets.build_unet(config, seed=0, init=init)
        if fp16:
            model = model.half()
        specs = unets.input_specs(config)
        inputs = {k: v.to(dtype) for k, v in unets.example_inputs(specs, unets.TEST_DIMS, seed=1).items()}
        wrapper = unets.Wrapper(model, sdxl="text_embeds" in inputs).eval()
        return model, wrapper, inputs, {"class": "UNet2DConditionModel", "config": config}
    cls, config, wrapper_cls, inputs, _ = dits.fixtures()[a["fixture"]]
    model = dits.build(cls, config, init=init)
    if fp16:
        model = model.half()
        inputs = {k: v.to(dtype) for k, v in inputs.items()}
    return model, wrapper_cls(model).eval(), inputs, {"class": cls.__name__, "config": config,
                                                       "wrapper": wrapper_cls}


def save_external(m, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def export_variant(arch, v, model, inputs, info, path):
    a = ARCHS[arch]
    dynamo = v["exporter"] == "dynamo"
    if a["kind"] == "unet":
        dtype = torch.float16 if v.get("fp16") else torch.float32
        unets.export(model, a["config"], v["exporter"], path, unets.TEST_DIMS, dtype,
                     {"opset": v["opset"], "fold": v["fold"]} if not dynamo else {})
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        dits.torch_export(model, info["config"], info["wrapper"], inputs, raw, dynamo=dynamo,
                          opset=v["opset"], fold=v.get("fold", True))
        save_external(onnx.load(str(raw)), path)


def ort_basic(src, path):
    import onnxruntime as ort
    path.parent.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", path.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return "onnxruntime " + ort.__version__


def slim(src, path):
    try:
        import onnxslim
        m = onnxslim.slim(str(src))
        tool = "onnxslim " + onnxslim.__version__
    except ImportError:
        try:
            import onnxsim
        except ImportError:
            return None
        m, ok = onnxsim.simplify(str(src))
        assert ok, "onnxsim could not validate the simplified model"
        tool = "onnxsim " + getattr(onnxsim, "__version__", "?")
    save_external(m, path)
    return tool


# ---------------------------------------------------------------- describing a graph

def describe(path):
    """A summary of the top-level graph: op histogram, Identity/Constant use, the GroupNorm
    pattern after each InstanceNormalization, LayerNorm forms, unit affines."""
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    hist = collections.Counter(n.op_type for n in g.node)

    def origin(name, depth=0):
        """(kind, value) of a tensor: initializer, Identity(initializer), Constant, or node."""
        if name in inits:
            return "initializer", numpy_helper.to_array(inits[name])
        n = producer.get(name)
        if n is None:
            return "graph input", None
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    return "Constant", numpy_helper.to_array(at.t)
            return "Constant", None
        if n.op_type == "Identity" and depth < 4:
            kind, val = origin(n.input[0], depth + 1)
            return "Identity(" + kind + ")", val
        if n.op_type in ("Cast", "Unsqueeze", "Reshape") and depth < 4:
            # value-preserving for the checks made here (all ones / all zeros)
            kind, val = origin(n.input[0], depth + 1)
            return f"{n.op_type}({kind})", val
        return n.op_type, None

    def const_operand(n):
        """The operand of a binary node that is not computed from the graph inputs, if any."""
        for i in n.input:
            kind, val = origin(i)
            if val is not None:
                return kind, val
        return None, None

    def is_all(val, x):
        return val is not None and val.size > 0 and bool(np.all(val.astype(np.float64) == x))

    # GroupNorm as the legacy exporter writes it: Reshape -> InstanceNormalization(scale 1,
    # bias 0, per group) -> Reshape -> Mul(gamma) -> Add(beta).
    gn = collections.Counter()
    gamma_src, beta_src = collections.Counter(), collections.Counter()
    for n in g.node:
        if n.op_type != "InstanceNormalization":
            continue
        gn["instance_normalization"] += 1
        nxt = consumers[n.output[0]]
        while len(nxt) == 1 and nxt[0].op_type in ("Reshape", "Cast"):
            nxt = consumers[nxt[0].output[0]]
        # γ: a Mul by a constant (not SiLU's x·sigmoid(x) where the affine was removed)
        mul = next((c for c in nxt if c.op_type == "Mul" and const_operand(c)[0]), None)
        if mul is None:
            gn["followed_by_" + "+".join(sorted(c.op_type for c in nxt))] += 1
            continue
        gn["followed_by_mul"] += 1
        kind, val = const_operand(mul)
        gamma_src[kind or "computed"] += 1
        gn["gamma_all_ones"] += is_all(val, 1)
        adds = [c for c in consumers[mul.output[0]] if c.op_type == "Add"]
        if adds:
            gn["followed_by_mul_add"] += 1
            kind, val = const_operand(adds[0])
            beta_src[kind or "computed"] += 1
            gn["beta_all_zeros"] += is_all(val, 0)
    # Unit affines anywhere: Mul by an all-ones constant, Add of an all-zeros constant.
    unit = collections.Counter()
    for n in g.node:
        if n.op_type in ("Mul", "Add"):
            kind, val = const_operand(n)
            if (n.op_type == "Mul" and is_all(val, 1)) or (n.op_type == "Add" and is_all(val, 0)):
                unit[f"{n.op_type} by {'ones' if n.op_type == 'Mul' else 'zeros'} via {kind}"] += 1
    identity_in = collections.Counter(origin(n.input[0])[0] for n in g.node if n.op_type == "Identity")
    identity_users = collections.Counter(c.op_type for n in g.node if n.op_type == "Identity"
                                         for c in consumers[n.output[0]])
    ln_scale = collections.Counter()
    for n in g.node:
        if n.op_type == "LayerNormalization" and len(n.input) > 1:
            kind, val = origin(n.input[1])
            ln_scale[kind + (" (ones)" if is_all(val, 1) else "")] += 1
    return {
        "nodes": len(g.node),
        "op_histogram": dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0]))),
        "identity": hist["Identity"],
        "identity_inputs": dict(identity_in),
        "identity_users": dict(identity_users),
        "instance_normalization": hist["InstanceNormalization"],
        "group_normalization": hist["GroupNormalization"],
        "groupnorm_pattern": dict(gn),
        "groupnorm_gamma_source": dict(gamma_src),
        "groupnorm_beta_source": dict(beta_src),
        "layer_normalization": hist["LayerNormalization"],
        "layer_normalization_scale_source": dict(ln_scale),
        "softmax": hist["Softmax"],
        "constant_nodes": hist["Constant"],
        "unit_affine_nodes": dict(unit),
        "initializers": len(g.initializer),
        "initializer_bytes": int(sum(numpy_helper.to_array(t).nbytes for t in g.initializer)),
        "opset_import": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
    }


# ---------------------------------------------------------------- checking

def graph_inputs(path):
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    out = []
    for i in m.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        out.append({"name": i.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
    return out


def check(path, inputs, torch_out):
    import onnxruntime as ort
    onnx.checker.check_model(str(path))
    result = {"check_model": "ok"}
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
        (out,) = sess.run(None, feeds)
        out = out.astype(np.float32)
        rel = float(np.linalg.norm(out - torch_out) / np.linalg.norm(torch_out))
        result["onnxruntime_cpu"] = {"runs": True, "rel_l2_vs_torch": rel,
                                     "finite": bool(np.isfinite(out).all())}
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        result["onnxruntime_cpu"] = {"runs": False, "error": first_line(e)}
    return result


def first_line(e):
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    # onnxruntime's messages quote the C++ source location and signature: drop them
    text = re.sub(r"/onnxruntime_src/\S+:\d+ .*?\) ", "", text)
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[:400]


def versions():
    import diffusers
    import onnxruntime
    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__}
    for mod in ("onnxscript", "onnxslim", "onnxsim"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def dir_size(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# ---------------------------------------------------------------- the corpus

def make(arch, name, cache):
    """Write models/corpus/<arch>_<name>/; returns its spec."""
    v = variant(arch, name)
    out_dir = CORPUS / f"{arch}_{name}"
    path = out_dir / "unet.onnx"
    key = (arch, v.get("init"), bool(v.get("fp16")))
    if key not in cache:
        model, wrapper, inputs, info = build(arch, v["init"], v.get("fp16", False))
        with torch.no_grad():
            torch_out = wrapper(*inputs.values()).float().numpy()
        cache[key] = (model, wrapper, inputs, info, torch_out)
    model, wrapper, inputs, info, torch_out = cache[key]
    shutil.rmtree(out_dir, ignore_errors=True)
    spec = {"arch": arch, "variant": name, "canonical_fixture": f"models/{ARCHS[arch]['fixture']}",
            "class": info["class"]}
    if "post" in v:
        src = CORPUS / f"{arch}_{v['source']}" / "unet.onnx"
        if not src.exists():
            raise RuntimeError(f"needs {src.parent.name}, which was not written")
        src_spec = json.loads((src.parent / "spec.json").read_text())
        tool = (ort_basic if v["post"] == "ortbasic" else slim)(src, path)
        if tool is None:
            print(f"{arch}_{name}: skipped, neither onnxslim nor onnxsim is installed")
            return None
        spec.update({k: src_spec[k] for k in ("exporter", "opset", "do_constant_folding", "dtype")})
        spec.update({"source_variant": f"{arch}_{v['source']}", "post_processing": tool})
    else:
        export_variant(arch, v, model, inputs, info, path)
        spec.update({"exporter": v["exporter"], "opset": v["opset"],
                     "do_constant_folding": v.get("fold", True) if v["exporter"] == "legacy" else None,
                     "dtype": "float16" if v.get("fp16") else "float32"})
    spec.update({"init": v["init"], "init_text": INIT_TEXT[v["init"]],
                 # PixArt's and SD3's LayerNorms have no affine: there these variants' weights
                 # are the canonical fixture's
                 "norm_parameters": len(unets.norm_parameters(model)), "how": v["how"],
                 "attention_processor": "default (SDPA)",
                 "config": {k: (list(x) if isinstance(x, tuple) else x) for k, x in info["config"].items()}})
    (out_dir / "inputs").mkdir(parents=True, exist_ok=True)
    declared = graph_inputs(path)
    for i in declared:
        np.save(out_dir / "inputs" / f"{i['name']}.npy", inputs[i["name"]].numpy())
        i["test_shape"] = list(inputs[i["name"]].shape)
    spec["inputs"] = declared
    spec["outputs"] = [{"name": o.name} for o in onnx.load(str(path), load_external_data=False).graph.output]
    spec.update(check(path, inputs, torch_out))
    if not spec["onnxruntime_cpu"]["runs"] and spec["dtype"] == "float32":
        # an fp32 export onnxruntime cannot run has no reference for the tests: not kept
        raise RuntimeError("exported, but onnxruntime CPU cannot run it: " + spec["onnxruntime_cpu"]["error"])
    spec["graph"] = describe(path)
    fixture = ROOT / ARCHS[arch]["fixture"]
    spec["identical_to_canonical_fixture"] = all(
        (fixture / f).exists() and filecmp.cmp(out_dir / f, fixture / f, shallow=False)
        for f in ("unet.onnx", "unet.onnx.data"))
    spec["versions"] = versions()
    spec["bytes"] = dir_size(out_dir) + len(json.dumps(spec, indent=2)) + 1
    (out_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    ortres = spec["onnxruntime_cpu"]
    ran = f"rel L2 {ortres['rel_l2_vs_torch']:.2e}" if ortres["runs"] else f"ORT CPU FAILS: {ortres['error']}"
    g = spec["graph"]
    print(f"{arch}_{name}: {g['nodes']} nodes, {g['identity']} Identity, {g['instance_normalization']} "
          f"InstanceNorm, {g['softmax']} Softmax, {spec['bytes'] / 1e6:.2f} MB, {ran}")
    return spec


def write_readme(failures):
    rows = []
    for d in sorted(p for p in CORPUS.iterdir() if (p / "spec.json").exists()):
        s = json.loads((d / "spec.json").read_text())
        g, o = s["graph"], s["onnxruntime_cpu"]
        ran = f"{o['rel_l2_vs_torch']:.1e}" if o["runs"] else f"does not run: {o['error']}"
        how = s["how"] + (f" [{s['post_processing']}]" if "post_processing" in s else "")
        how += "; pure init" if s["init"] == "pure" else f"; default norms ({s['norm_parameters']} norm parameters)"
        if s.get("identical_to_canonical_fixture"):
            how += "; **byte-identical to the canonical fixture** (no norm affine to leave at default)"
        pat, gsrc = g["groupnorm_pattern"], g["groupnorm_gamma_source"]
        via = sum(n for k, n in gsrc.items() if "Identity" in k)
        affine = (f"Mul {pat.get('followed_by_mul', 0)}" + (f" ({via} via Identity)" if via else "")
                  + f", Add {pat.get('followed_by_mul_add', 0)}") if g["instance_normalization"] else "–"
        rows.append(f"| `{d.name}` | `{s['canonical_fixture'].removeprefix('models/')}` | {how} | "
                    f"{s['dtype']} | {g['nodes']} | {g['identity']} | {g['instance_normalization']} | "
                    f"{affine} | {g['group_normalization']} | {g['layer_normalization']} | {g['softmax']} | "
                    f"{g['constant_nodes']} | {s['bytes'] / 1e6:.2f} | {ran} |")
    for name, err in sorted(failures.items()):
        note = f" ({FAILURE_NOTES[name]})" if name in FAILURE_NOTES else ""
        rows.append(f"| `{name}` | | **not in the corpus**: {err}{note} | | | | | | | | | | | |")
    files = [f for f in CORPUS.rglob("*") if f.is_file() and f.name != "README.md"]
    total = sum(f.stat().st_size for f in files)
    distinct = sum({hashlib.sha1(f.read_bytes()).hexdigest(): f.stat().st_size for f in files}.values())
    text = f"""# Export corpus

The canonical fixtures' networks exported the way other people export them, to check that
attune compiles every common export form of the same network. Written by
`models/export/corpus.py` (see its docstring); `spec.json` in each folder records how the
variant was made, its inputs, a summary of its graph and onnxruntime's output vs torch's.
There are no reference outputs: tests compare attune with onnxruntime on the variant itself,
fed `inputs/*.npy`.

Initialisation: the normalisation layers (GroupNorm, LayerNorm, RMSNorm) keep diffusers'
default weight 1 / bias 0, every other parameter is perturbed with the fixtures' noise (so it
equals the canonical fixture's value); the exporters deduplicate the identical unit/zero
tensors, feeding the shared ones through Identity nodes or folding them. `sd15_pure` is
diffusers' pure default initialisation, nothing perturbed.

Columns: nodes, Identity, InstanceNormalization (IN) node counts of the top-level graph; IN
affine: the GroupNorm γ Mul / β Add found after the InstanceNormalizations (and how many γ
reach their Mul through an Identity); then GroupNormalization (GN), LayerNormalization (LN),
Softmax and Constant node counts; MB on disk; relative L2 of onnxruntime CPU's output vs
torch's on `inputs/`.

| variant | canonical fixture | how it was made | dtype | nodes | Identity | IN | IN affine | GN | LN | Softmax | Constant | MB | ORT vs torch |
| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |
""" + "\n".join(rows) + f"""

Total: {total / 1e6:.1f} MB on disk, {distinct / 1e6:.1f} MB of distinct files (several
variants write byte-identical `unet.onnx.data`, which git stores once).

    python models/export/corpus.py                 # everything
    python models/export/corpus.py --only sd15_op20
"""
    (CORPUS / "README.md").write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="variants to export, as <arch>_<variant> (default: all)")
    args = ap.parse_args()
    plan = [(a, v) for a, vs in PLAN.items() for v in vs]
    if args.only:
        unknown = set(args.only) - {f"{a}_{v}" for a, v in plan}
        assert not unknown, f"unknown variants: {sorted(unknown)}"
        plan = [(a, v) for a, v in plan if f"{a}_{v}" in args.only]
    CORPUS.mkdir(parents=True, exist_ok=True)
    failures_path = CORPUS / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.exists() else {}
    cache = {}
    for arch, name in plan:
        key = f"{arch}_{name}"
        failures.pop(key, None)
        try:
            make(arch, name, cache)
        except Exception as e:  # noqa: BLE001 - an exporter error is recorded, not fatal
            shutil.rmtree(CORPUS / key, ignore_errors=True)
            failures[key] = first_line(e)
            print(f"{key}: FAILED: {failures[key]}")
    if failures:
        failures_path.write_text(json.dumps(failures, indent=2) + "\n")
    else:
        failures_path.unlink(missing_ok=True)
    write_readme(failures)
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    print(f"models/corpus: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
