"""Real-model benchmark: onnxq RTN/GPTQ/AWQ against ONNX Runtime's MatMulNBitsQuantizer on SmolLM2-135M.

For every method (``METHODS``): quantization wall time and peak RSS (load +
quantize + save, each in its own fresh subprocess; VmHWM, imports included),
output size (``.onnx`` + ``.onnx.data``); perplexity, mean KL(p_fp32 || p_quant)
per token and top-1 agreement against fp32 on the same evaluation windows
(``onnxq.eval.metrics.compare_lms``: one pass, the fp32 logits are computed once per
window for a group of models); ORT inference latency (fp32 against MatMulNBits
models at accuracy_level 0 and 4; the exported model has no KV cache, so the
"decode" row is a 1x1 forward, a proxy for one decode step's weight traffic, not a
real cached decode); and MiniLM sentence-embedding cosine for rtn/gptq/awq.

CAVEAT: SmolLM2's released weights were stored as Q4_1 (asymmetric, block 32), so
asymmetric block-32 RTN lands on that grid and reproduces them almost exactly.
Methods are compared at block 128 (sym and asym), off that grid.

Pieces (``--only``/``--skip`` take shell patterns matched against them):
``quant:<method>``, ``identical`` (RTN packed bytes onnxq vs ORT), ``eval:<model>``
(``<method>`` or ``<method>@acc4``), ``latency``, ``minilm:<method>``. Results are
merged into ``--json`` (so pieces can be rerun one at a time) and the markdown
report is regenerated from it each run; text after the NOTES_MARKER line of an
existing report is kept.

    python scripts/bench.py                                   # all default pieces (~25 min on 2 cores)
    python scripts/bench.py --only 'quant:onnxq-gptq*' 'eval:onnxq-gptq*'
    python scripts/bench.py --only '*gptq-b128-sym-damp0.1'    # one diagnostic variant
    python scripts/bench.py --skip 'latency' 'minilm:*'
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from report_files import mirror_into_readme, write_keeping_notes  # noqa: E402  (scripts/)

README_BEGIN, README_END = "<!-- bench.py table: begin -->", "<!-- bench.py table: end -->"
NOTES_MARKER = "<!-- Notes below this line are written by hand and kept when scripts/bench.py regenerates the file. -->"


@dataclass(frozen=True)
class Method:
    """One quantization run. ``tool``: onnxq or ort; ``options``: extra QuantConfig fields / ORT GPTQ options."""

    tool: str
    algo: str
    block_size: int
    symmetric: bool
    options: dict = field(default_factory=dict)
    samples: int | None = None  # calibration windows (default: --samples)
    extra: bool = False  # diagnostic variant: only run when named in --only or with --with-extras

    @property
    def settings(self) -> str:
        return f"int4 b{self.block_size} {'sym' if self.symmetric else 'asym'}"


def _methods() -> dict[str, Method]:
    m: dict[str, Method] = {}
    for tool in ("onnxq", "ort"):
        for block, sym in ((128, True), (128, False), (32, False)):
            m[f"{tool}-rtn-b{block}-{'sym' if sym else 'asym'}"] = Method(tool, "rtn", block, sym)
    for algo in ("gptq", "awq"):
        for sym in (True, False):
            m[f"onnxq-{algo}-b128-{'sym' if sym else 'asym'}"] = Method("onnxq", algo, 128, sym)
    # ORT's GPTQ runs the whole model once per (distinct MatMul input x sample): 8 samples keep it to minutes;
    # onnxq at the same 8 samples is the like-for-like row.
    m["ort-gptq-b128-sym-8s"] = Method("ort", "gptq", 128, True, samples=8)
    m["onnxq-gptq-b128-sym-8s"] = Method("onnxq", "gptq", 128, True, samples=8)
    # diagnostic variants
    m["onnxq-gptq-b128-sym-damp0.1"] = Method("onnxq", "gptq", 128, True, {"gptq": {"percdamp": 0.1}}, extra=True)
    m["onnxq-gptq-b128-sym-actorder"] = Method("onnxq", "gptq", 128, True, {"gptq": {"act_order": True}}, extra=True)
    m["onnxq-gptq-b128-sym-128s"] = Method("onnxq", "gptq", 128, True, samples=128, extra=True)
    m["onnxq-gptq-b128-sym-onepass"] = Method("onnxq", "gptq", 128, True, {"calibration": {"sequential": False}},
                                              extra=True)
    m["onnxq-awq-b128-sym-128s"] = Method("onnxq", "awq", 128, True, samples=128, extra=True)
    m["onnxq-awq-b128-sym-noclip"] = Method("onnxq", "awq", 128, True, {"awq": {"clip": False}}, extra=True)
    m["onnxq-rtn-b128-sym-mseclip"] = Method("onnxq", "rtn", 128, True, {"mse_clip": True}, extra=True)
    m["onnxq-rtn-b128-sym-emb"] = Method("onnxq", "rtn", 128, True, {"quantize_embeddings": True}, extra=True)
    m["ort-gptq-b128-sym"] = Method("ort", "gptq", 128, True, extra=True)
    return m


METHODS = _methods()
ACC4_EVALS = ("onnxq-rtn-b128-sym@acc4", "onnxq-rtn-b32-asym@acc4")
LATENCY_MODELS = ("fp32", "onnxq-rtn-b128-sym", "onnxq-rtn-b128-sym@acc4", "onnxq-rtn-b32-asym",
                  "onnxq-rtn-b32-asym@acc4")
MINILM_METHODS = ("onnxq-rtn-b128-sym", "onnxq-gptq-b128-sym", "onnxq-awq-b128-sym")
RTN_PAIRS = (("onnxq-rtn-b128-sym", "ort-rtn-b128-sym"), ("onnxq-rtn-b128-asym", "ort-rtn-b128-asym"),
             ("onnxq-rtn-b32-asym", "ort-rtn-b32-asym"))


# -- child process: one quantization ---------------------------------------------------

def _rss_mib() -> float:
    """Peak resident set of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calibration_feeds(model_path: str, calib_ids: str, samples: int, seq_len: int) -> list[dict]:
    from onnxq.calibration import TextReader, materialize

    return materialize(TextReader(None, model_path, token_ids=calib_ids, seq_len=seq_len, samples=samples))


