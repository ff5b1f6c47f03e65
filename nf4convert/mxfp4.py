"""MXFP4 sources (gpt-oss as published), decoded on the fly.

gpt-oss's Hub checkpoints store the MoE experts in MXFP4 (``config.json``: ``quantization_config:
{"quant_method": "mxfp4", ...}``): each fused experts tensor ``X`` is two tensors,

- ``X_blocks``, uint8 ``[E, R, G, 16]``: two E2M1 (FP4) values a byte, the first in the LOW nibble;
- ``X_scales``, uint8 ``[E, R, G]``: one E8M0 scale (``2 ** (byte - 127)``; 255 is NaN) per 32 values.

transformers' MXFP4 dequantization (``integrations/mxfp4.py``, ``convert_moe_packed_tensors``) gives
``[E, R, G * 32]`` and transposes it to the model's ``[E, G * 32, R]``. Here ``X`` is that tensor in
bfloat16 (exact: FP4 values times powers of two), a *logical* tensor of the source; each piece of whole
experts is decoded when read (spec section 6.4), so no full-precision copy exists, and then quantized
like any fused experts tensor, or written in bfloat16 when kept. The other tensors of such a checkpoint
are bfloat16 already.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .errors import SourceError
from .tensorfile import TensorInfo

if TYPE_CHECKING:  # torch loads only where weights are decoded
    import torch

BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
#: The dtype a decoded tensor counts as (and is written in when kept).
LOGICAL_DTYPE = "BF16"
#: The E2M1 values of the 16 codes (transformers' ``FP4_VALUES``).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: The E8M0 byte that means NaN.
NAN_SCALE = 0xFF


def is_mxfp4(config: dict[str, Any] | None) -> bool:
    """Whether ``config.json`` says the checkpoint stores MXFP4 weights."""
    quant = (config or {}).get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


def logical_info(blocks: TensorInfo, scales: TensorInfo | None, *, where: str) -> TensorInfo:
    """The decoded tensor ``X`` (bfloat16 ``[E, G * 32, R]``) of ``X_blocks`` and ``X_scales``.

    Its ``start`` is the blocks' and its byte size that of the bfloat16 decoding (what progress counts);
    the bytes are read through the two packed tensors.

    Raises:
        SourceError: no scales, or blocks and scales of shapes or dtypes that do not fit.
    """
    name = blocks.name.removesuffix(BLOCKS_SUFFIX)
    if scales is None:
        raise SourceError(f"{where}: MXFP4 tensor {blocks.name!r} has no {name}{SCALES_SUFFIX}")
    if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[-1] != 16:
        raise SourceError(f"{where}: {blocks.name} is {blocks.dtype} {list(blocks.shape)}, expected U8 [experts, rows, groups, 16]")
    if scales.dtype != "U8" or scales.shape != blocks.shape[:-1]:
        raise SourceError(f"{where}: {scales.name} is {scales.dtype} {list(scales.shape)}, expected U8 {list(blocks.shape[:-1])} (one scale per 32 values of {blocks.name})")
    experts, rows, groups, _ = blocks.shape
    shape = (experts, groups * 32, rows)
    return TensorInfo(name, LOGICAL_DTYPE, shape, blocks.start, blocks.start + 2 * math.prod(shape))


def pair(infos: list[TensorInfo], *, where: str) -> dict[str, tuple[TensorInfo, TensorInfo, TensorInfo]]:
    """Each MXFP4 tensor of a checkpoint: logical name -> ``(logical info, blocks, scales)``.

    Raises:
        SourceError: see :func:`logical_info`; or scales without blocks.
    """
    by_name = {i.name: i for i in infos}
    pairs = {}
    for info in infos:
        if info.name.endswith(BLOCKS_SUFFIX):
            scales = by_name.get(info.name.removesuffix(BLOCKS_SUFFIX) + SCALES_SUFFIX)
            logical = logical_info(info, scales, where=where)
            pairs[logical.name] = (logical, info, scales)
        elif info.name.endswith(SCALES_SUFFIX) and info.name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX not in by_name:
            raise SourceError(f"{where}: MXFP4 scales {info.name!r} have no {info.name.removesuffix(SCALES_SUFFIX)}{BLOCKS_SUFFIX}")
    return pairs


def decode(blocks: torch.Tensor, scales: torch.Tensor, *, name: str, first: int = 0) -> torch.Tensor:
    """Whole experts of an MXFP4 tensor, decoded to float32 in the model's layout ``[k, G * 32, R]``.

    Args:
        blocks: uint8 ``[k, R, G, 16]``.
        scales: uint8 ``[k, R, G]``.
        name: the tensor's name, for errors.
        first: the index of the first expert, for errors.

    Raises:
        SourceError: a scale byte of 255 (E8M0 NaN).
    """
    import torch

    if bool((scales == NAN_SCALE).any()):
        expert = first + int((scales == NAN_SCALE).nonzero()[0, 0])
        raise SourceError(f"{name}: MXFP4 scale byte 0xFF (E8M0 NaN) in expert {expert}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    k, rows, groups, _ = blocks.shape
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).reshape(k, rows, groups, 32)
    values = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return values.reshape(k, rows, groups * 32).transpose(1, 2).contiguous()
