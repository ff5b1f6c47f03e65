"""Writing the output: an atomic output folder, streaming shard writers, hashes and the manifest.

Every file is written inside a partial folder next to the target
(``<name>.nf4convert-partial``) and the folder is renamed into place only once
everything, the manifest last, is written and synced: an interrupted conversion
never leaves an output that looks complete.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .constants import DTYPE_SIZES
from .errors import FormatError, OutputError
from .tensorfile import build_header

PARTIAL_SUFFIX = ".nf4convert-partial"
_HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path, name: str) -> dict[str, Any]:
    """``{"name", "size", "sha256"}`` of one file, as the manifest lists it."""
    return {"name": name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def check_output(target: Path, *, source: Path, force: bool = False) -> None:
    """Refuse an output that exists (without ``force``), is a file, or overlaps the source.

    Raises:
        OutputError: with the reason.
    """
    resolved, src = target.resolve(), source.resolve()
    if resolved == src or resolved.is_relative_to(src):
        raise OutputError(f"{target}: the output folder must not lie inside the source folder {source}")
    if src.is_relative_to(resolved):
        raise OutputError(f"{target}: the output folder must not contain the source")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")
    if target.exists() and not force:
        raise OutputError(f"{target}: already exists (use --force to replace it)")


class OutputFolder:
    """The output folder, built in a partial folder beside it and renamed into place by :meth:`commit`.

    Used as a context manager: leaving it by an exception removes the partial folder.

    Raises:
        OutputError: as :func:`check_output`, or the partial folder cannot be created.
    """

    def __init__(self, target: Path, *, source: Path, force: bool = False) -> None:
        check_output(target, source=source, force=force)
        self.target = target
        self.partial = target.with_name(target.name + PARTIAL_SUFFIX)
        if self.partial.exists():
            shutil.rmtree(self.partial)
        try:
            self.partial.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"{self.partial}: cannot create ({e.strerror})") from None

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is not None and self.partial.exists():
            shutil.rmtree(self.partial, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.partial / name

    def commit(self) -> Path:
        """Sync the partial folder and rename it to the target (replacing an old one)."""
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        old = None
        if self.target.exists():
            old = self.target.with_name(self.target.name + ".nf4convert-old")
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
        self.partial.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target


def as_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order (CPU, contiguous), without a copy when possible."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Writes one safetensors shard whose layout is known up front.

    The header is written first, the file is sized, and each tensor's bytes go to their
    planned offset (in any order); :meth:`finish` checks that every tensor was written and syncs.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        self.path = path
        header, self.offsets = build_header(entries, metadata)
        self.sizes = {name: DTYPE_SIZES[dtype] * math.prod(shape) for name, dtype, shape in entries}
        self.pending = set(self.sizes)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(memoryview(header), 0)
        os.ftruncate(self.fd, len(header) + sum(self.sizes.values()))

    def _pwrite(self, data: memoryview, offset: int) -> None:
        data = data.cast("B")
        while data:
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n

    def write(self, name: str, data: memoryview | torch.Tensor) -> None:
        """Write one tensor's bytes at its planned place."""
        view = as_bytes(data) if isinstance(data, torch.Tensor) else data
        if name not in self.pending or view.nbytes != self.sizes[name]:
            raise FormatError(f"{self.path.name}: tensor {name!r} does not match the plan ({view.nbytes} bytes)")
        self._pwrite(view, self.offsets[name])
        self.pending.discard(name)

    def finish(self) -> None:
        """Check that every planned tensor was written, sync and close."""
        if self.pending:
            raise FormatError(f"{self.path.name}: tensors not written: {', '.join(sorted(self.pending)[:3])}")
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        """Close the file (idempotent); an unfinished shard stays incomplete."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
