"""The spec's definitions written out in numpy, independent of torch and of the CPU: what tests compare
against wherever a peer's answer depends on the CPU it runs on."""

from __future__ import annotations

import numpy as np
import torch

from nf4convert.constants import NF4_CODE


def _round_to_dtype(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> ``dtype``, round to nearest even, subnormals kept (bfloat16 by integer arithmetic)."""
    if dtype == torch.bfloat16:
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return torch.from_numpy(rounded.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values.astype({torch.float16: np.float16, torch.float32: np.float32}[dtype]))


def reference_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, blocksize: int) -> torch.Tensor:
    """Spec section 2.5: ``w[j] = cast_dtype(fl32(c[code[j]] * absmax[j // bs]))`` (float32 ``absmax``)."""
    n = int(np.prod(shape))
    data = packed.reshape(-1).numpy()
    codes = np.empty(2 * data.size, dtype=np.int64)
    codes[0::2], codes[1::2] = data >> 4, data & 0xF
    table = np.array(NF4_CODE, dtype=np.float32)
    scale = np.repeat(absmax.numpy().astype(np.float32), blocksize)
    values = np.multiply(table[codes[:n]], scale[:n], dtype=np.float32)
    return _round_to_dtype(values, dtype).reshape(shape)
