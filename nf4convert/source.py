"""The source checkpoint: which safetensors shards, which tensors, which side files.

Nothing here reads tensor data; it reads and validates headers, the index and
``config.json``, and refuses anything that points outside the source.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .constants import DIFFUSERS_FILES, INDEX_NAME, INDEX_NAMES, MANIFEST_NAME
from .errors import SourceError, SourceNotFoundError
from .files import is_plain_relative, may_read, recorded_files
from .fp8 import block_size
from .mxfp4 import is_mxfp4, pair as pair_mxfp4
from .tensorfile import TensorInfo, read_header

if TYPE_CHECKING:
    import torch

#: Side files copied next to the weights: configs, tokenizers, chat templates, licenses (subfolders too,
#: e.g. sentence-transformers' ``1_Pooling/config.json``; hidden folders are skipped).
SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "LICENSE*", "NOTICE*", "USE_POLICY*")
#: Weights in formats nf4convert does not read; never copied.
OTHER_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.pkl")


class ShardFetcher(Protocol):
    """Brings remote source shards to local disk one at a time (:class:`nf4convert.hub.HubShards`).
    Sent to worker processes with the tasks: it must pickle."""

    def names(self) -> list[str]:
        """The remote ``*.safetensors`` files, as paths relative to the source folder."""

    def header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """The shard's validated header (:func:`~nf4convert.tensorfile.read_header`), fetched alone."""

    def fetch(self, path: Path) -> Path:
        """Make the shard planned at ``path`` a complete local file (idempotent) and return its path."""

    def release(self, path: Path) -> None:
        """Delete the shard's local copy: no later task reads it."""

    def records(self) -> list[dict[str, Any]]:
        """``{"name", "size", "sha256"}`` of every shard, as the remote publishes them."""

    def identity(self) -> list[list[Any]]:
        """What identifies the remote shards (for resuming), without fetching them."""


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source: its shard and where it lies there.

    Attributes:
        packed: for a tensor decoded from MXFP4 (:mod:`nf4convert.mxfp4`), its blocks and scales
            (``info`` is then the decoded tensor's, which no file holds), else ``None``.
        split: for one expert's 2-D weight cut from a fused 3-D experts tensor (``info`` is then that
            weight's, which no file holds), where it lies there; else ``None``.
    """

    shard: Path
    info: TensorInfo
    packed: tuple[SourceTensor, SourceTensor] | None = None
    split: Split | None = None

    @property
    def name(self) -> str:
        return self.info.name


@dataclass(frozen=True)
class Split:
    """One expert's 2-D weight ``[out, in]`` in a fused experts tensor ``[E, a, b]``: expert ``expert``'s
    matrix, its rows ``[start, stop)`` (``transposed`` false: stored ``[out, in]``) or its columns
    ``[start, stop)``, transposed (``transposed``: stored ``[in, out]``).

    Attributes:
        fused: the fused tensor.
    """

    fused: SourceTensor
    expert: int
    start: int
    stop: int
    transposed: bool

    def take(self, matrix: torch.Tensor) -> torch.Tensor:
        """The weight, contiguous, from the expert's ``[a, b]`` matrix."""
        return cut_weight(matrix, self.start, self.stop, self.transposed)


def cut_weight(matrix: torch.Tensor, start: int, stop: int, transposed: bool) -> torch.Tensor:
    """One layer's weight ``[out, in]``, contiguous, from an expert's matrix of fused experts: its rows
    ``[start, stop)``, or its columns ``[start, stop)`` transposed (spec section 6.1)."""
    return (matrix[:, start:stop].T if transposed else matrix[start:stop]).contiguous()


def split_info(fused: TensorInfo, name: str, expert: int, start: int, stop: int, transposed: bool) -> TensorInfo:
    """The :class:`TensorInfo` of one expert's weight cut from ``fused`` (see :class:`Split`): no file
    holds it; its byte range is its share of the expert's (``nbytes`` is its size)."""
    _, a, b = fused.shape
    shape = (stop - start, a) if transposed else (stop - start, b)
    size = fused.nbytes // fused.numel
    first = fused.start + expert * a * b * size
    return TensorInfo(name, fused.dtype, shape, first, first + shape[0] * shape[1] * size)


def split_tensor(fused: SourceTensor, name: str, expert: int, start: int, stop: int, transposed: bool) -> SourceTensor:
    """The :class:`SourceTensor` of one expert's weight cut from ``fused`` (see :class:`Split`)."""
    info = split_info(fused.info, name, expert, start, stop, transposed)
    return SourceTensor(fused.shard, info, split=Split(fused, expert, start, stop, transposed))


@dataclass
class Source:
    """A resolved source checkpoint.

    Attributes:
        path: what was given: the folder, or the single file.
        root: the folder holding the shards.
        name: a short name for provenance (the folder or file name, or a Hub repo id).
        shards: the safetensors files, in order.
        tensors: every tensor, in shard order then file order.
        config: ``config.json``'s content, or ``None``.
        side_files: non-weight files to copy to the output (``config.json`` is rewritten, not copied).
        provenance: extra facts for the manifest (Hub repo and commit, ...).
        fp8_block: ``weight_block_size`` of a block-scaled FP8 checkpoint (:mod:`nf4convert.fp8`), else ``None``.
        fetcher: for a source whose shards are not on local disk yet (``--stream``), what brings each
            one to its path in :attr:`shards` when a task needs it.
    """

    path: Path
    root: Path
    name: str
    shards: list[Path]
    tensors: list[SourceTensor]
    config: dict[str, Any] | None
    side_files: list[Path] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    fp8_block: tuple[int, int] | None = None
    fetcher: ShardFetcher | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)

    def identity(self) -> list[list[Any]]:
        """What tells this source's shards from any other's: name, size, modification time and a hash
        of the header of each local shard; a remote source's own records (:meth:`ShardFetcher.identity`)."""
        if self.fetcher is not None:
            return self.fetcher.identity()
        shards = []
        for path in self.shards:
            with open(path, "rb") as f:
                prefix = f.read(8)
                header = prefix + f.read(int.from_bytes(prefix, "little"))
            st = path.stat()
            shards.append([path.name, st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()])
        return shards


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e.__class__.__name__})") from None


