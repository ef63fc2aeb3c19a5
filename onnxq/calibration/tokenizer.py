"""Tokenizers users have: a Hugging Face ``tokenizer.json`` (read with the ``tokenizers`` library), a folder
holding one (a model folder), or an onnxruntime-extensions ONNX tokenizer model.

:func:`tokenize` gives the token ids of a text as the Hugging Face tokenizer does on the
same text (``tokenizer(text)["input_ids"]``, special tokens added as its post-processor
says) for ``tokenizer.json``. An ONNX tokenizer is run with onnxruntime and the
onnxruntime-extensions custom ops, on chunks of at most ``chunk_chars`` characters cut at
line ends (a longer line at its last space); the ids (where its ``attention_mask`` output,
if any, is nonzero) are concatenated, so special tokens it adds per call stay in the stream.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from onnxq.errors import OnnxqError

__all__ = ["bos_token", "find_tokenizer", "tokenize"]

TOKENIZER_JSON = "tokenizer.json"


def find_tokenizer(path: str | os.PathLike) -> Path:
    """The tokenizer file ``path`` names: itself (``.json`` / ``.onnx``), or a folder's ``tokenizer.json``.

    Raises:
        OnnxqError: nothing usable there.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / TOKENIZER_JSON
        if not candidate.is_file():
            raise OnnxqError(f"no {TOKENIZER_JSON} in {path} (give --tokenizer TOKENIZER.json or an ONNX tokenizer)")
        return candidate
    if not path.is_file():
        raise OnnxqError(f"tokenizer not found: {path}")
    return path


def tokenize(text: str, tokenizer: str | os.PathLike, chunk_chars: int = 4096) -> np.ndarray:
    """Token ids ``[num_tokens]`` int64 of ``text`` by ``tokenizer`` (see the module docstring)."""
    path = find_tokenizer(tokenizer)
    if path.suffix == ".onnx":
        return _tokenize_onnx(text, path, chunk_chars)
    return _tokenize_json(text, path)


def bos_token(tokenizer: str | os.PathLike) -> int | None:
    """The id a ``tokenizer.json``'s post-processor puts before every text and nothing after it
    (a decoder LM's BOS: Gemma's ``<bos>``, Llama's ``<s>``); None when it adds none, adds
    tokens after the text too (an encoder's ``[CLS] ... [SEP]``), or for an ONNX tokenizer.

    Language-model windows cut from a long token stream start with this id, as each text the
    model was trained on did (:class:`~onnxq.calibration.TextReader`, ``onnxq eval``).
    """
    path = find_tokenizer(tokenizer)
    if path.suffix == ".onnx":
        return None
    encoder = _json_tokenizer(str(path), path.stat().st_mtime_ns)
    plain = encoder.encode("a b", add_special_tokens=False).ids
    special = encoder.encode("a b", add_special_tokens=True).ids
    return int(special[0]) if len(special) == len(plain) + 1 and special[1:] == plain else None


def _tokenize_json(text: str, path: Path) -> np.ndarray:
    tokenizer = _json_tokenizer(str(path), path.stat().st_mtime_ns)
    return np.asarray(tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _json_tokenizer(path: str, mtime_ns: int):
    """The parsed ``tokenizer.json`` (kept: callers tokenize line by line); ``mtime_ns`` keys a changed file anew."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OnnxqError("a tokenizer.json needs the tokenizers package (pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the Rust side raises its own exception type with the reason
        raise OnnxqError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


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


def _tokenize_onnx(text: str, path: Path, chunk_chars: int) -> np.ndarray:
    """Token ids ``[num_tokens]`` int64 of ``text`` by the ONNX tokenizer model at ``path``.

    The tokenizer takes a 1-D string tensor (its first input) and outputs ``input_ids``
    (or else its first integer output) of any rank, optionally with an
    ``attention_mask`` of the same shape (padding is dropped). Its custom ops come from
    ``onnxruntime_extensions.get_library_path()``.
    """
    session, input_name, names = _onnx_tokenizer(str(path), path.stat().st_mtime_ns)
    parts = []
    for chunk in _chunks(text, chunk_chars):
        result = session.run(names, {input_name: np.array([chunk])})
        ids = np.asarray(result[0]).astype(np.int64)
        if len(result) > 1 and np.shape(result[1]) == ids.shape:
            ids = ids[np.asarray(result[1]) != 0]
        parts.append(ids.reshape(-1))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@functools.lru_cache(maxsize=4)
def _onnx_tokenizer(path: str, mtime_ns: int):
    """``(session, string input name, output names)`` of an ONNX tokenizer (kept, like :func:`_json_tokenizer`)."""
    import onnxruntime as ort

    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        raise OnnxqError(
            "an ONNX tokenizer needs onnxruntime-extensions (pip install onnxruntime-extensions)"
        ) from None
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
    return session, first_input.name, names


