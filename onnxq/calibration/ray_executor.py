"""Calibration on Ray: samples sharded over workers, statistics reduced here, solves in parallel.

Data-parallel calibration (docs/SCALING.md). :meth:`RayExecutor.load` splits the calibration
samples into ``workers`` contiguous shards and puts each shard's feeds, and later its cached
activations, in Ray's object store: no worker owns state, so a task that dies with its worker is
retried by Ray on another worker (``max_retries``) from the same inputs, with the same result.
Per block:

* ``collect``: one task per shard runs the block's probe model
  (:class:`~onnxq.calibration.probe.ProbeSpec`, put once) on its samples and returns partial
  statistics (:func:`~onnxq.calibration.executor.accumulate_shard`: Hessian sums, ``|x|`` sums,
  row samples); they are merged here in shard order;
* ``solve``: one task per weight group (:func:`~onnxq.calibration.executor.run_solve`);
* ``advance``: one task per shard runs the quantized block and returns the shard's new cache,
  which stays in the object store (only a reference comes back).

Each task takes one CPU and runs onnxruntime and BLAS on one thread (Ray sets
``OMP_NUM_THREADS=1`` for one-CPU tasks), so ``workers`` tasks fill ``workers`` cores.

``ONNXQ_RAY_KILL_ONCE=KIND:PATH`` (``KIND``: collect, advance or solve) is a fault-injection
hook for tests: the first task of that kind to start, if ``PATH`` does not exist yet, creates it
and kills its own worker process with SIGKILL.
"""
from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from onnxq.calibration.executor import (
    SolveJob,
    StatisticsPlan,
    accumulate_shard,
    advance_shard,
    merge_statistics,
    quantized_feed,
    run_solve,
)
from onnxq.calibration.probe import ProbeSpec
from onnxq.errors import OnnxqError

__all__ = ["RayExecutor"]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
TASK_RETRIES = 3
"""Times Ray reruns a task whose worker died (on top of the first try)."""


def _fault_point(kind: str) -> None:
    wanted, _, marker = os.environ.get("ONNXQ_RAY_KILL_ONCE", "").partition(":")
    if wanted != kind or not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _one_thread(spec: ProbeSpec | None) -> ProbeSpec | None:
    if spec is not None:
        spec.threads = 1
    return spec


def _collect_task(spec: ProbeSpec, plan: StatisticsPlan, feeds: list[Feed], cache: list[Feed], indices: list[int]):
    _fault_point("collect")
    return accumulate_shard(_one_thread(spec), plan, feeds, cache, indices)


def _advance_task(spec: ProbeSpec | None, feeds: list[Feed], cache: list[Feed], keep: frozenset[str],
                  float_spec: ProbeSpec | None = None) -> list[Feed]:
    _fault_point("advance")
    return advance_shard(_one_thread(spec), feeds, cache, keep, _one_thread(float_spec))


def _solve_task(algorithm: str, group, values: dict, options):
    _fault_point("solve")
    return run_solve(SolveJob(algorithm, group, values, options))


def _first_task(feeds: list[Feed], cache: list[Feed]) -> Feed:
    return quantized_feed(feeds[0], cache[0])


