"""What every target format provides, and the settings it is given for one concrete weight.

A :class:`Format` is the only owner of one target op's facts: its kernel limits
(:meth:`Format.validate`, :meth:`Format.resolve_block_size`, :meth:`Format.dtype_reason`),
its byte layout (:meth:`Format.pack`, :meth:`Format.make_nodes`, :meth:`Format.read`),
the exact bytes it stores (:meth:`Format.stored_bytes`) and how it is described
(:meth:`Format.describe`, :meth:`Format.describe_node`). Formats are registered by
name in :mod:`onnxq.formats.registry`; passes, reports and the mixed-precision search
ask the registry instead of knowing an op.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError

__all__ = ["WeightSettings", "WeightLayout", "PackedWeight", "Format", "MS_DOMAIN", "next_power_of_two_block",
           "int_attributes"]

MS_DOMAIN = "com.microsoft"

_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}

Constant = Callable[[np.ndarray, str], ir.Value]
"""``constant(array, name) -> ir.Value``: registers a small constant (a Reshape shape, Slice bounds)."""


@dataclass(frozen=True)
class WeightSettings:
    """The settings of one concrete weight, resolved and checked by its format.

    Unlike :class:`onnxq.config.NodeSettings`, ``block_size`` is the block the format
    writes (never -1): ``Format.resolve`` produced it for the weight's K.

    Attributes:
        bits: code width.
        block_size: elements of K per scale, as stored (None only in :meth:`Format.precheck`, before K is known).
        symmetric: no zero points stored (implied ``2**(bits-1)``, or 0 for signed QDQ codes).
        accuracy_level: MatMulNBits compute mode (other formats ignore it).
        mse_clip: per-block clip-ratio search (an RTN option).
        quant_type: ``"nf4"`` / ``"fp4"``: the codebook of formats that have their own (MatMulBnb4).
        float_zero_points: zero points stored as floats (HQQ), only where the format can.
    """

    bits: int
    block_size: int | None
    symmetric: bool
    accuracy_level: int = 0
    mse_clip: bool = False
    quant_type: str = "nf4"
    float_zero_points: bool = False


@dataclass(frozen=True)
class WeightLayout:
    """How a site stores its weight: ``B = W^T`` (``transposed``) and leading size-1 axes of B."""

    transposed: bool = False
    leading_ones: int = 0


class PackedWeight(Protocol):
    """The constant inputs a format wrote for one weight (shareable between nodes)."""

    def values(self) -> list[ir.Value]: ...

    @property
    def nbytes(self) -> int: ...


def next_power_of_two_block(k: int) -> int:
    """One block spanning K, rounded up to a power of two >= 16 (what -1, per-channel, means)."""
    return max(16, 1 << (k - 1).bit_length())


def int_attributes(node: ir.Node) -> dict[str, int]:
    """The node's integer attributes."""
    return {name: attr.as_int() for name, attr in node.attributes.items() if attr.type == ir.AttributeType.INT}


