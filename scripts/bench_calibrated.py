"""Calibrated quantization speed against this machine's own BLAS rate, measured in one run.

Times, in this process and in this order:

* ``sgemm``: one ``[4096, 4096] @ [4096, 4096]`` float32 numpy matmul (best of 3), the
  machine's reference rate (2 * 4096^3 FLOP);
* ``hessian``: :class:`onnxq.calibration.HessianAccumulator` (float32 product, float64 sum)
  fed ``--hessian-samples`` samples of ``--tokens`` rows at ``K = 4096`` (the issue's figure is
  128 x 2048 tokens; fewer samples give the same rate), 2 * T * K^2 FLOP;
* ``solve``: :func:`onnxq.algorithms.gptq_solve` (int4, block 128, symmetric, defaults
  otherwise; ``--hessian-shrink 0.5 --act-order`` times it as the CLI runs it, ``--float32-factor`` with
  that option) on
  ``K x N`` weights 4096x4096, 4096x11008 and 11008x4096 (a 7B-shaped block's q/k/v/o,
  gate/up and down projections), K^2 * N + K^3 / 3 FLOP (the triangular lazy-batch updates
  plus the Cholesky; before 2026-12-07 this script counted 2 * K^2 * N, which overstated the
  solve rows' GFLOP/s and "x sgemm rate", not their times).

Each stage prints its best and median time over ``--repeat`` runs, its GFLOP/s, the ratio of
its rate to sgemm's, and the ratio of its time to one sgemm.

``--block7b ALGOS`` (e.g. ``rtn,hqq,gptq,awq,teq,k_quant``) also solves one synthetic 7B-shaped
transformer block (hidden 4096, MLP 11008: q/k/v/o ``4096x4096``, gate/up ``4096x11008``, down
``11008x4096``; ``--block-weights`` picks a subset) with each algorithm's own ``solve`` and
defaults (int4, block 128, symmetric), on fixed calibration rows (``--block-rows`` rows per
input, correlated channels of uneven scale). Per algorithm it prints the ``statistics`` stage
(the driver's accumulators fed the rows) and the ``solve`` stage, with GFLOP/s where the
algorithm has a FLOP model (GPTQ: Hessian ``T K^2`` as ``syrk``, solve ``2 K^2 N + K^3 / 3``;
AWQ: Gram ``T K^2``, ``grid * 2 min(T, K) K N`` for the scale search and ``11 * 2 min(T, 128) K N``
for the clip search), beside the sgemm of the same run.

``--whole-process MODEL`` times ``python -m onnxq quantize MODEL OUT --algo A --block-size 128``
for every algorithm of ``--algos`` as separate processes (imports included; calibrated ones with
``--calib-data F --samples N --seq-len L``), wall time and peak RSS (``os.wait4``), with the load
average before and after each; ``--tree DIR`` adds the same runs from another checkout (its
``onnxq`` package; the model and data stay the same), interleaved in ABBA order (DIR, this; this, DIR; ...
from one algorithm to the next).

``--breakdown`` adds, per shape, the parts of the solve timed alone in the same run: the
factor (``gptq._damped_factor``, float64), the lazy-batch GEMMs ``M[batch, :start] @ D[:start]``
(float32, the solve's shapes, random ``D``) and the static RTN scales (``quantize_weight``); the
rest of the median solve time is the per-row loop, the panel GEMMs and the setup.

``--compare DIR`` also times the ``gptq_solve`` of another checkout (e.g. ``git worktree add
/tmp/gptq_base HEAD~1``) with the same settings (``--float32-factor`` included; before 2026-12-07 the other
checkout's solve was run without it), interleaved with this one's in ABBA order (old, new, new, old, ...) so
both see the same load and neither always runs first: on this machine the first of two back-to-back
4096x4096 solves ran up to 15% slower, which made a solver that always went first look slower than an
identical one. The load average is printed at the start and the end: the machine is shared.

    python scripts/bench_calibrated.py                           # everything, about 2-5 min on 2 cores
    python scripts/bench_calibrated.py --shapes 4096x4096 --repeat 3 --compare /tmp/gptq_base
    python scripts/bench_calibrated.py --json out.json
    python scripts/bench_calibrated.py --shapes "" --hessian-samples 0 --block7b gptq,awq --block-weights o
    python scripts/bench_calibrated.py --shapes "" --hessian-samples 0 --whole-process \
        models/real/smollm2_kv/genai-fp32 --calib-data calib.txt --algos rtn,gptq,awq --tree /tmp/base
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxq.algorithms import SiblingGroup, get_algorithm, gptq, gptq_solve
from onnxq.calibration import HessianAccumulator
from onnxq.calibration.executor import StatisticsPlan
from onnxq.config import QuantConfig
from onnxq.core import quantize_weight
from onnxq.formats import WeightSettings

SGEMM_N = 4096
HIDDEN, MLP = 4096, 11008
BLOCK_GROUPS = {  # input -> (K, weights reading it as (name, N))
    "attn_in": (HIDDEN, (("q", HIDDEN), ("k", HIDDEN), ("v", HIDDEN))),
    "attn_out": (HIDDEN, (("o", HIDDEN),)),
    "mlp_in": (HIDDEN, (("gate", MLP), ("up", MLP))),
    "mlp_mid": (MLP, (("down", HIDDEN),)),
}


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


def correlated_rows(t: int, k: int, seed: int) -> np.ndarray:
    """``[T, K]`` float32 rows with neighbouring channels correlated and lognormal channel scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k), dtype=np.float32)
    x[:, 1:] += 0.5 * x[:, :-1]
    x *= rng.lognormal(0.0, 1.0, k).astype(np.float32)
    return x


