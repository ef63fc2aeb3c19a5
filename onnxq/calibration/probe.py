"""Reading intermediate activations of a model through an onnxruntime session.

:class:`ActivationProbe` builds a session for a *probe model*: the nodes of the
model's main graph that the named tensors depend on, with those tensors as the
graph outputs. It never modifies the model it is given. Per sample it returns
``{tensor name: array}``; :meth:`ActivationProbe.iter_samples` streams samples so
only one sample's activations are in memory at a time.

Cutting: ``feed_names`` names intermediate tensors that the caller feeds (e.g.
the residual stream at a block boundary, cached from an earlier run); the probe
model starts there, so sequential calibration runs each block, not the whole
prefix. Other graph inputs the remaining nodes need are read from the feed too.

Weights: initializers in external data files and those of at least
``INLINE_LIMIT`` bytes (of a dtype numpy and ONNX Runtime share; others are
embedded) are not copied into the probe model's protobuf: they are
declared with a placeholder external location and handed to the session with
``SessionOptions.add_external_initializers`` straight from ``tensor.numpy()``
(memory-mapped for weights in external data files, the arrays themselves for
in-memory tensors). Nothing is written to disk, a model above protobuf's 2 GB
limit works, and ONNX Runtime holds its usual one copy of the weights. Smaller
initializers are serialized into the probe model.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.calibration.accumulators import Accumulator
from onnxq.calibration.lm_session import run_into
from onnxq.calibration.readers import iter_feeds
from onnxq.errors import OnnxqError
from onnxq.io import load_model

__all__ = ["ActivationProbe", "INLINE_LIMIT", "ProbeSpec", "collect_statistics", "node_subgraphs"]

logger = logging.getLogger(__name__)

INLINE_LIMIT = 256 * 1024
"""Initializers of this many bytes or more reach the session as OrtValues, not protobuf bytes."""

_ORT_VALUE_TYPES = {
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16,
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16,
    ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL,
}
_PLACEHOLDER = "onnxq-probe-placeholder"


def _main_graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for out in node.outputs:
            values[out.name] = out
    return values


def node_subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """The subgraphs held in ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


def _outer_references(node: ir.Node, graph: ir.Graph) -> Iterator[ir.Value]:
    """Values of ``graph`` used inside ``node``'s subgraphs (If/Loop/Scan bodies)."""
    for sub in node_subgraphs(node):
        for sub_node in sub.all_nodes():
            for value in sub_node.inputs:
                if value is not None and value.graph is graph:
                    yield value


