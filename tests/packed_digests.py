"""Digests of what onnxq writes for a fixed set of settings (the refactor guard).

``case_digests()`` quantizes ``models/example.onnx`` and the tiny transformer with
calibration-free settings through the public API (:func:`onnxq.quantize`, and the CLI's
``convert``) and returns, per case, the node list (op, domain, integer/float
attributes) and every initializer's name, dtype, shape and SHA-256 of its bytes.
``tests/data/packed_digests.json`` holds the digests the pre-refactor code (commit
28776f7) wrote; ``python tests/packed_digests.py --write`` regenerates it.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxq  # noqa: E402
from onnxq.cli import main as cli_main  # noqa: E402
from tests.tiny_transformer import make_tiny_transformer  # noqa: E402

DIGESTS = ROOT / "tests" / "data" / "packed_digests.json"

CASES = {
    "int4_b32_sym": {},
    "int4_b128_asym": {"block_size": 128, "symmetric": False},
    "int8_b32_sym": {"bits": 8},
    "int2_b16_asym": {"bits": 2, "block_size": 16, "symmetric": False},
    "int4_per_channel": {"block_size": -1},
    "int4_b32_asym_embeddings": {"symmetric": False, "quantize_embeddings": True},
    "lm_head_int8_override": {"overrides": {"*lm_head*": {"bits": 8}}},
    "qdq_b32_sym": {"format": "qdq"},
    "qdq_b128_asym_embeddings": {"format": "qdq", "block_size": 128, "symmetric": False,
                                 "quantize_embeddings": True},
    "bnb4_nf4_b64": {"format": "bnb4", "block_size": 64},
    "bnb4_fp4_b32": {"format": "bnb4", "quant_type": "fp4"},
    "fpq4_sym": {"format": "fpq4"},
    "fpq4_asym": {"format": "fpq4", "symmetric": False},
    "hqq_asym": {"algorithm": "hqq", "symmetric": False, "block_size": 64},
    "hqq_float_zero_points": {"algorithm": "hqq", "symmetric": False, "hqq": {"zero_point": "float"}},
}
CONVERSIONS = {"int4_b32_asym_embeddings": "qdq", "qdq_b128_asym_embeddings": "nbits"}


def _attr(attr: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attr)
    return value.decode() if isinstance(value, bytes) else (value if isinstance(value, (int, float)) else str(value))


def digest(model: onnx.ModelProto) -> dict:
    """Nodes (op, domain, scalar attributes) and initializers (name, dtype, shape, sha256)."""
    graph = model.graph
    nodes = [[n.op_type, n.domain, sorted((a.name, _attr(a)) for a in n.attribute if a.type in (1, 2))]
             for n in graph.node]
    inits = sorted([t.name, int(t.data_type), list(t.dims), hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()
                   if t.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else t.raw_data).hexdigest()]
                   for t in graph.initializer)
    return {"nodes": nodes, "initializers": inits}


def _models() -> dict[str, onnx.ModelProto]:
    return {"example": onnx.load(str(ROOT / "models" / "example.onnx")),
            "tiny_transformer": make_tiny_transformer(num_layers=2, hidden=64, ffn=160, vocab=97)}


def case_digests(skip: tuple[str, ...] = ()) -> dict:
    """``{model name: {case: digest}}`` for every case not in ``skip`` (and the conversions of some)."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, proto in _models().items():
            results = out.setdefault(model_name, {})
            for case, settings in CASES.items():
                if case in skip:
                    continue
                config = onnxq.QuantConfig.from_dict(settings)
                q = onnxq.quantize(proto, config)
                path = Path(tmp) / f"{model_name}_{case}.onnx"
                onnxq.save(q, path)
                results[case] = digest(onnx.load(str(path)))
                if case in CONVERSIONS:
                    converted = Path(tmp) / f"{model_name}_{case}_to_{CONVERSIONS[case]}.onnx"
                    assert cli_main(["convert", str(path), str(converted), "--to", CONVERSIONS[case]]) == 0
                    results[f"{case}->{CONVERSIONS[case]}"] = digest(onnx.load(str(converted)))
    return out


if __name__ == "__main__":
    if "--write" in sys.argv:
        digests = case_digests()
        DIGESTS.write_text("{\n" + ",\n".join(
            f"{json.dumps(m)}: {{\n" + ",\n".join(f"  {json.dumps(c)}: {json.dumps(digests[m][c], sort_keys=True, separators=(',', ':'))}"
                                             for c in sorted(digests[m])) + "\n}" for m in sorted(digests)) + "\n}\n")
        print(f"wrote {DIGESTS}")
    else:  # compare, the HQQ cases included
        expected = json.loads(DIGESTS.read_text())
        actual = json.loads(json.dumps(case_digests()))
        differ = [(m, c) for m in expected for c in expected[m] if actual[m].get(c) != expected[m][c]]
        print(f"{sum(len(c) for c in expected.values())} cases, {len(differ)} differ: {differ}")
