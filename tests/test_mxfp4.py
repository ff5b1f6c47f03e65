"""MXFP4 sources (spec section 6.4): gpt-oss as published stores its experts as ``X_blocks`` (two E2M1
values a byte, low nibble first) and ``X_scales`` (E8M0, one per 32 values). nf4convert decodes them a
piece of whole experts at a time, exactly as transformers' own MXFP4 dequantization does, and converts
the decoded tensor as it would the bfloat16 checkpoint: the output is byte for byte that of converting
transformers' dequantization.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nf4convert.convert import convert, plan_conversion
from nf4convert.errors import SourceError
from nf4convert.mxfp4 import decode
from nf4convert.plan import Options

from .architectures import build
from .test_convert import load_all

transformers = pytest.importorskip("transformers")
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def mxfp4_checkpoint(folder: Path, *, scales: tuple[int, int] = (118, 128)) -> Path:
    """A tiny gpt-oss as its Hub checkpoints are: experts as random MXFP4 blocks and scales."""
    model = build("GptOssForCausalLM", dtype=torch.bfloat16)
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for key, value in load_file(folder / "model.safetensors").items():
        if value.dim() == 3:  # [E, C, R] in the model: stored as R rows of C // 32 blocks
            experts, cols, rows = value.shape
            tensors[f"{key}_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
            tensors[f"{key}_scales"] = torch.randint(*scales, (experts, rows, cols // 32), generator=g, dtype=torch.uint8)
        else:
            tensors[key] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))
    return folder


def test_decoding_equals_transformers_for_every_byte_and_scale():
    blocks = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(1, 255, 1, 1)  # every byte value ...
    scales = torch.arange(255, dtype=torch.uint8).reshape(1, 255, 1).repeat(1, 1, 16)  # ... at every scale but NaN
    assert torch.equal(decode(blocks, scales, name="t"), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_decoding_a_real_shaped_tensor_equals_transformers():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 5760, 90, 16), generator=g, dtype=torch.uint8)  # two of gpt-oss's gate_up_proj experts
    scales = torch.randint(100, 135, (2, 5760, 90), generator=g, dtype=torch.uint8)
    ours = decode(blocks, scales, name="t")
    assert ours.shape == (2, 2880, 5760)
    assert torch.equal(ours.to(torch.bfloat16), convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))


def test_an_mxfp4_checkpoint_converts_as_transformers_dequantization_of_it_does(tmp_path):
    src = mxfp4_checkpoint(tmp_path / "mxfp4")
    dequantized = tmp_path / "bf16"
    dequantized.mkdir()
    packed = load_file(src / "model.safetensors")
    tensors = {k: v for k, v in packed.items() if not k.endswith(("_blocks", "_scales"))}
    for key in [k.removesuffix("_blocks") for k in packed if k.endswith("_blocks")]:
        tensors[key] = convert_moe_packed_tensors(packed[f"{key}_blocks"], packed[f"{key}_scales"], dtype=torch.bfloat16)
    save_file(tensors, dequantized / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (dequantized / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))

    plan = plan_conversion(src)
    fused = [t for t in plan.tensors if t.name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert fused and all(t.quantize and t.dtype == "BF16" for t in fused)
    ours, theirs = convert(src, tmp_path / "a"), convert(dequantized, tmp_path / "b")
    assert load_all(ours).keys() == load_all(theirs).keys()
    assert [k for k, v in load_all(ours).items() if not torch.equal(v, load_all(theirs)[k])] == []
    assert json.loads((ours / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    kept = convert(src, tmp_path / "keep", options=Options(experts="keep"))  # the bfloat16 decoding, as stock transformers loads
    experts = {k: v for k, v in load_all(kept).items() if v.dim() == 3}
    assert experts and all(torch.equal(v, tensors[k]) for k, v in experts.items())


def test_mismatched_blocks_and_scales_are_refused_naming_them(tmp_path):
    src = mxfp4_checkpoint(tmp_path / "mxfp4")
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(SourceError, match=rf"{key} is U8 \[4, 63, 4\], expected U8 \[4, 64, 4\]"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_nan_scale_is_refused_naming_the_tensor_and_nothing_is_written(tmp_path):
    src = mxfp4_checkpoint(tmp_path / "mxfp4")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.experts.gate_up_proj_scales"][2, 5, 1] = 0xFF
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(SourceError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj: MXFP4 scale byte 0xFF \(E8M0 NaN\) in expert 2"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_compares_with_the_decoded_source(tmp_path):
    from nf4convert.verify import verify

    src = mxfp4_checkpoint(tmp_path / "mxfp4")
    out = convert(src, tmp_path / "out")
    report = verify(out, source=src)
    assert report["ok"] and report["problems"] == []
    assert report["quality"]["model.layers.0.mlp.experts.gate_up_proj"]["rel_rmse"] < 0.15
