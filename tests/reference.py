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


def _lane_sums(terms: np.ndarray) -> np.ndarray:
    """Spec section 2.6's sums of float32 ``terms`` ``[blocks, n]``: element i into lane i mod 8, in
    increasing i, from 0; then ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``."""
    lanes = np.zeros((terms.shape[0], 8), dtype=np.float32)
    for group in terms.reshape(terms.shape[0], -1, 8).transpose(1, 0, 2):
        lanes = lanes + group
    l = lanes.T
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))


def reference_search(
    w: torch.Tensor, blocksize: int, absmax_encoding: tuple[torch.Tensor, torch.Tensor], importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 2.6's ``search``, one float32 operation at a time: ``(packed, scales)`` of ``w``
    (flattened), given its ``absmax`` encoding (sections 2.2 to 2.4), which blocks the search does not
    apply to keep. ``importance``: one weight per column of ``w`` (2-D)."""
    from nf4convert.constants import SEARCH_GRID, SEARCH_MIN_SCALE
    from nf4convert.quantize import NF4_THRESHOLDS

    f32 = np.float32
    flat = w.reshape(-1).float().numpy()
    n = flat.size
    blocks = -(-n // blocksize)
    x = np.zeros(blocks * blocksize, dtype=f32)
    x[:n] = flat
    x = x.reshape(blocks, blocksize)  # a partial last block padded with zeros
    weights = np.zeros(blocks * blocksize, dtype=f32)
    weights[:n] = 1 if importance is None else importance.numpy()[np.arange(n) % importance.numel()]
    weights = weights.reshape(blocks, blocksize)
    t, c = NF4_THRESHOLDS.numpy(), np.array(NF4_CODE, dtype=f32)

    def codes(s: np.ndarray) -> np.ndarray:
        v = x * (f32(1) / s)[:, None]
        return (t[None, None, :] < v[:, :, None]).sum(-1)

    m = np.abs(x).max(1)
    searched = np.isfinite(m) & (m >= f32(SEARCH_MIN_SCALE))
    best = np.full(blocks, -1, dtype=f32)
    best_a, best_d = np.zeros(blocks, dtype=f32), np.ones(blocks, dtype=f32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for factor in SEARCH_GRID:
            level = c[codes(m * f32(factor))]
            a = _lane_sums((weights * x) * level)
            d = _lane_sums(weights * (level * level))
            score = np.where((a > 0) & (d > 0), (a * a) / d, f32(-1))
            take = score > best
            best, best_a, best_d = np.where(take, score, best), np.where(take, a, best_a), np.where(take, d, best_d)
        r = best_a / best_d
    searched &= (best > 0) & (r >= f32(SEARCH_MIN_SCALE)) & np.isfinite(r)
    q = codes(np.where(searched, r, f32(1))).reshape(-1)[:n]
    q = np.concatenate([q, [7]]) if n % 2 else q
    packed = (q[0::2] << 4 | q[1::2]).astype(np.uint8)
    old_packed, old_scales = (a.reshape(-1).numpy() for a in absmax_encoding)
    keep = np.repeat(~searched, blocksize // 2)[: packed.size]
    packed = np.where(keep, old_packed, packed)
    scales = np.where(searched, r, old_scales).astype(f32)
    return torch.from_numpy(packed).unsqueeze(1), torch.from_numpy(scales)
