"""What nf4convert adds to diffusers' own bitsandbytes loading: loading without a GPU.

``load_model`` loads a diffusers model folder with the class's own ``from_pretrained``, so every loading
rule of diffusers applies as is. diffusers picks the quantizer from the folder's ``quantization_config``;
for bitsandbytes 4-bit that is ``BnB4BitDiffusersQuantizer``, which refuses any machine without a GPU
("No GPU found. A GPU is needed for quantization."), though a folder that is already 4-bit needs no
quantizing: the weights become ``Params4bit`` through ``Params4bit.from_prequantized`` wherever they
load. :class:`NF4DiffusersQuantizer` is that quantizer without the refusal for pre-quantized weights,
placing the model where the caller asks, and with the CPU-independent layers of
:mod:`nf4convert.hfquantizer` (:func:`nf4convert.rowdecode.exact_on_cpu`, the AVX512-BF16 path off
where it fails).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

from .diffusers_models import model_class as diffusers_class
from .errors import LoadError, SourceError
from .loaded import refuse_uninitialized, stored_dtype
from .read import NF4Checkpoint
from .registry import swapped
from .rowdecode import prepare_for_cpu, refuse_cpu_layout_off_cpu

_BNB_4BIT = "bitsandbytes_4bit"


class NF4DiffusersQuantizer(BnB4BitDiffusersQuantizer):
    """diffusers' bitsandbytes 4-bit quantizer, which loads 4-bit folders on any device (a GPU is only
    needed to quantize, which loading a 4-bit folder does not)."""

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized and not torch.cuda.is_available():
            return  # its other checks (accelerate, bitsandbytes versions) hold: load_model needs both
        super().validate_environment(*args, **kwargs)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for module in prepare_for_cpu(model):
            module.register_forward_pre_hook(refuse_cpu_layout_off_cpu)
        return super()._process_model_after_weight_loading(model, **kwargs)


@contextlib.contextmanager
def nf4_quantizer() -> Iterator[None]:
    """Within the block, diffusers loads bitsandbytes 4-bit folders with :class:`NF4DiffusersQuantizer`."""
    with swapped(AUTO_QUANTIZER_MAPPING, _BNB_4BIT, NF4DiffusersQuantizer):
        yield


def load_diffusers(
    ckpt: NF4Checkpoint, config: dict, model_class: Any, *, device: torch.device | str, dtype: Any, compute_dtype: torch.dtype | None, **kwargs: Any
) -> Any:
    """A diffusers model folder through the class's own ``from_pretrained``, with
    :class:`~nf4convert.diffusers_loader.NF4DiffusersQuantizer` (no GPU needed), weights in the dtype the
    folder stores them unless ``dtype`` says otherwise (diffusers would make them float16)."""
    import diffusers

    try:
        cls = diffusers_class(config) if model_class is None else getattr(diffusers, model_class, None) if isinstance(model_class, str) else model_class
    except SourceError as e:
        raise LoadError(f"{ckpt.root}: cannot build the model: {e}") from None
    if cls is None:
        raise LoadError(f"diffusers has no class {model_class!r}")
    with_info = kwargs.pop("output_loading_info", False)
    torch_dtype = (getattr(torch, dtype) if isinstance(dtype, str) else dtype) or stored_dtype(ckpt)
    with nf4_quantizer():
        try:
            model, info = cls.from_pretrained(ckpt.root, device_map={"": torch.device(device)}, torch_dtype=torch_dtype, output_loading_info=True, **kwargs)
        except (RuntimeError, ValueError, TypeError, KeyError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoadError(f"{ckpt.root}: diffusers cannot load it as {cls.__name__}: {first}") from e
    refuse_uninitialized(model, info, root=ckpt.root, caller_class=False)
    if compute_dtype is not None:
        for module in model.modules():
            if hasattr(module, "compute_dtype") and hasattr(module, "support_avx512bf16_for_cpu"):
                module.compute_dtype = compute_dtype
    model.eval()
    return (model, info) if with_info else model


def load_pipeline(root: Path, *, device: torch.device | str, dtype: Any, compute_dtype: torch.dtype | None, **kwargs: Any) -> Any:
    """A diffusers pipeline folder through ``DiffusionPipeline.from_pretrained``, its 4-bit components
    (ours, or diffusers') loaded first by ``load_model`` and handed to it, the others loaded by diffusers
    and moved to ``device``.

    Raises:
        LoadError: as :func:`nf4convert.load.load_model`, for any component.
    """
    import diffusers

    from .load import load_model
    from .pipeline import quantized_components

    parts = {name: load_model(root / name, device=device, dtype=dtype, compute_dtype=compute_dtype) for name in quantized_components(root)}
    torch_dtype = (getattr(torch, dtype) if isinstance(dtype, str) else dtype) or next(
        (p.dtype for m in parts.values() for p in m.parameters() if p.is_floating_point()), torch.float32
    )
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(root, **parts, torch_dtype=torch_dtype, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{root}: diffusers cannot load the pipeline: {first}") from e
    for name, component in pipe.components.items():
        if name not in parts and isinstance(component, torch.nn.Module):
            component.to(device)
    return pipe
