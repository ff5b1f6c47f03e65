"""Block-scaled FP8 checkpoints (DeepSeek-V3 style) as sources, spec section 6.3: NF4 of the float32
decoding ``fp8.float() * scale_inv`` per 128 x 128 block, edge blocks included; kept FP8 weights as
their bfloat16 decoding; no scale and no FP8 config in the output."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from nf4convert.convert import convert
from nf4convert.plan import Options
from nf4convert.verify import verify

from .test_convert import load_all

transformers = pytest.importorskip("transformers")
F = pytest.importorskip("bitsandbytes.functional")

BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"}


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block quantization: per 128 x 128 block, scale = amax / 448 and fp8 = w / scale."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].float()
            scale[i, j] = block.abs().max().clamp(min=1e-12) / 448
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def decoded(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The spec's float32 decoding, written independently of nf4convert.fp8."""
    full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: q.shape[0], : q.shape[1]]
    return q.float() * full


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """A tiny Llama (dims not multiples of 128, so edge blocks are cut) with its linear weights in FP8."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=160, intermediate_size=300, num_hidden_layers=2, num_attention_heads=5,
        num_key_value_heads=5, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("fp8") / "src"
    model.save_pretrained(path)
    tensors = load_all(path)
    out = {}
    for name, t in tensors.items():
        if name.endswith("proj.weight"):
            out[name], out[name + "_scale_inv"] = to_fp8(t)
        else:
            out[name] = t
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": FP8_CONFIG}))
    return path


def test_nf4_of_fp8_is_bitsandbytes_of_the_float32_decoding(fp8_dir, tmp_path):
    out = convert(fp8_dir, tmp_path / "nf4", options=Options(double_quant=False))
    src, ours = load_all(fp8_dir), load_all(out)
    weights = [k for k in src if k.endswith("proj.weight")]
    assert len(weights) == 14
    for key in weights:
        packed, state = F.quantize_4bit(decoded(src[key], src[key + "_scale_inv"]), blocksize=64, quant_type="nf4")
        assert torch.equal(ours[key], packed) and torch.equal(ours[f"{key}.absmax"], state.absmax), key
        blob = json.loads(bytes(ours[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))
        assert blob["dtype"] == "bfloat16" and blob["shape"] == list(src[key].shape)


def test_searched_scales_of_fp8_from_the_command_line_are_those_of_the_float32_decoding(fp8_dir, tmp_path):
    """In a fresh process, where the reader thread decodes FP8 natively while the converting thread
    imports torch for the search (a race once: the kernel's thread count was read from a half-imported torch)."""
    import subprocess
    import sys

    from nf4convert.quantize import quantize_nf4

    out = tmp_path / "nf4"
    p = subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(fp8_dir), str(out), "--scales", "search", "--no-double-quant", "-q"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    src, ours = load_all(fp8_dir), load_all(out)
    for key in (k for k in src if k.endswith("proj.weight")):
        packed, absmax = quantize_nf4(decoded(src[key], src[key + "_scale_inv"]), scales="search")
        assert torch.equal(ours[key], packed) and torch.equal(ours[f"{key}.absmax"], absmax), key


def test_the_output_has_no_fp8_scales_or_config_and_loads_in_transformers(fp8_dir, tmp_path):
    out = convert(fp8_dir, tmp_path / "nf4")
    assert not any(k.endswith("_scale_inv") for k in load_all(out))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes" and "weight_block_size" not in quant
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    report = verify(out, source=fp8_dir)
    assert report["ok"] and report["summary"]["rel_rmse"]["max"] < 0.15


def test_a_kept_fp8_weight_is_its_bfloat16_decoding(fp8_dir, tmp_path):
    out = convert(fp8_dir, tmp_path / "nf4", options=Options(skip=("*.down_proj",)))
    src, ours = load_all(fp8_dir), load_all(out)
    key = "model.layers.1.mlp.down_proj.weight"
    assert ours[key].dtype == torch.bfloat16
    assert torch.equal(ours[key], decoded(src[key], src[key + "_scale_inv"]).to(torch.bfloat16))


def test_fp8_in_pieces_gives_the_same_bytes(fp8_dir, tmp_path, monkeypatch):
    whole = convert(fp8_dir, tmp_path / "whole", options=Options(skip=("*.down_proj",)))
    monkeypatch.setattr(importlib.import_module("nf4convert.pieces"), "PIECE_BYTES", 4096)
    cut = convert(fp8_dir, tmp_path / "cut", options=Options(skip=("*.down_proj",)))
    for f in sorted(p.name for p in whole.iterdir()):
        assert (whole / f).read_bytes() == (cut / f).read_bytes(), f


def write_fp8_source(path, tensors, quant=FP8_CONFIG):
    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": quant}))
    return path


@pytest.mark.parametrize(
    "tensors, quant, match",
    [
        ({"a.weight": torch.zeros(64, 64).to(torch.float8_e4m3fn)}, FP8_CONFIG, "FP8 tensor 'a.weight' has no _scale_inv"),
        ({"a.weight": torch.zeros(200, 64).to(torch.float8_e4m3fn), "a.weight_scale_inv": torch.ones(1, 1)}, FP8_CONFIG,
         r"a.weight_scale_inv is F32 [1, 1], expected F32 [2, 1]"),
        ({"a.weight": torch.zeros(64, 64)}, {"quant_method": "compressed-tensors"}, "compressed-tensors checkpoints"),
        ({"a.weight": torch.zeros(64, 64)}, {"quant_method": "fp8", "weight_block_size": None}, "FP8 without e4m3 weight_block_size"),
    ],
)
def test_bad_fp8_sources_are_refused_in_one_line(cli, tmp_path, tensors, quant, match):
    src = write_fp8_source(tmp_path / "src", tensors, quant)
    code, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("simd", ["all", "avx2", "0"])  # AVX-512 where the CPU has it, AVX2, portable C
def test_decoding_is_the_float32_product_for_every_code_on_every_path(simd, monkeypatch):
    from nf4convert.fp8 import decode_rows

    monkeypatch.setenv("NF4CONVERT_SIMD", simd)
    codes = torch.arange(256, dtype=torch.uint8).repeat(300, 3)[:, :700]  # 300 x 700: edge blocks both ways
    scale = torch.rand(4, 6) * 3 + 1e-3
    expected = decoded(codes.view(torch.float8_e4m3fn), scale)[100:]
    for got in (decode_rows(codes[100:].contiguous(), scale, 100, (BLOCK, BLOCK)), decode_rows(codes[100:].t().contiguous().t(), scale, 100, (BLOCK, BLOCK))):
        nan = expected.isnan()  # codes 0x7F and 0xFF
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], expected[~nan])
