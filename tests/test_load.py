"""The loader: Linear4bit modules rebuilt from NF4 files, checked against transformers and bitsandbytes on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nf4convert.constants import INDEX_NAME, MANIFEST_NAME
from nf4convert.convert import convert
from nf4convert.errors import FormatError, LoadError, UnsupportedVersionError
from nf4convert.load import float_numerics, load_model, load_state_dict, replace_linear
from nf4convert.plan import Options

from .reference import reference_dequantize

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return float_numerics(model)(IDS).logits


@pytest.fixture(scope="module")
def llama_nf4(llama_dir: Path, tmp_path_factory) -> Path:
    return convert(llama_dir, tmp_path_factory.mktemp("nf4") / "llama", options=Options(compute_dtype="float32"))


@pytest.fixture(scope="module")
def gpt2_nf4(gpt2_dir: Path, tmp_path_factory) -> Path:
    return convert(gpt2_dir, tmp_path_factory.mktemp("nf4") / "gpt2", options=Options(double_quant=False, compute_dtype="float32"))


def test_load_state_dict_gives_params4bit_without_requantizing(llama_nf4):
    sd = load_state_dict(llama_nf4)
    w = sd["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(w, bnb.nn.Params4bit) and w.bnb_quantized and w.dtype == torch.uint8
    assert w.quant_state.nested and w.quant_state.blocksize == 64 and tuple(w.quant_state.shape) == (128, 128)
    assert sd["model.norm.weight"].dtype == torch.bfloat16
    assert not any(".absmax" in k or "quant_state" in k for k in sd)


@pytest.mark.parametrize("fixture, cls", [("llama_nf4", "AutoModelForCausalLM"), ("gpt2_nf4", "AutoModelForCausalLM")])
def test_load_model_logits_equal_transformers_from_pretrained(request, fixture, cls):
    folder = request.getfixturevalue(fixture)
    ours = load_model(folder)
    assert type(next(m for m in ours.modules() if type(m).__name__ == "Linear4bit"))
    theirs = getattr(transformers, cls).from_pretrained(folder, device_map="cpu")
    assert torch.equal(logits(ours), logits(theirs))
    assert ours.is_loaded_in_4bit


def test_load_model_equals_bitsandbytes_quantizing_on_load(gpt2_dir, gpt2_nf4):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    peer = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir, quantization_config=config, device_map="cpu")
    assert torch.equal(logits(load_model(gpt2_nf4)), logits(peer))


def test_tied_gpt2_head_shares_the_embedding(gpt2_nf4):
    model = load_model(gpt2_nf4)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_replace_linear_on_a_plain_sequential_matches_a_float_reference(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    # shapes bitsandbytes' CPU fast paths get wrong: out % 32 != 0, in % blocksize != 0
    net = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24, bias=False))
    save_file({k: v.detach().clone() for k, v in net.state_dict().items()}, tmp_path / "net.safetensors")
    out = convert(tmp_path / "net.safetensors", tmp_path / "nf4", options=Options(double_quant=False, blocksize=32))
    sd = load_state_dict(out)
    fresh = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24, bias=False))
    result = replace_linear(fresh, sd, compute_dtype=torch.float32)
    assert result == ([], [])
    assert isinstance(fresh[0], bnb.nn.Linear4bit) and isinstance(fresh[2], bnb.nn.Linear4bit)
    # float reference: the spec's dequantization through F.linear (not bitsandbytes' own, which is
    # wrong on AVX-512 CPUs when in_features % blocksize != 0)
    x = torch.randn(5, 96)
    w0, w2 = (reference_dequantize(w.data, w.quant_state.absmax, tuple(w.quant_state.shape), torch.float32, 32) for w in (sd["0.weight"], sd["2.weight"]))
    reference = torch.relu(x @ w0.T + sd["0.bias"]) @ w2.T
    with torch.no_grad():
        assert torch.allclose(fresh(x), reference, atol=1e-5, rtol=1e-5)


def test_replace_linear_reports_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.randn(32, 64), "extra": torch.zeros(2)}, tmp_path / "x.safetensors")
    out = convert(tmp_path / "x.safetensors", tmp_path / "nf4")
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with pytest.raises(LoadError, match=r"missing \['0.bias'\], unexpected \['extra'\]"):
        replace_linear(net, load_state_dict(out))
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    assert replace_linear(net, load_state_dict(out), strict=False) == (["0.bias"], ["extra"])
    wrong = torch.nn.Sequential(torch.nn.Linear(32, 64))
    with pytest.raises(LoadError, match="does not fit the layer"):
        replace_linear(wrong, load_state_dict(out))


def test_peft_lora_trains_on_the_loaded_model(llama_nf4):
    peft = pytest.importorskip("peft")
    model = load_model(llama_nf4)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    float_numerics(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora" in n for n, p in model.named_parameters() if p.requires_grad)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def corrupt(folder: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    return target


def shard_of(folder: Path, key: str) -> Path:
    """The shard holding tensor ``key``, from the folder's index."""
    return folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][key]


def test_truncated_shard_is_refused(llama_nf4, tmp_path):
    broken = corrupt(llama_nf4, tmp_path)
    shard = shard_of(broken, "model.layers.0.mlp.up_proj.weight")
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="past the end of the file"):
        load_state_dict(broken)


