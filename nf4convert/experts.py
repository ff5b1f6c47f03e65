"""4-bit MoE experts for transformers 5 models, rebuilt from NF4 weights without re-quantizing.

transformers 5 fuses an MoE block's experts into 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``), which bitsandbytes does not quantize. A checkpoint stores them either per
expert (``experts.N.gate_proj.weight``, ...), which nf4convert quantizes one weight at a time, or fused
as 3-D tensors, which nf4convert quantizes whole with each expert's slice a run of whole blocks (spec
section 2.7). Both stand in for the fused parameter here: indexing gives that expert's 2-D slice,
dequantized on use (spec section 2.5), so the experts module's own eager forward
(``F.linear(x, self.gate_up_proj[e])``) runs unchanged. Only the experts a batch routes to are
dequantized, one at a time: no full-precision copy of the experts is ever held.

- :class:`PackedExperts`: per-expert ``Params4bit`` weights.
- :class:`FusedExperts`: one 3-D NF4 tensor (the layout ``bitsandbytes.nn.parametrize`` writes and
  reads for a quantized ``nn.Parameter``); an expert is picked with tensor indexing on the device and
  its tables live there too, so indexing never waits for the device.

Both dequantize with bitsandbytes' ``dequantize_4bit`` (its native kernels: on the CPU here ~17x
faster than torch ops), given each expert as one row of blocks: bitsandbytes 0.50's CPU kernel is wrong
for 2-D shapes whose last dimension is not whole blocks on AVX-512 CPUs, and right for a single row on
every CPU. The values are those of spec section 2.5 (the tests compare them with :func:`dequantize`).
"""

from __future__ import annotations

import math
from typing import Any

import bitsandbytes as bnb
import torch

from .constants import DYNAMIC_MAP, NF4_CODE
from .quantize import NF4Weight, dequantize_absmax


def nf4_weight(param: Any) -> NF4Weight:
    """The :class:`NF4Weight` of a ``bitsandbytes.nn.Params4bit`` (its data and quant state, no copy)."""
    qs = param.quant_state
    nested = qs.nested
    return NF4Weight(
        param.data, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize,
        qs.state2.absmax if nested else None, float(qs.offset) if nested else None,
    )  # fmt: skip


def dequantize_run(packed: torch.Tensor, absmax: torch.Tensor, *, n: int, blocksize: int, dtype: torch.dtype, code: torch.Tensor) -> torch.Tensor:
    """The ``n`` values of a run of NF4 blocks (float32 ``absmax``), in ``dtype``, by bitsandbytes'
    ``dequantize_4bit`` given them as one row.

    Args:
        code: the NF4 code table on ``packed``'s device.
    """
    state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size([n]), dtype=dtype, blocksize=blocksize, quant_type="nf4", code=code)
    return bnb.functional.dequantize_4bit(packed.reshape(-1), quant_state=state).reshape(n)


def _dequantize_param(param: Any, dtype: torch.dtype) -> torch.Tensor:
    """A ``Params4bit``'s weight in ``dtype`` (see :func:`dequantize_run`)."""
    q = nf4_weight(param)
    absmax = dequantize_absmax(q.absmax, q.nested_absmax, q.offset) if q.nested else q.absmax
    n = math.prod(q.shape)
    return dequantize_run(q.packed, absmax, n=n, blocksize=q.blocksize, dtype=dtype, code=param.quant_state.code).view(q.shape)


