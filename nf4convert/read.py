"""Reading an nf4convert output folder and checking its structure against the spec (section 9).

:func:`open_checkpoint` is the one entry point for ``inspect``, ``verify`` and the loader:
it validates the manifest, the index, every shard header and every quantized weight's
companion tensors before anything uses them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .constants import (
    CODE_TABLES,
    DYNAMIC_MAP,
    FORMAT_NAME,
    DIFFUSERS_FILES,
    INDEX_NAMES,
    MANIFEST_NAME,
    QUANT_STATE_SUFFIXES,
    QUANT_SUFFIXES,
    SINGLE_SHARD_NAME,
    TRANSFORMERS_FILES,
)
from .errors import FormatError, SourceNotFoundError
from .files import is_plain_relative, may_read
from .layout import QuantState, check_version, decode_quant_state, quantized_tensors
from .quantize import NF4Weight
from .tensorfile import SafetensorsFile, TensorInfo, read_header


@dataclass
class NF4Checkpoint:
    """A validated nf4convert output folder.

    Attributes:
        root: the folder.
        manifest: the parsed ``nf4convert.json``.
        shards: shard file name -> its tensors.
        quant_states: weight key (``<module>.weight``) -> its parsed quant state.
        single_file: a lone bitsandbytes 4-bit ``.safetensors`` file (Forge's and ComfyUI's NF4
            checkpoints), given as itself: :attr:`root` is its folder, whose other files are not its.
    """

    root: Path
    manifest: dict[str, Any]
    shards: dict[str, dict[str, TensorInfo]]
    quant_states: dict[str, QuantState]
    single_file: bool = False

    @property
    def path(self) -> Path:
        """What was opened: the folder, or the single file."""
        return self.root / next(iter(self.shards)) if self.single_file else self.root

    @property
    def version(self) -> int | None:
        """The format version; ``None`` for a bitsandbytes folder saved by transformers (no manifest)."""
        return self.manifest.get("format_version")

    @property
    def kind(self) -> str:
        """What the folder is, in words: an nf4convert output, or a bitsandbytes 4-bit folder and its types."""
        if self.version is not None:
            return f"nf4convert output, format v{self.version}"
        types = sorted({s.quant_type.upper() for s in self.quant_states.values()}) or ["no 4-bit weights"]
        nested = {s.nested for s in self.quant_states.values()}
        dq = "double quantization" if nested == {True} else "no double quantization" if nested == {False} else "mixed double quantization"
        if self.single_file:
            return f"bitsandbytes 4-bit single file, Forge/ComfyUI layout ({', '.join(types)}, {dq}; no nf4convert manifest)"
        library = "diffusers" if any(name.startswith(DIFFUSERS_FILES.single.removesuffix(".safetensors")) for name in self.shards) else "transformers"
        return f"bitsandbytes 4-bit folder saved by {library} ({', '.join(types)}, {dq}; no nf4convert manifest)"

    def summary(self) -> dict[str, Any]:
        """What ``nf4convert inspect`` shows."""
        quantized = kept = q_bytes = k_bytes = q_params = k_params = 0
        for tensors in self.shards.values():
            for key, info in tensors.items():
                base = _base_key(key)
                if base in self.quant_states:
                    q_bytes += info.nbytes
                    if key == base:
                        quantized += 1
                        q_params += self.quant_states[base].numel
                else:
                    kept += 1
                    k_bytes += info.nbytes
                    k_params += info.numel
        params = q_params + k_params
        return {
            "path": str(self.path),
            "kind": self.kind,
            "format": FORMAT_NAME if self.version is not None else "bitsandbytes",
            "format_version": self.version,
            "tool_version": self.manifest.get("tool", {}).get("version"),
            "source": {k: v for k, v in self.manifest.get("source", {}).items() if k != "files"},
            "options": self.manifest.get("options", {}),
            "decided_by": self.manifest.get("decided_by"),
            "loaders": self.manifest.get("loaders", []),
            "shards": len(self.shards),
            "quantized": {"tensors": quantized, "parameters": q_params, "bytes": q_bytes},
            "blocksizes": {str(b): sum(1 for st in self.quant_states.values() if st.blocksize == b) for b in sorted({st.blocksize for st in self.quant_states.values()})},
            "kept": {"tensors": kept, "parameters": k_params, "bytes": k_bytes},
            "bytes": q_bytes + k_bytes,
            "bits_per_parameter": round(8 * (q_bytes + k_bytes) / max(1, params), 4),
            "quantized_bits_per_parameter": round(8 * q_bytes / max(1, q_params), 4),
        }


def _base_key(key: str) -> str:
    for suffix in QUANT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: not valid JSON") from None


def is_bitsandbytes_4bit_file(path: Path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file holding bitsandbytes 4-bit weights (a quant-state
    blob), as Forge and ComfyUI keep NF4 checkpoints: one file, the original model's key names.

    Raises:
        FormatError: a ``.safetensors`` file that is not valid safetensors.
    """
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    suffixes = tuple("." + s for s in QUANT_STATE_SUFFIXES.values())
    return any(key.endswith(suffixes) for key in read_header(path)[0])


