"""Calibration data: the reader protocol and ready-made readers (feeds are checked by :mod:`onnxq.calibration.inputs`).

A *feed* is one sample: ``{model input name: np.ndarray}``, exactly what
``onnxruntime.InferenceSession.run`` takes. A *reader* hands out feeds one at a
time with the same shape as ONNX Runtime's
``onnxruntime.quantization.CalibrationDataReader``: ``get_next()`` returns the
next feed or ``None`` when exhausted, ``rewind()`` starts again. ORT's own
reader subclasses (which may lack ``rewind``) and plain iterables of dicts are
accepted wherever a reader is (see :func:`as_reader`).

Calibration feeds are small (token ids), so algorithms that run the model many
times (sequential GPTQ/AWQ) call :func:`materialize` once and iterate the list.

``.npz`` layouts read by :class:`NpzReader` (never with pickle):

* *per-sample*: keys ``"<i>/<input name>"`` (``"0/input_ids"``, ``"0/attention_mask"``,
  ``"1/input_ids"``, ...); sample ``i`` is fed as stored, so samples may differ in
  shape (sequence length). :func:`save_npz` writes this layout.
* *stacked*: one array per input name, the samples concatenated along axis 0
  (the model's batch axis); sample ``i`` is rows ``[i*batch_size, (i+1)*batch_size)``
  of every array, so it keeps the model's rank.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from onnxq.calibration.inputs import Feed, InputFiller, InputSpec, input_specs, validate_feed
from onnxq.errors import OnnxqError

__all__ = [
    "CalibrationDataReader",
    "InputSpec",
    "ListReader",
    "NpzReader",
    "as_reader",
    "input_specs",
    "iter_feeds",
    "materialize",
    "save_npz",
    "validate_feed",
]

logger = logging.getLogger(__name__)


_PER_SAMPLE_KEY = re.compile(r"^(\d+)/(.+)$")


@runtime_checkable
class CalibrationDataReader(Protocol):
    """Structural type of a calibration reader (ONNX Runtime's interface).

    ``get_next()`` returns the next feed ``{input name: array}`` or ``None`` at the
    end; ``rewind()`` restarts from the first sample.
    """

    def get_next(self) -> Feed | None: ...

    def rewind(self) -> None: ...


class ListReader:
    """A reader over an in-memory list of feeds (the arrays are not copied)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._next = 0

    def __len__(self) -> int:
        return len(self._feeds)

    def get_next(self) -> Feed | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return dict(self._feeds[self._next - 1])

    def rewind(self) -> None:
        self._next = 0


class NpzReader:
    """Feeds from an ``.npz`` file, in either layout described in the module docstring.

    ``batch_size`` applies to the stacked layout only (rows per sample).
    The file is read with ``allow_pickle=False``.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int = 1):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise OnnxqError(f"calibration file not found: {self.path}")
        if batch_size < 1:
            raise OnnxqError(f"batch_size must be >= 1, got {batch_size}")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise OnnxqError(f"{self.path} is a .npy array; calibration data must be an .npz of named arrays")
                arrays = {key: data[key] for key in data.files}
        except (ValueError, OSError) as exc:
            raise OnnxqError(f"cannot read calibration file {self.path} as .npz ({exc})") from None
        if not arrays:
            raise OnnxqError(f"calibration file {self.path} holds no arrays")
        self._samples = self._split(arrays, batch_size)
        self._next = 0

    def _split(self, arrays: dict[str, np.ndarray], batch_size: int) -> list[Feed]:
        matches = {key: _PER_SAMPLE_KEY.match(key) for key in arrays}
        if all(matches.values()):
            samples: dict[int, Feed] = {}
            for key, m in matches.items():
                samples.setdefault(int(m.group(1)), {})[m.group(2)] = arrays[key]
            return [samples[i] for i in sorted(samples)]
        if any(matches.values()):
            raise OnnxqError(
                f"{self.path} mixes per-sample keys ('0/name') and stacked keys ('name'); use one layout"
            )
        rows = {key: (a.shape[0] if a.ndim else None) for key, a in arrays.items()}
        if len(set(rows.values())) != 1 or None in rows.values():
            found = ", ".join(f"{k}: {arrays[k].shape}" for k in arrays)
            raise OnnxqError(f"stacked calibration arrays need the same length along axis 0, found {found}")
        total = next(iter(rows.values()))
        if total % batch_size:
            raise OnnxqError(f"{total} stacked rows do not divide into samples of batch_size {batch_size}")
        return [{key: a[i:i + batch_size] for key, a in arrays.items()} for i in range(0, total, batch_size)]

    def __len__(self) -> int:
        return len(self._samples)

    def get_next(self) -> Feed | None:
        if self._next >= len(self._samples):
            return None
        self._next += 1
        return dict(self._samples[self._next - 1])

    def rewind(self) -> None:
        self._next = 0


def save_npz(path: str | os.PathLike, feeds: Iterable[Mapping[str, np.ndarray]]) -> None:
    """Write feeds to ``path`` in the per-sample ``.npz`` layout that :class:`NpzReader` reads."""
    arrays = {}
    for i, feed in enumerate(feeds):
        for name, array in feed.items():
            arrays[f"{i}/{name}"] = np.asarray(array)
    if not arrays:
        raise OnnxqError("no calibration samples to save")
    np.savez(path, **arrays)


class _IterableReader:
    """Adapts an iterable, or a reader without ``rewind`` (ORT's base class has none), to the protocol."""

    def __init__(self, source):
        self._source = source
        self._iterator = None if hasattr(source, "get_next") else iter(source)

    def get_next(self) -> Feed | None:
        if self._iterator is None:
            return self._source.get_next()
        return next(self._iterator, None)

    def rewind(self) -> None:
        if self._iterator is None or self._iterator is self._source:
            raise OnnxqError(
                f"this calibration source ({type(self._source).__name__}) cannot be rewound; "
                "pass a list or a reader with rewind(), or materialize() it"
            )
        self._iterator = iter(self._source)


def as_reader(source) -> CalibrationDataReader:
    """A reader for ``source``: a reader (ours or an ORT ``CalibrationDataReader``
    subclass, with or without ``rewind``), a list of feeds, any iterable of feeds
    (a generator can be read once), or the path of an ``.npz`` file (:class:`NpzReader`)."""
    if isinstance(source, (str, os.PathLike)):
        return NpzReader(source)
    if hasattr(source, "get_next") and hasattr(source, "rewind"):
        return source
    if hasattr(source, "get_next") or isinstance(source, Iterable):
        if isinstance(source, Mapping):
            raise OnnxqError("calibration data must be a reader or a list of feeds, found a single dict")
        return _IterableReader(source)
    raise OnnxqError(
        f"calibration data must be a reader with get_next() or an iterable of dicts, found {type(source).__name__}"
    )


def iter_feeds(source, max_samples: int | None = None, model_inputs=None) -> Iterator[Feed]:
    """Yield up to ``max_samples`` feeds from ``source`` (anything :func:`as_reader` takes),
    validated against ``model_inputs`` (see :func:`validate_feed`) when given."""
    if max_samples is not None and max_samples < 0:
        raise OnnxqError(f"max_samples must be >= 0, got {max_samples}")
    reader = as_reader(source)
    specs = None if model_inputs is None else input_specs(model_inputs)
    count = 0
    filler = None
    while max_samples is None or count < max_samples:
        feed = reader.get_next()
        if feed is None:
            return
        if specs is not None:
            if "input_ids" in feed and any(spec.name not in feed for spec in specs):
                filler = filler or InputFiller(specs)
                feed = filler.complete(feed)  # e.g. an empty KV cache, masks, positions
            validate_feed(feed, specs)
        count += 1
        yield dict(feed)


def materialize(source, max_samples: int | None = None, model_inputs=None) -> list[Feed]:
    """The first ``max_samples`` feeds of ``source`` as a list (all of them when ``None``).

    Raises:
        OnnxqError: the source gave no sample, or a sample does not fit ``model_inputs``.
    """
    feeds = list(iter_feeds(source, max_samples, model_inputs))
    if not feeds:
        raise OnnxqError("the calibration data reader returned no samples")
    logger.debug("calibration: %d samples", len(feeds))
    return feeds
