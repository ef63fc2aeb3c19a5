"""Calibration: user data -> activation statistics, through real onnxruntime sessions.

* :mod:`~onnxq.calibration.readers`: the ``CalibrationDataReader`` protocol (ONNX
  Runtime's shape), ``.npz`` and list readers, feed validation, ``materialize``.
* :mod:`~onnxq.calibration.inputs`: ``InputFiller``, the one place that decides how a language
  model's inputs are filled from token ids (masks, positions, an empty KV cache).
* :mod:`~onnxq.calibration.tokenizer`: ``tokenize`` with a ``tokenizer.json`` or an ONNX tokenizer.
* :mod:`~onnxq.calibration.text`: ``TextReader``, windows of a tokenized text.
* :mod:`~onnxq.calibration.generate`: ``generate_token_ids``, calibration text the float LM samples itself.
* :mod:`~onnxq.calibration.probe`: ``ActivationProbe``, intermediate tensors of a model.
* :mod:`~onnxq.calibration.accumulators`: streaming Hessian, mean/max ``|x|``, mean ``x^2``, row sample.
* :mod:`~onnxq.calibration.blocks`: ``find_blocks``, weight sites grouped into
  transformer blocks for sequential calibration.

No quantization math lives here.
"""
from onnxq.calibration.accumulators import (
    AbsMaxAccumulator,
    AbsMeanAccumulator,
    Accumulator,
    HessianAccumulator,
    MeanSquareAccumulator,
    RowSampler,
    cap_outlier_tokens,
    rows_of,
)
from onnxq.calibration.blocks import NORM_OPS, Block, find_blocks
from onnxq.calibration.generate import generate_token_ids, start_token
from onnxq.calibration.probe import ActivationProbe, collect_statistics
from onnxq.calibration.inputs import InputFiller, InputSpec, input_specs, specs_of_session, validate_feed
from onnxq.calibration.readers import (
    CalibrationDataReader,
    ListReader,
    NpzReader,
    as_reader,
    iter_feeds,
    materialize,
    save_npz,
)
from onnxq.calibration.text import TextReader
from onnxq.calibration.tokenizer import find_tokenizer, tokenize

__all__ = [
    "AbsMaxAccumulator",
    "AbsMeanAccumulator",
    "Accumulator",
    "ActivationProbe",
    "Block",
    "CalibrationDataReader",
    "HessianAccumulator",
    "MeanSquareAccumulator",
    "InputFiller",
    "InputSpec",
    "ListReader",
    "NORM_OPS",
    "NpzReader",
    "RowSampler",
    "TextReader",
    "as_reader",
    "cap_outlier_tokens",
    "collect_statistics",
    "find_blocks",
    "find_tokenizer",
    "generate_token_ids",
    "input_specs",
    "iter_feeds",
    "materialize",
    "rows_of",
    "save_npz",
    "specs_of_session",
    "start_token",
    "tokenize",
    "validate_feed",
]