def child(name: str, src: str, dst: str, calib_ids: str, samples: int, seq_len: int) -> None:
    """Fresh interpreter: import, load, (calibrate,) quantize, save; prints one JSON line."""
    method = METHODS[name]
    samples = method.samples or samples
    if method.tool == "onnxq":
        import onnxq

        rss_imports = _rss_mib()
        start = time.perf_counter()
        config = onnxq.QuantConfig.from_dict({
            "bits": 4, "block_size": method.block_size, "symmetric": method.symmetric, "algorithm": method.algo,
            **method.options, **({"calibration": {"samples": samples, **method.options.get("calibration", {})}}
                                 if method.algo != "rtn" else {})})
        feeds = _calibration_feeds(src, calib_ids, samples, seq_len) if method.algo != "rtn" else None
        model = onnxq.quantize(src, config, feeds)
        onnxq.save(model, dst, external_data=True)
    else:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            GPTQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        rss_imports = _rss_mib()
        start = time.perf_counter()
        if method.algo == "rtn":
            config = DefaultWeightOnlyQuantConfig(block_size=method.block_size, is_symmetric=method.symmetric, bits=4)
            quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=method.block_size,
                                             is_symmetric=method.symmetric, algo_config=config)
        else:
            class Reader(CalibrationDataReader):
                def __init__(self, feeds):
                    self.feeds, self.next = feeds, 0

                def get_next(self):
                    self.next += 1
                    return self.feeds[self.next - 1] if self.next <= len(self.feeds) else None

            reader = Reader(_calibration_feeds(src, calib_ids, samples, seq_len))
            config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128, **method.options)
            # A loaded ModelProto: given the path of a model with external data, ORT's GPTQ builds its
            # calibration session from bytes and cannot find the data unless run from the model's folder.
            quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=method.block_size,
                                             is_symmetric=method.symmetric, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(dst, use_external_data_format=True)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "peak_rss_mib": _rss_mib(), "rss_after_imports_mib": rss_imports,
                      "samples": samples if method.algo != "rtn" else 0}))


# -- driver pieces ---------------------------------------------------------------------

def _model_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(str(path) + ".data")) if p.exists())


def _method_path(workdir: Path, name: str) -> Path:
    return workdir / name / "model.onnx"


