"""Activation-aware scaling (spec section 2.8): a function-preserving transform of the weights before
they are quantized, stored in the importance file and applied while the conversion streams.

A *producer* (a norm, or a linear layer) writes the input of one or more *consumer* linear layers through
nothing but per-channel linear operations (attention's weighted sum of values; ``act(gate) * up``).
Dividing the producer's output channel ``k`` by ``s[k]`` and multiplying each consumer's input column
``j`` fed by channel ``k`` by ``s[k]`` leaves the function unchanged, and the columns that carry the
most activation energy lose less to quantization (AWQ, Lin et al. 2023: ``s = mean|x|^α``). Which
producers feed which consumers, and that nothing else reads the producer's output, is measured on the
model itself (:mod:`nf4convert.awq_search`); this module holds what was found, per checkpoint tensor:

- a consumer weight is multiplied by its column vector along its input axis (``1`` for an
  ``nn.Linear`` weight ``[out, in]``, ``0`` for a GPT-2 ``Conv1D`` weight ``[in, out]``);
- a producer linear's weight and bias are divided by its channel vector along the output axis;
- a producer norm's weight and bias become ``(p + offset) / s - offset`` (``offset`` 1 for a norm that
  computes ``1 + weight``, as Gemma's; else 0).

A tensor may be both (a ``v_proj`` consumes the first norm's scaled output and produces ``o_proj``'s).
The file holds one float32 vector per tensor and direction, under ``awq/<tensor>.multiply`` and
``awq/<tensor>.divide``, and a JSON record under :data:`METADATA_KEY`: the blocksize the scales were
searched at, the groups (producer, consumers, the exponent chosen, the calibration error before and
after) and the producers refused with the reason, and per tensor its axes and offset. Only torch is
needed to apply it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import QuantizationError
from .tensorfile import SafetensorsFile, read_header

if TYPE_CHECKING:
    import torch

#: The metadata key of the scaling record in an importance file.
METADATA_KEY = "nf4convert.awq"
#: The name prefix of the scaling vectors in an importance file (never a weight's name).
PREFIX = "awq/"
#: The file of a converted folder that keeps the scaling applied (spec section 8): safetensors inside, named
#: so that loaders globbing *.safetensors for weights never read it.
SCALES_FILE = "nf4convert.scales"


@dataclass(frozen=True)
class Scaling:
    """What the transform does to one checkpoint tensor.

    Attributes:
        multiply: the axis along which it is multiplied by its ``.multiply`` vector (a consumer), or ``None``.
        divide: the axis along which it is divided by its ``.divide`` vector (a producer), or ``None``.
        offset: for a norm's parameters, ``(p + offset) / s - offset``.
    """

    multiply: int | None = None
    divide: int | None = None
    offset: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"multiply": self.multiply, "divide": self.divide, "offset": self.offset}


def record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The scaling record of an importance file (``None`` if it holds none).

    Raises:
        QuantizationError: an unreadable record.
    """
    _, metadata = read_header(Path(path))
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        data["tensors"] = {name: Scaling(**s) for name, s in data["tensors"].items()}
        return data
    except (ValueError, KeyError, TypeError) as e:
        raise QuantizationError(f"{path}: its activation-aware scaling record is unreadable ({e.__class__.__name__})") from None