class Format(ABC):
    """One target op: its limits, layout, stored size and description (see the module docstring).

    Class attributes:
        name: the registry key (``--format`` value for weight formats).
        op_type: the op it writes (``DequantizeLinear`` for QDQ).
        bits: code widths the kernel runs.
        dtypes: weight (= activation / scale) dtypes the CPU kernel runs; others are skipped.
        replaces: ``"node"``: the site's node becomes this op; ``"weight"``: the site keeps its
            node and reads the format's output instead of the float constant (QDQ).
        sites: ``"matmul"`` (MatMul / Gemm / Transpose->MatMul) or ``"gather"`` (embeddings).
        takes_bias: the op has a bias input (else a Gemm bias becomes an ``Add``).
        int_codes: stores integer-grid codes (any algorithm's ``QuantizedWeight``); ``False``:
            the format quantizes with its own codebook (:meth:`quantize`), RTN only.
        embedding_format: the format Gather sites get with ``quantize_embeddings`` (None: none).
        layout: formats with equal layouts can share one packed weight (a tied embedding).
        float_zero_point_bits: code widths with which the kernel reads float zero points (HQQ).
        domain: the op's domain.
    """

    name: ClassVar[str]
    op_type: ClassVar[str]
    bits: ClassVar[tuple[int, ...]]
    dtypes: ClassVar[tuple[ir.DataType, ...]] = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    replaces: ClassVar[str] = "node"
    sites: ClassVar[str] = "matmul"
    takes_bias: ClassVar[bool] = False
    int_codes: ClassVar[bool] = True
    uses_accuracy_level: ClassVar[bool] = False
    embedding_format: ClassVar[str | None] = None
    layout: ClassVar[str] = ""
    float_zero_point_bits: ClassVar[tuple[int, ...]] = ()
    domain: ClassVar[str] = MS_DOMAIN

    # -- limits -----------------------------------------------------------------------------
    def resolve_block_size(self, block_size: int, k: int | None) -> int | None:
        """The block the format writes for ``block_size`` on a weight with ``k`` rows (-1: one block over K).

        ``k=None`` (no weight yet): None when the answer depends on K.
        """
        if block_size != -1:
            return block_size
        return None if k is None else next_power_of_two_block(k)

    @abstractmethod
    def block_size_reason(self, bits: int, block_size: int) -> str | None:
        """Why the kernel refuses ``block_size`` (already resolved) with ``bits``, or None."""

    def validate(self, settings: WeightSettings, k: int | None, n: int | None) -> str | None:
        """Why the kernel cannot run ``settings`` on a ``[k, n]`` weight (one line), or None.

        ``k``/``n`` None, or ``settings.block_size`` None: checks only what does not depend on them.
        """
        if settings.bits not in self.bits:
            if len(self.bits) == 1:
                return f"format {self.name!r} is {self.bits[0]}-bit only, got bits={settings.bits}"
            return f"bits must be {_listed(self.bits)} for {self.op_type}, got {settings.bits!r}"
        if settings.float_zero_points and settings.bits not in self.float_zero_point_bits:
            if not self.float_zero_point_bits:
                return f"{self.op_type} cannot store float zero points (HQQ zero_point 'float' needs format 'nbits')"
            return (f"float zero points work with {_listed(self.float_zero_point_bits)} bits (ORT's CPU "
                    f"{self.op_type} refuses {settings.bits}-bit weights with float zero points)")
        if settings.block_size is None:
            return None
        return self.block_size_reason(settings.bits, settings.block_size)

    def dtype_reason(self, dtype: ir.DataType) -> str | None:
        """Why a weight of ``dtype`` is left in float by this format, or None."""
        if dtype in self.dtypes:
            return None
        return f"{self.op_type} needs {'/'.join(_DTYPE_NAMES[d] for d in self.dtypes)} weights, got {dtype.name}"

    def resolve(self, settings: Any, k: int, n: int, where: str) -> WeightSettings:
        """``settings`` (a :class:`~onnxq.config.NodeSettings`) for a ``[k, n]`` weight, checked.

        Raises:
            OnnxqError: ``"<where>: <reason>"`` when the kernel cannot run them.
        """
        resolved = self._settings(settings, k)
        reason = self.validate(resolved, k, n)
        if reason is not None:
            resolved_from = (f" (block_size -1 resolves to {resolved.block_size} for K={k})"
                             if settings.block_size == -1 else "")
            raise OnnxqError(f"{where}: {reason}{resolved_from}")
        return resolved

    def precheck(self, settings: Any) -> str | None:
        """:meth:`validate` of ``settings`` (a ``NodeSettings``) before any weight is known, for early errors."""
        return self.validate(self._settings(settings, None), None, None)

    def _settings(self, settings: Any, k: int | None) -> WeightSettings:
        return WeightSettings(settings.bits, self.resolve_block_size(settings.block_size, k), settings.symmetric,
                              settings.accuracy_level, settings.mse_clip, settings.quant_type,
                              settings.float_zero_points)

    # -- size and description -----------------------------------------------------------------
    @abstractmethod
    def stored_bytes(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        """Exactly the bytes :meth:`pack` writes for a ``[k, n]`` weight (codes, padding, scales, zero points)."""

    def stored_bits(self, k: int, n: int, settings: WeightSettings, dtype: ir.DataType) -> int:
        """``8 * stored_bytes``: what the mixed-precision budget counts."""
        return 8 * self.stored_bytes(k, n, settings, dtype)

    def describe(self, settings: WeightSettings) -> str:
        """``"int4 block 32 sym"``: the settings as summaries print them."""
        return f"int{settings.bits} block {settings.block_size} {'sym' if settings.symmetric else 'asym'}"

    # -- build --------------------------------------------------------------------------------
    def prepare(self, model: ir.Model) -> bool:
        """Make ``model`` able to hold this op before any site is found (QDQ: opset 21); returns whether it changed."""
        return False

    def node_name(self, base: str, settings: WeightSettings) -> str:
        """The name of the node that replaces the site ``base`` (or of the weight node named after ``base``)."""
        return f"{base}_Q{settings.bits}"

    def quantize(self, weight: np.ndarray, settings: WeightSettings, scale_dtype: ir.DataType) -> Any:
        """The format's own quantization of ``weight: [K, N]`` (formats with ``int_codes = False``)."""
        raise NotImplementedError(f"{self.op_type} stores integer codes; an algorithm quantizes its weights")

    @abstractmethod
    def pack(self, payload: Any, settings: WeightSettings, dtype: ir.DataType, name: str,
             layout: WeightLayout) -> PackedWeight:
        """The initializer values for ``payload`` (a ``QuantizedWeight``, or the format's own weight).

        Values are named ``name + suffix``; the caller makes names unique and registers them.
        """

    @abstractmethod
    def make_nodes(self, activation: ir.Value | None, packed: PackedWeight, settings: WeightSettings, *,
                   name: str, bias: ir.Value | None, constant: Constant) -> tuple[list[ir.Node], ir.Value]:
        """Nodes computing the site from ``activation`` (``replaces == "node"``), or the weight itself
        (``replaces == "weight"``: ``activation`` is None), and their output."""

    # -- read back ------------------------------------------------------------------------------
    @abstractmethod
    def read(self, node: ir.Node) -> Any:
        """The weight a node of this op computes with: a ``[K, N]`` ``QuantizedWeight`` (MatMulBnb4:
        its ``Bnb4Weight``); both have ``dequantize() -> float32 [K, N]``.

        Raises:
            OnnxqError: inputs that are not constants, or a layout onnxq does not read.
        """

    @abstractmethod
    def describe_node(self, node: ir.Node) -> tuple[str, str] | None:
        """``(shape, format)`` of a node of this op for summaries (``"128x512"``, ``"int4 block 32 asym"``),
        or None when the node is not a quantized weight of this format."""


def _listed(values: tuple[int, ...]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])

