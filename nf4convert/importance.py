"""Importance weights for ``--scales search`` (spec section 2.6): how much each input column of a
weight matters, as the mean squared activation entering it over some calibration text (the idea of
llama.cpp's importance matrix). The weighted search keeps the scales that preserve the weights those
activations multiply most; the file format and the decoder are unchanged.

The importance file is safetensors: one float32 vector per weight, under the weight's checkpoint
name, as long as the weight's input dimension (``shape[1]``; a transposed ``Conv1D`` weight's
``shape[0]``); for fused 3-D experts ``[E, rows, columns]``, a ``[E, columns]`` matrix, one row per
expert. :mod:`nf4convert.calibrate` measures it; reading needs neither torch nor transformers until the
vectors are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OutputError, QuantizationError
from .files import sha256_file
from .tensorfile import SafetensorsFile, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

#: The metadata key that marks a safetensors file as an importance file nf4convert wrote.
MARKER = "nf4convert.importance"


def read_importance_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The vectors an importance file holds, checked for dtype and rank (not read).

    Raises:
        QuantizationError: not a safetensors file of float32 vectors and matrices (one line, naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise QuantizationError(f"{path}: no such importance file")
    try:
        infos, _ = read_header(path)
    except Exception as e:  # noqa: BLE001 - FormatError or OSError: either way, not a usable file
        raise QuantizationError(f"{path}: not an importance file ({e})") from None
    for info in infos.values():
        if info.dtype != "F32" or len(info.shape) not in (1, 2):
            raise QuantizationError(f"{path}: {info.name} is {info.dtype} {list(info.shape)}, expected a float32 vector (or one row per expert)")
    return infos


def importance_shape(shape: tuple[int, ...], *, transposed: bool) -> tuple[int, ...]:
    """The importance a quantized weight of source ``shape`` takes: its input columns (the last
    dimension of the layout it is quantized in), one row of them per expert for 3-D fused experts."""
    columns = shape[-2] if transposed else shape[-1]
    return (shape[0], columns) if len(shape) == 3 else (columns,)


def check_importance(infos: dict[str, TensorInfo], shapes: dict[str, tuple[int, ...]], *, where: str) -> list[str]:
    """The quantized weights (``name -> importance shape``: ``(columns,)``, or ``(experts, columns)``
    for fused experts) that ``infos`` weights.

    Raises:
        QuantizationError: a vector of the wrong shape, or no vector for any quantized weight.
    """
    for name, info in infos.items():
        if name in shapes and tuple(info.shape) != shapes[name]:
            want = f"{shapes[name][0]} experts x {shapes[name][1]}" if len(shapes[name]) == 2 else f"{shapes[name][0]}"
            raise QuantizationError(f"{where}: {name} has {' x '.join(map(str, info.shape))} importance values, the weight has {want} input columns (an importance file of another model?)")
    covered = [name for name in shapes if name in infos]
    if not covered:
        raise QuantizationError(f"{where}: names none of the weights to quantize (an importance file of another model?)")
    return covered


def load_importance(path: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """The vectors of ``names`` (those the file has), as float32 tensors.

    Raises:
        QuantizationError: a vector with a negative, NaN or infinite value.
    """
    with SafetensorsFile(path) as f:
        vectors = {name: f.tensor(name).clone() for name in names if name in f.tensors}
    for name, v in vectors.items():
        if not bool((v >= 0).all()) or not bool(v.isfinite().all()):
            raise QuantizationError(f"{path}: {name} has negative, NaN or infinite importance values")
    return vectors


def importance_record(path: str | os.PathLike, weighted: int) -> dict[str, Any]:
    """What the manifest records of the importance file: its sha256, how many weights it weighted, and
    what its measurement recorded (calibration windows, experts that received no token)."""
    _, metadata = read_header(Path(path))
    measured = {k: int(metadata[k]) for k in ("windows", "experts_without_tokens") if (metadata or {}).get(k, "").isdigit()}
    return {"sha256": sha256_file(Path(path)), "weighted_tensors": weighted, **measured}


def check_replaceable(path: Path, *, force: bool) -> None:
    """Refuse an existing ``path``, unless ``force`` and it is an importance file nf4convert wrote.

    Raises:
        OutputError: it exists (and is something else).
    """
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise OutputError(f"{path}: already exists (--force, or force=True in Python, replaces an importance file)")
    try:
        _, metadata = read_header(path) if path.is_file() and not path.is_symlink() else (None, None)
    except Exception:  # noqa: BLE001 - not safetensors: not ours
        metadata = None
    if (metadata or {}).get(MARKER) != "1":
        raise OutputError(f"{path}: not an importance file nf4convert wrote; --force replaces only those")


def write_importance(path: Path, vectors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``vectors`` as an importance file, atomically (a temporary file beside it, then renamed)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in vectors.items()}, tmp, metadata={MARKER: "1", **metadata})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
