"""Export all-MiniLM-L6-v2 (sentence-transformer) and its tokenizer to ONNX, offline.

Writes ``models/real/minilm/``:

* ``model.onnx``: ``input_ids, attention_mask`` int64 ``[batch, seq]`` ->
  ``last_hidden_state`` float32 ``[batch, seq, 384]`` and ``sentence_embedding``
  float32 ``[batch, 384]`` (mean over non-padding tokens, then L2-normalized,
  as sentence-transformers' Pooling + Normalize modules do). TorchScript
  exporter, every Linear is a MatMul with a constant ``[K, N]`` initializer B.
* ``tokenizer.onnx``: onnxruntime-extensions pre-processing model
  (string ``[n]`` -> ``input_ids``, ``attention_mask``, ...); needs
  ``onnxruntime_extensions.get_library_path()`` registered in the session.
* ``sentences.txt``: the check sentences (pydoc eval split + 3 hand-written).

Checks (logged): ONNX vs torch and vs sentence-transformers' ``encode()`` max
abs difference, count of MatMuls with an initializer B, tokenizer ids vs the
Hugging Face tokenizer on every paragraph of the pydoc eval split.

    HF_HUB_OFFLINE=1 .venv-export/bin/python scripts/export_minilm.py
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_real_layers_fixture import minilm_dir, passages  # noqa: E402
from text_data import get_text  # noqa: E402

__all__ = ["SentenceEncoder", "count_const_matmuls", "export_model", "export_tokenizer"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
OPSET = 17


class SentenceEncoder(torch.nn.Module):
    """BERT encoder + masked mean pooling + L2 normalization (sentence-transformers layout)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """input_ids, attention_mask: [B, S] -> ([B, S, H], [B, H])."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)


def count_const_matmuls(model: onnx.ModelProto) -> tuple[int, int]:
    """Return ``(MatMuls whose B is an initializer, all MatMuls)`` of the main graph."""
    inits = {i.name for i in model.graph.initializer}
    mm = [n for n in model.graph.node if n.op_type == "MatMul"]
    return sum(n.input[1] in inits for n in mm), len(mm)


def export_model(out: Path, tok, sentences: list[str]) -> None:
    """Export the encoder to ``out`` and check it against torch on ``sentences``."""
    bert = AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32, attn_implementation="eager")
    enc = SentenceEncoder(bert.eval()).eval()
    batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_h, ref_e = enc(*args)
        torch.onnx.export(
            enc, args, str(out), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                          "last_hidden_state": {0: "batch", 1: "seq"}, "sentence_embedding": {0: "batch"}})
    logger.info("exported %s in %.1fs (%.1f MB)", out, time.perf_counter() - t0, out.stat().st_size / 1e6)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    n_const, n_all = count_const_matmuls(proto)
    logger.info("opset %d; MatMul nodes with initializer B: %d of %d MatMuls; Gemm nodes: %d",
                OPSET, n_const, n_all, sum(n.op_type == "Gemm" for n in proto.graph.node))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    h, e = sess.run(None, {"input_ids": args[0].numpy(), "attention_mask": args[1].numpy()})
    m = args[1].numpy().astype(bool)
    logger.info("ORT vs torch: max|dh| (non-padding) %.2e, max|de| %.2e, min cosine %.7f",
                np.abs(h - ref_h.numpy())[m].max(), np.abs(e - ref_e.numpy()).max(),
                (e * ref_e.numpy()).sum(1).min())
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu")
    for group in (sentences, sentences[-3:]):  # a second batch and sequence length
        b = tok(group, padding=True, truncation=True, max_length=256, return_tensors="np")
        feeds = {k: b[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        e = sess.run(["sentence_embedding"], feeds)[0]
        logger.info("ORT sentence_embedding %s vs sentence-transformers encode(): max|d| %.2e",
                    feeds["input_ids"].shape, np.abs(e - st.encode(group)).max())


def export_tokenizer(out: Path, tok, sentences: list[str]) -> None:
    """Export the tokenizer with onnxruntime-extensions and compare ids with ``tok``."""
    from onnxruntime_extensions import gen_processing_models, get_library_path

    # HF BERT: strip_accents=None means "strip when lowercasing"; onnxruntime-extensions
    # reads None as "don't strip" ("café" -> [UNK]), so pass the effective value.
    strip = tok.init_kwargs.get("strip_accents")
    strip = tok.init_kwargs.get("do_lower_case", False) if strip is None else strip
    pre, _ = gen_processing_models(tok, pre_kwargs={"strip_accents": int(bool(strip))})
    onnx.save(pre, str(out))
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    bad = []
    for s in sentences:
        got = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: np.array([s])})))
        ids = np.asarray(got["input_ids"]).reshape(-1)
        want = np.asarray(tok(s)["input_ids"])
        if ids.shape != want.shape or not (ids == want).all():
            bad.append(s)
    logger.info("tokenizer.onnx outputs %s; ids equal to HF tokenizer on %d of %d texts; differ on %s",
                names, len(sentences) - len(bad), len(sentences), [b[:60] for b in bad[:5]])


def main(argv: list[str] | None = None) -> int:
    """Export model and tokenizer to ``--out-dir`` and run the checks."""
    p = argparse.ArgumentParser(description="export all-MiniLM-L6-v2 to ONNX")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "models" / "real" / "minilm")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    sentences = [" ".join(s.split()[:60]) for s in passages(get_text("pydoc", "eval"), 8, min_words=12)]
    sentences += ["The quick brown fox jumps over the lazy dog.", "Héllo, wörld! naïve café 123",
                  "Ünïcödé: Ωmega, straße, 東京, emoji \U0001F600, tab\tand\u00a0nbsp."]
    (args.out_dir / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    export_model(args.out_dir / "model.onnx", tok, sentences)
    paragraphs = [" ".join(q.split()) for q in get_text("pydoc", "eval").split("\n\n") if q.strip()]
    export_tokenizer(args.out_dir / "tokenizer.onnx", tok, sentences + paragraphs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
