"""Anyone's bitsandbytes 4-bit folder: what transformers' ``save_pretrained`` writes for a model quantized
on load (the ``-bnb-4bit`` repos people publish), NF4 or FP4, with or without double quantization.

``inspect``, ``verify`` (structure, and the error against ``--source``) and ``dequantize`` read it, local
or as a cached Hub repo id, and say which kind of folder they read; ``dequantize`` writes a plain
checkpoint that transformers loads and that equals bitsandbytes' own dequantization: the way back to
full precision for people who hold only such a checkpoint (to convert it to GGUF, say).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .test_convert import load_all
from .test_hub import cache_repo

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

KINDS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def saved_by_transformers(llama_dir: Path, folder: Path, quant_type: str, double_quant: bool) -> torch.nn.Module:
    """``llama_dir`` quantized on load by bitsandbytes and saved by transformers into ``folder``."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config, device_map="cpu")
    model.save_pretrained(folder)
    return model


def bitsandbytes_dequantization(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every ``Linear4bit`` weight as bitsandbytes itself dequantizes it (a row of whole blocks: see
    nf4convert.experts on bitsandbytes' CPU kernel)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
            flat = bnb.functional.QuantState(absmax=absmax, shape=torch.Size([qs.shape.numel()]), dtype=qs.dtype, blocksize=qs.blocksize, quant_type=qs.quant_type, code=qs.code)
            out[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, quant_state=flat).reshape(qs.shape)
    return out


@pytest.mark.parametrize("quant_type, double_quant", KINDS)
def test_dequantize_of_a_bitsandbytes_folder_equals_bitsandbytes_and_loads_in_transformers(llama_dir, tmp_path, cli, quant_type, double_quant):
    model = saved_by_transformers(llama_dir, tmp_path / "bnb", quant_type, double_quant)
    code, out, err = cli("dequantize", tmp_path / "bnb", tmp_path / "plain", "--quiet")
    assert code == 0, err
    plain = load_all(tmp_path / "plain")
    expected = bitsandbytes_dequantization(model)
    assert expected and [k for k, v in expected.items() if not torch.equal(plain[k], v)] == []
    assert not any(k.endswith((".absmax", ".quant_map")) for k in plain)
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(loaded.get_parameter(next(iter(expected))), expected[next(iter(expected))])


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_inspect_and_verify_say_which_kind_of_folder_they_read(llama_dir, tmp_path, cli, quant_type, double_quant):
    saved_by_transformers(llama_dir, tmp_path / "bnb", quant_type, double_quant)
    dq = "double quantization" if double_quant else "no double quantization"
    kind = f"bitsandbytes 4-bit folder saved by transformers ({quant_type.upper()}, {dq}; no nf4convert manifest)"
    code, out, err = cli("inspect", tmp_path / "bnb")
    assert code == 0, err
    assert out.splitlines()[0] == f"{tmp_path / 'bnb'}: {kind}"
    code, out, err = cli("verify", tmp_path / "bnb", "--source", llama_dir)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"OK {tmp_path / 'bnb'}: {kind}: ")
    assert "quantized tensors vs source: relative RMSE mean" in out


def test_a_cached_hub_repo_of_a_bitsandbytes_folder_is_read_offline(llama_dir, tmp_path, cli):
    saved_by_transformers(llama_dir, tmp_path / "bnb", "nf4", True)
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "someone/tiny-llama-bnb-4bit", {p.name: p.read_bytes() for p in (tmp_path / "bnb").iterdir()})
    code, out, err = cli("inspect", "someone/tiny-llama-bnb-4bit", "--cache-dir", cache)
    assert code == 0, err
    assert "bitsandbytes 4-bit folder saved by transformers (NF4, double quantization" in out
    code, out, err = cli("dequantize", "someone/tiny-llama-bnb-4bit", tmp_path / "plain", "--cache-dir", cache)
    assert code == 0, err
    assert out.splitlines()[0].endswith("bitsandbytes 4-bit folder saved by transformers (NF4, double quantization; no nf4convert manifest)")
    assert (tmp_path / "plain" / "model.safetensors").is_file()


def test_a_folder_that_is_neither_ours_nor_bitsandbytes_4bit_is_refused_in_one_line(llama_dir, tmp_path, cli):
    code, _, err = cli("dequantize", llama_dir, tmp_path / "plain")
    assert code == 3 and err.count("\n") == 1
    assert "not an nf4convert output (no nf4convert.json) nor a bitsandbytes 4-bit folder" in err
    assert not (tmp_path / "plain").exists()


def test_verify_of_a_folder_that_is_neither_is_the_same_one_line_as_inspect(llama_dir, cli):
    results = [cli(command, llama_dir) for command in ("inspect", "verify")]
    assert [code for code, _, _ in results] == [3, 3]
    assert [out for _, out, _ in results] == ["", ""]  # no FAIL line on stdout besides the error
    assert results[0][2] == results[1][2] and results[0][2].count("\n") == 1


def test_push_of_a_bitsandbytes_folder_says_what_it_is_not_to_convert_it(llama_dir, tmp_path, cli):
    saved_by_transformers(llama_dir, tmp_path / "bnb", "nf4", True)
    code, out, err = cli("push", tmp_path / "bnb", "org/name", "--dry-run")
    assert code == 3 and out == ""
    assert err == (
        f"nf4convert: error: {tmp_path / 'bnb'}: a bitsandbytes 4-bit folder saved by transformers, not an nf4convert output "
        "(no nf4convert.json): inspect, verify and dequantize read it; other commands take nf4convert outputs\n"
    )
