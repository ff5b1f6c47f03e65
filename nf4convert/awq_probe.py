"""Finding the producers and consumers of the activation-aware scaling (:mod:`nf4convert.awq`) in one
block of a model, by running it with hooks (used by :mod:`nf4convert.awq_search` during the calibration pass).

**Which producers feed which consumers** is measured on each block, not read from a table: after the
block's first batch has run, the block is run again on one calibration window with hooks (its weights
loaded as transformers' disk offload loads them, one module at a time):

1. a baseline, recording every linear layer's input and the block's output;
2. per candidate producer (every linear layer, and every module whose parameters are all vectors of one
   length: norms), its output doubled while every linear layer's input is reset to its baseline value
   after it is recorded (so only the direct paths show): a linear layer whose input columns came out
   exactly doubled or unchanged is a consumer; one whose input changed otherwise (a softmax, a GELU, a
   product of two projections) refuses the producer;
3. which channel feeds each consumer column: the identity is tried first (the proof, step 4: it holds
   after a norm, and from up to down); where it fails, one run per three bits of the channel index,
   multiplying each channel by ``2**d`` for its digit ``d`` (one bit at a time in float16), reads the
   map (each query head's columns to its key-value head's channel under grouped-query attention);
4. the proof, twice: the producer's channels multiplied by random powers of two and each consumer's
   columns divided by the same (both exact in every float dtype); the block's output must not change.
   A producer whose output also reaches the block's output another way (a post-norm's residual), or is
   read by something other than a linear layer (fused MoE experts), is refused here.

A norm producer is then checked on its own: dividing its parameters by ``r`` must divide its output by
``r`` (``offset`` 0), or, for a norm that computes ``1 + weight``, dividing ``1 + weight`` must
(``offset`` 1); else it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Bits of the producer's channel index one probe reads: its channels multiplied by ``2**digit`` (at most 128).
DIGIT_BITS = 3


@dataclass
class Group:
    """One producer and the consumers its output channels feed.

    Attributes:
        producer: its module name in the model.
        norm: whether it is a norm (else a linear layer).
        channels: its output channels.
        consumers: consumer module name -> for each input column, the producer channel feeding it (-1: none).
        offset: a norm's ``1 + weight`` offset (0 or 1).
        scales: the chosen scale per producer channel (after :func:`search`).
        alpha: the chosen exponent.
        errors: the calibration output error without scaling and with the chosen scales.
    """

    producer: str
    norm: bool
    channels: int
    consumers: dict[str, Any]
    offset: float = 0.0
    scales: Any = None
    alpha: float = 0.0
    errors: tuple[float, float] = (0.0, 0.0)


@dataclass
class Found:
    """What :func:`find_groups` found in one block."""

    groups: list[Group] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (producer, reason)


def linear_modules(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The block's linear layers (``nn.Linear`` and its subclasses, GPT-2's ``Conv1D``), by name."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in block.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def _is_norm_like(m: torch.nn.Module) -> bool:
    params = [p for p in m._parameters.values() if p is not None]
    return not any(True for _ in m.children()) and bool(params) and all(p.dim() == 1 and p.shape == params[0].shape for p in params)


def _first_tensor(out: Any) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    return next(_first_tensor(v) for v in values if isinstance(v, (torch.Tensor, tuple, list, dict)))


class _Runner:
    """Runs a block on fixed inputs with hooks; records linear inputs, optionally resetting them."""

    def __init__(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.block, self.args, self.kwargs = block, args, kwargs
        self.linears = linear_modules(block)
        self.baseline: dict[str, list[torch.Tensor]] = {}
        self.output: torch.Tensor | None = None
        self.dtype = next((p.dtype for p in block.parameters() if p.is_floating_point()), None)

    def run(self, *, producer: str | None = None, factors: torch.Tensor | None = None, reset: bool = False,
            divide: dict[str, torch.Tensor] | None = None, record_input_of: str | None = None) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor, tuple | None]:  # fmt: skip
        """One run: ``producer``'s output multiplied by ``factors`` (per channel), consumers' inputs
        divided by ``divide[name]`` (per column), every linear input reset to the baseline after it is
        recorded with ``reset``. Returns the recorded linear inputs, the block's output, and the
        ``(args, kwargs)`` of module ``record_input_of``'s first call."""
        import torch

        seen: dict[str, list[torch.Tensor]] = {n: [] for n in self.linears}
        captured: list[tuple[tuple, dict]] = []
        hooks = []

        def pre(name: str) -> Any:
            def hook(_m: Any, args: tuple) -> Any:
                x = args[0]
                seen[name].append(x.detach().clone())
                if reset and len(self.baseline.get(name, ())) >= len(seen[name]):  # a layer run more often than in the baseline: _columns refuses
                    return (self.baseline[name][len(seen[name]) - 1], *args[1:])
                if divide and name in divide:
                    return (x / divide[name].to(x.device, x.dtype), *args[1:])
                return None

            return hook

        for name, m in self.linears.items():
            hooks.append(m.register_forward_pre_hook(pre(name)))
        if producer is not None:
            scale = lambda _m, _a, out: out * factors.to(out.device, out.dtype) if isinstance(out, torch.Tensor) else None  # noqa: E731
            hooks.append(self.block.get_submodule(producer).register_forward_hook(scale))
        if record_input_of is not None:
            keep = lambda _m, a, k: captured.append((a, k)) and None  # noqa: E731
            hooks.append(self.block.get_submodule(record_input_of).register_forward_pre_hook(keep, with_kwargs=True))
        try:
            with torch.no_grad():
                out = _first_tensor(self.block.forward(*self.args, **self.kwargs))
        finally:
            for h in hooks:
                h.remove()
        return seen, out.detach().clone(), (captured[0] if captured else None)


