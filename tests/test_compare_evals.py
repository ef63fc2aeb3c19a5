"""scripts/compare_evals.py: paired comparison of two eval JSONs (the arithmetic, against direct formulas)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

_SCRIPT = Path(__file__).parents[1] / "scripts" / "compare_evals.py"


def _module():
    spec = importlib.util.spec_from_file_location("compare_evals", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(tmp_path, name, tokens, nll_float, nll_quant, kl):
    result = {"ppl_float": math.exp(sum(nll_float) / sum(tokens)), "ppl_quant": math.exp(sum(nll_quant) / sum(tokens)),
              "kl_mean": sum(kl) / sum(tokens), "top1_agreement": 0.7, "window_tokens": tokens,
              "window_nll_float": nll_float, "window_nll_quant": nll_quant, "window_kl": kl}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return path, result


def test_compare_evals_prints_gaps_and_paired_differences(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tokens = [255] * 24
    nll_float = list(rng.uniform(900, 1000, 24))
    rtn_path, rtn = _result(tmp_path, "rtn", tokens, nll_float, [v + 60 for v in nll_float], [90.0] * 24)
    base_path, base = _result(tmp_path, "base", tokens, nll_float, [v + 30 for v in nll_float], [50.0] * 24)
    new_path, new = _result(tmp_path, "new", tokens, nll_float, [v + 20 + rng.uniform(-1, 1) for v in nll_float],
                            [40.0] * 24)
    assert _module().main([str(rtn_path), str(base_path), str(new_path)]) == 0
    out = capsys.readouterr().out
    gap = rtn["ppl_quant"] - rtn["ppl_float"]
    assert f"gap recovered {100 * (rtn['ppl_quant'] - base['ppl_quant']) / gap:.0f}%" in out
    assert f"new - base perplexity {new['ppl_quant'] - base['ppl_quant']:+.3f}" in out
    assert "new / base KL 0.800 (0.800..0.800)" in out  # every window's KL ratio is 0.8


def test_compare_evals_refuses_other_windows(tmp_path):
    rtn_path, _ = _result(tmp_path, "rtn", [255] * 4, [900.0] * 4, [960.0] * 4, [1.0] * 4)
    other_path, _ = _result(tmp_path, "other", [255] * 5, [900.0] * 5, [930.0] * 5, [1.0] * 5)
    with pytest.raises(SystemExit, match="not the same windows"):
        _module().main([str(rtn_path), str(other_path), str(other_path)])
