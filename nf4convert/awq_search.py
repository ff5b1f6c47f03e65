"""Searching the activation-aware scaling (:mod:`nf4convert.awq`) during the block-by-block
calibration pass (:mod:`nf4convert.calibrate`), in the memory of one block.

The groups are found by :mod:`nf4convert.awq_probe`; the hooks of :class:`Searcher` keep each block's
first-batch inputs and search its groups when the block is done.

**The search** (AWQ's, Lin et al. 2023): for each group, ``s = t^α`` with ``t`` the mean absolute input
per producer channel, normalized by ``sqrt(max s · min s)``, for ``α`` in ``0, 0.2, ..., 0.8`` and then
the points of the grid ``0, 0.05, ..., 0.95`` within 0.15 of the best (11 of AutoAWQ's 20); each
candidate quantizes every consumer's scaled weight at the searched blocksize with the importance-weighted
scale search (section 2.6, as ``convert --scales search --importance`` will; absmax scales where the
native kernel does not build), and the one with the least output error ``Σ |ΔW Xᵀ|²`` over the
consumers wins, ``X`` being the consumer's inputs on the block's first calibration batch (kept as their
Gram matrix ``XᵀX`` where there are more tokens than columns). ``α = 0`` (no scaling) is a candidate, so
a group is never made worse on the calibration text.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from .awq_probe import Found, Group, find_groups, linear_modules

if TYPE_CHECKING:
    import torch

#: The exponents tried (AutoAWQ's grid of 20): every ``COARSE``-th first, then the grid around the best.
ALPHAS = tuple(i / 20 for i in range(20))
COARSE = 4


def search(group: Group, weights: dict[str, torch.Tensor], inputs: dict[str, Inputs], *, blocksize: int, kernel: str) -> None:
    """Choose ``group``'s scales (see the module docstring). ``weights``: each consumer's weight as
    ``[out, in]`` float32; ``inputs``: what each consumer received on the first calibration batch."""
    import torch

    channels = group.channels
    total, count = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
    for name, m in group.consumers.items():
        mapped = m >= 0
        total.index_add_(0, m[mapped], inputs[name].mean_abs()[mapped].double())
        count.index_add_(0, m[mapped], torch.ones(int(mapped.sum()), dtype=torch.float64))
    fed = count > 0
    t = (total / count.clamp(min=1)).float().clamp(min=1e-8)
    tried: dict[float, tuple[float, torch.Tensor]] = {}

    def evaluate(alpha: float) -> None:
        s = t.pow(alpha).clamp(min=1e-4)
        s = torch.where(fed, s / (s[fed].max() * s[fed].min()).sqrt(), 1.0)
        tried[alpha] = (sum(_output_error(weights[n], inputs[n], torch.where(m >= 0, s[m.clamp(min=0)], 1.0), blocksize, kernel) for n, m in group.consumers.items()), s)

    for alpha in ALPHAS[::COARSE]:
        evaluate(alpha)
    best = min(tried, key=lambda a: tried[a][0])
    for alpha in ALPHAS[max(0, ALPHAS.index(best) - COARSE + 1) : ALPHAS.index(best) + COARSE]:
        if alpha not in tried:
            evaluate(alpha)
    best = min(tried, key=lambda a: tried[a][0])
    group.errors = (tried[0.0][0], tried[best][0])
    group.alpha, group.scales = best, tried[best][1]


class Inputs:
    """What one linear layer received on a block's first batch: the rows themselves while there are no
    more of them than its input columns, else their Gram matrix ``XᵀX`` (whichever is smaller), and the
    sum of their absolute values per column."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.square_sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Add rows ``x`` ``[n, columns]`` (float32)."""
        import torch

        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.square_sum = x.square().sum(0) if self.square_sum is None else self.square_sum + x.square().sum(0)
        self.count += x.shape[0]
        if self.gram is None and self.count <= x.shape[1]:
            self.rows.append(x.clone())
            return
        if self.gram is None:
            self.gram = sum((r.T @ r for r in self.rows), torch.zeros(x.shape[1], x.shape[1], device=x.device))
            self.rows = []
        self.gram += x.T @ x

    def merged(self, other: Inputs) -> Inputs:
        """Both layers' inputs (a layer run more than once in a batch)."""
        out = Inputs()
        for part in (self, other):
            for r in part.rows:
                out.add(r)
            if part.gram is not None:
                out.gram = part.gram.clone() if out.gram is None else out.gram + part.gram
                out.abs_sum = part.abs_sum.clone() if out.abs_sum is None else out.abs_sum + part.abs_sum
                out.square_sum = part.square_sum.clone() if out.square_sum is None else out.square_sum + part.square_sum
                out.count += part.count
        if out.gram is not None and out.rows:
            out.gram += sum(r.T @ r for r in out.rows)
            out.rows = []
        return out

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(1, self.count)).cpu()

    def mean_square(self) -> torch.Tensor:
        """Per column: the importance (section 2.6) these inputs give."""
        return (self.square_sum / max(1, self.count)).cpu()

    def energy(self, delta: torch.Tensor) -> float:
        """``Σ_tokens |Δ x|²`` per token: the output error a weight error ``delta`` ``[out, in]`` causes."""
        import torch

        if self.gram is not None:
            return float((delta @ self.gram.to(delta.device) * delta).sum()) / max(1, self.count)
        x = torch.cat(self.rows).to(delta.device)
        return float((delta @ x.T).square().sum()) / max(1, self.count)


