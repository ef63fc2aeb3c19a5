"""How token ids become a language model's feed: the one place that decides what every model input gets.

Causal LMs as users have them carry a KV cache: the ONNX Runtime GenAI model builder's
output (``input_ids``, ``attention_mask``, ``past_key_values.N.key/value``; its
GroupQueryAttention derives sequence lengths from the mask) and Optimum's
``text-generation-with-past`` export (plus ``position_ids``). Calibration, perplexity and
the other metrics run full-sequence forwards, which such a model computes with an
**empty past**: ``past_key_values.N.key/value`` of shape ``[batch, kv_heads, 0, head_size]``
in the model's dtype. :class:`InputFiller` fills, for token ids ``[batch, seq]``:

* ``input_ids``: the ids (required);
* ``attention_mask``: ones ``[batch, past + seq]``;
* ``position_ids``: ``past .. past + seq - 1`` per row;
* ``token_type_ids``: zeros;
* ``past_key_values.N.key`` / ``.value`` (``[batch, kv_heads, past, head_size]``, ``kv_heads``
  and ``head_size`` from the graph's static dims): empty, or the ``present.N.*`` outputs of
  an earlier step (a decode step). A GroupQueryAttention with a sliding-window cache
  (``sliding_window_cache=1``: the GenAI builder's Gemma 3 with its windowed KV cache) needs a
  cache buffer of at least ``local_window_size`` rows even when empty: its "empty" past is that
  many rows of zeros, with the attention mask over the new tokens only (the mask says how many
  rows are real).

Every input in the model's own dtype. Any other input is a one-line error naming it.
The text and token-id readers, the feed completion of :func:`onnxq.calibration.materialize`
and the evaluation harness all fill inputs through this class.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError

__all__ = ["Feed", "InputFiller", "InputSpec", "PastInput", "TOKEN_INPUTS", "input_specs", "specs_of_session",
           "validate_feed"]

Feed = dict[str, np.ndarray]

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
"""Inputs filled from the token ids alone (``input_ids`` is required)."""

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class InputSpec:
    """A model input as calibration sees it: ``shape`` entries are ints (static) or
    ``None``/strings (dynamic); ``dtype`` is ``None`` when the model does not say; ``capacity``:
    for a KV-cache input, the rows its empty past has (see the module docstring; usually 0)."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    capacity: int = 0

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
        past_dims = _past_dims(graph)
        return [_with_past_dims(_spec_of(v), past_dims.get(v.name)) for v in graph.inputs
                if v.name not in graph.initializers]
    specs = []
    for item in model_inputs:
        if isinstance(item, InputSpec):
            specs.append(item)
        elif isinstance(item, ir.Value):
            specs.append(_spec_of(item))
        else:
            raise OnnxqError(f"model inputs must be ir.Value or InputSpec items, found {type(item).__name__}")
    return specs


def _with_past_dims(spec: InputSpec, dims: tuple[int, int, int] | None) -> InputSpec:
    """``spec`` with a KV input's symbolic ``kv_heads`` / ``head_size`` dims replaced by ``dims`` (when known),
    and ``capacity`` (its empty past's rows, when not 0) recorded."""
    if dims is None or spec.shape is None or len(spec.shape) != 4:
        return spec
    shape = list(spec.shape)
    for axis, value in zip((1, 3), dims[:2]):
        if not isinstance(shape[axis], int):
            shape[axis] = value
    return InputSpec(spec.name, spec.dtype, tuple(shape), dims[2])


_PASS_THROUGH = ("Add", "Mul", "Transpose", "Reshape", "RotaryEmbedding", "Cast", "SimplifiedLayerNormalization",
                 "LayerNormalization", "RMSNormalization", "SkipSimplifiedLayerNormalization")
"""Ops between a Q/K/V projection and attention that keep its width (bias, RoPE, head split, and the
per-head q/k norms of Gemma 3 / Qwen 3)."""


