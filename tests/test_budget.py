"""``--bits B``: a size budget. The modules whose quantization costs the most (relative error, weighed
by importance where given) per extra bit stay in their dtype, fused groups whole, until the weights
that would be quantized average ``B`` bits per parameter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def relative_errors(path: Path, blocksize: int) -> dict[str, float]:
    """The spec of the measure, with bitsandbytes' own NF4: each weight's ``Σ (W - Ŵ)² / Σ W²`` for
    bnb's quantize_4bit at ``blocksize``."""
    errors = {}
    for name, w in load_file(path / "model.safetensors").items():
        if name.endswith("_proj.weight"):
            w = w.float().flatten()
            packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            noise = (w - reference_dequantize(packed, state.absmax, (w.numel(),), torch.float32, blocksize)).double().pow(2).sum()
            errors[name] = float(noise / w.double().pow(2).sum())
    return errors


def test_the_budget_spends_bits_where_they_remove_the_most_error_in_whole_groups_within_the_budget(llama):
    plan = plan_conversion(llama, options=Options(bits=6.0))
    budget = plan.budget
    kept, small = set(budget["kept"]), set(budget["small_blocks"])
    assert budget["bits_per_parameter"] <= 6.0 and kept and small and not kept & small
    for layer in range(4):  # fused siblings together: all of q/k/v or none, gate and up likewise
        for group in GROUPS:
            modules = [f"model.layers.{layer}.{m}" for m in group]
            assert len({m in kept for m in modules}) == 1 and len({m in small for m in modules}) == 1
    # the error left, from bitsandbytes' own quantization at each weight's blocksize
    errors = {64: relative_errors(llama, 64), 32: relative_errors(llama, 32)}
    left = sum(errors[t.blocksize][t.name] for t in plan.quantized if t.name.endswith("_proj.weight"))
    assert budget["error_left"] == pytest.approx(left, rel=1e-6)
    # the step removing the most error per extra bit (to blocksize 32, or kept) is taken first
    base = {t.name: 8 * t.output_bytes for t in plan_conversion(llama).quantized}
    halved = {t.name: 8 * t.output_bytes for t in plan_conversion(llama, options=Options(blocksize=32)).quantized}
    numel = {t.name: t.source.info.numel for t in plan.tensors}
    best, best_rate = None, 0.0
    for layer in range(4):
        for group in GROUPS:
            names = [f"model.layers.{layer}.{m}.weight" for m in group]
            e64, e32 = sum(errors[64][n] for n in names), sum(errors[32][n] for n in names)
            extra_small = sum(halved[n] - base[n] for n in names)
            extra_kept = sum(16 * numel[n] - base[n] for n in names)  # bf16 kept
            rate = max((e64 - e32) / extra_small, e64 / extra_kept)
            if rate > best_rate:
                best, best_rate = names[0].removesuffix(".weight"), rate
    assert best in kept | small


def test_the_weighted_measure_is_the_specs_formula_on_whole_weights_though_read_in_chunks(llama, tmp_path, monkeypatch):
    """``Σ v (W - Ŵ)² / Σ v W²`` with the conversion's own encoder (the weighted search), computed here
    on whole weights. The budget reads each weight once and measures it a chunk at a time (320
    elements here: many chunks a weight, each starting mid-row), at its blocksize and at 32."""
    from nf4convert import budget
    from nf4convert.quantize import NF4Weight, dequantize, quantize_nf4

    weights = {n: w for n, w in load_file(llama / "model.safetensors").items() if n.endswith("_proj.weight")}
    torch.manual_seed(1)
    vectors = {n: torch.rand(w.shape[1]) ** 4 for n, w in weights.items()}
    save_file(vectors, tmp_path / "imp.safetensors")
    monkeypatch.setattr(budget, "MEASURE_CHUNK", 5 * 64)
    plan = plan_conversion(llama, options=Options(scales="search", importance=str(tmp_path / "imp.safetensors")))
    errors, small = budget.relative_errors(plan, smaller=32)
    assert errors.keys() == small.keys() == weights.keys()
    for blocksize, measured in ((64, errors), (32, small)):
        for name, w in weights.items():
            packed, absmax = quantize_nf4(w, blocksize=blocksize, scales="search", importance=vectors[name], kernel="native")
            noise = w.double() - dequantize(NF4Weight(packed, absmax, tuple(w.shape), torch.float32, blocksize)).double()
            v = vectors[name].double()
            assert measured[name] == pytest.approx(float((noise**2 * v).sum() / (w.double() ** 2 * v).sum()), rel=1e-6), name


