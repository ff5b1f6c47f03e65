"""The GPU path (marked ``cuda``; skipped without a CUDA device): ``scripts/gpu_check.sh`` runs these.

- ``load_model(device="cuda")`` builds ``Linear4bit`` on the GPU with no float copy of a quantized weight,
  and every tensor of each quant state (absmax, nested absmax, code tables, offset) lives there;
- its logits equal a float model built from the spec's dequantization, within bfloat16 tolerance, for
  forwards of 1 token (bitsandbytes' inference kernel, taken for at most 3), 8 and 1,600 tokens, with and
  without double quantization; for GPT-2's Conv1D; for inner dimensions that are not whole blocks
  (bitsandbytes dequantizes then multiplies); for per-expert and fused MoE experts (equal to the CPU);
- ``convert --device cuda`` writes the same bytes as the CPU, on a model and on the spec's vectors
  (all-zero, partial and subnormal blocks included);
- a model that ran on the CPU and was moved with ``.to("cuda")`` computes right, or refuses in one line
  where bitsandbytes' AVX512-BF16 CPU layout came along;
- ``nf4convert importance --device cuda`` runs the offloaded blocks on the GPU and gives the CPU's vectors.
"""

from __future__ import annotations

import pytest
import torch

from nf4convert.convert import convert
from nf4convert.dequantize import dequantize_folder
from nf4convert.load import float_numerics, load_model
from nf4convert.plan import Options

from .architectures import build, inputs, save_checkpoint
from .test_spec import DTYPES, VECTORS

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


def bf16_close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.allclose(got.float().cpu(), expected.float().cpu(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def reference(out, tmp_path) -> torch.nn.Module:
    """The float32 model of the spec's dequantization of ``out``, on the CPU."""
    return transformers.AutoModelForCausalLM.from_pretrained(dequantize_folder(out, tmp_path / "plain"), dtype=torch.float32).eval()


@pytest.mark.parametrize("double_quant", [True, False])
def test_forwards_of_1_8_and_1600_tokens_equal_the_dequantized_model(wide_llama, tmp_path, double_quant):
    out = convert(wide_llama, tmp_path / "nf4", options=Options(double_quant=double_quant))
    ref, model = reference(out, tmp_path), load_model(out, device="cuda")
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 8, 1600):
        ids = torch.randint(1, 256, (1, tokens), generator=g)
        with torch.no_grad():
            assert bf16_close(model(ids.cuda()).logits, ref(ids).logits), tokens


def test_every_part_of_each_quant_state_is_on_the_device(wide_llama, tmp_path):
    import bitsandbytes as bnb

    model = load_model(convert(wide_llama, tmp_path / "nf4"), device="cuda")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for m in layers:
        qs = m.weight.quant_state
        parts = [m.weight.data, qs.absmax, qs.code, *([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])]
        assert all(torch.as_tensor(t).device.type == "cuda" for t in parts)


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "odd"])
def test_conv1d_and_inner_dimensions_that_are_not_whole_blocks(name, tmp_path):
    if name == "odd":  # in_features 96 and 200: not multiples of the block size
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    else:
        build(name).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "nf4", options=Options(compute_dtype="float32"))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 100]])
    with torch.no_grad():
        assert bf16_close(load_model(out, device="cuda")(ids.cuda()).logits, reference(out, tmp_path)(ids).logits)


@pytest.mark.parametrize("name", ["MixtralForCausalLM", "GraniteMoeForCausalLM"])
def test_moe_experts_on_cuda_equal_the_cpu_within_bf16_tolerance(name, tmp_path):
    from nf4convert.experts import NF4Experts

    out = convert(save_checkpoint(name, tmp_path / "src"), tmp_path / "nf4", options=Options(compute_dtype="float32"))
    cpu, gpu = float_numerics(load_model(out)), load_model(out, device="cuda")
    experts = [m for m in gpu.modules() if isinstance(m, NF4Experts)]
    assert experts and all(t.device.type == "cuda" for m in experts for t in [*m.parameters(), *m.buffers()])
    x = inputs(name, cpu)
    with torch.no_grad():
        assert bf16_close(gpu(**{k: v.cuda() for k, v in x.items()}).logits, cpu(**x).logits)


