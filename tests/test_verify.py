"""verify: files against the manifest, structure against the spec, and quantization error against the source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nf4convert.convert import convert
from nf4convert.constants import MANIFEST_NAME
from nf4convert.plan import Options
from nf4convert.verify import verify


@pytest.fixture
def nf4(llama_dir, tmp_path):
    return convert(llama_dir, tmp_path / "nf4", options=Options(max_shard_size=60_000))


def test_a_fresh_conversion_verifies_with_quality_figures(nf4, llama_dir, cli):
    report = verify(nf4, source=llama_dir)
    assert report["ok"] and report["problems"] == []
    assert len(report["quality"]) == 14
    s = report["summary"]
    assert 0.05 < s["rel_rmse"]["mean"] < 0.2 and s["sqnr_db"]["min"] > 15
    code, out, _ = cli("verify", nf4, "--source", llama_dir)
    assert code == 0 and out.startswith("OK ") and "SQNR mean" in out
    code, out, _ = cli("verify", nf4, "--json")
    assert code == 0 and json.loads(out)["ok"]


@pytest.mark.parametrize("chunk", [3 * 64, None])
def test_each_weights_error_is_the_whole_weights_measured_a_chunk_at_a_time(nf4, llama_dir, chunk, monkeypatch):
    """rel RMSE, SQNR and the largest error of the dequantized weight against the source, computed here
    on whole weights; verify sums them a chunk at a time (here also 192 elements: mid-row)."""
    import math

    from safetensors.torch import load_file

    from nf4convert import quantize
    from nf4convert.read import open_checkpoint, stored_weight
    from nf4convert.tensorfile import SafetensorsFile

    if chunk:
        monkeypatch.setattr(quantize, "DEQUANTIZE_CHUNK", chunk)
    quality = verify(nf4, source=llama_dir)["quality"]
    source = {k: v for f in llama_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    ckpt = open_checkpoint(nf4)
    for shard, tensors in ckpt.shards.items():
        with SafetensorsFile(nf4 / shard) as f:
            for key in (k for k in tensors if k in ckpt.quant_states):
                w = source[key].double()
                noise = quantize.dequantize(stored_weight(f, ckpt, key)).double() - w
                err, energy = float((noise**2).sum()), float((w**2).sum())
                assert quality[key]["rel_rmse"] == pytest.approx(math.sqrt(err / energy), rel=1e-12)
                assert quality[key]["sqnr_db"] == pytest.approx(10 * math.log10(energy / err), rel=1e-12)
                assert quality[key]["max_abs_err"] == float(noise.abs().max())
    assert len(quality) == 14


def test_a_flipped_byte_is_found_and_named(nf4, cli):
    shard = sorted(nf4.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the packed codes: structurally still valid
    shard.write_bytes(bytes(data))
    code, out, err = cli("verify", nf4)
    assert code == 8
    assert f"FAIL {shard.name}: sha256 differs from the manifest" in out
    assert err.count("\n") == 1 and "1 problem(s)" in err


def test_missing_and_stray_files_are_found(nf4):
    shutil.copy(nf4 / "config.json", nf4 / "extra.safetensors")
    (nf4 / "generation_config.json").unlink()
    problems = verify(nf4)["problems"]
    assert "generation_config.json: missing" in problems
    assert any(p.startswith("extra.safetensors") for p in problems)


def test_structural_damage_is_reported_not_raised(nf4):
    manifest = json.loads((nf4 / MANIFEST_NAME).read_text())
    manifest["format_version"] = 2
    (nf4 / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify(nf4)
    assert not report["ok"] and "format version 2 is not supported" in report["problems"][0]


def test_a_different_source_is_noticed(nf4, gpt2_dir):
    report = verify(nf4, source=gpt2_dir)
    assert not report["ok"] and any("not in the source" in p for p in report["problems"])


def test_a_different_source_gives_one_line_per_finding_and_exit_8(nf4, gpt2_dir, cli):
    code, out, err = cli("verify", nf4, "--source", gpt2_dir)
    assert code == 8 and "Traceback" not in out + err
    assert out.startswith("FAIL ") and all(line.startswith("FAIL ") for line in out.strip().splitlines())
    assert err.count("\n") == 1 and err.startswith("nf4convert: error: ")


def test_a_source_with_other_shapes_is_a_finding_not_a_crash(nf4, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(other).save_pretrained(tmp_path / "other")
    report = verify(nf4, source=tmp_path / "other")
    assert not report["ok"] and any("the source's is" in p for p in report["problems"])


def test_an_exact_weight_has_no_sqnr_and_the_json_stays_json(tmp_path, cli):
    """A weight made of NF4 code values (absmax 1 in each block) comes back exactly: its SQNR is
    null, never Infinity, which is not JSON."""
    from safetensors.torch import save_file

    from nf4convert.constants import NF4_CODE

    (tmp_path / "src").mkdir()
    save_file({"layer.weight": torch.tensor(NF4_CODE, dtype=torch.float32).repeat(64, 4)}, tmp_path / "src" / "model.safetensors")
    out = convert(tmp_path / "src", tmp_path / "nf4", options=Options(double_quant=False))
    code, text, err = cli("verify", out, "--source", tmp_path / "src", "--json")
    assert code == 0, err
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert report["quality"]["layer.weight"]["sqnr_db"] is None and report["quality"]["layer.weight"]["max_abs_err"] == 0.0
    assert report["summary"]["sqnr_db"] == {}
    code, text, _ = cli("verify", out, "--source", tmp_path / "src")
    assert code == 0 and "no error" in text
