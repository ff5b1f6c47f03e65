"""The safetensors container: a validating header reader, zero-copy tensor views, and a header builder.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
then the data; offsets are relative to the data's start. The reader rejects
everything the safetensors specification forbids (holes, overlaps, offsets past
the end, sizes that disagree with dtype and shape, duplicate names, oversized
headers) with a :class:`~nf4convert.errors.FormatError` naming the file.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .constants import DTYPE_SIZES, MAX_HEADER_BYTES
from .errors import FormatError, SourceError

if TYPE_CHECKING:
    import torch

#: ``madvise`` advice that reads a mapped range in and fails (EFAULT) where the file ends before it
#: (Linux 5.14; Python 3.11's mmap module lacks the name).
MADV_POPULATE_READ = 22


@cache
def _mincore() -> Any:
    """libc's ``mincore``, or ``None`` where there is none."""
    import ctypes

    mincore = getattr(ctypes.CDLL(None, use_errno=True), "mincore", None)
    if mincore is not None:
        mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        mincore.restype = ctypes.c_int
    return mincore


def _resident(mapped: mmap.mmap) -> bool:
    """Whether every page of a mapping is in the page cache (``False`` where that cannot be told)."""
    mincore = _mincore()
    if mincore is None:
        return False
    view = memoryview(mapped)
    try:
        pages = np.zeros(-(-len(mapped) // mmap.PAGESIZE), dtype=np.uint8)
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        return mincore(address, len(mapped), pages.ctypes.data) == 0 and bool((pages & 1).all())
    finally:
        view.release()


#: safetensors dtype -> the name of the torch dtype.
_TORCH_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
}  # fmt: skip


@cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype -> torch dtype, for the dtypes this torch knows. Imports torch, which
    nothing else here needs: reading headers and raw bytes stays free of its start-up time."""
    import torch

    return {name: getattr(torch, attr) for name, attr in _TORCH_DTYPE_NAMES.items() if hasattr(torch, attr)}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file.

    Attributes:
        name: the tensor's key.
        dtype: safetensors dtype string (``"BF16"``, ``"U8"``, ...).
        shape: the tensor's shape.
        start: absolute byte offset of its data in the file.
        end: absolute byte offset one past its data.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise FormatError(f"duplicate tensor name {key!r}")
        seen[key] = value
    return seen


def _parse_entry(name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"tensor {name!r}: entry is not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    if offsets[1] > data_size:
        raise FormatError(f"tensor {name!r}: data ends at byte {offsets[1]}, past the end of the file (truncated?)")
    if math.prod(shape) * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise FormatError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold {dtype} {shape}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def header_length(prefix: bytes, size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's ``size``.

    Raises:
        FormatError: too short, or a length past the limit or the end of the file.
    """
    if len(prefix) < 8:
        raise FormatError("too short for a safetensors header (truncated?)")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"header claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed")
    if 8 + n > size:
        raise FormatError(f"header claims {n} bytes but the file has {size - 8} (truncated?)")
    return n


