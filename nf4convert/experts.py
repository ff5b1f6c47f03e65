"""4-bit MoE experts for transformers 5 models, rebuilt from per-expert NF4 weights without re-quantizing.

transformers 5 fuses an MoE block's experts into 3-D parameters (``gate_up_proj`` ``[E, 2I, H]``,
``down_proj`` ``[E, H, I]``), which bitsandbytes does not quantize. nf4convert stores each expert's
weights as the checkpoint does (``experts.N.gate_proj.weight``, ...), quantized. :class:`PackedExperts`
stands in for one fused parameter: indexing it with an expert gives that expert's slice of the fused
parameter, dequantized on use (spec section 2.5) from its per-expert NF4 weights, so the experts
module's own eager forward (``F.linear(x, self.gate_up_proj[e])``) runs unchanged. Only the experts a
batch routes to are dequantized, one at a time: no full-precision copy of the experts is ever held.
"""

from __future__ import annotations

from typing import Any

import torch

from .quantize import NF4Weight, dequantize


def nf4_weight(param: Any) -> NF4Weight:
    """The :class:`NF4Weight` of a ``bitsandbytes.nn.Params4bit`` (its data and quant state, no copy)."""
    qs = param.quant_state
    nested = qs.nested
    return NF4Weight(
        param.data, qs.absmax, tuple(qs.shape), qs.dtype, qs.blocksize,
        qs.state2.absmax if nested else None, float(qs.offset) if nested else None,
    )  # fmt: skip


class PackedExperts(torch.nn.Module):
    """Per-expert NF4 weights that index like the fused 3-D parameter they replace.

    Args:
        experts: for each expert, its ``Params4bit`` sources in the fused parameter's order
            (e.g. ``[gate, up]`` for ``gate_up_proj``); they are concatenated along dim 0 on use.

    ``self[e]`` is expert ``e``'s 2-D weight in the original dtype, dequantized now.
    """

    def __init__(self, experts: list[list[Any]]) -> None:
        super().__init__()
        self.parts = len(experts[0])
        self.weights = torch.nn.ParameterList([w for row in experts for w in row])

    def __len__(self) -> int:
        return len(self.weights) // self.parts

    def __getitem__(self, expert: int | torch.Tensor) -> torch.Tensor:
        e = int(expert)
        if not 0 <= e < len(self):
            raise IndexError(f"expert {e} out of range ({len(self)} experts)")
        mats = [dequantize(nf4_weight(self.weights[e * self.parts + p])) for p in range(self.parts)]
        return mats[0] if self.parts == 1 else torch.cat(mats, dim=0)

    @property
    def shape(self) -> torch.Size:
        first = self.weights[0].quant_state.shape
        rows = sum(self.weights[p].quant_state.shape[0] for p in range(self.parts))
        return torch.Size((len(self), rows, first[1]))

    def extra_repr(self) -> str:
        return f"experts={len(self)}, shape={tuple(self.shape)}, nf4"


def place_experts(module: torch.nn.Module, name: str, experts: list[list[Any]]) -> None:
    """Put per-expert ``Params4bit`` weights in place of ``module``'s fused parameter ``name``, as
    :class:`PackedExperts`; the module's forward is switched to transformers' eager experts
    implementation, the one that indexes per expert."""
    del module._parameters[name]
    setattr(module, name, PackedExperts(experts))
    if getattr(module, "config", None) is not None:
        module.config._experts_implementation = "eager"
