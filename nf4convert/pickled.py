"""Opt-in reading of pickled PyTorch weights (``--allow-pickle``), staged as safetensors first.

Only through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers, so a hostile pickle cannot run code. Each ``*.bin`` shard is written to a staging
folder as a safetensors file (one shard in memory at a time, memory-mapped), side files are
copied beside it, and the normal pipeline converts the staged folder.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SourceError, SourceNotFoundError
from .source import SIDE_FILE_PATTERNS, Source, open_source
from .files import file_record

if TYPE_CHECKING:
    import torch

#: Pickled shards as transformers names them (``pytorch_model.bin``, ``pytorch_model-00001-of-00002.bin``).
PICKLE_PATTERN = "*.bin"


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corrupt zip is the same user error
        raise SourceError(f"{path}: not a weights-only PyTorch checkpoint ({e.__class__.__name__}); nothing was executed") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SourceError(f"{path}: not a state dict of named tensors")
    seen: set[int] = set()
    tensors = {}
    for name, t in state.items():  # safetensors refuses shared storage (tied weights): copy repeats
        ptr = t.untyped_storage().data_ptr()
        tensors[name] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return tensors


def stage_pickled(path: Path, staging: Path) -> Source:
    """Stage the pickled shards of the folder ``path`` (or the one pickled file ``path``, with its folder's
    side files) as safetensors in ``staging`` and open that as the source.

    The returned source keeps ``path`` as its path and name, and records the pickled files'
    sha256 in its provenance (``pickled_files``).

    Raises:
        SourceNotFoundError: ``path`` has no ``*.bin`` weights.
        SourceError: a file that is not a weights-only checkpoint of named tensors.
    """
    from safetensors.torch import save_file

    root = path.parent if path.is_file() else path
    bins = [path] if path.is_file() else sorted(p for p in root.glob(PICKLE_PATTERN) if p.is_file())
    if not bins:
        raise SourceNotFoundError(f"{root}: no *.safetensors or *.bin weights")
    staging.mkdir(parents=True)
    for path in bins:
        save_file(_state_dict(path), staging / f"{path.stem}.safetensors", metadata={"format": "pt"})
    for side in root.iterdir():
        if side.is_file() and any(fnmatch.fnmatch(side.name, g) for g in SIDE_FILE_PATTERNS) and ".bin." not in side.name:
            shutil.copyfile(side, staging / side.name)
    src = open_source(staging)
    src.path, src.name = path, path.name
    src.provenance["pickled_files"] = [file_record(p, p.name) for p in bins]
    return src
