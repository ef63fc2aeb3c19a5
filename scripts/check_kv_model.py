"""Run a KV-cache causal-LM ONNX model with plain onnxruntime and check its cache.

Needs only numpy, onnx and onnxruntime (the main ``.venv`` that onnxq uses), so
the export scripts run it there as a separate process.

Works for both layouts that the exporters write:

* ORT GenAI model builder: ``input_ids``, ``attention_mask``,
  ``past_key_values.N.key|value`` -> ``logits``, ``present.N.key|value``
  (no ``position_ids``: GroupQueryAttention derives positions from the mask);
* Optimum ``text-generation-with-past``: the same plus ``position_ids``.

Checks, for one ``[1, S]`` sequence of token ids:

1. full-sequence forward with zero-length past tensors ``[1, kv_heads, 0,
   head_dim]`` in the model's dtype: logits ``[1, S, vocab]``, finite; presents
   ``[1, kv_heads, S, head_dim]``;
2. cache consistency: the first ``S - k`` tokens with empty past, then the last
   ``k`` tokens with the presents as past: their logits must match the
   full-sequence logits of those positions;
3. optionally, the full-sequence logits against reference logits (``--ref``:
   an ``.npy`` of ``[1, S, vocab]`` from torch).

Prints one JSON object; exits 1 when a check fails its tolerance.

    .venv/bin/python scripts/check_kv_model.py models/kv/genai/model.onnx --ids 1,2,3,4 --ref ref.npy
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["describe", "feeds_for", "run_checks"]

_ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def describe(path: Path) -> dict:
    """Inputs/outputs, op-type counts and how the embedding/lm_head weights are wired."""
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    elem = onnx.helper.tensor_dtype_to_np_dtype
    inits = {i.name: i for i in graph.initializer}
    ops: dict[str, int] = {}
    for n in graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}

    def source(name: str) -> str:
        """The initializer behind ``name``, through Transpose/Cast/Identity."""
        chain = []
        while name not in inits and name in producer and producer[name].op_type in ("Transpose", "Cast",
                                                                                    "Identity", "Reshape"):
            chain.append(producer[name].op_type)
            name = producer[name].input[0]
        if name in inits:
            init = inits[name]
            inner = f"{name} {list(init.dims)} {elem(init.data_type)}"
            for op in chain:
                inner = f"{op}({inner})"
            return inner
        return f"{name} (computed)"

    embed = [f"{n.op_type}({', '.join(source(x) for x in n.input if x and x != 'input_ids')}, input_ids)"
             for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in n.input]
    logits_name = next((o.name for o in graph.output if o.name == "logits"), graph.output[0].name)
    lm_head = [f"{n.op_type}(x, {', '.join(source(x) for x in n.input[1:] if x)})" for n in graph.node
               if n.output[0] == logits_name and n.op_type in ("MatMul", "Gemm", "MatMulNBits")]
    nbits = sorted({tuple((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                          if a.name in ("bits", "block_size", "accuracy_level"))
                    for n in graph.node if n.op_type == "MatMulNBits"})
    const_matmuls = sum(n.op_type == "MatMul" and n.input[1] in inits for n in graph.node)
    data_files = sorted({e.value for i in graph.initializer for e in i.external_data if e.key == "location"})
    return {
        "opset": {(o.domain or "ai.onnx"): o.version for o in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [f"{v.name}: {elem(v.type.tensor_type.elem_type)} {_dims(v)}" for v in graph.input],
        "outputs": [f"{v.name}: {elem(v.type.tensor_type.elem_type)} {_dims(v)}" for v in graph.output],
        "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "matmuls_with_initializer_b": const_matmuls,
        "initializer_dtypes": _dtype_counts(graph.initializer),
        "embedding_gather": embed,
        "lm_head": lm_head,
        "matmulnbits_attributes": [dict(a) for a in nbits],
        "external_data": data_files,
    }


def _dtype_counts(initializers) -> dict:
    counts: dict[str, int] = {}
    for i in initializers:
        if len(i.dims) >= 2:
            name = str(onnx.helper.tensor_dtype_to_np_dtype(i.data_type))
            counts[name] = counts.get(name, 0) + 1
    return counts


def _kv_shape(sess: ort.InferenceSession, path: Path | None = None) -> tuple[int, int]:
    """(kv_heads, head_dim) from the past inputs, or from genai_config.json / config.json beside the model.

    The GenAI builder leaves head_dim symbolic (``kv_cache_dim``).
    """
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    heads, head_dim = past[0].shape[1], past[0].shape[3]
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    if path is not None and (path.parent / "genai_config.json").exists():
        dec = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
        return dec["num_key_value_heads"], dec["head_size"]
    if path is not None and (path.parent / "config.json").exists():
        cfg = json.loads((path.parent / "config.json").read_text())
        return cfg["num_key_value_heads"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    raise ValueError(f"past input {past[0].name} has symbolic heads/head_dim {past[0].shape}; pass --kv-shape")


def feeds_for(sess: ort.InferenceSession, ids: np.ndarray, past: dict | None = None, past_len: int = 0,
              kv_shape: tuple[int, int] | None = None) -> dict:
    """Feeds for ``ids [1, s]`` after ``past_len`` cached tokens (``past``: present name -> array)."""
    heads, head_dim = kv_shape or _kv_shape(sess)
    batch, seq = ids.shape
    feeds = {}
    for inp in sess.get_inputs():
        dtype = _ORT_TO_NP[inp.type]
        if inp.name == "input_ids":
            feeds[inp.name] = ids.astype(dtype)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, past_len + seq), dtype=dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(past_len, past_len + seq, dtype=dtype)[None].repeat(batch, 0)
        elif inp.name.startswith("past_key_values."):
            if past is None:
                feeds[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
            else:
                feeds[inp.name] = past[re.sub(r"^past_key_values\.", "present.", inp.name)]
        else:
            raise ValueError(f"unexpected model input {inp.name} {inp.shape} {inp.type}")
    return feeds


def run_checks(path: Path, ids: np.ndarray, ref: np.ndarray | None, tail: int, atol: float,
               kv_shape: tuple[int, int] | None = None, ref_atol: float | None = None,
               mem_reuse: bool = True) -> dict:
    """The three checks of the module docstring; returns a JSON-ready dict with ``ok``.

    ``atol`` bounds the cache check, ``ref_atol`` (default ``atol``) the reference check.
    ``mem_reuse=False`` turns off ORT's buffer reuse (the GenAI fp16 CPU build needs that to
    decode one token with a cache: "Shape mismatch attempting to re-use buffer" otherwise).
    A run that raises in the cache check is reported (``cache_error``) and fails it.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.enable_mem_reuse = mem_reuse
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    kv_shape = kv_shape or _kv_shape(sess, path)
    out_names = [o.name for o in sess.get_outputs()]
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = dict(zip(out_names, sess.run(None, feeds_for(sess, ids, kv_shape=kv_shape))))
    run_s = time.perf_counter() - t0
    logits = full["logits"]
    seq = ids.shape[1]
    result: dict = {
        "model": str(path), "ids_shape": list(ids.shape), "kv_heads_head_dim": list(kv_shape),
        "mem_reuse": mem_reuse, "load_s": round(load_s, 2), "run_s": round(run_s, 3),
        "logits": f"{logits.dtype} {list(logits.shape)}",
        "presents": sorted({f"{v.dtype} {list(v.shape)}" for k, v in full.items() if k.startswith("present.")}),
        "finite": bool(np.isfinite(logits).all()),
        "max_abs_logit": float(np.abs(logits.astype(np.float32)).max()),
    }
    ok = result["finite"] and logits.shape[:2] == ids.shape
    ok &= all(v.shape[2] == seq for k, v in full.items() if k.startswith("present."))
    # cache consistency: prefix, then the tail with the prefix's presents as past
    k = min(tail, seq - 1)
    result["cache_tail_tokens"] = k
    try:
        pre = dict(zip(out_names, sess.run(None, feeds_for(sess, ids[:, : seq - k], kv_shape=kv_shape))))
        past = {n: v for n, v in pre.items() if n.startswith("present.")}
        step = dict(zip(out_names, sess.run(None, feeds_for(sess, ids[:, seq - k:], past, seq - k, kv_shape))))
    except Exception as exc:  # noqa: BLE001 - reported in the result
        result["cache_error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
        ok = False
    else:
        diff = np.abs(step["logits"].astype(np.float32) - logits[:, seq - k:].astype(np.float32)).max()
        result["cache_vs_full_max_abs_diff"] = float(diff)
        ok &= bool(diff <= atol)
    if ref is not None:
        ref = ref.astype(np.float32)
        got = logits.astype(np.float32)
        result["vs_ref_max_abs_diff"] = float(np.abs(got - ref).max())
        result["vs_ref_mean_abs_diff"] = float(np.abs(got - ref).mean())
        result["vs_ref_argmax_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        result["ref_atol"] = atol if ref_atol is None else ref_atol
        ok &= result["vs_ref_max_abs_diff"] <= result["ref_atol"]
    result["atol"] = atol
    result["ok"] = bool(ok)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--ids", help="comma-separated token ids (default: 1..16)")
    ap.add_argument("--ids-npy", type=Path, help="int64 .npy of token ids, 1-D or [1, S]")
    ap.add_argument("--ref", type=Path, help="reference logits .npy [1, S, vocab]")
    ap.add_argument("--tail", type=int, default=3, help="tokens fed with the cache in check 2")
    ap.add_argument("--atol", type=float, default=1e-4, help="tolerance of the cache check")
    ap.add_argument("--ref-atol", type=float, help="tolerance of the --ref check (default: --atol)")
    ap.add_argument("--kv-shape", help="kv_heads,head_dim when the past inputs leave them symbolic")
    ap.add_argument("--describe", action="store_true", help="also print the graph description")
    ap.add_argument("--no-mem-reuse", action="store_true", help="SessionOptions.enable_mem_reuse = False")
    args = ap.parse_args(argv)
    if args.ids_npy:
        ids = np.load(args.ids_npy).astype(np.int64).reshape(1, -1)
    elif args.ids:
        ids = np.array([[int(x) for x in args.ids.split(",")]], dtype=np.int64)
    else:
        ids = np.arange(1, 17, dtype=np.int64)[None]
    kv_shape = tuple(int(x) for x in args.kv_shape.split(",")) if args.kv_shape else None
    ref = np.load(args.ref) if args.ref else None
    result = run_checks(args.model, ids, ref, args.tail, args.atol, kv_shape, args.ref_atol,
                        mem_reuse=not args.no_mem_reuse)
    if args.describe:
        result["graph"] = describe(args.model)
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
