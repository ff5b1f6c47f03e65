"""Verification of an NF4 folder: files against the manifest, structure against the spec, and
(with the source) the numerical error of every quantized tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from .constants import MANIFEST_NAME
from .errors import FormatError, NF4ConvertError, SourceError
from .awq import apply as apply_scaling
from .awq import SCALES_FILE, scalings_of
from .files import is_plain_relative, may_read, sha256_file
from .fp8 import SCALE_SUFFIX, decode_rows
from .mxfp4 import decode as decode_mxfp4
from .layout import transposed as transposed_shape
from .quantize import dequantize, dequantize_chunks
from .read import NF4Checkpoint, open_checkpoint, require_nf4_folder, stored_weight
from .pipeline import is_pipeline, pipeline_manifest, quantized_components
from .source import Source, cut_weight, open_source
from .tensorfile import SafetensorsFile


def _check_files(ckpt: NF4Checkpoint) -> list[str]:
    problems = []
    listed = set()
    for record in ckpt.manifest.get("files", []):
        name = record.get("name") if isinstance(record, dict) else None
        if not is_plain_relative(name) or not may_read(ckpt.root / name, ckpt.root):
            problems.append(f"{MANIFEST_NAME}: file name {name!r} is not a path inside the folder")
            continue
        listed.add(name)
        path = ckpt.root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record.get("size"):
            problems.append(f"{name}: size {path.stat().st_size}, manifest says {record.get('size')}")
        elif sha256_file(path) != record.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (corrupt or modified)")
    for path in sorted(ckpt.root.glob("*.safetensors")):
        if path.name not in listed:
            problems.append(f"{path.name}: not listed in the manifest")
    return problems


def _quality(original: torch.Tensor, restored: Iterable[torch.Tensor]) -> dict[str, float]:
    """Error of ``restored`` (the weight's elements in order, in chunks) against the flat ``original``,
    summed in float64 a chunk at a time."""
    err = energy = peak = 0.0
    at = 0
    for chunk in restored:
        w = original[at : at + chunk.numel()].double()
        noise = chunk.double().sub_(w)
        err, energy = err + float(torch.dot(noise, noise)), energy + float(torch.dot(w, w))
        peak = max(peak, float(noise.abs_().max()))
        at += chunk.numel()
    return {
        "rel_rmse": math.sqrt(err / energy) if energy else 0.0,
        "sqnr_db": 10 * math.log10(energy / err) if err and energy else None,  # None: no error (or no signal)
        "max_abs_err": peak,
    }


def _summary(values: list[float]) -> dict[str, float]:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return {}
    return {"mean": sum(finite) / len(finite), "min": finite[0], "median": finite[len(finite) // 2], "max": finite[-1]}


def verify(path: str | os.PathLike, *, source: str | os.PathLike | Source | None = None) -> dict[str, Any]:
    """Check an NF4 folder; with ``source``, also measure each quantized tensor's error against it.

    Args:
        path: the NF4 folder: an nf4convert output (structure and manifest hashes), or a bitsandbytes
            4-bit folder transformers saved (structure only: it has no manifest).
        source: the checkpoint it was converted from (folder, file, or an opened
            :class:`~nf4convert.source.Source`, e.g. a Hub repo resolved by the caller), optional.

    Returns:
        A report: ``ok``, ``problems`` (one line each, naming the file or tensor), ``kind`` (what the
        folder is, :attr:`~nf4convert.read.NF4Checkpoint.kind`), ``files`` (hashed),
        ``tensors``, and with ``source`` a ``quality`` map (per tensor ``rel_rmse``, ``sqnr_db`` (``None``
        where the tensor is exact), ``max_abs_err``) and its ``summary`` (``{}`` per measure with no value),
        and ``source_names`` (``strip``, ``add``) where the source names the weights with another prefix
        (:func:`renaming`).

    Raises:
        SourceNotFoundError: ``path`` does not exist.
        FormatError: ``path`` is no NF4 folder at all (no manifest, no bitsandbytes 4-bit config).
            Every other failure is a problem in the report.
    """
    if is_pipeline(Path(path)):
        return verify_pipeline(Path(path), source=None if source is None else Path(source) if not isinstance(source, Source) else source.root)
    report: dict[str, Any] = {"path": str(path), "ok": False, "problems": []}
    require_nf4_folder(path, bitsandbytes_folders=True)
    try:
        ckpt = open_checkpoint(path, bitsandbytes_folders=True)
    except FormatError as e:
        report["problems"].append(str(e))
        return report
    problems = _check_files(ckpt) if ckpt.version is not None else []  # a bitsandbytes folder has no hashes to check
    report.update(kind=ckpt.kind, files=len(ckpt.manifest.get("files", [])), tensors=sum(len(t) for t in ckpt.shards.values()))
    if source is not None and not problems:
        try:
            problems += _check_source(ckpt, source if isinstance(source, Source) else open_source(source), report)
        except NF4ConvertError as e:
            problems.append(str(e))
    report["problems"] = problems
    report["ok"] = not problems
    return report


def verify_pipeline(root: Path, *, source: Path | None = None) -> dict[str, Any]:
    """Check a diffusers pipeline folder: every file against the pipeline manifest (an nf4convert output;
    diffusers' own 4-bit pipelines have none), and each 4-bit component as :func:`verify` checks a folder
    (against ``source``'s component of the same name, where given). Problems and measures are named
    ``component/...``.

    Raises:
        FormatError: a pipeline without any 4-bit component.
    """
    manifest = pipeline_manifest(root)
    names = quantized_components(root)
    if not names:
        raise FormatError(f"{root}: a diffusers pipeline without 4-bit components; 'nf4convert convert {root} --dry-run' shows what converting it would do")
    problems: list[str] = []
    for record in (manifest or {}).get("files", []):
        name = record.get("name") if isinstance(record, dict) else None
        path = root / str(name)
        if not is_plain_relative(name) or not may_read(path, root):
            problems.append(f"{MANIFEST_NAME}: file name {name!r} is not a path inside the folder")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record.get("size") or sha256_file(path) != record.get("sha256"):
            problems.append(f"{name}: size or sha256 differs from the manifest (corrupt or modified)")
    report: dict[str, Any] = {"path": str(root), "kind": "nf4convert pipeline output" if manifest else "diffusers pipeline with bitsandbytes 4-bit components",
                              "files": len((manifest or {}).get("files", [])), "tensors": 0, "components": {}}  # fmt: skip
    quality: dict[str, dict[str, float]] = {}
    for name in names:
        part = verify(root / name, source=source / name if source is not None else None)
        report["components"][name] = part.get("kind")
        report["tensors"] += part.get("tensors", 0)
        problems += [f"{name}/{p}" for p in part["problems"]]
        quality.update({f"{name}/{k}": v for k, v in part.get("quality", {}).items()})
    report.update(problems=problems, ok=not problems)
    if source is not None:
        report["quality"] = quality
        report["summary"] = {m: _summary([q[m] for q in quality.values()]) for m in ("rel_rmse", "sqnr_db", "max_abs_err")}
    return report


def renaming(keys: list[str], originals: Collection[str]) -> tuple[str, str]:
    """``(strip, add)``: the prefix to take off ``keys`` and the one to put in its place for them to name
    ``originals``: ``("", "")`` where a key names one as it is (or no pair names most keys). Else, of the
    prefixes that let the first key name an original by its longest dotted tail, the pair that names the
    most, more than half of them: a
    Forge/ComfyUI file's ``model.diffusion_model.double_blocks.0...`` against the original model's
    ``double_blocks.0...``, or the reverse.

    Raises:
        SourceError: two pairs name the most weights alike (two models in the source under one tail).
    """
    if not keys or any(k in originals for k in keys):
        return "", ""
    parts = keys[0].split(".")
    for i in range(len(parts)):
        tail = ".".join(parts[i:])
        pairs = {(keys[0][: -len(tail)], o[: -len(tail)]) for o in originals if o == tail or o.endswith("." + tail)}
        if pairs:
            named = sorted(((sum(k.startswith(p[0]) and p[1] + k[len(p[0]) :] in originals for k in keys), p) for p in pairs), reverse=True)
            if 2 * named[0][0] <= len(keys):  # names few of them: another model, not another prefix
                return "", ""
            if len(named) > 1 and named[0][0] == named[1][0]:
                raise SourceError(
                    f"the source names these weights under several prefixes alike ({named[1][1][1]!r}, {named[0][1][1]!r}): "
                    "which one was converted cannot be told; give that model's own file as --source"
                )
            return named[0][1]
    return "", ""


def _check_source(ckpt: NF4Checkpoint, src: Source, report: dict[str, Any]) -> list[str]:
    problems = []
    recorded = {r["name"]: r["sha256"] for r in ckpt.manifest.get("source", {}).get("files", [])}
    for shard in src.shards:
        name = shard.relative_to(src.root).as_posix()
        if name in recorded and sha256_file(shard) != recorded[name]:
            problems.append(f"source {name}: sha256 differs from the one converted")
    originals = {t.name: t for t in src.tensors}
    transposed = {t["name"] for t in ckpt.manifest.get("tensors", {}).get("quantized", []) if t.get("transposed")}
    cuts = {t["name"]: t["cut_from"] for t in ckpt.manifest.get("tensors", {}).get("quantized", []) if isinstance(t.get("cut_from"), dict)}
    if ckpt.manifest.get("options", {}).get("awq") and not (ckpt.root / SCALES_FILE).is_file():
        return [*problems, f"{SCALES_FILE}: missing, so the scaled weights cannot be compared with the source"]
    scaled = ckpt.manifest.get("options", {}).get("awq")
    scalings = scalings_of(ckpt.root / SCALES_FILE, list(ckpt.quant_states)) if scaled else {}  # compared with the transformed source
    strip, add = renaming(list(ckpt.quant_states), originals)
    if strip or add:
        report["source_names"] = {"strip": strip, "add": add}
    quality: dict[str, dict[str, float]] = {}
    opened: dict[Path, SafetensorsFile] = {}
    try:
        for shard, tensors in ckpt.shards.items():
            with SafetensorsFile(ckpt.root / shard) as f:
                for key in (k for k in tensors if k in ckpt.quant_states):
                    cut = cuts.get(key)
                    name = cut["name"] if cut else key  # a weight cut from fused experts: compared with its cut
                    name = add + name.removeprefix(strip) if name.startswith(strip) else name
                    if name not in originals:
                        problems.append(f"{name}: not in the source")
                        continue
                    path = originals[name].shard
                    g = opened.get(path) or opened.setdefault(path, SafetensorsFile(path))
                    q = stored_weight(f, ckpt, key)
                    packed = originals[name].packed or ()
                    if packed:  # MXFP4: its decoding, in the model's layout
                        blocks, scales = ((opened.get(p.shard) or opened.setdefault(p.shard, SafetensorsFile(p.shard))).tensor(p.name) for p in packed)
                        original = decode_mxfp4(blocks, scales, name=key)
                    elif cut:
                        original = cut_weight(g.tensor(name)[cut["expert"]], cut["start"], cut["stop"], cut["transposed"])
                    else:
                        original = g.tensor(name)
                    if src.fp8_block and name + SCALE_SUFFIX in originals:
                        scale = originals[name + SCALE_SUFFIX]
                        h = opened.get(scale.shard) or opened.setdefault(scale.shard, SafetensorsFile(scale.shard))
                        original = decode_rows(original.view(torch.uint8), h.tensor(scale.name), 0, src.fp8_block)
                    if key in scalings:
                        original = apply_scaling(original, tuple(original.shape), 0, *scalings[key])
                    shape = transposed_shape(q.shape) if key in transposed else q.shape
                    if tuple(original.shape) != tuple(shape):
                        problems.append(f"{key}: shape {list(shape)}, the source's is {list(original.shape)}")
                    elif key in transposed:
                        quality[key] = _quality(original.reshape(-1), [dequantize(q).transpose(-1, -2).reshape(-1)])
                    else:  # a chunk of blocks at a time
                        quality[key] = _quality(original.reshape(-1), (chunk.to(q.dtype) for chunk in dequantize_chunks(q)))
                    for p in packed:
                        opened[p.shard].release(p.name)
                    if not packed and not cut:  # a fused tensor stays mapped for its other cuts
                        g.release(name)
                    f.release(key)
    finally:
        for g in opened.values():
            g.close()
    report["quality"] = quality
    report["summary"] = {m: _summary([q[m] for q in quality.values()]) for m in ("rel_rmse", "sqnr_db", "max_abs_err")}
    return problems
