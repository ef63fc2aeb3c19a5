"""int4 accuracy on a real LM, every method side by side: onnxq vs onnxruntime's tool vs the GenAI builder.

SmolLM2-135M-Instruct as the ONNX Runtime GenAI builder exports it (``models/real/smollm2_kv/genai-fp32``,
``scripts/export_smollm2_kv.py``), int4 block 128 symmetric (off the Q4_1 grid the weights were stored
on, see ../shared/MODELS.md) unless a row says otherwise. Calibration: pydoc text (``scripts/text_data.py
--source pydoc --split calib``), ``--samples`` windows of ``--seq-len`` tokens; evaluation: Shakespeare
(``--source shakespeare --split eval``), another text domain, ``--windows`` windows of 256 tokens, the same
for every row. Each row is whole processes as a user runs them: quantize (wall time, peak RSS), then
``python -m onnxq eval FLOAT OUT`` (perplexity, KL and top-1 against the float model).

* onnxq rows: ``python -m onnxq quantize`` with the GenAI folder's defaults except ``--accuracy-level 0``
  (pure weight error; the tied embedding table is int4, shared with the lm_head, as the builder does);
* onnxruntime rows: ``scripts/ort_tool_quantize.py`` (``MatMulNBitsQuantizer``; HQQ through torch in
  ``.venv-export``); it leaves the Gather's float table beside its int4 lm_head;
* the GenAI builder's own int4 (its defaults: block 32 sym RTN, accuracy_level 4);
* "Optimum:" rows: the same model as Optimum's ``text-generation-with-past`` export
  (``models/real/smollm2_kv/optimum-fp32``: the tied table read by ``Gather(E)`` and ``Transpose(E) -> MatMul``),
  for what each tool does with a tied embedding.

    python scripts/bench_int4.py [--only NAME ...] [--windows 16] [--samples 32] [--seq-len 256] [--render]
    python scripts/bench_int4.py --model gemma3 --only "onnxq rtn" "onnxq gptq"   # its table: 8 windows
    python scripts/bench_int4.py --windows 128 --only "onnxq rtn"                   # a larger evaluation: RTN,
    python scripts/bench_int4.py --windows 128 --eval-only --only "onnxq gptq"      # then rows already quantized

Appends one JSON line per run to ``models/real/smollm2_kv/int4/results.jsonl`` and writes
``docs/INT4_RESULTS.md`` (table, commands, targets; notes below the marker are kept), mirrored into README.md.
Another ``--windows`` count than the table's goes to ``results_wN.jsonl`` and ``report_wN.md`` beside it, with
each row's share of RTN's gap and its 95% paired bootstrap interval over the windows.

``--model gemma3``: the second LM, Gemma 3 270M (``scripts/export_second_lm.py``: the GenAI builder's
fp32 export without a windowed KV cache, ``models/real/gemma3_270m/genai-fp32-fullkv``; its builder int4
``genai-int4-fullkv``). Its tokenizer starts every text with ``<bos>``, so calibration and evaluation
windows do too (``--bos auto``, the default). Results go to ``models/real/gemma3_270m/int4/results.jsonl``
and ``docs/INT4_RESULTS_GEMMA.md``, mirrored into README.md between their own markers.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from report_files import mirror_into_readme, write_keeping_notes  # noqa: E402

MODELS = {  # name -> (folder, float export, builder int4 export, report, README markers, title, builder command)
    "smollm2": (ROOT / "models" / "real" / "smollm2_kv", "genai-fp32", "genai-int4", "INT4_RESULTS.md",
                "int4-results", "SmolLM2-135M-Instruct (GenAI builder fp32 export)",
                "python -m onnxruntime_genai.models.builder -i hf -o genai-int4 -p int4 -e cpu "
                "(scripts/export_smollm2_kv.py)"),
    "gemma3": (ROOT / "models" / "real" / "gemma3_270m", "genai-fp32-fullkv", "genai-int4-fullkv",
               "INT4_RESULTS_GEMMA.md", "int4-gemma", "Gemma 3 270M (GenAI builder fp32 export, full KV cache; "
               "weights from a Q4_K_M GGUF: see docs/MODELS_FOUND.md; windows start with <bos>)",
               "python scripts/export_second_lm.py (GenAI builder -p int4 -e cpu, windowed_kv_cache=false)"),
}
REAL, FLOAT, WORK = MODELS["smollm2"][0], MODELS["smollm2"][0] / "genai-fp32", MODELS["smollm2"][0] / "int4"
MODEL = MODELS["smollm2"]
MARKER = "\n<!-- notes below are kept when the script rewrites this file -->\n"
TABLE_WINDOWS = {"smollm2": 16, "gemma3": 8}  # the committed tables' evaluation; other counts go to
# results_wN.jsonl / report_wN.md
WINDOW_SUMS = ("window_tokens", "window_nll_float", "window_nll_quant")  # per eval window, for intervals
PY = sys.executable
TORCH_PY = str(ROOT / ".venv-export" / "bin" / "python")
ORT_TOOL = str(ROOT / "scripts" / "ort_tool_quantize.py")
B128 = ["--block-size", "128", "--accuracy-level", "0"]
CALIB = object()  # placeholder for the calibration flags
GEN = object()  # placeholder for the self-generated calibration ids (_generated) as --calib-data
SELF = ", self-generated calibration"

# name -> (tool, flags); tool: "onnxq", "ort", "ort-torch" (onnxruntime's tool under .venv-export), "builder"
RUNS: dict[str, tuple[str, list]] = {
    "GenAI builder int4 (b32 sym RTN, acc 4)": ("builder", []),
    "onnxruntime default (RTN)": ("ort", ["--algo", "default", "--block-size", "128"]),
    "onnxruntime k_quant (asym)": ("ort", ["--algo", "k_quant", "--block-size", "128", "--fix-zp-packing"]),
    "onnxruntime HQQ (asym)": ("ort-torch", ["--algo", "hqq", "--block-size", "128"]),
    "onnxruntime GPTQ (8 samples)": ("ort-torch", ["--algo", "gptq", "--block-size", "128", CALIB]),
    "onnxq rtn": ("onnxq", [*B128]),
    "onnxq k_quant": ("onnxq", [*B128, "--algo", "k_quant"]),
    "onnxq k_quant (calibrated)": ("onnxq", [*B128, "--algo", "k_quant", CALIB]),
    "onnxq hqq (asym)": ("onnxq", [*B128, "--algo", "hqq", "--asym"]),
    "onnxq gptq": ("onnxq", [*B128, "--algo", "gptq", CALIB]),
    "onnxq gptq --hessian-shrink 0.5": ("onnxq", [*B128, "--algo", "gptq", "--hessian-shrink", "0.5", CALIB]),
    "onnxq gptq --hessian-shrink 0": ("onnxq", [*B128, "--algo", "gptq", "--hessian-shrink", "0", CALIB]),
    "onnxq gptq --float32-factor": ("onnxq", [*B128, "--algo", "gptq", "--float32-factor", CALIB]),
    "onnxq awq": ("onnxq", [*B128, "--algo", "awq", CALIB]),
    "onnxq awq+gptq": ("onnxq", [*B128, "--algo", "awq+gptq", CALIB]),
    "onnxq awq+k_quant": ("onnxq", [*B128, "--algo", "awq+k_quant", CALIB]),
    "onnxq autoround (50 steps)": ("onnxq", [*B128, "--algo", "autoround", "--steps", "50", CALIB]),
    "onnxq rtn asym": ("onnxq", [*B128, "--asym"]),
    "onnxq rtn + presets lm_head8,mixed_layers8": ("onnxq", [*B128, "--mixed-preset", "lm_head8,mixed_layers8"]),
    "onnxq gptq + presets lm_head8,mixed_layers8": ("onnxq", [*B128, "--algo", "gptq", "--mixed-preset",
                                                              "lm_head8,mixed_layers8", CALIB]),
    "onnxq awq + presets lm_head8,mixed_layers8": ("onnxq", [*B128, "--algo", "awq", "--mixed-preset",
                                                             "lm_head8,mixed_layers8", CALIB]),
    "onnxq k_quant (calibrated) + presets lm_head8,mixed_layers8": ("onnxq", [*B128, "--algo", "k_quant",
                                                                             "--mixed-preset",
                                                                             "lm_head8,mixed_layers8", CALIB]),
    "onnxq awq+k_quant + presets lm_head8,mixed_layers8": ("onnxq", [*B128, "--algo", "awq+k_quant",
                                                                     "--mixed-preset", "lm_head8,mixed_layers8",
                                                                     CALIB]),
    "onnxq gptq, mixed 4.8 effective bits": ("onnxq", [*B128, "--algo", "gptq", "--effective-bits", "4.8",
                                                       "--mp-samples", "2", CALIB]),
    "onnxq awq, mixed 4.8 effective bits": ("onnxq", [*B128, "--algo", "awq", "--effective-bits", "4.8",
                                                      "--mp-samples", "2", CALIB]),
    "onnxq k_quant (calibrated), mixed 4.8 effective bits": ("onnxq", [*B128, "--algo", "k_quant", "--effective-bits",
                                                                       "4.8", "--mp-samples", "2", CALIB]),
    "onnxq awq+k_quant, mixed 4.8 effective bits": ("onnxq", [*B128, "--algo", "awq+k_quant", "--effective-bits", "4.8",
                                                              "--mp-samples", "2", CALIB]),
    # calibrated on token ids the fp32 model sampled itself (`onnxq generate`, made once per model: _generated)
    "onnxq gptq" + SELF: ("onnxq", [*B128, "--algo", "gptq", GEN]),
    "onnxq gptq --hessian-shrink 0" + SELF: ("onnxq", [*B128, "--algo", "gptq", "--hessian-shrink", "0", GEN]),
    "onnxq gptq --float32-factor" + SELF: ("onnxq", [*B128, "--algo", "gptq", "--float32-factor", GEN]),
    "onnxq awq" + SELF: ("onnxq", [*B128, "--algo", "awq", GEN]),
    "onnxq awq+gptq" + SELF: ("onnxq", [*B128, "--algo", "awq+gptq", GEN]),
    # the norm-fed weights fitted to the float model's outputs (GPTAQ's asymmetric calibration)
    "onnxq gptq --float-target" + SELF: ("onnxq", [*B128, "--algo", "gptq", "--float-target", GEN]),
    "onnxq awq --float-target" + SELF: ("onnxq", [*B128, "--algo", "awq", "--float-target", GEN]),
    "onnxq awq+gptq --float-target" + SELF: ("onnxq", [*B128, "--algo", "awq+gptq", "--float-target", GEN]),
    "onnxq awq+k_quant" + SELF: ("onnxq", [*B128, "--algo", "awq+k_quant", GEN]),
    "onnxq k_quant" + SELF: ("onnxq", [*B128, "--algo", "k_quant", GEN]),
    "onnxq gptq + presets lm_head8,mixed_layers8" + SELF: ("onnxq", [*B128, "--algo", "gptq", "--mixed-preset",
                                                                     "lm_head8,mixed_layers8", GEN]),
    "onnxq awq+gptq + presets lm_head8,mixed_layers8" + SELF: ("onnxq", [*B128, "--algo", "awq+gptq", "--mixed-preset",
                                                                         "lm_head8,mixed_layers8", GEN]),
    "onnxq awq+k_quant + presets lm_head8,mixed_layers8" + SELF: ("onnxq", [*B128, "--algo", "awq+k_quant",
                                                                            "--mixed-preset", "lm_head8,mixed_layers8",
                                                                            GEN]),
    "onnxq gptq, mixed 4.8 effective bits" + SELF: ("onnxq", [*B128, "--algo", "gptq", "--effective-bits", "4.8",
                                                              "--mp-samples", "2", GEN]),
    # int4 at the builder's block 32 (ModelOpt's counting: 4 bits whatever the block), 20% of the weights in int8
    **{f"onnxq {algo}, mixed 4.8 effective bits, int4 block 32" + SELF: ("onnxq", [
        "--block-size", "32", "--accuracy-level", "0", "--algo", algo, "--effective-bits", "4.8",
        "--candidates", "int4_b32,int8_b128", "--mp-samples", "2", GEN]) for algo in ("gptq", "awq+k_quant", "awq+gptq")},
    # the same plan with asymmetric int4 (and int8): ModelOpt's counting prices it at 4 bits as well
    "onnxq gptq, mixed 4.8 effective bits, int4 block 32 asym" + SELF: ("onnxq", [
        "--block-size", "32", "--asym", "--accuracy-level", "0", "--algo", "gptq", "--effective-bits", "4.8",
        "--candidates", "int4_b32,int8_b128", "--mp-samples", "2", GEN]),
    # the builder's int4 file stores 5.0 bits per weight (block 32, float32 scales): a plan no larger than it
    "onnxq gptq, mixed at the builder's size (4.99 stored bits)" + SELF: ("onnxq", [
        "--block-size", "64", "--accuracy-level", "0", "--algo", "gptq", "--stored-bits", "4.99",
        "--candidates", "int4_b128,int4_b64,int4_b32,int8_b128,int8_b64", "--mp-samples", "2", GEN]),
    # the tied-table default on the torch / Optimum form, Gather(E) + Transpose(E) -> MatMul (int4 b128 sym)
    "Optimum: onnxruntime default (RTN)": ("ort", ["--algo", "default", "--block-size", "128"]),
    "Optimum: onnxq rtn (default: tied table shared, 8-bit)": ("onnxq", [*B128]),
    "Optimum: onnxq rtn --quantize-embeddings (int4 shared)": ("onnxq", [*B128, "--quantize-embeddings"]),
    "Optimum: onnxq rtn --no-quantize-embeddings": ("onnxq", [*B128, "--no-quantize-embeddings"]),
    "Optimum: onnxq gptq (default)": ("onnxq", [*B128, "--algo", "gptq", CALIB]),
}


def _select(model: str) -> None:
    """Point the module's paths at ``model`` (a key of MODELS)."""
    global REAL, FLOAT, WORK, MODEL
    MODEL = MODELS[model]
    REAL, FLOAT, WORK = MODEL[0], MODEL[0] / MODEL[1], MODEL[0] / "int4"


