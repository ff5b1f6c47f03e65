"""Loaded 4-bit layers compute right on every CPU: bitsandbytes 0.50's AVX-512 CPU decode of weights whose
rows are not whole blocks is wrong (docs/cpus-and-gpus.md), so those layers decode as one row.

The reference is the spec's decode in numpy (tests/reference.py), independent of torch and the CPU. Both
CPU kinds are exercised whatever this CPU is: bitsandbytes' ``dequantize_4bit`` op is replaced by a model
of its AVX-512 branch (each row's scales looked up as if the row began a block) or of its scalar branch
(blocks over the flattened weight).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nf4convert.convert import convert
from nf4convert.load import load_model, load_state_dict, replace_linear
from nf4convert.plan import Options

from .reference import reference_dequantize

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from nf4convert.rowdecode import RowDecodeLinear4bit  # noqa: E402  (needs bitsandbytes)

#: in_features of the layers the AVX-512 decode gets wrong (multiples of 16, not of 64), and one it gets right
IN_FEATURES = [16, 48, 96, 112, 160, 128]


def avx512_branch(real):
    """bitsandbytes' native CPU decode as its AVX-512 branch computes it: for a last dimension ``n`` that is a
    multiple of 16, element ``(r, c)`` takes ``absmax[r * (n // blocksize) + c // blocksize]``."""

    def decode(A, absmax, blocksize, quant_type, shape, dtype):
        out = real(A, absmax, blocksize, quant_type, (A.numel() * 2,), torch.float32)[: torch.Size(shape).numel()]
        rows, n = (1, shape[0]) if len(shape) == 1 else (torch.Size(shape[:-1]).numel(), shape[-1])
        if n % 16 or blocksize < 16 or blocksize >= 2048 or n % blocksize == 0:
            return out.reshape(shape).to(dtype)
        codes = out.reshape(-1) / absmax.repeat_interleave(blocksize)[: out.numel()]
        index = torch.arange(rows).unsqueeze(1) * (n // blocksize) + torch.arange(n).unsqueeze(0) // blocksize
        return (codes.reshape(rows, n) * absmax[index.clamp(max=absmax.numel() - 1)]).reshape(shape).to(dtype)

    return decode


def scalar_branch(real):
    """bitsandbytes' native CPU decode as its scalar branch computes it: blocks over the flattened weight."""

    def decode(A, absmax, blocksize, quant_type, shape, dtype):
        return real(A, absmax, blocksize, quant_type, (torch.Size(shape).numel(),), dtype).reshape(shape)

    return decode


class _Op:
    def __init__(self, default):
        self.default = default

    def __call__(self, *args):
        return self.default(*args)


@pytest.fixture(params=["avx512", "scalar"])
def cpu_kind(request, monkeypatch):
    """bitsandbytes' CPU ``dequantize_4bit`` replaced by a model of one of its two native branches."""
    real = torch.ops.bitsandbytes.dequantize_4bit.default
    model = (avx512_branch if request.param == "avx512" else scalar_branch)(real)
    monkeypatch.setattr(torch.ops.bitsandbytes, "dequantize_4bit", _Op(model))
    return request.param


def _checkpoint(tmp_path: Path, in_features: int, dtype: torch.dtype) -> tuple[torch.nn.Module, Path]:
    from safetensors.torch import save_file

    torch.manual_seed(in_features)
    net = torch.nn.Sequential(torch.nn.Linear(in_features, 40), torch.nn.GELU(), torch.nn.Linear(40, 24)).to(dtype)
    save_file({k: v.detach().clone() for k, v in net.state_dict().items()}, tmp_path / "net.safetensors")
    return net, tmp_path / "net.safetensors"


def _reference(sd: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
    w = sd[key]
    qs = w.quant_state
    absmax = qs.absmax if not qs.nested else bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return reference_dequantize(w.data, absmax.float(), tuple(qs.shape), dtype, qs.blocksize)


@pytest.mark.parametrize("in_features", IN_FEATURES)
@pytest.mark.parametrize("dtype, double_quant", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_loaded_layers_compute_with_the_specs_weights_on_both_cpu_kinds(cpu_kind, in_features, dtype, double_quant, tmp_path):
    net, src = _checkpoint(tmp_path, in_features, dtype)
    out = convert(src, tmp_path / "nf4", options=Options(double_quant=double_quant))
    sd = load_state_dict(out)
    fresh = torch.nn.Sequential(torch.nn.Linear(in_features, 40), torch.nn.GELU(), torch.nn.Linear(40, 24)).to(dtype)
    replace_linear(fresh, sd)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
    w0, w2 = _reference(sd, "0.weight", dtype), _reference(sd, "2.weight", dtype)
    with torch.no_grad():
        h = torch.nn.functional.gelu(torch.nn.functional.linear(x, w0, net[0].bias))
        expected = torch.nn.functional.linear(h, w2, net[2].bias)
        assert torch.equal(fresh(x), expected)
    assert (type(fresh[0]) is RowDecodeLinear4bit) == (in_features % 64 != 0)
    assert type(fresh[2]) is RowDecodeLinear4bit  # 40 % 64 != 0


def test_the_model_of_the_avx512_branch_is_wrong_where_the_report_says(cpu_kind, tmp_path):
    """What the simulation stands for: a stock Linear4bit over the modelled AVX-512 decode is off by
    whole units for in_features 48, exact for 128."""
    if cpu_kind != "avx512":
        pytest.skip("about the AVX-512 branch")
    for in_features, wrong in [(48, True), (128, False)]:
        layer = bnb.nn.Linear4bit(in_features, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False)
        layer.support_avx512bf16_for_cpu = False
        torch.manual_seed(0)
        layer.load_state_dict({"weight": torch.randn(40, in_features)})
        layer = layer.to("cpu")
        x = torch.randn(4, in_features)
        with torch.no_grad():
            stock = layer(x)
            w = reference_dequantize(layer.weight.data, layer.weight.quant_state.absmax, (40, in_features), torch.float32, 64)
            error = (stock - torch.nn.functional.linear(x, w)).abs().max().item()
        assert (error > 0.5) == wrong


def test_load_model_gives_layers_with_partial_block_rows_the_row_decode(cpu_kind, tmp_path):
    """A transformers model whose hidden size is 48: every layer reading it decodes as one row, and the
    outputs equal the model with each weight replaced by the spec's decode."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3, num_key_value_heads=3, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "nf4", options=Options(double_quant=False, compute_dtype="float32"))
    model = load_model(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert layers and all(type(m) is RowDecodeLinear4bit for m in layers.values())
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src")
    sd = load_state_dict(out)
    for name in layers:
        reference.get_submodule(name).weight.data = _reference(sd, f"{name}.weight", torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
