"""Calibration data: the reader protocol, ready-made readers and feed validation.

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
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import onnx
import onnx_ir as ir

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

Feed = dict[str, np.ndarray]

_PER_SAMPLE_KEY = re.compile(r"^(\d+)/(.+)$")


@runtime_checkable
class CalibrationDataReader(Protocol):
    """Structural type of a calibration reader (ONNX Runtime's interface).

    ``get_next()`` returns the next feed ``{input name: array}`` or ``None`` at the
    end; ``rewind()`` restarts from the first sample.
    """

    def get_next(self) -> Feed | None: ...

    def rewind(self) -> None: ...


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration sees it: ``shape`` entries are ints (static) or
    ``None``/strings (dynamic); ``dtype`` is ``None`` when the model does not say."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        if self.shape is None:
            return "any shape"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"[{dims}]"


def _spec_of(value: ir.Value) -> InputSpec:
    dtype = None
    if value.dtype is not None:
        try:
            dtype = np.dtype(value.dtype.numpy())
        except (TypeError, ValueError):  # string or exotic types
            dtype = None
    shape = None
    if value.shape is not None:
        shape = tuple(d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                      for d in value.shape)
    return InputSpec(value.name, dtype, shape)


def input_specs(model_inputs) -> list[InputSpec]:
    """The inputs a feed must provide.

    ``model_inputs``: an ``ir.Model``, an ``onnx.ModelProto``, a model path (read
    without loading external data), a sequence of ``ir.Value`` (``graph.inputs``) or
    of :class:`InputSpec`. Graph inputs that are also initializers (optional inputs
    of old exporters) are left out.
    """
    if isinstance(model_inputs, (str, os.PathLike)):
        from onnxq.io import load_model

        model_inputs = load_model(model_inputs)
    if isinstance(model_inputs, onnx.ModelProto):
        model_inputs = ir.serde.deserialize_model(model_inputs)
    if isinstance(model_inputs, ir.Model):
        graph = model_inputs.graph
        return [_spec_of(v) for v in graph.inputs if v.name not in graph.initializers]
    specs = []
    for item in model_inputs:
        if isinstance(item, InputSpec):
            specs.append(item)
        elif isinstance(item, ir.Value):
            specs.append(_spec_of(item))
        else:
            raise OnnxqError(f"model inputs must be ir.Value or InputSpec items, found {type(item).__name__}")
    return specs


def validate_feed(feed: Mapping[str, np.ndarray], model_inputs) -> None:
    """Check one calibration sample against the model's graph inputs.

    Checks names (unknown and missing inputs), dtypes, ranks and static dimensions.
    ``model_inputs``: anything :func:`input_specs` accepts.

    Raises:
        OnnxqError: one line saying what was expected and what was found.
    """
    specs = input_specs(model_inputs)
    by_name = {s.name: s for s in specs}
    names = ", ".join(by_name) or "none"
    if not isinstance(feed, Mapping):
        raise OnnxqError(f"a calibration sample must be a dict of input name -> array, found {type(feed).__name__}")
    for name, array in feed.items():
        if name not in by_name:
            raise OnnxqError(f"calibration input {name!r} is not an input of the model (inputs: {names})")
        if not isinstance(array, np.ndarray):
            raise OnnxqError(f"calibration input {name!r} must be a numpy array, found {type(array).__name__}")
    missing = [n for n in by_name if n not in feed]
    if missing:
        raise OnnxqError(
            f"calibration sample lacks model input {missing[0]!r} (sample has: {', '.join(feed) or 'nothing'})"
        )
    for name, array in feed.items():
        spec = by_name[name]
        if spec.dtype is not None and array.dtype != spec.dtype:
            raise OnnxqError(f"calibration input {name!r} has dtype {array.dtype}; the model expects {spec.dtype}")
        if spec.shape is None:
            continue
        if array.ndim != len(spec.shape):
            raise OnnxqError(
                f"calibration input {name!r} has shape {array.shape} (rank {array.ndim}); "
                f"the model expects rank {len(spec.shape)} {spec.describe()}"
            )
        for got, want in zip(array.shape, spec.shape):
            if isinstance(want, int) and got != want:
                raise OnnxqError(
                    f"calibration input {name!r} has shape {array.shape}; the model expects {spec.describe()}"
                )


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
    while max_samples is None or count < max_samples:
        feed = reader.get_next()
        if feed is None:
            return
        if specs is not None:
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
