"""GPTQ, AWQ, TEQ and AutoRound through ONNX Runtime: calibrate, solve, rewrite to MatMulNBits.

Sequential mode (the default, as in the GPTQ paper arXiv 2210.17323 sec. 4 and
AWQ arXiv 2306.00978): the weight sites are grouped into transformer blocks
(:func:`onnxq.calibration.find_blocks`) and handled one block at a time:

1. run the block alone in an onnxruntime session (:class:`ActivationProbe` cut at
   the block's inputs), fed with the cached outputs of the blocks before it, which
   are already quantized, and accumulate the statistics of each input tensor of the
   block (GPTQ: ``H = 2/n X^T X``; AWQ: mean ``|x|`` per channel and a reservoir
   sample of rows), so memory holds one block's statistics at a time;
2. solve every weight of the block (:mod:`onnxq.algorithms`); AWQ also folds its
   input scales into the producing norm / Mul / MatMul (or inserts a Mul);
3. rewrite the block's sites to MatMulNBits with exactly the solver's codes;
4. run the quantized block to produce what later blocks read, and cache it.

Within a block all input tensors come from the float block (q/k/v and o, or
up/gate and down, are calibrated together, not one after the other).
Non-sequential mode runs the float model once and collects every input tensor's
statistics in that single pass: faster, but each layer is calibrated on float
inputs that the quantized model will never produce.

Weight sites inside subgraphs (If/Loop bodies) cannot be probed and get RTN.
A weight shared by several nodes gets one quantized copy per node, since the
best quantization depends on each node's input.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxq.algorithms.autoround import autoround_quantize_weight
from onnxq.algorithms.awq import awq_clip_search, awq_search_scale
from onnxq.algorithms.gptq import gptq_quantize_weight
from onnxq.algorithms.teq import teq_quantize_weights
from onnxq.calibration import (
    AbsMeanAccumulator,
    ActivationProbe,
    Block,
    HessianAccumulator,
    RowSampler,
    find_blocks,
    materialize,
)
from onnxq.config import NodeSettings, QuantConfig
from onnxq.core import QuantizedWeight, quantize_weight, relative_error
from onnxq.errors import OnnxqError
from onnxq.passes.matmul_nbits import (
    MatMulToNBitsPass,
    Progress,
    QuantizedNodeRecord,
    block_size_for,
    rtn_weight_quantizer,
)
from onnxq.graph.scale_folding import fold_input_scale
from onnxq.graph.sites import SkippedNode, WeightSite, find_weight_sites, finite_weight

__all__ = ["CalibratedNBitsPass", "BlockReport"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class BlockReport:
    """What calibration did for one block (for logs and the summary)."""

    index: int
    sites: tuple[str, ...]
    seconds: float
    notes: tuple[str, ...]  # e.g. AWQ's chosen alpha and where the scale was folded


@dataclass(frozen=True)
class _Solved:
    qweight: QuantizedWeight
    error: float  # ||W - W_eff|| / ||W|| for the node's effective weight


class CalibratedNBitsPass(ir.passes.InPlacePass):
    """Quantize MatMul/Gemm weights with GPTQ or AWQ calibrated through onnxruntime.

    Args:
        config: ``config.algorithm`` is ``"gptq"`` or ``"awq"``; see :class:`QuantConfig`.
        calibration_data: a ``CalibrationDataReader`` (ORT's protocol), a list of feeds
            or any iterable of feeds (dicts of graph input name -> array).
        progress: ``tqdm.tqdm``-like wrapper (called with ``desc`` and ``unit``).
        providers: onnxruntime execution providers for the calibration sessions.
    """

    def __init__(
        self,
        config: QuantConfig,
        calibration_data,
        progress: Progress | None = None,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__()
        if not config.needs_calibration:
            raise OnnxqError(f"CalibratedNBitsPass needs a calibrated algorithm, got {config.algorithm!r}")
        self.config = config
        self.calibration_data = calibration_data
        self.progress = progress
        self.providers = providers
        self.records: list[QuantizedNodeRecord] = []
        self.skipped: list[SkippedNode] = []
        self.blocks: list[BlockReport] = []
        self._warned_rows = False

    # -- driver -----------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        feeds = materialize(self.calibration_data, config.calibration.samples, model_inputs=model)
        sites, self.skipped = find_weight_sites(model)
        chosen = []
        for site in sites:
            if config.settings_for(site.name) is None:
                self.skipped.append(SkippedNode(site.name, site.node.op_type, config.skip_reason(site.name)))
            else:
                chosen.append(site)
        main = [s for s in chosen if s.node.graph is model.graph]
        nested = [s for s in chosen if s.node.graph is not model.graph]
        if not chosen:
            return ir.passes.PassResult(model, False)
        blocks = find_blocks(model, main)
        logger.info("%s: %d calibration samples, %d sites in %d blocks (%s)", config.algorithm, len(feeds),
                    len(main), len(blocks), "sequential" if config.calibration.sequential else "one pass")
        if config.calibration.sequential:
            self._sequential(model, blocks, feeds)
        else:
            self._one_pass(model, blocks, feeds)
        if nested:
            logger.warning("%d weight sites inside subgraphs cannot be calibrated; they get RTN", len(nested))
            nested_ids = {id(s.node) for s in nested}
            self._rewrite(model, {}, nested_ids, rtn=True)
        return ir.passes.PassResult(model, True)

    def _iterate(self, blocks: list[Block]):
        desc = f"{self.config.algorithm} calibration"
        return self.progress(blocks, desc=desc, unit="block") if self.progress else blocks

    def _sequential(self, model: ir.Model, blocks: list[Block], feeds: list[Feed]) -> None:
        last_use: dict[str, int] = {}
        for block in blocks:
            for name in block.inputs:
                last_use[name] = block.index
        cached: list[Feed] = [{} for _ in feeds]
        for block in self._iterate(blocks):
            start = time.perf_counter()
            stats = self._collect(model, list(block.input_groups), block.inputs, feeds, cached)
            solved, notes = self._solve(model, block.input_groups, stats, editable=block.nodes)
            del stats
            self._rewrite(model, solved, {id(s.node) for s in block.sites})
            needed = [name for name in block.outputs if last_use.get(name, -1) > block.index]
            if needed:
                probe = ActivationProbe(model, needed, feed_names=block.inputs, providers=self.providers)
                for i, feed in enumerate(feeds):
                    cached[i].update(probe.run({**feed, **cached[i]}))
            for values in cached:
                for name in [n for n in values if last_use.get(n, -1) <= block.index]:
                    del values[name]
            self._report(block, start, notes)

    def _one_pass(self, model: ir.Model, blocks: list[Block], feeds: list[Feed]) -> None:
        start = time.perf_counter()
        groups = {name: sites for block in blocks for name, sites in block.input_groups.items()}
        stats = self._collect(model, list(groups), [], feeds, [{} for _ in feeds])
        solved, notes = self._solve(model, groups, stats, editable=None)
        self._rewrite(model, solved, set(solved))
        for block in blocks:
            self.blocks.append(BlockReport(block.index, tuple(s.name for s in block.sites), 0.0, ()))
        logger.info("one-pass calibration and solve: %.1f s; %s", time.perf_counter() - start, "; ".join(notes))

    def _report(self, block: Block, start: float, notes: list[str]) -> None:
        seconds = time.perf_counter() - start
        self.blocks.append(BlockReport(block.index, tuple(s.name for s in block.sites), seconds, tuple(notes)))
        logger.info("block %d (%s): %d sites in %.1f s%s", block.index, block.start, len(block.sites), seconds,
                    "; " + "; ".join(notes) if notes else "")

    # -- statistics ---------------------------------------------------------------
    def _collect(self, model, names: list[str], feed_names: list[str], feeds: list[Feed], cached: list[Feed]) -> dict:
        probe = ActivationProbe(model, names, feed_names=feed_names, providers=self.providers)
        stats: dict[str, list] = {}
        for i, feed in enumerate(feeds):
            activations = probe.run({**feed, **cached[i]})
            mask = feed.get("attention_mask")
            for name in names:
                x = activations[name]
                if name not in stats:
                    k = x.shape[-1]
                    stats[name] = self._accumulators(k, seed=i)
                rows_mask = mask if mask is not None and mask.size * x.shape[-1] == x.size else None
                for accumulator in stats[name]:
                    accumulator.update(x, rows_mask)
        return stats

    def _accumulators(self, k: int, seed: int) -> list:
        """GPTQ: the Hessian; AWQ: mean |x| and a row sample; TEQ / AutoRound: a row sample."""
        algorithm = self.config.algorithm
        if algorithm == "gptq":
            return [HessianAccumulator(k)]
        if algorithm == "awq":
            return [AbsMeanAccumulator(k), RowSampler(self.config.awq.sample_rows, seed=seed, k=k)]
        return [RowSampler(getattr(self.config, algorithm).sample_rows, seed=seed, k=k)]

    # -- solvers ------------------------------------------------------------------
    def _solve(self, model, groups: dict[str, list[WeightSite]], stats: dict, editable) -> tuple[dict, list[str]]:
        solved: dict[int, _Solved] = {}
        notes: list[str] = []
        for name, sites in groups.items():
            if self.config.algorithm == "gptq":
                rows, k = stats[name][0].count, sites[0].k
                if rows < 2 * k and not self._warned_rows:
                    self._warned_rows = True
                    logger.warning("GPTQ: only %d calibration rows for %r (K=%d): the solution may overfit; "
                                   "give more samples or raise gptq.percdamp (said once per run)", rows, name, k)
                for site in sites:
                    solved[id(site.node)] = self._gptq(site, stats[name][0].hessian)
            elif self.config.algorithm == "awq":
                mean_abs, sampler = stats[name]
                solved_group, note = self._awq(model, name, sites, mean_abs.value(), sampler.rows(), editable)
                solved.update(solved_group)
                notes.append(note)
            elif self.config.algorithm == "teq":
                solved_group, note = self._teq(name, sites, stats[name][0].rows(), editable)
                solved.update(solved_group)
                notes.append(note)
            else:
                x = stats[name][0].rows()
                for site in sites:
                    solved[id(site.node)] = self._autoround(site, x)
        return solved, notes

    def _settings(self, site: WeightSite) -> NodeSettings:
        settings = self.config.settings_for(site.name)
        assert settings is not None  # only chosen sites get here
        return settings

    def _gptq(self, site: WeightSite, hessian: np.ndarray) -> _Solved:
        settings = self._settings(site)
        options = self.config.gptq
        weight = finite_weight(site)
        qweight = gptq_quantize_weight(
            weight, hessian, settings.bits, block_size_for(settings.block_size, site.k), settings.symmetric,
            percdamp=options.percdamp, blocksize=options.blocksize, act_order=options.act_order,
            static_groups=options.static_groups, mse_clip=settings.mse_clip, scale_dtype=site.dtype.numpy(),
        )
        return _Solved(qweight, relative_error(weight, qweight))

    def _awq(self, model, name: str, sites: list[WeightSite], mean_abs: np.ndarray, x: np.ndarray,
             editable) -> tuple[dict[int, _Solved], str]:
        settings = [self._settings(site) for site in sites]
        weights = [finite_weight(site) for site in sites]
        first = settings[0]
        search = awq_search_scale(
            weights, x, mean_abs, first.bits, block_size_for(first.block_size, sites[0].k), first.symmetric,
            grid=self.config.awq.grid if self.config.awq.scale_search else 1, scale_dtype=sites[0].dtype.numpy(),
        )
        s = search.scales
        where = "no scale (alpha 0)"
        if search.alpha > 0:
            activation = sites[0].activation
            where = fold_input_scale(sites[0].node.graph, activation, [site.node for site in sites], s,
                                     editable=editable)
        else:
            s = np.ones_like(s)
        scaled_x = x / s
        solved = {}
        for site, weight, st in zip(sites, weights, settings):
            scaled = s[:, None] * weight
            bs = block_size_for(st.block_size, site.k)
            if self.config.awq.clip:
                qweight = awq_clip_search(scaled, scaled_x, st.bits, bs, st.symmetric, scale_dtype=site.dtype.numpy())
            else:
                qweight = quantize_weight(scaled, st.bits, bs, st.symmetric, scale_dtype=site.dtype.numpy())
            effective = qweight.dequantize() / s[:, None]
            error = float(np.linalg.norm(effective - weight) / max(np.linalg.norm(weight), 1e-30))
            solved[id(site.node)] = _Solved(qweight, error)
        gain = 1 - search.loss_by_alpha.min() / search.loss_rtn if search.loss_rtn > 0 else 0.0
        return solved, f"{name}: alpha {search.alpha:.2f} (loss -{gain:.1%} vs RTN), {where}"

    def _teq(self, name: str, sites: list[WeightSite], x: np.ndarray, editable) -> tuple[dict[int, _Solved], str]:
        if self._too_large(sites):
            return {id(site.node): self._rtn(site) for site in sites}, f"{name}: RTN (weights above teq.max_elements)"
        settings = [self._settings(site) for site in sites]
        weights = [finite_weight(site) for site in sites]
        first, options = settings[0], self.config.teq
        result = teq_quantize_weights(
            weights, x, first.bits, block_size_for(first.block_size, sites[0].k), first.symmetric,
            steps=options.steps, **({"lr": options.lr} if options.lr is not None else {}),
            scale_dtype=sites[0].dtype.numpy(),
        )
        s = result.scales
        where = "scales of 1 (RTN was best)"
        if not np.all(s == 1):
            where = fold_input_scale(sites[0].node.graph, sites[0].activation, [site.node for site in sites], s,
                                     editable=editable)
        solved = {}
        for site, weight, st, qweight in zip(sites, weights, settings, result.qweights):
            if st != first:  # a sibling with its own override: RTN of its scaled weight
                qweight = quantize_weight(s[:, None] * weight, st.bits, block_size_for(st.block_size, site.k),
                                          st.symmetric, scale_dtype=site.dtype.numpy())
            effective = qweight.dequantize() / s[:, None]
            error = float(np.linalg.norm(effective - weight) / max(np.linalg.norm(weight), 1e-30))
            solved[id(site.node)] = _Solved(qweight, error)
        gain = 1 - result.loss / result.loss_rtn if result.loss_rtn > 0 else 0.0
        return solved, f"{name}: TEQ loss -{gain:.1%} vs RTN, {where}"

    def _too_large(self, sites: list[WeightSite]) -> bool:
        limit = getattr(self.config, self.config.algorithm).max_elements
        large = [s for s in sites if limit is not None and s.k * s.n > limit]
        for site in large:
            logger.info("%s: %s has %d weights (> max_elements %d): RTN instead", self.config.algorithm, site.name,
                        site.k * site.n, limit)
        return bool(large)

    def _rtn(self, site: WeightSite) -> _Solved:
        settings = self._settings(site)
        qweight, error = rtn_weight_quantizer(site, finite_weight(site), settings, site.dtype.numpy())
        return _Solved(qweight, error)

    def _autoround(self, site: WeightSite, x: np.ndarray) -> _Solved:
        settings, options = self._settings(site), self.config.autoround
        if self._too_large([site]):
            return self._rtn(site)
        weight = finite_weight(site)
        result = autoround_quantize_weight(
            weight, x, settings.bits, block_size_for(settings.block_size, site.k), settings.symmetric,
            steps=options.steps, lr=options.lr, scale_dtype=site.dtype.numpy(),
        )
        return _Solved(result.qweight, relative_error(weight, result.qweight))

    # -- rewrite ------------------------------------------------------------------
    def _rewrite(self, model: ir.Model, solved: dict[int, _Solved], node_ids: set[int], rtn: bool = False) -> None:
        def quantizer(site, weight, settings, scale_dtype):
            if rtn:
                return rtn_weight_quantizer(site, weight, settings, scale_dtype)
            result = solved[id(site.node)]
            return result.qweight, result.error

        rewrite = MatMulToNBitsPass(self.config, weight_quantizer=quantizer,
                                    site_filter=lambda site: id(site.node) in node_ids, share_weights=False)
        rewrite(model)
        self.records.extend(rewrite.records)