class ProbeSpec:
    """A probe model another process can run: serialized ONNX plus its large initializers as arrays.

    Picklable (a Ray task argument): ``model`` is the probe's ``ModelProto`` bytes, whose large
    initializers are placeholders filled from ``arrays`` (bfloat16 as ``uint16`` views) with
    ``SessionOptions.add_external_initializers``. The session is built on the first :meth:`run`
    in the process that runs it and kept there.
    """

    def __init__(self, model: bytes, arrays: dict[str, np.ndarray], tensor_names: tuple[str, ...],
                 session_inputs: tuple[str, ...], passthrough: tuple[str, ...], outputs: tuple[str, ...],
                 providers: tuple[str, ...], threads: int | None):
        self.model, self.arrays = model, arrays
        self.tensor_names, self.session_inputs = tensor_names, session_inputs
        self.passthrough, self.outputs = passthrough, outputs
        self.providers, self.threads = providers, threads
        self._session = None
        self._keep_alive: list = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_session": None, "_keep_alive": []}

    def _build(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: a failed run is raised as one OnnxqError line
        # ORT fuses constant DequantizeLinear -> MatMul into MatMulNBits with int8 activations by
        # default; calibration must see the exact float product the weights define
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        # between runs the caller's numpy (statistics, solves) needs the cores: idle ORT workers must not
        # spin-wait for work (on 2 shared cores spinning cost 14% of forward + statistics, measured)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if self.arrays:
            proto = onnx.ModelProto.FromString(self.model)
            bf16 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
            ort_values = [ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, onnx.TensorProto.BFLOAT16)
                          if name in bf16 else ort.OrtValue.ortvalue_from_numpy(a)
                          for name, a in self.arrays.items()]
            self._keep_alive = ort_values
            options.add_external_initializers(list(self.arrays), ort_values)
        try:
            return ort.InferenceSession(self.model, options, providers=list(self.providers))
        except Exception as exc:  # onnxruntime raises several types
            raise OnnxqError(f"onnxruntime cannot run the probe model: {str(exc).splitlines()[0]}") from None

    def run(self, feed: Mapping[str, np.ndarray],
            out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``{tensor name: array}`` for one feed holding the session inputs and passed-through names.

        ``out``: caller-owned arrays, by output name, that onnxruntime writes those outputs into
        (:func:`~onnxq.calibration.lm_session.run_into`); returned as the same arrays.
        """
        result = {name: np.asarray(feed[name]) for name in self.passthrough}
        if self.outputs:
            if self._session is None:
                self._session = self._build()
            inputs = {n: feed[n] for n in self.session_inputs}
            try:
                arrays = (run_into(self._session, inputs, self.outputs, out) if out
                          else self._session.run(list(self.outputs), inputs))
            except Exception as exc:  # onnxruntime raises several types; e.g. token ids beyond the vocabulary
                raise OnnxqError(f"onnxruntime failed on a calibration sample: {str(exc).splitlines()[0]}") from None
            result.update(zip(self.outputs, arrays))
        return {name: result[name] for name in self.tensor_names}


class ActivationProbe:
    """Run a model and return the named intermediate tensors (see the module docstring).

    Args:
        model: an ``ir.Model`` (not modified), an ``onnx.ModelProto`` or a path.
        tensor_names: main-graph values to return (node outputs, graph inputs or
            ``feed_names``; duplicates are ignored).
        feed_names: intermediate values the caller supplies in every feed; the probe
            does not compute them or anything only they need.
        providers: onnxruntime execution providers (default CPU).
        threads: ``intra_op_num_threads`` (default: onnxruntime's choice).

    Attributes:
        input_names: the feed entries :meth:`run` reads (graph inputs the probe model
            needs, then needed ``feed_names``, then requested tensors taken from the feed).

    Raises:
        OnnxqError: a name is not a value of the main graph, or is an initializer.
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto | str | os.PathLike,
        tensor_names: Sequence[str],
        *,
        feed_names: Sequence[str] = (),
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ):
        self.model = load_model(model)
        self.tensor_names = list(dict.fromkeys(tensor_names))
        self.feed_names = list(dict.fromkeys(feed_names))
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.threads = threads
        graph = self.model.graph
        values = _main_graph_values(graph)
        for name in [*self.tensor_names, *self.feed_names]:
            if name not in values:
                raise OnnxqError(f"tensor {name!r} is not a value of the model's main graph")
            if values[name].is_initializer():
                raise OnnxqError(f"tensor {name!r} is an initializer (a constant), not an activation")
        graph_inputs = {v.name for v in graph.inputs if v.name not in graph.initializers}
        self._cut = {name: values[name] for name in self.feed_names}
        self._passthrough = [n for n in self.tensor_names if n in self._cut or n in graph_inputs]
        self._outputs = [values[n] for n in self.tensor_names if n not in self._passthrough]
        self._nodes, self._initializers, used_inputs = self._needed(graph, self._outputs)
        self._session_inputs = [v.name for v in graph.inputs if v.name in used_inputs]
        self._session_inputs += [n for n in self.feed_names if n in used_inputs]
        self.input_names = self._session_inputs + [n for n in self._passthrough if n not in self._session_inputs]
        self._spec: ProbeSpec | None = None

    def _needed(self, graph: ir.Graph, outputs: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value], set[str]]:
        """Nodes (graph order), initializers and input names that ``outputs`` depend on."""
        nodes: set[int] = set()
        initializers: dict[str, ir.Value] = {}
        inputs: set[str] = set()
        stack = list(outputs)
        seen: set[int] = set()
        while stack:
            value = stack.pop()
            if id(value) in seen:
                continue
            seen.add(id(value))
            if value.name in self._cut:
                inputs.add(value.name)
                continue
            if value.is_initializer() or value.name in graph.initializers:
                initializers[value.name] = graph.initializers[value.name]
                continue
            producer = value.producer()
            if producer is None:
                inputs.add(value.name)
                continue
            if id(producer) in nodes:
                continue
            nodes.add(id(producer))
            stack.extend(v for v in producer.inputs if v is not None)
            stack.extend(_outer_references(producer, graph))
        ordered = [node for node in graph if id(node) in nodes]
        ordered_inits = [v for name, v in graph.initializers.items() if name in initializers]
        return ordered, ordered_inits, inputs

    def _declare_input(self, graph_proto: onnx.GraphProto, value: ir.Value, sample: np.ndarray | None) -> None:
        if value.type is not None:
            ir.serde.serialize_value_into(graph_proto.input.add(), value)
            return
        if sample is None:
            raise OnnxqError(f"the model declares no type for input {value.name!r}")
        elem = onnx.helper.np_dtype_to_tensor_dtype(sample.dtype)
        graph_proto.input.append(onnx.helper.make_tensor_value_info(value.name, elem, [None] * sample.ndim))

    def spec(self, feed: Mapping[str, np.ndarray]) -> ProbeSpec:
        """The probe model as a :class:`ProbeSpec` another process can run (``feed``: one sample,
        for the types of undeclared inputs). Large initializers stay numpy arrays (memory-mapped
        for external data), not protobuf bytes."""
        model, graph = self.model, self.model.graph
        proto = onnx.ModelProto(ir_version=model.ir_version, producer_name="onnxq-probe")
        for domain, version in model.opset_imports.items():
            proto.opset_import.add(domain=domain, version=version)
        for function in model.functions.values():
            ir.serde.serialize_function_into(proto.functions.add(), function)
        g = proto.graph
        g.name = "probe"
        values = _main_graph_values(graph)
        for name in self._session_inputs:
            self._declare_input(g, values[name], feed.get(name))
        arrays: dict[str, np.ndarray] = {}
        for value in self._initializers:
            tensor = value.const_value
            if tensor is None:
                raise OnnxqError(f"initializer {value.name!r} has no data")
            external = isinstance(tensor, ir.ExternalTensor)
            if tensor.dtype in _ORT_VALUE_TYPES and (external or tensor.nbytes >= INLINE_LIMIT):
                array = np.ascontiguousarray(tensor.numpy())
                placeholder = g.initializer.add(name=value.name, data_type=tensor.dtype.value,
                                                dims=list(tensor.shape.numpy()))
                placeholder.data_location = onnx.TensorProto.EXTERNAL
                placeholder.external_data.add(key="location", value=_PLACEHOLDER)
                arrays[value.name] = array.view(np.uint16) if tensor.dtype == ir.DataType.BFLOAT16 else array
            else:
                if external:  # its file is not beside the probe model: embed the data
                    tensor = ir.Tensor(tensor.numpy(), dtype=tensor.dtype)
                ir.serde.serialize_tensor_into(g.initializer.add(), tensor)
                g.initializer[-1].name = value.name
        for node in self._nodes:
            ir.serde.serialize_node_into(g.node.add(), node, model_ir_version=model.ir_version)
        for value in self._outputs:
            ir.serde.serialize_value_into(g.output.add(), value)
        logger.debug("probe model: %d nodes, %d outputs, %d initializers passed as OrtValues",
                     len(self._nodes), len(self._outputs), len(arrays))
        return ProbeSpec(proto.SerializeToString(), arrays, tuple(self.tensor_names), tuple(self._session_inputs),
                         tuple(self._passthrough), tuple(v.name for v in self._outputs), tuple(self.providers),
                         self.threads)

    def run(self, feed: Mapping[str, np.ndarray],
            out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``{tensor name: array}`` for one feed (it must hold every name in :attr:`input_names`);
        ``out``: arrays to write outputs into (:meth:`ProbeSpec.run`)."""
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise OnnxqError(f"the probe needs {missing[0]!r} in the feed (got: {', '.join(feed) or 'nothing'})")
        if self._spec is None:
            self._spec = self.spec(feed)
        return self._spec.run(feed, out)

    def iter_samples(self, source, max_samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Run every feed of ``source`` (anything ``as_reader`` takes), one at a time."""
        for feed in iter_feeds(source, max_samples):
            yield self.run(feed)


def collect_statistics(
    probe: ActivationProbe,
    feeds: Iterable[Mapping[str, np.ndarray]],
    accumulators: Mapping[str, Sequence[Accumulator]],
    *,
    mask_input: str | None = "attention_mask",
) -> int:
    """Run ``probe`` on each feed and update ``accumulators[tensor name]`` with that tensor.

    ``mask_input``: a feed entry (e.g. ``attention_mask: [batch, seq]``) whose zeros mark
    padding rows to leave out (see :mod:`onnxq.calibration.accumulators`); used only
    when the feed has it. Returns the number of samples run.
    """
    unknown = [name for name in accumulators if name not in probe.tensor_names]
    if unknown:
        raise OnnxqError(f"no probe output named {unknown[0]!r} (probe outputs: {', '.join(probe.tensor_names)})")
    count = 0
    for feed in feeds:
        mask = feed.get(mask_input) if mask_input is not None else None
        activations = probe.run(feed)
        for name, stats in accumulators.items():
            for stat in stats:
                stat.update(activations[name], mask)
        count += 1
    return count
