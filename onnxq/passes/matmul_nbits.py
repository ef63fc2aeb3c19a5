"""Rewrite every weight site into com.microsoft MatMulNBits.

For each :class:`~onnxq.graph.sites.WeightSite` the pass asks the
algorithm for a :class:`~onnxq.core.QuantizedWeight` (one weight in memory at a
time), asks :mod:`onnxq.formats.matmul_nbits` for the initializers (shared by
every site that uses the same weight with the same settings) and replaces the
node, keeping output names. Float weights left without users are removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxq.algorithms.hqq import hqq_quantize_weight
from onnxq.config import HQQConfig, NodeSettings, QuantConfig
from onnxq.core import QuantizedWeight
from onnxq.core.quantize import quantize_weight_with_error
from onnxq.errors import OnnxqError
from onnxq.formats.matmul_nbits import MS_DOMAIN, MatMulNBitsInitializers, make_matmul_nbits_initializers, make_matmul_nbits_node
from onnxq.graph.sites import SkippedNode, WeightSite, constant_tensor, find_weight_sites, finite_weight

__all__ = ["MatMulToNBitsPass", "QuantizedNodeRecord", "WeightQuantizer", "Progress", "rtn_weight_quantizer", "hqq_weight_quantizer", "block_size_for"]

logger = logging.getLogger(__name__)

Progress = Callable[..., Iterable]
"""Wraps an iterable to show progress; called with keywords ``desc`` and ``unit`` (``tqdm.tqdm`` fits)."""

WeightQuantizer = Callable[[WeightSite, np.ndarray, NodeSettings, np.dtype], tuple[QuantizedWeight, float]]
"""``(site, weight [K, N] float32, settings, scale_dtype) -> (qweight, relative error)``.

