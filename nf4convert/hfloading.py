"""Where nf4convert steps into transformers' ``from_pretrained``: its quantizer registry, swapped for
one call, and FP8 checkpoints decoded as spec section 6.3 says.

transformers picks the quantizer that fills a model from the folder's ``quant_method``;
:func:`registered` swaps its entry for one block (:mod:`nf4convert.registry`).

FP8: on a machine without a GPU transformers dequantizes a block-scaled FP8 checkpoint while loading
(``FineGrainedFP8HfQuantizer``'s ``Fp8Dequantize``, the first operation of each weight's conversion,
so per-expert weights are decoded before they are fused). It derives a weight's block from the shapes
(``rows // scale_rows``), which is wrong where the tensor's edge cuts the last block: a 160-row weight
of 128-row blocks decodes with 80-row blocks, and DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` (5 scale
rows) is an error. :class:`SpecFp8Dequantize` decodes by the config's ``weight_block_size`` instead,
with :func:`nf4convert.fp8.decode_rows` (the decoding nf4convert quantizes from).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

from .fp8 import decode_rows
from .registry import swapped

def registered(quant_method: str, quantizer: type) -> contextlib.AbstractContextManager[None]:
    """Within the block, transformers loads folders of ``quant_method`` with ``quantizer``."""
    return swapped(AUTO_QUANTIZER_MAPPING, quant_method, quantizer)


class SpecFp8Dequantize(Fp8Dequantize):
    """transformers' FP8 dequantization, each ``weight_block_size`` block decoded as the spec says
    (edge blocks cut by the tensor's edge); other formats (FP4, E8M0 scales) as transformers does."""

    def _dequantize_one(self, quantized: torch.Tensor, scales: torch.Tensor, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        block = tuple(getattr(self.hf_quantizer.quantization_config, "weight_block_size", None) or ())
        if quantized.dtype != torch.float8_e4m3fn or not scales.is_floating_point() or len(block) != 2 or quantized.dim() < 2:
            return super()._dequantize_one(quantized, scales, output_dtype=output_dtype)
        rows, cols = quantized.shape[-2:]
        if tuple(scales.shape[-2:]) != (-(-rows // block[0]), -(-cols // block[1])):
            return super()._dequantize_one(quantized, scales, output_dtype=output_dtype)
        data, grid = quantized.reshape(-1, rows, cols).view(torch.uint8), scales.reshape(-1, *scales.shape[-2:]).float()
        out = torch.stack([decode_rows(d.contiguous(), s.contiguous(), 0, block).view(rows, cols) for d, s in zip(data, grid)])
        return out.reshape(quantized.shape).to(output_dtype or torch.bfloat16)


class SpecFP8HfQuantizer(FineGrainedFP8HfQuantizer):
    """transformers' FP8 quantizer, dequantizing with :class:`SpecFp8Dequantize`."""

    def get_load_operations(self) -> dict[str, Any]:
        return {**super().get_load_operations(), "dequantize": SpecFp8Dequantize}


def spec_fp8() -> contextlib.AbstractContextManager[None]:
    """Within the block, transformers decodes FP8 checkpoints with :class:`SpecFP8HfQuantizer`."""
    return registered("fp8", SpecFP8HfQuantizer)
