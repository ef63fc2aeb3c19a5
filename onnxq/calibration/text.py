"""Calibration feeds for language models from plain text.

:class:`TextReader` turns a text (tokenized by a ``tokenizer.json``, a model folder holding
one, or an ONNX tokenizer: :mod:`onnxq.calibration.tokenizer`) or a ready token-id stream
into feeds of ``seq_len`` consecutive tokens, as the GPTQ/AWQ papers calibrate (random
fixed-length segments of a corpus). The model's other inputs (attention mask, positions,
an empty KV cache) are filled by :class:`~onnxq.calibration.inputs.InputFiller`.

Windows: the token stream is cut into ``len(stream) // seq_len`` non-overlapping,
aligned windows (the tail shorter than ``seq_len`` is dropped); with a BOS id (the
tokenizer's, :func:`~onnxq.calibration.tokenizer.bos_token`, e.g. Gemma's ``<bos>``) each
window is that id and ``seq_len - 1`` stream tokens, as every training text began; ``samples`` of them
are drawn without replacement with ``numpy.random.default_rng(seed)`` and fed in
stream order. If there are fewer windows than ``samples``, all are used (logged).
Same text, tokenizer, ``seq_len``, ``samples`` and ``seed`` give the same feeds.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from onnxq.calibration.inputs import Feed, InputFiller, InputSpec, input_specs, validate_feed
from onnxq.calibration.tokenizer import bos_token, tokenize
from onnxq.errors import OnnxqError

__all__ = ["TextReader", "read_text"]

logger = logging.getLogger(__name__)


def read_text(text_or_path: str | os.PathLike) -> str:
    """``text_or_path`` itself, or the UTF-8 contents of the file it names.

    A ``Path``/``os.PathLike`` is always a file. A ``str`` is a file name when it is a
    single line naming an existing file, else it is the text.
    """
    if isinstance(text_or_path, str) and "\n" not in text_or_path and os.path.isfile(text_or_path):
        text_or_path = Path(text_or_path)
    if isinstance(text_or_path, os.PathLike):
        path = Path(text_or_path)
        if not path.is_file():
            raise OnnxqError(f"calibration text file not found: {path}")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise OnnxqError(f"calibration text {path} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(text_or_path, str):
        raise OnnxqError(f"calibration text must be a str or a path, found {type(text_or_path).__name__}")
    return text_or_path


def _load_token_ids(token_ids) -> np.ndarray:
    if isinstance(token_ids, (str, os.PathLike)):
        path = Path(token_ids)
        if not path.is_file():
            raise OnnxqError(f"token id file not found: {path}")
        try:
            token_ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise OnnxqError(f"cannot read token ids from {path} as .npy ({exc})") from None
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise OnnxqError(f"token ids must be a 1-D integer array, found {ids.dtype} with shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


class TextReader:
    """Calibration feeds of ``seq_len`` tokens from a text (see the module docstring).

    Args:
        text: the text, or a file holding it (see :func:`read_text`); ``None`` with ``token_ids``.
        model_inputs: the model (or its inputs, anything ``input_specs`` takes); the feeds
            hold ``input_ids`` ``[1, seq_len]`` and whatever else the model takes
            (:class:`~onnxq.calibration.inputs.InputFiller`: mask, positions, empty past).
        tokenizer: a ``tokenizer.json``, a folder holding one, or an ONNX tokenizer model.
        token_ids: instead of text and tokenizer: a 1-D integer array or ``.npy`` path.
        seq_len, samples, seed: window length, number of windows, RNG seed.
        chunk_chars: characters per tokenizer call.
        bos: the id each window starts with; ``"auto"``: the tokenizer's BOS when text is
            tokenized by a ``tokenizer.json`` that adds one (:func:`bos_token`), else none.

    Raises:
        OnnxqError: the model needs an input the reader cannot fill, the stream is
            shorter than ``seq_len``, or the first feed does not fit the model.
    """

    def __init__(
        self,
        text: str | os.PathLike | None,
        model_inputs,
        *,
        tokenizer: str | os.PathLike | None = None,
        token_ids: np.ndarray | str | os.PathLike | None = None,
        seq_len: int = 512,
        samples: int = 128,
        seed: int = 0,
        chunk_chars: int = 4096,
        bos: int | str | None = "auto",
    ):
        if seq_len < 1 or samples < 1:
            raise OnnxqError(f"seq_len and samples must be >= 1, got seq_len={seq_len}, samples={samples}")
        if (token_ids is None) == (text is None):
            raise OnnxqError("TextReader needs either text (with a tokenizer) or token_ids, not both")
        if token_ids is None and tokenizer is None:
            raise OnnxqError("TextReader needs a tokenizer model to tokenize text (or pass token_ids)")
        self.specs: list[InputSpec] = input_specs(model_inputs)
        self.filler = InputFiller(self.specs)
        if token_ids is not None:
            self.tokens = _load_token_ids(token_ids)
        else:
            self.tokens = tokenize(read_text(text), tokenizer, chunk_chars)
        if bos == "auto":
            bos = bos_token(tokenizer) if token_ids is None else None
        self.bos = None if bos is None else int(bos)
        if self.bos is not None:
            if seq_len < 2:
                raise OnnxqError(f"seq_len must be >= 2 with a BOS token, got {seq_len}")
            if len(self.tokens) and self.tokens[0] == self.bos:  # the tokenizer's own, at the text's start
                self.tokens = self.tokens[1:]
            logger.info("calibration windows start with BOS id %d", self.bos)
        self.seq_len = seq_len
        self._body = seq_len - (self.bos is not None)
        num_windows = len(self.tokens) // self._body
        if num_windows == 0:
            raise OnnxqError(
                f"the calibration text has {len(self.tokens)} tokens, fewer than seq_len={seq_len}; "
                "give more text or a smaller seq_len"
            )
        if num_windows < samples:
            logger.warning("calibration text has only %d windows of %d tokens; using all of them (asked for %d)",
                           num_windows, seq_len, samples)
            self.starts = np.arange(num_windows) * self._body
        else:
            chosen = np.random.default_rng(seed).choice(num_windows, size=samples, replace=False)
            self.starts = np.sort(chosen) * self._body
        self._next = 0
        validate_feed(self._feed(0), self.specs)

    def _feed(self, index: int) -> Feed:
        start = int(self.starts[index])
        window = self.tokens[start:start + self._body]
        if self.bos is not None:
            window = np.concatenate([np.array([self.bos], np.int64), window])
        return self.filler.feed(window[None, :])

    def __len__(self) -> int:
        return len(self.starts)

    def get_next(self) -> Feed | None:
        if self._next >= len(self.starts):
            return None
        self._next += 1
        return self._feed(self._next - 1)

    def rewind(self) -> None:
        self._next = 0
