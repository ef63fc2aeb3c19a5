"""GPTQ on Ray with 1 and 2 local workers, and the per-stage constants of docs/SCALING.md's cost model.

Two parts, both measured in this run on this machine:

``--constants``: the rates the cost model extrapolates from, one thread each (a Ray worker runs
one thread):

* ``sgemm``: ``[T, K] @ [K, N]`` float32 numpy, the machine's BLAS rate;
* ``forward``: one onnxruntime MatMul ``[T, 4096] x [4096, 4096]`` (the calibration forward);
* ``hessian``: :class:`~onnxq.calibration.HessianAccumulator` (float32 ``syrk``, float64 sum);
* ``solve``: :func:`onnxq.algorithms.gptq_solve` of a 4096x4096 weight (int4, block 128);
* ``object store``: ``ray.put`` + ``ray.get`` in a worker of a 256 MiB array (what moving a
  Hessian or a shard's activations costs on one node; a network link is slower).

``--workers 1,2``: builds a synthetic stack of ``--layers`` 7B-shaped pre-norm decoder layers
(hidden 4096, 32 heads, SiLU-gated MLP 11008; fp32 weights in external data; two calibration
blocks per layer: q/k/v/o and gate/up/down) fed ``--samples`` x ``--seq`` random hidden states,
and quantizes it with GPTQ (int4, block 128) through ``onnxq.quantize_with_report(...,
executor=RayExecutor(workers=W))`` (``onnxq.api``), a fresh local Ray instance of ``W`` CPUs per run. Prints
each run's wall time (Ray start-up excluded, the quantization only), the per-stage sums from
the driver's block reports, the ratio to one worker, and whether the codes equal the 1-worker
run's.

    python scripts/bench_scaling.py --constants
    python scripts/bench_scaling.py --workers 1,2 --layers 1 --samples 4 --seq 512
    python scripts/bench_scaling.py --constants --workers 1,2 --json scaling.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the constants are per thread, as a Ray worker runs
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, HEADS, MLP = 4096, 32, 11008


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def best(fn, repeat: int = 2) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def constants(tokens: int) -> dict:
    """Per-thread rates of the stages (see the module docstring)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnxq.algorithms import gptq_solve
    from onnxq.calibration import HessianAccumulator

    rng = np.random.default_rng(0)
    k = HIDDEN
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    w = (rng.standard_normal((k, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    out = {}
    seconds = best(lambda: x @ w)
    out["sgemm"] = {"seconds": seconds, "gflops": 2 * tokens * k * k / seconds / 1e9, "shape": f"[{tokens},{k}]x[{k},{k}]"}

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, k])],
                              [numpy_helper.from_array(w, "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    seconds = best(lambda: session.run(None, {"x": x}))
    out["forward"] = {"seconds": seconds, "gflops": 2 * tokens * k * k / seconds / 1e9}

    def hessian():
        accumulator = HessianAccumulator(k, dtype=np.float32)
        accumulator.update(x)

    seconds = best(hessian)
    out["hessian"] = {"seconds": seconds, "gflops": 2 * tokens * k * k / seconds / 1e9}
    h = (x.T.astype(np.float64) @ x.astype(np.float64)) * (2 / tokens)
    seconds = best(lambda: gptq_solve(w, h, bits=4, block_size=128, symmetric=True), repeat=1)
    out["solve"] = {"seconds": seconds, "gflops": (2 * k * k * k + k ** 3 / 3) / seconds / 1e9, "shape": f"{k}x{k}"}

    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        @ray.remote(num_cpus=1)
        def take(array):
            return float(array[0, 0])

        big = np.ones((8192, 8192), np.float32)  # 256 MiB
        ray.get(take.remote(np.ones((2, 2), np.float32)))  # the worker is up
        seconds = best(lambda: ray.get(take.remote(ray.put(big))))
        out["object_store"] = {"seconds": seconds, "gbytes_per_s": big.nbytes / seconds / 1e9, "bytes": big.nbytes}
    finally:
        ray.shutdown()
    return out


def build_stack(path: Path, layers: int, seed: int = 0) -> None:
    """``layers`` 7B-shaped decoder layers on ``hidden_states [1, T, 4096]`` (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name: str, k: int, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32), name))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{name}/out"], name=name, **attrs))
        return f"{name}/out"

    d = HIDDEN // HEADS
    const("heads_shape", np.array([0, 0, HEADS, d], np.int64))
    const("merge_shape", np.array([0, 0, HIDDEN], np.int64))
    const("inv_sqrt_d", np.array(1 / np.sqrt(d), np.float32))
    x = "hidden_states"
    for i in range(layers):
        p = f"layers.{i}"
        g1 = const(f"{p}.ln1.weight", np.ones(HIDDEN, np.float32))
        b1 = const(f"{p}.ln1.bias", np.zeros(HIDDEN, np.float32))
        n1 = node("LayerNormalization", [x, g1, b1], f"{p}.input_layernorm", axis=-1)
        heads = {}
        for proj in ("q", "k", "v"):
            y = node("MatMul", [n1, weight(f"{p}.self_attn.{proj}_proj.weight", HIDDEN, HIDDEN)], f"{p}.self_attn.{proj}_proj")
            r = node("Reshape", [y, "heads_shape"], f"{p}.self_attn.{proj}_heads")
            heads[proj] = node("Transpose", [r], f"{p}.self_attn.{proj}_t", perm=[0, 2, 1, 3])
        kt = node("Transpose", [heads["k"]], f"{p}.self_attn.kt", perm=[0, 1, 3, 2])
        scores = node("Mul", [node("MatMul", [heads["q"], kt], f"{p}.self_attn.qk"), "inv_sqrt_d"], f"{p}.self_attn.scale")
        probs = node("Softmax", [scores], f"{p}.self_attn.softmax", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, heads["v"]], f"{p}.self_attn.pv")], f"{p}.self_attn.ct",
                       perm=[0, 2, 1, 3])
        merged = node("Reshape", [context, "merge_shape"], f"{p}.self_attn.merge")
        o = node("MatMul", [merged, weight(f"{p}.self_attn.o_proj.weight", HIDDEN, HIDDEN)], f"{p}.self_attn.o_proj")
        x = node("Add", [x, o], f"{p}.attn_residual")
        g2 = const(f"{p}.ln2.weight", np.ones(HIDDEN, np.float32))
        b2 = const(f"{p}.ln2.bias", np.zeros(HIDDEN, np.float32))
        n2 = node("LayerNormalization", [x, g2, b2], f"{p}.post_attention_layernorm", axis=-1)
        gate = node("MatMul", [n2, weight(f"{p}.mlp.gate_proj.weight", HIDDEN, MLP)], f"{p}.mlp.gate_proj")
        up = node("MatMul", [n2, weight(f"{p}.mlp.up_proj.weight", HIDDEN, MLP)], f"{p}.mlp.up_proj")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        act = node("Mul", [silu, up], f"{p}.mlp.act")
        down = node("MatMul", [act, weight(f"{p}.mlp.down_proj.weight", MLP, HIDDEN)], f"{p}.mlp.down_proj")
        x = node("Add", [x, down], f"{p}.mlp_residual")
    graph = helper.make_graph(nodes, "stack7b", [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                                                                [1, None, HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, None, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")


def run_gptq(path: Path, feeds: list, workers: int) -> dict:
    """GPTQ int4 block 128 of the stack on a fresh local Ray of ``workers`` CPUs."""
    from onnxq import QuantConfig
    from onnxq.api import quantize_with_report
    from onnxq.calibration.ray_executor import RayExecutor
    from onnxq.config import CalibrationConfig

    executor = RayExecutor(workers=workers)
    try:
        config = QuantConfig(algorithm="gptq", block_size=128, calibration=CalibrationConfig(samples=len(feeds)))
        start = time.perf_counter()
        result = quantize_with_report(str(path), config, feeds, executor=executor)
        seconds = time.perf_counter() - start
    finally:
        executor.close()
    stages: dict[str, float] = {}
    for block in result.blocks:
        for stage, value in block.stages.items():
            stages[stage] = stages.get(stage, 0.0) + value
    packed = {v.name: np.array(v.const_value.numpy()) for v in result.model.graph.initializers.values()}
    return {"workers": workers, "seconds": seconds, "stages": stages, "packed": packed}


SHAPES = {  # layers, hidden, MLP, K/V width (grouped-query attention), attention heads
    "7B": (32, 4096, 11008, 4096),      # Llama-2-7B
    "70B": (80, 8192, 28672, 1024),     # Llama-2-70B: 8 KV heads of 128
    "405B": (126, 16384, 53248, 1024),  # Llama-3.1-405B: 8 KV heads of 128
}


def layer_costs(hidden: int, mlp: int, kv: int, tokens: int, seq: int) -> dict:
    """FLOP (and bytes) of one decoder layer's GPTQ calibration, as docs/SCALING.md derives them."""
    h, f = hidden, mlp
    weights = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down, [K, N]
    block_forward = 2 * tokens * sum(k * n for k, n in weights) + 4 * tokens * seq * h  # + QK^T and PV
    solves = [2 * k * k * n + k ** 3 / 3 for k, n in weights]
    inputs = [h, h, h, f]  # the q/k/v input, the o input, the gate/up input, the down input
    return {
        "forward": 2 * block_forward,  # statistics pass, then the quantized block for the next layer's input
        "hessian": 2 * tokens * sum(k * k for k in inputs),  # counted as 2 T K^2 (a syrk does half)
        "solves": solves,  # one task per weight (GPTQ is separable)
        "blocks": [solves[:4], solves[4:]],  # attention, MLP
        "weight_bytes": 2 * sum(k * n for k, n in weights),  # fp16 weights, sent to every worker twice
        "hessian_bytes": 8 * sum(k * k for k in inputs),  # float64 partial sums, one set per worker
        "activation_bytes": 4 * tokens * h,  # the cached residual stream of all samples (fp32)
    }


def estimate(shape: str, tokens: int, seq: int, workers: int, rates: dict, link_gbs: float, one_pass: bool,
             per_node: int) -> dict:
    """Wall-time estimate (hours) of GPTQ calibration of a ``shape`` model on ``workers`` one-thread
    workers, ``per_node`` to a machine (a machine's workers share its object store: block weights
    cross the driver's link once per machine, partial Hessians once per worker)."""
    layers, hidden, mlp, kv = SHAPES[shape]
    c = layer_costs(hidden, mlp, kv, tokens, seq)
    gflop = lambda flop, rate: flop / (rate * 1e9)  # noqa: E731
    forward = gflop(c["forward"] / (2 if one_pass else 1), rates["forward"])
    hessian = gflop(c["hessian"], rates["hessian"])
    solve_rate = rates["solve"]
    machines = -(-workers // per_node)
    network = 0.0 if machines == 1 else (c["weight_bytes"] * (1 if one_pass else 2) * machines
                                         + c["hessian_bytes"] * workers) / (link_gbs * 1e9)
    slowest = max(gflop(t, solve_rate) for t in c["solves"])
    if one_pass:  # every solve of every layer is one pool of tasks
        solve = max(slowest, layers * gflop(sum(c["solves"]), solve_rate) / workers)
    else:  # per block, the slowest task or the block's share, whichever is longer
        solve = layers * sum(max(max(gflop(t, solve_rate) for t in block), gflop(sum(block), solve_rate) / workers)
                             for block in c["blocks"])
    total = {"forward": layers * forward / workers, "hessian": layers * hessian / workers, "solve": solve,
             "network": layers * network}
    # the driver: a block's merged float64 Hessians plus one shard's partial sums (merged as fetched)
    driver_gib = 2 * 8 * (hidden ** 2 + mlp ** 2) / 2 ** 30
    # a worker: its shard of the cached residual stream (old and new during advance) and the MLP block's
    # fp16 weights in its onnxruntime session, or one solve task (Hessian, its factor, the fp32 weight)
    forward_bytes = 2 * c["activation_bytes"] / workers + 2 * 3 * hidden * mlp
    solve_bytes = 2 * 8 * mlp ** 2 + 4 * mlp * hidden
    worker_gib = max(forward_bytes, solve_bytes) / 2 ** 30
    return {"shape": shape, "workers": workers, "mode": "one pass" if one_pass else "sequential",
            "hours": sum(total.values()) / 3600, **{k: v / 3600 for k, v in total.items()},
            "driver_gib": driver_gib, "worker_gib": worker_gib}


def model_table(rates: dict, tokens: int, seq: int, link_gbs: float, counts: list[int], per_node: int) -> str:
    """The markdown table of :func:`estimate` for every shape, mode and worker count."""
    rows = ["| model | mode | workers | forward h | Hessian h | solves h | transfers h | **total h** | "
            "driver GiB | worker GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in SHAPES:
        for one_pass in (False, True):
            for workers in counts:
                e = estimate(shape, tokens, seq, workers, rates, link_gbs, one_pass, per_node)
                rows.append(f"| {shape} | {e['mode']} | {workers} | {e['forward']:.1f} | {e['hessian']:.1f} | "
                            f"{e['solve']:.1f} | {e['network']:.1f} | **{e['hours']:.1f}** | {e['driver_gib']:.1f} | "
                            f"{e['worker_gib']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--constants", action="store_true", help="measure the cost model's per-thread rates")
    parser.add_argument("--tokens", type=int, default=2048, help="rows for the constants (default 2048)")
    parser.add_argument("--workers", default="", help="comma-separated worker counts, e.g. 1,2")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the synthetic stack (default 1)")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples (default 4)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sample (default 512)")
    parser.add_argument("--model-table", action="store_true",
                        help="print the cost model's table for 7B/70B/405B from the --constants rates "
                             "(measured in this run, or read from --rates JSON)")
    parser.add_argument("--rates", type=Path, help="a --json file of an earlier --constants run")
    parser.add_argument("--calib-tokens", type=int, default=128 * 2048, help="calibration tokens for the table")
    parser.add_argument("--calib-seq", type=int, default=2048, help="tokens per sample for the table")
    parser.add_argument("--link-gbs", type=float, default=1.25, help="GB/s between machines for the table "
                        "(default 1.25: 10 Gbit/s Ethernet)")
    parser.add_argument("--table-workers", default="1,8,64", help="worker counts of the table (default 1,8,64)")
    parser.add_argument("--per-node", type=int, default=8, help="workers per machine for the table (default 8)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results: dict = {"cores": os.cpu_count()}
    print(f"load average at start: {load()}  (cores: {os.cpu_count()})")
    if args.constants:
        results["constants"] = constants(args.tokens)
        for name, value in results["constants"].items():
            rate = f"{value['gflops']:.1f} GFLOP/s" if "gflops" in value else f"{value['gbytes_per_s']:.2f} GB/s"
            print(f"{name:<13} {value['seconds']:7.3f} s  {rate}  {value.get('shape', '')}")
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if counts:
        rng = np.random.default_rng(1)
        feeds = [{"hidden_states": rng.standard_normal((1, args.seq, HIDDEN), dtype=np.float32)}
                 for _ in range(args.samples)]
        with tempfile.TemporaryDirectory(prefix="onnxq-scaling-") as folder:
            path = Path(folder) / "stack.onnx"
            build_stack(path, args.layers)
            print(f"stack: {args.layers} layers of hidden {HIDDEN}, MLP {MLP}; GPTQ int4 b128 on {args.samples} x "
                  f"{args.seq} tokens")
            runs = []
            for workers in counts:
                before = load()
                runs.append(run_gptq(path, feeds, workers))
                r = runs[-1]
                ratio = r["seconds"] / runs[0]["seconds"]
                same = all(np.array_equal(r["packed"][n], runs[0]["packed"][n]) for n in runs[0]["packed"])
                stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
                print(f"workers {workers}: {r['seconds']:7.1f} s  {ratio:.2f}x the {counts[0]}-worker time  "
                      f"codes {'equal' if same else 'DIFFER'}  load {before} -> {load()}\n    stages (s): {stages}")
                r["codes_equal_first"] = same
            results["runs"] = [{k: v for k, v in r.items() if k != "packed"} for r in runs]
    if args.model_table:
        measured = results.get("constants") or json.loads(args.rates.read_text())["constants"]
        rates = {name: measured[name]["gflops"] for name in ("forward", "hessian", "solve")}
        counts = [int(w) for w in args.table_workers.split(",")]
        results["table"] = model_table(rates, args.calib_tokens, args.calib_seq, args.link_gbs, counts, args.per_node)
        print(f"cost model: {args.calib_tokens} calibration tokens, rates per worker thread (GFLOP/s) {rates}, "
              f"link {args.link_gbs} GB/s, {args.per_node} workers per machine")
        print(results["table"])
    print(f"load average at end: {load()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