def _shards_from_index(root: Path, index_path: Path, exists: Callable[[Path], bool]) -> tuple[list[Path], dict[str, str]]:
    index = _load_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: no weight_map")
    shards: dict[str, Path] = {}
    for tensor, filename in weight_map.items():
        if not isinstance(filename, str) or filename in shards:
            continue
        if not is_plain_relative(filename) or not filename.endswith(".safetensors"):
            raise SourceError(f"{index_path}: shard path {filename!r} (for {tensor!r}) is not a file inside the source")
        path = root / filename
        if not may_read(path, root):
            raise SourceError(f"{index_path}: shard {filename!r} leads outside the source folder")
        if not exists(path):
            raise SourceNotFoundError(f"{index_path}: shard {filename!r} (for {tensor!r}) does not exist")
        shards[filename] = path
    return [shards[k] for k in sorted(shards)], weight_map


#: ``<prefix>-00002-of-00005.safetensors``: one shard of a numbered set
_NUMBERED = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def _check_numbered_shards(root: Path, names: list[str]) -> None:
    """Refuse a folder without an index whose numbered shards (``-0000N-of-0000M``) are not all there."""
    sets: dict[tuple[str, int], set[int]] = {}
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            sets.setdefault((m["prefix"], int(m["count"])), set()).add(int(m["index"]))
    for (prefix, count), present in sorted(sets.items()):
        missing = sorted(set(range(1, count + 1)) - present)
        if missing:
            first = f"{prefix}-{missing[0]:05d}-of-{count:05d}.safetensors"
            raise SourceError(f"{root}: shard {missing[0]} of {count} is missing ({first}; {len(missing)} missing in all, and no {INDEX_NAME})")


#: What the manifest keeps of the source's model card (its YAML front matter), for the output's card.
CARD_FIELDS = ("license", "pipeline_tag", "library_name", "datasets", "language")


def card_fields(path: Path) -> dict[str, Any]:
    """The :data:`CARD_FIELDS` a model card's front matter sets; ``{}`` without a card, or for one
    that cannot be parsed (it only loses its metadata)."""
    if not path.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        metadata = metadata_load(path) or {}
    except Exception:  # noqa: BLE001 - malformed YAML in someone's README
        return {}
    return {k: metadata[k] for k in CARD_FIELDS if metadata.get(k)}


def _fold_mxfp4(tensors: list[SourceTensor], *, where: str) -> list[SourceTensor]:
    """The source's tensors with each MXFP4 pair (``X_blocks``, ``X_scales``) replaced by the decoded
    tensor ``X`` it stands for, in the blocks' place.

    Raises:
        SourceError: see :func:`nf4convert.mxfp4.pair`.
    """
    by_name = {t.name: t for t in tensors}
    pairs = pair_mxfp4([t.info for t in tensors], where=where)
    folded = {blocks.name: (logical, blocks, scales) for logical, blocks, scales in pairs.values()}
    scales_names = {scales.name for _, _, scales in pairs.values()}
    out = []
    for t in tensors:
        if t.name in folded:
            logical, blocks, scales = folded[t.name]
            out.append(SourceTensor(t.shard, logical, (t, by_name[scales.name])))
        elif t.name not in scales_names:
            out.append(t)
    return out


