"""KV-cache LMs as users have them: onnxq RTN / GPTQ / AWQ against the ORT GenAI builder's own int4.

Inputs (``scripts/export_smollm2_kv.py`` writes them into ``models/real/smollm2_kv/``):
SmolLM2-135M-Instruct as the GenAI builder's fp32 / fp16 / int4 folders and Optimum's
``text-generation-with-past`` export. Text: ``scripts/text_data.py`` (pydoc, calib / eval
splits). For each run, as a user runs it (whole processes, CLI defaults unless listed):

* ``python -m onnxq quantize FOLDER OUT [--algo ... --calib-data calib.txt]`` (calibrated from
  the plain text file and the folder's own tokenizer.json): wall time and peak RSS of the process;
* ``python -m onnxq eval FLOAT OUT --data eval.txt``: perplexity, KL, top-1 with an empty KV
  cache, and the KV-cache decode check;
* model file size (model + external data);
* GenAI folders: greedy decode tokens/s in onnxruntime_genai (``--decode-tokens`` after a
  64-token prompt, the prompt excluded), in a fresh process.

    python scripts/bench_kv.py [--only NAME ...] [--windows 16] [--samples 32] [--seq-len 256]

Writes ``docs/KV_RESULTS.md`` (the table, the commands, hand-written notes below the marker
are kept), mirrors the table into README.md, and appends one JSON line per run to
``models/real/smollm2_kv/bench/results.jsonl`` (``--render`` rewrites the reports from it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from report_files import mirror_into_readme, write_keeping_notes  # noqa: E402

REAL = ROOT / "models" / "real" / "smollm2_kv"
WORK = REAL / "bench"
MARKER = "\n<!-- notes below are kept when the script rewrites this file -->\n"
PY = sys.executable

# name -> (float folder, onnxq flags); None flags: the folder is the builder's own int4, evaluated as is
RUNS = {
    "builder int4 (b32 sym RTN, acc 4)": ("genai-fp32", None),
    "genai fp32 rtn b32": ("genai-fp32", []),
    "genai fp32 rtn b128": ("genai-fp32", ["--block-size", "128"]),
    "genai fp32 gptq b32": ("genai-fp32", ["--algo", "gptq"]),
    "genai fp32 gptq b128": ("genai-fp32", ["--algo", "gptq", "--block-size", "128"]),
    "genai fp32 awq b32": ("genai-fp32", ["--algo", "awq", "--awq-grid", "10"]),
    "genai fp32 awq b128": ("genai-fp32", ["--algo", "awq", "--block-size", "128", "--awq-grid", "10"]),
    "genai fp32 awq+gptq b128": ("genai-fp32", ["--algo", "awq+gptq", "--block-size", "128", "--awq-grid", "10"]),
    "genai fp16 rtn b32": ("genai-fp16", []),
    "genai fp16 rtn b128": ("genai-fp16", ["--block-size", "128"]),
    "genai fp16 gptq b32": ("genai-fp16", ["--algo", "gptq"]),
    "genai fp16 gptq b128": ("genai-fp16", ["--algo", "gptq", "--block-size", "128"]),
    "genai fp16 awq b32": ("genai-fp16", ["--algo", "awq", "--awq-grid", "10"]),
    "genai fp16 awq b128": ("genai-fp16", ["--algo", "awq", "--block-size", "128", "--awq-grid", "10"]),
    "optimum fp32 rtn b32": ("optimum-fp32", []),
    "optimum fp32 rtn b128": ("optimum-fp32", ["--block-size", "128"]),
    "optimum fp32 gptq b32": ("optimum-fp32", ["--algo", "gptq"]),
    "optimum fp32 gptq b128": ("optimum-fp32", ["--algo", "gptq", "--block-size", "128"]),
    "optimum fp32 awq b32": ("optimum-fp32", ["--algo", "awq", "--awq-grid", "10"]),
    "optimum fp32 awq b128": ("optimum-fp32", ["--algo", "awq", "--block-size", "128", "--awq-grid", "10"]),
    "optimum fp32 rtn b32 +emb": ("optimum-fp32", ["--quantize-embeddings"]),
    "optimum fp32 gptq b128 +emb": ("optimum-fp32", ["--algo", "gptq", "--block-size", "128", "--quantize-embeddings"]),
}

DECODE = '''
import sys, time, onnxruntime_genai as og
folder, prompt_file, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = og.Model(folder)
tokenizer = og.Tokenizer(model)
prompt = tokenizer.encode(open(prompt_file).read())[:64]
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + new, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(prompt)
generator.generate_next_token()
start = time.perf_counter()
while not generator.is_done():
    generator.generate_next_token()
print(f"{(new - 1) / (time.perf_counter() - start):.2f}")
'''


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """``(wall s, peak RSS MiB of the command, stdout)``, the RSS as GNU time reports it for that process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib %M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("maxrss_kib ")][-1]
    return wall, int(rss.split()[1]) / 1024, proc.stdout