def _holds_4bit(path: Path) -> bool:
    try:
        return is_bitsandbytes_4bit_file(path)
    except (FormatError, OSError):
        return False


def _is_4bit_folder(root: Path) -> bool:
    try:
        return is_bitsandbytes_4bit(root)
    except FormatError:  # a config.json that is not JSON: not a bitsandbytes folder's
        return False


def is_bitsandbytes_4bit(root: Path) -> bool:
    """Whether ``root/config.json`` says bitsandbytes 4-bit (a folder transformers saved)."""
    config = _load_json(root / "config.json") if (root / "config.json").is_file() else None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit") is True


def _shard_names(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """The folder's shards, by the index of transformers' or diffusers' naming, else its single file."""
    index_path = next((root / name for name in INDEX_NAMES if (root / name).exists()), None)
    if index_path is None:
        single = next((f.single for f in (TRANSFORMERS_FILES, DIFFUSERS_FILES) if (root / f.single).exists()), SINGLE_SHARD_NAME)
        return [single], None
    index = _load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: no weight_map")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not is_plain_relative(name) or "/" in name or not name.endswith(".safetensors"):
            raise FormatError(f"{index_path}: shard {name!r} is not a .safetensors file in the folder")
    return names, weight_map


def _check_weight(key: str, blob_key: str, tensors: dict[str, TensorInfo], f: SafetensorsFile, where: str, quant_types: tuple[str, ...]) -> QuantState:
    """The weight's quant state, once its tensors' dtypes, shapes and code tables are checked."""
    state = decode_quant_state(bytes(f.raw(blob_key)), where=f"{where}: {key}", quant_types=quant_types)
    for name, dtype, shape in quantized_tensors(key, state):
        info = tensors.get(name)
        if info is None:
            raise FormatError(f"{where}: {name} is missing")
        if name.endswith(QUANT_STATE_SUFFIXES[state.quant_type]):
            continue
        if (info.dtype, info.shape) != (dtype, shape):
            raise FormatError(
                f"{where}: {name} is {info.dtype} {list(info.shape)}, expected {dtype} {list(shape)} for shape "
                f"{list(state.shape)}, blocksize {state.blocksize}"
            )
    if not state.nested and (f"{key}.nested_absmax" in tensors or f"{key}.nested_quant_map" in tensors):
        raise FormatError(f"{where}: {key} has nested tensors but its quant state is not nested")
    tables = [("quant_map", CODE_TABLES[state.quant_type], f"{state.quant_type.upper()} code")] + ([("nested_quant_map", DYNAMIC_MAP, "dynamic")] if state.nested else [])
    for suffix, table, what in tables:  # the decoding assumes them, as bitsandbytes' kernels do
        if bytes(f.raw(f"{key}.{suffix}")) != np.asarray(table, dtype="<f4").tobytes():
            raise FormatError(f"{where}: {key}.{suffix} is not bitsandbytes' {what} table; a decoding with another table is not supported")
    return state


def require_nf4_folder(path: str | os.PathLike, *, bitsandbytes_folders: bool = False) -> Path:
    """``path`` as a folder that claims to be an NF4 folder (a manifest, or with ``bitsandbytes_folders``
    a bitsandbytes 4-bit ``config.json``, or a bitsandbytes 4-bit single file): the input a reader
    takes, before any of its contents is checked.

    Raises:
        SourceNotFoundError: another file, or nothing there.
        FormatError: a folder of something else (the message says what to run).
    """
    root = Path(path)
    if root.is_file():
        if (root.parent / MANIFEST_NAME).exists() or _is_4bit_folder(root.parent):
            raise SourceNotFoundError(f"{root}: a file of the NF4 folder {root.parent}; give the folder")
        if not is_bitsandbytes_4bit_file(root):
            raise FormatError(
                f"{root}: not an NF4 checkpoint (neither a folder nor a .safetensors file of bitsandbytes 4-bit weights); "
                f"'nf4convert convert {root} --dry-run' shows what converting it would do"
            )
        if not bitsandbytes_folders:
            raise FormatError(f"{root}: a bitsandbytes 4-bit single file (Forge/ComfyUI layout), not an nf4convert output: inspect, verify and dequantize read it")
        return root
    if not root.is_dir():
        raise SourceNotFoundError(f"{root}: no such folder")
    if (root / MANIFEST_NAME).exists() or (bitsandbytes_folders and is_bitsandbytes_4bit(root)):
        return root
    if is_bitsandbytes_4bit(root):
        raise FormatError(
            f"{root}: a bitsandbytes 4-bit folder saved by transformers, not an nf4convert output (no {MANIFEST_NAME}): "
            "inspect, verify and dequantize read it; other commands take nf4convert outputs"
        )
    lone = [p for p in sorted(root.glob("*.safetensors")) if bitsandbytes_folders and not (root / "config.json").exists() and _holds_4bit(p)]
    if lone:
        which = f"{lone[0].name} holds" if len(lone) == 1 else f"{', '.join(p.name for p in lone)} hold"
        raise FormatError(f"{root}: no {MANIFEST_NAME} nor config.json, but {which} bitsandbytes 4-bit weights: give the file ({lone[0]}{', ...' if len(lone) > 1 else ''})")
    also = " nor a bitsandbytes 4-bit folder (no such quantization_config in config.json)" if bitsandbytes_folders else ""
    raise FormatError(f"{root}: not an nf4convert output (no {MANIFEST_NAME}){also}; 'nf4convert convert {root} --dry-run' shows what converting it would do")


def open_checkpoint(path: str | os.PathLike, *, bitsandbytes_folders: bool = False) -> NF4Checkpoint:
    """Open and structurally validate an nf4convert output folder.

    Args:
        path: the folder ``nf4convert convert`` wrote.
        bitsandbytes_folders: also accept a folder with no manifest whose ``config.json`` says
            bitsandbytes 4-bit, as transformers' ``save_pretrained`` writes it (e.g. per-expert MoE
            checkpoints saved by transformers 4.x), and a single ``.safetensors`` file of bitsandbytes
            4-bit weights under any names (Forge's and ComfyUI's NF4 checkpoints, a module's
            ``state_dict`` saved as it is): the same checks, less the version ones.

    Returns:
        The validated :class:`NF4Checkpoint`.

    Raises:
        SourceNotFoundError: the folder does not exist.
        UnsupportedVersionError: written by a format version this reader does not know.
        FormatError: anything else that breaks spec/FORMAT.md; the message names the file and tensor.
    """
    root = require_nf4_folder(path, bitsandbytes_folders=bitsandbytes_folders)
    single_file = root.is_file()
    quant_types: tuple[str, ...] = ("nf4",)
    if single_file or bitsandbytes_folders and not (root / MANIFEST_NAME).exists() and is_bitsandbytes_4bit(root):
        manifest: dict[str, Any] = {}
        version = None
        quant_types = tuple(CODE_TABLES)
    else:
        manifest = _load_json(root / MANIFEST_NAME)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise FormatError(f"{root / MANIFEST_NAME}: not an nf4convert manifest")
        version = check_version(manifest, where=str(root / MANIFEST_NAME))
    suffixes = [QUANT_STATE_SUFFIXES[t] for t in quant_types]
    shards: dict[str, dict[str, TensorInfo]] = {}
    states: dict[str, QuantState] = {}
    owner: dict[str, str] = {}
    names, weight_map = ([root.name], None) if single_file else _shard_names(root)
    root = root.parent if single_file else root
    for name in names:
        shard = root / name
        if not shard.is_file():
            raise FormatError(f"{shard}: missing")
        if not single_file and not may_read(shard, root):  # a file given as itself is read where it leads
            raise FormatError(f"{shard}: leads outside the folder")
        tensors, metadata = read_header(shard)
        if version is not None and metadata.get("nf4convert.version") != str(version):
            raise FormatError(f"{shard}: __metadata__ names format version {metadata.get('nf4convert.version')!r}, manifest {version}")
        for key in tensors:
            if key in owner:
                raise FormatError(f"{shard}: tensor {key!r} also in {owner[key]}")
            owner[key] = name
        blobs = {k: suffix for k in tensors for suffix in suffixes if k.endswith("." + suffix)}
        if blobs:
            with SafetensorsFile(shard) as f:
                for blob_key, suffix in blobs.items():
                    key = blob_key[: -len(suffix) - 1]
                    states[key] = _check_weight(key, blob_key, tensors, f, str(shard), quant_types)
        for key in tensors:
            base = _base_key(key)
            if base != key and base not in states:
                raise FormatError(f"{shard}: {key} has no quantized weight {base} with a quant state")
        shards[name] = tensors
    if weight_map is not None and weight_map != owner:
        wrong = sorted(set(weight_map.items()) ^ set(owner.items()))[0][0]
        index = next(root / n for n in INDEX_NAMES if (root / n).exists())
        raise FormatError(f"{index}: does not match the shards (first difference: {wrong!r})")
    return NF4Checkpoint(root, manifest, shards, states, single_file)



def stored_weight(f: SafetensorsFile, ckpt: NF4Checkpoint, key: str) -> NF4Weight:
    """The stored NF4 form of quantized weight ``key``, as views of shard ``f`` (for :func:`~nf4convert.quantize.dequantize`)."""
    state = ckpt.quant_states[key]
    return NF4Weight(
        f.tensor(key),
        f.tensor(f"{key}.absmax"),
        state.shape,
        getattr(torch, state.dtype),
        state.blocksize,
        f.tensor(f"{key}.nested_absmax") if state.nested else None,
        state.offset,
        state.quant_type,
    )
