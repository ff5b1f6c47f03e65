"""What every model a loader of nf4convert returns satisfies, whichever library built it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .constants import QUANTIZABLE_DTYPES
from .errors import LoadError
from .layout import quantized_tensors
from .read import NF4Checkpoint


def refuse_uninitialized(model: Any, info: dict[str, Any], *, root: Path, caller_class: bool) -> None:
    """Refuse a model in which a weight was neither read from the folder nor computed by the model's own
    rules (transformers' ignore lists, non-persistent buffers, tied weights: none of these is reported
    missing). Only a head that the caller's class adds is left to transformers' warning.

    Raises:
        LoadError: naming the weights that would be random.
    """
    missing = set(info.get("missing_keys") or ()) | {k[0] for k in info.get("mismatched_keys") or ()}
    base = getattr(model, "base_model_prefix", "")
    if caller_class and base and isinstance(getattr(model, base, None), torch.nn.Module):
        missing = {k for k in missing if k.startswith(base + ".")}
    if missing:
        names = sorted(missing)
        more = f", ... ({len(names)} in all)" if len(names) > 3 else ""
        raise LoadError(
            f"{root}: {type(model).__name__} would have random weights: {', '.join(names[:3])}{more} are not in the folder "
            "(a folder converted with another layout, or for another class: convert the source again, or pass the model class)"
        )


def stored_dtype(ckpt: NF4Checkpoint) -> torch.dtype:
    """The dtype the folder stores its full-precision floating-point tensors in (the most common one)."""
    companions = {name for key, state in ckpt.quant_states.items() for name, _, _ in quantized_tensors(key, state)}
    dtypes = [info.dtype for tensors in ckpt.shards.values() for key, info in tensors.items() if key not in companions and info.dtype in QUANTIZABLE_DTYPES]
    return getattr(torch, QUANTIZABLE_DTYPES[max(set(dtypes), key=dtypes.count)]) if dtypes else torch.float32