class RayExecutor:
    """:class:`~onnxq.calibration.executor.Executor` on a Ray cluster (see the module docstring).

    Args:
        address: ``None``: a local Ray instance with ``workers`` CPUs, started here and shut down
            by :meth:`close` (or the cluster in ``RAY_ADDRESS``); ``"ray://HOST:PORT"``: an
            existing cluster through Ray Client (onnxq must be installed on its nodes).
        workers: shards of the samples and parallel tasks (default: the cluster's CPUs).

    Raises:
        OnnxqError: Ray is not installed, or the cluster cannot be reached.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise OnnxqError("--executor ray needs Ray: pip install 'onnxq[ray]'") from None
        if workers is not None and workers < 1:
            raise OnnxqError(f"workers must be >= 1, got {workers}")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            self._connect(address, workers)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(cpus, 1)
        options = {"num_cpus": 1, "max_retries": TASK_RETRIES, "retry_exceptions": False}
        self._collect = ray.remote(**options)(_collect_task)
        self._advance = ray.remote(**options)(_advance_task)
        self._solve = ray.remote(**options)(_solve_task)
        self._first = ray.remote(**options)(_first_task)
        self._feeds: list[Any] = []
        self._cache: list[Any] = []
        self._indices: list[list[int]] = []
        logger.info("ray executor: %d workers on a cluster of %d CPUs", self.workers, cpus)

    def _connect(self, address: str | None, workers: int | None) -> None:
        ray = self._ray
        where = address or os.environ.get("RAY_ADDRESS") or "a local Ray instance"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Ray Client's timeout warning: the error line says it
                if address is None and not os.environ.get("RAY_ADDRESS"):
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, grpc errors, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxqError(f"cannot start or reach {where}: {reason}") from None
        self._started = True

    def _get(self, refs):
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OnnxqError):
                raise OnnxqError(str(cause)) from None
            raise OnnxqError(f"a Ray task failed: {str(exc).strip().splitlines()[-1]}") from None
        except self._ray.exceptions.RayError as exc:
            raise OnnxqError(f"a Ray task was lost: {str(exc).strip().splitlines()[0]}") from None

    def load(self, feeds: list[Feed]) -> None:
        """Split the samples into ``workers`` contiguous shards and put them in the object store."""
        ray = self._ray
        shards = [list(part) for part in np.array_split(np.arange(len(feeds)), self.workers) if part.size]
        self._indices = [[int(i) for i in part] for part in shards]
        self._feeds = [ray.put([feeds[i] for i in part]) for part in self._indices]
        self._cache = [ray.put([{} for _ in part]) for part in self._indices]

    def example(self) -> Feed:
        return self._get(self._first.remote(self._feeds[0], self._cache[0]))

    def collect(self, spec: ProbeSpec, plan: StatisticsPlan):
        """Every shard's statistics, merged here in shard order as they are fetched (this process
        holds the merged sums and one shard's partial sums at a time)."""
        spec_ref = self._ray.put(spec)
        refs = [self._collect.remote(spec_ref, plan, feeds, cache, indices)
                for feeds, cache, indices in zip(self._feeds, self._cache, self._indices)]
        seconds = {"forward": 0.0, "statistics": 0.0}
        merged: dict = {}
        for i in range(len(refs)):
            stats, part_seconds = self._get(refs[i])
            refs[i] = None  # the shard's partial sums leave the object store once merged
            merged = merge_statistics([merged, stats])
            for key in seconds:
                seconds[key] += part_seconds[key]
        return merged, seconds

    def advance(self, spec: ProbeSpec | None, keep: frozenset[str], float_spec: ProbeSpec | None = None) -> None:
        spec_ref = self._ray.put(spec)
        float_ref = self._ray.put(float_spec)
        self._cache = [self._advance.remote(spec_ref, feeds, cache, keep, float_ref)
                       for feeds, cache in zip(self._feeds, self._cache)]
        # wait, so that this block's time is this block's (a failed shard is raised by the next get)
        self._ray.wait(self._cache, num_returns=len(self._cache), fetch_local=False)

    def solve(self, jobs: Iterable[SolveJob]) -> Iterator:
        """Every job submitted at once; the solutions in job order, each waited for when asked for."""
        shared: dict[int, tuple[dict, Any]] = {}  # id(values) -> (values, its object-store copy): put once
        refs = []
        for job in jobs:
            if id(job.values) not in shared:
                shared[id(job.values)] = (job.values, self._ray.put(job.values))
            refs.append(self._solve.remote(job.algorithm, job.group, shared[id(job.values)][1], job.options))
        del shared
        return (self._get(ref) for ref in refs)

    def cache(self) -> Iterator[tuple[int, Feed]]:
        for indices, ref in zip(self._indices, self._cache):
            yield from zip(indices, self._get(ref))

    def restore(self, cache: list[Feed]) -> None:
        total = sum(len(part) for part in self._indices)
        if len(cache) != total:
            raise OnnxqError(f"the checkpoint holds {len(cache)} samples' activations, the run has {total}")
        self._cache = [self._ray.put([cache[i] for i in part]) for part in self._indices]

    def close(self) -> None:
        self._feeds, self._cache = [], []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False
