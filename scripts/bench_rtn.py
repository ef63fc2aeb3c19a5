"""RTN speed and memory: onnxq vs onnxruntime's MatMulNBitsQuantizer on the same model, in one run.

Builds a synthetic model of ``--layers`` MatMuls ``--dim x --dim`` (fp32, weights in
external data), then quantizes it with each tool in its own fresh subprocess
(load + quantize + save, int4 block 32 symmetric unless told otherwise) and
prints the best and median wall time over ``--repeat`` interleaved runs, peak RSS (the child's VmHWM, imports included; the RSS
right after imports is shown too), output size, and whether the two tools wrote
identical packed weights.

    python scripts/bench_rtn.py                       # 8 x 4096x4096 fp32 (512 MiB)
    python scripts/bench_rtn.py --layers 40           # 2.5 GiB: the >2 GB external-data case
    python scripts/bench_rtn.py --markdown out.md     # also write a markdown table
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_model(path: Path, layers: int, dim: int, seed: int = 0) -> None:
    """``y = x @ W_0 @ W_1 ...``: ``layers`` fp32 MatMuls ``[dim, dim]``, weights in ``<path>.data``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"layers.{i}.weight"))
        nodes.append(helper.make_node("MatMul", [current, f"layers.{i}.weight"], [f"h{i}"], name=f"layers.{i}.matmul"))
        current = f"h{i}"
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", dim])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
              size_threshold=0)


def _rss_mib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(tool: str, src: str, dst: str, bits: int, block_size: int, symmetric: bool) -> None:
    """Runs in a fresh interpreter: import, load, quantize, save; prints a JSON line."""
    if tool == "onnxq":
        import onnxq

        rss_imports = _rss_mib()
        start = time.perf_counter()
        model = onnxq.quantize(src, onnxq.QuantConfig(bits=bits, block_size=block_size, symmetric=symmetric))
        onnxq.save(model, dst, external_data=True)
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        rss_imports = _rss_mib()
        start = time.perf_counter()
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
        quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(dst, use_external_data_format=True)
    wall = time.perf_counter() - start
    print(json.dumps({"tool": tool, "wall_s": wall, "peak_rss_mib": _rss_mib(), "rss_after_imports_mib": rss_imports}))


def run_child(tool: str, src: Path, dst: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, str(src), str(dst), "--bits", str(args.bits),
           "--block-size", str(args.block_size)] + ([] if args.symmetric else ["--asym"])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_mib"] = sum(p.stat().st_size for p in dst.parent.glob(dst.name + "*")) / 2**20
    return result


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def packed_weights_identical(a: Path, b: Path) -> bool:
    """Same MatMulNBits B/scales/zero_points bytes, node by node (matched by their MatMul order)."""
    import onnx
    from onnx import numpy_helper

    def packed(path: Path) -> list[list[bytes]]:
        model = onnx.load(path)
        inits = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
        return [[inits[i] for i in n.input[1:4] if i] for n in model.graph.node if n.op_type == "MatMulNBits"]

    return packed(a) == packed(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--asym", dest="symmetric", action="store_false")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the best wall time is reported")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxq_bench_rtn"))
    parser.add_argument("--markdown", type=Path, help="also write the result table here")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.bits, args.block_size, args.symmetric)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"float_{args.layers}x{args.dim}.onnx"
    if not src.exists():
        start = time.perf_counter()
        build_model(src, args.layers, args.dim)
        print(f"built {src} ({args.layers} x {args.dim}x{args.dim} fp32) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    runs: dict[str, list[dict]] = {"onnxq": [], "ort": []}
    for _ in range(args.repeat):  # interleaved, so background load hits both tools alike
        for tool in runs:
            dst = args.workdir / tool / "model.onnx"
            shutil.rmtree(dst.parent, ignore_errors=True)  # ORT appends to an existing .data file
            dst.parent.mkdir()
            runs[tool].append(run_child(tool, src, dst, args))
            print(f"{tool}: {runs[tool][-1]}", file=sys.stderr)
    results = {tool: min(rs, key=lambda r: r["wall_s"]) | {"median_s": float(np.median([r["wall_s"] for r in rs])),
                                                            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
               for tool, rs in runs.items()}
    same = packed_weights_identical(args.workdir / "onnxq" / "model.onnx", args.workdir / "ort" / "model.onnx")
    scheme = "sym" if args.symmetric else "asym"
    float_mib = args.layers * args.dim * args.dim * 4 / 2**20
    rows = [
        f"| tool | wall time, best of {args.repeat} (s) | median (s) | peak RSS (MiB) | RSS after imports (MiB) | output (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool, r in results.items():
        rows.append(f"| {tool} | {r['wall_s']:.2f} | {r['median_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['rss_after_imports_mib']:.0f} "
                    f"| {r['output_mib']:.1f} |")
    o, t = results["onnxq"], results["ort"]
    table = "\n".join(rows) + (
        f"\n\nModel: {args.layers} MatMuls {args.dim}x{args.dim} fp32 ({float_mib:.0f} MiB, external data); "
        f"int{args.bits} block {args.block_size} {scheme}. onnxq is {t['wall_s'] / o['wall_s']:.1f}x faster (best of {args.repeat}; "
        f"{t['median_s'] / o['median_s']:.1f}x on medians) and uses "
        f"{o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x the peak RSS of ORT's MatMulNBitsQuantizer. "
        f"Identical packed weights: {'yes' if same else 'NO'}.\n"
    )
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