def breakdown(w: np.ndarray, h: np.ndarray, solve_s: float, sgemm_s: float, repeat: int = 2,
              shrink: float = 0.0, float32_factor: bool = False, act_order: bool = False) -> list[dict]:
    """The solve's factor (of the Hessian in act order's row order when ``act_order``), lazy-batch GEMMs and
    static RTN timed alone (best of ``repeat``), and the rest."""
    k, n = w.shape
    diagonal = np.diag(h).astype(np.float64)
    order = np.argsort(-diagonal, kind="stable") if act_order else None
    if order is not None:
        diagonal = diagonal[order]
    dtype = np.float32 if float32_factor else np.float64
    factor_s = min(timed(lambda: gptq._damped_factor(h, diagonal, order, k, 0.01, shrink, dtype))
                   for _ in range(repeat))
    m = gptq._damped_factor(h, diagonal, order, k, 0.01, shrink, dtype)[0]
    d = np.random.default_rng(3).standard_normal((k, n), dtype=np.float32)
    lazy = 128
    gemm_s = min(timed(lambda: [m[i1:i1 + lazy, :i1] @ d[:i1] for i1 in range(lazy, k, lazy)]) for _ in range(repeat))
    rtn_s = min(timed(lambda: quantize_weight(w, 4, 128, True)) for _ in range(repeat))
    parts = {f"factor ({np.dtype(dtype).name})": (factor_s, k**3 / 3.0), "lazy-batch GEMMs": (gemm_s, float(k) * k * n),
             "static RTN scales": (rtn_s, 0.0), "rest (rows, panels, setup)": (solve_s - factor_s - gemm_s - rtn_s, 0.0)}
    out = []
    for name, (seconds, flop) in parts.items():
        rate = f"{flop / seconds / 1e9:6.1f} GFLOP/s" if flop else " " * 13
        print(f"  {name:32s} {seconds:7.3f} s  {rate}  {seconds / sgemm_s:5.2f}x one sgemm's time", flush=True)
        out.append({"stage": f"solve {k}x{n} part: {name}", "median_s": seconds, "time_vs_sgemm": seconds / sgemm_s})
    return out


def solve_flop(algorithm: str, options, t: int, k: int, ns: list[int]) -> tuple[float, float] | None:
    """``(statistics FLOP, solve FLOP)`` of one sibling group, or None without a FLOP model."""
    if algorithm == "gptq":
        return float(t) * k * k, sum(float(k) * k * n + k**3 / 3.0 for n in ns)
    if algorithm == "awq":
        grid = options.grid if options.scale_search else 1
        gram = float(min(t, k)) * k * k if t > k else 0.0
        clip = 11 * 2.0 * min(t, 128) * k * sum(ns) if options.clip else 0.0
        return 0.0, gram + grid * 2.0 * min(t, k) * k * sum(ns) + clip
    return None


