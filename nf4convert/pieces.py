"""Reading a weight in pieces: the source side of one shard's conversion.

Weights are read in pieces of whole blocks (at most :data:`PIECE_BYTES` each), each on a reader thread
while the one before is quantized. A piece stays raw source bytes (or float32, for FP8 decoded by the
native kernel), so that the default conversion never imports torch; what only torch decodes or
transforms (MXFP4, experts cut from fused ones, activation-aware scaling) comes as a tensor.

A piece that only the native kernel reads (whole blocks quantized as raw bytes, FP8 bytes it decodes) is
memory-mapped where the page cache holds all of it (:meth:`~nf4convert.tensorfile.ShardReader.map_cached`):
no copy through a buffer. The kernel's SIGBUS guard (:func:`nf4convert.native.guard`) turns a source
truncated under the mapping into a one-line error. Every other piece, and every piece still on the
disk, is read with ``pread`` into reused numpy buffers: torch and numpy never touch a mapping.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import native
from .awq import apply as apply_scaling
from .constants import DTYPE_SIZES, NESTED_BLOCKSIZE
from .errors import SourceError
from .files import file_state
from .fp8 import decode_rows
from .mxfp4 import decode as decode_mxfp4
from .plan import PlannedTensor
from .tensorfile import ShardReader, torch_dtypes

if TYPE_CHECKING:
    import torch

#: The most source bytes of one weight read and quantized at a time: memory stays bounded whatever the
#: size of a single tensor, and the bytes written do not depend on it (blocks are independent).
PIECE_BYTES = 64 << 20


#: Pieces read ahead of the one being quantized: the reader goes on to the next piece as soon as it has
#: read one, so the disk never waits on a piece whose quantization takes longer than its read.
READ_AHEAD = 2

#: A piece of a weight as read: raw source bytes or float32 values (numpy; see :func:`piece_dtype`), or
#: a tensor where torch decoded or transformed it.
Piece = Any


def pieces(t: PlannedTensor, blocksize: int, nested: bool = False) -> list[tuple[int, int]]:
    """The element ranges ``[start, stop)`` in which weight ``t`` is read and quantized: whole blocks,
    at most :data:`PIECE_BYTES` of source each (a transposed ``Conv1D`` weight in one piece, transposed
    fused experts in whole experts). An FP8
    weight goes in whole rows, at most :data:`PIECE_BYTES` once decoded to float32. With ``nested``,
    whole nested blocks (:data:`~nf4convert.constants.NESTED_BLOCKSIZE` blocks), however small
    :data:`PIECE_BYTES` is. MXFP4 experts go in whole experts, decoded to float32."""
    info = t.source.info
    if (t.transpose and len(info.shape) == 2) or t.source.split is not None:
        return [(0, info.numel)]
    if t.scale is not None:
        unit, size = math.lcm(info.shape[1], blocksize), DTYPE_SIZES["F32"]
    elif t.source.packed is not None:
        unit, size = info.shape[1] * info.shape[2], DTYPE_SIZES["F32"]
    else:
        unit, size = blocksize, DTYPE_SIZES[info.dtype]
    if t.transpose:
        unit = math.lcm(unit, info.shape[1] * info.shape[2])
    if nested:
        unit = math.lcm(unit, NESTED_BLOCKSIZE * blocksize)
    step = max(unit, PIECE_BYTES // size // unit * unit)
    return [(start, min(info.numel, start + step)) for start in range(0, info.numel, step)]


def on_device(weight: torch.Tensor, t: PlannedTensor, device: str) -> torch.Tensor:
    """A piece as the quantizer takes it: transposed for a ``Conv1D`` weight (each expert's slice for
    fused experts), on ``device``."""
    if t.transpose:
        weight = weight.transpose(-1, -2)
    if weight.device.type != device or t.transpose:
        weight = weight.to(device).contiguous()
    return weight


class SourceShard:
    """A source shard read with ``pread`` (see :class:`ShardReader`), and its size and
    modification time when opened."""

    def __init__(self, path: Path) -> None:
        self.reader = ShardReader(path)
        self.state = file_state(path)

    def check_unchanged(self) -> None:
        """Refuse to go on if the file changed since it was opened."""
        if file_state(self.reader.path) != self.state:
            raise SourceError(f"{self.reader.path}: changed while being converted")


@contextmanager
def mapped_read(t: PlannedTensor, sources: dict[Path, SourceShard]) -> Iterator[None]:
    """Name the file and the tensor in the kernel's error for a mapped piece of ``t`` whose file
    shrank under the mapping (:func:`nf4convert.native.guard`)."""
    try:
        yield
    except SourceError:
        raise SourceError(f"{sources[t.source.shard].reader.path}: ends inside tensor {t.name!r}; it changed while being converted") from None


def piece_dtype(t: PlannedTensor) -> str:
    """The element type of weight ``t``'s pieces as :func:`read_ahead` reads them into numpy arrays:
    float32 for FP8 (decoded), else the source's dtype (raw bytes)."""
    return "F32" if t.scale is not None else t.source.info.dtype


def as_tensor(piece: Piece, t: PlannedTensor) -> torch.Tensor:
    """A piece of weight ``t`` as a torch tensor (imports torch; no copy): a numpy piece viewed as
    :func:`piece_dtype`, shaped ``[-1, *shape[1:]]`` where ``t`` is quantized transposed."""
    if not isinstance(piece, np.ndarray):
        return piece
    import torch

    tensor = torch.from_numpy(piece).view(torch_dtypes()[piece_dtype(t)])
    return tensor.view(-1, *t.source.info.shape[1:]) if t.transpose and t.scale is None else tensor


