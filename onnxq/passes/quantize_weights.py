"""The one weight-quantization pass: every weight site rewritten into the configured format.

:func:`plan_sites` is the single place where a model's weight sites meet the settings:
node selection and overrides (:class:`~onnxq.config.QuantConfig`), then the site's format
(:mod:`onnxq.formats`) skips weights of a dtype its kernel does not run and resolves and
checks the settings for the concrete weight (block size -1 becomes the block it writes).
``quantize``, ``inspect``, the mixed-precision search and the calibration driver all plan
through it, so they agree on what is quantized and how.

:class:`QuantizeWeightsPass` then, for each planned site, asks a :data:`WeightSolver`
(an algorithm; the format itself for formats with their own codebook) for the quantized
weight, asks the format to pack it (once per weight shared by several sites with the same
settings, e.g. a tied embedding and its lm_head) and rewrites the site:

* formats that replace the node (MatMulNBits, MatMulBnb4, MatMulFpQ4, GatherBlockQuantized):
  the site's node becomes the op, keeping the output name; a Gemm bias goes into the op's
  bias input or an ``Add`` after it;
* formats that replace the weight (QDQ): the site keeps its node and reads the format's
  ``DequantizeLinear`` instead of the float constant.

Float weights left without users are removed. The pass returns a :class:`QuantizeResult`
with the per-node records, the skipped nodes with their reasons and the packed weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir

from onnxq.algorithms import Algorithm, SiblingGroup, get_algorithm
from onnxq.config import NodeSettings, QuantConfig
from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError
from onnxq.formats import MS_DOMAIN, Format, PackedWeight, WeightLayout, WeightSettings, get_format
from onnxq.graph.constants import add_initializer
from onnxq.graph.edit import (
    insert_at_source,
    owner_graph,
    redirect_weight,
    register_values,
    release,
    remove_unused,
    replace_site,
)
from onnxq.graph.names import initializer_names, node_names, unique_name
from onnxq.graph.sites import SkippedNode, WeightSite, find_gather_sites, find_weight_sites, finite_weight

__all__ = ["PackedSource", "PlannedSite", "QuantizedNodeRecord", "QuantizeResult", "QuantizeWeightsPass", "WeightSolver", "Progress",
           "plan_sites", "solver_for"]

logger = logging.getLogger(__name__)

Progress = Callable[..., Iterable]
"""Wraps an iterable to show progress; called with keywords ``desc`` and ``unit`` (``tqdm.tqdm`` fits)."""

WeightSolver = Callable[[WeightSite, np.ndarray, WeightSettings], tuple[QuantizedWeight, float]]
"""``(site, weight [K, N] float32, resolved settings) -> (qweight, relative error)``.