def _output_width(value: ir.Value | None, through_split: bool = False) -> int | None:
    """The output width (N) of the MatMul / MatMulNBits with a constant weight that ``value`` comes from,
    through bias, rotary embedding, head-split Reshape / Transpose, per-head norms and Cast nodes (and,
    with ``through_split``, the ``Split`` of a packed QKV projection)."""
    for _ in range(12):
        node = None if value is None else value.producer()
        if node is None:
            return None
        if node.op_type == "MatMulNBits":
            attr = node.attributes.get("N")
            return None if attr is None else attr.as_int()
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
            return int(node.inputs[1].const_value.shape[-1])
        if node.op_type not in _PASS_THROUGH and not (through_split and node.op_type == "Split"):
            return None
        value = next((v for v in node.inputs if v is not None and v.const_value is None and v.producer() is not None),
                     None)
    return None


def _past_dims(graph: ir.Graph) -> dict[str, tuple[int, int, int]]:
    """``{past input name: (kv_heads, head_size, empty capacity)}`` read off the nodes that consume the
    past inputs (``empty capacity``: rows an empty past must still have, ``local_window_size`` for a
    GroupQueryAttention with ``sliding_window_cache``, else 0).

    The ONNX Runtime GenAI builder leaves ``head_size`` symbolic (``kv_cache_dim``) in the past
    inputs. GroupQueryAttention (its fp32 graphs) says ``kv_num_heads`` and ``num_heads``, and its
    packed QKV input (a MatMul of width ``(num_heads + 2 * kv_num_heads) * head_size``) gives the head
    size; in its fp16 graphs the past is ``Concat``-ed with the new keys / values, whose projection
    has width ``kv_heads * head_size`` (``kv_heads`` static in the input's shape).
    """
    dims: dict[str, tuple[int, int, int]] = {}
    for value in graph.inputs:
        kv_heads = value.shape[1] if value.shape is not None and len(value.shape) == 4 else None
        if not (_PAST.match(value.name) and isinstance(kv_heads, int) and kv_heads > 0):
            continue
        for node, _ in value.uses():
            others = [v for v in node.inputs if v is not None and v is not value]
            if node.op_type == "Concat" and len(others) == 1:
                width = _output_width(others[0])
                if width and width % kv_heads == 0:
                    dims[value.name] = (kv_heads, width // kv_heads, 0)
    for node in graph:
        if node.op_type != "GroupQueryAttention" or len(node.inputs) < 5:
            continue
        attrs = {name: attr.as_int() for name, attr in node.attributes.items() if attr.type == ir.AttributeType.INT}
        heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
        packed = len(node.inputs) < 2 or node.inputs[1] is None
        width = _output_width(node.inputs[0])
        if width is None and not packed:  # q, k, v split from one packed projection (Gemma 3 builds)
            width, packed = _output_width(node.inputs[0], through_split=True), True
        if not (heads and kv_heads and width):
            continue
        head_size = width // (heads + 2 * kv_heads) if packed else width // heads
        capacity = attrs.get("local_window_size", 0) if attrs.get("sliding_window_cache", 0) else 0
        for past in node.inputs[3:5]:
            if past is not None and past.is_graph_input():
                dims[past.name] = (kv_heads, head_size, max(capacity, 0))
    return dims


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


@dataclass(frozen=True)
class PastInput:
    """One ``past_key_values.N.key|value`` input: ``[batch, kv_heads, past, head_size]``."""

    name: str
    dtype: np.dtype
    kv_heads: int
    head_size: int
    capacity: int = 0  # rows of zeros an empty past has (a sliding-window cache's local_window_size)

    @property
    def present(self) -> str:
        """The output that holds this input's next value (``present.N.key|value``)."""
        return self.name.replace("past_key_values", "present", 1)


def specs_of_session(session) -> list[InputSpec]:
    """:class:`InputSpec` of an onnxruntime session's inputs (dtype from the type string, shape as ORT reports)."""
    specs = []
    for item in session.get_inputs():
        dtype = _ORT_TYPES.get(item.type)
        shape = None if item.shape is None else tuple(d if isinstance(d, int) else None for d in item.shape)
        specs.append(InputSpec(item.name, None if dtype is None else np.dtype(dtype), shape))
    return specs


def _past_input(spec: InputSpec, what: str) -> PastInput:
    shape = spec.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise OnnxqError(f"{what} input {spec.name!r} has shape {spec.describe()}; onnxq fills a past of shape "
                         "[batch, kv_heads, past, head_size] with static kv_heads and head_size")
    if spec.dtype is None or spec.dtype.kind != "f":
        raise OnnxqError(f"{what} input {spec.name!r} has dtype {spec.dtype}; expected a float KV cache")
    return PastInput(spec.name, spec.dtype, shape[1], shape[3], spec.capacity)


class InputFiller:
    """The feeds of one model from token ids (see the module docstring).

    Args:
        specs: the model's inputs (:func:`onnxq.calibration.input_specs`, or
            :func:`specs_of_session` for an onnxruntime session).
        what: how errors name the model (e.g. ``"the quantized model"``).

    Raises:
        OnnxqError: the model has no ``input_ids``, an input onnxq cannot fill (all of them
            are named), or a past input whose head dimensions are not static.
    """

    def __init__(self, specs: Sequence[InputSpec], what: str = "the model") -> None:
        self.what = what
        self.specs = {spec.name: spec for spec in specs}
        if "input_ids" not in self.specs:
            raise OnnxqError(f"{what} has no input named input_ids (inputs: {', '.join(self.specs) or 'none'})")
        unknown = [name for name in self.specs if name not in TOKEN_INPUTS and not _PAST.match(name)]
        if unknown:
            raise OnnxqError(
                f"{what} has input{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} that onnxq cannot "
                f"fill from token ids (it fills {', '.join(TOKEN_INPUTS)} and past_key_values.N.key/value); "
                "give feeds with every input (an .npz)")
        self.past = [_past_input(spec, what) for name, spec in self.specs.items() if _PAST.match(name)]

    @property
    def has_past(self) -> bool:
        return bool(self.past)

    def _dtype(self, name: str) -> np.dtype:
        dtype = self.specs[name].dtype
        return np.dtype(np.int64) if dtype is None else dtype

    def feed(self, ids: np.ndarray, past: Mapping[str, np.ndarray] | None = None) -> Feed:
        """The feed for ``ids: [batch, seq]`` after ``past`` (``{past input name: [batch, kv_heads, past, head]}``,
        default empty)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise OnnxqError(f"token ids for {self.what} must be [batch, seq], got shape {ids.shape}")
        batch, seq = ids.shape
        past_length = 0
        if past and self.past:
            past_length = int(np.shape(past[self.past[0].name])[2])
        feed: Feed = {}
        for name in self.specs:
            if name == "input_ids":
                value = ids
            elif name == "attention_mask":
                value = np.ones((batch, past_length + seq))
            elif name == "position_ids":
                value = np.broadcast_to(np.arange(past_length, past_length + seq), (batch, seq))
            elif name == "token_type_ids":
                value = np.zeros((batch, seq))
            else:
                continue
            feed[name] = np.ascontiguousarray(value.astype(self._dtype(name)))
        for spec in self.past:
            if past:
                feed[spec.name] = np.ascontiguousarray(past[spec.name], dtype=spec.dtype)
            else:
                feed[spec.name] = np.zeros((batch, spec.kv_heads, spec.capacity, spec.head_size), dtype=spec.dtype)
        return feed

    def complete(self, feed: Mapping[str, np.ndarray]) -> Feed:
        """``feed`` with the inputs it lacks filled from its ``input_ids`` (empty past); given ones are kept."""
        missing = [name for name in self.specs if name not in feed]
        if not missing or "input_ids" not in feed or np.ndim(feed["input_ids"]) != 2:
            return dict(feed)
        filled = self.feed(np.asarray(feed["input_ids"]))
        return {**{name: filled[name] for name in missing}, **feed}
