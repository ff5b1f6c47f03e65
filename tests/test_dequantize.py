"""dequantize: NF4 folder back to plain safetensors, and NF4 values as fixed points of convert∘dequantize."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from nf4convert.constants import MANIFEST_NAME
from nf4convert.convert import convert
from nf4convert.dequantize import dequantize_folder
from nf4convert.plan import Options
from nf4convert.quantize import dequantize
from nf4convert.read import open_checkpoint

from .test_convert import load_all


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("chunk", [3 * 64, None])
def test_dequantize_then_convert_gives_the_same_codes(llama_dir, tmp_path, double_quant, chunk, monkeypatch):
    """Also when each weight is rebuilt and written in many chunks (192 elements: mid-row)."""
    from nf4convert import quantize

    if chunk:
        monkeypatch.setattr(quantize, "DEQUANTIZE_CHUNK", chunk)
    options = Options(double_quant=double_quant)
    first = convert(llama_dir, tmp_path / "first", options=options)
    plain = dequantize_folder(first, tmp_path / "plain")
    second = convert(plain, tmp_path / "second", options=options)
    a, b = load_all(first), load_all(second)
    assert set(a) == set(b)
    for key in a:
        if double_quant and key.endswith((".absmax", ".nested_absmax", "bitsandbytes__nf4")):
            continue  # the 8-bit absmax codes are re-derived from the stored (not the original) block maxima
        assert torch.equal(a[key], b[key]), key


def test_dequantized_checkpoint_is_plain_and_loads_in_transformers(llama_dir, tmp_path, cli):
    first = convert(llama_dir, tmp_path / "nf4", options=Options(max_shard_size=60_000))
    code, _, err = cli("dequantize", first, tmp_path / "plain", "--dtype", "float32", "--max-shard-size", "200KB", "--quiet")
    assert code == 0, err
    plain = tmp_path / "plain"
    assert not (plain / MANIFEST_NAME).exists()
    config = json.loads((plain / "config.json").read_text())
    assert "quantization_config" not in config
    tensors = load_all(plain)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    ckpt = open_checkpoint(first)
    from nf4convert.read import stored_weight
    from nf4convert.tensorfile import SafetensorsFile

    key = "model.layers.1.mlp.gate_proj.weight"
    shard = next(name for name, tensors in ckpt.shards.items() if key in tensors)
    with SafetensorsFile(first / shard) as f:
        assert torch.equal(tensors[key], dequantize(stored_weight(f, ckpt, key)).float())
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(plain)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_gpt2_weights_come_back_in_conv1d_orientation(gpt2_dir, tmp_path):
    out = dequantize_folder(convert(gpt2_dir, tmp_path / "nf4"), tmp_path / "plain")
    with safe_open(gpt2_dir / "model.safetensors", "pt") as f, safe_open(out / "model.safetensors", "pt") as g:
        for key in f.keys():
            assert g.get_slice(key).get_shape() == f.get_slice(key).get_shape(), key


def test_manifest_file_names_leaving_the_folder_are_refused(llama_dir, tmp_path, cli):
    out = convert(llama_dir, tmp_path / "nf4")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["files"].append({"name": "../../escape.txt", "size": 1, "sha256": "0" * 64})
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = cli("dequantize", out, tmp_path / "plain", "--quiet")
    assert code == 3 and "file name '../../escape.txt' is not a path inside the folder" in err
    assert not (tmp_path / "plain").exists() and not (tmp_path.parent / "escape.txt").exists()
    shutil.rmtree(out)