def _model_path(args: argparse.Namespace, name: str) -> Path:
    """The model file of an eval/latency name: fp32, ``<method>`` or ``<method>@acc4`` (made on demand)."""
    if name == "fp32":
        return args.model
    base, _, level = name.partition("@acc")
    path = _method_path(args.workdir, base)
    if not level:
        return path
    derived = path.with_name(f"model_acc{level}.onnx")
    if not derived.exists() or derived.stat().st_mtime < path.stat().st_mtime:
        import onnx
        from onnx import helper

        proto = onnx.load(path, load_external_data=False)  # the copy reads the same model.onnx.data
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [helper.make_attribute("accuracy_level", int(level))])
        onnx.save(proto, derived)
    return derived


def run_quant(args: argparse.Namespace, name: str, results: dict) -> None:
    dst = _method_path(args.workdir, name)
    shutil.rmtree(dst.parent, ignore_errors=True)  # ORT appends to an existing .data file
    dst.parent.mkdir(parents=True)
    python = args.ort_python if METHODS[name].tool == "ort" else sys.executable
    cmd = [python, __file__, "--child", name, str(args.model), str(dst), "--calib-ids", str(args.calib_ids),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    print(f"[quant] {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=args.quant_timeout)
    entry = results["methods"].setdefault(name, {})
    method = METHODS[name]
    entry.update({"tool": method.tool, "algo": method.algo, "settings": method.settings, "options": method.options})
    entry.pop("eval", None)  # a new model invalidates earlier accuracy numbers
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        entry["quant"] = {"error": " | ".join(tail)[-600:]}
        shutil.rmtree(dst.parent, ignore_errors=True)
        print(f"[quant] {name} FAILED: {entry['quant']['error']}", file=sys.stderr)
        return
    report = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"wall_s"'))  # ORT prints too
    entry["quant"] = json.loads(report) | {"size_bytes": _model_size(dst)}
    print(f"[quant] {name}: {entry['quant']}", file=sys.stderr, flush=True)


def _timed_out_quant(args: argparse.Namespace, name: str, results: dict) -> None:
    results["methods"].setdefault(name, {})["quant"] = {"error": f"timed out after {args.quant_timeout} s"}
    shutil.rmtree(_method_path(args.workdir, name).parent, ignore_errors=True)


def run_identical(args: argparse.Namespace, results: dict) -> None:
    """Are onnxq's and ORT's RTN MatMulNBits initializers byte-identical, node by node (matched by output name)?"""
    import onnx
    from onnx import numpy_helper

    def packed(path: Path) -> dict[str, list[bytes]]:
        proto = onnx.load(path)
        inits = {t.name: t for t in proto.graph.initializer}
        return {n.output[0]: [numpy_helper.to_array(inits[i]).tobytes() for i in n.input[1:4] if i]
                for n in proto.graph.node if n.op_type == "MatMulNBits"}

    out = results.setdefault("identical", {})
    for ours, theirs in RTN_PAIRS:
        a, b = _method_path(args.workdir, ours), _method_path(args.workdir, theirs)
        if not (a.exists() and b.exists()):
            continue
        pa, pb = packed(a), packed(b)
        same = sum(1 for k in pa if k in pb and pa[k] == pb[k])
        out[f"{ours} vs {theirs}"] = {"nodes_onnxq": len(pa), "nodes_ort": len(pb), "identical_nodes": same}
        print(f"[identical] {ours} vs {theirs}: {same}/{len(pa)} (ORT {len(pb)})", file=sys.stderr)


def run_eval(args: argparse.Namespace, names: list[str], results: dict) -> None:
    from tqdm import tqdm

    from onnxq.eval.metrics import compare_lms

    ids = np.load(args.eval_ids)
    names = [n for n in names if _method_path(args.workdir, n.partition("@")[0]).exists()]
    for i in range(0, len(names), args.eval_group):
        group = names[i:i + args.eval_group]
        print(f"[eval] {', '.join(group)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        compared = compare_lms(args.model, {n: _model_path(args, n) for n in group}, ids, context=args.context,
                               max_windows=args.max_windows,
                               progress=lambda it, **kw: tqdm(it, file=sys.stderr, **kw))
        seconds = time.perf_counter() - start
        for name, c in compared.items():
            entry = results["methods"].setdefault(name, {})
            entry["eval"] = vars(c) | {"context": args.context, "group_seconds": seconds}
            results["fp32"] = {"ppl": c.ppl_float, "nll": c.nll_float, "tokens": c.tokens, "windows": c.windows,
                               "context": args.context, "size_bytes": _model_size(args.model)}
            print(f"[eval] {name}: ppl {c.ppl_quant:.4f} (fp32 {c.ppl_float:.4f}) KL {c.kl_mean:.5f} "
                  f"top1 {c.top1_agreement:.4f}", file=sys.stderr, flush=True)


def run_latency(args: argparse.Namespace, results: dict) -> None:
    """Median ORT latency of a 1x256 prompt forward and a 1x1 forward, models interleaved round by round."""
    import onnxruntime as ort

    ids = np.load(args.eval_ids)
    prompt, one = ids[None, :256].astype(np.int64), ids[None, :1].astype(np.int64)
    names = [n for n in LATENCY_MODELS if n == "fp32" or _method_path(args.workdir, n.partition("@")[0]).exists()]
    sessions = {}
    for name in names:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(_model_path(args, name)), options, providers=["CPUExecutionProvider"])
    times: dict[str, dict[str, list[float]]] = {n: {"prompt": [], "decode": []} for n in names}
    for session in sessions.values():  # warm-up
        session.run(None, {"input_ids": prompt})
        session.run(None, {"input_ids": one})
    for _ in range(args.latency_rounds):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, {"input_ids": prompt})
            times[name]["prompt"].append(time.perf_counter() - t0)
            for _ in range(10):
                t0 = time.perf_counter()
                session.run(None, {"input_ids": one})
                times[name]["decode"].append(time.perf_counter() - t0)
    results["latency"] = {
        name: {kind: {"median_ms": 1000 * float(np.median(v)), "p10_ms": 1000 * float(np.percentile(v, 10)),
                      "runs": len(v)} for kind, v in t.items()} for name, t in times.items()}
    for name, t in results["latency"].items():
        print(f"[latency] {name}: prompt {t['prompt']['median_ms']:.1f} ms, 1x1 {t['decode']['median_ms']:.2f} ms",
              file=sys.stderr)


