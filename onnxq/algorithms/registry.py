"""Weight-quantization algorithms by name: what statistics each needs, and one ``solve`` per sibling group.

An algorithm solves a :class:`SiblingGroup` (the weights that read one input tensor,
e.g. q/k/v) from the statistics of that input into a :class:`Solution`: one
``QuantizedWeight`` per weight plus, optionally, a per-input-channel scale ``s: [K]``
that the caller divides the input by (AWQ, TEQ). The calibration driver
(:mod:`onnxq.calibration.driver`) collects exactly the statistics an algorithm
declares; calibration-free algorithms (RTN, HQQ) declare none and solve one weight
at a time inside the quantization pass. An algorithm may also declare *optional*
statistics (k_quant): it then runs like a calibration-free one, ``stats == {}``, when no
calibration data is given, and through the driver, with those statistics, when data is
given. No graph code here.

Statistics (names the driver knows how to accumulate, per input tensor ``x: [T, K]``):

* ``"hessian"``: ``H = 2/n X^T X`` float64 ``[K, K]`` (GPTQ);
* ``"abs_mean"``: mean ``|x|`` per channel ``[K]`` (AWQ);
* ``"sq_mean"``: mean ``x^2`` per channel ``[K]`` float64 (k_quant's importance, ``diag(H) / 2``);
* ``"rows"``: a reservoir sample of rows ``[T', K]`` (AWQ, TEQ, AutoRound);
* ``"cross"``: ``C = 2/n X_q^T X_f`` float64 ``[K, K]``, the quantized model's input rows against
  the float model's (GPTQ's float target); not declared in ``statistics``: the driver adds it
  for an algorithm whose :meth:`Algorithm.float_target` says so, on the inputs it applies to;
* ``"count"`` is always given: the number of rows seen.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError

__all__ = ["STATISTICS", "SiblingGroup", "Solution", "Algorithm", "register_algorithm", "get_algorithm",
           "algorithm_names", "registered_algorithms", "effective_error"]

STATISTICS = ("hessian", "abs_mean", "sq_mean", "rows")


@dataclass(frozen=True)
class SiblingGroup:
    """Weights that read one input tensor, solved together.

    Attributes:
        input_name: the input tensor's name (for notes and logs).
        names: the sites' names, one per weight.
        weights: float32 ``[K, N_i]`` (read-only views may be memory-mapped: never modify them).
        settings: each weight's resolved :class:`~onnxq.formats.base.WeightSettings`.
        scale_dtype: the dtype scales are stored in (the activation's).
    """

    input_name: str
    names: tuple[str, ...]
    weights: Sequence[np.ndarray]
    settings: Sequence[Any]
    scale_dtype: np.dtype


@dataclass(frozen=True)
class Solution:
    """What an algorithm made of a :class:`SiblingGroup`.

    Attributes:
        qweights: one per weight, quantizing ``input_scale[:, None] * W_i`` when a scale is given.
        errors: ``||W_i - W_eff||_F / ||W_i||_F`` of each weight's effective weight
            (``dequant / input_scale[:, None]`` with a scale).
        input_scale: float32 ``[K]``: the group's input must be divided by it, or None.
        note: one short line for the block's log (e.g. AWQ's chosen alpha).
    """

    qweights: list[QuantizedWeight]
    errors: list[float]
    input_scale: np.ndarray | None = None
    note: str = ""


class Algorithm(ABC):
    """One registered algorithm.

    Class attributes:
        name: the ``algorithm`` / ``--algo`` value.
        statistics: statistics of each input tensor it needs (empty: it runs without data).
        optional_statistics: statistics it uses when calibration data is given (and solves
            without, from ``{}``, when not).
        options_field: the :class:`~onnxq.config.QuantConfig` field holding its options, or "".
        options_type: the frozen dataclass of those options (validated on construction).
        separable: each weight of a group is solved on its own from the group's statistics (no
            shared input scale), so the calibration driver may run one solve per weight, in
            parallel on an executor's workers (GPTQ, k_quant).
    """

    name: ClassVar[str]
    statistics: ClassVar[tuple[str, ...]] = ()
    optional_statistics: ClassVar[tuple[str, ...]] = ()
    options_field: ClassVar[str] = ""
    options_type: ClassVar[type | None] = None
    separable: ClassVar[bool] = False

    @property
    def calibrated(self) -> bool:
        """Whether it needs calibration data."""
        return bool(self.statistics)

    @property
    def uses_calibration(self) -> bool:
        """Whether it uses calibration data when some is given (needed or optional)."""
        return bool(self.statistics or self.optional_statistics)

    @property
    def collected_statistics(self) -> tuple[str, ...]:
        """What the calibration driver collects for it: the needed statistics, then the optional ones."""
        return self.statistics + tuple(s for s in self.optional_statistics if s not in self.statistics)

    def float_target(self, options: Any) -> bool:
        """Whether its solve fits the float model's outputs, and so wants the ``"cross"`` statistic
        (the quantized model's inputs against the float model's) where the driver can give it."""
        return False

    def float_zero_points(self, options: Any) -> bool:
        """Whether its solutions carry float zero points (only formats that store them can take them)."""
        return False

    def options_of(self, config: Any) -> Any:
        """Its options from a :class:`~onnxq.config.QuantConfig` (None when it has none)."""
        return getattr(config, self.options_field) if self.options_field else None

    def sample_rows(self, options: Any) -> int:
        """Rows the ``"rows"`` statistic keeps per input tensor."""
        return getattr(options, "sample_rows", 0)

    @abstractmethod
    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        """Quantize ``group`` given the statistics of its input (``{}`` without calibration data)."""


_BY_NAME: dict[str, Algorithm] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.name in _BY_NAME:
        raise ValueError(f"algorithm {cls.name!r} is registered twice")
    unknown = set(cls.statistics + cls.optional_statistics) - set(STATISTICS)
    if unknown:
        raise ValueError(f"algorithm {cls.name!r} needs unknown statistics {sorted(unknown)}")
    _BY_NAME[cls.name] = cls()
    return cls


def registered_algorithms() -> list[Algorithm]:
    """Every registered algorithm, in registration order."""
    return list(_BY_NAME.values())


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm's name, in registration order."""
    return tuple(_BY_NAME)


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``.

    Raises:
        OnnxqError: no such algorithm.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise OnnxqError(f"algorithm must be one of {algorithm_names()}, got {name!r}") from None


def effective_error(weight: np.ndarray, qweight: QuantizedWeight, input_scale: np.ndarray | None) -> float:
    """``||W - dequant(Q) / s[:, None]||_F / ||W||_F`` (``s`` = ``input_scale``, or 1)."""
    effective = qweight.dequantize()
    if input_scale is not None:
        effective = effective / input_scale[:, None]
    return float(np.linalg.norm(effective - weight) / max(np.linalg.norm(weight), 1e-30))
