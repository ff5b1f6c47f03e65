"""``Linear4bit`` layers that compute the same, right values on every CPU.

bitsandbytes 0.50's native CPU ``dequantize_4bit`` has an AVX-512 branch, chosen by the native library
from the CPU itself (not by torch's ``ATEN_CPU_CAPABILITY``), for weights whose last dimension is a
multiple of 16. It looks up each row's scales as if every row began a new block
(``absmax[row * (n // blocksize) + col // blocksize]``), while bitsandbytes' blocks run over the
flattened weight and span rows when ``n % blocksize != 0``: such weights decode wrong on AVX-512 CPUs
(docs/cpus-and-gpus.md has the report). A single row is decoded right on every CPU. Every
``Linear4bit`` forward on the CPU dequantizes through that kernel (``gemm_4bit``), so a layer with
``in_features % blocksize != 0`` computes garbage there.

:class:`RowDecodeLinear4bit` is a ``Linear4bit`` whose CPU forward decodes its weight as one row of
blocks (the same kernel, the same values as bitsandbytes' 2-D decode where that one is right) and then
computes as bitsandbytes' CPU ``gemm_4bit`` does (``F.linear``); on other devices it is bitsandbytes'
own forward. :func:`exact_on_cpu` gives that class to the layers that need it.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

from .errors import LoadError


def dequantize_run(packed: torch.Tensor, absmax: torch.Tensor, *, n: int, blocksize: int, dtype: torch.dtype, code: torch.Tensor) -> torch.Tensor:
    """The ``n`` values of a run of NF4 blocks (float32 ``absmax``), in ``dtype``, by bitsandbytes'
    ``dequantize_4bit`` given them as one row (right on every CPU).

    Args:
        code: the NF4 code table on ``packed``'s device.
    """
    state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size([n]), dtype=dtype, blocksize=blocksize, quant_type="nf4", code=code)
    return bnb.functional.dequantize_4bit(packed.reshape(-1), quant_state=state).reshape(n)


def block_scales(quant_state: Any) -> torch.Tensor:
    """A weight's float32 block scales: its ``absmax``, or with double quantization the 8-bit scales
    decoded as bitsandbytes' ``gemm_4bit`` decodes them."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    return bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset


def needs_row_decode(layer: Any) -> bool:
    """Whether bitsandbytes' CPU decode may be wrong for this ``Linear4bit``'s weight: its rows are not
    whole blocks (``in_features % blocksize != 0``)."""
    return layer.in_features % layer.weight.quant_state.blocksize != 0


class RowDecodeLinear4bit(bnb.nn.Linear4bit):
    """A ``Linear4bit`` whose CPU forward decodes the weight as one row of blocks (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_state = self.weight.quant_state
        if x.device.type != "cpu" or getattr(quant_state, "packing_format_for_cpu", False):
            return super().forward(x)
        fix_4bit_weight_quant_state_from_module(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = self.bias
        if bias is not None:
            if bias.dtype != x.dtype:
                bias.data = bias.data.to(x.dtype)
            bias = bias.to(self.compute_dtype)
        out_features, in_features = quant_state.shape
        weight = dequantize_run(
            self.weight.data, block_scales(quant_state), n=out_features * in_features, blocksize=quant_state.blocksize, dtype=x.dtype, code=quant_state.code
        ).view(out_features, in_features)
        return torch.nn.functional.linear(x, weight, bias).to(inp_dtype)


def exact_on_cpu(model: torch.nn.Module) -> list[str]:
    """Give :class:`RowDecodeLinear4bit` to every ``Linear4bit`` of ``model`` whose CPU decode may be wrong
    (:func:`needs_row_decode`), with bitsandbytes' AVX512-BF16 path off for them (it fails on those
    shapes). In place; the layers keep their parameters, state dict and ``isinstance(Linear4bit)``.

    Returns:
        The names of the layers changed.
    """
    changed = []
    for name, module in model.named_modules():
        if type(module) is bnb.nn.Linear4bit and getattr(module.weight, "quant_state", None) is not None and needs_row_decode(module):
            module.__class__ = RowDecodeLinear4bit
            module.support_avx512bf16_for_cpu = False
            changed.append(name)
    return changed


def refuse_cpu_layout_off_cpu(module: Any, args: tuple) -> None:
    """A ``Linear4bit`` that bitsandbytes repacked into its AVX512-BF16 CPU layout on a CPU forward, then
    moved with ``.to(device)`` (which keeps that layout; ``.cuda()`` converts it back), computes garbage
    on the device: refuse the forward instead, saying what to do."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.device.type != "cpu" and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise LoadError(
            f"a Linear4bit of this model holds bitsandbytes' AVX512-BF16 CPU layout (it ran on the CPU) on {x.device}: "
            "move the model with model.cuda(), which converts it back, or load it with load_model(device=...)"
        )


def prepare_for_cpu(model: torch.nn.Module) -> list[Any]:
    """Every ``Linear4bit`` of ``model`` on the CPU made to compute right on every CPU: the layers whose rows
    are not whole blocks decode as one row (:func:`exact_on_cpu`), and bitsandbytes' AVX512-BF16 path is
    off for the shapes it fails on (``out_features % 32 != 0`` or ``in_features % blocksize != 0``).

    Returns:
        The CPU layers that keep that path (on a CPU with AVX512-BF16 they repack on their first forward).
    """
    exact_on_cpu(model)
    keeping = []
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            if module.out_features % 32 or module.in_features % module.weight.quant_state.blocksize:
                module.support_avx512bf16_for_cpu = False
            else:
                keeping.append(module)
    return keeping