def check_scalings(path: str | os.PathLike, scalings: dict[str, Scaling], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse scalings for tensors the source lacks or whose vectors do not fit their shapes (the file of
    another model).

    Raises:
        QuantizationError: naming the first tensor that does not fit.
    """
    infos, _ = read_header(Path(path))
    for name, s in scalings.items():
        if name not in shapes:
            raise QuantizationError(f"{path}: scales {name}, which the source does not hold (the scales of another model?)")
        for direction, axis in (("multiply", s.multiply), ("divide", s.divide)):
            if axis is None:
                continue
            info = infos.get(f"{PREFIX}{name}.{direction}")
            shape = shapes[name]
            if info is None or axis >= len(shape) or tuple(info.shape) != (shape[axis],):
                raise QuantizationError(f"{path}: the scales of {name} do not fit its shape {list(shape)} (the scales of another model?)")


def load_vectors(path: str | os.PathLike, names: list[str], scalings: dict[str, Scaling]) -> dict[str, dict[str, torch.Tensor]]:
    """The vectors of ``names`` (those scaled): ``{name: {"multiply": v, "divide": v}}``, float32.

    Raises:
        QuantizationError: a vector that is not finite and positive.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    with SafetensorsFile(path) as f:
        for name in names:
            if name not in scalings:
                continue
            s = scalings[name]
            out[name] = {d: f.tensor(f"{PREFIX}{name}.{d}").clone() for d, axis in (("multiply", s.multiply), ("divide", s.divide)) if axis is not None}
    for name, vectors in out.items():
        for v in vectors.values():
            if not bool((v > 0).all()) or not bool(v.isfinite().all()):
                raise QuantizationError(f"{path}: the scales of {name} are not all finite and positive")
    return out


def scalings_of(path: str | os.PathLike | None, names: list[str]) -> dict[str, tuple[Scaling, dict[str, torch.Tensor]]]:
    """What :func:`apply` needs for the tensors of ``names`` the scaling of importance file ``path``
    transforms (none without a file)."""
    if path is None:
        return {}
    scalings = (record(path) or {"tensors": {}})["tensors"]
    vectors = load_vectors(path, names, scalings)
    return {name: (scalings[name], vectors[name]) for name in vectors}


def apply(values: torch.Tensor, shape: tuple[int, ...], start: int, scaling: Scaling, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Elements ``[start, start + values.numel())`` of a tensor of ``shape`` (1-D, or 2-D flattened
    row-major), transformed, in float32, shaped as ``values``. Whole rows are transformed as a 2-D view
    with the vectors broadcast (no per-element index: a 64 MB piece costs its float32 copy alone)."""
    import torch

    out = values.reshape(-1).float()
    out = out.clone() if out.data_ptr() == values.data_ptr() else out
    columns = shape[-1]  # a 1-D tensor is one row
    row, column = divmod(start, columns)
    at = 0
    while at < out.numel():  # a partial first row, whole rows, a partial last row
        left = out.numel() - at
        width = min(columns - column, left)
        rows = 1 if column or width < columns else left // columns
        span = out[at : at + rows * width].view(rows, width)
        _transform(span, row, column, scaling, vectors, len(shape))
        at += rows * width
        row, column = row + rows if column + width >= columns else row, (column + width) % columns
    return out.view(values.shape)


def _transform(span: torch.Tensor, row: int, column: int, scaling: Scaling, vectors: dict[str, torch.Tensor], ndim: int) -> None:
    """Transform ``span`` in place: rows ``row...`` and columns ``column...`` of a 2-D tensor (of a 1-D
    one, its elements ``column...`` as one row)."""
    rows, width = span.shape

    def along(axis: int, v: torch.Tensor) -> torch.Tensor:
        if ndim == 1:
            return v[column : column + width].view(1, width)
        return v[row : row + rows].view(rows, 1) if axis == 0 else v[column : column + width].view(1, width)

    if scaling.multiply is not None:
        span.mul_(along(scaling.multiply, vectors["multiply"]))
    if scaling.divide is not None:
        divisor = along(scaling.divide, vectors["divide"])
        if scaling.offset:
            span.add_(scaling.offset).div_(divisor).sub_(scaling.offset)
        else:
            span.div_(divisor)


def scaled_importance(importance: torch.Tensor, scaling: Scaling | None, vectors: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """A consumer's importance vector after its columns are multiplied by ``s``: its inputs are divided by
    ``s``, so their mean square by ``s²``."""
    if scaling is None or scaling.multiply is None or importance.dim() != 1:
        return importance
    return importance / vectors["multiply"].square()


def vectors_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the scaling: its record and its vectors' bytes, in name order (what the manifest records)."""
    digest = hashlib.sha256()
    with SafetensorsFile(path) as f:
        _, metadata = read_header(Path(path))
        digest.update((metadata or {}).get(METADATA_KEY, "").encode())
        for name in sorted(n for n in f.tensors if n.startswith(PREFIX)):
            digest.update(name.encode())
            digest.update(f.tensor(name).contiguous().numpy().tobytes())
    return digest.hexdigest()


def describe(record: dict[str, Any], *, refused: bool = True) -> list[str]:
    """Lines that say what a scaling record does: the groups by kind (producer -> consumers, layer indices
    wildcarded), the exponents chosen, the calibration error removed, and (with ``refused``) the
    producers refused, with the reason, grouped the same way."""
    import re
    from collections import Counter

    wild = lambda name: re.sub(r"\.\d+\.", ".*.", f"{name}.").rstrip(".")  # noqa: E731
    groups = record.get("groups", [])
    alphas: dict[str, list[float]] = {}
    for g in groups:
        kind = f"{wild(g['producer'])} -> {', '.join(sorted({wild(c).rpartition('.')[2] for c in g['consumers']}))}"
        alphas.setdefault(kind, []).append(g["alpha"])
    before, after = (sum(g["error"][i] for g in groups) for i in (0, 1))
    removed = f", {1 - after / before:.0%} of the calibration output error removed at blocksize {record.get('blocksize')}" if before > 0 else ""
    lines = [f"{len(groups)} scaled group(s){removed}"]
    for kind, values in sorted(alphas.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(values):>4} x {kind} (exponent median {sorted(values)[len(values) // 2]:.2f})")
    if refused:
        reasons = Counter((wild(r["producer"]), re.sub(r"\.\d+\.", ".*.", r["reason"])) for r in record.get("refused", []))
        for (producer, reason), n in sorted(reasons.items()):
            lines.append(f"  refused {n:>3} x {producer}: {reason}")
    return lines


def scaling_manifest(record: dict[str, Any], transformed: int, path: str | os.PathLike) -> dict[str, Any]:
    """What the manifest records of the scaling applied: the groups (producer, consumers, exponent),
    how many tensors it transformed, the file its vectors are kept in, and their sha256."""
    return {
        "file": SCALES_FILE,
        "sha256": vectors_sha256(path),
        "blocksize": record.get("blocksize"),
        "tensors_transformed": transformed,
        "groups": [{k: g[k] for k in ("producer", "consumers", "alpha")} for g in record.get("groups", [])],
        "refused": len(record.get("refused", [])),
    }


def write_scales(path: str | os.PathLike, output: Path) -> None:
    """Copy the scaling of importance file ``path`` (vectors and record, not the importance vectors) to
    ``output``: what ``verify --source`` transforms the source with."""
    from safetensors.torch import save_file

    _, metadata = read_header(Path(path))
    with SafetensorsFile(path) as f:
        vectors = {name: f.tensor(name).clone() for name in f.tensors if name.startswith(PREFIX)}
    save_file(vectors, output, metadata={METADATA_KEY: metadata[METADATA_KEY]})


def scaling_summary(recorded: dict[str, Any]) -> str:
    """A few words on the scaling a manifest records (:func:`scaling_manifest`)."""
    producers = sorted({g["producer"].rpartition(".")[2] for g in recorded.get("groups", [])})
    return f"{len(recorded.get('groups', []))} producer groups ({', '.join(producers)}) rescaled, {recorded.get('tensors_transformed')} tensors transformed"
