"""NF4 folder -> plain safetensors checkpoint (for merging adapters, or tools that do not read 4-bit).

Streams weight by weight with the same rules as conversion: planned shard layout, a
partial folder renamed into place at the end. A quantized weight is rebuilt a chunk of blocks at a time
and written as it goes (a transposed one whole, to transpose it back).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import torch

from .constants import DTYPE_SIZES, INDEX_NAMES, MANIFEST_NAME, OUTPUT_MARK, QUANTIZABLE_DTYPES, WeightFiles, weight_files
from .errors import FormatError
from .layout import quantized_tensors, transposed as transposed_shape
from .files import files_under, is_plain_relative, may_read
from .plan import DEFAULT_MAX_SHARD_SIZE
from .quantize import NF4Weight, dequantize, dequantize_chunks
from .read import NF4Checkpoint, open_checkpoint, stored_weight
from .source import SIDE_FILE_PATTERNS
from .tensorfile import SafetensorsFile, torch_dtypes
from .write import OutputFolder, ShardWriter, as_bytes


def _side_files(ckpt: NF4Checkpoint) -> list[str]:
    """The folder's other files to copy: those its manifest lists, or for a bitsandbytes folder (no
    manifest) those a source's side files would be (tokenizer, generation config, ...); none beside
    a single file.

    Raises:
        FormatError: a manifest entry that is not a path inside the folder.
    """
    if ckpt.single_file:
        return []
    if ckpt.version is None:
        return sorted(p.name for p in ckpt.root.iterdir() if p.is_file() and not p.name.startswith(".") and any(fnmatch.fnmatch(p.name, g) for g in SIDE_FILE_PATTERNS))
    names = []
    for record in ckpt.manifest.get("files", []):
        name = record.get("name") if isinstance(record, dict) else None
        if not is_plain_relative(name) or not may_read(ckpt.root / name, ckpt.root):
            raise FormatError(f"{ckpt.root / MANIFEST_NAME}: file name {name!r} is not a path inside the folder")
        names.append(name)
    return names


Entry = tuple[str, str, tuple[int, ...]]


def _cuts(ckpt: NF4Checkpoint) -> dict[str, dict[str, Any]]:
    """Each weight cut from fused experts (spec section 6.1) -> its ``cut_from`` record."""
    records = [t for kind in ("quantized", "kept") for t in ckpt.manifest.get("tensors", {}).get(kind, [])]
    return {t["name"]: t["cut_from"] for t in records if isinstance(t, dict) and isinstance(t.get("cut_from"), dict)}


def _plan(ckpt: NF4Checkpoint, dtype: torch.dtype | None, max_shard_size: int) -> tuple[list[Entry], list[list[Entry]], list[str]]:
    """Every output tensor (name, safetensors dtype, shape), cut into shards, and the shards' names.
    Weights cut from fused experts go back into the fused tensor, in the first one's place. A single
    file stays one file of its name."""
    to_torch = torch_dtypes()
    to_safetensors = {v: k for k, v in to_torch.items()}
    transposed = {t["name"] for t in ckpt.manifest.get("tensors", {}).get("quantized", []) if t.get("transposed")}
    companions = {n for k, s in ckpt.quant_states.items() for n, _, _ in quantized_tensors(k, s) if n != k}
    cuts = _cuts(ckpt)
    plan: list[Entry] = []
    for tensors in ckpt.shards.values():
        for key, info in tensors.items():
            if key in companions:
                continue
            if key in ckpt.quant_states:
                state = ckpt.quant_states[key]
                out_dtype, shape = to_safetensors[dtype or getattr(torch, state.dtype)], transposed_shape(state.shape) if key in transposed else state.shape
            else:
                floating = info.dtype in (*QUANTIZABLE_DTYPES, "F64")  # FP8 stays: its scale, if any, is another tensor
                out_dtype, shape = to_safetensors[dtype] if dtype and floating else info.dtype, info.shape
            if key in cuts:
                key, shape = cuts[key]["name"], cuts[key]["shape"]
                if any(entry[0] == key for entry in plan):
                    continue
            plan.append((key, out_dtype, tuple(shape)))
    if ckpt.single_file:
        return plan, [plan], list(ckpt.shards)
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in plan:
        nbytes = math.prod(entry[2]) * DTYPE_SIZES[entry[1]]
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = _files(ckpt).names(len(shards))
    return plan, shards, names


def _files(ckpt: NF4Checkpoint) -> WeightFiles:
    """The weights file names of the folder's library (as its ``config.json`` says)."""
    path = ckpt.root / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        config = None
    return weight_files(config)


