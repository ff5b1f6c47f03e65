"""The quantizer against bitsandbytes itself, bit for bit, on every dtype, blocksize and edge case."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from nf4convert.constants import BLOCKSIZES, DYNAMIC_MAP, NF4_CODE
from nf4convert.errors import QuantizationError
from nf4convert.quantize import (
    NF4_THRESHOLDS,
    NF4Weight,
    dequantize,
    dequantize_absmax,
    double_quantize,
    exact_mean,
    quantize_nf4,
    quantize_weight,
)

from .reference import reference_dequantize

F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Every path that computes codes: native with the best SIMD the CPU has (AVX-512 where it has it),
#: native capped at AVX2, native portable C, and torch.
KERNELS = ["native", "avx2", "portable", "eager"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch) -> str:
    """The kernel argument for one quantizer path; "avx2" and "portable" are the native kernel capped at
    AVX2 and without SIMD."""
    from nf4convert import native

    if request.param in ("avx2", "portable"):
        monkeypatch.setenv("NF4CONVERT_SIMD", "avx2" if request.param == "avx2" else "0")
        if native.variant() != request.param:
            pytest.skip(f"no {request.param} path on this CPU")
        return "native"
    return request.param


def bnb(w: torch.Tensor, blocksize: int):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")


def assert_same_as_bnb(w: torch.Tensor, blocksize: int, kernel: str) -> None:
    """Codes and absmax equal bitsandbytes' quantizer (the same on every CPU); the dequantization equals
    the spec's, element by element (bitsandbytes' own CPU dequantization depends on the CPU: its
    AVX512-BF16 path flushes subnormal bfloat16 results to zero)."""
    packed, absmax = quantize_nf4(w, blocksize=blocksize, kernel=kernel)
    ref, state = bnb(w, blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ref.shape
    assert torch.equal(packed, ref)
    assert torch.equal(absmax, state.absmax)
    ours = dequantize(NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize))
    assert torch.equal(ours, reference_dequantize(packed, absmax, tuple(w.shape), w.dtype, blocksize))


def test_code_table_is_bitsandbytes_nf4():
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(DYNAMIC_MAP, dtype=torch.float32), F.create_dynamic_map(signed=True).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_random_weights_are_bit_identical(kernel, dtype, blocksize):
    torch.manual_seed(blocksize)
    # a full-chunk tensor, and one whose last block is partial and whose numel is odd
    for shape in [(256, 4096 + blocksize), (3, 1001)]:
        assert_same_as_bnb((torch.randn(shape) * 0.02).to(dtype), blocksize, kernel)


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_exactly_on_the_thresholds_go_to_the_lower_code(kernel, dtype):
    # a leading 1.0 makes absmax 1, so scaled == value: every threshold, its float32 neighbours, and the codes
    t = NF4_THRESHOLDS
    up, down = torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))
    values = torch.cat([torch.ones(1), t, up, down, torch.tensor(NF4_CODE)])
    assert_same_as_bnb(torch.cat([values, torch.zeros(64 - values.numel())]).to(dtype), 64, kernel)
    packed, _ = quantize_nf4(torch.cat([torch.ones(1), t[3:4]]).repeat(32), blocksize=64, kernel=kernel)
    assert packed[0, 0] == (15 << 4) | 3  # the tie t[3] = (c[3] + c[4]) / 2 goes to code 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_blocks(kernel, dtype):
    finfo = torch.finfo(dtype)
    blocks = [
        torch.zeros(64),  # all-zero block: absmax 0, codes 7
        torch.full((64,), finfo.tiny / 4),  # subnormals
        torch.linspace(-1, 1, 64) * finfo.max,  # huge magnitudes
        torch.full((64,), -finfo.max),
        torch.randn(64) * 1e-30,
        torch.cat([torch.full((63,), 1e-3), torch.tensor([1e3])]),  # one outlier
        torch.tensor([-1.0, 1.0] * 32),
    ]
    w = torch.stack(blocks).to(dtype)
    assert_same_as_bnb(w, 64, kernel)
    assert_same_as_bnb(torch.cat([w.reshape(-1), torch.zeros(7, dtype=dtype)]), 64, kernel)  # all-zero partial block
    # the SIMD paths take the reciprocals of 8 (AVX2) or 16 (AVX-512) blocks at once: each block in each place of a batch
    many = torch.cat([torch.randn(30, 64) * 0.02, torch.stack(blocks)]).to(dtype)
    for shift in range(0, 37, 3):
        assert_same_as_bnb(many.roll(shift, 0), 64, kernel)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_weights_are_refused_naming_the_tensor_and_place(bad, dtype, kernel):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(QuantizationError, match=r"layer\.weight: contains NaN or Inf \(first in elements 128\.\.191\)"):
        quantize_nf4(w.to(dtype), name="layer.weight", kernel=kernel)


def test_bad_blocksize_and_dtype_are_refused():
    with pytest.raises(QuantizationError, match="invalid blocksize 48"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(QuantizationError, match="cannot quantize dtype torch.int8"):
        quantize_nf4(torch.zeros(64, dtype=torch.int8))
    with pytest.raises(QuantizationError, match="unknown kernel"):
        quantize_nf4(torch.zeros(64), kernel="fast")


def test_exact_mean_is_the_rounded_exact_rational_mean(kernel):
    torch.manual_seed(0)
    values = torch.cat([torch.rand(100_000) * 10, torch.tensor([0.0, 1e-40, 3e38])]).float()
    exact = sum(Fraction(v) for v in values.tolist()) / values.numel()
    assert exact_mean(values, kernel) == float(np.float32(float(exact)))


def test_exact_mean_does_not_depend_on_threads(monkeypatch):
    torch.manual_seed(0)
    values = torch.rand(3_000_000).float()
    monkeypatch.setenv("NF4CONVERT_THREADS", "1")
    one = exact_mean(values)
    monkeypatch.setenv("NF4CONVERT_THREADS", "4")
    assert exact_mean(values) == one


def reference_double_quant(absmax: torch.Tensor) -> tuple[list[int], list[float], float]:
    """The spec's section 3, written out element by element in plain Python and numpy."""
    f32 = np.float32
    offset = f32(float(sum(Fraction(float(v)) for v in absmax.tolist()) / absmax.numel()))
    v = [f32(f32(a) - offset) for a in absmax.tolist()]
    dyn = [f32(d) for d in DYNAMIC_MAP]
    mids = [f32((dyn[i] + dyn[i + 1]) / f32(2)) for i in range(255)]
    codes, nested = [], []
    for start in range(0, len(v), 256):
        block = v[start : start + 256]
        m = max(abs(x) for x in block)
        partial = len(block) < 256
        if partial:
            m = max(m, f32(1e-38))
            scaled = [min(max(f32(x / m), f32(-1)), f32(1)) for x in block]
        else:
            r = f32(f32(1) / max(m, f32(1e-38)))
            scaled = [min(max(f32(x * r), f32(-1)), f32(1)) for x in block]
        nested.append(float(m))
        codes += [sum(1 for t in mids if t < s) for s in scaled]
    return codes, nested, float(offset)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_double_quant_of_many_scales_in_parts_on_threads_is_the_eager_one(threads, monkeypatch):
    """The native kernel's exact mean and 8-bit scales of over 2**16 scales a thread are computed in
    parts, one a thread (whole nested blocks; integer sums): the same as torch's, however many threads."""
    torch.manual_seed(5)
    absmax = (torch.rand(3 * 65536 + 1000) * 0.1).float()  # a partial last nested block
    absmax[::997] = 0.0
    monkeypatch.setenv("NF4CONVERT_THREADS", threads)
    native = double_quantize(absmax, "native")
    eager = double_quantize(absmax, "eager")
    assert native[2] == eager[2]
    assert torch.equal(torch.as_tensor(native[0]), torch.as_tensor(eager[0])) and torch.equal(torch.as_tensor(native[1]), torch.as_tensor(eager[1]))


