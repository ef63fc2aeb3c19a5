"""Calibration feeds for language models from plain text.

:class:`TextReader` turns a text (tokenized by an ONNX tokenizer model run with
onnxruntime-extensions custom ops) or a ready token-id stream into feeds of
``seq_len`` consecutive tokens, as the GPTQ/AWQ papers calibrate (random
fixed-length segments of a corpus).

Windows: the token stream is cut into ``len(stream) // seq_len`` non-overlapping,
aligned windows (the tail shorter than ``seq_len`` is dropped); ``samples`` of them
are drawn without replacement with ``numpy.random.default_rng(seed)`` and fed in
stream order. If there are fewer windows than ``samples``, all are used (logged).
Same text, tokenizer, ``seq_len``, ``samples`` and ``seed`` give the same feeds.

Tokenizing: the text is split into chunks of at most ``chunk_chars`` characters at
line ends (a longer line at its last space), each chunk is tokenized by one
session run with a batch of one string, and the ids (where the tokenizer's
``attention_mask`` output, if any, is nonzero) are concatenated. Special tokens
the tokenizer adds per call (e.g. BERT's ``[CLS] ... [SEP]``) stay in the stream.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from onnxq.calibration.readers import Feed, InputSpec, input_specs, validate_feed
from onnxq.errors import OnnxqError

__all__ = ["TextReader", "tokenize", "read_text", "FILLED_INPUTS"]

logger = logging.getLogger(__name__)

FILLED_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
"""The model inputs :class:`TextReader` knows how to fill (``input_ids`` is required)."""


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


def _chunks(text: str, chunk_chars: int) -> list[str]:
    """Pieces of ``text`` of at most ``chunk_chars`` characters, cut after newlines (else spaces)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut < 0:
                cut = text.rfind(" ", start, end)
            if cut >= start:
                end = cut + 1
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p.strip()]


def tokenize(text: str, tokenizer: str | os.PathLike, chunk_chars: int = 4096) -> np.ndarray:
    """Token ids ``[num_tokens]`` int64 of ``text`` by the ONNX tokenizer model at ``tokenizer``.

    The tokenizer takes a 1-D string tensor (its first input) and outputs ``input_ids``
    (or else its first integer output) of any rank, optionally with an
    ``attention_mask`` of the same shape (padding is dropped). Its custom ops come from
    ``onnxruntime_extensions.get_library_path()``.
    """
    import onnxruntime as ort

    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        raise OnnxqError(
            "an ONNX tokenizer needs onnxruntime-extensions (pip install onnxruntime-extensions)"
        ) from None
    path = Path(tokenizer)
    if not path.is_file():
        raise OnnxqError(f"tokenizer model not found: {path}")
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several exception types for a bad model
        raise OnnxqError(f"cannot load tokenizer model {path}: {str(exc).splitlines()[0]}") from None
    first_input = session.get_inputs()[0]
    if first_input.type != "tensor(string)":
        raise OnnxqError(f"tokenizer {path} must take a string tensor, its input {first_input.name!r} is {first_input.type}")
    outputs = {o.name: o.type for o in session.get_outputs()}
    ids_name = "input_ids" if "input_ids" in outputs else next(
        (n for n, t in outputs.items() if t in ("tensor(int64)", "tensor(int32)")), None)
    if ids_name is None:
        raise OnnxqError(f"tokenizer {path} has no integer output (outputs: {', '.join(outputs)})")
    names = [ids_name] + (["attention_mask"] if "attention_mask" in outputs else [])
    parts = []
    for chunk in _chunks(text, chunk_chars):
        result = session.run(names, {first_input.name: np.array([chunk])})
        ids = np.asarray(result[0]).astype(np.int64)
        if len(result) > 1 and np.shape(result[1]) == ids.shape:
            ids = ids[np.asarray(result[1]) != 0]
        parts.append(ids.reshape(-1))
    if not parts:
        raise OnnxqError("the calibration text is empty")
    return np.concatenate(parts)


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
            fill ``input_ids`` ``[1, seq_len]``, and ``attention_mask`` (ones),
            ``position_ids`` (``0..seq_len-1``) and ``token_type_ids`` (zeros) when the
            model has them, in the dtypes the model declares.
        tokenizer: path of an ONNX tokenizer model (onnxruntime-extensions ops).
        token_ids: instead of text and tokenizer: a 1-D integer array or ``.npy`` path.
        seq_len, samples, seed: window length, number of windows, RNG seed.
        chunk_chars: characters per tokenizer call.

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
    ):
        if seq_len < 1 or samples < 1:
            raise OnnxqError(f"seq_len and samples must be >= 1, got seq_len={seq_len}, samples={samples}")
        if (token_ids is None) == (text is None):
            raise OnnxqError("TextReader needs either text (with a tokenizer) or token_ids, not both")
        if token_ids is None and tokenizer is None:
            raise OnnxqError("TextReader needs a tokenizer model to tokenize text (or pass token_ids)")
        self.specs: list[InputSpec] = input_specs(model_inputs)
        unknown = [s.name for s in self.specs if s.name not in FILLED_INPUTS]
        if unknown or "input_ids" not in {s.name for s in self.specs}:
            what = f"model input {unknown[0]!r}" if unknown else "a model without input_ids"
            raise OnnxqError(
                f"TextReader cannot feed {what} (it fills {', '.join(FILLED_INPUTS)}); use another reader"
            )
        if token_ids is not None:
            self.tokens = _load_token_ids(token_ids)
        else:
            self.tokens = tokenize(read_text(text), tokenizer, chunk_chars)
        self.seq_len = seq_len
        num_windows = len(self.tokens) // seq_len
        if num_windows == 0:
            raise OnnxqError(
                f"the calibration text has {len(self.tokens)} tokens, fewer than seq_len={seq_len}; "
                "give more text or a smaller seq_len"
            )
        if num_windows < samples:
            logger.warning("calibration text has only %d windows of %d tokens; using all of them (asked for %d)",
                           num_windows, seq_len, samples)
            self.starts = np.arange(num_windows) * seq_len
        else:
            chosen = np.random.default_rng(seed).choice(num_windows, size=samples, replace=False)
            self.starts = np.sort(chosen) * seq_len
        self._next = 0
        validate_feed(self._feed(0), self.specs)

    def _feed(self, index: int) -> Feed:
        start = int(self.starts[index])
        fill = {
            "input_ids": lambda: self.tokens[start:start + self.seq_len],
            "attention_mask": lambda: np.ones(self.seq_len, np.int64),
            "position_ids": lambda: np.arange(self.seq_len, dtype=np.int64),
            "token_type_ids": lambda: np.zeros(self.seq_len, np.int64),
        }
        feed = {}
        for spec in self.specs:
            dtype = spec.dtype if spec.dtype is not None else np.dtype(np.int64)
            feed[spec.name] = fill[spec.name]().astype(dtype)[None, :]
        return feed

    def __len__(self) -> int:
        return len(self.starts)

    def get_next(self) -> Feed | None:
        if self._next >= len(self.starts):
            return None
        self._next += 1
        return self._feed(self._next - 1)

    def rewind(self) -> None:
        self._next = 0