def test_the_budget_buys_smaller_blocks_module_by_module_and_every_loader_reads_the_mix(llama, tmp_path):
    """Blocksize 32 costs 0.127 bit a parameter over 64: below the size of halving every block, a
    budget halves the blocks of the modules where that removes the most error. Each weight's quant
    state says its blocksize, so transformers and load_model read the mix."""
    from nf4convert.load import load_model
    from nf4convert.plan import DEFAULT_BLOCKSIZE

    assert plan_conversion(llama, options=Options(blocksize=32)).quantized_bits_per_parameter > 4.3
    plan = plan_conversion(llama, options=Options(bits=4.3))
    assert plan.budget["small_blocks"] and not plan.budget["kept"]
    small = {t.name for t in plan.quantized if t.blocksize == 32}
    assert small and len(small) < len(plan.quantized) and all(t.blocksize in (32, DEFAULT_BLOCKSIZE) for t in plan.quantized)
    out = convert(plan, tmp_path / "out")
    manifest = json.loads((out / "nf4convert.json").read_text())
    assert manifest["options"]["small_blocks"] == plan.budget["small_blocks"] and manifest["options"]["blocksize"] == 64
    stored = load_file(out / "model.safetensors")
    blob = lambda n: json.loads(bytes(stored[f"{n}.quant_state.bitsandbytes__nf4"].tolist()))  # noqa: E731
    assert {n for n in (t.name for t in plan.quantized) if blob(n)["blocksize"] == 32} == small
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            assert module.weight.quant_state.blocksize == (32 if f"{name}.weight" in small else 64), name
    ours = load_model(out)
    x = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits.float(), model(x).logits.float(), rtol=0, atol=0)
    from nf4convert.card import model_card

    assert "| block size | 64, and 32 for the modules matching model.layers." in model_card(out, repo_id="org/llama-nf4")


def test_a_budgeted_folder_loads_in_stock_transformers_with_the_kept_modules_as_linear(llama, tmp_path):
    out = convert(llama, tmp_path / "out", options=Options(bits=5.0))
    manifest = json.loads((out / "nf4convert.json").read_text())
    budget = manifest["options"]["budget"]
    assert budget["bits"] == 5.0 and budget["bits_per_parameter"] <= 5.0 and budget["kept"]
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
    assert rc == 2 and err.count("\n") == 1 and match in err, err
    assert not list(tmp_path.iterdir())


def test_the_dry_run_shows_what_the_budget_keeps_and_writes_nothing(llama, tmp_path, cli):
    rc, out, _ = cli("convert", llama, tmp_path / "out", "--bits", "5", "--dry-run")
    assert rc == 0 and "budget --bits 5: " in out and "bits/parameter over the weights that would be quantized; keeps" in out
    assert "--skip model.layers." in out and not list(tmp_path.iterdir())


def test_inspect_says_the_blocksizes_the_weights_have_and_the_budget_in_words(llama, tmp_path, cli):
    out = convert(plan_conversion(llama, options=Options(bits=4.3)), tmp_path / "out")
    rc, text, err = cli("inspect", out)
    assert rc == 0, err
    assert "{" not in text and "small_blocks" not in text
    options = next(line for line in text.splitlines() if line.strip().startswith("options:"))
    assert re.search(r"blocksize=(64|32) \(\d+ weights\), (32|64) \(\d+ weights\),", options), options
    budget = next(line for line in text.splitlines() if line.strip().startswith("budget:"))
    assert budget.strip().startswith("budget:    --bits 4.3: ") and "keeps no module; blocksize 32 for " in budget


def test_the_api_refuses_a_budget_before_any_work():
    with pytest.raises(QuantizationError, match="a budget is 4.127"):
        Options(bits=3.5)