def run_minilm(args: argparse.Namespace, names: list[str], results: dict) -> None:
    """Quantize MiniLM in-process with each method, cosine of sentence_embedding vs fp32 on pydoc eval paragraphs."""
    import onnxq
    from onnxq.calibration import ListReader, TextReader, materialize, tokenize
    from onnxq.eval.metrics import compare_embeddings
    from text_data import get_text

    model = args.minilm / "model.onnx"
    tokenizer = args.minilm / "tokenizer.onnx"
    paragraphs = [" ".join(p.split()) for p in get_text("pydoc", "eval").split("\n\n") if len(p.split()) >= 8]
    picked = [paragraphs[i] for i in np.unique(np.linspace(0, len(paragraphs) - 1, args.minilm_sentences)
                                                .round().astype(int))]
    feeds = []
    for text in picked:
        ids = tokenize(text, tokenizer)[None, :args.minilm_max_tokens]
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    calib = materialize(TextReader(get_text("pydoc", "calib"), model, tokenizer=tokenizer, seq_len=128,
                                   samples=args.samples))
    out = results.setdefault("minilm", {})
    for name in names:
        method = METHODS[name]
        start = time.perf_counter()
        config = onnxq.QuantConfig(bits=4, block_size=method.block_size, symmetric=method.symmetric,
                                   algorithm=method.algo)
        quant = onnxq.quantize(str(model), config, calib if method.algo != "rtn" else None)
        seconds = time.perf_counter() - start
        path = args.workdir / "minilm" / name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnxq.save(quant, path)
        c = compare_embeddings(model, path, ListReader(feeds))
        out[name] = vars(c) | {"quant_seconds": seconds, "size_bytes": _model_size(path),
                               "fp32_size_bytes": _model_size(model), "calib": f"{len(calib)} x 128 tokens",
                               "sentences": len(feeds)}
        print(f"[minilm] {name}: cosine mean {c.cosine_mean:.6f} min {c.cosine_min:.6f}", file=sys.stderr, flush=True)


# -- report ------------------------------------------------------------------------------