def rewrite_tensor(shard: Path, key: str, data: bytes, dtype: str = "U8") -> None:
    """Rewrite one tensor of a safetensors file with new bytes (a hostile edit, kept valid safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors[key] = torch.frombuffer(bytearray(data), dtype=getattr(torch, {"U8": "uint8", "F32": "float32"}[dtype])).clone()
    save_file(tensors, shard, metadata=metadata)


def test_absmax_of_the_wrong_length_is_refused(llama_nf4, tmp_path):
    broken = corrupt(llama_nf4, tmp_path)
    rewrite_tensor(shard_of(broken, "model.layers.0.mlp.up_proj.weight"), "model.layers.0.mlp.up_proj.weight.absmax", bytes(10))
    with pytest.raises(FormatError, match=r"up_proj.weight.absmax is U8 \[10\], expected U8 \[512\]"):
        load_state_dict(broken)


def test_quant_state_blob_that_is_not_json_is_refused(llama_nf4, tmp_path):
    broken = corrupt(llama_nf4, tmp_path)
    rewrite_tensor(shard_of(broken, "model.layers.1.self_attn.o_proj.weight"), "model.layers.1.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4", b"{nope")
    with pytest.raises(FormatError, match="o_proj.weight: quant-state blob is not JSON"):
        load_state_dict(broken)


def test_unknown_format_version_is_refused(llama_nf4, tmp_path):
    broken = corrupt(llama_nf4, tmp_path)
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedVersionError, match="format version 99 is not supported"):
        load_model(broken)


def test_loader_without_bitsandbytes_says_what_to_install(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from nf4convert.cli import main\n"
        "from nf4convert.load import load_state_dict\n"
        "try:\n    load_state_dict('x')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "MissingDependencyError loading NF4 weights needs bitsandbytes: pip install 'nf4convert[load]'" in p.stdout


def test_quiet_bitsandbytes_drops_only_the_optional_kernel_fetch_messages(caplog):
    import logging

    from nf4convert.load import quiet_bitsandbytes

    loggers = [logging.getLogger("bitsandbytes.backends.cpu.ops"), logging.getLogger("kernels._internals.hf_hub")]
    quiet_bitsandbytes()
    quiet_bitsandbytes()  # idempotent: one filter each
    assert [len(logger.filters) for logger in loggers] == [1, 1]
    with caplog.at_level(logging.WARNING):
        loggers[1].warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode.")
        loggers[0].warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module named 'kernels'")
        loggers[1].warning("Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.")
        loggers[0].warning("something else")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.", "something else",
    ]


def test_float_numerics_turns_off_the_avx512bf16_path_on_every_layer(llama_nf4):
    model = float_numerics(transformers.AutoModelForCausalLM.from_pretrained(llama_nf4, device_map="cpu"))
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory) -> Path:
    """A Llama whose MLP shapes bitsandbytes' AVX512-BF16 CPU path fails on (out % 32, in % 64 != 0)."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=200, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(4)
    src = tmp_path_factory.mktemp("odd") / "src"
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    return convert(src, src.parent / "nf4", options=Options(compute_dtype="float32"))


def test_the_suite_runs_with_bitsandbytes_avx512bf16_path_off(odd_llama):
    """The conftest guard: whatever the CPU, no test reaches the path unless marked avx512bf16."""
    from bitsandbytes.nn.modules import has_avx512bf16

    assert not has_avx512bf16()
    assert torch.backends.cpu.get_cpu_capability() != "AVX512"
    model = load_model(odd_llama)
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.avx512bf16
def test_on_an_avx512bf16_cpu_load_model_turns_the_path_off_only_where_it_fails(odd_llama, real_avx512bf16_detection, monkeypatch):
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)  # the CPU of a user who has it
    model = load_model(odd_llama)
    flags = {n.rpartition(".")[2]: m.support_avx512bf16_for_cpu for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert flags == {"q_proj": True, "k_proj": True, "v_proj": True, "o_proj": True, "gate_proj": False, "up_proj": False, "down_proj": False}


@pytest.mark.avx512bf16
def test_on_a_real_avx512bf16_cpu_the_first_forward_works_on_every_shape(odd_llama, real_avx512bf16_detection):
    """Run as a user runs it: a process without the suite's guard (bitsandbytes registers its AVX-512
    kernels only when torch runs at AVX512 capability)."""
    import os
    import subprocess
    import sys

    if not real_avx512bf16_detection():
        pytest.skip("this CPU has no AVX512-BF16")
    code = f"""
import torch
from nf4convert.load import float_numerics, load_model
ids = torch.tensor({IDS.tolist()})
with torch.no_grad():
    fast = load_model(r"{odd_llama}")(ids).logits  # repacks the layers that allow it, computes them in bfloat16
    exact = float_numerics(load_model(r"{odd_llama}"))(ids).logits
print((fast - exact).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.strip().splitlines()[-1]) < 0.05


def test_a_layer_moved_in_bitsandbytes_cpu_layout_refuses_to_run_elsewhere(llama_nf4):
    """bitsandbytes repacks a Linear4bit on its first CPU forward on AVX512-BF16 CPUs; ``.to("cuda")``
    keeps that layout (its ``.cuda()`` converts back) and would compute garbage. The repack is simulated
    (the flag bitsandbytes sets), so the test runs on every CPU; a meta tensor stands for the device."""
    from nf4convert.errors import LoadError

    model = load_model(llama_nf4)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.zeros(1, layer.in_features)
    layer(x)  # on the CPU: fine
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(LoadError, match=r"AVX512-BF16 CPU layout .* on meta: move the model with model.cuda\(\)"):
        layer(x.to("meta"))
