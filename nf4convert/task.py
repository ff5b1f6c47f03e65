"""One output shard's conversion, as a task: a plain function of (plan, shard) that any process can run.

:func:`run_task` reads the shard's source tensors, quantizes them and writes the shard under a
temporary name, syncs and hashes it and renames it into place; it returns a small record (name,
size, sha256, counts, the source shards it hashed), never tensors. Running it twice (a retry)
leaves the same bytes. :mod:`nf4convert.convert` runs the tasks one after the other in this
process, :mod:`nf4convert.cluster` on Dask workers: the same function either way.

Inside a task, weights are read in pieces of whole blocks (at most :data:`PIECE_BYTES` each) with
``pread`` into two reused buffers, each on a reader thread while the one before is quantized in the
calling thread; a writer thread writes each piece's codes at its planned offset (and copies kept
tensors from source to output inside the kernel, ``copy_file_range``, where the file systems allow), then a weight's absmax once all its pieces are done (double quantization needs
them all: 4 bytes per block, 1/16 of a bf16 weight at blocksize 64). Source shards are hashed by
another thread meanwhile. Nothing is memory-mapped, so a source file truncated under the converter is
a one-line error, not SIGBUS; at most a few pieces are in flight, so peak memory grows neither with the
model's size nor with the largest tensor's.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .constants import DTYPE_SIZES, DYNAMIC_MAP, METADATA, NESTED_BLOCKSIZE, NF4_CODE
from .errors import SourceError
from .files import FileHasher, file_record, file_state
from .fp8 import decode_rows
from .mxfp4 import decode as decode_mxfp4
from .awq import apply as apply_scaling
from .awq import scaled_importance, scalings_of
from .importance import load_importance
from .layout import encode_quant_state
from .plan import Options, PlannedTensor
from .quantize import dequantize_absmax, double_quantize, encode_nf4, exact_mean, quantize_nf4
from .source import ShardFetcher
from .tensorfile import ShardReader, torch_dtypes
from .write import ShardWriter, fsync_folder, write_shard_record

Progress = Callable[[int], None]
#: Pieces quantized ahead of the writer thread: bounds memory to a few pieces.
_MAX_PENDING = 2
#: The most source bytes of one weight read and quantized at a time: memory stays bounded whatever the
#: size of a single tensor, and the bytes written do not depend on it (blocks are independent).
PIECE_BYTES = 64 << 20

#: The offset of a part that is a kept tensor copied whole from its source (:meth:`ShardWriter.copy`).
COPY = -1
_NF4_TABLE = torch.tensor(NF4_CODE, dtype=torch.float32)
_DYNAMIC_TABLE = torch.tensor(DYNAMIC_MAP, dtype=torch.float32)


@dataclass(frozen=True)
class ShardTask:
    """Everything one output shard's conversion needs, and nothing more (it is sent to other processes).

    Attributes:
        name: the output shard's file name.
        tensors: the planned tensors it holds, in order.
        options: the conversion options.
        folder: where the shard goes (the output's partial folder; shared by all workers).
        fp8_block: the source's FP8 ``weight_block_size``, or ``None``.
        hash_sources: source shards ``(path, name in the manifest)`` this task hashes: those it is the
            first to read.
        release: source shards no later task reads, given back to ``fetcher`` when done.
        fetcher: brings remote source shards to their paths (``--stream``), else ``None``.
        importance: the importance file weighting the scale search (``--importance``), else ``None``.
        scaling: the importance file whose activation-aware scaling is applied (``--awq``), else ``None``.
        kernel: quantizer kernel (resolved: ``"native"`` or ``"eager"``).
        device: where to quantize.
    """

    name: str
    tensors: tuple[PlannedTensor, ...]
    options: Options
    folder: Path
    fp8_block: tuple[int, int] | None = None
    hash_sources: tuple[tuple[Path, str], ...] = ()
    release: tuple[Path, ...] = ()
    fetcher: ShardFetcher | None = None
    importance: Path | None = None
    scaling: Path | None = None
    kernel: str = "native"
    device: str = "cpu"

    @property
    def source_shards(self) -> list[Path]:
        """The source shards it reads, in order of first use (an FP8 weight's scale may lie in another)."""
        paths = [p for t in self.tensors for p in (t.source.shard, *(s.shard for s in _parts(t)))]
        return list(dict.fromkeys(paths))

    @property
    def source_bytes(self) -> int:
        return sum(t.source.info.nbytes for t in self.tensors)


def _parts(t: PlannedTensor) -> tuple:
    """The source tensors weight ``t`` is decoded from: an FP8 weight's scales, MXFP4's blocks and scales."""
    return t.source.packed or ((t.scale,) if t.scale else ())


def _decoded(t: PlannedTensor) -> bool:
    """Whether tensor ``t`` is read as values, not copied as bytes (FP8, MXFP4, an expert's weight cut from
    fused experts, a kept tensor cast to another dtype or transformed by the activation-aware scaling)."""
    return t.scale is not None or t.source.packed is not None or t.source.split is not None or t.cast is not None or t.scaled


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


def quantize_piece(weight: torch.Tensor, t: PlannedTensor, start: int, importance: torch.Tensor | None, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_nf4` of the piece of ``t`` that begins at element ``start``; with importance
    rows per expert (fused experts), each expert's run of the piece weighed by its own row."""
    if importance is None or importance.dim() == 1:
        return quantize_nf4(weight, name=t.name, first=start, importance=importance, **options)
    flat, per_expert = weight.reshape(-1), t.source.info.numel // importance.shape[0]
    stop = start + flat.numel()
    runs = [(a, min(stop, (a // per_expert + 1) * per_expert)) for a in [start, *range((start // per_expert + 1) * per_expert, stop, per_expert)]]
    parts = [quantize_nf4(flat[a - start : b - start], name=t.name, first=a, importance=importance[a // per_expert], **options) for a, b in runs]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def on_device(weight: torch.Tensor, t: PlannedTensor, device: str) -> torch.Tensor:
    """A piece as the quantizer takes it: transposed for a ``Conv1D`` weight (each expert's slice for
    fused experts), on ``device``."""
    if t.transpose:
        weight = weight.transpose(-1, -2)
    if weight.device.type != device or t.transpose:
        weight = weight.to(device).contiguous()
    return weight


def _scales(
    absmax: torch.Tensor, t: PlannedTensor, *, options: Options, kernel: str, nested: tuple[torch.Tensor, torch.Tensor, float] | None = None
) -> list[tuple[str, Any, int]]:
    """The tensors that follow weight ``t``'s codes, once all its scales are known: absmax (8-bit with
    double quantization: ``nested`` where the pieces already did it, else over the whole tensor), the
    code tables, the quant-state blob."""
    parts: list[tuple[str, Any, int]] = [(f"{t.name}.quant_map", _NF4_TABLE, 0)]
    offset = None
    if options.double_quant:
        quantized, nested_absmax, offset = nested or double_quantize(absmax, kernel)
        parts += [(f"{t.name}.absmax", quantized, 0), (f"{t.name}.nested_absmax", nested_absmax, 0), (f"{t.name}.nested_quant_map", _DYNAMIC_TABLE, 0)]
    else:
        parts.append((f"{t.name}.absmax", absmax, 0))
    parts.append((t.outputs[-1][0], memoryview(encode_quant_state(t.quant_state(options, offset))), 0))
    return parts


def _nested_in_pieces(t: PlannedTensor, options: Options) -> bool:
    """Whether weight ``t``'s double quantization is done piece by piece (spec section 2.6): searched
    scales, whose codes must follow the 8-bit scales a loader will use."""
    return t.quantize and options.scales == "search" and options.double_quant


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


def read_ahead(
    items: list[tuple[PlannedTensor, int, int]], sources: dict[Path, SourceShard], pool: ThreadPoolExecutor, fp8_block: tuple[int, int] | None,
    scalings: dict[str, tuple[Any, dict[str, torch.Tensor]]] | None = None,
) -> Iterator[torch.Tensor]:
    """The pieces ``(tensor, start, stop)`` in order, each read on ``pool`` while the one before is
    quantized: two reused buffers of the largest piece's size, whatever the model's size. A piece is a
    flat tensor (FP8 decoded to float32 with ``fp8_block`` scales), or the shaped weight where it is
    quantized transposed. An MXFP4 piece (whole experts) is read into buffers of its own and decoded
    (:func:`nf4convert.mxfp4.decode`). A tensor in ``scalings`` (:func:`nf4convert.awq.scalings_of`)
    comes transformed, in float32."""
    size = max(((stop - start) * DTYPE_SIZES[t.source.info.dtype] for t, start, stop in items if t.source.packed is None and t.source.split is None), default=0)
    buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(2 if len(items) > 1 else len(items))]
    decoded_size = max((stop - start for t, start, stop in items if t.scale is not None), default=0)
    decoded = [torch.empty(decoded_size, dtype=torch.float32) for _ in buffers] if decoded_size else []

    scales: dict[str, torch.Tensor] = {}  # the FP8 scales of the weight being read (small: one per block)
    scalings = scalings or {}

    def read_raw(i: int) -> torch.Tensor:
        t, start, stop = items[i]
        if t.source.packed is not None:
            return _read_mxfp4(t, start, stop, sources)
        if t.source.split is not None:
            return _read_split(t, sources)
        info, k = t.source.info, DTYPE_SIZES[t.source.info.dtype]
        data = buffers[i % 2][: (stop - start) * k]
        sources[t.source.shard].reader.read_into(info, memoryview(data.numpy()), start * k)
        if t.scale is not None:
            if t.name not in scales:
                scales.clear()
                scales[t.name] = torch.empty(t.scale.info.shape, dtype=torch.float32)
                sources[t.scale.shard].reader.read_into(t.scale.info, memoryview(scales[t.name].numpy()).cast("B"))
            cols = info.shape[1]
            return decode_rows(data.view(-1, cols), scales[t.name], start // cols, fp8_block, decoded[i % 2]).reshape(-1)
        data = data.view(torch_dtypes()[info.dtype])
        return data.view(-1, *info.shape[1:]) if t.transpose else data

    def read(i: int) -> torch.Tensor:
        t, start, _ = items[i]
        piece = read_raw(i)
        return apply_scaling(piece, t.source.info.shape, start, *scalings[t.name]) if t.name in scalings else piece

    coming = pool.submit(read, 0) if items else None
    for i in range(len(items)):
        piece = coming.result()
        coming = pool.submit(read, i + 1) if i + 1 < len(items) else None
        yield piece


def _read_mxfp4(t: PlannedTensor, start: int, stop: int, sources: dict[Path, SourceShard]) -> torch.Tensor:
    """Elements ``[start, stop)`` (whole experts) of an MXFP4 tensor, decoded to float32, flat."""
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
    split, info = t.source.split, t.source.split.fused.info
    per_expert, size = info.shape[1] * info.shape[2], DTYPE_SIZES[info.dtype]
    data = torch.empty(per_expert * size, dtype=torch.uint8)
    sources[split.fused.shard].reader.read_into(info, memoryview(data.numpy()), split.expert * per_expert * size)
    return split.take(data.view(torch_dtypes()[info.dtype]).view(info.shape[1:])).reshape(-1)


def _store(writer: ShardWriter, parts: list[tuple[str, Any, int]], done: int, progress: Progress | None) -> None:
    """Writer thread: write ``(key, data, byte offset)`` parts (``(reader, info), COPY``: a kept tensor
    copied from its source), then report ``done`` source bytes."""
    for key, value, offset in parts:
        if offset == COPY:
            writer.copy(key, *value)
        else:
            writer.write(key, value, offset)
    if progress and done:
        progress(done)


def run_task(task: ShardTask, progress: Progress | None = None) -> dict[str, Any]:
    """Convert one output shard: :func:`write_shard`, then :func:`seal_shard`.

    Returns:
        ``{"name", "size", "sha256"}`` of the shard, ``"sources"``: :func:`file_record` of each source
        shard in ``task.hash_sources``, ``"quantized"`` and ``"kept"``: its tensor counts, ``"seconds"``.

    Raises:
        SourceError, FormatError, QuantizationError, HubError: as :func:`nf4convert.convert.convert`.
    """
    return seal_shard(write_shard(task, progress))


@dataclass
class WrittenShard:
    """A shard whose bytes are all written under a temporary name, not yet synced, hashed or renamed."""

    task: ShardTask
    writer: ShardWriter
    hasher: FileHasher | None
    states: dict[Path, tuple[int, int]]  # each source shard's local copy: its state when opened
    began: float

    def discard(self) -> None:
        """Remove the temporary shard and stop hashing the sources (after an error)."""
        self.writer.close()
        self.writer.path.unlink(missing_ok=True)
        if self.hasher:
            self.hasher.cancel()


def write_shard(task: ShardTask, progress: Progress | None = None) -> WrittenShard:
    """Quantize in this thread while other threads read ahead, write, and hash the source shards this
    task is the first to read; ``progress`` gets source bytes as they are written."""
    began = time.perf_counter()
    local = {path: task.fetcher.fetch(path) if task.fetcher else path for path in task.source_shards}
    hasher = FileHasher([(local[path], name) for path, name in task.hash_sources]) if task.hash_sources else None
    sources = {path: SourceShard(local[path]) for path in task.source_shards}
    temporary = task.folder / f".{task.name}.{uuid.uuid4().hex[:12]}.tmp"  # a retry beside a stray worker never shares it
    written = WrittenShard(task, ShardWriter(temporary, [e for t in task.tensors for e in t.outputs], METADATA), hasher, {}, began)
    writer = written.writer
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"nf4-{role}") for role in ("read", "write")]
    reader, io = pools
    options, device = task.options, task.device
    scalings = scalings_of(task.scaling, [t.name for t in task.tensors if t.scaled])
    importance = load_importance(task.importance, [t.name for t in task.tensors if t.quantize]) if task.importance else {}
    importance = {name: scaled_importance(v, *scalings.get(name, (None, None))) for name, v in importance.items()}
    try:
        items = [
            (t, start, stop)
            for t in task.tensors if t.quantize or _decoded(t)
            for start, stop in pieces(t, t.blocksize, _nested_in_pieces(t, options))
        ]  # fmt: skip
        weights = read_ahead(items, sources, reader, task.fp8_block, scalings)
        pending: deque[Future] = deque()

        def submit(parts: list[tuple[str, Any, int]], done: int) -> None:
            pending.append(io.submit(_store, writer, parts, done, progress))
            while len(pending) > _MAX_PENDING:
                pending.popleft().result()

        for t in task.tensors:
            info = t.source.info
            src = sources[t.source.shard]
            src.check_unchanged()
            if not t.quantize and not _decoded(t):  # copied as it is, inside the kernel where it can
                submit([(t.name, (src.reader, info), COPY)], info.nbytes)
                continue
            if not t.quantize:  # a kept FP8 or MXFP4 weight: its bfloat16 decoding; a kept cut expert weight: its values
                size = DTYPE_SIZES[t.dtype]
                for start, stop in pieces(t, t.blocksize):
                    done = (stop - start) * (DTYPE_SIZES[t.source.info.dtype] if t.scale is None and t.source.packed is None else 1)  # source bytes
                    submit([(t.name, next(weights).to(torch_dtypes()[t.dtype]), start * size)], done)
                continue
            bs = t.blocksize
            absmax = torch.empty(-(-info.numel // bs), dtype=torch.float32, device=device)
            in_pieces = _nested_in_pieces(t, options)
            offset, quantized, nested = None, [], []
            for start, stop in pieces(t, bs, in_pieces):
                weight = on_device(next(weights), t, device)
                packed, scales = quantize_piece(weight, t, start, importance.get(t.name), blocksize=bs, kernel=task.kernel, scales=options.scales)
                absmax[start // bs : start // bs + scales.numel()] = scales
                if in_pieces:  # the codes for the scales a loader will use, while the piece is here
                    offset = exact_mean(scales[:NESTED_BLOCKSIZE], task.kernel) if offset is None else offset
                    q, n, _ = double_quantize(scales, task.kernel, offset)
                    quantized.append(q), nested.append(n)
                    packed = encode_nf4(weight, dequantize_absmax(q, n, offset), blocksize=bs)
                submit([(t.name, packed, start // 2)], (stop - start) * DTYPE_SIZES[info.dtype])
                del packed
            done = (torch.cat(quantized), torch.cat(nested), offset) if in_pieces else None
            submit(_scales(absmax, t, options=options, kernel=task.kernel, nested=done), 0)
        for job in pending:
            job.result()
        written.states = {local[path]: src.state for path, src in sources.items()}
        return written
    except BaseException:
        written.discard()
        raise
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
        for src in sources.values():
            src.reader.close()


def seal_shard(written: WrittenShard) -> dict[str, Any]:
    """Sync and hash a written shard, collect the sources' hashes (refusing a source that changed
    meanwhile), store the record beside the shard, rename the shard into place and release the
    sources no later task reads; returns the record
    (see :func:`run_task`)."""
    task = written.task
    try:
        written.writer.finish()
        record = file_record(written.writer.path, task.name)
        hashed = written.hasher.result() if written.hasher else []
        for path, state in written.states.items():
            hashed_state = written.hasher.states.get(path, state) if written.hasher else state
            if file_state(path) != state or hashed_state != state:
                raise SourceError(f"{path}: changed while being converted")
        quantized = sum(t.quantize for t in task.tensors)
        seconds = round(time.perf_counter() - written.began, 3)
        record = {**record, "sources": hashed, "quantized": quantized, "kept": len(task.tensors) - quantized, "seconds": seconds}
        write_shard_record(task.folder, record)
        os.replace(written.writer.path, task.folder / task.name)
        fsync_folder(task.folder)
    except BaseException:
        written.discard()
        raise
    if task.fetcher:
        for path in task.release:
            task.fetcher.release(path)
    return record
