"""Where calibration's per-sample forward passes and weight solves run.

The calibration driver (:mod:`onnxq.calibration.driver`) decides *what* runs, block by block; an
:class:`Executor` decides *where*. It holds the calibration feeds and, between blocks, each
sample's cached activations (the inputs of the next blocks), and offers four operations:

* :meth:`Executor.collect`: run a probe model (:class:`~onnxq.calibration.probe.ProbeSpec`) on
  every sample and return the merged statistics (:func:`accumulate_shard` per shard of samples,
  :func:`merge_statistics` over the shards);
* :meth:`Executor.advance`: run the quantized block on every sample and keep, in each sample's
  cache, only what later blocks read (:func:`advance_shard`); with a float probe, also run the
  block as it was before quantization on the float path's values (GPTQ's float target), which
  the cache keeps under :data:`FLOAT_PATH` + name;
* :meth:`Executor.solve`: run the algorithm's weight solves (:func:`run_solve`), possibly in
  parallel; an iterator of the results in job order;
* :meth:`Executor.cache` / :meth:`Executor.restore`: each sample's cached activations, for
  checkpoints (:mod:`onnxq.calibration.checkpoint`).

:class:`InProcessExecutor` (the default) does all of it in this process, one sample at a time.
:class:`onnxq.calibration.ray_executor.RayExecutor` shards the samples over Ray workers
(data-parallel statistics, reduced here) and runs the solves of a block as parallel tasks. Both
call the same functions of this module on the same samples, so the results are the same up to
float summation order (the shards' sums are added in shard order).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from onnxq.calibration.accumulators import (
    AbsMeanAccumulator,
    Accumulator,
    CrossAccumulator,
    HessianAccumulator,
    MeanSquareAccumulator,
    RowSampler,
    cap_outlier_tokens,
    rows_of,
)
from onnxq.calibration.probe import ProbeSpec
from onnxq.errors import OnnxqError

__all__ = [
    "FLOAT_PATH",
    "Executor",
    "InProcessExecutor",
    "SolveJob",
    "StatisticsPlan",
    "accumulate_shard",
    "advance_shard",
    "float_feed",
    "make_executor",
    "merge_statistics",
    "quantized_feed",
    "run_solve",
]

Feed = dict[str, np.ndarray]
Statistics = dict[str, dict[str, Accumulator]]

FLOAT_PATH = "float-path:"
"""Prefix of the cached values the float model computes (``FLOAT_PATH + name``), kept beside the
quantized model's for GPTQ's float target; a name without one reads the same in both models."""


@dataclass(frozen=True)
class StatisticsPlan:
    """Which statistics to accumulate for which input tensors (picklable: sent to workers).

    Attributes:
        names: the input tensors (activations) of the weight groups.
        statistics: the algorithm's ``collected_statistics`` (``hessian``, ``abs_mean``,
            ``sq_mean``, ``rows``).
        sample_rows: rows a ``rows`` statistic keeps per tensor.
        seed: seed of the row sampler's keys.
        outlier_token_ratio: for the ``hessian`` statistic, each sample's rows whose squared norm
            exceeds this multiple of the sample's median are scaled down to it
            (:func:`~onnxq.calibration.accumulators.cap_outlier_tokens`; 0: rows as they are). The
            other statistics always see the rows as they are: on SmolLM2-135M the cap made AWQ's
            and k-quant's results worse and GPTQ's better (docs/INT4_RESULTS.md).
        cross_names: names (of ``names``) that also get the ``cross`` statistic
            (:class:`~onnxq.calibration.accumulators.CrossAccumulator`: these inputs in the
            quantized model against the float model's, from the cache's :data:`FLOAT_PATH` values;
            capped like the Hessian).
    """

    names: tuple[str, ...]
    statistics: tuple[str, ...]
    sample_rows: int = 0
    seed: int = 0
    outlier_token_ratio: float = 0.0
    cross_names: tuple[str, ...] = ()

    def accumulators(self, k: int) -> dict[str, Accumulator]:
        """Fresh accumulators for one input tensor of ``k`` channels."""
        make = {
            "hessian": lambda: HessianAccumulator(k, dtype=np.float32),
            "abs_mean": lambda: AbsMeanAccumulator(k),
            "sq_mean": lambda: MeanSquareAccumulator(k),
            "rows": lambda: RowSampler(self.sample_rows, seed=self.seed, k=k),
        }
        return {name: make[name]() for name in self.statistics}


@dataclass(frozen=True)
class SolveJob:
    """One weight group's solve (picklable): ``get_algorithm(algorithm).solve(group, values, options)``."""

    algorithm: str
    group: Any  # onnxq.algorithms.SiblingGroup
    values: dict[str, Any]
    options: Any