@pytest.mark.parametrize("case", VECTORS["vectors"], ids=lambda c: c["name"])
def test_cuda_quantizes_the_spec_vectors_to_their_bytes(case):
    from nf4convert.quantize import quantize_weight

    w = torch.frombuffer(bytearray.fromhex(case["input"]), dtype=DTYPES[case["dtype"]]).reshape(case["shape"]).cuda()
    q = quantize_weight(w, blocksize=case["blocksize"], double_quant=case["double_quant"], kernel="eager")
    assert q.packed.cpu().numpy().tobytes().hex() == case["weight"]
    assert q.absmax.cpu().numpy().tobytes().hex() == case["absmax"]
    if case["double_quant"]:
        assert q.nested_absmax.cpu().numpy().tobytes().hex() == case["nested_absmax"]


def test_a_model_run_on_the_cpu_then_moved_with_to_cuda_computes_right_or_refuses(wide_llama, tmp_path):
    from nf4convert.errors import LoadError

    out = convert(wide_llama, tmp_path / "nf4")
    expected = load_model(out, device="cuda")(IDS.cuda()).logits
    model = load_model(out)
    with torch.no_grad():
        model(IDS)  # on an AVX512-BF16 CPU, bitsandbytes repacks the weights into its CPU layout here
        model.to("cuda")
        try:
            got = model(IDS.cuda()).logits
        except LoadError as e:
            assert "model.cuda()" in str(e)
            return
    assert bf16_close(got, expected)


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "MixtralForCausalLM"])
def test_importance_measured_on_cuda_equals_the_cpu_within_float_tolerance(name, tmp_path):
    """`nf4convert importance --device cuda`: the blocks run on the GPU, read from the checkpoint's files."""
    from safetensors.torch import load_file

    from nf4convert.calibrate import measure_importance

    from .architectures import save_tokenizer
    from .test_calibrate import TEXT

    src = save_tokenizer(save_checkpoint(name, tmp_path / "src"))
    for device in ("cpu", "cuda"):
        measure_importance(src, TEXT, tmp_path / f"{device}.safetensors", device=device, window=32)
    cpu, cuda = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "cuda.safetensors")
    assert cpu.keys() == cuda.keys()
    for k in cpu:  # float32 on both, TF32 off by default: rounding differences only
        torch.testing.assert_close(cuda[k], cpu[k], rtol=1e-3, atol=1e-6)


def test_a_diffusers_component_on_cuda_equals_diffusers_own_loading_of_it(tmp_path):
    """Where diffusers' own bitsandbytes loader runs (a GPU), load_model gives the same model, bit for bit."""
    diffusers = pytest.importorskip("diffusers")
    from .test_diffusers import MODELS

    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(**MODELS["FluxTransformer2DModel"]).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "nf4")
    ours = load_model(out, device="cuda")
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16, device_map="cuda")
    g = torch.Generator().manual_seed(0)
    x = dict(
        hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
    )  # fmt: skip
    x = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "timestep" else v.dtype) for k, v in x.items()}
    with torch.no_grad():
        assert torch.equal(ours(**x).sample, theirs(**x).sample)


def test_a_diffusers_pipeline_runs_on_cuda(tmp_path):
    pytest.importorskip("diffusers")
    from nf4convert.pipeline import convert_pipeline

    from .test_pipeline import RUN, save_tiny_flux

    pipe = load_model(convert_pipeline(save_tiny_flux(tmp_path / "src"), tmp_path / "nf4"), device="cuda")
    with torch.no_grad():
        images = pipe(**RUN, generator=torch.Generator("cuda").manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