def bench_block(algorithms: list[str], weights: set[str], rows: int, sgemm_s: float) -> list[dict]:
    """Each algorithm's statistics and solve stages on the synthetic 7B-shaped block (see the module docstring)."""
    out = []
    inputs = {name: correlated_rows(rows, k, seed=i) for i, (name, (k, _)) in enumerate(BLOCK_GROUPS.items())}
    rng = np.random.default_rng(7)
    tensors = {w: (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k))
               for k, members in BLOCK_GROUPS.values() for w, n in members if w in weights}
    for name in algorithms:
        algorithm = get_algorithm(name)
        options = algorithm.options_of(QuantConfig(algorithm=name))
        settings = WeightSettings(bits=4, block_size=128, symmetric=True,
                                  float_zero_points=algorithm.float_zero_points(options))
        stat_s = solve_s = stat_flop = solve_flops = 0.0
        modelled = True
        for group_name, (k, members) in BLOCK_GROUPS.items():
            members = [(w, n) for w, n in members if w in weights]
            if not members:
                continue
            start = time.perf_counter()
            values: dict = {}
            if algorithm.uses_calibration:
                plan = StatisticsPlan((group_name,), algorithm.collected_statistics, algorithm.sample_rows(options))
                accumulators = plan.accumulators(k)
                for accumulator in accumulators.values():
                    accumulator.update(inputs[group_name], None, sample=0)
                values = {"count": rows, **{stat: {"hessian": lambda a: a.hessian, "rows": lambda a: a.rows()}.get(
                    stat, lambda a: a.value())(acc) for stat, acc in accumulators.items()}}
            middle = time.perf_counter()
            group = SiblingGroup(group_name, tuple(w for w, _ in members), [tensors[w] for w, _ in members],
                                 [settings] * len(members), np.dtype(np.float32))
            algorithm.solve(group, values, options)
            end = time.perf_counter()
            stat_s += middle - start
            solve_s += end - middle
            t = min(rows, algorithm.sample_rows(options) or rows)
            flop = solve_flop(name, options, rows if name == "gptq" else t, k, [n for _, n in members])
            if flop is None:
                modelled = False
            else:
                stat_flop += flop[0]
                solve_flops += flop[1]
            print(f"  {name} {group_name} ({', '.join(w for w, _ in members)}): statistics {middle - start:.2f} s, "
                  f"solve {end - middle:.2f} s  (load {load()})", flush=True)
        label = f"{name} 7B block [{','.join(sorted(weights))}] T={rows}"
        if modelled and stat_flop:
            out.append(report(f"{label} statistics", [stat_s], stat_flop, sgemm_s))
        elif algorithm.uses_calibration:
            print(f"{label} statistics: {stat_s:.2f} s", flush=True)
        if modelled:
            out.append(report(f"{label} solve", [solve_s], solve_flops, sgemm_s))
        else:
            print(f"{label} solve: {solve_s:.2f} s (no FLOP model)", flush=True)
            out.append({"stage": f"{label} solve", "best_s": solve_s, "median_s": solve_s})
    return out


