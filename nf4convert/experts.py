"""4-bit MoE experts for transformers 5 models, rebuilt from NF4 weights without re-quantizing.

transformers 5 fuses an MoE block's experts into 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``), which bitsandbytes does not quantize. A checkpoint stores them either per
expert (``experts.N.gate_proj.weight``, ...), which nf4convert quantizes one weight at a time, or fused
as 3-D tensors, which nf4convert quantizes whole with each expert's slice a run of whole blocks (spec
section 2.7). Both stand in for the fused parameter here: indexing gives that expert's 2-D slice,
dequantized on use (spec section 2.5), so the experts module's own eager forward
(``F.linear(x, self.gate_up_proj[e])``) runs unchanged. Only the experts a batch routes to are
dequantized, one at a time: no full-precision copy of the experts is ever held.

:class:`NF4Experts` is built from per-expert ``Params4bit`` weights (their bytes stacked, one row per
expert) or from one 3-D NF4 tensor (the layout ``bitsandbytes.nn.parametrize`` writes and reads for a
quantized ``nn.Parameter``). An expert is picked with tensor indexing on the device and the tables live
there too, so indexing never waits for the device. It dequantizes with bitsandbytes' ``dequantize_4bit`` (its native kernels: on the CPU here ~17x
faster than torch ops), given each expert as one row of blocks: bitsandbytes 0.50's CPU kernel is wrong
for 2-D shapes whose last dimension is not whole blocks on AVX-512 CPUs, and right for a single row on
every CPU. The values are those of spec section 2.5 (the tests compare them with :func:`dequantize`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .constants import DYNAMIC_MAP, NF4_CODE
from .errors import LoadError
from .quantize import NF4Weight, dequantize_absmax
from .rowdecode import dequantize_run


def nf4_weight(param: Any) -> NF4Weight:
    """The :class:`NF4Weight` of a ``bitsandbytes.nn.Params4bit`` (its data and quant state, no copy)."""
    qs = param.quant_state
    nested = qs.nested
    return NF4Weight(
        param.data, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize,
        qs.state2.absmax if nested else None, float(qs.offset) if nested else None,
    )  # fmt: skip


class ExpertBlocks(torch.nn.Module):
    """One source of an experts parameter (``gate_up_proj`` whole, or its ``gate`` part) for every expert:
    each expert's ``[rows, cols]`` matrix a run of whole blocks, one row of ``packed`` and ``absmax``.

    With double quantization the 8-bit scales are either per expert (``nested`` ``[E, k]``, ``offset``
    ``[E]``: per-expert checkpoint weights, each quantized on its own) or shared (``nested`` ``[k]``,
    ``offset`` ``[]``: one fused tensor, whose nested blocks run across experts).
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], blocksize: int,
                 nested: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.shape = shape
        self.blocksize = blocksize
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("nested", nested)
        self.register_buffer("offset", offset)

    def absmax_of(self, index: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
        """The float32 scales of expert ``index`` (a one-element tensor on the device)."""
        absmax = self.absmax.index_select(0, index)[0]
        if self.nested is None:
            return absmax
        if self.offset.dim() == 0:  # shared: the expert's blocks sit at their place in the whole tensor
            return dequantize_absmax(absmax, self.nested, self.offset, first=index * absmax.numel(), table=dynamic)
        return dequantize_absmax(absmax, self.nested.index_select(0, index)[0], self.offset.index_select(0, index)[0], table=dynamic)


class NF4Experts(torch.nn.Module):
    """NF4 experts that index like the fused 3-D parameter they replace: ``self[e]`` (an int or a
    one-element integer tensor) is expert ``e``'s 2-D weight in ``dtype``, dequantized now, its sources
    concatenated along dim 0 (``[gate; up]`` for ``gate_up_proj``). Built by :meth:`from_per_expert` or
    :meth:`from_fused`; every tensor lives on the weights' device, so indexing never waits for it."""

    def __init__(self, parts: list[ExpertBlocks], *, dtype: torch.dtype, fused: bool) -> None:
        super().__init__()
        device = parts[0].packed.device
        self.parts = torch.nn.ModuleList(parts)
        self.dtype = dtype
        self.fused = fused
        self.register_buffer("nf4", torch.tensor(NF4_CODE, dtype=torch.float32, device=device))
        self.register_buffer("dynamic", torch.tensor(DYNAMIC_MAP, dtype=torch.float32, device=device))

    @classmethod
    def from_per_expert(cls, experts: list[list[Any]], dtype: torch.dtype) -> NF4Experts:
        """From per-expert ``Params4bit`` weights: for each expert, its sources in the parameter's order.

        Raises:
            LoadError: the experts of one source differ in shape, block size or nesting.
        """
        parts = []
        for p, column in enumerate(zip(*experts)):
            states = [w.quant_state for w in column]
            if len({(tuple(s.shape), s.blocksize, s.nested) for s in states}) != 1:
                raise LoadError(f"the experts' 4-bit weights (source {p}) differ in shape, block size or double quantization")
            first = states[0]
            nested = torch.stack([s.state2.absmax for s in states]) if first.nested else None
            offset = torch.stack([torch.as_tensor(s.offset, dtype=torch.float32).to(column[0].device).reshape(()) for s in states]) if first.nested else None
            packed = torch.stack([w.data.reshape(-1) for w in column])
            parts.append(ExpertBlocks(packed, torch.stack([s.absmax for s in states]), tuple(first.shape), first.blocksize, nested, offset))
        return cls(parts, dtype=dtype, fused=False)

    @classmethod
    def from_fused(cls, packed: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> NF4Experts:
        """From one 3-D NF4 tensor ``[E, a, b]`` (each expert whole blocks) and its bitsandbytes ``QuantState``."""
        experts, rows, cols = quant_state.shape
        nested = quant_state.state2.absmax if quant_state.nested else None
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32).to(packed.device).reshape(()) if quant_state.nested else None
        part = ExpertBlocks(packed.reshape(experts, -1), quant_state.absmax.reshape(experts, -1), (rows, cols), quant_state.blocksize, nested, offset)
        return cls([part], dtype=dtype, fused=True)

    def __len__(self) -> int:
        return self.parts[0].packed.shape[0]

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        device = self.nf4.device
        if isinstance(expert, torch.Tensor):
            index = expert.reshape(1).to(device)
        else:
            if not 0 <= expert < len(self):
                raise IndexError(f"expert {expert} out of range ({len(self)} experts)")
            index = torch.tensor([expert], device=device)
        mats = []
        for part in self.parts:
            n = math.prod(part.shape)
            values = dequantize_run(part.packed.index_select(0, index)[0], part.absmax_of(index, self.dynamic), n=n, blocksize=part.blocksize, dtype=self.dtype, code=self.nf4)
            mats.append(values.view(part.shape))
        return mats[0] if len(mats) == 1 else torch.cat(mats, dim=0)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]))

    def extra_repr(self) -> str:
        return f"experts={len(self)}, shape={tuple(self.shape)}, nf4, {'fused' if self.fused else 'per expert'}"


def place_experts(module: torch.nn.Module, name: str, experts: NF4Experts) -> None:
    """Put 4-bit ``experts`` in place of ``module``'s fused parameter ``name``; the module's forward is
    switched to transformers' eager experts implementation, the one that indexes per expert."""
    del module._parameters[name]
    setattr(module, name, experts)
    if getattr(module, "config", None) is not None:
        module.config._experts_implementation = "eager"