def _config(ckpt: NF4Checkpoint) -> Path | None:
    """The folder's ``config.json``, to write back without ``quantization_config`` (none for a single file)."""
    path = ckpt.root / "config.json"
    return path if path.is_file() and not ckpt.single_file else None


def _side_names(ckpt: NF4Checkpoint) -> list[str]:
    produced = {MANIFEST_NAME, *INDEX_NAMES, *ckpt.shards}
    return [name for name in _side_files(ckpt) if name not in produced and name != "config.json"]


def output_files(path: str | os.PathLike | NF4Checkpoint, *, dtype: torch.dtype | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> set[str]:
    """Every file :func:`dequantize_folder` writes for these arguments (relative POSIX paths): what a
    replaced output's files of the user's must not be named (:func:`~nf4convert.write.check_output`)."""
    ckpt = path if isinstance(path, NF4Checkpoint) else open_checkpoint(path, bitsandbytes_folders=True)
    _, shards, names = _plan(ckpt, dtype, max_shard_size)
    extra = ({_files(ckpt).index} if len(shards) > 1 else set()) | ({"config.json"} if _config(ckpt) else set())
    return {*names, *_side_names(ckpt), OUTPUT_MARK} | extra


def _fuse(parts: list[tuple[str, dict[str, Any]]], shape: tuple[int, ...], dtype: torch.dtype, read: Callable[[str], Any]) -> Iterator[tuple[int, torch.Tensor]]:
    """Each expert's ``[a, b]`` matrix of a fused experts tensor, from the weights cut from it (``read``
    gives a weight's :class:`~nf4convert.quantize.NF4Weight` or its kept tensor)."""
    by_expert: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for key, record in parts:
        by_expert.setdefault(record["expert"], []).append((key, record))
    for expert in sorted(by_expert):
        matrix = torch.empty(tuple(shape[1:]), dtype=dtype)
        for key, r in by_expert[expert]:
            value = read(key)
            weight = (dequantize(value) if isinstance(value, NF4Weight) else value).to(dtype)
            if r["transposed"]:
                matrix[:, r["start"] : r["stop"]] = weight.T
            else:
                matrix[r["start"] : r["stop"]] = weight
        yield expert, matrix


def dequantize_folder(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> Path:
    """Write the dequantized checkpoint of an NF4 folder (spec section 2.5) as plain safetensors.

    Args:
        path: the NF4 folder: an nf4convert output, or a bitsandbytes 4-bit folder transformers saved
            (NF4 or FP4, with or without double quantization), or a bitsandbytes 4-bit single file
            (Forge/ComfyUI; written back as one file of its name): the way back to full precision.
        output: the folder to create.
        dtype: cast every 16-, 32- and 64-bit floating-point tensor to this dtype (default: each weight's
            original dtype); FP8 tensors stay as stored (a scale they have lives in another tensor).
        max_shard_size: output shard size limit in bytes.
        force: replace an existing output folder.
        progress: called with the number of output bytes done after each tensor.
        total: called once, before writing, with the number of output bytes.

    Returns:
        The output folder: shards (and an index), ``config.json`` without ``quantization_config``,
        and the side files.

    Raises:
        FormatError, UnsupportedVersionError: the NF4 folder fails the structural checks.
        OutputError: as for conversion.
    """
    ckpt = open_checkpoint(path, bitsandbytes_folders=True)
    plan, shards, names = _plan(ckpt, dtype, max_shard_size)
    if total:
        total(sum(math.prod(shape) * DTYPE_SIZES[sdtype] for _, sdtype, shape in plan))
    to_torch = torch_dtypes()
    transposed = {t["name"] for t in ckpt.manifest.get("tensors", {}).get("quantized", []) if t.get("transposed")}
    sides, writes = _side_names(ckpt), output_files(ckpt, dtype=dtype, max_shard_size=max_shard_size)
    where = {key: shard for shard, tensors in ckpt.shards.items() for key in tensors}
    cuts: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, record in _cuts(ckpt).items():
        cuts.setdefault(record["name"], []).append((key, record))
    files: dict[str, SafetensorsFile] = {}

    def opened(key: str) -> SafetensorsFile:
        return files.get(where[key]) or files.setdefault(where[key], SafetensorsFile(ckpt.root / where[key]))

    with OutputFolder(Path(output), source=ckpt.path, force=force, writes=writes) as out:
        try:
            for name, shard in zip(names, shards):
                writer = ShardWriter(out.path(name), shard, {"format": "pt"})
                try:
                    for key, sdtype, shape in shard:
                        if key in cuts:  # fused experts, one expert's matrix at a time
                            for expert, matrix in _fuse(cuts[key], shape, to_torch[sdtype], lambda k: stored_weight(opened(k), ckpt, k) if k in ckpt.quant_states else opened(k).tensor(k)):
                                writer.write(key, as_bytes(matrix), expert * matrix.numel() * DTYPE_SIZES[sdtype])
                            for part, _ in cuts[key]:
                                opened(part).release(part)
                            if progress:
                                progress(math.prod(shape) * DTYPE_SIZES[sdtype])
                            continue
                        f = opened(key)
                        if key in ckpt.quant_states and key in transposed:
                            value = dequantize(stored_weight(f, ckpt, key)).transpose(-1, -2).to(to_torch[sdtype])
                        elif key in ckpt.quant_states:  # a chunk of blocks at a time, straight to the file
                            q = stored_weight(f, ckpt, key)
                            value = (as_bytes(chunk.to(q.dtype).to(to_torch[sdtype])) for chunk in dequantize_chunks(q))
                        else:
                            value = f.tensor(key).to(to_torch[sdtype]) if to_torch.get(sdtype) else f.raw(key)
                        writer.write(key, value)
                        f.release(key)
                        if progress:
                            progress(math.prod(shape) * DTYPE_SIZES[sdtype])
                    writer.finish()
                finally:
                    writer.close()
        finally:
            for f in files.values():
                f.close()
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
            total = sum(math.prod(s) * DTYPE_SIZES[d] for _, d, s in plan)
            (out.path(_files(ckpt).index)).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for name in sides:
            out.path(name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ckpt.root / name, out.path(name))
        config_path = _config(ckpt)
        if config_path:
            config = json.loads(config_path.read_text())
            config.pop("quantization_config", None)
            out.path("config.json").write_text(json.dumps(config, indent=2) + "\n")
        written = sorted(n for n in writes if n != OUTPUT_MARK)
        out.path(OUTPUT_MARK).write_text(json.dumps({"written_by": "nf4convert dequantize; dequantize --force replaces these files", "files": written}, indent=2) + "\n")
        return out.commit()


def dequantize_pipeline(
    path: str | os.PathLike, output: str | os.PathLike, *, dtype: torch.dtype | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:  # fmt: skip
    """A diffusers pipeline's 4-bit components (nf4convert's or diffusers') dequantized
    (:func:`dequantize_folder`), its other files copied: the pipeline's layout, ``model_index.json`` as
    it is, a pipeline ``DiffusionPipeline.from_pretrained`` loads without bitsandbytes.

    Raises:
        FormatError: a component fails the structural checks, or the pipeline has no 4-bit component.
        OutputError: as for conversion.
    """
    from .pipeline import quantized_components

    root = Path(path)
    names = quantized_components(root)
    if not names:
        raise FormatError(f"{root}: a diffusers pipeline without 4-bit components: nothing to dequantize")
    ours = {MANIFEST_NAME, OUTPUT_MARK}
    copied = [n for n in files_under(root) if n.split("/")[0] not in names and n not in ours and not n.startswith(".")]
    with OutputFolder(Path(output), source=root, force=force, writes=set(copied) | {OUTPUT_MARK}) as out:
        for name in names:
            dequantize_folder(root / name, out.path(name), dtype=dtype, max_shard_size=max_shard_size, progress=progress)
        for name in copied:
            out.path(name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, out.path(name))
        written = sorted(files_under(out.partial))
        out.path(OUTPUT_MARK).write_text(json.dumps({"written_by": "nf4convert dequantize; dequantize --force replaces these files", "files": written}, indent=2) + "\n")
        return out.commit()