def _compare(base: torch.Tensor, probed: torch.Tensor) -> torch.Tensor | None:
    """Per column, the exponent ``e`` with ``probed == 2**e * base`` on every token (-1 for an all-zero
    column, where any holds); ``None`` where some column is not a power of two of the baseline (not
    proportional)."""
    import torch

    b, p = base.float().reshape(-1, base.shape[-1]), probed.float().reshape(-1, probed.shape[-1])
    if b.shape != p.shape:
        return None
    at = b.abs().argmax(0, keepdim=True)  # each column's largest baseline value says its exponent
    top, moved = b.gather(0, at)[0], p.gather(0, at)[0]
    zero = top == 0
    exponent = torch.where(zero, 0.0, (moved / torch.where(zero, 1.0, top)).abs().clamp(min=2**-30, max=2**30).log2().round())
    factor = torch.where(zero, 1.0, 2.0**exponent)
    if not bool(((p - factor * b).abs() <= 1e-3 * factor * b.abs()).all()) or bool((exponent < 0)[~zero].any()):
        return None
    return torch.where(zero, -1, exponent).long()


def _columns(runner: _Runner, seen: dict[str, list[torch.Tensor]], producer: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Per linear whose input changed: the per-column exponent of :func:`_compare` (the largest over its
    calls); or the reason the producer is refused."""
    found: dict[str, torch.Tensor] = {}
    for name, inputs in seen.items():
        if name == producer:
            continue
        base = runner.baseline[name]
        if len(inputs) != len(base):
            return {}, f"{name} runs a different number of times when its output changes"
        merged = None
        for x, b in zip(inputs, base):
            e = _compare(b, x)
            if e is None:
                return {}, f"its output reaches {name}'s input through a non-linear function"
            if merged is not None and not bool(((e == merged) | (e < 0) | (merged < 0)).all()):
                return {}, f"{name}'s input columns depend on its output differently from call to call"
            merged = e if merged is None else merged.maximum(e)
        if merged is not None and bool((merged > 0).any()):
            found[name] = merged
    return found, None


def find_groups(block: torch.nn.Module, args: tuple, kwargs: dict, *, seed: int = 0) -> Found:
    """The producer/consumer groups of ``block`` run on ``args``/``kwargs`` (see the module docstring)."""
    import torch

    runner = _Runner(block, args, kwargs)
    runner.baseline, runner.output, _ = runner.run()
    candidates = [n for n, m in block.named_modules() if n and (n in runner.linears or _is_norm_like(m))]
    found = Found()
    generator = torch.Generator().manual_seed(seed)
    for producer in candidates:
        channels = _channels(block.get_submodule(producer))
        if channels is None or channels < 2:
            continue
        seen, _, _ = runner.run(producer=producer, factors=torch.full((channels,), 2.0), reset=True)
        consumers, reason = _columns(runner, seen, producer)
        if reason is None and any(bool((e > 1).any()) for e in consumers.values()):
            reason = f"its output reaches {', '.join(n for n, e in consumers.items() if bool((e > 1).any()))} more than linearly"
        if reason is not None:
            found.refused.append((producer, reason))
        if reason is not None or not consumers:
            continue
        maps = {n: torch.where(e == 1, torch.arange(e.numel()), -1) for n, e in consumers.items()}  # the identity, first
        proof = _proof(runner, producer, channels, maps, generator) if all(m.numel() == channels for m in maps.values()) else None
        if proof is None:  # not the identity: read the map
            maps, reason = _read_map(runner, producer, channels, consumers)
            if reason is not None:
                found.refused.append((producer, reason))
                continue
            proof = _proof(runner, producer, channels, maps, generator)
        if proof is None:
            found.refused.append((producer, f"its output also reaches the block's output other than through {', '.join(sorted(maps))}"))
            continue
        captured = proof
        group = Group(producer, producer not in runner.linears, channels, maps)
        if group.norm:
            offset = _norm_offset(block.get_submodule(producer), captured, generator)
            if offset is None:
                found.refused.append((producer, "its output is not proportional to its weights"))
                continue
            group.offset = offset
        found.groups.append(group)
    return found


def _read_map(runner: _Runner, producer: str, channels: int, consumers: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Which producer channel feeds each consumer column (-1: none), read from runs that multiply each
    channel by ``2**d`` for ``DIGIT_BITS`` bits ``d`` of its index at a time; or the reason it cannot be."""
    import torch

    maps = {n: torch.where(e == 1, 0, -1) for n, e in consumers.items()}
    digit = 1 if runner.dtype == torch.float16 else DIGIT_BITS  # float16 has the least range for 2**7
    for shift in range(0, math.ceil(math.log2(channels)), digit):
        factors = 2.0 ** ((torch.arange(channels) >> shift) & ((1 << digit) - 1)).float()
        seen, _, _ = runner.run(producer=producer, factors=factors, reset=True)
        exponents, reason = _columns(runner, seen, producer)
        if reason is not None:
            return maps, f"its channels mix before they reach {', '.join(consumers)}"
        for n in maps:
            e = exponents.get(n, torch.zeros_like(maps[n])).clamp(min=0)
            maps[n] = torch.where(maps[n] >= 0, maps[n] + (e << shift), maps[n])
    return maps, None


def _proof(runner: _Runner, producer: str, channels: int, maps: dict[str, torch.Tensor], generator: torch.Generator) -> tuple | None:
    """Two runs with the producer's channels multiplied by random powers of two (1/4 to 4) and each
    consumer column divided by its channel's: the block's output must be the baseline's both times (a
    wrong map passes with a chance of at most 1/5 per moved column and run).
    Returns the producer's call ``(args, kwargs)`` of the last run, or ``None`` where the output changed."""
    import torch

    captured = None
    for _ in range(2):
        factors = 2.0 ** torch.randint(-2, 3, (channels,), generator=generator).float()
        divide = {n: torch.where(m >= 0, factors[m.clamp(min=0)], 1.0) for n, m in maps.items()}
        _, out, captured = runner.run(producer=producer, factors=factors, divide=divide, record_input_of=producer)
        if not _same(out, runner.output):
            return None
    return captured


def _channels(m: torch.nn.Module) -> int | None:
    """How many output channels module ``m`` has (a linear layer's outputs; a norm's parameter length)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(m, Conv1D):
        return int(m.weight.shape[1])
    if hasattr(m, "out_features"):
        return int(m.out_features)
    params = [p for p in m._parameters.values() if p is not None]
    return int(params[0].shape[0]) if params else None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.float().abs().max()) or 1.0
    return a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= 1e-4 * scale


def _norm_offset(norm: torch.nn.Module, call: tuple[tuple, dict], generator: torch.Generator) -> float | None:
    """0 if dividing the norm's parameters by ``r`` divides its output by ``r``, 1 if dividing
    ``1 + parameter`` does, else ``None``; computed in float32 on the inputs ``call`` it had."""
    import torch
    from accelerate.utils import align_module_device

    as_float = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    args, kwargs = [as_float(a) for a in call[0]], {k: as_float(v) for k, v in call[1].items()}
    run = lambda: type(norm).forward(norm, *args, **kwargs).float()  # noqa: E731

    with align_module_device(norm), torch.no_grad():
        params = {n: p for n, p in norm._parameters.items() if p is not None}
        original = {n: p.data for n, p in params.items()}
        r = 0.5 + 1.5 * torch.rand(next(iter(original.values())).shape, generator=generator)
        try:
            for p in params.values():
                p.data = p.data.float()
            y = run()
            for offset in (0.0, 1.0):
                for n, p in params.items():
                    p.data = (original[n].float() + offset) / r - offset
                if _close(run(), y / r):
                    return offset
        finally:
            for n, p in params.items():
                p.data = original[n]
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) or 1.0
    return a.shape == b.shape and float((a - b).abs().max()) <= 1e-4 * scale
