"""The GPU path (marked ``cuda``; skipped without a CUDA device): ``scripts/gpu_check.sh`` runs these.

- ``load_model(device="cuda")`` builds ``Linear4bit`` on the GPU with no float copy of a quantized weight;
- its logits equal a float model built from the spec's dequantization, within bfloat16 tolerance;
- ``convert --device cuda`` writes the same bytes as the CPU.
"""

from __future__ import annotations

import pytest
import torch

from nf4convert.convert import convert
from nf4convert.dequantize import dequantize_folder
from nf4convert.plan import Options

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 200]])


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A Llama whose quantized weights (8.9 MB in bf16) dwarf its kept ones, so a float copy would show."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("gpu") / "src"
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def test_load_model_on_cuda_holds_only_the_nf4_bytes(wide_llama, tmp_path):
    from nf4convert.load import load_model
    from nf4convert.read import open_checkpoint

    out = convert(wide_llama, tmp_path / "nf4")
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    tensors = sum(len(t) for t in open_checkpoint(out).shards.values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = load_model(out, device="cuda")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.device.type == "cuda" and layer.weight.dtype == torch.uint8
    # every stored byte once, plus the allocator's 512-byte rounding per tensor; a bf16 copy of the
    # quantized weights alone would add 8.9 MB
    assert peak <= stored + 512 * tensors + (1 << 20), (peak, stored)


def test_cuda_logits_equal_the_spec_dequantization_within_bf16_tolerance(wide_llama, tmp_path):
    from nf4convert.load import load_model

    out = convert(wide_llama, tmp_path / "nf4")
    plain = dequantize_folder(out, tmp_path / "plain")
    reference = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(IDS).logits
        got = load_model(out, device="cuda")(IDS.cuda()).logits.float().cpu()
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_convert_on_cuda_writes_the_cpu_bytes(wide_llama, tmp_path):
    options = Options(max_shard_size=3_000_000)
    cpu = convert(wide_llama, tmp_path / "cpu", options=options)
    gpu = convert(wide_llama, tmp_path / "cuda", options=options, device="cuda")
    names = sorted(p.name for p in cpu.iterdir())
    assert names == sorted(p.name for p in gpu.iterdir())
    for name in names:
        assert (cpu / name).read_bytes() == (gpu / name).read_bytes(), name
