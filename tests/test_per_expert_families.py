"""Families transformers loads per expert when 4-bit (spec section 6.1): its quantizers replace their experts
module with per-expert ``nn.Linear`` layers before loading a bitsandbytes folder, so the fused experts a
checkpoint stores are cut into one weight per expert and layer, quantized, and both stock
``from_pretrained`` and ``load_model`` load them. The reference puts the spec's numpy decode of each
per-expert weight back into the fused parameter of the float model, by Llama 4's own layout
(``gate_up_proj`` ``[E, H, 2I]``: gate then up columns; ``down_proj`` ``[E, I, H]``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nf4convert.convert import convert, plan_conversion
from nf4convert.load import float_numerics, load_model, load_state_dict
from nf4convert.plan import Options

from .reference import reference_dequantize

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

#: every experts class transformers' quantizers replace for bitsandbytes -> a model class built here
FAMILIES = {"Llama4TextExperts": "Llama4ForCausalLM"}
OPTIONS = dict(double_quant=False, compute_dtype="float32")
IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def test_every_family_transformers_loads_per_expert_is_built_here():
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    from transformers.utils.quantization_config import QuantizationMethod

    listed = {c for c, entry in MODULES_TO_PATCH_FOR_QUANTIZATION.items() if QuantizationMethod.BITS_AND_BYTES in entry["quantization_methods"]}
    assert listed == set(FAMILIES)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    """A tiny Llama 4 (text), saved by transformers: experts fused, ``[E, H, 2I]`` and ``[E, I, H]``."""
    config = transformers.Llama4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama4") / "src"
    transformers.Llama4ForCausalLM(config).save_pretrained(path)
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_fused_experts_are_cut_per_expert_quantized_and_stock_transformers_loads_them(llama4, tmp_path):
    plan = plan_conversion(llama4, options=Options(**OPTIONS))
    experts = [t for t in plan.tensors if ".experts." in t.name]
    assert len(experts) == 2 * 4 * 3 and all(t.quantize and t.expert and t.source.split is not None for t in experts)
    assert "layers.0.feed_forward.experts.3.up_proj.weight" in experts[11].name
    assert plan.loaders == ["transformers from_pretrained (bitsandbytes)", "nf4convert.load_model"]
    out = convert(plan, tmp_path / "nf4")
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < 0.5 * sum(p.stat().st_size for p in llama4.glob("*.safetensors"))
    ours = float_numerics(load_model(out))
    theirs, info = transformers.Llama4ForCausalLM.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert torch.equal(logits(ours), logits(float_numerics(theirs)))

    reference = transformers.Llama4ForCausalLM.from_pretrained(llama4).eval()
    sd = load_state_dict(out)
    decoded = {}
    for key, w in sd.items():
        if hasattr(w, "quant_state"):
            qs = w.quant_state
            decoded[key] = reference_dequantize(w.data, qs.absmax, tuple(qs.shape), torch.float32, qs.blocksize)
    for layer in range(2):
        experts = reference.model.layers[layer].feed_forward.experts
        prefix = f"model.layers.{layer}.feed_forward.experts"
        for e in range(4):
            experts.gate_up_proj.data[e] = torch.cat([decoded[f"{prefix}.{e}.gate_proj.weight"], decoded[f"{prefix}.{e}.up_proj.weight"]]).T
            experts.down_proj.data[e] = decoded[f"{prefix}.{e}.down_proj.weight"].T
        for key in decoded:
            if key.startswith(f"model.layers.{layer}.") and ".experts." not in key:
                reference.get_parameter(key).data = decoded[key]
    torch.testing.assert_close(logits(ours), logits(reference), rtol=0, atol=1e-5)


def test_keep_mode_cuts_the_experts_too_and_the_model_is_unchanged(llama4, tmp_path):
    """--experts keep: the same per-expert layout in the source dtype, so that transformers can load it."""
    out = convert(llama4, tmp_path / "nf4", options=Options(experts="keep", **OPTIONS))
    manifest = json.loads((out / "nf4convert.json").read_text())
    kept = {t["name"]: t for t in manifest["tensors"]["kept"] if "cut_from" in t}
    assert len(kept) == 24 and kept["model.layers.1.feed_forward.experts.2.gate_proj.weight"]["cut_from"] == {
        "name": "model.layers.1.feed_forward.experts.gate_up_proj", "shape": [4, 64, 192], "expert": 2, "start": 0, "stop": 96, "transposed": True,
    }  # fmt: skip
    model = load_model(out)
    source = transformers.Llama4ForCausalLM.from_pretrained(llama4).eval()
    for layer in range(2):
        ours, theirs = model.model.layers[layer].feed_forward.experts, source.model.layers[layer].feed_forward.experts
        for e in range(4):
            assert torch.equal(torch.cat([ours[e].gate_proj.weight, ours[e].up_proj.weight]).T, theirs.gate_up_proj[e])
            assert torch.equal(ours[e].down_proj.weight.T, theirs.down_proj[e])


def test_verify_compares_each_cut_with_its_place_in_the_source(llama4, tmp_path, cli):
    out = convert(llama4, tmp_path / "nf4", options=Options(**OPTIONS))
    rc, text, err = cli("verify", out, "--source", llama4, "--json")
    assert rc == 0, err
    report = json.loads(text)
    cut = report["quality"]["model.layers.0.feed_forward.experts.1.up_proj.weight"]
    assert 0 < cut["rel_rmse"] < 0.2


def test_dequantize_puts_the_experts_back_fused_for_stock_transformers(llama4, tmp_path):
    from nf4convert.dequantize import dequantize_folder

    out = convert(llama4, tmp_path / "nf4", options=Options(**OPTIONS))
    plain = dequantize_folder(out, tmp_path / "plain")
    from safetensors import safe_open

    with safe_open(plain / "model.safetensors", "pt") as f, safe_open(llama4 / "model.safetensors", "pt") as g:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == {k: g.get_slice(k).get_shape() for k in g.keys()}
    model, info = transformers.Llama4ForCausalLM.from_pretrained(plain, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    torch.testing.assert_close(logits(model.eval()), logits(float_numerics(load_model(out))), rtol=0, atol=1e-5)
