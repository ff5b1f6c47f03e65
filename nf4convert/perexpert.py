"""MoE families that transformers loads per expert when 4-bit: where their fused experts are cut.

transformers' quantizers replace the experts modules of the classes in their table
(``MODULES_TO_PATCH_FOR_QUANTIZATION``) with per-expert ``nn.Linear`` layers before loading a
bitsandbytes folder (Llama 4's, for bitsandbytes): such a folder must hold one weight per expert and
layer, cut from the checkpoint's fused tensors (spec section 6.1, :class:`nf4convert.source.Split`).
"""

from __future__ import annotations

from typing import Any

from .errors import SourceError
from .tensorfile import TensorInfo


def per_expert_splits(model: Any, infos: list[TensorInfo], where: dict[str, str]) -> dict[str, list[list[Any]]]:
    """Where transformers loads an MoE block's experts per expert when the model is 4-bit, the per-expert
    weights each of the checkpoint's fused experts tensors is cut into (the model is changed in place
    as transformers changes it, so that what is decided next is decided on the model it loads).

    transformers' quantizers replace the experts modules of the classes in their table
    (``MODULES_TO_PATCH_FOR_QUANTIZATION``, those listed for bitsandbytes: Llama 4's) with a list of
    per-expert MLPs of ``nn.Linear`` layers before loading a bitsandbytes folder, which then has to hold
    ``experts.N.gate_proj.weight`` and so on. Each fused parameter ``gate_up_proj`` ``[E, a, b]`` is
    matched to the layers its name lists (``gate_proj``, ``up_proj``), concatenated in that order along
    the dimension their ``out_features`` add up on; ``[E, in, out]`` (the layout a ``bmm`` with the input
    takes) is transposed back.

    Args:
        where: checkpoint name -> the model's parameter name (transformers' load-time key mapping), for
            the 3-D tensors, as mapped before the model is changed.

    Returns:
        fused checkpoint name -> ``[name, expert, start, stop, transposed]`` per weight, experts first.

    Raises:
        SourceError: a fused tensor of such a module that cannot be matched to its layers.
    """
    from types import SimpleNamespace

    import torch
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION, HfQuantizer
    from transformers.utils.quantization_config import QuantizationMethod

    method = QuantizationMethod.BITS_AND_BYTES
    patched = {n for n, m in model.named_modules() if method in MODULES_TO_PATCH_FOR_QUANTIZATION.get(type(m).__name__, {}).get("quantization_methods", ())}
    if not patched:
        return {}
    HfQuantizer._convert_model_for_quantization(SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method)), model)
    splits: dict[str, list[list[Any]]] = {}
    for info in infos:
        module, _, param = where.get(info.name, "").rpartition(".")
        if module not in patched:
            continue
        experts = model.get_submodule(module)
        names = [f"{stem}_proj" for stem in param.removesuffix("_proj").split("_")]
        layers = [getattr(experts[0], n, None) for n in names]
        if not all(isinstance(layer, torch.nn.Linear) for layer in layers) or len({layer.in_features for layer in layers}) != 1:
            raise SourceError(f"{info.name}: transformers loads {type(experts).__name__} per expert, and this tensor matches none of its layers")
        outs, inputs = [layer.out_features for layer in layers], layers[0].in_features
        count, a, b = info.shape
        transposed, direct = (a, b) == (inputs, sum(outs)), (a, b) == (sum(outs), inputs)
        if count != len(experts) or transposed == direct:
            raise SourceError(f"{info.name}: shape {list(info.shape)} cannot be cut into {len(experts)} experts' {', '.join(names)} of {outs} x {inputs}")
        prefix = info.name.rpartition(".")[0]
        bounds = [sum(outs[:k]) for k in range(len(outs) + 1)]
        splits[info.name] = [[f"{prefix}.{e}.{n}.weight", e, bounds[k], bounds[k + 1], transposed] for e in range(count) for k, n in enumerate(names)]
    return splits
