"""RTN speed and memory: onnxq vs onnxruntime's MatMulNBitsQuantizer on the same model, in one run.

Builds a synthetic model of ``--layers`` MatMuls ``--dim x --dim`` (fp32, weights in
external data), then quantizes it with each tool as a user runs it, one whole fresh process
per run (interpreter start, imports, load, quantize, save; int4 block 32 symmetric unless told
otherwise): onnxq's CLI with its defaults, ORT's ``MatMulNBitsQuantizer`` through its Python
API; the input is read once before each run, so both find it in the page cache. Prints the best
and median wall time over ``--repeat`` interleaved runs, how much of it a bare import of each
tool takes, the peak RSS (the child's VmHWM at exit), the output size, whether the two tools
wrote identical packed weights, and the load average. onnxq's modules are byte-compiled first,
as an install has them (:func:`compile_bytecode`).

    python scripts/bench_rtn.py                       # 8 x 4096x4096 fp32 (512 MiB)
    python scripts/bench_rtn.py --layers 40           # 2.5 GiB: the >2 GB external-data case
    python scripts/bench_rtn.py --markdown out.md     # also write a markdown table
"""
from __future__ import annotations

import argparse
import os
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


_PEAK_RSS = "BENCH_PEAK_RSS_KIB="

_CHILD = """
import atexit, sys
def _peak():  # VmHWM at exit: this process's own peak (ru_maxrss of a vfork child carries the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("%s" + line.split()[1], file=sys.stderr)
atexit.register(_peak)
tool, src, dst, bits, block_size, symmetric = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "sym"
if tool == "onnxq":
    from onnxq.cli import main
    sys.exit(main(["quantize", src, dst, "--bits", str(bits), "--block-size", str(block_size),
                   "--sym" if symmetric else "--asym", "--quiet"]))
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 algo_config=config)
quantizer.process()
quantizer.model.save_model_to_file(dst, use_external_data_format=True)
""" % _PEAK_RSS
"""One whole process per run. onnxq: its CLI with its defaults (``python -m onnxq quantize SRC DST --quiet``,
``--external-data auto``); ORT: ``onnx.load`` + ``MatMulNBitsQuantizer`` + ``save_model_to_file`` with
external data. Imports are part of the wall time."""

_IMPORTS = {"onnxq": "import onnxq.cli",
            "ort": "import onnx; from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer"}


def run_child(tool: str, src: Path, dst: Path, args: argparse.Namespace) -> dict:
    """Run one tool in a fresh interpreter; wall time from spawn to exit, peak RSS from the child's VmHWM."""
    cmd = [sys.executable, "-c", _CHILD, tool, str(src), str(dst), str(args.bits), str(args.block_size),
           "sym" if args.symmetric else "asym"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{proc.stderr[-3000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith(_PEAK_RSS)]
    output = sum(p.stat().st_size for p in dst.parent.glob(dst.name + "*")) / 2**20
    return {"tool": tool, "wall_s": wall, "peak_rss_mib": int(peak[-1][len(_PEAK_RSS):]) / 1024, "output_mib": output}


def warm_input(src: Path) -> None:
    """Read the model and its data once, untimed, so that each run finds its input in the page cache
    (the first run of a round would otherwise pay for reading what other jobs evicted)."""
    for path in (src, src.with_name(src.name + ".data")):
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def import_seconds(tool: str) -> float:
    """Wall time of a fresh interpreter that only imports what ``tool``'s run imports first."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _IMPORTS[tool]], check=True, cwd=ROOT, env=_env())
    return time.perf_counter() - start


def compile_bytecode() -> int:
    """Write onnxq's ``__pycache__`` as ``pip install`` does for an installed package (and as onnxruntime's
    already has); returns the number of modules. Without it, where ``PYTHONDONTWRITEBYTECODE`` is set (this
    machine sets it), every onnxq process of an editable checkout compiles its ~70 modules from source
    again (about 0.12 s), which no installed copy does."""
    import compileall
    import py_compile

    compileall.compile_dir(ROOT / "onnxq", quiet=1, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return sum(1 for _ in (ROOT / "onnxq").rglob("*.py"))


def _env() -> dict:
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


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


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
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / f"float_{args.layers}x{args.dim}.onnx"
    if not src.exists():
        start = time.perf_counter()
        build_model(src, args.layers, args.dim)
        print(f"built {src} ({args.layers} x {args.dim}x{args.dim} fp32) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    print(f"bytecode: compiled {compile_bytecode()} onnxq modules, as an install does", file=sys.stderr)
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {"onnxq": [], "ort": []}
    imports: dict[str, list[float]] = {"onnxq": [], "ort": []}
    for r in range(args.repeat):  # interleaved, so background load hits both tools alike; ABBA, so neither is always first
        for tool in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            dst = args.workdir / tool / "model.onnx"
            shutil.rmtree(dst.parent, ignore_errors=True)  # ORT appends to an existing .data file
            dst.parent.mkdir()
            warm_input(src)
            runs[tool].append(run_child(tool, src, dst, args))
            imports[tool].append(import_seconds(tool))
            print(f"{tool}: {runs[tool][-1]} imports {imports[tool][-1]:.2f} s, load {os.getloadavg()}", file=sys.stderr)
    load_end = os.getloadavg()
    results = {tool: min(rs, key=lambda r: r["wall_s"]) | {"median_s": float(np.median([r["wall_s"] for r in rs])),
                                                            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                                                            "imports_s": float(np.median(imports[tool]))}
               for tool, rs in runs.items()}
    same = packed_weights_identical(args.workdir / "onnxq" / "model.onnx", args.workdir / "ort" / "model.onnx")
    scheme = "sym" if args.symmetric else "asym"
    float_mib = args.layers * args.dim * args.dim * 4 / 2**20
    rows = [
        (f"| tool | whole process, best of {args.repeat} (s) | median (s) | of which imports, median (s) "
         "| peak RSS (MiB) | output (MiB) |"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for tool, r in results.items():
        rows.append(f"| {tool} | {r['wall_s']:.2f} | {r['median_s']:.2f} | {r['imports_s']:.2f} | {r['peak_rss_mib']:.0f} "
                    f"| {r['output_mib']:.1f} |")
    o, t = results["onnxq"], results["ort"]
    table = "\n".join(rows) + (
        f"\n\nModel: {args.layers} MatMuls {args.dim}x{args.dim} fp32 ({float_mib:.0f} MiB, external data); "
        f"int{args.bits} block {args.block_size} {scheme}. onnxq is {t['wall_s'] / o['wall_s']:.1f}x faster (best of {args.repeat}; "
        f"{t['median_s'] / o['median_s']:.1f}x on medians) and uses "
        f"{o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x the peak RSS of ORT's MatMulNBitsQuantizer. "
        f"Identical packed weights: {'yes' if same else 'NO'}. Load average {_load(load_start)} at the start, "
        f"{_load(load_end)} at the end ({os.cpu_count()} cores).\n"
    )
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