def run_solve(job: SolveJob):
    """Run one :class:`SolveJob`; returns the algorithm's :class:`~onnxq.algorithms.Solution`."""
    from onnxq.algorithms import get_algorithm

    return get_algorithm(job.algorithm).solve(job.group, job.values, job.options)


def quantized_feed(feed: Feed, cache: Feed) -> Feed:
    """What the quantized model reads: the graph inputs and the cached values (not the float path's)."""
    return {**feed, **{name: value for name, value in cache.items() if not name.startswith(FLOAT_PATH)}}


def float_feed(feed: Feed, cache: Feed) -> Feed:
    """What the float model reads: :func:`quantized_feed` with the float path's values in place of theirs."""
    return {**quantized_feed(feed, cache), **{name[len(FLOAT_PATH):]: value for name, value in cache.items()
                                            if name.startswith(FLOAT_PATH)}}


def accumulate_shard(spec: ProbeSpec, plan: StatisticsPlan, feeds: Sequence[Feed], cache: Sequence[Feed],
                     indices: Sequence[int]) -> tuple[Statistics, dict[str, float]]:
    """Statistics of ``plan.names`` over one shard of the samples.

    Args:
        spec: the probe model returning ``plan.names``.
        feeds, cache: the shard's graph-input feeds and cached activations, one per sample.
        indices: each sample's index in the whole run (the row sampler's keys depend on it).

    Returns:
        ``({name: {statistic: accumulator}}, {"forward": s, "statistics": s})``: the shard's
        accumulators (none for a shard without samples) and the seconds spent in onnxruntime and
        in the accumulators.
    """
    stats: Statistics = {}
    seconds = {"forward": 0.0, "statistics": 0.0}
    for feed, cached, index in zip(feeds, cache, indices):
        start = time.perf_counter()
        activations = spec.run(quantized_feed(feed, cached))
        float_activations = spec.run(float_feed(feed, cached)) if plan.cross_names else {}
        middle = time.perf_counter()
        mask = feed.get("attention_mask")
        for name in plan.names:
            x = activations[name]
            if name not in stats:
                stats[name] = plan.accumulators(x.shape[-1])
                if name in plan.cross_names:
                    stats[name]["cross"] = CrossAccumulator(x.shape[-1], plan.outlier_token_ratio)
            rows_mask = mask if mask is not None and mask.size * x.shape[-1] == x.size else None
            for kind, accumulator in stats[name].items():
                if kind == "hessian" and plan.outlier_token_ratio > 0:
                    rows = cap_outlier_tokens(rows_of(x, rows_mask), plan.outlier_token_ratio)
                    accumulator.update(rows, sample=index)
                elif kind == "cross":
                    accumulator.update_pair(x, float_activations[name], rows_mask)
                else:
                    accumulator.update(x, rows_mask, sample=index)
        seconds["forward"] += middle - start
        seconds["statistics"] += time.perf_counter() - middle
    return stats, seconds


def merge_statistics(parts: Sequence[Statistics]) -> Statistics:
    """The shards' statistics merged in shard order (the first shard's accumulators are reused)."""
    merged: Statistics = {}
    for part in parts:
        for name, accumulators in part.items():
            if name not in merged:
                merged[name] = accumulators
                continue
            for stat, accumulator in accumulators.items():
                merged[name][stat].merge(accumulator)
    return merged


