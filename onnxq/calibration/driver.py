"""The calibration driver: statistics through ONNX Runtime, solves by the algorithm registry, rewrite by the pass.

Sequential mode (the default, as in the GPTQ paper arXiv 2210.17323 sec. 4 and
AWQ arXiv 2306.00978): the weight sites are grouped into transformer blocks
(:func:`onnxq.calibration.find_blocks`) and handled one block at a time:

1. run the block alone in an onnxruntime session (:class:`ActivationProbe` cut at
   the block's inputs), fed with the cached outputs of the blocks before it, which
   are already quantized, and accumulate the statistics the algorithm declares for
   each input tensor of the block (:mod:`onnxq.algorithms.registry`: the Hessian, mean
   ``|x|``, a row sample), so memory holds one block's statistics at a time;
2. solve every sibling group of the block (the weights reading one input tensor) with
   the algorithm; an input scale it returns (AWQ, TEQ) is folded into the producing
   norm / Mul / MatMul of the block, or a Mul is inserted (:mod:`onnxq.graph.scale_folding`);
3. rewrite the block's sites into the configured format with exactly the solver's codes
   (:class:`~onnxq.passes.quantize_weights.QuantizeWeightsPass`);
4. run the quantized block to produce what later blocks read, and cache it.

Where the per-sample runs and the solves happen is the executor's business
(:mod:`onnxq.calibration.executor`: in this process by default, or sharded over Ray workers,
:mod:`onnxq.calibration.ray_executor`); with a checkpoint folder each finished block is saved
and a rerun resumes after the last one (:mod:`onnxq.calibration.checkpoint`).

Within a block all input tensors come from the float block (q/k/v and o, or
up/gate and down, are calibrated together, not one after the other).

The float target (``gptq.float_target`` / ``awq.float_target``, sequential mode only) runs a second, float path beside
the quantized one: step 4 also runs the block as it was before its rewrite on the float path's
cached values (kept under :data:`~onnxq.calibration.executor.FLOAT_PATH` names), and step 1 also
accumulates ``X_q^T X_f`` (the ``"cross"`` statistic) for each input tensor that a normalization
produces (:func:`~onnxq.graph.scale_folding.is_norm_output`: q/k/v, up/gate), except the lm_head
(the last site whose output reaches a graph output) and a weight an embedding Gather reads too. The
residual-stream writers (o_proj, down_proj) keep plain GPTQ: fitted to the float outputs as well,
they took SmolLM2-135M's perplexity from 50 to 289 (docs/INT4_RESULTS.md, sixth session).
One-pass mode runs the float model once and collects every input tensor's
statistics in that single pass: faster, but each layer is calibrated on float
inputs that the quantized model will never produce.

Weight sites inside subgraphs (If/Loop bodies) cannot be probed and get RTN, as do
embeddings (``quantize_embeddings``), except a tied embedding, which reads its calibrated
lm_head's packed weight; an algorithm whose statistics are optional (k_quant) solves those
sites itself, without statistics. A weight shared by several nodes gets one
quantized copy per node, since the best quantization depends on each node's input.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.algorithms import SiblingGroup, Solution, get_algorithm
from onnxq.calibration.accumulators import Accumulator
from onnxq.calibration.blocks import Block, find_blocks
from onnxq.calibration.checkpoint import Checkpoint, GroupSolution, fingerprint
from onnxq.calibration.executor import Executor, SolveJob, StatisticsPlan, make_executor
from onnxq.calibration.probe import ActivationProbe
from onnxq.calibration.readers import materialize
from onnxq.config import QuantConfig
from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError
from onnxq.formats import WeightSettings, get_format
from onnxq.graph.scale_folding import fold_input_scale, is_norm_output
from onnxq.graph.sites import WeightSite, find_gather_sites, finite_weight, lm_head_site
from onnxq.passes.quantize_weights import Progress, QuantizeResult, QuantizeWeightsPass, plan_sites, solver_for

__all__ = ["BlockReport", "CalibrationResult", "calibrate_and_quantize"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class BlockReport:
    """What calibration did for one block (for logs and the summary).

    ``stages``: seconds per stage: ``forward`` and ``statistics`` (onnxruntime runs and
    accumulator updates, summed over the executor's shards), ``collect`` (their wall time),
    ``solve``, ``write`` (folding and rewriting), ``advance`` (running the quantized block for the
    next blocks' inputs), ``checkpoint``; empty for a block replayed from a checkpoint.
    """

    index: int
    sites: tuple[str, ...]
    seconds: float
    notes: tuple[str, ...]  # e.g. AWQ's chosen alpha and where the scale was folded
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class CalibrationResult(QuantizeResult):
    """:class:`QuantizeResult` of every rewrite, plus one report per calibrated block.

    ``input_scales``: site name -> the per-input-channel scale ``s: [K]`` its input was divided
    by (AWQ, TEQ; folded into a producer or an inserted ``Mul``): the site's effective weight is
    its dequantized weight with row ``k`` divided by ``s[k]``.
    """

    blocks: list[BlockReport] = field(default_factory=list)
    input_scales: dict[str, np.ndarray] = field(default_factory=dict)


def calibrate_and_quantize(
    model: ir.Model,
    config: QuantConfig,
    calibration_data,
    *,
    progress: Progress | None = None,
    providers: list[str] | None = None,
    executor: "str | Executor | None" = None,
    checkpoint: "str | os.PathLike | None" = None,
) -> CalibrationResult:
    """Quantize ``model`` in place with ``config.algorithm``, calibrated on ``calibration_data``.

    Args:
        model: the float model (rewritten in place).
        config: an ``algorithm`` that uses calibration data (gptq, awq, teq, autoround, k_quant, ...), the
            format and settings.
        calibration_data: a ``CalibrationDataReader`` (ORT's protocol), a list of feeds or any
            iterable of feeds (dicts of graph input name -> array).
        progress: ``tqdm.tqdm``-like wrapper (called with ``desc`` and ``unit``).
        providers: onnxruntime execution providers for the calibration sessions.
        executor: where samples and solves run: ``None``/``"local"`` (this process), ``"ray"`` (a
            local Ray instance started on demand), ``"ray://HOST:PORT"`` or an
            :class:`~onnxq.calibration.executor.Executor` (see :func:`make_executor`); an executor
            made here is closed at the end, one passed in is not.
        checkpoint: a folder where each finished block is saved; a rerun of the same model,
            settings and data resumes after the last saved block.

    Raises:
        OnnxqError: calibration data missing or not matching the model's inputs, settings the
            format cannot run, the executor unavailable, a checkpoint of another run.
    """
    return _Driver(config, progress, providers).run(model, calibration_data, executor, checkpoint)


class _Driver:
    def __init__(self, config: QuantConfig, progress: Progress | None, providers: list[str] | None) -> None:
        self.config = config
        self.algorithm = get_algorithm(config.algorithm)
        self.options = self.algorithm.options_of(config)
        self.progress = progress
        self.providers = providers
        self.result: CalibrationResult | None = None
        self.settings: dict[int, WeightSettings] = {}
        self.site_nodes: list[ir.Node] = []
        self.executor: Executor | None = None
        self.checkpoint: Checkpoint | None = None
        self.samples = 0
        self._warned_rows = False
        self.float_target = self.algorithm.float_target(self.options)
        self._lm_head: ir.Node | None = None  # not fitted to the float outputs
        self._tables: set[int] = set()  # ids of the constants embedding Gathers read: nor are these

    def run(self, model: ir.Model, calibration_data, executor=None, checkpoint=None) -> CalibrationResult:
        config = self.config
        prepared = get_format(config.format).prepare(model)
        feeds = materialize(calibration_data, config.calibration.samples, model_inputs=model)
        self.samples = len(feeds)
        planned, skipped = plan_sites(model, config, embeddings=False)
        self.result = result = CalibrationResult(model, prepared, skipped=skipped)
        self.settings = {id(plan.site.node): plan.settings for plan in planned}
        self.site_nodes = [plan.site.node for plan in planned]  # their weights are quantized as they are now
        main = [plan.site for plan in planned if plan.site.node.graph is model.graph]
        nested = {id(plan.site.node) for plan in planned if plan.site.node.graph is not model.graph}
        if main:
            if self.float_target:
                head = lm_head_site(main, model.graph)
                self._lm_head = None if head is None else head.node
                self._tables = {id(site.source) for site in find_gather_sites(model)[0]}
            blocks = find_blocks(model, main)
            if checkpoint is not None:
                self.checkpoint = Checkpoint(checkpoint, fingerprint(model, config.to_dict(), feeds), len(blocks))
            self.executor = make_executor(executor)
            owned = self.executor is not executor
            logger.info("%s: %d calibration samples, %d sites in %d blocks (%s, %s)", config.algorithm, len(feeds),
                        len(main), len(blocks), "sequential" if config.calibration.sequential else "one pass",
                        self.executor.name if self.executor.workers == 1 else
                        f"{self.executor.name}, {self.executor.workers} workers")
            try:
                self.executor.load(feeds)
                if config.calibration.sequential:
                    self._sequential(model, blocks)
                else:
                    self._one_pass(model, blocks)
            finally:
                if owned:
                    self.executor.close()
        uncalibrated = self.algorithm if not self.algorithm.calibrated else get_algorithm("rtn")
        if nested:
            logger.warning("%d weight sites inside subgraphs cannot be calibrated; they get %s", len(nested),
                           uncalibrated.name)
        if nested or config.quantize_embeddings is not False:
            gather_outputs = {site.name: (site.node.outputs[0].name, site.dtype) for site in find_gather_sites(model)[0]}
            before = len(result.records)
            self._rewrite(model, QuantizeWeightsPass(  # a tied embedding shares its calibrated lm_head's weight
                config, solver_for(uncalibrated, self.options if uncalibrated is self.algorithm else None),
                site_filter=lambda site: site.is_embedding or id(site.node) in nested, reuse=result.by_weight))
            self._unscale_tied_gathers(model, result.records[before:], gather_outputs)
        return result

    def _unscale_tied_gathers(self, model: ir.Model, records, gather_outputs: dict[str, tuple]) -> None:
        """A tied table read from a packed lm_head whose input AWQ/TEQ scaled holds ``s[:, None] * W``:
        the rows the Gather returns are ``E[ids] * s``, so its output is divided by ``s`` again."""
        values = {v.name: v for node in model.graph for v in node.outputs}
        for record in records:
            scale = self.result.input_scales.get(record.shared_with or "")
            name, dtype = gather_outputs.get(record.name, ("", None))
            output = values.get(name)
            if scale is None or output is None:
                continue
            consumers = list(dict.fromkeys(user for user, _ in output.uses()))
            if any(output is v for v in model.graph.outputs):
                raise OnnxqError(f"the tied embedding {record.name!r} is a graph output: it cannot share the "
                                 f"scaled weight of {record.shared_with!r} (use --no-quantize-embeddings)")
            where = fold_input_scale(model.graph, output, consumers, scale, dtype=dtype, frozen=self.site_nodes)
            logger.info("tied embedding %s reads %s's scaled weight: %s", record.name, record.shared_with, where)

    def _iterate(self, blocks: list[Block]):
        desc = f"{self.config.algorithm} calibration"
        return self.progress(blocks, desc=desc, unit="block") if self.progress else blocks

    def _probe(self, model: ir.Model, names: list[str], feed_names: list[str], example: Feed):
        """The probe model of ``names`` cut at ``feed_names``; ``example``: one sample's feed (for the
        types of inputs the graph leaves undeclared)."""
        return ActivationProbe(model, names, feed_names=feed_names, providers=self.providers).spec(example)

    def _plan(self, names: list[str], cross_names: tuple[str, ...] = ()) -> StatisticsPlan:
        statistics = tuple(self.algorithm.collected_statistics)
        if cross_names and "hessian" not in statistics:  # the float target's fit needs it (AWQ)
            statistics += ("hessian",)
        rows = self.algorithm.sample_rows(self.options) if "rows" in statistics else 0
        return StatisticsPlan(tuple(names), statistics, rows,
                              outlier_token_ratio=float(self.config.calibration.outlier_token_ratio),
                              cross_names=cross_names)

    def _float_target_names(self, block: Block) -> tuple[str, ...]:
        """The block's input tensors whose groups are fitted to the float model's outputs (module docstring)."""
        return tuple(name for name, sites in block.input_groups.items()
                     if is_norm_output(sites[0].activation)
                     and not any(site.node is self._lm_head or id(site.source) in self._tables for site in sites))

    def _replayed(self, block: Block) -> list[GroupSolution]:
        groups = self.checkpoint.load_block(block.index)
        for entry in groups:
            sites = block.input_groups.get(entry.input_name, [])
            if tuple(s.name for s in sites) != entry.site_names:
                raise OnnxqError(f"checkpoint {self.checkpoint.directory} does not match block {block.index}: "
                                 f"remove it or give another --checkpoint folder")
        return groups

    def _report(self, block: Block, seconds: float, notes: list[str], stages: dict[str, float]) -> None:
        self.result.blocks.append(BlockReport(block.index, tuple(s.name for s in block.sites), seconds, tuple(notes),
                                              stages))
        timing = ", ".join(f"{stage} {value:.2f}" for stage, value in stages.items())
        logger.info("block %d (%s): %d sites in %.1f s%s%s", block.index, block.start, len(block.sites), seconds,
                    f" ({timing})" if timing else " (from the checkpoint)", "; " + "; ".join(notes) if notes else "")

    def _sequential(self, model: ir.Model, blocks: list[Block]) -> None:
        last_use: dict[str, int] = {}
        for block in blocks:
            for name in block.inputs:
                last_use[name] = block.index
        done = set(self.checkpoint.done) if self.checkpoint else set()
        if done and not self.checkpoint.complete:
            self.executor.restore(self.checkpoint.load_cache(self.samples))
        for block in self._iterate(blocks):
            start = time.perf_counter()
            if block.index in done:
                solved, notes = self._apply(block, self._replayed(block), editable=block.nodes)
                self._rewrite_solved(model, solved)
                self._report(block, time.perf_counter() - start, notes, {})
                continue
            names = list(block.input_groups)
            example = self.executor.example()  # one fetch per block (a remote one on Ray), for both probes
            needed = [name for name in block.outputs if last_use.get(name, -1) > block.index]
            # the float path's next values: this block before its rewrite (a probe holds its own weights)
            float_probe = self._probe(model, needed, block.inputs, example) if self.float_target and needed else None
            plan = self._plan(names, self._float_target_names(block) if self.float_target else ())
            if plan.cross_names:
                logger.info("block %d: float target for %s", block.index, ", ".join(plan.cross_names))
            stats, stages = self.executor.collect(self._probe(model, names, block.inputs, example), plan)
            stages["collect"] = time.perf_counter() - start
            mark = time.perf_counter()
            groups = self._solve(block.input_groups, stats)
            del stats
            stages["solve"] = time.perf_counter() - mark
            mark = time.perf_counter()
            solved, notes = self._apply(block, groups, editable=block.nodes)
            self._rewrite_solved(model, solved)
            stages["write"] = time.perf_counter() - mark
            mark = time.perf_counter()
            keep = frozenset(name for name, last in last_use.items() if last > block.index)
            self.executor.advance(self._probe(model, needed, block.inputs, example) if needed else None, keep,
                                  float_probe)
            stages["advance"] = time.perf_counter() - mark
            if self.checkpoint is not None:
                mark = time.perf_counter()
                self.checkpoint.save_block(block.index, groups, self.executor.cache())
                stages["checkpoint"] = time.perf_counter() - mark
            self._report(block, time.perf_counter() - start, notes, stages)

    def _one_pass(self, model: ir.Model, blocks: list[Block]) -> None:
        start = time.perf_counter()
        done = set(self.checkpoint.done) if self.checkpoint else set()
        by_block = {block.index: self._replayed(block) for block in blocks if block.index in done}
        todo = [block for block in blocks if block.index not in done]
        if todo:
            groups = {name: sites for block in todo for name, sites in block.input_groups.items()}
            stats, stages = self.executor.collect(self._probe(model, list(groups), [], self.executor.example()),
                                                  self._plan(list(groups)))
            logger.info("one-pass statistics: %.1f s (forward %.1f s, statistics %.1f s)", time.perf_counter() - start,
                        stages["forward"], stages["statistics"])
            solutions = self._solve(groups, stats, lazily=True)
            for block in self._iterate(todo):  # the solves of all blocks run at once; saved block by block
                by_block[block.index] = [next(solutions) for _ in block.input_groups]
                if self.checkpoint is not None:
                    self.checkpoint.save_block(block.index, by_block[block.index], None)
            del stats
        all_notes: list[str] = []
        solved: dict[int, tuple[QuantizedWeight, float]] = {}
        for block in blocks:  # every fold first, then one rewrite: as if solved in one go
            block_solved, notes = self._apply(block, by_block[block.index], editable=None)
            solved.update(block_solved)
            all_notes += notes
            self.result.blocks.append(BlockReport(block.index, tuple(s.name for s in block.sites), 0.0, tuple(notes)))
        self._rewrite_solved(model, solved)
        logger.info("one-pass calibration and solve: %.1f s; %s", time.perf_counter() - start, "; ".join(all_notes))

    # -- statistics ---------------------------------------------------------------
    def _values(self, name: str, accumulators: dict[str, Accumulator], k: int) -> dict[str, Any]:
        """The accumulated statistics as the algorithm reads them (``count``: rows seen)."""
        values: dict[str, Any] = {"count": next(iter(accumulators.values())).count}
        for stat, accumulator in accumulators.items():
            values[stat] = {"hessian": lambda a: a.hessian, "abs_mean": lambda a: a.value(),
                            "sq_mean": lambda a: a.value(), "rows": lambda a: a.rows(),
                            "cross": lambda a: a.cross}[stat](accumulator)
        if "hessian" in accumulators and values["count"] < 2 * k and not self._warned_rows:
            self._warned_rows = True
            logger.warning("%s: only %d calibration rows for %r (K=%d): the solution may overfit; give more "
                           "samples or raise the damping (said once per run)", self.algorithm.name, values["count"],
                           name, k)
        return values

    # -- solve and rewrite -------------------------------------------------------------
    def _solve(self, groups: dict[str, list[WeightSite]], stats: dict, lazily: bool = False):
        """One :class:`GroupSolution` per group of ``groups``, in order, from the executor (a list, or
        with ``lazily`` an iterator yielding each as it is needed). A separable algorithm's group is
        one job per weight (the jobs of a group share one statistics dict), so an executor with
        several workers solves q/k/v or gate/up side by side."""
        separable = self.algorithm.separable

        def jobs():
            for name, sites in groups.items():
                values = self._values(name, stats[name], sites[0].k)
                for part in ([[site] for site in sites] if separable else [sites]):
                    group = SiblingGroup(name, tuple(s.name for s in part), [finite_weight(s) for s in part],
                                         [self.settings[id(s.node)] for s in part], part[0].dtype.numpy())
                    yield SolveJob(self.algorithm.name, group, values, self.options)

        def solutions():
            results = self.executor.solve(jobs())
            for name, sites in groups.items():
                parts = [next(results) for _ in (sites if separable else [None])]
                yield GroupSolution(name, tuple(s.name for s in sites), parts[0] if len(parts) == 1 else Solution(
                    [q for p in parts for q in p.qweights], [e for p in parts for e in p.errors], None,
                    "; ".join(dict.fromkeys(p.note for p in parts if p.note))))

        return solutions() if lazily else list(solutions())

    def _apply(self, block: Block, groups: list[GroupSolution], editable) -> tuple[dict, list[str]]:
        """Fold each group's input scale (in order) and return ``{id(site.node): (qweight, error)}``
        and one note per group."""
        solved: dict[int, tuple[QuantizedWeight, float]] = {}
        notes: list[str] = []
        for entry in groups:
            sites, solution = block.input_groups[entry.input_name], entry.solution
            for site, qweight, error in zip(sites, solution.qweights, solution.errors):
                solved[id(site.node)] = (qweight, error)
            if solution.input_scale is not None:
                self.result.input_scales.update({site.name: solution.input_scale for site in sites})
                where = fold_input_scale(sites[0].node.graph, sites[0].activation, [s.node for s in sites],
                                         solution.input_scale, editable=editable, dtype=sites[0].dtype,
                                         frozen=self.site_nodes)
                notes.append(f"{solution.note}, {where}")
            elif solution.note:
                notes.append(f"{solution.note}, no input scale")
        return solved, notes

    def _rewrite_solved(self, model: ir.Model, solved: dict[int, tuple[QuantizedWeight, float]]) -> None:
        self._rewrite(model, QuantizeWeightsPass(
            self.config, lambda site, weight, settings: solved[id(site.node)], embeddings=False,
            site_filter=lambda site: id(site.node) in solved, share_weights=False))

    def _rewrite(self, model: ir.Model, rewrite: QuantizeWeightsPass) -> None:
        step = rewrite(model)
        self.result.records += step.records
        self.result.skipped += step.skipped
        self.result.packed.update(step.packed)
        for key, source in step.by_weight.items():
            self.result.by_weight.setdefault(key, source)
        self.result.modified = self.result.modified or step.modified