The relative error ``||W - W_eff||_F / ||W||_F`` is the algorithm's own account of
how far the node's effective weight moved (an algorithm that folds scales into
other nodes knows what the effective weight is; the pass does not)."""


@dataclass(frozen=True)
class QuantizedNodeRecord:
    """One row of the summary: what happened to one node."""

    name: str
    kind: str
    k: int
    n: int
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    bytes_before: int
    bytes_after: int
    relative_error: float
    shared_with: str | None  # name of the first node that quantized this weight, when shared


@dataclass(frozen=True)
class _QuantizedSource:
    """A weight quantized once and shared by every site that uses it with the same settings."""

    inits: MatMulNBitsInitializers
    first_site: str
    relative_error: float


def rtn_weight_quantizer(
    site: WeightSite, weight: np.ndarray, settings: NodeSettings, scale_dtype
) -> tuple[QuantizedWeight, float]:
    """Round-to-nearest (optionally with per-block MSE clip search)."""
    return quantize_weight_with_error(
        weight, settings.bits, block_size_for(settings.block_size, site.k), settings.symmetric,
        mse_clip=settings.mse_clip, scale_dtype=scale_dtype,
    )


def hqq_weight_quantizer(options: HQQConfig) -> WeightQuantizer:
    """HQQ (half-quadratic zero-point optimisation, calibration-free) as a :data:`WeightQuantizer`."""

    def quantize(site: WeightSite, weight: np.ndarray, settings: NodeSettings, scale_dtype) -> tuple[QuantizedWeight, float]:
        result = hqq_quantize_weight(
            weight, settings.bits, block_size_for(settings.block_size, site.k), settings.symmetric,
            iters=options.iters, scale_dtype=scale_dtype,
            zero_point=options.zero_point if not settings.symmetric else "int",
        )
        return result.qweight, result.error

    return quantize


def block_size_for(block_size: int, k: int) -> int:
    """MatMulNBits needs a power-of-two block >= 16: per-channel (-1) becomes the next power of two >= K."""
    if block_size != -1:
        return block_size
    return max(16, 1 << (k - 1).bit_length())


def _unique_name(taken: set[str], wanted: str) -> str:
    name, i = wanted, 1
    while name in taken:
        name, i = f"{wanted}_{i}", i + 1
    taken.add(name)
    return name


class MatMulToNBitsPass(ir.passes.InPlacePass):
    """Replace MatMul / Gemm / Transpose->MatMul on constant weights with MatMulNBits."""

    def __init__(
        self,
        config: QuantConfig,
        weight_quantizer: WeightQuantizer = rtn_weight_quantizer,
        progress: Progress | None = None,
        *,
        site_filter: Callable[[WeightSite], bool] | None = None,
        share_weights: bool = True,
    ) -> None:
        """
        Args:
            config: what to quantize and how.
            weight_quantizer: computes each site's quantized weight (default: RTN).
            progress: wraps the list of sites (``tqdm.tqdm``-like, called with ``desc`` and ``unit``).
            site_filter: only sites it accepts are considered (others are left alone, unreported).
            share_weights: quantize a weight used by several sites once (RTN); calibrated
                quantizers, whose result depends on each site's input, pass ``False``.
        """
        super().__init__()
        self.config = config
        self.weight_quantizer = weight_quantizer
        self.progress = progress
        self.site_filter = site_filter
        self.share_weights = share_weights
        self.records: list[QuantizedNodeRecord] = []
        self.skipped: list[SkippedNode] = []
        self.quantized_weights: dict[tuple, tuple[ir.Value, MatMulNBitsInitializers]] = {}
        """``(site.weight_key, settings) -> (source value, initializers)`` of every weight quantized,
        for later passes that share them (a tied embedding's GatherBlockQuantized)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites, self.skipped = find_weight_sites(model)
        if self.site_filter is not None:
            sites = [site for site in sites if self.site_filter(site)]
            self.skipped = []
        chosen: list[tuple[WeightSite, NodeSettings]] = []
        for site in sites:
            settings = self.config.settings_for(site.name)
            if settings is None:
                self.skipped.append(SkippedNode(site.name, site.node.op_type, self.config.skip_reason(site.name)))
            else:
                chosen.append((site, settings))
        if not chosen:
            return ir.passes.PassResult(model, False)
        taken = {v.name for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()}
        cache: dict[tuple, _QuantizedSource] = {}
        for site, settings in self.progress(chosen, desc="quantizing", unit="node") if self.progress else chosen:
            key = (site.weight_key if self.share_weights else id(site.node), settings)
            if key not in cache:
                cache[key] = self._quantize_site(site, settings, taken)
            entry = cache[key]
            self.quantized_weights[key] = (site.source, entry.inits)
            self._replace(site, settings, entry.inits, taken)
            self.records.append(QuantizedNodeRecord(
                site.name, site.kind, site.k, site.n, settings.bits, entry.inits.block_size,
                settings.symmetric, settings.accuracy_level, site.k * site.n * site.dtype.itemsize,
                entry.inits.nbytes, entry.relative_error,
                None if entry.first_site == site.name else entry.first_site,
            ))
        _remove_unused(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        before = sum(r.bytes_before for r in self.records if r.shared_with is None)
        after = sum(r.bytes_after for r in self.records if r.shared_with is None)
        logger.info(
            "MatMulNBits: quantized %d nodes (%d unique weights), skipped %d; weights %.1f MB -> %.1f MB",
            len(self.records), len(cache), len(self.skipped), before / 1e6, after / 1e6,
        )
        return ir.passes.PassResult(model, True)

    def _quantize_site(self, site: WeightSite, settings: NodeSettings, taken: set[str]) -> _QuantizedSource:
        weight = finite_weight(site)
        scale_dtype = site.dtype
        qweight, error = self.weight_quantizer(site, weight, settings, scale_dtype.numpy())
        del weight
        _release(site.tensor)
        inits = make_matmul_nbits_initializers(qweight, scale_dtype, site.source.name or site.name)
        for value in inits.values():
            value.name = _unique_name(taken, value.name)
            _owner_graph(site).register_initializer(value)
        return _QuantizedSource(inits, site.name, error)

    def _replace(self, site: WeightSite, settings: NodeSettings, inits: MatMulNBitsInitializers, taken: set[str]) -> None:
        graph = site.node.graph
        bias = None
        if site.bias is not None:
            bias_array = np.asarray(constant_tensor(site.bias).numpy(), dtype=np.float32).reshape(-1) * np.float32(site.beta)
            bias_name = _unique_name(taken, f"{site.name}_bias")
            bias_tensor = ir.tensor(bias_array.astype(site.dtype.numpy()), dtype=site.dtype, name=bias_name)
            bias = ir.Value(name=bias_name, shape=ir.Shape([site.n]), type=ir.TensorType(site.dtype), const_value=bias_tensor)
            graph.register_initializer(bias)
        node = make_matmul_nbits_node(
            site.node.inputs[0], inits, accuracy_level=settings.accuracy_level, bias=bias,
            name=f"{site.name}_Q{settings.bits}",
        )
        new_nodes = [node]
        result = node.outputs[0]
        if site.output_rank_gap:
            axes = ir.Value(name=_unique_name(taken, f"{site.name}_unsqueeze_axes"),
                            const_value=ir.tensor(np.arange(site.output_rank_gap, dtype=np.int64)))
            axes.shape, axes.type = ir.Shape([site.output_rank_gap]), ir.TensorType(ir.DataType.INT64)
            graph.register_initializer(axes)
            unsqueeze = ir.node("Unsqueeze", [result, axes], name=f"{site.name}_unsqueeze")
            new_nodes.append(unsqueeze)
            result = unsqueeze.outputs[0]
        ir.convenience.replace_nodes_and_values(
            graph, site.node, [site.node], new_nodes, [site.node.outputs[0]], [result]
        )


def _release(tensor: ir.TensorProtocol) -> None:
    """Unmap a memory-mapped external weight once it is quantized, so resident memory stays at one weight.

    The tensor maps its file again if it is read later (another site with other settings).
    """
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # someone still holds a view of the data: leave the mapping alone
            pass


def _owner_graph(site: WeightSite) -> ir.Graph:
    """The graph whose initializers hold the site's weight (outer scopes are visible to subgraphs)."""
    return site.source.graph if site.source.is_initializer() else site.node.graph


def _remove_unused(model: ir.Model) -> None:
    """Drop nodes (Transpose, Constant) and float initializers that lost all their users."""
    for graph in (model.graph, *model.graph.subgraphs()):
        changed = True
        while changed:
            changed = False
            for node in reversed(list(graph)):
                if node.op_type in ("Transpose", "Constant") and node.domain == "" and not any(
                    out.uses() or out.is_graph_output() for out in node.outputs
                ):
                    graph.remove(node, safe=True)
                    changed = True
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                if value.is_graph_input():
                    graph.inputs.remove(value)
                del graph.initializers[name]