def advance_shard(spec: ProbeSpec | None, feeds: Sequence[Feed], cache: Sequence[Feed],
                  keep: frozenset[str], float_spec: ProbeSpec | None = None) -> list[Feed]:
    """Each sample's new cache: ``spec``'s outputs on the sample (the block's values later blocks
    read) added to its cache, and ``float_spec``'s outputs on the float path's values (the same
    block before quantization) under :data:`FLOAT_PATH` + name; then only the names in ``keep``
    (with or without that prefix) kept."""
    advanced = []
    for feed, cached in zip(feeds, cache):
        values = dict(cached)
        if spec is not None:
            values.update(spec.run(quantized_feed(feed, cached)))
        if float_spec is not None:
            values.update({FLOAT_PATH + name: array for name, array in float_spec.run(float_feed(feed, cached)).items()})
        advanced.append({name: array for name, array in values.items()
                         if name in keep or (name.startswith(FLOAT_PATH) and name[len(FLOAT_PATH):] in keep)})
    return advanced


class Executor(Protocol):
    """What the calibration driver asks of an executor (see the module docstring)."""

    name: str
    workers: int

    def load(self, feeds: list[Feed]) -> None: ...

    def example(self) -> Feed: ...

    def collect(self, spec: ProbeSpec, plan: StatisticsPlan) -> tuple[Statistics, dict[str, float]]: ...

    def advance(self, spec: ProbeSpec | None, keep: frozenset[str], float_spec: ProbeSpec | None = None) -> None: ...

    def solve(self, jobs: Iterable[SolveJob]) -> Iterator: ...

    def cache(self) -> Iterator[tuple[int, Feed]]: ...

    def restore(self, cache: list[Feed]) -> None: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Everything in this process: samples one at a time, solves one after another."""

    name = "in-process"
    workers = 1

    def __init__(self) -> None:
        self._feeds: list[Feed] = []
        self._cache: list[Feed] = []

    def load(self, feeds: list[Feed]) -> None:
        self._feeds = list(feeds)
        self._cache = [{} for _ in self._feeds]

    def example(self) -> Feed:
        """The first sample's feed and cached activations (for the types of a probe's inputs)."""
        return quantized_feed(self._feeds[0], self._cache[0])

    def collect(self, spec: ProbeSpec, plan: StatisticsPlan) -> tuple[Statistics, dict[str, float]]:
        return accumulate_shard(spec, plan, self._feeds, self._cache, range(len(self._feeds)))

    def advance(self, spec: ProbeSpec | None, keep: frozenset[str], float_spec: ProbeSpec | None = None) -> None:
        self._cache = advance_shard(spec, self._feeds, self._cache, keep, float_spec)

    def solve(self, jobs: Iterable[SolveJob]) -> Iterator:
        """Each job's solution, in order, computed when asked for (one job's statistics at a time)."""
        return (run_solve(job) for job in jobs)

    def cache(self) -> Iterator[tuple[int, Feed]]:
        yield from enumerate(self._cache)

    def restore(self, cache: list[Feed]) -> None:
        if len(cache) != len(self._feeds):
            raise OnnxqError(f"the checkpoint holds {len(cache)} samples' activations, the run has {len(self._feeds)}")
        self._cache = [dict(c) for c in cache]

    def close(self) -> None:
        self._cache = []


def make_executor(executor: "str | Executor | None", workers: int | None = None) -> Executor:
    """An :class:`Executor` from the ``--executor`` value.

    ``None`` or ``"local"``: :class:`InProcessExecutor`. ``"ray"``: a local Ray instance started on
    demand (or the cluster ``RAY_ADDRESS`` names), ``workers`` processes (default: its CPUs);
    ``"ray://HOST:PORT"``: an existing cluster through Ray Client. An object with the executor's
    methods is returned as it is.

    Raises:
        OnnxqError: an unknown name, Ray not installed, or the cluster unreachable.
    """
    if executor is None or executor == "local":
        return InProcessExecutor()
    if not isinstance(executor, str):
        return executor
    if executor == "ray" or executor.startswith("ray://"):
        from onnxq.calibration.ray_executor import RayExecutor

        return RayExecutor(None if executor == "ray" else executor, workers=workers)
    raise OnnxqError(f"unknown executor {executor!r} (expected local, ray or ray://HOST:PORT)")