(The pass's own RTN solver gets float16/bfloat16 weights as stored and checks NaN/Inf itself.)

The relative error ``||W - W_eff||_F / ||W||_F`` is the algorithm's own account of how far
the node's effective weight moved (an algorithm that folds scales elsewhere knows it)."""


@dataclass(frozen=True)
class PlannedSite:
    """A site that will be quantized: its format and its settings, resolved for its weight."""

    site: WeightSite
    format: Format
    settings: WeightSettings


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
    accuracy_level: int | None  # None: the format has no accuracy level (QDQ, GatherBlockQuantized, ...)
    bytes_before: int
    bytes_after: int
    relative_error: float
    shared_with: str | None  # name of the first node that quantized this weight, when shared


@dataclass
class QuantizeResult(ir.passes.PassResult):
    """The pass's result: the model, whether it changed, and what happened to each node.

    Attributes:
        records: one per quantized node, in graph order of the sites.
        skipped: nodes left in float, with the reason.
        packed: site name -> the packed weight it reads (shared weights appear once per site).
        by_weight: ``(site.weight_key, settings, layout)`` -> the first packed source of that weight,
            for a later pass to share (a tied embedding quantized after its calibrated lm_head).
    """

    records: list[QuantizedNodeRecord] = field(default_factory=list)
    skipped: list[SkippedNode] = field(default_factory=list)
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    by_weight: dict[tuple, "PackedSource"] = field(default_factory=dict)


def plan_sites(
    model: ir.Model,
    config: QuantConfig,
    *,
    embeddings: bool | None = None,
    site_filter: Callable[[WeightSite], bool] | None = None,
    reuse: Mapping[tuple, "PackedSource"] | None = None,
) -> tuple[list[PlannedSite], list[SkippedNode]]:
    """The weight sites ``config`` quantizes, each with its format and resolved settings, and the skipped ones.

    Embeddings follow ``config.quantize_embeddings``. A tied table, a Gather table that is also a
    MatMul site's weight, is planned with its MatMul's settings, so both read one packed weight
    (unless an override names the Gather itself): in the "auto" mode (None) only tied tables are
    quantized, at ``config.tied_embedding_bits`` unless an override names the MatMul; with
    ``True`` every table; with ``False`` none, and the MatMuls tied to one stay in float too.

    Args:
        model: the model (not modified).
        config: node selection, settings and ``format``.
        embeddings: ``False`` plans no Gather sites at all (the calibration driver's MatMul-only
            passes); ``True`` every table; ``None`` what ``config.quantize_embeddings`` says.
            MatMul settings never depend on it, so passes over parts of a model agree.
        site_filter: only sites it accepts are planned (others are neither planned nor reported).
        reuse: ``QuantizeResult.by_weight`` of earlier passes: a table tied to a MatMul those passes
            already rewrote is planned with that MatMul's settings (the calibrated lm_head).

    Raises:
        OnnxqError: ``node '<name>' (KxN): <reason>`` when the format's kernel cannot run a
            node's settings (checked for every planned site before any work is done).
    """
    fmt = get_format(config.format)
    sites, skipped = find_weight_sites(model)
    gathers, skipped_gathers = find_gather_sites(model) if fmt.embedding_format is not None else ([], [])
    packed_before = {key[0]: key[1] for key in reuse or {}}  # weights an earlier pass packed (and rewrote)
    matmul_keys = {s.weight_key for s in sites} | set(packed_before)
    tied = {g.weight_key: g.name for g in gathers if g.weight_key in matmul_keys}
    mode = config.quantize_embeddings
    tied_settings: dict[tuple, NodeSettings | WeightSettings | None] = {}
    if mode is not False:  # a tied table follows its MatMul (auto: at tied_embedding_bits)
        for key in tied:
            matmul = next((s for s in sites if s.weight_key == key), None)
            if matmul is None:
                tied_settings[key] = packed_before[key]
            else:
                tied_settings[key] = (_tied_settings(config, matmul, fmt) if mode is None
                                      else config.settings_for(matmul.name))
    wanted = mode if embeddings is None else embeddings
    if wanted and fmt.embedding_format is None:
        logger.warning("format %r has no quantized Gather; embeddings are left in float", config.format)
    if wanted is True:
        sites += gathers
        skipped += skipped_gathers
    elif wanted is None:
        sites += [g for g in gathers if g.weight_key in tied]
    if site_filter is not None:
        sites = [site for site in sites if site_filter(site)]
        skipped = []
    planned = []
    for site in sites:
        site_format = get_format(fmt.embedding_format) if site.is_embedding else fmt
        follows = site.weight_key in tied_settings and not (site.is_embedding and (
            config.override_for(site.name) is not None or (mode is True and tied_settings[site.weight_key] is None)))
        if follows:
            settings = tied_settings[site.weight_key]
            reason = None if settings is not None else (
                config.skip_reason(site.name) if not site.is_embedding else "its tied MatMul stays in float")
        elif mode is False and site.weight_key in tied and not site.is_embedding:
            settings, reason = None, (f"tied to embedding {tied[site.weight_key]!r}, kept in float with it "
                                      "(--quantize-embeddings quantizes both, shared)")
        else:
            settings = config.settings_for(site.name)
            reason = config.skip_reason(site.name) if settings is None else None
        if reason is None:
            reason = site_format.dtype_reason(site.dtype)
        if reason is not None:
            skipped.append(SkippedNode(site.name, site.node.op_type, reason))
            continue
        if not isinstance(settings, WeightSettings):
            settings = site_format.resolve(settings, site.k, site.n, f"node {site.name!r} ({site.k}x{site.n})")
        planned.append(PlannedSite(site, site_format, settings))
    return planned, skipped


def _tied_settings(config: QuantConfig, matmul: WeightSite, fmt: Format) -> NodeSettings | None:
    """The settings a tied table and its MatMul share in the "auto" mode (None: both stay in float);
    float zero points (HQQ) only where the format stores them at those bits."""
    settings = config.settings_for(matmul.name)
    if settings is None or config.override_for(matmul.name) is not None:
        return settings
    bits = config.tied_embedding_bits
    return replace(settings, bits=bits,
                   float_zero_points=settings.float_zero_points and bits in fmt.float_zero_point_bits)


def solver_for(algorithm: Algorithm, options: Any) -> WeightSolver:
    """A calibration-free algorithm (RTN, HQQ) as a :data:`WeightSolver`, one weight at a time."""
    if algorithm.calibrated:
        raise OnnxqError(f"algorithm {algorithm.name!r} needs calibration data (calibration_data_reader, or "
                         "--calib-data or --generate-calib)")

    def solve(site: WeightSite, weight: np.ndarray, settings: WeightSettings) -> tuple[QuantizedWeight, float]:
        group = SiblingGroup(site.name, (site.name,), [weight], [settings], site.dtype.numpy())
        solution = algorithm.solve(group, {}, options)
        return solution.qweights[0], solution.errors[0]

    return solve


def _config_solver(config: QuantConfig) -> WeightSolver:
    algorithm = get_algorithm(config.algorithm)
    return solver_for(algorithm, algorithm.options_of(config))


def _stored_weight(site: WeightSite) -> np.ndarray:
    """The site's ``[K, N]`` weight in its stored dtype, a view of the tensor (memory-mapped for external
    data); ``site.weight()`` (float32) when Gemm's alpha scales it."""
    if site.alpha != 1.0:
        return site.weight()
    data = site.tensor.numpy()
    data = data.reshape(data.shape[-2:])
    return data.T if site.transpose else data


@dataclass(frozen=True)
class PackedSource:
    """A weight packed once and shared by every site that uses it with the same settings (or a tied embedding)."""

    packed: PackedWeight
    first_site: str
    relative_error: float
    weight_output: ir.Value | None  # the format's output that sites read (formats replacing the weight)


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace MatMul / Gemm / Transpose->MatMul (and Gather embeddings) weights by ``config.format``.

    Args:
        config: what to quantize and how (``format``, settings, node selection, ``quantize_embeddings``).
        solver: computes each site's quantized weight (default: ``config.algorithm``, which must
            be calibration-free; the calibration driver passes its solved weights).
        progress: wraps the list of sites (``tqdm.tqdm``-like, called with ``desc`` and ``unit``).
        embeddings: also quantize Gather embeddings (default ``config.quantize_embeddings``).
        site_filter: only sites it accepts are considered (others are left alone, unreported).
        share_weights: quantize a weight used by several sites once; calibrated solvers, whose
            result depends on each site's input, pass ``False``.
        reuse: ``QuantizeResult.by_weight`` of earlier passes: a site whose weight (and settings)
            an earlier pass packed reads those initializers instead of packing its own.
        sink: called with each packed initializer as soon as it is registered (e.g.
            :meth:`onnxq.io.StreamedSave.write`, which writes it to the output and frees it).
    """

    def __init__(
        self,
        config: QuantConfig,
        solver: WeightSolver | None = None,
        progress: Progress | None = None,
        *,
        embeddings: bool | None = None,
        site_filter: Callable[[WeightSite], bool] | None = None,
        share_weights: bool = True,
        reuse: Mapping[tuple, PackedSource] | None = None,
        sink: Callable[[ir.Value], None] | None = None,
    ) -> None:
        super().__init__()
        self.sink = sink
        self.config = config
        self.format = get_format(config.format)
        self.solver = solver
        self.progress = progress
        self.embeddings = embeddings
        self.site_filter = site_filter
        self.share_weights = share_weights
        self.reuse = reuse or {}

    def call(self, model: ir.Model) -> QuantizeResult:
        prepared = self.format.prepare(model)
        planned, skipped = plan_sites(model, self.config, embeddings=self.embeddings, site_filter=self.site_filter,
                                      reuse=self.reuse)
        result = QuantizeResult(model, prepared, skipped=skipped)
        if not planned:
            return result
        solver = self.solver or _config_solver(self.config)
        taken, names = initializer_names(model), node_names(model)
        cache: dict[tuple, PackedSource] = {}
        for plan in self.progress(planned, desc="quantizing", unit="node") if self.progress else planned:
            site, fmt = plan.site, plan.format
            weight_key = (site.weight_key, plan.settings, fmt.layout or fmt.name)
            key = weight_key if self.share_weights else (id(site.node), *weight_key[1:])
            if key not in cache:
                cache[key] = self.reuse.get(weight_key) or self._quantize(plan, solver, taken, names)
            entry = cache[key]
            result.by_weight.setdefault(weight_key, entry)
            self._rewrite(plan, entry, taken)
            result.packed[site.name] = entry.packed
            result.records.append(QuantizedNodeRecord(
                site.name, site.kind, site.k, site.n, plan.settings.bits, plan.settings.block_size,
                plan.settings.symmetric, plan.settings.accuracy_level if fmt.uses_accuracy_level else None,
                site.k * site.n * site.dtype.itemsize, entry.packed.nbytes, entry.relative_error,
                None if entry.first_site == site.name else entry.first_site,
            ))
        remove_unused(model)
        if any(plan.format.domain == MS_DOMAIN for plan in planned):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        result.modified = True
        unique = [r for r in result.records if r.shared_with is None]
        logger.info("%s: quantized %d nodes (%d unique weights), skipped %d; weights %.1f MB -> %.1f MB",
                    self.format.op_type, len(result.records), len(cache), len(skipped),
                    sum(r.bytes_before for r in unique) / 1e6, sum(r.bytes_after for r in unique) / 1e6)
        return result

    def _quantize(self, plan: PlannedSite, solver: WeightSolver, taken: set[str], names: set[str]) -> PackedSource:
        site, fmt, settings = plan.site, plan.format, plan.settings
        # RTN's kernel finds NaN/Inf itself (its block min/max carry them into a NaN error): no separate
        # pass; it reads float16/bfloat16 weights as stored, converting tile by tile
        checked_by_solver = fmt.int_codes and self.solver is None and self.config.algorithm == "rtn" and not settings.mse_clip
        weight = _stored_weight(site) if checked_by_solver else finite_weight(site)
        if fmt.int_codes:
            payload, error = solver(site, weight, settings)
            if checked_by_solver and not math.isfinite(error):
                finite_weight(site)  # raises the one-line error naming the node and the count
        else:
            payload = fmt.quantize(weight, settings, site.dtype)
            error = float(np.linalg.norm(payload.dequantize() - weight) / max(np.linalg.norm(weight), 1e-30))
        del weight
        release(site.tensor)
        base = site.source.name or site.name
        layout = WeightLayout(site.transpose, len(site.tensor.shape) - 2)
        packed = fmt.pack(payload, settings, site.dtype, base, layout)
        del payload
        register_values(owner_graph(site), packed.values(), taken)
        if self.sink is not None:
            for value in packed.values():
                self.sink(value)
        output = None
        if fmt.replaces == "weight":
            name = unique_name(names, fmt.node_name(base, settings))
            nodes, output = fmt.make_nodes(None, packed, settings, name=name, bias=None,
                                           constant=self._constant(site.node.graph, taken))
            for node in nodes:
                insert_at_source(site.node.graph, site.source, node)
        return PackedSource(packed, site.name, error, output)

    def _rewrite(self, plan: PlannedSite, entry: PackedSource, taken: set[str]) -> None:
        site, fmt, settings = plan.site, plan.format, plan.settings
        if fmt.replaces == "weight":
            redirect_weight(site, entry.weight_output)
            return
        graph = site.node.graph
        bias = None
        if fmt.takes_bias and site.bias is not None:
            bias = add_initializer(graph, site.bias_vector().astype(site.dtype.numpy()), f"{site.name}_bias", taken,
                                   site.dtype)
        # the site's current input: an earlier rewrite may have replaced the node that produced site.activation
        nodes, output = fmt.make_nodes(site.node.inputs[1 if site.is_embedding else 0], entry.packed, settings,
                                       name=fmt.node_name(site.name, settings), bias=bias,
                                       constant=self._constant(graph, taken))
        replace_site(site, nodes, output, taken, add_bias=not fmt.takes_bias)

    @staticmethod
    def _constant(graph: ir.Graph, taken: set[str]) -> Callable[[np.ndarray, str], ir.Value]:
        return lambda array, name: add_initializer(graph, array, name, taken)
