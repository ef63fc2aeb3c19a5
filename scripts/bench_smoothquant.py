"""SmoothQuant W8A8 vs plain static W8A8 on the real SmolLM2-135M model: perplexity with onnxruntime.

Quantizes ``models/real/smollm2/model.onnx`` (``scripts/export_smollm2.py``) with
:func:`onnxq.recipes.smoothquant.quantize_w8a8`: int8 per-channel weights, uint8 per-tensor
activations (MinMax), QDQ MatMuls with float outputs, calibrated on windows of
``calib_ids.npy``; without smoothing, with SmoothQuant alpha 0.5 and with the per-group
alpha search (default grid 0.30..0.70, and 0.30..1.00). Each twice: 8-bit weights, and
7-bit weights (``reduce_range``, which onnxruntime advises on x86 CPUs without VNNI,
whose fused u8 x s8 kernels add pairs of products in saturating int16). Then scores
fp32, the smoothed fp32 model and every quantized model on the same windows of
``eval_ids.npy`` in one pass (:func:`onnxq.eval.metrics.compare_lms`: perplexity, mean
KL(fp32 || quantized) per token, top-1 agreement), checks the 8-bit-weight models with
the fused kernels against the unfused QDQ graph on a few windows, prints markdown
tables and writes them to ``docs/SMOOTHQUANT.md``.

    python scripts/bench_smoothquant.py                      # 16 x 256 calibration, 16 x 256 eval
    python scripts/bench_smoothquant.py --eval-windows 4 --doc ''   # quick look, no doc written
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxq.eval.metrics import compare_lms, perplexity  # noqa: E402
from onnxq.io import save_model  # noqa: E402
from onnxq.algorithms.smoothquant import SMOOTHQUANT_ALPHAS  # noqa: E402
from onnxq.recipes.smoothquant import SMOOTH_REPORT_KEY, quantize_w8a8, smooth_model  # noqa: E402

logger = logging.getLogger("bench_smoothquant")

WIDE_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(15))  # 0.30 .. 1.00
SMOOTHING = {  # name -> (alpha, grid searched by "auto")
    "W8A8": None,
    "W8A8 + SmoothQuant a=0.5": (0.5, SMOOTHQUANT_ALPHAS),
    "W8A8 + SmoothQuant auto": ("auto", SMOOTHQUANT_ALPHAS),
    "W8A8 + SmoothQuant auto 0.3..1.0": ("auto", WIDE_GRID),
}


def calibration_feeds(ids: np.ndarray, samples: int, length: int) -> list[dict[str, np.ndarray]]:
    """``samples`` windows of ``length`` tokens evenly spaced over ``ids``, each ``input_ids [1, length]``."""
    starts = np.linspace(0, len(ids) - length, samples).round().astype(np.int64)
    return [{"input_ids": ids[s:s + length].astype(np.int64)[None, :]} for s in starts]


def model_mib(path: Path) -> float:
    """Size of a model file plus its external data file (``<name>.data``) when there is one."""
    data = Path(f"{path}.data")
    return (os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)) / 2**20


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f for f in wanted if f" {f} " in f"{flags} ") or "none of avx2/avx512/vnni"


def alpha_summary(report) -> str:
    alphas = [group.alpha for group in report]
    return f"{np.mean(alphas):.2f} ({min(alphas):.2f}..{max(alphas):.2f})"


def unfused_check(model: Path, paths: dict[str, Path], eval_ids: np.ndarray, context: int, windows: int) -> str:
    """Perplexity with onnxruntime's fused int8 kernels vs the unfused QDQ graph (float math), same windows."""
    def session(path: Path, fused: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not fused:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    reference = perplexity(session(model, True), eval_ids, context=context, max_windows=windows)
    lines = [f"| model ({reference.tokens} tokens, {reference.windows} windows) | perplexity, fused int8 kernels "
             "| perplexity, unfused QDQ graph |", "|---|---|---|", f"| fp32 | {reference.ppl:.3f} | - |"]
    for label, path in paths.items():
        fused = perplexity(session(path, True), eval_ids, context=context, max_windows=windows)
        unfused = perplexity(session(path, False), eval_ids, context=context, max_windows=windows)
        lines.append(f"| {label} | {fused.ppl:.3f} | {unfused.ppl:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=ROOT / "models/real/smollm2/model.onnx", type=Path)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--weight-bits", choices=["8", "7", "both"], default="both",
                        help="7 = reduce_range (7-bit weights)")
    parser.add_argument("--unfused-windows", type=int, default=4,
                        help="windows for the fused-kernel vs unfused-QDQ check of the 8-bit models (0: skip)")
    parser.add_argument("--out-dir", default=ROOT / "models/real/bench/smoothquant", type=Path)
    parser.add_argument("--doc", default=str(ROOT / "docs/SMOOTHQUANT.md"), help="markdown output ('' for none)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].addFilter(lambda r: "pre-process" not in r.getMessage())  # ORT's advice

    folder = args.model.parent
    calib = calibration_feeds(np.load(folder / "calib_ids.npy"), args.calib_samples, args.calib_len)
    eval_ids = np.load(folder / "eval_ids.npy")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    bits = {"8": [False], "7": [True], "both": [False, True]}[args.weight_bits]

    # smooth once per alpha (the float model, saved), then quantize it with 8- and 7-bit weights
    sources, smoothing_notes = {}, {}
    for index, (name, setting) in enumerate(SMOOTHING.items()):
        if setting is None:
            sources[name] = (args.model, 0.0)
            continue
        alpha, grid = setting
        start = time.perf_counter()
        smoothed = smooth_model(args.model, calib, alpha=alpha, alphas=grid)
        seconds = time.perf_counter() - start
        report = smoothed.meta[SMOOTH_REPORT_KEY]
        folded = sum(group.where.startswith("folded") for group in report)
        smoothing_notes[name] = (alpha_summary(report), folded, len(report) - folded)
        path = args.out_dir / f"fp32_smooth_{index}.onnx"
        save_model(smoothed, path, external_data=True)
        del smoothed
        sources[name] = (path, seconds)
        logger.info("%s: smoothing %.0f s", name, seconds)

    paths, rows = {}, {}
    float_check = "fp32 + SmoothQuant a=0.5 (not quantized)"
    paths[float_check] = sources["W8A8 + SmoothQuant a=0.5"][0]
    rows[float_check] = (sources["W8A8 + SmoothQuant a=0.5"][1], None, smoothing_notes["W8A8 + SmoothQuant a=0.5"][0])
    for reduce_range in bits:
        for name, (source, smooth_seconds) in sources.items():
            label = f"{name}, {'7' if reduce_range else '8'}-bit weights"
            slug = label.lower().replace(" + ", "_").replace(" ", "_").replace(",", "").replace("=", "")
            out = args.out_dir / f"{slug}.onnx"
            start = time.perf_counter()
            quantize_w8a8(source, calib, out, smooth=False, reduce_range=reduce_range)
            seconds = time.perf_counter() - start
            paths[label] = out
            rows[label] = (smooth_seconds + seconds, model_mib(out),
                           smoothing_notes[name][0] if name in smoothing_notes else "-")
            logger.info("%s: quantized in %.0f s", label, seconds)

    start = time.perf_counter()
    results = compare_lms(args.model, paths, eval_ids, context=args.eval_len, max_windows=args.eval_windows)
    eval_seconds = time.perf_counter() - start
    first = next(iter(results.values()))

    unfused_table = ""
    if args.unfused_windows and False in bits:
        unfused_table = unfused_check(args.model, {k: v for k, v in paths.items() if "8-bit" in k}, eval_ids,
                                      args.eval_len, args.unfused_windows)
        print(unfused_table)

    command = "python scripts/bench_smoothquant.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("calib_samples", args.calib_samples),
                                                      ("calib_len", args.calib_len),
                                                      ("eval_windows", args.eval_windows),
                                                      ("eval_len", args.eval_len),
                                                      ("weight_bits", args.weight_bits),
                                                      ("unfused_windows", args.unfused_windows)))
    lines = [
        "| model | perplexity | KL(fp32 ‖ q) nats/token | top-1 agreement | quantize time | size "
        "| mean alpha (range) |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 | {first.ppl_float:.3f} | 0 | 100% | - | "
        f"{model_mib(args.model):.0f} MiB | - |",
    ]
    for label, result in results.items():
        seconds, size, alpha = rows[label]
        size_text = "-" if size is None else f"{size:.0f} MiB"
        lines.append(f"| {label} | {result.ppl_quant:.3f} | {result.kl_mean:.4f} | {result.top1_agreement:.1%} | "
                     f"{seconds:.0f} s | {size_text} | {alpha} |")
    table = "\n".join(lines)
    print(table)
    print(f"\n{first.tokens} scored tokens in {first.windows} windows; evaluation {eval_seconds:.0f} s")
    if not args.doc:
        return
    unfused_section = "" if not unfused_table else f"""
The same 8-bit-weight QDQ models run without graph optimizations (each
QuantizeLinear/DequantizeLinear in float, then a float MatMul: the W8A8 arithmetic
without the int16 pair sums) and with the fused kernels, on {args.unfused_windows} of
the evaluation windows (evenly spaced):

{unfused_table}
"""
    folded, inserted = smoothing_notes["W8A8 + SmoothQuant a=0.5"][1:]
    folding = (f"Of the {folded + inserted} input groups, {folded} (q/k/v, gate/up, lm_head) had `1/s` folded "
               f"into the RMSNorm gain; {inserted} (o_proj, down_proj) got an inserted `Mul`.")
    doc = f"""# SmoothQuant W8A8 on SmolLM2-135M

SmoothQuant (Xiao et al., arXiv 2211.10438) divides each MatMul input by per-channel
scales `s_j = max|X_j|^alpha / max|W_j|^(1-alpha)` (folded into the RMSNorm gains where
possible, else an inserted `Mul`) and multiplies the weight rows by `s`, so the
per-tensor int8 activation range is no longer set by a few outlier channels. Here it
runs before onnxruntime's own static quantizer (`quantize_static`, QDQ, MinMax):
int8 per-output-channel weights, uint8 per-tensor activations, float MatMul outputs,
only the 211 linear layers (q/k/v/o, gate/up/down, lm_head; attention scores stay float).
{folding}
`auto` searches alpha per input group on 512 sampled rows, minimising the int8
fake-quant output error `||x W - Q8(x/s) Q8(s W)||^2`, over 0.30..0.70 (the default grid
of `smooth_model`) or over 0.30..1.00 (step 0.05).

Model: SmolLM2-135M-Instruct exported by `scripts/export_smollm2.py` (fp32; its weights
were stored as Q4_1, which matters little for 8-bit per-channel weights).
Calibration: {args.calib_samples} windows x {args.calib_len} tokens of `calib_ids.npy`
(pydoc calib split); evaluation: {first.windows} windows x {args.eval_len} tokens of
`eval_ids.npy` (pydoc eval split, disjoint documents), {first.tokens} scored tokens, the
same windows for every model. onnxruntime CPU EP, default graph optimizations (the QDQ
MatMuls run as fused int8 kernels). CPU: {platform.machine()}, flags: {cpu_flags()}.

```
{command}
```

{table}

"8-bit weights" is onnxruntime's default; "7-bit weights" is `reduce_range=True`, which
onnxruntime recommends for x86 CPUs without VNNI: their u8 x s8 kernels add pairs of
products in int16 with saturation, so full-range 8-bit weights can overflow. With 7-bit
weights nothing overflows (on the tiny test decoder the fused kernels and the unfused
QDQ graph give the same outputs with 7-bit weights, not with 8-bit ones); on a CPU with
VNNI the 8-bit rows would not overflow either.
{unfused_section}"""
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(doc)
    logger.info("wrote %s", args.doc)


if __name__ == "__main__":
    main()
