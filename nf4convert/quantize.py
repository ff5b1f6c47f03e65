"""NF4 quantization and dequantization: the math of spec/FORMAT.md, sections 2 and 3.

Pure functions on tensors. The 4-bit codes and first-level absmax are bit-identical
to ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``; the second
level (double quantization) follows the spec's deterministic definition.

Two kernels compute the same codes for full blocks: ``"native"`` (``kernel.c``, built at
first use by :mod:`nf4convert.native`; AVX2 where the CPU has it) and ``"eager"`` (plain torch,
on any device). ``"auto"`` picks native on the CPU when a C compiler is available, else eager.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from . import arrays
from .constants import ABSMAX_FLOOR, CODE_TABLES, NESTED_BLOCKSIZE, NF4_CODE, SCALE_METHODS
from .errors import QuantizationError
from .kernels import resolve_kernel
from .layout import check_blocksize

_NF4 = torch.from_numpy(arrays.NF4_TABLE)
_CODES = {quant_type: torch.tensor(code, dtype=torch.float32) for quant_type, code in CODE_TABLES.items()}
#: Each packed byte's two values, first the high nibble's: ``byte -> (code[byte >> 4], code[byte & 15])``.
_PAIRS = {quant_type: torch.stack((code.repeat_interleave(16), code.repeat(16)), dim=1) for quant_type, code in _CODES.items()}
_DYNAMIC = torch.from_numpy(arrays.DYNAMIC_TABLE)
#: Decision thresholds (:func:`nf4convert.arrays.thresholds`), shared with the native kernel's.
NF4_THRESHOLDS = torch.from_numpy(arrays.NF4_THRESHOLDS)
_DYNAMIC_THRESHOLDS = torch.from_numpy(arrays.DYNAMIC_THRESHOLDS)
_TORCH_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def raw(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU float tensor's elements as the native kernel takes them: its raw bytes (flat, contiguous;
    no copy where it already is) and its dtype's name."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy(), _TORCH_NAMES[t.dtype]


@dataclass(frozen=True)
class NF4Weight:
    """One weight in NF4, as the format stores it.

    Attributes:
        packed: uint8 ``[(n + 1) // 2, 1]``, two codes a byte, the first in the high nibble.
        absmax: float32 ``[n_blocks]``, or uint8 when ``nested`` (double quantization).
        shape: the original weight's shape (for GPT-2 ``Conv1D``, the transposed one).
        dtype: the original weight's dtype.
        blocksize: elements per absmax.
        nested_absmax: float32 ``[ceil(n_blocks / 256)]`` when nested, else ``None``.
        offset: float32 value added back to the dequantized absmax when nested, else ``None``.
        quant_type: ``"nf4"``, or ``"fp4"`` (read from a bitsandbytes folder: only dequantized).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    offset: float | None = None
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def _scale(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Full blocks: ``clamp(x * (1 / max(absmax, floor)), -1, 1)`` in float32."""
    return (x * (1.0 / absmax.clamp(min=ABSMAX_FLOOR))).clamp(-1, 1)


def _codes_bucketize(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager kernel: codes through ``torch.bucketize`` (ties go to the lower code), and the absmax."""
    x = blocks.float()
    absmax = x.abs().amax(dim=1, keepdim=True)
    codes = torch.bucketize(_scale(x, absmax), NF4_THRESHOLDS.to(x.device), out_int32=True)
    return codes.to(torch.uint8), absmax.squeeze(1)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4(
    weight: torch.Tensor, *, blocksize: int = 64, kernel: str = "auto", name: str = "tensor", first: int = 0, scales: str = "absmax",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to packed NF4 codes and float32 absmax (spec section 2).

    Blocks are independent, so a weight may be quantized in pieces of whole blocks and the results
    concatenated: the bytes are those of the whole.

    Args:
        weight: float32, float16 or bfloat16 tensor of any shape (flattened row-major).
        blocksize: elements per block, one of :data:`~nf4convert.constants.BLOCKSIZES`.
        kernel: ``"auto"``, ``"native"`` or ``"eager"``; all give the same bytes.
        name: used in error messages.
        first: the index of ``weight``'s first element in the tensor ``name`` (a piece's place), for error messages.
        scales: ``"absmax"`` (bitsandbytes' rule, the default) or ``"search"`` (spec section 2.6: per block,
            the candidate scale of least squared error, in the native kernel only).
        importance: with ``"search"``, float32 ``[columns]``: the error of element ``first + i`` counts
            ``importance[(first + i) % columns]`` times (section 2.6's weighted search; the mean squared
            input activation of each column, from calibration text).

    Returns:
        ``(packed, absmax)``: uint8 ``[(n + 1) // 2, 1]`` and float32 ``[ceil(n / blocksize)]``,
        with ``scales="absmax"`` equal to ``bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
        quant_type="nf4")``; with ``"search"``, the searched scales and their codes.

    Raises:
        QuantizationError: bad blocksize or dtype, an empty tensor, or NaN/Inf in the weight.

    Example:
        >>> packed, absmax = quantize_nf4(torch.randn(128, 64))
        >>> packed.shape, absmax.shape
        (torch.Size([4096, 1]), torch.Size([128]))
    """
    check_blocksize(blocksize)
    kernel = resolve_kernel(kernel, weight.device)
    if scales not in SCALE_METHODS:
        raise QuantizationError(f"unknown scale method {scales!r}; choose {' or '.join(SCALE_METHODS)}")
    if scales == "search" and kernel != "native":
        raise QuantizationError("--scales search runs in the native kernel only (the CPU, with a C compiler)")
    if importance is not None and scales != "search":
        raise QuantizationError("importance weights only apply to --scales search")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QuantizationError(f"{name}: cannot quantize dtype {weight.dtype}")
    flat = weight.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise QuantizationError(f"{name}: cannot quantize an empty tensor")
    if kernel == "native":
        values, dtype = raw(flat)
        imp = importance.detach() if importance is not None else None
        packed, absmax = arrays.quantize(values, dtype, blocksize, name=name, first=first, search=scales == "search", importance=imp)
        return torch.from_numpy(packed).unsqueeze(1), torch.from_numpy(absmax)
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    codes, absmax[: full // blocksize] = _codes_bucketize(flat[:full].view(-1, blocksize))
    packed[: full // 2] = _pack(codes)
    if full < n:
        tail = flat[full:].float()
        absmax[-1] = tail.abs().max().clamp(min=ABSMAX_FLOOR)
        codes = torch.bucketize((tail / absmax[-1]).clamp(-1, 1), NF4_THRESHOLDS.to(tail.device), out_int32=True)
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_full((1,), NF4_CODE.index(0.0))])
        packed[full // 2 :] = _pack(codes.to(torch.uint8))
    arrays.check_finite(absmax.cpu().numpy(), name=name, first=first, n=n, blocksize=blocksize)
    return packed.unsqueeze(1), absmax


def encode_nf4(weight: torch.Tensor, scales: torch.Tensor, *, blocksize: int = 64) -> torch.Tensor:
    """Packed NF4 codes of ``weight`` for given per-block ``scales`` (spec section 2.6: with ``--scales
    search`` and double quantization, the codes for the scales a loader will use), native kernel.

    Returns:
        uint8 ``[(n + 1) // 2, 1]``.
    """
    from . import native

    values, dtype = raw(weight)
    return torch.from_numpy(native.encode_blocks(values, dtype, blocksize, arrays.NF4_THRESHOLDS, scales.float().contiguous().numpy())).unsqueeze(1)


def exponent_sums(values: torch.Tensor) -> list[int]:
    """Significands of non-negative finite float32 values summed by biased exponent (256 sums).

    With the implicit bit for normal numbers, the exact sum of the values is
    ``sum(sums[e] << max(e, 1)) / 2**150``.
    """
    bits = values.detach().reshape(-1).cpu().contiguous().view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    mantissa = torch.where(exponent > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
    return torch.zeros(256, dtype=torch.int64).scatter_add_(0, exponent, mantissa).tolist()


def exact_mean(values: torch.Tensor, kernel: str = "eager") -> float:
    """The exact mean of non-negative finite float32 values, rounded to float64 then to float32.

    Computed in integer arithmetic, so it does not depend on thread count, order, device or kernel.
    """
    if kernel == "native":
        return arrays.exact_mean(values.detach().cpu().numpy())
    return arrays.mean_of_sums(exponent_sums(values), values.numel())


def double_quantize(absmax: torch.Tensor, kernel: str = "eager", offset: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Quantize first-level absmax to 8 bits (spec section 3); every kernel gives the same result.
    ``offset``: subtracted before (default: the exact mean of ``absmax``; any float is a valid one, and
    ``--scales search`` takes the mean of a weight's first nested block, spec section 2.6).

    Returns:
        ``(quantized, nested_absmax, offset)``: uint8 ``[n]``, float32 ``[ceil(n / 256)]``, and the offset.
    """
    if kernel == "native":
        quantized, nested, offset = arrays.double_quantize(absmax.detach().cpu().numpy(), offset)
        return torch.from_numpy(quantized), torch.from_numpy(nested), offset
    offset = exact_mean(absmax, kernel) if offset is None else offset
    v = absmax - torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    n = v.numel()
    full = n - n % NESTED_BLOCKSIZE
    blocks = v[:full].view(-1, NESTED_BLOCKSIZE)
    nested = blocks.abs().amax(dim=1)
    scaled = [_scale(blocks, nested.unsqueeze(1)).reshape(-1)]
    if full < n:
        tail_absmax = v[full:].abs().max().clamp(min=ABSMAX_FLOOR)
        scaled.append((v[full:] / tail_absmax).clamp(-1, 1))
        nested = torch.cat([nested, tail_absmax.reshape(1)])
    codes = torch.bucketize(torch.cat(scaled), _DYNAMIC_THRESHOLDS.to(v.device), out_int32=True)
    return codes.to(torch.uint8), nested, offset


def dequantize_absmax(
    quantized: torch.Tensor, nested_absmax: torch.Tensor, offset: float | torch.Tensor, *, first: int | torch.Tensor = 0, table: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 absmax of blocks ``first, first + 1, ...`` from their double-quantized form:
    ``dyn[q[i]] * nested_absmax[(first + i) // 256] + offset``.

    Args:
        first: the index of ``quantized[0]`` among the weight's blocks (a tensor stays on its device).
        table: the 8-bit code table on ``quantized``'s device (default: copied there).
    """
    table = _DYNAMIC.to(quantized.device) if table is None else table
    index = (torch.arange(quantized.numel(), device=quantized.device) + first) // NESTED_BLOCKSIZE
    values = table[quantized.long()] * nested_absmax[index]
    return values + (offset if isinstance(offset, torch.Tensor) else torch.tensor(offset, dtype=torch.float32, device=quantized.device))


def quantize_weight(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, kernel: str = "auto", name: str = "tensor"
) -> NF4Weight:
    """Quantize one weight into the full NF4 representation the format stores.

    Raises:
        QuantizationError: as :func:`quantize_nf4`.
    """
    kernel = resolve_kernel(kernel, weight.device)
    packed, absmax = quantize_nf4(weight, blocksize=blocksize, kernel=kernel, name=name)
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype, blocksize)
    quantized, nested, offset = double_quantize(absmax, kernel)
    return NF4Weight(packed, quantized, tuple(weight.shape), weight.dtype, blocksize, nested, offset)


#: Elements dequantized at a time (whole blocks): temporaries of a few MB whatever the weight's size.
DEQUANTIZE_CHUNK = 1 << 20


def dequantize_chunks(q: NF4Weight) -> Iterator[torch.Tensor]:
    """The weight rebuilt (spec section 2.5), flat and in order, as float32 chunks of whole blocks (at
    most :data:`DEQUANTIZE_CHUNK` elements): ``NF4[code] * absmax[block]`` (``FP4[code]`` for an FP4
    weight of a bitsandbytes folder). Each packed byte is looked up as its two values at once."""
    absmax = dequantize_absmax(q.absmax, q.nested_absmax, q.offset) if q.nested else q.absmax
    n, bs = math.prod(q.shape), q.blocksize
    packed = q.packed.reshape(-1)
    pairs = _PAIRS[q.quant_type].to(packed.device)
    step = max(bs, DEQUANTIZE_CHUNK // bs * bs)
    for at in range(0, n, step):
        count = min(step, n - at)
        values = torch.index_select(pairs, 0, packed[at // 2 : (at + count + 1) // 2].int()).reshape(-1)[:count]
        scale, full = absmax[at // bs : -(-(at + count) // bs)], count - count % bs
        chunk = torch.empty(count, dtype=torch.float32, device=packed.device)
        torch.mul(values[:full].view(-1, bs), scale[: full // bs].unsqueeze(1), out=chunk[:full].view(-1, bs))
        torch.mul(values[full:], scale[full // bs :], out=chunk[full:])  # the last block, where it is partial
        yield chunk


def dequantize(q: NF4Weight) -> torch.Tensor:
    """Rebuild the weight (spec section 2.5): ``NF4[code] * absmax[block]`` in float32, cast to ``q.dtype``
    (``FP4[code]`` for an FP4 weight of a bitsandbytes folder), a chunk at a time into the result."""
    weight = torch.empty(math.prod(q.shape), dtype=q.dtype, device=q.packed.device)
    at = 0
    for chunk in dequantize_chunks(q):
        weight[at : at + chunk.numel()] = chunk
        at += chunk.numel()
    return weight.reshape(q.shape)
