"""Regenerate spec/vectors/vectors.json: small inputs and the exact bytes the format stores for them.

The 4-bit codes and float32 absmax are checked against bitsandbytes before they are
written (it must be installed); the double-quantized fields follow the spec's
deterministic definition. The `--scales search` cases (spec section 2.6) are the native
kernel's bytes, which tests/test_search.py checks against the spec written out in numpy.
Run: python scripts/make_vectors.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import bitsandbytes.functional as F
import torch

from nf4convert.constants import NF4_CODE
from nf4convert.layout import QuantState, encode_quant_state
from nf4convert.mxfp4 import decode
from nf4convert.quantize import NF4_THRESHOLDS, quantize_nf4, quantize_weight

OUT = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "vectors.json"


def hexbytes(t: torch.Tensor) -> str:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()


def cases() -> list[tuple[str, torch.Tensor, int, bool]]:
    g = torch.Generator().manual_seed(20261124)
    ties = torch.cat([torch.ones(1), NF4_THRESHOLDS, torch.tensor(NF4_CODE)])
    ties = torch.cat([ties, torch.zeros(64 - ties.numel())])
    edge = torch.cat([torch.zeros(64), torch.full((64,), 1e-40), torch.linspace(-1, 1, 64) * 3e38, torch.zeros(5)])
    return [
        ("bf16_4x64_bs64", torch.randn(4, 64, generator=g).to(torch.bfloat16), 64, False),
        ("f16_3x33_bs32_partial_odd", (torch.randn(3, 33, generator=g) * 0.02).to(torch.float16), 32, False),
        ("f32_thresholds_ties_bs64", ties.reshape(1, 64), 64, False),
        ("f32_zero_subnormal_huge_partial", edge.reshape(1, -1), 64, False),
        ("bf16_4x4096_bs64_double_quant", (torch.randn(4, 4096, generator=g) * 0.03).to(torch.bfloat16), 64, True),
        ("f32_3x3000_bs32_double_quant_partial", torch.randn(3, 3000, generator=g) * 0.1, 32, True),
        ("f16_2x4196_bs4096_double_quant", torch.randn(2, 4196, generator=g).to(torch.float16), 4096, True),
        ("bf16_experts_4x16x24_bs64_double_quant", (torch.randn(4, 16, 24, generator=g) * 0.02).to(torch.bfloat16), 64, True),
    ]


def mxfp4_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """MXFP4 blocks ``[E, R, G, 16]`` and scales ``[E, R, G]`` (spec section 6.4)."""
    g = torch.Generator().manual_seed(20261205)
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(1, 2, 8, 16)  # each byte value once ...
    extremes = torch.tensor([0, 1, 126, 127, 128, 254, 120, 133], dtype=torch.uint8).reshape(1, 1, 8).repeat(1, 2, 1)  # ... at extreme scales
    return [
        ("mxfp4_every_byte_extreme_scales", every_byte, extremes),
        ("mxfp4_2x4x2_random", torch.randint(0, 256, (2, 4, 2, 16), generator=g, dtype=torch.uint8), torch.randint(110, 140, (2, 4, 2), generator=g, dtype=torch.uint8)),
    ]


def search_cases() -> list[tuple[str, torch.Tensor, int, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(20261125)
    zero_block = (torch.randn(4, 192, generator=g) * 0.05).to(torch.float16)
    zero_block.view(-1)[64:128] = 0
    importance = torch.rand(192, generator=g) * 4
    importance[:40] = 0
    return [
        ("search_bf16_8x128_bs64", (torch.randn(8, 128, generator=g) * 0.02).to(torch.bfloat16), 64, None),
        ("search_f32_3x101_bs32_partial_odd", torch.randn(3, 101, generator=g), 32, None),
        ("search_f16_4x192_bs64_zero_block_importance", zero_block, 64, importance),
    ]


def main() -> None:
    vectors = []
    for name, w, blocksize, double_quant in cases():
        q = quantize_weight(w, blocksize=blocksize, double_quant=double_quant)
        ref, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
        plain = quantize_weight(w, blocksize=blocksize, double_quant=False)
        assert torch.equal(q.packed, ref) and torch.equal(plain.absmax, state.absmax), name
        dtype = str(w.dtype).removeprefix("torch.")
        blob = encode_quant_state(QuantState(tuple(w.shape), dtype, blocksize, q.offset))
        case = {
            "name": name,
            "dtype": dtype,
            "shape": list(w.shape),
            "blocksize": blocksize,
            "double_quant": double_quant,
            "input": hexbytes(w),
            "weight": hexbytes(q.packed),
            "absmax": hexbytes(q.absmax),
            "quant_state": blob.decode(),
        }
        if double_quant:
            case["nested_absmax"] = hexbytes(q.nested_absmax)
            case["offset"] = float(q.offset).hex()
        assert len(case["weight"]) == 2 * ((math.prod(w.shape) + 1) // 2)
        vectors.append(case)
    searched = []
    for name, w, blocksize, importance in search_cases():
        packed, scales = quantize_nf4(w, blocksize=blocksize, kernel="native", scales="search", importance=importance)
        searched.append({
            "name": name, "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape), "blocksize": blocksize,
            "importance": hexbytes(importance) if importance is not None else None,
            "input": hexbytes(w), "weight": hexbytes(packed), "absmax": hexbytes(scales),
        })  # fmt: skip
    mxfp4 = []
    for name, blocks, scales in mxfp4_cases():
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        decoded = decode(blocks, scales, name=name).to(torch.bfloat16)
        assert torch.equal(decoded, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)), name
        mxfp4.append({"name": name, "blocks_shape": list(blocks.shape), "blocks": hexbytes(blocks), "scales": hexbytes(scales), "decoded": hexbytes(decoded)})
    text = {
        "description": "nf4convert format v1 test vectors: little-endian input bytes and the exact stored bytes (hex). "
        "See spec/FORMAT.md, section 10.",
        "format_version": 1,
        "vectors": vectors,
        "search_vectors": searched,
        "mxfp4_vectors": mxfp4,
    }
    OUT.write_text(json.dumps(text, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors, {len(searched)} search vectors and {len(mxfp4)} MXFP4 vectors to {OUT}")


if __name__ == "__main__":
    main()