@pytest.mark.parametrize("n", [700, 256, 3])  # a partial last nested block; one full block; only a partial one
def test_double_quant_matches_the_spec_reference_exactly(kernel, n):
    torch.manual_seed(3)
    absmax = (torch.rand(n) * 0.1).float()
    absmax[::97] = 0.0
    q, nested, offset = double_quantize(absmax, kernel)
    codes, ref_nested, ref_offset = reference_double_quant(absmax)
    assert offset == ref_offset
    assert q.tolist() == codes
    assert nested.tolist() == ref_nested


def test_double_quant_of_equal_absmax_gives_zero_blocks(kernel):
    q, nested, offset = double_quantize(torch.full((300,), 0.25), kernel)
    assert offset == 0.25 and nested.tolist() == [0.0, float(np.float32(1e-38))]  # the partial block stores the floor
    assert q.tolist() == reference_double_quant(torch.full((300,), 0.25))[0]


def test_double_quant_is_within_one_8bit_step_of_bitsandbytes():
    torch.manual_seed(4)
    w = (torch.randn(512, 1024) * 0.02).to(torch.bfloat16)
    q = quantize_weight(w, double_quant=True)
    ref, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, ref)
    ours = dequantize_absmax(q.absmax, q.nested_absmax, q.offset)
    theirs = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    dyn = torch.tensor(DYNAMIC_MAP)
    step = (dyn[1:] - dyn[:-1]).max() * q.nested_absmax.repeat_interleave(256)[: ours.numel()]
    assert ((ours - theirs).abs() <= step + 1e-7).all()
    assert (q.absmax.int() - state.absmax.int()).abs().max() <= 1
    assert abs(q.offset - state.offset.item()) <= 1e-6 * abs(q.offset)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_values_are_fixed_points_of_quantize_dequantize(dtype, double_quant, kernel):
    torch.manual_seed(5)
    q = quantize_weight((torch.randn(64, 300) * 0.05).to(dtype), double_quant=double_quant, blocksize=64, kernel=kernel)
    again = quantize_weight(dequantize(q), double_quant=double_quant, blocksize=64, kernel=kernel)
    assert torch.equal(again.packed, q.packed)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("chunk", [64, 5 * 64, 1 << 20])
