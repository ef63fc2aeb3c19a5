"""Self-generated calibration text: token ids that the float language model samples itself.

Calibration data from one text domain fits GPTQ's Hessians and AWQ's scales to that domain
(onnxq's int4 tables: GPTQ calibrated on Python documentation loses to RTN on Shakespeare).
Text the model writes itself follows the model's own distribution instead, with no user data
at all. This is the data-free calibration of LLM-QAT (Liu et al., arXiv 2305.17888) and the
"self-calibration" of Williams et al. (arXiv 2410.17170), who found it as good as or better
than real-text calibration sets.

:func:`generate_token_ids` samples ``samples`` sequences of ``seq_len`` tokens: each starts with
``start`` (the model's BOS; ``None``: a token drawn uniformly from the vocabulary, as LLM-QAT
does) and continues by ancestral sampling at ``temperature`` from the model's next-token
distribution, ``batch`` sequences at a time. A KV-cache model (``past_key_values.N.key/value``
inputs with ``present.N.key/value`` outputs, no sliding window) decodes one token per step
through its cache; any other causal LM recomputes the whole prefix each step (quadratic in
``seq_len``: fine for small models and tests). The same model, settings and ``seed`` give the
same ids.

:func:`start_token` finds the model's BOS id for a model file or folder.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.calibration.lm_session import LMSession
from onnxq.calibration.tokenizer import TOKENIZER_JSON, bos_token
from onnxq.errors import OnnxqError

__all__ = ["generate_token_ids", "start_token"]

logger = logging.getLogger(__name__)

Progress = Callable[..., Iterable[Any]]


def start_token(model_path: str | os.PathLike) -> int | None:
    """The BOS id of the model at ``model_path`` (a model file or its folder), None when none is named.

    In order: the BOS that the folder's ``tokenizer.json`` puts before every text (Gemma's ``<bos>``),
    ``model.bos_token_id`` of a GenAI ``genai_config.json``, ``bos_token_id`` of ``config.json``,
    and the ``bos_token`` of ``tokenizer_config.json`` looked up in ``tokenizer.json``.
    """
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    tokenizer = folder / TOKENIZER_JSON
    if tokenizer.is_file():
        bos = bos_token(tokenizer)
        if bos is not None:
            return bos
    for name, keys in (("genai_config.json", ("model", "bos_token_id")), ("config.json", ("bos_token_id",))):
        value = _json_value(folder / name, keys)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = _json_value(folder / "tokenizer_config.json", ("bos_token",))
    text = text.get("content") if isinstance(text, dict) else text
    if isinstance(text, str) and tokenizer.is_file():
        vocab = _json_value(tokenizer, ("model", "vocab"))
        added = _json_value(tokenizer, ("added_tokens",)) or []
        ids = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
        if isinstance(vocab, dict):
            ids = {**vocab, **ids}
        if isinstance(ids.get(text), int):
            return int(ids[text])
    return None


def _json_value(path: Path, keys: tuple[str, ...]) -> Any:
    """``data[keys[0]][keys[1]]...`` of the JSON file ``path``; None when absent or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class _Sampler:
    """A causal LM (:class:`~onnxq.calibration.lm_session.LMSession`) run a step at a time, through its KV
    cache when it has one without a sliding window (see the module docstring)."""

    def __init__(self, model: Any, threads: int | None):
        self.lm = LMSession(model, None, "float", threads=threads)
        past = self.lm.filler.past
        self.cached = (self.lm.filler.has_past and not any(p.capacity for p in past)
                       and all(p.present in self.lm.outputs for p in past))
        self.names = [self.lm.output] + ([p.present for p in past] if self.cached else [])
        self.past: dict[str, np.ndarray] | None = None

    def first(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``[batch, vocab]`` after the prefix ``ids: [batch, seq]`` (an empty cache)."""
        self.past = None
        return self._run(ids, None)

    def next(self, ids: np.ndarray, new: np.ndarray) -> np.ndarray:
        """Logits ``[batch, vocab]`` after ``ids`` extended by ``new: [batch, 1]`` (the cache, when there is one)."""
        if self.cached:
            return self._run(new, self.past)
        return self._run(np.concatenate([ids, new], axis=1), None)

    def _run(self, ids: np.ndarray, past: dict[str, np.ndarray] | None) -> np.ndarray:
        try:
            result = self.lm.session.run(self.names, self.lm.filler.feed(ids, past))
        except Exception as exc:  # onnxruntime's own error types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxqError(f"onnxruntime failed generating calibration text: {reason}") from None
        logits = result[0]
        self.lm.check_logits(logits, ids.shape[0], ids.shape[1])
        if self.cached:
            self.past = {p.name: value for p, value in zip(self.lm.filler.past, result[1:])}
        return logits[:, -1]


def _sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """One id per row of ``logits: [batch, vocab]`` from ``softmax(logits / temperature)`` -> ``[batch, 1]`` int64.

    Inverse-CDF sampling in float64, in place on one copy: the id is the number of cumulative weights
    ``<= u * total`` (a binary search: the cumulative sum of ``exp >= 0`` never decreases).

    Raises:
        OnnxqError: the logits hold NaN or +inf.
    """
    scaled = logits.astype(np.float64)
    if temperature != 1:
        scaled /= temperature
    with np.errstate(invalid="ignore"):  # inf - inf: the NaN it makes is refused below
        scaled -= scaled.max(axis=-1, keepdims=True)
    np.exp(scaled, out=scaled)
    cumulative = np.cumsum(scaled, axis=-1, out=scaled)
    totals = cumulative[:, -1]
    if not np.all(np.isfinite(totals)):
        raise OnnxqError("the model's logits hold NaN or +inf: no next token can be sampled from them")
    draws = rng.random(logits.shape[0]) * totals
    ids = [np.searchsorted(row, draw, side="right") for row, draw in zip(cumulative, draws)]
    return np.minimum(ids, logits.shape[-1] - 1).astype(np.int64)[:, None]


def generate_token_ids(
    model: str | os.PathLike | Any,
    *,
    samples: int = 128,
    seq_len: int = 512,
    start: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch: int = 8,
    threads: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """``samples`` sequences of ``seq_len`` tokens sampled by the causal LM ``model`` (see the module docstring).

    Args:
        model: an ``.onnx`` path or an onnxruntime ``InferenceSession`` of a model with an
            ``input_ids`` input and ``logits [batch, seq, vocab]`` (first) output; the other inputs
            are filled as for calibration (mask, positions, KV cache).
        samples, seq_len: how many sequences, and their length (the start token included).
        start: every sequence's first id (the model's BOS: :func:`start_token`); None draws it
            uniformly from the vocabulary.
        temperature: softmax temperature (> 0); 1 samples the model's own distribution.
        seed: seed of ``numpy.random.default_rng``.
        batch: sequences generated together.
        threads: onnxruntime intra-op threads (default: onnxruntime's).
        progress: ``progress(items, desc=, unit=, total=)`` wrapping the decoding steps.

    Returns:
        ``[samples, seq_len]`` int64 token ids.

    Raises:
        OnnxqError: bad settings, a start id outside the vocabulary, a model that is not a causal
            LM onnxq can feed, or an onnxruntime failure.
    """
    for name, value in (("samples", samples), ("seq_len", seq_len), ("batch", batch)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise OnnxqError(f"generating calibration text needs {name} >= 1, got {value!r}")
    if seq_len < 2:
        raise OnnxqError(f"generating calibration text needs seq_len >= 2 (a start token and one generated), "
                         f"got {seq_len}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise OnnxqError(f"the sampling temperature must be a finite number > 0, got {temperature!r}")
    sampler = _Sampler(model, threads)
    rng = np.random.default_rng(seed)
    logger.info("generating %d calibration sequences of %d tokens (%s, temperature %g)", samples, seq_len,
                "through the KV cache" if sampler.cached else "recomputing the prefix each step", temperature)
    vocab = sampler.first(np.zeros((1, 1), dtype=np.int64)).shape[-1]
    if start is not None and not 0 <= start < vocab:
        raise OnnxqError(f"the start token id {start} is outside the model's vocabulary of {vocab}")
    plan = [(first, step) for first in range(0, samples, batch) for step in range(1, seq_len)]
    out = np.empty((samples, seq_len), dtype=np.int64)
    for first, step in (progress(plan, desc="generating calibration text", unit="token", total=len(plan))
                        if progress else plan):
        if step == 1:
            rows = min(batch, samples - first)
            ids = (rng.integers(0, vocab, size=(rows, 1), dtype=np.int64) if start is None
                   else np.full((rows, 1), start, dtype=np.int64))
            logits = sampler.first(ids)
        new = _sample(logits, temperature, rng)
        if step + 1 < seq_len:
            logits = sampler.next(ids, new)
        ids = np.concatenate([ids, new], axis=1)
        if step + 1 == seq_len:
            out[first:first + rows] = ids
    return out

