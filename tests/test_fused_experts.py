"""Fused MoE experts (spec section 2.7): checkpoints that store an MoE block's experts as 3-D tensors
(``experts.gate_up_proj`` ``[E, 2I, H]``, gpt-oss, Granite MoE, Aria, Qwen3-VL-MoE, ...).

- by default they are quantized whole, each expert's slice a run of whole blocks, under the
  checkpoint's own name with the companions of a ``Linear4bit`` weight; the bytes are bitsandbytes'
  ``quantize_4bit`` of the 3-D tensor (each expert transposed where transformers transposes it on load);
- ``load_model`` runs them: its logits equal the same model with each fused parameter replaced by our
  dequantization, and a stock transformers model with ``bitsandbytes.nn.parametrize`` reading the same
  tensors gives the same logits;
- where transformers fuses them on load in a way that cannot apply to 4-bit bytes, or an expert is not
  whole blocks, they are kept, saying why; an expert count that disagrees with the model is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nf4convert.architecture import map_keys
from nf4convert.convert import convert, plan_conversion
from nf4convert.decisions import rule_decision
from nf4convert.errors import SourceError
from nf4convert.experts import NF4Experts
from nf4convert.load import float_numerics, load_model
from nf4convert.plan import Options
from nf4convert.quantize import NF4Weight, dequantize
from nf4convert.tensorfile import TensorInfo

from .architectures import ARCHITECTURES, FUSED, STORED_TRANSPOSED, inputs
from .test_architectures import output, sources  # noqa: F401 (sources: a fixture)
from .test_convert import load_all

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

QUANTIZED = [n for n in FUSED if n != "Inkling2ForCausalLM"]
#: transformers models whose checkpoints store fused experts (found by
#: :func:`fused_in_checkpoint`) that tests/architectures.py does not build, and why
NOT_BUILT = {
    "aria": "the multimodal model around aria_text (built): the same experts",
    "hy_v4_vl": "the multimodal model around hy_v4 (built): the same experts",
    "inkling_mm_model": "the multimodal model around inkling_text (built): the same experts",
    "muse_spark": "the multimodal model around muse_spark_text (built): the same experts",
    "inkling2": "the multimodal model around inkling2_text (built): experts interleaved on load, kept",
    "inkling2_loop": "inkling2's looped variant: experts interleaved on load, kept",
    "inkling2_loop_text": "inkling2's looped variant: experts interleaved on load, kept",
    "granitemoe_swa": "granitemoe's experts module and layout, with sliding-window attention",
    "granitemoehybrid": "granitemoe's experts and renames; its tiny hybrid config does not run a forward",
    "qwen3_vl_moe_text": "a sub-model: checkpoints are qwen3_vl_moe's (built), whose mapping transposes the experts",
    "hy_v4_vl_text": "a sub-model of hy_v4_vl",
    "glm4v_moe_text": "a sub-model: glm4v_moe checkpoints store experts per expert (its mapping merges them)",
    "minimax_m3_vl_text": "a sub-model: minimax_m3_vl checkpoints store experts per expert (its mapping merges them)",
    "ernie4_5_vl_moe": "multimodal, text and vision experts: no tiny config yet (follow-up)",
    "step3p7": "multimodal: no tiny config yet (follow-up)",
    "ergo": "its NF4 forward fails in stock from_pretrained as in load_model, experts kept or not: a uint8 tensor reaches its attention (follow-up)",
}
OPTIONS = dict(compute_dtype="float32")  # double quantization on: the nested scales are indexed per expert


def fused_parameters(model: torch.nn.Module, state_dict: dict) -> dict[str, str]:
    """Checkpoint name -> the model's fused experts parameter, for the fused experts ``state_dict`` quantized."""
    quantized = [k for k in state_dict if f"{k}.quant_state.bitsandbytes__nf4" in state_dict and state_dict[k + ".absmax"].numel() > 0]
    shapes = {k: json.loads(bytes(state_dict[f"{k}.quant_state.bitsandbytes__nf4"].tolist()))["shape"] for k in quantized}
    return {k: m.key for k, m in map_keys(model, quantized).items() if len(shapes[k]) == 3}


def blob_fields(blob: torch.Tensor) -> dict:
    """A quant-state blob's fields, the double-quantization offset as the float32 it stands for."""
    fields = json.loads(bytes(blob.tolist()))
    return {**fields, "nested_offset": float(torch.tensor(fields["nested_offset"], dtype=torch.float32))}