def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import onnxruntime

    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs), Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}")


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _targets(results: dict) -> list[str]:
    methods, fp32 = results["methods"], results.get("fp32", {})
    ppl = {n: m["eval"]["ppl_quant"] for n, m in methods.items() if "eval" in m}
    lines = []
    for ours, theirs in RTN_PAIRS:
        if ours in ppl and theirs in ppl:
            ok = ppl[ours] <= ppl[theirs] * (1 + 1e-9)
            lines.append(f"- onnxq RTN no worse than ORT RTN, {METHODS[ours].settings}: {ppl[ours]:.4f} vs "
                         f"{ppl[theirs]:.4f}: **{'met' if ok else 'MISSED'}**")
    base = fp32.get("ppl")
    for scheme in ("sym", "asym"):
        rtn = ppl.get(f"onnxq-rtn-b128-{scheme}")
        for algo in ("gptq", "awq"):
            name = f"onnxq-{algo}-b128-{scheme}"
            if base is None or rtn is None or name not in ppl:
                continue
            gap = rtn - base
            recovered = (rtn - ppl[name]) / gap if gap > 0 else float("nan")
            lines.append(f"- {algo.upper()} recovers >= 50% of the RTN perplexity gap, int4 b128 {scheme}: "
                         f"RTN {rtn:.4f}, {algo.upper()} {ppl[name]:.4f}, fp32 {base:.4f} -> "
                         f"{100 * recovered:.0f}% recovered: **{'met' if recovered >= 0.5 else 'MISSED'}**")
    size = methods.get("onnxq-rtn-b128-sym", {}).get("quant", {}).get("size_bytes")
    if size and fp32.get("size_bytes"):
        share = size / fp32["size_bytes"]
        lines.append(f"- 4-bit model file <= 30% of fp32 (onnxq-rtn-b128-sym, embedding table left in fp32): "
                     f"{_mib(size)} / {_mib(fp32['size_bytes'])} MiB = {100 * share:.1f}%: "
                     f"**{'met' if share <= 0.30 else 'MISSED'}**")
    emb = methods.get("onnxq-rtn-b128-sym-emb", {}).get("quant", {}).get("size_bytes")
    if emb and fp32.get("size_bytes"):
        lines.append(f"  (with `quantize_embeddings` as well: {_mib(emb)} MiB = {100 * emb / fp32['size_bytes']:.1f}%)")
    return lines


