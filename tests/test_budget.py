"""``--bits B``: a size budget. The modules whose quantization costs the most (relative error, weighed
by importance where given) per extra bit stay in their dtype, fused groups whole, until the weights
that would be quantized average ``B`` bits per parameter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nf4convert.convert import convert, plan_conversion
from nf4convert.errors import QuantizationError
from nf4convert.plan import Options

from .architectures import ARCHITECTURES, build
from .reference import reference_dequantize

transformers = pytest.importorskip("transformers")
F = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A small bf16 Llama (4 layers of 256 x 512) whose odd layers' weights have outliers, as real
    checkpoints' often do (so their relative quantization errors differ)."""
    _, config_name, kwargs = ARCHITECTURES["LlamaForCausalLM"]
    config = getattr(transformers, config_name)(**{**kwargs, "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear) and i % 2:
                    m.weight.add_((torch.rand_like(m.weight) < 0.002 * (1 + torch.rand(()))) * 30 * m.weight.std())
    path = tmp_path_factory.mktemp("budget") / "llama"
    model.to(torch.bfloat16).save_pretrained(path)
    return path


GROUPS = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


def ranked_groups(path: Path, blocksize: int) -> list[tuple[float, float, list[str]]]:
    """The spec of the choice, with bitsandbytes' own NF4: per group, the relative errors ``Σ (W - Ŵ)² /
    Σ W²`` of bnb's quantize_4bit, summed, over the extra bits of keeping it (16 bits a parameter, less
    the NF4 layout's bytes), highest first: ``(error per extra bit, extra bits, modules)``."""
    tensors = load_file(path / "model.safetensors")
    nf4_bytes = {t.name: t.output_bytes for t in plan_conversion(path, options=Options(blocksize=blocksize)).quantized}
    groups = []
    for layer in range(4):
        for group in GROUPS:
            names = [f"model.layers.{layer}.{m}" for m in group]
            error = extra = 0.0
            for n in names:
                w = tensors[f"{n}.weight"].float().flatten()
                packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
                noise = (w - reference_dequantize(packed, state.absmax, (w.numel(),), torch.float32, blocksize)).double().pow(2).sum()
                error += float(noise / w.double().pow(2).sum())
                extra += 16 * w.numel() - 8 * nf4_bytes[f"{n}.weight"]
            groups.append((error / extra, extra, names))
    return sorted(groups, reverse=True)


def test_the_budget_keeps_whole_groups_with_the_most_error_per_extra_bit_and_stays_within_it(llama, tmp_path):
    plan = plan_conversion(llama, options=Options(bits=6.0))
    kept = plan.budget["kept"]
    assert plan.budget["bits_per_parameter"] <= 6.0 and kept
    for layer in range(4):  # fused siblings together: all of q/k/v or none, gate and up likewise
        for group in GROUPS:
            inside = {f"model.layers.{layer}.{m}" in kept for m in group}
            assert len(inside) == 1
    ranked = ranked_groups(llama, plan.budget["blocksize"])
    assert ranked[0][2][0] in kept  # the most error per extra bit is kept first
    left = [r for r in ranked if r[2][0] not in kept]
    for ratio, extra, _ in (r for r in ranked if r[2][0] in kept):  # a group passed over had less error per bit, or did not fit
        assert all(ratio >= other or extra_other > extra for other, extra_other, _ in left)


def test_the_budget_buys_smaller_blocks_where_they_leave_less_error_than_kept_modules(llama):
    """Blocksize 32 costs 0.127 bit a parameter over 64 and lowers every weight's error: both ways of
    spending the bits are planned, and the one leaving the smaller summed relative error is taken."""
    tight = plan_conversion(llama, options=Options(bits=4.3))  # below blocksize 32's own 4.373 here: modules only
    assert tight.budget["blocksize"] == 64 and list(tight.budget["error_left"]) == ["64"]
    for bits in (4.5, 5.0, 6.0):
        budget = plan_conversion(llama, options=Options(bits=bits)).budget
        assert set(budget["error_left"]) == {"64", "32"}
        assert budget["error_left"][str(budget["blocksize"])] == min(budget["error_left"].values())
    assert plan_conversion(llama, options=Options(bits=4.5)).budget["blocksize"] == 32  # its outliers: halved blocks beat any module kept


def test_a_budgeted_folder_loads_in_stock_transformers_with_the_kept_modules_as_linear(llama, tmp_path):
    out = convert(llama, tmp_path / "out", options=Options(bits=5.0))
    manifest = json.loads((out / "nf4convert.json").read_text())
    budget = manifest["options"]["budget"]
    assert budget["bits"] == 5.0 and budget["bits_per_parameter"] <= 5.0 and budget["kept"]
    assert manifest["options"]["blocksize"] == budget["blocksize"]
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert set(budget["kept"]) <= set(skip)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    for name, module in model.named_modules():
        if name in budget["kept"]:
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
        elif name.endswith("_proj"):
            assert type(module).__name__ == "Linear4bit", name


def test_moe_experts_are_kept_a_whole_layer_at_a_time_and_load_model_runs_the_mix(tmp_path):
    from nf4convert.load import load_model

    src = tmp_path / "mixtral"
    build("MixtralForCausalLM", dtype=torch.bfloat16).save_pretrained(src)
    out = convert(src, tmp_path / "out", options=Options(bits=12.0))
    kept = json.loads((out / "nf4convert.json").read_text())["options"]["budget"]["kept"]
    layers = [p.removesuffix(".*") for p in kept if ".experts" in p]
    assert layers and all(p.endswith(".experts.*") for p in kept if ".experts" in p)
    stored = load_file(out / "model.safetensors")
    experts = [k for k in stored if ".experts." in k and k.endswith(".weight")]
    assert all((stored[k].dtype == torch.bfloat16) == k.startswith(tuple(layers)) for k in experts)
    assert any(stored[k].dtype == torch.uint8 for k in experts)  # the other layer's experts are 4-bit
    model = load_model(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 9)[None]).logits).all()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--bits", "4"], "--bits 4: a budget is 4.127 (every weight in NF4) to 16 bits per parameter"),
        (["--bits", "17"], "--bits 17: a budget is 4.127 (every weight in NF4) to 16 bits per parameter"),
        (["--bits", "4.2", "--no-double-quant"], "--bits 4.2 is below the 4.5"),
    ],
)
def test_a_budget_out_of_range_is_one_line_and_nothing_is_written(args, match, llama, tmp_path, cli):
    rc, _, err = cli("convert", llama, tmp_path / "out", *args, "-q")
    assert rc == 4 and err.count("\n") == 1 and match in err, err
    assert not list(tmp_path.iterdir())


def test_the_dry_run_shows_what_the_budget_keeps_and_writes_nothing(llama, tmp_path, cli):
    rc, out, _ = cli("convert", llama, tmp_path / "out", "--bits", "5", "--dry-run")
    assert rc == 0 and "budget --bits 5: " in out and "bits/parameter over the weights that would be quantized, at blocksize 32; keeps" in out
    assert "--skip model.layers." in out and not list(tmp_path.iterdir())


def test_the_api_refuses_a_budget_before_any_work():
    with pytest.raises(QuantizationError, match="a budget is 4.127"):
        Options(bits=3.5)