def parse_header(raw: bytes, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the JSON header ``raw`` of a safetensors file of ``size`` bytes (see :func:`read_header`).

    Raises:
        FormatError: what is wrong, without the file's name.
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ is not a map of strings")
    data_start = 8 + len(raw)
    data_size = size - data_start
    entries = sorted(
        ((name, *_parse_entry(name, entry, data_size)) for name, entry in header.items()),
        key=lambda e: (e[3], e[4]),
    )
    position = 0
    tensors: dict[str, TensorInfo] = {}
    for name, dtype, shape, begin, end in entries:
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a hole before it"
            raise FormatError(f"tensor {name!r}: data at byte {begin} {what}")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        position = end
    if position != data_size:
        raise FormatError(f"{data_size - position} bytes after the last tensor")
    return tensors, metadata


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors file's header.

    Args:
        path: the file.

    Returns:
        ``(tensors, metadata)``: name -> :class:`TensorInfo` in file order, and ``__metadata__`` (or ``{}``).

    Raises:
        FormatError: the file is not a valid safetensors file; the message names it.
        OSError: the file cannot be opened.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = header_length(f.read(8), size)
            return parse_header(f.read(n), size)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None


class SafetensorsFile:
    """A validated safetensors file, memory-mapped; tensors are zero-copy views.

    Use as a context manager. With ``copy_on_write`` the mapping is private: views may be
    written (the file never changes) and may outlive the context, which keeps the mapping
    alive. Otherwise views are read-only and must not outlive it.

    Example:
        >>> with SafetensorsFile("model.safetensors") as f:          # doctest: +SKIP
        ...     w = f.tensor("lm_head.weight")
    """

    def __init__(self, path: str | os.PathLike, *, copy_on_write: bool = False) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        access = mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_READ
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._mmap = mmap.mmap(f.fileno(), 0, access=access) if size else None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file (left to the garbage collector while a view still uses it)."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass
            self._mmap = None

    def header_bytes(self) -> bytes:
        """The file's first bytes up to the data: length prefix and JSON header."""
        if self._mmap is None:
            return b""
        return self._mmap[: 8 + int.from_bytes(self._mmap[:8], "little")]

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, without copying."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return memoryview(b"")
        return memoryview(self._mmap)[info.start : info.end]

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a torch view of the mapped file (read-only unless ``copy_on_write``).

        Raises:
            FormatError: its dtype has no torch equivalent here.
        """
        import torch

        info = self.tensors[name]
        if info.dtype not in torch_dtypes():
            raise FormatError(f"{self.path}: tensor {name!r} has dtype {info.dtype}, which this torch cannot read")
        dtype = torch_dtypes()[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": the view is read-only by contract
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache)."""
        info = self.tensors[name]
        page = mmap.PAGESIZE
        start = info.start // page * page
        if self._mmap is not None and info.end > start and hasattr(self._mmap, "madvise"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, info.end - start)


class ShardReader:
    """A safetensors file read with ``pread``: a file that shrinks while it is being read gives a
    :class:`~nf4convert.errors.SourceError` on a short read, where a mapping would kill the process
    with SIGBUS. :meth:`map_cached` maps a range instead, for a reader that survives SIGBUS (the native
    kernel). Safe to use from several threads (reads carry their offset)."""

    #: Bytes per chunk of :meth:`chunks`.
    CHUNK = 16 << 20

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read_into(self, info: TensorInfo, out: memoryview, offset: int = 0) -> None:
        """Read ``out.nbytes`` bytes of the tensor, from ``offset`` within it, into ``out``.

        Raises:
            SourceError: the file ends before them.
        """
        done = 0
        while done < out.nbytes:
            n = os.preadv(self._fd, [out[done:]], info.start + offset + done)
            if n == 0:
                raise SourceError(f"{self.path}: ends inside tensor {info.name!r}; it changed while being converted")
            done += n

    def map_cached(self, info: TensorInfo, offset: int, nbytes: int) -> memoryview | None:
        """``nbytes`` bytes of the tensor, from ``offset`` within it, memory-mapped read-only (no copy),
        where all of them are in the page cache (``mincore``), else ``None``: from the disk, a read
        into a buffer (:meth:`read_into`) is as fast and its copy overlaps the wait. The mapping
        lives as long as the view. Only for a reader that survives SIGBUS
        (:func:`nf4convert.native.guard`): the file may still shrink after this returns.

        Raises:
            SourceError: the file ends before them.
        """
        begin = info.start + offset
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fd, begin + nbytes - aligned, prot=mmap.PROT_READ, offset=aligned)
        except ValueError:  # mmap checks the range against the file's size, now: it shrank
            raise SourceError(f"{self.path}: ends inside tensor {info.name!r}; it changed while being converted") from None
        except OSError:  # a file system that cannot map, or no address space left: read it instead
            return None
        if not _resident(mapped):
            mapped.close()
            return None
        try:
            if sys.platform.startswith("linux"):  # the number means something else, or nothing, elsewhere
                mapped.madvise(MADV_POPULATE_READ)  # page tables filled here, on the reader's thread
        except OSError as e:
            if e.errno == errno.EFAULT:
                mapped.close()
                raise SourceError(f"{self.path}: ends inside tensor {info.name!r}; it changed while being converted") from None
            if e.errno != errno.EINVAL:  # EINVAL: a kernel without it, and the accesses fill them; else read it instead
                mapped.close()
                return None
        return memoryview(mapped)[begin - aligned : begin - aligned + nbytes]

    def chunks(self, info: TensorInfo) -> Iterator[memoryview]:
        """The tensor's bytes in order, :attr:`CHUNK` at a time, through one reused buffer: each chunk
        is valid until the next one is asked for."""
        buffer = memoryview(bytearray(min(self.CHUNK, info.nbytes)))
        for offset in range(0, info.nbytes, self.CHUNK):
            part = buffer[: min(self.CHUNK, info.nbytes - offset)]
            self.read_into(info, part, offset)
            yield part

    def copy_to(self, info: TensorInfo, fd: int, offset: int, copied: Callable[[int], None] | None = None) -> bool:
        """Copy the tensor's bytes into file ``fd`` at ``offset`` inside the kernel (``copy_file_range``:
        no pass through user space, a shared extent where the file system can), :attr:`CHUNK` at a
        time, calling ``copied`` with the bytes done after each. ``False``, with nothing written, where
        the kernel or the file systems cannot.

        Raises:
            SourceError: the file ends before the tensor does.
        """
        copy = getattr(os, "copy_file_range", None)
        done = 0
        while done < info.nbytes:
            try:
                n = copy(self._fd, fd, min(self.CHUNK, info.nbytes - done), info.start + done, offset + done) if copy else -1
            except OSError as e:
                if done == 0 and e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    return False
                raise
            if n < 0:
                return False
            if n == 0:
                raise SourceError(f"{self.path}: ends inside tensor {info.name!r}; it changed while being converted")
            done += n
            if copied is not None:
                copied(done)
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def build_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    """Lay out a safetensors file: the header bytes and each tensor's absolute data offset.

    Tensors are placed by decreasing element size (then in the given order), so every
    tensor is aligned to its element size with no holes; the header is padded with
    spaces to a multiple of 8 bytes.

    Args:
        entries: ``(name, safetensors dtype, shape)`` for each tensor.
        metadata: the ``__metadata__`` map.

    Returns:
        ``(header, offsets)``: the bytes to write at offset 0 (length prefix included) and
        name -> absolute offset of the tensor's data.
    """
    order = sorted(range(len(entries)), key=lambda i: (-DTYPE_SIZES[entries[i][1]], i))
    header: dict[str, Any] = {"__metadata__": metadata}
    relative: dict[str, int] = {}
    position = 0
    for i in order:
        name, dtype, shape = entries[i]
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        relative[name] = position
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    data_start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {k: data_start + v for k, v in relative.items()}