def write_report(args: argparse.Namespace, results: dict) -> None:
    methods, fp32 = results["methods"], results.get("fp32", {})
    ev = fp32 or {}
    lines = [
        "# Results on real models",
        "",
        "Generated by `scripts/bench.py` from `" + os.path.relpath(args.json, ROOT) + "`; commands below.",
        "",
        f"Machine: {results.get('machine', _machine())}. Load average during the last run: "
        f"{results.get('loadavg', '?')} (other people's jobs shared the cores: timings are indicative).",
        "",
        "**CAVEAT:** SmolLM2-135M-Instruct's only offline copy stores its layer weights as Q4_1 (asymmetric 4-bit, "
        "block 32, float scale and float minimum): the exported fp32 weights sit on that grid. MatMulNBits' integer "
        "zero points cannot express Q4_1's float minimum, so block-32 asymmetric RTN is not lossless here (see its "
        "KL), but the grid may still favour block-32 asymmetric schemes: compare methods at block 128.",
        "",
        "## SmolLM2-135M: accuracy and quantization cost",
        "",
        f"Evaluation: {ev.get('tokens', '?')} scored tokens of the pydoc eval split (`eval_ids.npy`), "
        f"{ev.get('windows', '?')} non-overlapping windows of {ev.get('context', args.context)} tokens evenly spaced "
        f"over the split, the same for every model; KL is mean KL(p_fp32 || p_quant) per token in nats. "
        f"Calibration (GPTQ/AWQ, both tools): {args.samples} windows x {args.seq_len} tokens of `calib_ids.npy` "
        "(disjoint documents) unless the method name says otherwise. Quantization time and peak RSS: a fresh process "
        "doing load + calibrate + quantize + save (VmHWM, interpreter and imports included).",
        "",
        "| method | tool | settings | quant time (s) | peak RSS (MiB) | size (MiB) | ppl | Δppl | KL | top-1 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 | – | – | – | – | {_mib(fp32.get('size_bytes'))} | {_fmt(fp32.get('ppl'), '.4f')} | – | – | – |",
    ]
    order = [n for n in METHODS if n in methods] + sorted(n for n in methods if n not in METHODS)
    for name in order:
        m = methods[name]
        q, e = m.get("quant", {}), m.get("eval", {})
        base = name.partition("@")[0]
        method = METHODS.get(base)
        settings = m.get("settings") or (method.settings if method else "")
        if "@acc" in name:
            settings += f", accuracy_level {name.partition('@acc')[2]}"
            q = methods.get(base, {}).get("quant", {})
        options = ", ".join(f"{k}={v}" for k, v in (method.options if method else {}).items())
        if method and method.samples:
            options = ", ".join(filter(None, [options, f"{method.samples} calib windows"]))
        if q.get("error"):
            lines.append(f"| {name} | {m.get('tool', '')} | {settings} | failed: {q['error'][:200]} | | | | | | |")
            continue
        delta = e.get("ppl_quant") - fp32["ppl"] if e and fp32.get("ppl") else None
        lines.append(
            f"| {name} | {method.tool if method else ''} | {settings}{' (' + options + ')' if options else ''} "
            f"| {_fmt(q.get('wall_s'), '.1f')} | {_fmt(q.get('peak_rss_mib'), '.0f')} | {_mib(q.get('size_bytes'))} "
            f"| {_fmt(e.get('ppl_quant'), '.4f')} | {_fmt(delta, '+.4f')} | {_fmt(e.get('kl_mean'), '.5f')} "
            f"| {_fmt(100 * e['top1_agreement'] if e else None, '.2f')}{'%' if e else ''} |")
    lines += ["", "### Targets", "", *_targets(results)]
    if args.markdown.resolve() == (ROOT / "docs" / "RESULTS.md").resolve():  # the README shows the default report
        mirror_into_readme(ROOT / "README.md", README_BEGIN, README_END,
                           lines[lines.index("## SmolLM2-135M: accuracy and quantization cost") + 2:])
    if results.get("identical"):
        lines += ["", "RTN packed weights, onnxq vs ORT (MatMulNBits B/scales/zero_points bytes, per node):", ""]
        lines += [f"- {k}: {v['identical_nodes']} of {v['nodes_onnxq']} nodes identical (ORT wrote {v['nodes_ort']})"
                  for k, v in results["identical"].items()]
    if results.get("latency"):
        lat = results["latency"]
        f32 = lat.get("fp32", {})
        lines += ["", "## SmolLM2-135M: ORT CPU latency", "",
                  "The exported model has no KV cache: the prompt row is one 1x256 forward; the 1x1 row is a "
                  "one-token forward, a proxy for a decode step (all weights read once), not a cached decode. "
                  "Median over rounds that interleave the models (p10 in brackets); default intra-op threads.", "",
                  "| model | 1x256 prompt (ms) | vs fp32 | 1x1 forward (ms) | vs fp32 |", "|---|---:|---:|---:|---:|"]
        for name, t in lat.items():
            p, d = t["prompt"], t["decode"]
            sp = f32["prompt"]["median_ms"] / p["median_ms"] if f32 else None
            sd = f32["decode"]["median_ms"] / d["median_ms"] if f32 else None
            label = name.replace("@acc4", " (accuracy_level 4)") + (" (accuracy_level 0)" if "@" not in name
                                                                        and name != "fp32" else "")
            lines.append(f"| {label} | {p['median_ms']:.1f} ({p['p10_ms']:.1f}) | {_fmt(sp, '.2f')}x "
                         f"| {d['median_ms']:.2f} ({d['p10_ms']:.2f}) | {_fmt(sd, '.2f')}x |")
    if results.get("minilm"):
        lines += ["", "## all-MiniLM-L6-v2: sentence-embedding cosine vs fp32", "",
                  "pydoc eval-split paragraphs (evenly spaced, at most "
                  f"{args.minilm_max_tokens} tokens each); calibration: pydoc calib split, 128-token windows. "
                  "In-process quantization time.", "",
                  "| method | settings | calibration | quant time (s) | size (MiB) | cosine mean | cosine min | sentences |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for name, r in results["minilm"].items():
            method = METHODS[name]
            lines.append(f"| {name} | {method.settings} | {r['calib'] if method.algo != 'rtn' else '–'} "
                         f"| {r['quant_seconds']:.1f} | {_mib(r['size_bytes'])} (fp32 {_mib(r['fp32_size_bytes'])}) "
                         f"| {r['cosine_mean']:.6f} | {r['cosine_min']:.6f} | {r['sentences']} |")
    lines += ["", "## Commands", "", "```", *results.get("commands", []), "```", ""]
    write_keeping_notes(args.markdown, "\n".join(lines) + "\n", NOTES_MARKER)


# -- main ----------------------------------------------------------------------------------

def _pieces(args: argparse.Namespace) -> list[str]:
    named = [f"quant:{n}" for n in METHODS] + ["identical"] + [f"eval:{n}" for n in METHODS] \
        + [f"eval:{n}" for n in ACC4_EVALS] + ["latency"] + [f"minilm:{n}" for n in MINILM_METHODS]

    def extra(piece: str) -> bool:
        name = piece.partition(":")[2].partition("@")[0]
        return name in METHODS and METHODS[name].extra

    if args.only:
        chosen = [p for p in named if any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p.partition(":")[2], pat)
                                          for pat in args.only)]
    else:
        chosen = [p for p in named if args.with_extras or not extra(p)]
    return [p for p in chosen if not any(fnmatch.fnmatchcase(p, pat) for pat in args.skip)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real = ROOT / "models" / "real"
    parser.add_argument("--model", type=Path, default=real / "smollm2" / "model.onnx")
    parser.add_argument("--calib-ids", type=Path, default=real / "smollm2" / "calib_ids.npy")
    parser.add_argument("--eval-ids", type=Path, default=real / "smollm2" / "eval_ids.npy")
    parser.add_argument("--minilm", type=Path, default=real / "minilm", help="folder with model.onnx, tokenizer.onnx")
    parser.add_argument("--workdir", type=Path, default=real / "bench", help="quantized models are written here")
    parser.add_argument("--json", type=Path, default=real / "bench" / "results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--context", type=int, default=256, help="evaluation window (default 256)")
    parser.add_argument("--max-windows", type=int, default=32, help="evaluation windows (default 32)")
    parser.add_argument("--eval-group", type=int, default=6, help="quantized models per evaluation pass")
    parser.add_argument("--latency-rounds", type=int, default=8)
    parser.add_argument("--minilm-sentences", type=int, default=128)
    parser.add_argument("--minilm-max-tokens", type=int, default=128)
    parser.add_argument("--quant-timeout", type=int, default=1800, help="seconds per quantization subprocess")
    parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN", help="run only matching pieces")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PATTERN", help="skip matching pieces")
    parser.add_argument("--with-extras", action="store_true", help="also run the diagnostic variants")
    parser.add_argument("--list", action="store_true", help="print the selected pieces and exit")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the markdown from the JSON")
    parser.add_argument("--ort-python", default=sys.executable,
                        help="interpreter for ORT's quantizer (its GPTQ imports torch, which onnxq does not need)")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, str(args.calib_ids), args.samples, args.seq_len)
        return
    pieces = _pieces(args)
    if args.list:
        print("\n".join(pieces))
        return
    results = json.loads(args.json.read_text()) if args.json.exists() else {"methods": {}}
    if not args.report_only:
        results["machine"] = _machine()
        command = "python scripts/bench.py " + " ".join(sys.argv[1:])
        results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
        args.workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for piece in pieces:
            if piece.startswith("quant:"):
                name = piece[6:]
                try:
                    run_quant(args, name, results)
                except subprocess.TimeoutExpired:
                    _timed_out_quant(args, name, results)
                _save(args, results)
        if "identical" in pieces:
            run_identical(args, results)
        evals = [p[5:] for p in pieces if p.startswith("eval:")]
        if evals:
            run_eval(args, evals, results)
            _save(args, results)
        if "latency" in pieces:
            run_latency(args, results)
        minilm = [p[7:] for p in pieces if p.startswith("minilm:")]
        if minilm:
            run_minilm(args, minilm, results)
        results["loadavg"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        _save(args, results)
    write_report(args, results)
    print(f"wrote {args.markdown} and {args.json}", file=sys.stderr)


def _save(args: argparse.Namespace, results: dict) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