def open_source(path: str | os.PathLike, *, fetcher: ShardFetcher | None = None) -> Source:
    """Resolve a local source: a folder of safetensors shards or a single ``.safetensors`` file.

    Files the index names, and side files, must resolve inside the source folder (or, for a Hugging
    Face cache snapshot, inside its repo folder).

    Args:
        path: the folder or file.
        fetcher: the shards are remote (``--stream``): ``path`` holds the other files, ``fetcher``
            lists the shards and reads their headers; they are fetched when converted.

    Returns:
        The :class:`Source`, with every shard header validated.

    Raises:
        SourceNotFoundError: the path does not exist or holds no safetensors weights.
        SourceError: a bad index, a shard outside the source, duplicate tensor names, an already quantized model.
        FormatError: a shard is not valid safetensors.
    """
    path = Path(path)
    if not path.exists():
        raise SourceNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            hint = "pickled *.bin weights are read only with --allow-pickle" if path.suffix == ".bin" else "pickled weights are never loaded"
            raise SourceError(f"{path}: not a .safetensors file ({hint})")
        # the folder's config.json (if any) describes the file: the output keeps it and stays loadable
        root, shards, weight_map, side = path.parent, [path], None, []
    else:
        root = path
        index_path = next((root / name for name in INDEX_NAMES if (root / name).is_file()), root / INDEX_NAME)
        if fetcher is None:
            exists, listed = Path.is_file, [p for p in root.glob("*.safetensors") if p.is_file()]
        else:
            remote = {root / name for name in fetcher.names()}
            exists, listed = remote.__contains__, [p for p in remote if p.parent == root]
        if index_path.is_file():
            shards, weight_map = _shards_from_index(root, index_path, exists)
        else:
            shards, weight_map = sorted(listed), None
            _check_numbered_shards(root, [p.name for p in shards])
            for shard in shards:
                if not may_read(shard, root):
                    raise SourceError(f"{shard}: leads outside the source folder")
        if not shards:
            others = [p.name for p in root.iterdir() if any(fnmatch.fnmatch(p.name, g) for g in OTHER_WEIGHT_PATTERNS)]
            hint = f" (found {', '.join(sorted(others)[:3])}: other weight formats are not read; *.bin only with --allow-pickle)" if others else ""
            raise SourceNotFoundError(f"{root}: no *.safetensors weights{hint}")
        # an output of nf4convert's inside the folder (or its partial, lock, scratch) is never a side file
        ours = [d for d in root.rglob("*") if d.is_dir() and (".nf4convert-" in d.name or recorded_files(d) is not None)]
        side = sorted(
            p
            for p in root.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and any(fnmatch.fnmatch(p.name, g) for g in SIDE_FILE_PATTERNS)
            and p.relative_to(root).as_posix() not in (*INDEX_NAMES, MANIFEST_NAME, "config.json")
            and not any(p.is_relative_to(d) for d in ours)
            and may_read(p, root)
        )
    config_path = root / "config.json"
    config = _load_json(config_path) if config_path.is_file() else None
    if config is not None and not isinstance(config, dict):
        raise SourceError(f"{config_path}: not a JSON object")
    diffusers_weights = DIFFUSERS_FILES.single.removesuffix(".safetensors")
    if config is None and any(p.name.startswith(diffusers_weights) for p in shards):
        raise SourceError(f"{config_path}: missing: diffusers weights ({shards[0].name}) are decided from their model's config.json (its _class_name)")
    fp8_block = block_size(config, where=str(config_path))
    tensors: list[SourceTensor] = []
    owner: dict[str, Path] = {}
    for shard in shards:
        infos, _ = fetcher.header(shard) if fetcher else read_header(shard)
        for info in infos.values():
            if info.name in owner:
                raise SourceError(f"duplicate tensor {info.name!r} in {owner[info.name].name} and {shard.name}")
            if weight_map is not None and weight_map.get(info.name) != shard.relative_to(root).as_posix():
                raise SourceError(f"{shard}: tensor {info.name!r} is not listed for this shard in {index_path.name}")
            owner[info.name] = shard
            tensors.append(SourceTensor(shard, info))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(owner))
        if missing:
            raise SourceError(f"{index_path.name} lists {missing[0]!r} ({len(missing)} in all) that no shard holds")
    if not tensors:
        raise SourceError(f"{path}: the safetensors files hold no tensors")
    if is_mxfp4(config):
        tensors = _fold_mxfp4(tensors, where=str(path))
    src = Source(path=path, root=root, name=path.name, shards=shards, tensors=tensors, config=config, side_files=side, fp8_block=fp8_block, fetcher=fetcher)
    src.provenance.update(card_fields(root / "README.md"))
    return src