class PackedExperts(torch.nn.Module):
    """Per-expert NF4 weights that index like the fused 3-D parameter they replace.

    Args:
        experts: for each expert, its ``Params4bit`` sources in the fused parameter's order
            (e.g. ``[gate, up]`` for ``gate_up_proj``); they are concatenated along dim 0 on use.
        dtype: the dtype an expert's weight is given in (the replaced parameter's).

    ``self[e]`` is expert ``e``'s 2-D weight, dequantized now.
    """

    def __init__(self, experts: list[list[Any]], dtype: torch.dtype) -> None:
        super().__init__()
        self.parts = len(experts[0])
        self.dtype = dtype
        self.weights = torch.nn.ParameterList([w for row in experts for w in row])

    def __len__(self) -> int:
        return len(self.weights) // self.parts

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        e = int(expert)
        if not 0 <= e < len(self):
            raise IndexError(f"expert {e} out of range ({len(self)} experts)")
        mats = [_dequantize_param(self.weights[e * self.parts + p], self.dtype) for p in range(self.parts)]
        return mats[0] if self.parts == 1 else torch.cat(mats, dim=0)

    @property
    def shape(self) -> torch.Size:
        first = self.weights[0].quant_state.shape
        rows = sum(self.weights[p].quant_state.shape[0] for p in range(self.parts))
        return torch.Size((len(self), rows, first[1]))

    def extra_repr(self) -> str:
        return f"experts={len(self)}, shape={tuple(self.shape)}, nf4"


class FusedExperts(torch.nn.Module):
    """A 3-D NF4 tensor ``[E, a, b]`` (each expert's slice whole blocks) that indexes like the fused
    parameter it replaces.

    Args:
        packed: the packed codes, uint8 with ``E * a * b / 2`` elements.
        quant_state: its ``bitsandbytes.functional.QuantState`` (shape ``[E, a, b]``, absmax, nesting).
        dtype: the dtype an expert's weight is given in (the replaced parameter's).

    ``self[e]`` (an int or a one-element integer tensor) is expert ``e``'s 2-D weight, dequantized now.
    """

    def __init__(self, packed: torch.Tensor, quant_state: Any, *, dtype: torch.dtype) -> None:
        super().__init__()
        experts, rows, cols = quant_state.shape
        device = packed.device
        self.stored = (rows, cols)
        self.blocksize = quant_state.blocksize
        self.dtype = dtype
        self.nested = quant_state.nested
        self.blocks_per_expert = rows * cols // self.blocksize
        self.register_buffer("packed", packed.reshape(experts, -1))
        self.register_buffer("absmax", quant_state.absmax.reshape(experts, -1))
        self.register_buffer("nf4", torch.tensor(NF4_CODE, dtype=torch.float32, device=device))
        if self.nested:
            self.register_buffer("nested_absmax", quant_state.state2.absmax)
            self.register_buffer("offset", torch.as_tensor(quant_state.offset, dtype=torch.float32).to(device))
            self.register_buffer("dynamic", torch.tensor(DYNAMIC_MAP, dtype=torch.float32, device=device))

    def __len__(self) -> int:
        return self.packed.shape[0]

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        if isinstance(expert, torch.Tensor):
            index = expert.reshape(1).to(self.packed.device)
        else:
            if not 0 <= expert < len(self):
                raise IndexError(f"expert {expert} out of range ({len(self)} experts)")
            index = torch.tensor([expert], device=self.packed.device)
        absmax = self.absmax.index_select(0, index)[0]
        if self.nested:
            absmax = dequantize_absmax(absmax, self.nested_absmax, self.offset, first=index * self.blocks_per_expert, table=self.dynamic)
        n = math.prod(self.stored)
        weight = dequantize_run(self.packed.index_select(0, index)[0], absmax, n=n, blocksize=self.blocksize, dtype=self.dtype, code=self.nf4)
        return weight.view(self.stored)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.stored))

    def extra_repr(self) -> str:
        return f"experts={len(self)}, shape={tuple(self.shape)}, nf4, fused"


def place_experts(module: torch.nn.Module, name: str, experts: PackedExperts | FusedExperts) -> None:
    """Put 4-bit ``experts`` in place of ``module``'s fused parameter ``name``; the module's forward is
    switched to transformers' eager experts implementation, the one that indexes per expert."""
    del module._parameters[name]
    setattr(module, name, experts)
    if getattr(module, "config", None) is not None:
        module.config._experts_implementation = "eager"