def read_ahead(
    items: list[tuple[PlannedTensor, int, int]], sources: dict[Path, SourceShard], pool: ThreadPoolExecutor, fp8_block: tuple[int, int] | None,
    scalings: dict[str, tuple[Any, dict[str, torch.Tensor]]] | None = None, raw: frozenset[str] = frozenset(),
) -> Iterator[Piece]:
    """The pieces ``(tensor, start, stop)`` in order, read on ``pool`` (one thread) up to
    :data:`READ_AHEAD` ahead of the one being quantized: ``READ_AHEAD + 1`` reused buffers of the
    largest piece's size, whatever the model's size. A piece's buffer is reused once the next piece
    is taken. A piece is a flat numpy array (:func:`piece_dtype`; FP8 decoded to float32 with
    ``fp8_block`` scales, by the native kernel where it is built, else a tensor decoded by torch). An MXFP4 piece (whole experts) is
    read into buffers of its own and decoded (:func:`nf4convert.mxfp4.decode`), an expert cut from fused
    experts taken by torch. A tensor in ``scalings`` (:func:`nf4convert.awq.scalings_of`) comes
    transformed, a float32 tensor. Use :func:`as_tensor` for a tensor in every case. A piece of whole
    blocks of a weight named in ``raw`` (one the caller hands only to the native kernel) may be a
    read-only mapping of the source (see the module's docstring)."""
    size = max(((stop - start) * DTYPE_SIZES[t.source.info.dtype] for t, start, stop in items if t.source.packed is None and t.source.split is None), default=0)
    buffers = [np.empty(size, dtype=np.uint8) for _ in range(min(READ_AHEAD + 1, len(items)))]
    decoded_size = max((stop - start for t, start, stop in items if t.scale is not None), default=0)
    decoded = [np.empty(decoded_size, dtype=np.float32) for _ in buffers] if decoded_size else []

    scales: dict[str, np.ndarray] = {}  # the FP8 scales of the weight being read (small: one per block)
    scalings = scalings or {}
    mapping = native.guard()

    def source_bytes(i: int) -> np.ndarray:
        t, start, stop = items[i]
        info, k = t.source.info, DTYPE_SIZES[t.source.info.dtype]
        reader = sources[t.source.shard].reader
        kernel_only = t.scale is not None or (t.name in raw and t.name not in scalings and (stop - start) % t.blocksize == 0)
        view = reader.map_cached(info, start * k, (stop - start) * k) if mapping and kernel_only else None
        if view is not None:
            return np.frombuffer(view, dtype=np.uint8)
        data = buffers[i % len(buffers)][: (stop - start) * k]
        reader.read_into(info, memoryview(data), start * k)
        return data

    def read_raw(i: int) -> Piece:
        t, start, stop = items[i]
        if t.source.packed is not None:
            return _read_mxfp4(t, start, stop, sources)
        if t.source.split is not None:
            return _read_split(t, sources)
        info = t.source.info
        data = source_bytes(i)
        if t.scale is None:
            return data
        if t.name not in scales:
            scales.clear()
            scales[t.name] = np.empty(t.scale.info.shape, dtype=np.float32)
            sources[t.scale.shard].reader.read_into(t.scale.info, memoryview(scales[t.name]).cast("B"))
        cols = info.shape[1]
        rows, out = data.reshape(-1, cols), decoded[i % len(decoded)][: stop - start]
        if native.library() is not None:
            with mapped_read(t, sources):
                return native.decode_fp8(rows, scales[t.name], start // cols, fp8_block, out).reshape(-1)
        import torch

        return decode_rows(torch.from_numpy(rows), torch.from_numpy(scales[t.name]), start // cols, fp8_block, torch.from_numpy(out)).reshape(-1)

    def read(i: int) -> Piece:
        t, start, _ = items[i]
        piece = read_raw(i)
        return apply_scaling(as_tensor(piece, t), t.source.info.shape, start, *scalings[t.name]) if t.name in scalings else piece

    coming = deque(pool.submit(read, i) for i in range(min(READ_AHEAD, len(items))))
    for i in range(len(items)):
        piece = coming.popleft().result()
        if i + READ_AHEAD < len(items):  # into the buffer of piece i - 1, which the caller is done with
            coming.append(pool.submit(read, i + READ_AHEAD))
        yield piece


def _read_mxfp4(t: PlannedTensor, start: int, stop: int, sources: dict[Path, SourceShard]) -> torch.Tensor:
    """Elements ``[start, stop)`` (whole experts) of an MXFP4 tensor, decoded to float32, flat."""
    import torch

    blocks, scales = t.source.packed
    per_expert = t.source.info.shape[1] * t.source.info.shape[2]
    first, count = start // per_expert, (stop - start) // per_expert
    parts = []
    for part in (blocks, scales):
        size = part.info.nbytes // part.info.shape[0]
        data = torch.empty(count * size, dtype=torch.uint8)
        sources[part.shard].reader.read_into(part.info, memoryview(data.numpy()), first * size)
        parts.append(data.view(count, *part.info.shape[1:]))
    return decode_mxfp4(*parts, name=t.name, first=first).reshape(-1)


def _read_split(t: PlannedTensor, sources: dict[Path, SourceShard]) -> torch.Tensor:
    """One expert's weight cut from fused experts (:class:`~nf4convert.source.Split`): the expert's matrix
    read whole, the weight taken from it, flat."""
    import torch

    split, info = t.source.split, t.source.split.fused.info
    per_expert, size = info.shape[1] * info.shape[2], DTYPE_SIZES[info.dtype]
    data = torch.empty(per_expert * size, dtype=torch.uint8)
    sources[split.fused.shard].reader.read_into(info, memoryview(data.numpy()), split.expert * per_expert * size)
    return split.take(data.view(torch_dtypes()[info.dtype]).view(info.shape[1:])).reshape(-1)
