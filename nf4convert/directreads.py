"""Weights a model computes with outside their own module's forward: such a layer cannot be 4-bit.

A ``Linear4bit`` holds packed bytes in its ``weight``; only its own ``forward`` knows to dequantize them.
A model that multiplies by a layer's weight itself (Mamba's mixer: ``self.dt_proj.weight @ x``) fails
with that layer in 4 bits, in every loader. Which layers a model reads that way is a fact of its
code, and the code can tell: :func:`read_outside` runs the model's forward once on the meta device (no
memory, no data) with every torch operation watched, and names each ``nn.Linear`` whose weight an
operation takes while that layer's own ``forward`` is not the one running. The model is traced as
transformers runs a quantized model (``config._is_quantized`` set: some models, FalconMamba and Jamba,
call the layer instead of reading its weight then).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: Operations that read a tensor's metadata, not its values (``weight.dtype``, ``weight.shape``).
_METADATA = {"__get__", "size", "dim", "numel", "is_floating_point", "element_size"}
#: The sequence length of the traced forward.
_TOKENS = 2


class _Watch(TorchFunctionMode):
    """Records the operations that take a watched weight outside its module's forward."""

    def __init__(self, weights: dict[int, str], running: list[str]) -> None:
        super().__init__()
        self.weights, self.running = weights, running
        self.found: dict[str, str] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _METADATA:
            for value in (*args, *kwargs.values()):
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    owner = self.weights.get(id(t)) if isinstance(t, torch.Tensor) else None
                    if owner is not None and (not self.running or self.running[-1] != owner):
                        self.found.setdefault(owner, name)
        return func(*args, **kwargs)


def read_outside(model: Any, layers: list[str]) -> dict[str, str] | None:
    """The ``layers`` (module names of ``model``'s ``nn.Linear`` layers) whose weight the model's forward
    computes with outside the layer's own forward, each with the operation that does.

    Args:
        model: a transformers model on the meta device, taking ``input_ids``.
        layers: the layers to watch.

    Returns:
        ``{layer: operation}``; ``None`` where the forward cannot be traced on the meta device (a model
        that takes other inputs, or whose forward needs data).
    """
    if getattr(model, "main_input_name", None) != "input_ids" or not layers:
        return None
    running: list[str] = []
    weights: dict[int, str] = {}
    hooks = []
    for name in layers:
        module = model.get_submodule(name)
        weights[id(module.weight)] = name
        hooks.append(module.register_forward_pre_hook(lambda _m, _a, n=name: running.append(n) and None))
        hooks.append(module.register_forward_hook(lambda _m, _a, _o: running.pop() and None))
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")]
    unset = [c for c in configs if not hasattr(c, "_is_quantized")]
    quiet = logging.getLogger("transformers")
    level = quiet.level
    watch = _Watch(weights, running)
    try:
        for c in unset:
            c._is_quantized = True
        quiet.setLevel(logging.ERROR)  # the slow-path notices of a forward nobody runs
        with torch.no_grad(), watch:
            model(input_ids=torch.zeros(1, _TOKENS, dtype=torch.long, device="meta"))
    except Exception:  # noqa: BLE001 - any model code that needs data: not traceable here
        return None
    finally:
        quiet.setLevel(level)
        for c in unset:
            if hasattr(c, "_is_quantized"):
                del c._is_quantized
        for h in hooks:
            h.remove()
    return watch.found