def quant_state_dict(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """The companions of ``key`` as ``QuantState.from_dict`` takes them."""
    return {k[len(key) + 1 :]: v for k, v in tensors.items() if k.startswith(key + ".")}


@pytest.mark.parametrize("name", QUANTIZED)
def test_fused_experts_are_quantized_and_load_model_equals_their_dequantization(name, sources, tmp_path):
    src = sources(name)
    plan = plan_conversion(src, options=Options(**OPTIONS))
    fused = [t for t in plan.tensors if len(t.source.info.shape) == 3 and t.expert]
    assert fused and all(t.quantize and "fused 3-D" in t.reason for t in fused)
    assert all(t.transpose == (name in STORED_TRANSPOSED) for t in fused)
    coded = sum(math.prod(shape) for t in fused for key, _, shape in t.outputs if key in (t.name, f"{t.name}.absmax"))
    assert 8 * coded / sum(t.source.info.numel for t in fused) == 4 + 8 / 64  # codes and 8-bit scales (vs 16 in bfloat16)
    assert plan.loaders[0] == "nf4convert.load_model (transformers 5)"
    # stock transformers would transpose the 4-bit bytes of experts stored transposed: no way in but load_model
    assert len(plan.loaders) == 1 if name in STORED_TRANSPOSED else "replace_parameter_4bit_prequantized" in plan.loaders[1]
    out = convert(src, tmp_path / "nf4", options=Options(**OPTIONS))
    manifest = json.loads((out / "nf4convert.json").read_text())
    assert manifest["loaders"] == plan.loaders

    model = float_numerics(load_model(out))
    assert [m for m in model.modules() if isinstance(m, NF4Experts) and m.fused]
    tensors = load_all(out)
    reference = float_numerics(load_model(out))  # the same model, each fused parameter our float dequantization
    for key, param in fused_parameters(reference, tensors).items():
        qs = bnb.functional.QuantState.from_dict(quant_state_dict(tensors, key), device="cpu")
        weight = NF4Weight(tensors[key], qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize, qs.state2.absmax, float(qs.offset))
        module_name, _, attr = param.rpartition(".")
        module = reference.get_submodule(module_name)
        del module._modules[attr]
        setattr(module, attr, torch.nn.Parameter(dequantize(weight), requires_grad=False))
    x = inputs(name, reference)
    assert torch.equal(output(model, x), output(reference, x))


@pytest.mark.parametrize("name", [n for n in QUANTIZED if n not in STORED_TRANSPOSED])
def test_stock_transformers_with_bitsandbytes_parametrize_reads_the_folder_as_load_model_does(name, sources, tmp_path):
    """The path open to code without nf4convert: stock ``from_pretrained`` (the fused parameters, whose
    shapes differ, are left to it to initialize), then each fused parameter replaced by its packed bytes
    and ``replace_parameter_4bit_prequantized`` given the companions.

    The experts' last dimension is a multiple of the block size in these models: bitsandbytes 0.50's
    CPU ``dequantize_4bit`` gives wrong values otherwise on AVX-512 CPUs (``load_model``'s experts do not
    use it)."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit_prequantized

    out = convert(sources(name), tmp_path / "nf4", options=Options(**OPTIONS))
    tensors = load_all(out)
    stock = float_numerics(getattr(transformers, name).from_pretrained(out, device_map="cpu", ignore_mismatched_sizes=True))
    for key, param in fused_parameters(stock, tensors).items():
        module_name, _, attr = param.rpartition(".")
        module = stock.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(tensors[key], requires_grad=False))
        replace_parameter_4bit_prequantized(module, attr, quant_state_dict(tensors, key), torch.device("cpu"))
        # bitsandbytes' state-dict hook writes back the tensors of the file (the blob's offset in its own repr)
        saved = {key + k[len(attr) :]: v for k, v in module.state_dict().items() if k == attr or k.startswith(attr + ".")}
        blob = f"{key}.quant_state.bitsandbytes__nf4"
        assert sorted(saved) == sorted(k for k in tensors if k == key or k.startswith(key + "."))
        assert [k for k, v in saved.items() if k != blob and not torch.equal(v, tensors[k])] == []
        assert blob_fields(saved[blob]) == blob_fields(tensors[blob])
    x = inputs(name, stock)
    assert torch.equal(output(float_numerics(load_model(out)), x), output(stock, x))


@pytest.mark.parametrize("name", ["GraniteMoeForCausalLM", "Qwen3VLMoeForConditionalGeneration"])
def test_fused_bytes_equal_bitsandbytes_quantize_4bit_of_the_3d_tensor(name, sources, tmp_path):
    from bitsandbytes.functional import quantize_4bit

    out = convert(sources(name), tmp_path / "nf4", options=Options(double_quant=False, **OPTIONS))
    ours, source = load_all(out), load_all(sources(name))
    keys = [k for k, v in source.items() if v.dim() == 3 and f"{k}.absmax" in ours]
    assert keys
    for key in keys:
        weight = source[key].transpose(1, 2).contiguous() if name in STORED_TRANSPOSED else source[key]
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
        assert torch.equal(ours[key], packed) and torch.equal(ours[f"{key}.absmax"], state.absmax)
        assert json.loads(bytes(ours[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))["shape"] == list(weight.shape)


def test_experts_fused_by_transformers_in_another_way_are_kept_saying_how(sources):
    plan = plan_conversion(sources("Inkling2ForCausalLM"), options=Options(**OPTIONS))
    fused = [t for t in plan.tensors if t.name.endswith("experts.w13_weight")]
    assert fused and all(not t.quantize and "Interleave" in t.reason for t in fused)


def test_keep_mode_keeps_fused_experts_as_stock_transformers_loads_them(sources):
    plan = plan_conversion(sources("GptOssForCausalLM"), options=Options(experts="keep", **OPTIONS))
    fused = [t for t in plan.tensors if len(t.source.info.shape) == 3]
    assert fused and all(not t.quantize and t.reason == "MoE experts, fused (--experts keep)" for t in fused)
    assert plan.loaders[0] == "transformers from_pretrained (bitsandbytes)"


@pytest.mark.parametrize("shape, quantized, reason", [
    ((4, 96, 64), True, "MoE experts, fused 3-D"),
    ((4, 3, 7), False, "an expert's 21 values are not whole blocks of 64 (kept: a block would span two experts)"),
])  # fmt: skip
def test_an_expert_that_is_not_whole_blocks_is_kept(shape, quantized, reason):
    info = TensorInfo("model.layers.0.mlp.experts.gate_up_proj", "BF16", shape, 0, 2 * math.prod(shape))
    d = rule_decision(info, config={"num_local_experts": 4}, skip=(), quantize_lm_head=False, experts="quantize", blocksize=64)
    assert (d.quantize, d.reason, d.fused) == (quantized, reason, True)


def test_a_fused_tensor_whose_expert_count_disagrees_with_the_model_is_refused_naming_it(sources, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((sources("GraniteMoeForCausalLM") / "config.json").read_bytes())
    tensors = load_all(sources("GraniteMoeForCausalLM"))
    key = "model.layers.1.block_sparse_moe.input_linear.weight"
    tensors[key] = tensors[key][:3].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(SourceError, match=rf"^{key}: 3 experts in a fused tensor \[3, 256, 64\], but the model has 4$"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def fused_in_checkpoint() -> dict[str, str]:
    """model_type -> model class of every transformers model with an experts module (the
    ``use_experts_implementation`` kind) whose 3-D parameters no per-expert merge of its conversion
    mapping fills: its checkpoints store those experts fused. Models are built from their default
    configs on the meta device; the few that cannot be are left out."""
    import os

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import MergeModulelist, WeightConverter
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = Path(transformers.__file__).parent / "models"
    found = {}
    for model_type in CONFIG_MAPPING_NAMES:
        folder = root / model_type_to_module_name(model_type)
        modeling = [folder / f for f in os.listdir(folder) if f.startswith("modeling_")] if folder.is_dir() else []
        if not any("use_experts_implementation" in f.read_text() for f in modeling):
            continue
        try:
            config = transformers.AutoConfig.for_model(model_type)
            mapping = transformers.AutoModelForCausalLM._model_mapping
            cls = mapping[type(config)] if type(config) in mapping else transformers.AutoModel._model_mapping[type(config)]
            with torch.device("meta"):
                model = cls(config)
        except Exception:  # noqa: BLE001 - a sub-config, or a default config that does not build
            continue
        merged = [
            target for c in get_model_conversion_mapping(model) if isinstance(c, WeightConverter) and any(isinstance(o, MergeModulelist) for o in c.operations)
            for target in c._original_target_patterns
        ]  # fmt: skip
        experts = [(n, p) for n, m in model.named_modules() if hasattr(m, "is_concatenated") for p, v in m.named_parameters(recurse=False) if v.dim() == 3]
        if any(not any(p in target for target in merged) for _, p in experts):
            found[model_type] = cls.__name__
    return found


def test_every_family_whose_checkpoints_store_fused_experts_is_built_or_explained():
    built = {getattr(transformers, ARCHITECTURES[name][1]).model_type for name in FUSED}
    found = fused_in_checkpoint()
    assert {t: c for t, c in found.items() if t not in built and t not in NOT_BUILT} == {}
    assert set(NOT_BUILT) <= set(found), "an explanation for a family transformers no longer stores fused"


@pytest.mark.parametrize("name", ["GraniteMoeForCausalLM", "Qwen3VLMoeForConditionalGeneration"])
def test_dequantize_writes_fused_experts_back_in_the_source_layout_for_stock_transformers(name, sources, tmp_path):
    from nf4convert.dequantize import dequantize_folder

    out = convert(sources(name), tmp_path / "nf4", options=Options(**OPTIONS))
    back = dequantize_folder(out, tmp_path / "back")
    restored, source = load_all(back), load_all(sources(name))
    fused = [k for k, v in source.items() if v.dim() == 3 and f"{k}.absmax" in load_all(out)]
    assert fused and all(restored[k].shape == source[k].shape for k in fused)
    model = float_numerics(load_model(out))
    stock = getattr(transformers, name).from_pretrained(back, device_map="cpu")  # transformers' own renames and transposition
    for param in fused_parameters(model, load_all(out)).values():
        experts = model.get_submodule(param)
        assert torch.equal(stock.get_parameter(param), torch.stack([experts[e] for e in range(len(experts))]))