def whole_process(tree: Path, model: Path, algorithm: str, args: argparse.Namespace) -> dict:
    """One ``python -m onnxq quantize`` run of ``tree``'s onnxq: wall time, peak RSS, load before/after."""
    calibrated = get_algorithm(algorithm).uses_calibration
    with tempfile.TemporaryDirectory(prefix="bench_calibrated_") as out_dir:
        command = [sys.executable, "-m", "onnxq", "quantize", str(model), str(Path(out_dir) / "out"),
                   "--algo", algorithm, "--block-size", "128", "--quiet"]
        if calibrated:
            command += ["--calib-data", str(args.calib_data), "--samples", str(args.samples),
                        "--seq-len", str(args.seq_len)]
        before = load()
        start = time.perf_counter()
        with tempfile.TemporaryFile() as stderr_file:
            process = subprocess.Popen(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=stderr_file)
            timer = threading.Timer(args.timeout, process.kill) if args.timeout else None
            if timer is not None:
                timer.start()
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - start
            if timer is not None:
                timer.cancel()
            stderr_file.seek(0)
            stderr = stderr_file.read().decode(errors="replace").strip().splitlines()
    exit_code = os.waitstatus_to_exitcode(status)
    row = {"stage": f"{algorithm} whole process ({tree})", "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
           "exit": exit_code, "load_before": before, "load_after": load()}
    killed = f"  (killed by --timeout {args.timeout:.0f} s)" if exit_code == -9 else ""
    print(f"{algorithm:8s} {str(tree):28s} wall {wall:7.1f} s  peak RSS {row['peak_rss_mib']:6.0f} MiB  "
          f"exit {exit_code}  load {before} -> {row['load_after']}{killed}"
          + (f"  ({stderr[-1]})" if exit_code > 0 and stderr else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hessian-shrink", type=float, default=0.0,
                        help="gptq_solve's hessian_shrink for the solve rows (0: the paper's, gptq_solve's default; "
                             "0.5: GPTQConfig's and the CLI's default)")
    parser.add_argument("--act-order", action="store_true",
                        help="gptq_solve's act_order for the solve rows (the CLI's default; gptq_solve's is off)")
    parser.add_argument("--float32-factor", action="store_true",
                        help="gptq_solve's float32_factor for the solve rows (needs --hessian-shrink >= 0.25)")
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="K x N weights to solve")
    parser.add_argument("--repeat", type=int, default=1, help="runs per solve (median reported)")
    parser.add_argument("--hessian-samples", type=int, default=8, help="samples for the Hessian stage (0: skip)")
    parser.add_argument("--tokens", type=int, default=2048, help="rows per Hessian sample")
    parser.add_argument("--compare", type=Path, help="another checkout whose gptq_solve is timed interleaved")
    parser.add_argument("--breakdown", action="store_true", help="time the solve's factor, GEMMs and RTN alone")
    parser.add_argument("--block7b", default="", help="algorithms solved on the synthetic 7B-shaped block")
    parser.add_argument("--block-weights", default="q,k,v,o,gate,up,down", help="the block's weights to solve")
    parser.add_argument("--block-rows", type=int, default=2048, help="calibration rows per block input")
    parser.add_argument("--whole-process", type=Path, metavar="MODEL", help="time python -m onnxq quantize MODEL")
    parser.add_argument("--algos", default="rtn,hqq,gptq,awq,teq,k_quant", help="algorithms for --whole-process")
    parser.add_argument("--calib-data", type=Path, help="calibration text for --whole-process")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples for --whole-process")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sample for --whole-process")
    parser.add_argument("--tree", type=Path, help="another checkout timed interleaved in --whole-process")
    parser.add_argument("--timeout", type=float, default=0, help="kill a --whole-process run after this many s")
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
    if other is not None and args.float32_factor and "float32_factor" not in inspect.signature(other).parameters:
        raise SystemExit(f"--float32-factor: the gptq_solve of {args.compare} has no float32_factor option")
    shrink = args.hessian_shrink
    for shape in filter(None, args.shapes.split(",")):
        k, n = (int(v) for v in shape.lower().split("x"))
        w, h = problem(k, n)
        flop = float(k) * k * n + k**3 / 3.0  # the lazy-batch products are triangular: K^2 N, not 2 K^2 N
        settings = {"hessian_shrink": shrink, "act_order": args.act_order}
        if args.float32_factor:
            settings["float32_factor"] = True
        runs = {"new": lambda w=w, h=h: gptq_solve(w, h, 4, 128, True, **settings)}
        if other is not None:
            runs["old"] = lambda w=w, h=h: other(w, h, 4, 128, True, **settings)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.repeat):  # ABBA: the first run after a switch is slower here; no solver always goes first
            for name in (list(runs) if r % 2 else list(runs)[::-1]):
                times[name].append(timed(runs[name]))
        new_times, old_times = times["new"], times.get("old", [])
        label = (f"solve {k}x{n} b128" + (f" shrink {shrink:g}" if shrink else "")
                 + (" act order" if args.act_order else "") + (" float32 factor" if args.float32_factor else ""))
        if other is not None:
            rows.append(report(f"{label} ({args.compare})", old_times, flop, sgemm_s))
        rows.append(report(label, new_times, flop, sgemm_s))
        if args.breakdown:
            rows += breakdown(w, h, statistics.median(new_times), sgemm_s, shrink=shrink,
                              float32_factor=args.float32_factor, act_order=args.act_order)
    if args.block7b:
        rows += bench_block(args.block7b.split(","), set(args.block_weights.split(",")), args.block_rows, sgemm_s)
    if args.whole_process:
        for index, algorithm in enumerate(args.algos.split(",")):
            trees = ([args.tree] if args.tree else []) + [ROOT]
            for tree in (trees if index % 2 == 0 else trees[::-1]):  # ABBA across algorithms
                rows.append(whole_process(tree, args.whole_process.resolve(), algorithm, args))
    print(f"load average at end: {load()}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"load_end": load(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
