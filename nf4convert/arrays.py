"""NF4 of raw numpy arrays through the native kernel (spec sections 2 and 3), without torch.

The default conversion (a CPU with a C compiler, absmax or searched scales) reads each piece of a
weight as raw bytes and quantizes them here, so it never imports torch (about a second of start-up).
:mod:`nf4convert.quantize` wraps the same functions for torch tensors; its eager kernel is the
independent torch implementation of the same rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import native
from .constants import ABSMAX_FLOOR, DTYPE_SIZES, DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4_CODE
from .errors import QuantizationError

NF4_TABLE = np.array(NF4_CODE, dtype=np.float32)
DYNAMIC_TABLE = np.array(DYNAMIC_MAP, dtype=np.float32)


def thresholds(code: np.ndarray) -> np.ndarray:
    """Decision thresholds of a sorted float32 code table: the float32 midpoints ``(c[i] + c[i+1]) / 2``."""
    return (code[:-1] + code[1:]) / np.float32(2)


NF4_THRESHOLDS = thresholds(NF4_TABLE)
DYNAMIC_THRESHOLDS = thresholds(DYNAMIC_TABLE)
#: The code of 0.0: pads the last byte of a tensor with an odd number of elements.
_ZERO_CODE = NF4_CODE.index(0.0)


def as_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values (exact) of raw elements of ``dtype`` (``"F32"``, ``"F16"`` or ``"BF16"``), flat."""
    raw = values.reshape(-1).view(np.uint8)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16 if dtype == "F16" else np.float32).astype(np.float32)


def check_finite(absmax: np.ndarray, *, name: str, first: int, n: int, blocksize: int) -> None:
    """Refuse a weight whose block scales are not finite (the weight holds NaN or Inf).

    Raises:
        QuantizationError: naming the first such block's elements (``first``: the piece's place).
    """
    bad = ~np.isfinite(absmax)
    if bad.any():
        block = int(np.argmax(bad))
        raise QuantizationError(f"{name}: contains NaN or Inf (first in elements {first + block * blocksize}..{first + min(n, (block + 1) * blocksize) - 1})")


def quantize(
    values: np.ndarray, dtype: str, blocksize: int, *, name: str = "tensor", first: int = 0, search: bool = False, importance: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Packed NF4 codes (uint8 ``[(n + 1) // 2]``) and float32 absmax (``[ceil(n / blocksize)]``) of
    ``values``, the raw bytes (C-contiguous) of ``n`` elements of ``dtype``, in the native kernel;
    the bytes of :func:`nf4convert.quantize.quantize_nf4` (its arguments mean the same; ``search``:
    ``scales="search"``; ``importance``: any array of one weight per column, a CPU tensor too). The
    caller has checked ``blocksize`` and that the kernel is available.

    Raises:
        QuantizationError: NaN or Inf in the values.
    """
    raw = values.reshape(-1).view(np.uint8)
    size = DTYPE_SIZES[dtype]
    n = raw.size // size
    full = n - n % blocksize
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)
    if not search:
        native.quantize_blocks(raw[: full * size], dtype, blocksize, NF4_THRESHOLDS, packed[: full // 2], absmax[: full // blocksize])
    if full < n:  # a partial last block: its own absmax, divided by (not multiplied by the inverse)
        tail = as_float32(raw[full * size :], dtype)
        absmax[-1] = np.maximum(np.abs(tail).max(), np.float32(ABSMAX_FLOOR))
        codes = np.searchsorted(NF4_THRESHOLDS, np.clip(tail / absmax[-1], -1, 1), side="left").astype(np.uint8)
        if codes.size % 2:
            codes = np.append(codes, np.uint8(_ZERO_CODE))
        packed[full // 2 :] = (codes[0::2] << 4) | codes[1::2]
    if search:
        weights = np.ascontiguousarray(importance, dtype=np.float32) if importance is not None else None
        native.search_blocks(raw, dtype, blocksize, NF4_THRESHOLDS, NF4_TABLE, absmax, packed, weights, first)
    check_finite(absmax, name=name, first=first, n=n, blocksize=blocksize)
    return packed, absmax


def dequantize_absmax(quantized: np.ndarray, nested: np.ndarray, offset: float) -> np.ndarray:
    """float32 block scales from their double-quantized form (spec section 3), the numpy form of
    :func:`nf4convert.quantize.dequantize_absmax`: ``DYNAMIC[q[i]] * nested[i // 256] + offset``."""
    return DYNAMIC_TABLE[quantized] * np.repeat(nested, NESTED_BLOCKSIZE)[: quantized.size] + np.float32(offset)


def mean_of_sums(sums: list[int], count: int) -> float:
    """The exact mean of ``count`` float32 values from their :func:`nf4convert.native.exponent_sums`,
    rounded to float64 then to float32."""
    total = sum(s << max(e, 1) for e, s in enumerate(sums) if s)
    return float(np.float32(total / (count << 150)))


def exact_mean(values: np.ndarray) -> float:
    """:func:`mean_of_sums` of non-negative finite float32 values, summed in the native kernel."""
    return mean_of_sums(native.exponent_sums(values), values.size)


def double_quantize(absmax: np.ndarray, offset: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Quantize float32 absmax to 8 bits (spec section 3) in the native kernel; ``offset``: subtracted
    first (default: the exact mean of ``absmax``).

    Returns:
        ``(quantized, nested_absmax, offset)``: uint8 ``[n]``, float32 ``[ceil(n / 256)]``, the offset.
    """
    offset = exact_mean(absmax) if offset is None else offset
    return (*native.quantize_nested(absmax, offset, DYNAMIC_THRESHOLDS, NESTED_BLOCKSIZE), offset)
