"""A size budget (``--bits B``): extra bits go where they remove the most quantization error, until
the weights that would be quantized average ``B`` bits per parameter.

Each quantized weight's cost is its relative quantization error, measured on the weight itself with
the conversion's own encoder (``--scales``, ``--importance``): ``Σ v (W - Ŵ)² / Σ v W²``, each element
weighed by its input column's importance ``v`` where there are vectors (then it is the noise that
quantizing adds to the layer's output, as a share of that output's energy), else 1. The share, not
the absolute error: activations grow along the residual stream, so absolute errors would always point
at the last layers, and a share is what a normalized stream sees.

Modules go in groups a loader fuses into one matrix (q/k/v, gate/up, ...; all experts of an MoE
layer), so that every loader's skip rule holds. A group can spend bits two ways: on smaller blocks
(blocksize 32, the smallest bitsandbytes reads: 0.127 bit a parameter over 64 with double
quantization, measured by quantizing every weight at 32 too), or by staying in its dtype (``numel *
(dtype bits - its NF4 bits)``, all its error gone). Each group's ways up are the steps of its lower
convex hull, each removing less error per bit than the one before (smaller blocks, then kept; or kept
at once where smaller blocks buy less per bit). Steps are taken greedily, most error removed per bit
first; a step that does not fit is passed over for smaller ones, and ends its group's way up. Kept
modules join ``--skip`` (so ``llm_int8_skip_modules`` lists them exactly), the others with smaller
blocks ``small_blocks``, and the manifest records the budget (``options.budget``).

Measuring reads every weight once more before the conversion, a piece at a time as the conversion
does (the same memory bound), and quantizes it at both blocksizes. The double quantization of the
scales is left out of the measure.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from .constants import BLOCKSIZES, DTYPE_SIZES
from .decisions import EXPERT_PATTERN
from .errors import OptionError
from .awq import scaled_importance, scalings_of
from .importance import load_importance
from .plan import Plan, PlannedTensor, make_plan
from .quantize import NF4Weight, dequantize
from .pieces import SourceShard, as_tensor, on_device, pieces, read_ahead
from .task import quantize_piece

#: Sibling projections that read the same input and that loaders (vLLM's packed modules, fused QKV
#: kernels) fuse into one matrix: all kept or none.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


@dataclass(frozen=True)
class Step:
    """One way a group of modules spends bits.

    Attributes:
        patterns: the group (module names, or a glob over an MoE layer's experts).
        order: its place on the group's way up (0 first).
        start: the state it leaves (``"base"`` or ``"small"``).
        to: the state it reaches (``"small"``: blocksize 32; ``"kept"``: in its dtype).
        gain: the summed relative error it removes.
        cost: the extra bits it takes.
    """

    patterns: tuple[str, ...]
    order: int
    start: str
    to: str
    gain: float
    cost: float

    @property
    def per_bit(self) -> float:
        return self.gain / max(self.cost, 1.0)


def way_up(patterns: tuple[str, ...], error: float, keep_cost: float, small: tuple[float, float] | None) -> list[Step]:
    """A group's steps, each removing less error per bit than the one before: to smaller blocks
    (``small``: their error and extra bits, where they can be had) then kept, or kept at once where
    smaller blocks buy less per bit than keeping does."""
    keep = Step(patterns, 0, "base", "kept", error, keep_cost)
    if small is None or small[1] <= 0:
        return [keep]
    first = Step(patterns, 0, "base", "small", error - small[0], small[1])
    if first.per_bit < keep.per_bit:
        return [keep]
    return [first, Step(patterns, 1, "small", "kept", small[0], keep_cost - small[1])]


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


#: Elements measured at a time: temporaries of a few MB, so measuring stays in the conversion's memory
#: bound and reuses the same memory instead of faulting in fresh pages for every piece.
MEASURE_CHUNK = 1 << 20


def relative_errors(plan: Plan, *, smaller: int | None = None, kernel: str = "native") -> tuple[dict[str, float], dict[str, float]]:
    """Every quantized weight's relative quantization error ``Σ v (W - Ŵ)² / Σ v W²`` at its planned
    blocksize, and with ``smaller`` at that blocksize too: the noise that quantizing adds to the layer's
    output, as a share of the output's energy, each element weighed by its input column's importance
    ``v`` (``plan.options.importance``; 1 without). Each weight is read once, piece by piece, and
    quantized with the conversion's own encoder (double quantization left out).

    Returns:
        ``(errors, smaller_errors)``: by weight name (``smaller_errors`` empty without ``smaller``).
    """
    options = plan.options
    scalings = scalings_of(options.importance if options.awq else None, [t.name for t in plan.quantized if t.scaled])
    importance = load_importance(options.importance, [t.name for t in plan.quantized]) if options.importance else {}
    importance = {name: scaled_importance(v, *scalings.get(name, (None, None))) for name, v in importance.items()}
    blocksizes = lambda t: (t.blocksize, smaller) if smaller else (t.blocksize,)  # noqa: E731
    noise: dict[str, list[float]] = {}
    signal: dict[str, float] = {}
    by_shard: dict[Any, list[PlannedTensor]] = {}
    for t in plan.quantized:
        by_shard.setdefault(t.source.shard, []).append(t)
    with ThreadPoolExecutor(1, thread_name_prefix="nf4-budget") as pool:
        for tensors in by_shard.values():
            sources = {p: SourceShard(p) for p in {t.source.shard for t in tensors} | {t.scale.shard for t in tensors if t.scale is not None}}
            for part in (x for t in tensors if t.source.packed is not None for x in t.source.packed):
                sources.setdefault(part.shard, SourceShard(part.shard))
            items = [(t, start, stop) for t in tensors for start, stop in pieces(t, t.blocksize)]
            weights = read_ahead(items, sources, pool, plan.source.fp8_block, scalings)
            for t, start, stop in items:
                piece, vector = on_device(as_tensor(next(weights), t), t, "cpu").reshape(-1), importance.get(t.name)
                sums = noise.setdefault(t.name, [0.0] * len(blocksizes(t)))
                for at in range(0, piece.numel(), MEASURE_CHUNK):
                    chunk = piece[at : at + MEASURE_CHUNK]
                    w = chunk.float()
                    v = _element_weights(vector, start + at, chunk.numel(), t.source.info.numel).double() if vector is not None else None
                    signal[t.name] = signal.get(t.name, 0.0) + _weighted_sum(w.square(), v)
                    for i, blocksize in enumerate(blocksizes(t)):
                        searched = vector if options.scales == "search" else None
                        packed, absmax = quantize_piece(chunk, t, start + at, searched, blocksize=blocksize, kernel=kernel, scales=options.scales)
                        restored = dequantize(NF4Weight(packed, absmax, (chunk.numel(),), torch.float32, blocksize))
                        sums[i] += _weighted_sum(restored.sub_(w).square_(), v)
    share = lambda name, i: noise[name][i] / signal[name] if signal[name] > 0 else 0.0  # noqa: E731
    return {name: share(name, 0) for name in noise}, ({name: share(name, 1) for name in noise} if smaller else {})


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """``Σ weights · values`` (``Σ values`` without weights), summed in float64."""
    return float(torch.dot(values.double(), weights) if weights is not None else values.double().sum())


def _element_weights(vector: torch.Tensor, start: int, count: int, numel: int) -> torch.Tensor:
    """Each element's importance for elements ``[start, start + count)`` of a weight (rows per expert
    for a ``[E, columns]`` matrix)."""
    index = torch.arange(start, start + count)
    if vector.dim() == 1:
        return vector[index % vector.numel()]
    per_expert = numel // vector.shape[0]
    return vector[index // per_expert, index % vector.shape[1]]


def choose(steps: list[Step], room: float) -> dict[tuple[str, ...], str]:
    """Each group's state after spending ``room`` bits: steps most error removed per bit first, each
    taken where its group is at its start and it still fits (``"base"`` where none was taken)."""
    state: dict[tuple[str, ...], str] = {}
    for step in sorted(steps, key=lambda s: (-s.per_bit, s.patterns, s.order)):
        if state.get(step.patterns, "base") == step.start and 0 < step.cost <= room:
            state[step.patterns] = step.to
            room -= step.cost
    return state


def apply_budget(plan: Plan, *, kernel: str = "native") -> Plan:
    """``plan`` with what the budget ``plan.options.bits`` buys: modules added to ``--skip``, and to
    ``small_blocks`` (see the module docstring).

    Raises:
        OptionError: a budget below what quantizing every weight takes with these options, or a
            streamed source.
    """
    bits = plan.options.bits
    if bits is None:
        return plan
    if plan.source.fetcher is not None:
        raise OptionError("--bits measures every weight before converting, which would fetch each shard twice with --stream: download the repo first")
    quantized = plan.quantized
    names = {t.name for t in quantized}
    params = sum(t.source.info.numel for t in quantized)
    floor = 8 * sum(t.output_bytes for t in quantized) / params
    if bits < floor - 1e-9:
        raise OptionError(f"--bits {bits:g} is below the {floor:.3f} bits per parameter of quantizing every weight with these options")
    small_plan = make_plan(plan.source, replace(plan.options, small_blocks=("*",))) if plan.options.blocksize > BLOCKSIZES[0] else None
    if small_plan is not None and {t.name for t in small_plan.quantized} != names:
        small_plan = None  # smaller blocks would change what is quantized (fused experts): not offered
    errors, small_errors = relative_errors(plan, smaller=BLOCKSIZES[0] if small_plan is not None else None, kernel=kernel)
    small_bytes = {t.name: t.output_bytes for t in small_plan.quantized} if small_plan is not None else {}
    members: dict[str, list[PlannedTensor]] = {}
    for t in quantized:
        members.setdefault(group_of(t), []).append(t)
    steps, left = [], {}
    for key, ts in members.items():
        patterns = (key,) if key.endswith(".experts.*") else tuple(sorted({module_of(t) for t in ts}))
        base_bits = sum(8 * t.output_bytes for t in ts)
        small = (sum(small_errors[t.name] for t in ts), sum(8 * small_bytes[t.name] for t in ts) - base_bits) if small_errors else None
        steps += way_up(patterns, sum(errors[t.name] for t in ts), sum(kept_bits(t) for t in ts) - base_bits, small)
        left[patterns] = {"base": sum(errors[t.name] for t in ts), "small": small[0] if small else 0.0, "kept": 0.0}
    state = choose(steps, bits * params - 8 * sum(t.output_bytes for t in quantized))
    kept = tuple(p for g, s in state.items() if s == "kept" for p in g)
    small = tuple(p for g, s in state.items() if s == "small" for p in g)
    if small and all(state.get(g, "base") != "base" for g in left):
        small = ("*",)  # every module not kept: one pattern says it
    options = replace(plan.options, skip=plan.options.skip + kept, small_blocks=plan.options.small_blocks + small)
    final = make_plan(plan.source, options) if kept or small else plan
    final.budget = {
        "bits": bits,
        "bits_per_parameter": round(sum(8 * t.output_bytes for t in final.tensors if t.name in names) / params, 4),
        "kept": list(kept),
        "kept_parameters": sum(t.source.info.numel for t in final.kept if t.name in names),
        "small_blocks": list(small),
        "small_blocks_parameters": sum(t.source.info.numel for t in final.quantized if t.blocksize < plan.options.blocksize),
        "measure": "importance-weighted relative error" if plan.options.importance else "relative error",
        "error_left": round(sum(left[g][state.get(g, "base")] for g in left), 6),
    }
    return final
