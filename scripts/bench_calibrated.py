"""GPTQ stage speed against this machine's own BLAS rate, measured in one run.

Times, in this process and in this order:

* ``sgemm``: one ``[4096, 4096] @ [4096, 4096]`` float32 numpy matmul (best of 3), the
  machine's reference rate (2 * 4096^3 FLOP);
* ``hessian``: :class:`onnxq.calibration.HessianAccumulator` (float32 product, float64 sum)
  fed ``--hessian-samples`` samples of ``--tokens`` rows at ``K = 4096`` (the issue's figure is
  128 x 2048 tokens; fewer samples give the same rate), 2 * T * K^2 FLOP;
* ``solve``: :func:`onnxq.algorithms.gptq_solve` (int4, block 128, symmetric, defaults
  otherwise) on ``K x N`` weights 4096x4096, 4096x11008 and 11008x4096 (a 7B-shaped
  block's q/k/v/o, gate/up and down projections), 2 * K^2 * N + K^3 / 3 FLOP (lazy-batch
  updates plus the Cholesky).

Each stage prints its best and median time over ``--repeat`` runs, its GFLOP/s, the ratio of
its rate to sgemm's, and the ratio of its time to one sgemm. ``--compare DIR`` also times the
``gptq_solve`` of another checkout (e.g. ``git worktree add /tmp/gptq_base HEAD~1``),
interleaved with this one's (old, new, old, new, ...) so both see the same load. The load
average is printed at the start and the end: the machine is shared.

    python scripts/bench_calibrated.py                           # everything, about 2-5 min on 2 cores
    python scripts/bench_calibrated.py --shapes 4096x4096 --repeat 3 --compare /tmp/gptq_base
    python scripts/bench_calibrated.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxq.algorithms import gptq_solve
from onnxq.calibration import HessianAccumulator

SGEMM_N = 4096


def load_other_solver(checkout: Path) -> Callable:
    """``gptq_solve`` from another checkout's ``onnxq/algorithms/gptq.py`` (its registry decorator
    is left out, so it does not clash with this checkout's registered algorithm)."""
    source = (checkout / "onnxq" / "algorithms" / "gptq.py").read_text()
    module = types.ModuleType("onnxq_other_gptq")
    sys.modules[module.__name__] = module
    exec(compile(source.split("@register_algorithm")[0], str(checkout / "gptq.py"), "exec"), module.__dict__)  # noqa: S102 (our own source)
    return module.gptq_solve


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def problem(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A ``[K, N]`` weight and a full-rank ``[K, K]`` Hessian ``2/T X^T X`` with correlated inputs."""
    rng = np.random.default_rng(seed)
    t = 2 * k
    x = rng.standard_normal((t, k), dtype=np.float32)
    x[:, 1:] += 0.5 * x[:, :-1]  # neighbouring channels correlated, as in real activations
    x *= rng.lognormal(0.0, 1.0, k).astype(np.float32)  # uneven channel scales
    acc = HessianAccumulator(k, dtype=np.float32)
    acc.update(x)
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    return w, acc.hessian


def report(name: str, times: list[float], flop: float, sgemm_s: float) -> dict:
    best, median = min(times), statistics.median(times)
    rate = flop / median / 1e9
    sgemm_rate = 2 * SGEMM_N**3 / sgemm_s / 1e9
    print(f"{name:34s} best {best:7.2f} s  median {median:7.2f} s  {rate:6.1f} GFLOP/s  "
          f"{rate / sgemm_rate:5.2f}x sgemm rate  {median / sgemm_s:5.2f}x one sgemm's time", flush=True)
    return {"stage": name, "best_s": best, "median_s": median, "gflops": rate,
            "rate_vs_sgemm": rate / sgemm_rate, "time_vs_sgemm": median / sgemm_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="K x N weights to solve")
    parser.add_argument("--repeat", type=int, default=1, help="runs per solve (median reported)")
    parser.add_argument("--hessian-samples", type=int, default=8, help="samples for the Hessian stage (0: skip)")
    parser.add_argument("--tokens", type=int, default=2048, help="rows per Hessian sample")
    parser.add_argument("--compare", type=Path, help="another checkout whose gptq_solve is timed interleaved")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()

    print(f"load average at start: {load()}  (cores: {os.cpu_count()})", flush=True)
    a = np.random.default_rng(1).standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
    sgemm_s = min(timed(lambda: np.matmul(a, a)) for _ in range(3))
    rows = [report(f"sgemm {SGEMM_N}^3 (best of 3)", [sgemm_s], 2 * SGEMM_N**3, sgemm_s)]

    if args.hessian_samples:
        k = 4096
        x = np.random.default_rng(2).standard_normal((args.tokens, k), dtype=np.float32)
        acc = HessianAccumulator(k, dtype=np.float32)
        seconds = timed(lambda: [acc.update(x) for _ in range(args.hessian_samples)]) + timed(lambda: acc.hessian)
        flop = 2.0 * args.hessian_samples * args.tokens * k * k
        rows.append(report(f"hessian {args.hessian_samples} x {args.tokens} tokens, K={k}", [seconds], flop, sgemm_s))
        del x, acc

    other = load_other_solver(args.compare) if args.compare else None
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.lower().split("x"))
        w, h = problem(k, n)
        flop = 2.0 * k * k * n + k**3 / 3.0
        new_times, old_times = [], []
        for _ in range(args.repeat):
            if other is not None:
                old_times.append(timed(lambda w=w, h=h: other(w, h, 4, 128, True)))
            new_times.append(timed(lambda w=w, h=h: gptq_solve(w, h, 4, 128, True)))
        if other is not None:
            rows.append(report(f"solve {k}x{n} b128 ({args.compare})", old_times, flop, sgemm_s))
        rows.append(report(f"solve {k}x{n} b128", new_times, flop, sgemm_s))
    print(f"load average at end: {load()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"load_end": load(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
