"""verify: files against the manifest, structure against the spec, and quantization error against the source."""

from __future__ import annotations

import json
import shutil

import pytest

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
