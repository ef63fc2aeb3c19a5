"""Calibration: user data -> activation statistics, through real onnxruntime sessions.

* :mod:`~onnxq.calibration.readers`: the ``CalibrationDataReader`` protocol (ONNX
  Runtime's shape), ``.npz`` and list readers, feed validation, ``materialize``.
* :mod:`~onnxq.calibration.text`: ``TextReader``, windows of a tokenized text.
* :mod:`~onnxq.calibration.probe`: ``ActivationProbe``, intermediate tensors of a model.
* :mod:`~onnxq.calibration.accumulators`: streaming Hessian, mean/max ``|x|``, row sample.
* :mod:`~onnxq.calibration.blocks`: ``find_blocks``, weight sites grouped into
  transformer blocks for sequential calibration.

No quantization math lives here.
"""
from onnxq.calibration.accumulators import (
    AbsMaxAccumulator,
    AbsMeanAccumulator,
    Accumulator,
    HessianAccumulator,
    RowSampler,
    rows_of,
)
from onnxq.calibration.blocks import NORM_OPS, Block, find_blocks
from onnxq.calibration.probe import ActivationProbe, collect_statistics
from onnxq.calibration.readers import (
    CalibrationDataReader,
    InputSpec,
    ListReader,
    NpzReader,
    as_reader,
    input_specs,
    iter_feeds,
    materialize,
    save_npz,
    validate_feed,
)
from onnxq.calibration.text import TextReader, tokenize

__all__ = [
    "AbsMaxAccumulator",
    "AbsMeanAccumulator",
    "Accumulator",
    "ActivationProbe",
    "Block",
    "CalibrationDataReader",
    "HessianAccumulator",
    "InputSpec",
    "ListReader",
    "NORM_OPS",
    "NpzReader",
    "RowSampler",
    "TextReader",
    "as_reader",
    "collect_statistics",
    "find_blocks",
    "input_specs",
    "iter_feeds",
    "materialize",
    "rows_of",
    "save_npz",
    "tokenize",
    "validate_feed",
]