def _float_of(name: str) -> Path:
    return REAL / "optimum-fp32" if name.startswith("Optimum:") else FLOAT


def _run(cmd: list[str]) -> tuple[float, float, str, str]:
    """``(wall s, peak RSS MiB, stdout, stderr)`` of one process (GNU time's maxrss)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = [line for line in proc.stderr.splitlines() if line.startswith("maxrss_kib ")]
    if proc.returncode != 0:
        return wall, float("nan"), proc.stdout, proc.stderr
    return wall, int(rss[-1].split()[1]) / 1024, proc.stdout, proc.stderr


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 2**20


def _texts() -> tuple[Path, Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {"calib": (WORK / "calib_pydoc.txt", "pydoc", "calib"), "eval": (WORK / "eval_shakespeare.txt",
                                                                             "shakespeare", "eval")}
    for path, source, split in paths.values():
        if not path.exists():
            subprocess.run([PY, str(ROOT / "scripts" / "text_data.py"), "--source", source, "--split", split,
                            "--out", str(path)], check=True, capture_output=True)
    return paths["calib"][0], paths["eval"][0]


def _generated_path(args: argparse.Namespace) -> Path:
    return WORK / f"calib_generated_{args.samples}x{args.seq_len}.npy"


def _generated(args: argparse.Namespace) -> Path:
    """The self-generated calibration ids of the float model (``python -m onnxq generate``, seed 0), made once:
    ``WORK/calib_generated_SxL.npy``; the generation's wall time goes to ``WORK/calib_generated_SxL.json``."""
    path = _generated_path(args)
    if not path.exists():
        cmd = [PY, "-m", "onnxq", "generate", str(FLOAT), str(path), "--samples", str(args.samples),
               "--seq-len", str(args.seq_len), "--quiet"]
        wall, rss, _, stderr = _run(cmd)
        if rss != rss:
            raise SystemExit(f"onnxq generate failed: {stderr.strip()}")
        path.with_suffix(".json").write_text(json.dumps({"seconds": round(wall, 1), "command": _command(cmd)}))
    return path