def test_dequantizing_a_chunk_of_blocks_at_a_time_gives_the_specs_values(blocksize, chunk, monkeypatch):
    """Chunks of whole blocks, an odd element count and a partial last block: element for element the
    spec's ``NF4[code] * absmax[block]``."""
    from nf4convert import quantize

    monkeypatch.setattr(quantize, "DEQUANTIZE_CHUNK", chunk)
    torch.manual_seed(7)
    w = torch.randn(37, 301).to(torch.bfloat16)
    packed, absmax = quantize_nf4(w, blocksize=blocksize, kernel="eager")
    ours = dequantize(NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize))
    assert torch.equal(ours, reference_dequantize(packed, absmax, tuple(w.shape), w.dtype, blocksize))


def test_quantization_does_not_depend_on_threads(monkeypatch):
    """The native kernel runs on ``$NF4CONVERT_THREADS`` threads (default: the CPUs here)."""
    from nf4convert.native import threads

    torch.manual_seed(6)
    w = torch.randn(1024, 2048).to(torch.bfloat16)
    monkeypatch.setenv("NF4CONVERT_THREADS", "1")
    assert threads() == 1
    a = quantize_weight(w)
    monkeypatch.setenv("NF4CONVERT_THREADS", "4")
    assert threads() == 4
    b = quantize_weight(w)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax) and a.offset == b.offset
    assert torch.equal(a.nested_absmax, b.nested_absmax)


def convert_in_subprocess(src: Path, out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``nf4convert convert --verbose`` in a new process, where no native kernel has been loaded yet."""
    cmd = [sys.executable, "-m", "nf4convert", "convert", str(src), str(out), "--verbose", *args]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("compiler", ["none on the PATH", "a broken one in $CC"])
def test_without_a_working_compiler_auto_falls_back_to_eager_with_the_same_bytes(compiler, llama_dir, tmp_path):
    env = {"NF4CONVERT_CACHE": str(tmp_path / "cache")}
    env.update({"PATH": str(tmp_path / "empty")} if compiler.startswith("none") else {"CC": shutil.which("false")})
    fallback = convert_in_subprocess(llama_dir, tmp_path / "eager", env)
    assert fallback.returncode == 0, fallback.stderr
    assert "kernel: eager (cpu)" in fallback.stdout and "native NF4 kernel unavailable" in fallback.stderr
    native = convert_in_subprocess(llama_dir, tmp_path / "native", {"NF4CONVERT_CACHE": str(tmp_path / "cache2")})
    assert native.returncode == 0 and "kernel: native (" in native.stdout
    assert sorted((tmp_path / "cache2").glob("nf4kernel-*"))  # built once, reused by later processes
    for f in sorted(p.name for p in (tmp_path / "native").iterdir()):
        assert (tmp_path / "native" / f).read_bytes() == (tmp_path / "eager" / f).read_bytes(), f
    asked = convert_in_subprocess(llama_dir, tmp_path / "refused", env, "--kernel", "native")
    assert asked.returncode == 4 and asked.stderr.strip().startswith("nf4convert: error: the native kernel is unavailable")
    assert len(asked.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
