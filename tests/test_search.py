"""``--scales search`` (spec section 2.6): per block, the scale of least squared error among the
candidates, in the same format, read unchanged by stock transformers + bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nf4convert.convert import convert
from nf4convert.load import float_numerics
from nf4convert.plan import Options
from nf4convert.quantize import NF4Weight, dequantize, dequantize_absmax, quantize_nf4

from .reference import reference_search
from .test_convert import load_all

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def block_errors(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    restored = dequantize(NF4Weight(packed, scales, tuple(w.shape), torch.float32, blocksize)).reshape(-1).double()
    x = w.reshape(-1).double()
    err = (x - restored) ** 2
    return torch.nn.functional.pad(err, (0, -err.numel() % blocksize)).view(-1, blocksize).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1024), (7, 999)])  # the second: a partial last block, odd size
def test_no_block_has_more_error_than_absmax_and_the_total_is_lower(dtype, shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    w.view(-1)[:64] = 0  # an all-zero block keeps absmax's encoding
    absmax = block_errors(w.float(), *quantize_nf4(w, kernel="native"))
    search = block_errors(w.float(), *quantize_nf4(w, kernel="native", scales="search"))
    assert (search <= absmax * (1 + 1e-6) + 1e-30).all()
    assert search.sum() < 0.9 * absmax.sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_kernel_writes_the_bytes_the_spec_defines(dtype, blocksize, weighted):
    """Against spec section 2.6 written out in numpy: a partial last block of odd size, an all-zero
    block and a block below SEARCH_MIN_SCALE (both keep absmax), and columns of weight 0."""
    torch.manual_seed(0)
    w = (torch.randn(37, 999) * 0.02).to(dtype)
    w.view(-1)[:blocksize] = 0
    w.view(-1)[blocksize : 2 * blocksize] = 1e-31 if dtype == torch.float32 else 0
    importance = None
    if weighted:
        importance = torch.rand(999) * 3
        importance[300:600] = 0
    ours = quantize_nf4(w, blocksize=blocksize, kernel="native", scales="search", importance=importance)
    spec = reference_search(w, blocksize, quantize_nf4(w, blocksize=blocksize, kernel="native"), importance)
    assert torch.equal(ours[0], spec[0]) and torch.equal(ours[1], spec[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_codes_for_given_scales_are_section_2_3s_codes(dtype):
    """encode_nf4 (the codes for the scales a loader uses): with each full block's absmax as its scale,
    bitsandbytes' codes; a scale below SEARCH_MIN_SCALE codes the block as zeros."""
    from nf4convert.quantize import encode_nf4

    torch.manual_seed(0)
    w = (torch.randn(100, 640) * 0.02).to(dtype)
    packed, absmax = quantize_nf4(w, kernel="native")
    assert torch.equal(encode_nf4(w, absmax), packed)
    absmax[3] = 0
    assert (encode_nf4(w, absmax).view(-1, 32)[3] == 0x77).all()


def test_same_bytes_on_every_path_and_thread_count(tmp_path):
    code = """
import sys, torch
from nf4convert.quantize import encode_nf4, quantize_nf4
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in [(300, 1000), (3, 1001)]:
        w = (torch.randn(shape) * 0.02).to(dtype)
        p, a = quantize_nf4(w, kernel="native", scales="search")
        out += [p.flatten(), a.view(torch.uint8), encode_nf4(w, a * 0.97).flatten()]
torch.save(torch.cat(out), sys.argv[1])
"""
    results = []
    for simd, threads in [("1", "2"), ("1", "1"), ("0", "2")]:
        path = tmp_path / f"{simd}-{threads}.pt"
        subprocess.run([sys.executable, "-c", code, str(path), threads], env={**os.environ, "NF4CONVERT_SIMD": simd, "NF4CONVERT_THREADS": threads}, check=True)
        results.append(torch.load(path))
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("double_quant", [False, True])
def test_stock_transformers_reads_search_output_as_the_spec_dequantizes_it(gpt2_dir, tmp_path, double_quant):
    """float32 GPT-2 (Conv1D, transposed): stock transformers + bitsandbytes on the output against the
    same model with plain weights from the spec's dequantization."""
    from nf4convert.dequantize import dequantize_folder

    options = Options(scales="search", double_quant=double_quant, compute_dtype="float32")
    out = convert(gpt2_dir, tmp_path / "nf4", options=options)
    assert json.loads((out / "nf4convert.json").read_text())["options"]["scales"] == "search"
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    ours = float_numerics(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(dequantize_folder(out, tmp_path / "plain"))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def loader_scales(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The float32 scales a loader computes from a double-quantized weight's tensors (spec section 3.3)."""
    offset = json.loads(bytes(tensors[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))["nested_offset"]
    return dequantize_absmax(tensors[f"{key}.absmax"], tensors[f"{key}.nested_absmax"], offset)


def test_with_double_quant_codes_follow_the_scales_a_loader_uses(llama_dir, tmp_path):
    from nf4convert.quantize import encode_nf4, exact_mean

    key = "model.layers.0.mlp.up_proj.weight"
    w = load_all(llama_dir)[key]
    searched = load_all(convert(llama_dir, tmp_path / "search", options=Options(scales="search")))
    absmax = load_all(convert(llama_dir, tmp_path / "absmax"))
    assert torch.equal(searched[key], encode_nf4(w, loader_scales(searched, key)))
    offset = json.loads(bytes(searched[f"{key}.quant_state.bitsandbytes__nf4"].tolist()))["nested_offset"]
    assert offset == pytest.approx(exact_mean(quantize_nf4(w, scales="search")[1][:256]), rel=1e-7)  # its first nested block's mean

    def error(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        restored = dequantize(NF4Weight(tensors[key], loader_scales(tensors, key), tuple(w.shape), torch.float32, 64))
        return ((w.float() - restored) ** 2).sum()

    assert error(searched) < 0.92 * error(absmax)


def test_search_without_the_native_kernel_is_refused_in_one_line(llama_dir, tmp_path, cli):
    code, _, err = cli("convert", llama_dir, tmp_path / "out", "--scales", "search", "--kernel", "eager", "--quiet")
    assert code == 4 and err.strip() == "nf4convert: error: --scales search runs in the native kernel only (the CPU, with a C compiler)"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.nf4convert-partial").exists()
