"""A size budget (``--bits B``): the modules whose quantization costs the most per extra bit stay in
their dtype, until the weights that would be quantized average ``B`` bits per parameter.

Each quantized weight's cost is its relative quantization error, measured on the weight itself with
the conversion's own encoder (``--scales``, ``--importance``): ``Σ v (W - Ŵ)² / Σ v W²``, each element
weighed by its input column's importance ``v`` where there are vectors (then it is the noise that
quantizing adds to the layer's output, as a share of that output's energy), else 1. The share, not
the absolute error: activations grow along the residual stream, so absolute errors would always point
at the last layers, and a share is what a normalized stream sees. Keeping a weight costs
``numel * (dtype bits - its NF4 bits)``. Modules go in groups a
loader fuses into one matrix (q/k/v, gate/up, ...; all experts of an MoE layer), so that every loader's
skip rule holds, and they are taken greedily, highest error per extra bit first; a group that does not
fit is passed over for smaller ones. The chosen modules join ``--skip`` (so ``llm_int8_skip_modules``
lists them exactly), and the manifest records the budget (``options.budget``).

Bits can also buy smaller blocks: blocksize 32 (the smallest bitsandbytes reads) costs 0.127 bit a
parameter over 64 with double quantization and lowers every weight's error. Where the options'
blocksize is larger and the budget affords it, both are planned (modules kept at the given
blocksize, or at 32 with what is left) and the one leaving the smaller summed error is taken.

Measuring reads every weight once more before the conversion, a piece at a time as the conversion
does (the same memory bound). The double quantization of the scales is left out of the measure.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from .constants import BLOCKSIZES, DTYPE_SIZES
from .decisions import EXPERT_PATTERN
from .errors import QuantizationError
from .importance import load_importance
from .plan import Plan, PlannedTensor, make_plan
from .quantize import NF4Weight, dequantize
from .task import SourceShard, on_device, pieces, quantize_piece, read_ahead

#: Sibling projections that read the same input and that loaders (vLLM's packed modules, fused QKV
#: kernels) fuse into one matrix: all kept or none.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


@dataclass(frozen=True)
class Group:
    """Modules kept or quantized together.

    Attributes:
        patterns: what joins ``--skip`` (module names, or a glob over an MoE layer's experts).
        error: their summed relative quantization errors.
        extra_bits: what keeping them costs over quantizing them.
    """

    patterns: tuple[str, ...]
    error: float
    extra_bits: float


def kept_bits(t: PlannedTensor) -> int:
    """The bits a weight takes kept in its dtype (an FP8 weight: its bfloat16 decoding)."""
    return t.source.info.numel * 8 * DTYPE_SIZES[t.dtype]


def module_of(t: PlannedTensor) -> str:
    """The module a weight belongs to (a fused 3-D weight: its experts module)."""
    return t.name.rpartition(".")[0]


def group_of(t: PlannedTensor) -> str:
    """What a weight is kept together with: all experts of its MoE layer (the ``--skip`` glob over
    them), its fused siblings (q/k/v, gate/up, ...), else its own module."""
    module = module_of(t)
    expert = EXPERT_PATTERN.search(f".{module}.")
    if expert is not None:
        return f"{module[: expert.start() - 1]}.experts.*"
    parent, _, leaf = module.rpartition(".")
    siblings = next((s for s in FUSED_SIBLINGS if leaf in s), None)
    return f"{parent}.{'/'.join(siblings)}" if siblings and len(t.source.info.shape) == 2 else module


def relative_error(plan: Plan, *, kernel: str = "native") -> dict[str, float]:
    """Every quantized weight's relative quantization error ``Σ v (W - Ŵ)² / Σ v W²``: the noise that
    quantizing adds to the layer's output, as a share of the output's energy, each element weighed
    by its input column's importance ``v`` (``plan.options.importance``; 1 without). Read and
    quantized piece by piece, with the conversion's own encoder."""
    options, bs = plan.options, plan.options.blocksize
    importance = load_importance(options.importance, [t.name for t in plan.quantized]) if options.importance else {}
    sums: dict[str, list[float]] = {}
    by_shard: dict[Any, list[PlannedTensor]] = {}
    for t in plan.quantized:
        by_shard.setdefault(t.source.shard, []).append(t)
    with ThreadPoolExecutor(1, thread_name_prefix="nf4-budget") as pool:
        for tensors in by_shard.values():
            sources = {p: SourceShard(p) for p in {t.source.shard for t in tensors} | {t.scale.shard for t in tensors if t.scale is not None}}
            for part in (x for t in tensors if t.source.packed is not None for x in t.source.packed):
                sources.setdefault(part.shard, SourceShard(part.shard))
            items = [(t, start, stop) for t in tensors for start, stop in pieces(t, bs)]
            weights = read_ahead(items, sources, pool, plan.source.fp8_block)
            for t, start, stop in items:
                piece = on_device(next(weights), t, "cpu")
                vector = importance.get(t.name)
                packed, absmax = quantize_piece(piece, t, start, vector, blocksize=bs, kernel=kernel, scales=options.scales)
                flat = piece.reshape(-1).double()
                restored = dequantize(NF4Weight(packed, absmax, (flat.numel(),), torch.float32, bs)).reshape(-1).double()
                v = _element_weights(vector, start, flat.numel(), t.source.info.numel).double() if vector is not None else 1.0
                error, signal = sums.setdefault(t.name, [0.0, 0.0])
                sums[t.name] = [error + float(((flat - restored) ** 2 * v).sum()), signal + float((flat**2 * v).sum())]
    return {name: error / signal if signal > 0 else 0.0 for name, (error, signal) in sums.items()}


def _element_weights(vector: torch.Tensor, start: int, count: int, numel: int) -> torch.Tensor:
    """Each element's importance for elements ``[start, start + count)`` of a weight (rows per expert
    for a ``[E, columns]`` matrix)."""
    index = torch.arange(start, start + count)
    if vector.dim() == 1:
        return vector[index % vector.numel()]
    per_expert = numel // vector.shape[0]
    return vector[index // per_expert, index % vector.shape[1]]


def choose(groups: list[Group], room: float) -> list[Group]:
    """The groups to keep: highest error per extra bit first, each that still fits in ``room`` bits."""
    chosen = []
    for g in sorted(groups, key=lambda g: (-g.error / max(g.extra_bits, 1.0), g.patterns)):
        if 0 < g.extra_bits <= room:
            chosen.append(g)
            room -= g.extra_bits
    return chosen


def _spend(plan: Plan, room: float, *, kernel: str) -> tuple[float, list[Group]]:
    """The groups ``room`` extra bits keep in ``plan`` (:func:`choose`), and the summed relative error
    of the weights it leaves quantized."""
    errors = relative_error(plan, kernel=kernel)
    members: dict[str, list[PlannedTensor]] = {}
    for t in plan.quantized:
        members.setdefault(group_of(t), []).append(t)
    groups = [
        Group((key,) if key.endswith(".experts.*") else tuple(sorted({module_of(t) for t in ts})), sum(errors[t.name] for t in ts), sum(kept_bits(t) - 8 * t.output_bytes for t in ts))
        for key, ts in members.items()
    ]  # fmt: skip
    chosen = choose(groups, room)
    return sum(errors.values()) - sum(g.error for g in chosen), chosen


def apply_budget(plan: Plan, *, kernel: str = "native") -> Plan:
    """``plan`` with the modules the budget ``plan.options.bits`` keeps added to ``--skip``, at the
    options' blocksize or at the smallest one, whichever leaves less error (see the module docstring).

    Raises:
        QuantizationError: a budget below what quantizing every weight takes with these options, or a
            streamed source.
    """
    bits = plan.options.bits
    if bits is None:
        return plan
    if plan.source.fetcher is not None:
        raise QuantizationError("--bits measures every weight before converting, which would fetch each shard twice with --stream: download the repo first")
    names = {t.name for t in plan.quantized}
    params = sum(t.source.info.numel for t in plan.quantized)
    floor = 8 * sum(t.output_bytes for t in plan.quantized) / params
    if bits < floor - 1e-9:
        raise QuantizationError(f"--bits {bits:g} is below the {floor:.3f} bits per parameter of quantizing every weight with these options")
    candidates = [plan]
    if plan.options.blocksize > BLOCKSIZES[0]:
        smaller = make_plan(plan.source, replace(plan.options, blocksize=BLOCKSIZES[0]))
        if {t.name for t in smaller.quantized} == names and 8 * sum(t.output_bytes for t in smaller.quantized) <= bits * params:
            candidates.append(smaller)
    spent = [_spend(c, bits * params - 8 * sum(t.output_bytes for t in c.quantized), kernel=kernel) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: spent[i][0])
    base, chosen = candidates[best], spent[best][1]
    kept = tuple(p for g in chosen for p in g.patterns)
    final = make_plan(base.source, replace(base.options, skip=base.options.skip + kept)) if kept else base
    final.budget = {
        "bits": bits,
        "bits_per_parameter": round(sum(8 * t.output_bytes for t in final.tensors if t.name in names) / params, 4),
        "blocksize": base.options.blocksize,
        "kept": list(kept),
        "kept_parameters": sum(t.source.info.numel for t in final.kept if t.name in names),
        "measure": "importance-weighted relative error" if plan.options.importance else "relative error",
        "error_left": {str(c.options.blocksize): round(e, 6) for c, (e, _) in zip(candidates, spent)},
    }
    return final