def _output_error(w: torch.Tensor, inputs: Inputs, columns: torch.Tensor, blocksize: int, kernel: str) -> float:
    """The output error (:meth:`Inputs.energy`) of weight ``w`` quantized with its columns multiplied by
    ``columns``: with the importance-weighted scale search (section 2.6) where the native kernel runs, as
    ``convert --scales search --importance`` will quantize it (the importance of a scaled column is
    divided by its scale squared), else with absmax scales."""
    from .quantize import NF4Weight, dequantize, quantize_nf4

    scaled = w * columns
    if kernel == "native":
        packed, absmax = quantize_nf4(scaled, blocksize=blocksize, kernel=kernel, scales="search", importance=(inputs.mean_square() / columns.square()).contiguous())
    else:
        packed, absmax = quantize_nf4(scaled, blocksize=blocksize, kernel=kernel)
    restored = dequantize(NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize)) / columns
    return inputs.energy(w - restored)


class Searcher:
    """Hooks on a streamed model's blocks (:func:`nf4convert.calibrate.load_streamed`): on each block's
    first batch, the Gram matrices of its linear layers' inputs are accumulated; when the block is done,
    its groups are found (with ``pause`` active, so the importance statistics do not see the probes) and
    searched, and the Gram matrices dropped: the memory of one block."""

    def __init__(self, model: torch.nn.Module, block_names: list[str], *, blocksize: int, pause: Any) -> None:
        self.blocksize, self.pause = blocksize, pause
        self.found: dict[str, Found] = {}
        self._args: dict[str, tuple[tuple, dict]] = {}
        self._capturing: str | None = None
        self._inputs: dict[str, Inputs] = {}
        self._shared: dict[int, tuple[Any, Inputs]] = {}  # id of an input tensor -> (a weak reference to it, its statistics)
        self._hooks = []
        for name in block_names:
            block = model.get_submodule(name)
            self._hooks.append(block.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._leave(name, block)))
            for inner, m in linear_modules(block).items():
                self._hooks.append(m.register_forward_pre_hook(self._record(name, inner)))

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()

    def _enter(self, name: str) -> Any:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            if name not in self.found:
                self._args[name] = (args, kwargs)
                self._capturing = name

        return hook

    def _record(self, block: str, name: str) -> Any:
        def hook(_m: Any, args: tuple) -> None:
            if self._capturing != block:
                return
            x = args[0]
            seen = self._shared.get(id(x))
            if seen is not None and seen[0]() is x:  # q, k and v read the same tensor: once
                entry = seen[1]
            else:  # (a weak reference: a freed tensor's id or address may come back for another input)
                entry = Inputs()
                entry.add(x.detach().reshape(-1, x.shape[-1]).float())
                self._shared[id(x)] = (weakref.ref(x), entry)
            mine = self._inputs.get(name)
            self._inputs[name] = entry if mine is None or mine is entry else mine.merged(entry)

        return hook

    def _leave(self, name: str, block: torch.nn.Module) -> Any:
        def hook(*_: Any) -> None:
            if name in self.found or name not in self._args:
                return
            self._capturing = None
            self._shared.clear()
            args, kwargs = self._args.pop(name)
            try:
                self.found[name] = self._search(block, *_first_window(args, kwargs))
            finally:
                self._inputs.clear()

        return hook

    def _search(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> Found:
        from accelerate.utils import align_module_device
        from transformers.pytorch_utils import Conv1D

        from .kernels import resolve_kernel

        with self.pause():
            found = find_groups(block, args, kwargs)
        linears = linear_modules(block)
        for group in found.groups:
            if any(n not in self._inputs for n in group.consumers):
                found.refused.append((group.producer, "a consumer did not run on the calibration text"))
                continue
            weights = {}
            for n in group.consumers:
                m = linears[n]
                with align_module_device(m):
                    w = m.weight.detach().float()
                    weights[n] = (w.T if isinstance(m, Conv1D) else w).contiguous().cpu()
            search(group, weights, {n: self._inputs[n] for n in group.consumers}, blocksize=self.blocksize, kernel=resolve_kernel("auto", "cpu"))
        found.groups = [g for g in found.groups if g.scales is not None]
        return found


def _first_window(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block's inputs cut to the first sequence of the batch (the probes' input)."""
    import torch

    hidden = args[0] if args else kwargs.get("hidden_states")
    batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() >= 2 else 1

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[:1] if batch > 1 and v.dim() >= 1 and v.shape[0] == batch else v
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        if isinstance(v, list):
            return [cut(x) for x in v]
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    return cut(args), cut(kwargs)


def scaling_file(found: dict[str, Found], model: torch.nn.Module, checkpoint_keys: list[str], *, blocksize: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The vectors and the record :mod:`nf4convert.awq` stores in the importance file, under the
    checkpoint's tensor names (a group whose weights the checkpoint does not store one to one, as the
    model holds them, is refused)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from .architecture import map_keys
    from .awq import PREFIX, Scaling

    stored = {m.key: name for name, m in map_keys(model, checkpoint_keys).items() if m.expert is None and m.layout is None and not m.transposed and m.parts <= 1}
    vectors: dict[str, torch.Tensor] = {}
    tensors: dict[str, Scaling] = {}
    groups, refused = [], []
    for block, result in found.items():
        refused += [{"producer": f"{block}.{p}", "reason": r} for p, r in result.refused]
        for g in result.groups:
            producer = model.get_submodule(f"{block}.{g.producer}")
            changes: list[tuple[str, str, int, torch.Tensor, float]] = []  # (param, direction, axis, vector, offset)
            for pname, p in producer.named_parameters(recurse=False):
                axis = 0 if g.norm or pname != "weight" else (1 if isinstance(producer, Conv1D) else 0)
                changes.append((f"{block}.{g.producer}.{pname}", "divide", axis, g.scales, g.offset if g.norm else 0.0))
            for c, m in g.consumers.items():
                axis = 0 if isinstance(model.get_submodule(f"{block}.{c}"), Conv1D) else 1
                changes.append((f"{block}.{c}.weight", "multiply", axis, torch.where(m >= 0, g.scales[m.clamp(min=0)], 1.0), 0.0))
            missing = [param for param, *_ in changes if param not in stored]
            if missing:
                refused.append({"producer": f"{block}.{g.producer}", "reason": f"{missing[0]} is not stored as the model holds it"})
                continue
            for param, direction, axis, vector, offset in changes:
                name = stored[param]
                key = f"{PREFIX}{name}.{direction}"
                vectors[key] = vectors[key] * vector if key in vectors else vector.float().clone()  # a weight and its bias: two tensors
                old = tensors.get(name, Scaling())
                tensors[name] = Scaling(**{**old.as_dict(), direction: axis, **({"offset": offset} if direction == "divide" else {})})
            module = lambda param: stored[param].rpartition(".")[0]  # noqa: E731
            groups.append({
                "producer": module(changes[0][0]), "consumers": [module(f"{block}.{c}.weight") for c in g.consumers],
                "alpha": g.alpha, "error": [g.errors[0], g.errors[1]],
            })  # fmt: skip
    record = {"blocksize": blocksize, "groups": groups, "refused": refused, "tensors": {n: s.as_dict() for n, s in tensors.items()}}
    return vectors, record