def _size_mib(folder: Path) -> float:
    model = folder / "model.onnx"
    return sum(p.stat().st_size for p in (model, folder / "model.onnx.data", folder / "model.onnx_data")
               if p.exists()) / 2**20


def _texts() -> tuple[Path, Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    paths = {split: WORK / f"{split}.txt" for split in ("calib", "eval")}
    for split, path in paths.items():
        if not path.exists():
            subprocess.run([PY, str(ROOT / "scripts" / "text_data.py"), "--source", "pydoc", "--split", split,
                            "--out", str(path)], check=True, capture_output=True)
    return paths["calib"], paths["eval"]


def bench(name: str, args: argparse.Namespace, calib: Path, eval_text: Path) -> dict:
    base, flags = RUNS[name]
    float_folder = REAL / base
    row: dict = {"run": name, "float": base}
    if flags is None:
        out = REAL / "genai-int4"
        row |= {"quantize_s": None, "peak_rss_mib": None, "command": "python -m onnxruntime_genai.models.builder "
                "-i hf -o genai-int4 -p int4 -e cpu (scripts/export_smollm2_kv.py)"}
    else:
        out = WORK / name.replace(" ", "_")
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        calib_flags = ["--calib-data", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        cmd = [PY, "-m", "onnxq", "quantize", str(float_folder), str(out), "--quiet", *flags,
               *(calib_flags if "--algo" in flags else [])]
        wall, rss, _ = _run(cmd)
        row |= {"quantize_s": round(wall, 1), "peak_rss_mib": round(rss), "command": " ".join(
            ["python -m onnxq quantize", f"models/real/smollm2_kv/{base}", "OUT", *cmd[6:]]).replace(str(ROOT) + "/", "")}
    report = WORK / f"{name.replace(' ', '_')}.eval.json"
    _run([PY, "-m", "onnxq", "eval", str(REAL / ("genai-fp32" if flags is None else base)), str(out),
          "--data", str(eval_text), "--context", "256", "--max-windows", str(args.windows), "--quiet",
          "--json", str(report)])
    values = json.loads(report.read_text())
    row |= {"ppl_float": values["ppl_float"], "ppl_quant": values["ppl_quant"], "kl": values["kl_mean"],
            "top1": values["top1_agreement"], "size_mib": round(_size_mib(out), 1),
            "decode_rel_diff": values.get("decode_quant", {}).get("relative_diff"),
            "decode_top1": values.get("decode_quant", {}).get("top1_agreement")}
    if base.startswith("genai") and "fp16" not in base:
        rates = []
        for folder in (out,):
            _, _, printed = _run([PY, "-c", DECODE, str(folder), str(eval_text), str(args.decode_tokens)])
            rates.append(float(printed.strip().splitlines()[-1]))
        row["decode_tok_s"] = rates[0]
    print(json.dumps(row), flush=True)
    with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _output_folder(row: dict) -> Path:
    return REAL / "genai-int4" if row["quantize_s"] is None else WORK / row["run"].replace(" ", "_")


def redecode(rows: list[dict], repeats: int, tokens: int, eval_text: Path) -> None:
    """Measure decode tokens/s again for every row that has it: ``repeats`` rounds over all of them
    (interleaved, so load from other jobs hits every row alike); each row gets its median."""
    measured = [r for r in rows if r.get("decode_tok_s") is not None]
    rates: dict[str, list[float]] = {r["run"]: [] for r in measured}
    for _ in range(repeats):
        for row in measured:
            _, _, printed = _run([PY, "-c", DECODE, str(_output_folder(row)), str(eval_text), str(tokens)])
            rates[row["run"]].append(float(printed.strip().splitlines()[-1]))
    with open(WORK / "results.jsonl", "a") as f:  # the latest row of a run wins when rendering
        for row in measured:
            row["decode_tok_s"] = sorted(rates[row["run"]])[len(rates[row["run"]]) // 2]
            row["decode_runs"] = rates[row["run"]]
            row["decode_tokens"] = tokens
            f.write(json.dumps(row) + "\n")


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    rounds = max((len(r.get("decode_runs", [])) for r in rows), default=0)
    tokens = max((r.get("decode_tokens", args.decode_tokens) for r in rows if r.get("decode_runs")),
                 default=args.decode_tokens)
    lines = [
        "# KV-cache LMs: onnxq vs the ONNX Runtime GenAI builder's int4 (SmolLM2-135M-Instruct)",
        "",
        f"`python scripts/bench_kv.py --windows {args.windows} --samples {args.samples} --seq-len {args.seq_len}`, "
        f"then `--render --redecode {rounds} --decode-tokens {tokens}`; eval: {args.windows} windows x 256 tokens of pydoc eval text, "
        "empty KV cache, KL and top-1 against the form's float model (the builder's int4 against GenAI fp32); "
        "calibration: the pydoc calib text with the folder's tokenizer.json. Decode: greedy, onnxruntime_genai, "
        f"{tokens} tokens after a 64-token prompt"
        f"{f', median of {rounds} interleaved rounds' if rounds else ''}; "
        "the fp16 GenAI build does not generate in onnxruntime_genai 0.18 (its MultiHeadAttention path fails with "
        "a cache), so it has no decode rate. GenAI rows run at accuracy_level 4 (int8 activations: the builder's "
        "CPU default, which onnxq takes for a GenAI folder), Optimum rows at 0; an Optimum folder keeps its tied "
        "embedding table in float unless `--quantize-embeddings` (+emb rows). 2 shared CPU cores; times are "
        "indicative. SmolLM2's weights were stored as "
        "Q4_1 (asym, block 32): block-32 asym RTN is flattered (MODELS.md); these runs are symmetric.",
        "",
        "| run | ppl (float) | ppl | KL | top-1 | size MiB | quantize s | peak RSS MiB | decode tok/s | "
        "decode check: rel diff, top-1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "decode_top1" not in r:  # rows written before the column existed: from their eval report
            report = WORK / f"{r['run'].replace(' ', '_')}.eval.json"
            r["decode_top1"] = json.loads(report.read_text()).get("decode_quant", {}).get("top1_agreement")
        cells = [r["run"], f"{r['ppl_float']:.3f}", f"{r['ppl_quant']:.3f}", f"{r['kl']:.4f}",
                 f"{100 * r['top1']:.1f}%", f"{r['size_mib']:.1f}",
                 "-" if r["quantize_s"] is None else f"{r['quantize_s']:.0f}",
                 "-" if r["peak_rss_mib"] is None else str(r["peak_rss_mib"]),
                 "-" if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}",
                 "-" if r["decode_rel_diff"] is None else
                 f"{r['decode_rel_diff']:.1e}, {100 * r['decode_top1']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""] + [f"* {r['run']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run names (default: all)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the reports from the rows already in results.jsonl (same arguments)")
    parser.add_argument("--redecode", type=int, default=0, metavar="R",
                        help="measure decode tokens/s again, R interleaved rounds over all rows, median")
    args = parser.parse_args()
    calib, eval_text = _texts()
    if args.render:
        rows = [json.loads(line) for line in (WORK / "results.jsonl").read_text().splitlines() if line.strip()]
        rows = list({row["run"]: row for row in rows}.values())  # the latest row of each run
        rows.sort(key=lambda row: list(RUNS).index(row["run"]) if row["run"] in RUNS else len(RUNS))
    else:
        rows = [bench(name, args, calib, eval_text) for name in (args.only or RUNS)]
    if args.redecode:
        redecode(rows, args.redecode, args.decode_tokens, eval_text)
    table = _table(rows, args)
    write_keeping_notes(ROOT / "docs" / "KV_RESULTS.md", table, MARKER)
    lines = table.splitlines()
    mirror_into_readme(ROOT / "README.md", "<!-- kv-results:begin -->", "<!-- kv-results:end -->",
                       [line for line in lines[2:lines.index("Commands:")]] + ["Commands and notes: docs/KV_RESULTS.md."])


if __name__ == "__main__":
    main()