def _generation_note(args: argparse.Namespace) -> str:
    """What the header says of the generated calibration ids (their command and time), when they were made."""
    record = _generated_path(args).with_suffix(".json")
    if not record.exists():
        return ""
    made = json.loads(record.read_text())
    return f" (made once by `{made['command']}` in {made['seconds']} s, not counted in the rows' quantize time)"


def _command(cmd: list[str]) -> str:
    shown = [("python" if part in (PY, TORCH_PY) else part) for part in cmd]
    return " ".join(shown).replace(str(ROOT) + "/", "")


def bench(name: str, args: argparse.Namespace, calib: Path, eval_text: Path) -> dict:
    tool, flags = RUNS[name]
    row: dict = {"run": name, "tool": tool}
    out = WORK / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    samples = 8 if tool.startswith("ort") and "gptq" in flags else args.samples
    calib_flags = ["--calib-data", str(calib), "--samples", str(samples), "--seq-len", str(args.seq_len)]
    gen_flags = (["--calib-data", str(_generated(args)), "--samples", str(samples), "--seq-len", str(args.seq_len)]
                 if GEN in flags else [])
    flags = [f for flag in flags for f in (calib_flags if flag is CALIB else gen_flags if flag is GEN else [flag])]
    if tool == "builder":
        out = REAL / MODEL[2]
        row |= {"quantize_s": None, "peak_rss_mib": None, "command": MODEL[6]}
    elif args.eval_only:
        if not (out / "model.onnx").exists():
            raise SystemExit(f"--eval-only: {out} has no model.onnx; run {name!r} without --eval-only first")
        earlier = next((rows[name] for path in [WORK / "results.jsonl", *sorted(WORK.glob("results_w*.jsonl"))]
                        if name in (rows := _rows(path))), {})
        row |= {key: earlier.get(key) for key in ("quantize_s", "peak_rss_mib", "command")}
    else:
        subprocess.run(["rm", "-rf", str(out)], check=True)
        if tool == "onnxq":
            cmd = [PY, "-m", "onnxq", "quantize", str(_float_of(name)), str(out), "--quiet", *flags]
        else:
            cmd = [TORCH_PY if tool == "ort-torch" else PY, ORT_TOOL, str(_float_of(name)), str(out), *flags]
        wall, rss, stdout, stderr = _run(cmd)
        row |= {"quantize_s": round(wall, 1), "peak_rss_mib": None if rss != rss else round(rss),
                "command": _command(cmd)}
        if rss != rss or not (out / "model.onnx").exists():
            said = [line for line in (stdout + stderr).splitlines() if line.strip()
                    and not line.startswith(("maxrss_kib", "Command exited with non-zero status"))]
            tail = said[-1] if said else "no output"
            row["error"] = tail.strip()[:300]
            (out.parent / f"{out.name}.log").write_text(stdout + stderr)  # the whole output, for the cause
            return _record(row, args)
    report = out.with_name(out.name + (".eval.json" if _table_windows(args) else f".eval_w{args.windows}.json"))
    _, rss, _, stderr = _run([PY, "-m", "onnxq", "eval", str(_float_of(name)), str(out), "--data", str(eval_text),
                              "--context", "256", "--max-windows", str(args.windows), "--quiet", "--json",
                              str(report)])
    if rss != rss:
        row["error"] = "eval failed: " + (stderr.strip().splitlines() or [""])[-1][:300]
        return _record(row, args)
    values = json.loads(report.read_text())
    row |= {"ppl_float": values["ppl_float"], "ppl_quant": values["ppl_quant"], "kl": values["kl_mean"],
            "top1": values["top1_agreement"], "size_mib": round(_size_mib(out), 1),
            **{key: values[key] for key in WINDOW_SUMS if key in values}}
    return _record(row, args)


