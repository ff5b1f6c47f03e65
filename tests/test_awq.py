"""Activation-aware scaling (spec section 2.8): found on the model itself, function-preserving on every
architecture where it applies, searched without making the calibration error worse, applied while the
conversion streams, recorded, verified, and refused with a reason where it cannot apply."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nf4convert import awq
from nf4convert.awq_probe import Group, find_groups
from nf4convert.awq_search import Inputs, _output_error, scaling_file, search
from nf4convert.calibrate import blocks, measure_importance
from nf4convert.convert import convert, plan_conversion
from nf4convert.errors import LoadError, OptionError, QuantizationError
from nf4convert.plan import Options
from nf4convert.quantize import NF4Weight, dequantize, quantize_nf4
from nf4convert.verify import verify

from .architectures import ARCHITECTURES, build, inputs, save_checkpoint, save_tokenizer

transformers = pytest.importorskip("transformers")
TEXT = Path(__file__).resolve().parent.parent / "scripts" / "data" / "apache-2.0.txt"


def run(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**x)
    return out.logits if hasattr(out, "logits") else out[0]


def found_in_memory(model: torch.nn.Module, x: dict) -> dict:
    """:func:`find_groups` on each block of an in-memory model, run on the inputs its blocks get from ``x``."""
    names = blocks(model)
    calls: dict[str, tuple] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, k, n=n: calls.setdefault(n, (a, k)) and None, with_kwargs=True) for n in names]
    run(model, x)
    for h in hooks:
        h.remove()
    return {n: find_groups(model.get_submodule(n), *calls[n]) for n in names if n in calls}


def scaled_checkpoint(folder: Path, vectors: dict, record: dict) -> None:
    """Apply a scaling to the checkpoint's tensors in place, as the conversion does before quantizing."""
    tensors = load_file(folder / "model.safetensors")
    for name, s in record["tensors"].items():
        own = {d: vectors[f"{awq.PREFIX}{name}.{d}"] for d in ("multiply", "divide") if f"{awq.PREFIX}{name}.{d}" in vectors}
        tensors[name] = awq.apply(tensors[name], tuple(tensors[name].shape), 0, awq.Scaling(**s), own).to(tensors[name].dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_scaled_float_model_computes_the_same_function(tmp_path, name):
    """Every group found, with random scales from 1/4 to 4 (far larger than searched ones), applied to the
    stored weights: the model transformers loads computes what the original does, to float32 rounding."""
    save_checkpoint(name, tmp_path)
    model = type(build(name)).from_pretrained(tmp_path).eval()
    x = inputs(name, model)
    if "use_cache" in inspect.signature(model.forward).parameters:
        x["use_cache"] = False
    try:
        found = found_in_memory(model, x)
    except LoadError:
        pytest.skip(f"{name} names no blocks (_no_split_modules): `nf4convert importance` refuses it, so there is nothing to scale")
    g = torch.Generator().manual_seed(0)
    for result in found.values():
        for group in result.groups:
            group.scales = 2 ** (4 * torch.rand(group.channels, generator=g) - 2)
    vectors, record = scaling_file(found, model, list(load_file(tmp_path / "model.safetensors")), blocksize=64)
    assert record["groups"], f"no group found in {name}; refused: {record['refused'][:3]}"
    reference = run(model, x)
    scaled_checkpoint(tmp_path, vectors, record)
    out = run(type(model).from_pretrained(tmp_path).eval(), x)
    assert float((out - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_llama_groups_are_the_four_of_awq_with_grouped_query_attention(tmp_path):
    """Found, not listed: each norm feeds its projections, v feeds o (each query head's columns from its
    key-value head's channels), up feeds down; q, k, o and gate are refused, each with its reason."""
    model = build("LlamaForCausalLM")
    found = found_in_memory(model, {"input_ids": torch.randint(2, 100, (1, 9)), "use_cache": False})["model.layers.0"]
    groups = {g.producer: g for g in found.groups}
    assert {p: sorted(g.consumers) for p, g in groups.items()} == {
        "input_layernorm": ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        "self_attn.v_proj": ["self_attn.o_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
        "mlp.up_proj": ["mlp.down_proj"],
    }
    head_dim, heads, kv_heads = 16, 4, 2
    column = torch.arange(heads * head_dim)
    assert torch.equal(groups["self_attn.v_proj"].consumers["self_attn.o_proj"], column // head_dim // (heads // kv_heads) * head_dim + column % head_dim)
    assert torch.equal(groups["mlp.up_proj"].consumers["mlp.down_proj"], torch.arange(128))
    assert {p for p, _ in found.refused} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj"}
    assert all("non-linear" in reason for _, reason in found.refused)


@pytest.mark.parametrize(
    ("name", "producer", "why"),
    [
        ("BertForMaskedLM", "attention.output.LayerNorm", "also reaches the block's output"),  # post-norm: the residual reads it
        ("Qwen2MoeForCausalLM", "post_attention_layernorm", "also reaches the block's output"),  # fused experts read it too
    ],
)
def test_a_norm_read_by_something_else_is_refused_with_the_reason(name, producer, why):
    model = build(name)
    x = inputs(name, model)
    x = {**x, "use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else x
    first = next(f for f in found_in_memory(model, x).values() if f.groups or f.refused)  # BERT's embeddings are a block too
    assert producer not in {g.producer for g in first.groups}
    assert why in dict(first.refused)[producer]


def test_gemma_norms_scale_their_one_plus_weight():
    """Gemma's RMSNorm computes ``1 + weight``: found by trying, and its offset recorded."""
    model = build("GemmaForCausalLM")
    first = found_in_memory(model, {"input_ids": torch.randint(2, 100, (1, 9)), "use_cache": False})["model.layers.0"]
    assert {g.producer: g.offset for g in first.groups if g.norm} == {"input_layernorm": 1.0, "post_attention_layernorm": 1.0}


@pytest.mark.parametrize(("shape", "multiply", "divide"), [((6, 10), 1, 0), ((10, 6), 0, 1), ((10,), None, 0)])
def test_a_tensor_transformed_in_pieces_equals_it_transformed_whole(shape, multiply, divide):
    """The conversion transforms each piece it reads (any start, rows cut anywhere): the same values."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.bfloat16)
    vectors = {"multiply": torch.rand(shape[multiply], generator=g) + 0.5} if multiply is not None else {}
    vectors["divide"] = torch.rand(shape[divide], generator=g) + 0.5
    s = awq.Scaling(multiply, divide, 1.0 if len(shape) == 1 else 0.0)
    whole = awq.apply(w, shape, 0, s, vectors)
    flat = w.reshape(-1)
    pieces = [awq.apply(flat[a:b], shape, a, s, vectors) for a, b in ((0, 7), (7, 23), (23, flat.numel()))]
    assert torch.equal(torch.cat(pieces), whole.reshape(-1))
    expected = w.float()
    if multiply is not None:
        expected = expected * vectors["multiply"].view([-1 if i == multiply else 1 for i in range(len(shape))])
    view = [-1 if i == divide else 1 for i in range(len(shape))]
    expected = (expected + s.offset) / vectors["divide"].view(view) - s.offset
    assert torch.allclose(whole, expected, rtol=1e-6, atol=1e-6)


def test_the_search_minimizes_the_true_output_error_and_never_exceeds_no_scaling():
    """The output error, from the tokens themselves (fewer than the columns) or from their Gram matrix
    (more), equals ``|ΔW Xᵀ|²`` per token computed directly, and the chosen scales do no worse than none on it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 128, generator=g) * (torch.rand(128, generator=g) * 4).exp()  # a few salient columns
    w = torch.randn(48, 128, generator=g)
    columns = torch.rand(128, generator=g) + 0.5
    packed, absmax = quantize_nf4(w * columns, blocksize=64)
    delta = w - dequantize(NF4Weight(packed, absmax, (48, 128), torch.float32, 64)) / columns
    direct = float(((delta @ x.T) ** 2).sum()) / 300
    few, many = Inputs(), Inputs()
    few.add(x[:100])
    for part in x.split(70):
        many.add(part)
    assert few.gram is None and many.gram is not None
    assert _output_error(w, many, columns, 64, "auto") == pytest.approx(direct, rel=1e-4)
    assert _output_error(w, few, columns, 64, "auto") == pytest.approx(float(((delta @ x[:100].T) ** 2).sum()) / 100, rel=1e-4)
    assert torch.allclose(many.mean_abs(), x.abs().mean(0))
    rest = Inputs()
    rest.add(x[100:])
    assert _output_error(w, few.merged(rest), columns, 64, "auto") == pytest.approx(direct, rel=1e-4)  # a layer run twice in a batch
    group = Group("norm", True, 128, {"linear": torch.arange(128)})
    search(group, {"linear": w}, {"linear": many}, blocksize=64, kernel="auto")
    assert group.errors[1] <= group.errors[0]
    assert group.alpha > 0 and group.errors[1] < 0.9 * group.errors[0]  # salient columns: scaling pays


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama with a tokenizer, and its importance file with the scaling (bfloat16, as checkpoints are)."""
    folder = tmp_path_factory.mktemp("llama")
    build("LlamaForCausalLM", dtype=torch.bfloat16).save_pretrained(folder)
    save_tokenizer(folder)
    importance = folder.parent / "importance.safetensors"
    measure_importance(folder, TEXT, importance, window=32, awq=True)
    return folder, importance


def test_measured_scaling_is_stored_under_the_checkpoints_names(llama):
    folder, importance = llama
    record = awq.record(importance)
    assert record["blocksize"] == 64 and len(record["groups"]) == 8
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert set(record["tensors"]) <= names
    assert record["tensors"]["model.layers.0.self_attn.v_proj.weight"] == awq.Scaling(multiply=1, divide=0)
    assert record["tensors"]["model.layers.0.input_layernorm.weight"] == awq.Scaling(divide=0)
    assert all(g["error"][1] <= g["error"][0] for g in record["groups"])


def test_producer_biases_are_scaled_too(tmp_path):
    """Qwen2's v_proj has a bias: divided with its weight; the whole pass and conversion run through it."""
    folder = tmp_path / "qwen2"
    build("Qwen2ForCausalLM").save_pretrained(folder)
    save_tokenizer(folder)
    measure_importance(folder, TEXT, tmp_path / "imp.safetensors", window=32, awq=True)
    record = awq.record(tmp_path / "imp.safetensors")
    assert record["tensors"]["model.layers.0.self_attn.v_proj.bias"] == awq.Scaling(divide=0)
    out = convert(folder, tmp_path / "out", options=Options(importance=str(tmp_path / "imp.safetensors"), awq=True))
    assert verify(out, source=folder)["ok"]


@pytest.mark.parametrize("scales", ["absmax", "search"])
def test_convert_with_awq_is_recorded_verified_and_loads(tmp_path, llama, scales, cli):
    """The output loads in transformers as any bitsandbytes checkpoint; the manifest says which modules
    were scaled and the vectors' hash; verify --source compares with the transformed source."""
    folder, importance = llama
    out = convert(folder, tmp_path / "out", options=Options(scales=scales, importance=str(importance), awq=True))
    manifest = json.loads((out / "nf4convert.json").read_text())
    recorded = manifest["options"]["awq"]
    assert recorded["file"] == awq.SCALES_FILE and recorded["sha256"] == awq.vectors_sha256(importance) == awq.vectors_sha256(out / awq.SCALES_FILE)
    assert recorded["tensors_transformed"] == 18 and len(recorded["groups"]) == 8
    assert awq.SCALES_FILE in {f["name"] for f in manifest["files"]}
    report = verify(out, source=folder)
    assert report["ok"], report["problems"]
    plain = verify(convert(folder, tmp_path / "plain", options=Options(scales=scales, importance=str(importance) if scales == "search" else None)), source=folder)
    assert report["summary"]["rel_rmse"]["max"] < 1.5 * plain["summary"]["rel_rmse"]["max"]  # compared with the scaled source, not every weight wrong
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    card = (out / "README.md").read_text() if (out / "README.md").exists() else ""
    rc, shown, _ = cli("inspect", out)
    assert rc == 0 and "scaling:   activation-aware (--awq), 8 producer groups" in shown
    assert "activation-aware scaling" in card or not card


def test_the_scaled_source_is_what_verify_compares(tmp_path, llama):
    """Without the scales file, verify --source cannot compare, and says so."""
    folder, importance = llama
    out = convert(folder, tmp_path / "out", options=Options(importance=str(importance), awq=True))
    (out / awq.SCALES_FILE).unlink()
    report = verify(out, source=folder)
    assert not report["ok"] and any(awq.SCALES_FILE in p for p in report["problems"])


def test_awq_with_a_size_budget_measures_the_scaled_weights(llama):
    folder, importance = llama
    from nf4convert.budget import relative_errors

    plain = plan_conversion(folder, options=Options(scales="search", importance=str(importance)))
    scaled = plan_conversion(folder, options=Options(scales="search", importance=str(importance), awq=True))
    assert relative_errors(scaled)[0] != relative_errors(plain)[0]  # the weights the budget weighs are the scaled ones
    budget = plan_conversion(folder, options=Options(scales="search", importance=str(importance), bits=6.5, awq=True))
    assert budget.budget is not None and sum(t.scaled for t in budget.tensors) == 18


def test_dry_run_shows_the_groups_and_the_refusals(llama, cli):
    folder, importance = llama
    rc, shown, _ = cli("convert", folder, "--importance", importance, "--awq", "--dry-run")
    assert rc == 0
    assert "8 scaled group(s)" in shown and "model.layers.*.mlp.up_proj -> down_proj" in shown
    assert "refused   2 x model.layers.*.self_attn.q_proj: its output reaches self_attn.o_proj's input through a non-linear function" in shown


def test_awq_without_an_importance_file_is_refused(tmp_path, llama, cli):
    folder, _ = llama
    with pytest.raises(OptionError, match="--awq applies the scales"):
        Options(awq=True)
    rc, _, err = cli("convert", folder, tmp_path / "out", "--awq")
    assert rc == 2 and err.strip() == "nf4convert: error: --awq applies the scales measured by `nf4convert importance --awq`: give that file with --importance"
    assert not (tmp_path / "out").exists()


def test_an_importance_file_without_scales_is_refused(tmp_path, llama):
    folder, _ = llama
    plain = tmp_path / "plain.safetensors"
    measure_importance(folder, TEXT, plain, window=32)
    with pytest.raises(QuantizationError, match="holds no activation-aware scales"):
        convert(folder, tmp_path / "out", options=Options(importance=str(plain), awq=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes", [dict(hidden_size=32, head_dim=8), dict(num_hidden_layers=1)])
def test_the_scales_of_another_model_are_refused(tmp_path, llama, cli, changes):
    """Other shapes, or a model that lacks some of the scaled tensors (its importance vectors fit): one
    line, nothing written."""
    _, importance = llama
    other = tmp_path / "other"
    build("LlamaForCausalLM", **changes).save_pretrained(other)
    rc, _, err = cli("convert", other, tmp_path / "out", "--importance", importance, "--awq")
    assert rc == 4 and "another model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_model_where_no_scaling_preserves_the_function_is_refused(tmp_path, llama, cli):
    """An importance file whose pass found no group (every producer refused): converting with --awq
    would silently scale nothing, so it is one line naming the reasons, and nothing is written."""
    folder, importance = llama
    record = json.loads(safe_open(importance, "pt").metadata()[awq.METADATA_KEY])
    record.update(groups=[], tensors={})
    with safe_open(importance, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(awq.PREFIX)}
        metadata = {**f.metadata(), awq.METADATA_KEY: json.dumps(record)}
    none = tmp_path / "none.safetensors"
    save_file(tensors, none, metadata=metadata)
    rc, _, err = cli("convert", folder, tmp_path / "out", "--importance", none, "--awq")
    assert rc == 4 and "no activation-aware scaling preserves this model's function (its output reaches" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
