"""One onnxruntime session of a causal language model: options, input filler and logits output.

Evaluation (:mod:`onnxq.eval.metrics`: perplexity, KL, the decode check) and self-generated
calibration (:mod:`onnxq.calibration.generate`) both run a causal LM from ``input_ids``; this
module is the one place that opens such a session, fills its other inputs (attention mask,
positions, an empty KV cache: :class:`~onnxq.calibration.inputs.InputFiller`) and finds its
logits output. onnxruntime is imported when a session is made, not with this module, so that
RTN quantization never loads it.
"""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxq.calibration.inputs import InputFiller, input_specs, specs_of_session
from onnxq.errors import OnnxqError

__all__ = ["LMSession", "make_session"]


def make_session(model: Any, providers: list[str] | None = None, *, reuse_buffers: bool = True,
                 threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model``: a path (external data next to it), an
    ``onnx.ModelProto``, or a session (returned as is).

    ``reuse_buffers=False`` turns off ORT's memory pattern and buffer reuse, which some KV-cache
    graphs (the GenAI builder's fp16 MultiHeadAttention) break when shapes change between runs.
    ``threads``: intra-op threads (default: onnxruntime's). ``providers``: default CPU.

    Raises:
        OnnxqError: the file is missing or onnxruntime cannot load it.
    """
    import onnx
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not reuse_buffers:
        options.enable_mem_pattern = False
        options.enable_mem_reuse = False
    providers = providers or ["CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        source, where = model.SerializeToString(), "the given ModelProto"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise OnnxqError(f"model file not found: {path}")
        source, where = str(path), str(path)
    else:
        raise OnnxqError(f"a model must be a path, an onnx.ModelProto or an InferenceSession, found {type(model).__name__}")
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises several exception types for a bad model
        raise OnnxqError(f"onnxruntime cannot load {where}: {str(exc).strip().splitlines()[0]}") from None


def run_into(session: Any, inputs: Mapping[str, np.ndarray], outputs: Sequence[str],
             out: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on ``inputs`` for ``outputs`` through an IO binding, the outputs named in ``out``
    written into those caller-owned C-contiguous arrays (of the exact shape and dtype the run gives)
    and returned as them; the others as onnxruntime allocates them. A large output (an LM's logits)
    then reuses memory already mapped instead of fresh pages each run."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for name in outputs:
        if name in out:
            binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(out[name]))
        else:
            binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    return [out[name] if name in out else value.numpy() for name, value in zip(outputs, binding.get_outputs())]


class LMSession:
    """A causal-LM session with its input filler and logits output.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        what: how errors name the model (e.g. "float", "quantized").
        filler: fills every input but ``input_ids`` (mask, positions, KV cache).
        outputs: the names of all the session's outputs (``present.*`` among them for a KV cache).
        output: the logits output: ``logits`` when the model has one, else its first output.
    """

    def __init__(self, model: Any, providers: list[str] | None = None, what: str = "evaluated", *,
                 reuse_buffers: bool = True, threads: int | None = None):
        self.session = make_session(model, providers, reuse_buffers=reuse_buffers, threads=threads)
        self.what = what
        specs = specs_of_session(self.session)
        if model is not self.session and any(s.name.startswith("past_key_values.") for s in specs):
            specs = input_specs(model)  # the graph tells a KV cache's head size (when symbolic) and window capacity
        self.filler = InputFiller(specs, f"the {what} model")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.output = "logits" if "logits" in self.outputs else self.outputs[0]
        self._reused: np.ndarray | None = None  # the logits array ``logits(..., reuse=True)`` writes into

    def logits(self, ids: np.ndarray, *, reuse: bool = False) -> np.ndarray:
        """ids: ``[batch, seq]`` int64 -> logits ``[batch, seq, vocab]`` (an empty KV cache).

        ``reuse``: return the array the previous ``reuse`` call of the same shape returned, written
        over (onnxruntime's IO binding): the caller must be done with that one. Logits are large
        (Gemma 3: 268 MB a window), and fresh pages for every window cost system time.
        """
        batch, seq = ids.shape
        feed = self.filler.feed(ids)
        buffer = self._reused if reuse and self._reused is not None and self._reused.shape[:2] == (batch, seq) else None
        if buffer is not None:
            return run_into(self.session, feed, [self.output], {self.output: buffer})[0]
        (logits,) = self.session.run([self.output], feed)
        self.check_logits(logits, batch, seq)
        if reuse:
            self._reused = logits
        return logits

    def check_logits(self, logits: np.ndarray, batch: int, seq: int) -> None:
        """Raise OnnxqError unless ``logits`` is ``[batch, seq, vocab]``."""
        if logits.ndim != 3 or logits.shape[:2] != (batch, seq):
            raise OnnxqError(f"the {self.what} model's output {self.output!r} has shape {logits.shape}; "
                             f"expected logits [batch={batch}, seq={seq}, vocab] of a causal language model")