def _table_windows(args: argparse.Namespace) -> bool:
    """Whether this run evaluates on the committed table's windows (TABLE_WINDOWS)."""
    return args.windows == TABLE_WINDOWS[args.model]


def _results(args: argparse.Namespace) -> Path:
    """The results file of this window count: ``results.jsonl`` for the committed table's, ``results_wN.jsonl``
    for another."""
    return WORK / ("results.jsonl" if _table_windows(args) else f"results_w{args.windows}.jsonl")


def _record(row: dict, args: argparse.Namespace) -> dict:
    print(json.dumps({k: v for k, v in row.items() if not k.startswith("window_")}), flush=True)
    with open(_results(args), "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _recovered(rows: dict, name: str) -> float | None:
    row, rtn = rows.get(name), rows.get("onnxq rtn")
    if name.startswith("Optimum:"):
        return None
    if not row or not rtn or "ppl_quant" not in row or "ppl_quant" not in rtn:
        return None
    gap = rtn["ppl_quant"] - rtn["ppl_float"]
    return (rtn["ppl_quant"] - row["ppl_quant"]) / gap if gap > 0 else None


def _recovered_interval(rows: dict, name: str) -> tuple[float, float] | None:
    """95% paired bootstrap interval over the eval windows of the gap a row recovers (the row, onnxq rtn and
    fp32 on the same resampled windows), when both rows carry per-window sums of the same windows."""
    from onnxq.eval.metrics import gap_recovered_interval

    row, rtn = rows.get(name), rows.get("onnxq rtn")
    if _recovered(rows, name) is None or name == "onnxq rtn" or any(key not in r for r in (row, rtn)
                                                                   for key in WINDOW_SUMS):
        return None
    if row["window_tokens"] != rtn["window_tokens"] or row["window_nll_float"] != rtn["window_nll_float"]:
        return None
    return gap_recovered_interval(row["window_tokens"], row["window_nll_float"], rtn["window_nll_quant"],
                                  row["window_nll_quant"])


def _gap_cell(rows: dict, name: str) -> str:
    gap = _recovered(rows, name)
    if gap is None:
        return "-"
    interval = _recovered_interval(rows, name)
    return f"{100 * gap:.0f}%" + ("" if interval is None else f" ({100 * interval[0]:.0f}..{100 * interval[1]:.0f}%)")


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    by_name = {r["run"]: r for r in rows}
    floats = {r["ppl_float"] for r in rows if "ppl_float" in r}
    lines = [
        "# int4 on a real LM: onnxq, onnxruntime's tool and the GenAI builder side by side",
        "",
        f"`python scripts/bench_int4.py{'' if args.model == 'smollm2' else ' --model ' + args.model} "
        f"--windows {args.windows} --samples {args.samples} --seq-len {args.seq_len}"
        f"{' --eval-only' if args.eval_only else ''}`"
        + (" (the quantize columns are the rows' earlier runs)" if args.eval_only else "") + ". "
        f"{MODEL[5]}, int4 block 128 symmetric unless a row says otherwise; "
        f"calibration: {args.samples} x {args.seq_len} tokens of pydoc text (onnxruntime's GPTQ: 8 samples, it is "
        f"slow), or, in the rows marked '{SELF[2:]}', {args.samples} sequences of {args.seq_len} tokens that the "
        f"fp32 model sampled itself from its BOS at temperature 1{_generation_note(args)}; evaluation: {args.windows} x 256 tokens of Shakespeare (another domain), "
        "fp32 perplexity "
        f"{', '.join(sorted({f'{v:.3f}' for v in floats}))}; KL and top-1 against the fp32 model. 'gap' is the share "
        "of onnxq RTN's perplexity gap to fp32 that a row recovers"
        + (" (in brackets, where the rows carry per-window sums: its 95% paired bootstrap interval over the "
           "evaluation windows, the row, onnxq rtn and fp32 on the same resampled windows)"
           if any(_recovered_interval(by_name, r["run"]) for r in rows) else "")
        + ". Whole processes on 2 CPU cores shared with "
        "other jobs: times are indicative.",
        "",
        "| run | ppl | gap recovered | KL | top-1 | size MiB | quantize s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'].replace('|', '/')} | | | | | "
                         f"{r.get('quantize_s') or '-'} | - |")
            continue
        lines.append(
            f"| {r['run']} | {r['ppl_quant']:.3f} | {_gap_cell(by_name, r['run'])} | {r['kl']:.4f} "
            f"| {100 * r['top1']:.1f}% | {r['size_mib']:.1f} | {r['quantize_s'] or '-'} | "
            f"{r['peak_rss_mib'] or '-'} |")
    lines += ["", "Commands:", ""] + [f"* {r['run']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def _restore(report: Path) -> None:
    """Rebuild ``results.jsonl`` from the table and commands of ``report`` (the results file is not committed,
    the report is): the rows as printed, so ``--render`` reproduces the report."""
    text = report.read_text()
    floats = re.search(r"fp32 perplexity ([0-9.]+)", text)
    commands = dict(re.findall(r"^\* (.+?): `(.+)`$", text, flags=re.M))
    rows = []
    for line in text.split("Commands:")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0] in ("run", "---") or cells[0] not in RUNS:
            continue
        row: dict = {"run": cells[0], "tool": RUNS[cells[0]][0], "command": commands.get(cells[0], "")}
        number = (lambda cell: None if cell == "-" else float(cell))
        row |= {"quantize_s": number(cells[6]), "peak_rss_mib": None if cells[7] == "-" else int(cells[7])}
        if cells[1].startswith("failed: "):
            row["error"] = cells[1][len("failed: "):]
        else:
            row |= {"ppl_float": float(floats.group(1)), "ppl_quant": float(cells[1]), "kl": float(cells[3]),
                    "top1": float(cells[4].rstrip("%")) / 100, "size_mib": float(cells[5])}
        rows.append(row)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _rows(path: Path) -> dict[str, dict]:
    """The last record of each run in a results file (none when it is missing)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["run"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="smollm2", help="the LM (default smollm2)")
    parser.add_argument("--only", nargs="*", help="run names (default: all)")
    parser.add_argument("--windows", type=int,
                        help="evaluation windows of 256 tokens (default: the committed table's, "
                             f"{', '.join(f'{n} for {m}' for m, n in TABLE_WINDOWS.items())}; another count "
                             "writes results_wN.jsonl and WORK/report_wN.md, not docs/)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the rows' existing output folders again (their quantize columns are "
                             "taken from results.jsonl, else from a results_wN.jsonl)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--render", action="store_true", help="only rewrite the reports from results.jsonl")
    parser.add_argument("--restore", action="store_true",
                        help="first rebuild a missing results.jsonl from the committed report (docs/...)")
    args = parser.parse_args()
    args.windows = args.windows or TABLE_WINDOWS[args.model]
    _select(args.model)
    if args.restore and not (WORK / "results.jsonl").exists():
        _restore(ROOT / "docs" / MODEL[3])
    calib, eval_text = _texts()
    if not args.render:
        for name in args.only or RUNS:
            bench(name, args, calib, eval_text)
    rows = [row for row in _rows(_results(args)).values() if row["run"] in RUNS]
    rows.sort(key=lambda row: list(RUNS).index(row["run"]))
    table = _table(rows, args)
    if not _table_windows(args):
        (WORK / f"report_w{args.windows}.md").write_text(table)
        print(table)
        return
    write_keeping_notes(ROOT / "docs" / MODEL[3], table, MARKER)
    lines = table.splitlines()
    mirror_into_readme(ROOT / "README.md", f"<!-- {MODEL[4]}:begin -->", f"<!-- {MODEL[4]}:end -->",
                       lines[2:lines.index("Commands:")] + [f"Commands and notes: docs/{MODEL[3]}."])


if __name__ == "__main__":
    main()
