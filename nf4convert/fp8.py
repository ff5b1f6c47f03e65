"""Block-scaled FP8 sources (DeepSeek-V3/R1, Kimi-K2, the Qwen3 ``-FP8`` repos), decoded on the fly.

Such a checkpoint stores each linear weight ``W`` as ``F8_E4M3`` with a float32 ``W_scale_inv`` of one
scale per ``weight_block_size`` block (128 x 128; blocks at the right and bottom edges are cut by the
tensor's edge), and ``config.json`` says ``quantization_config: {"quant_method": "fp8",
"weight_block_size": [128, 128], ...}``. The weight's value is ``fp8.float() * scale_inv`` per block,
in float32 (spec section 6.3): NF4 is computed from that; a kept FP8 weight is written as its bfloat16
rounding. The scales never reach the output. Rows are decoded a piece at a time, so no full-precision
copy of a weight exists on disk or in memory.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .errors import SourceError
from .tensorfile import TensorInfo

if TYPE_CHECKING:  # torch loads only where weights are decoded: planning stays free of its start-up
    import torch

#: The FP8 format read, its scale tensors' suffix, and the dtype its weights count as (the dtype of the
#: source's unquantized tensors and of a kept weight's decoding).
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"
LOGICAL_DTYPE = "BF16"


def block_size(config: dict[str, Any] | None, *, where: str) -> tuple[int, int] | None:
    """The ``weight_block_size`` of a block-scaled FP8 ``config.json``; ``None`` for a model that is not
    quantized, or stores MXFP4 experts (:mod:`nf4convert.mxfp4`).

    Raises:
        SourceError: quantized in another way (named), or an FP8 config that is not block-scaled E4M3.
    """
    quant = (config or {}).get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
    if method == "mxfp4":
        return None
    if method == "compressed-tensors":
        raise SourceError(f"{where}: compressed-tensors checkpoints (per-channel FP8 weight_scale, ...) are not read; only block-scaled FP8 (quant_method fp8)")
    if method != "fp8":
        raise SourceError(f"{where}: the model is already quantized ({method})")
    block = quant.get("weight_block_size")
    if quant.get("fmt", "e4m3") != "e4m3" or not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise SourceError(f"{where}: FP8 without e4m3 weight_block_size [rows, cols] blocks is not read")
    return block[0], block[1]


def pair_scales(infos: list[TensorInfo], block: tuple[int, int], *, where: str) -> dict[str, TensorInfo]:
    """Each FP8 weight's scale tensor: weight name -> ``<name>_scale_inv`` info.

    Raises:
        SourceError: an FP8 tensor without its scale, or a scale of the wrong dtype or shape.
    """
    by_name = {i.name: i for i in infos}
    pairs = {}
    for info in infos:
        if info.dtype != FP8_DTYPE:
            continue
        scale = by_name.get(info.name + SCALE_SUFFIX)
        if len(info.shape) != 2 or scale is None:
            raise SourceError(f"{where}: FP8 tensor {info.name!r} has no {SCALE_SUFFIX} of one scale per block")
        expected = tuple(math.ceil(n / b) for n, b in zip(info.shape, block))
        if scale.dtype != "F32" or scale.shape != expected:
            raise SourceError(f"{where}: {scale.name} is {scale.dtype} {list(scale.shape)}, expected F32 {list(expected)}")
        pairs[info.name] = scale
    return pairs


def decode_rows(data: torch.Tensor, scale_inv: torch.Tensor, first_row: int, block: tuple[int, int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``first_row ...`` of an FP8 weight in float32: ``fp8.float() * scale_inv`` per block (the
    native kernel on the CPU where it is built, else torch: the same IEEE products).

    Args:
        data: the rows' bytes, uint8 ``[rows, cols]`` (``float8_e4m3fn`` bit patterns).
        scale_inv: the whole weight's float32 scales ``[ceil(R / block[0]), ceil(cols / block[1])]``.
        first_row: the index of ``data``'s first row in the weight.
        block: ``weight_block_size``.
        out: a float32 buffer of at least as many elements to decode into (reused by callers that
            decode piece after piece), else a new tensor.
    """
    import torch

    from . import native

    rows, cols = data.shape
    out = torch.empty(rows * cols, dtype=torch.float32) if out is None else out[: rows * cols]
    if data.device.type == "cpu" and data.is_contiguous() and native.library() is not None:
        native.decode_fp8(data.numpy(), scale_inv.float().contiguous().numpy(), first_row, block, out.numpy())
        return out.view(rows, cols)
    out = out.view(rows, cols).copy_(data.view(torch.float8_e4m3fn))
    row_scales = scale_inv.repeat_interleave(block[0], dim=0)[first_row : first_row + rows]
    for j in range(scale_inv.shape[1]):
        out[:, j * block[1] : (j + 1) * block[1]] *= row_scales[:, j : j + 1]
    return out
