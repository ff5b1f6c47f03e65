"""One output shard's conversion, as a task: a plain function of (plan, shard) that any process can run.

:func:`run_task` reads the shard's source tensors, quantizes them and writes the shard under a
temporary name, syncs and hashes it and renames it into place; it returns a small record (name,
size, sha256, counts, the source shards it hashed), never tensors. Running it twice (a retry)
leaves the same bytes. :mod:`nf4convert.convert` runs the tasks one after the other in this
process, :mod:`nf4convert.cluster` on Dask workers: the same function either way.

Inside a task, weights are read in pieces (:mod:`nf4convert.pieces`) on a reader thread and quantized
in the calling thread: as numpy arrays by :func:`nf4convert.arrays.quantize` in the native kernel
(absmax or searched scales), so that no torch is imported, else as tensors by
:func:`nf4convert.quantize.quantize_nf4`. A writer thread writes each piece's codes at its planned
offset, then a weight's absmax once all its pieces are done (double quantization needs them all: 4
bytes per block, 1/16 of a bf16 weight at blocksize 64). Source shards are hashed by another thread
meanwhile. Kept tensors are copied from source to output (inside the kernel, ``copy_file_range``,
where the file systems allow) once the weights are written, while the shard is hashed behind the
copy: the hash cannot start before the last weight (the float32 tables come first in the file), so
the copy and the hash share the end, where a core would otherwise sit idle. At most a few pieces are
in flight, so peak memory grows neither with the model's size nor with the largest tensor's.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arrays, native
from .awq import scaled_importance, scalings_of
from .constants import DTYPE_SIZES, METADATA, NESTED_BLOCKSIZE
from .errors import SourceError
from .files import FileHasher, WrittenPrefix, file_record, file_state
from .importance import load_importance
from .layout import encode_quant_state
from .pieces import Piece, SourceShard, as_tensor, mapped_read, on_device, piece_dtype, pieces, read_ahead
from .plan import Options, PlannedTensor
from .source import ShardFetcher
from .tensorfile import TensorInfo, torch_dtypes
from .write import ShardWriter, fsync_folder, write_shard_record

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
#: Pieces quantized ahead of the writer thread: bounds memory to a few pieces.
_MAX_PENDING = 2
#: One progress report at a time, from any task's threads (a writer, a shard's seal beside the next
#: shard's writer).
_progress_lock = threading.Lock()


def _report(progress: Progress | None, done: int) -> None:
    if progress and done:
        with _progress_lock:
            progress(done)


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


def quantize_piece(weight: torch.Tensor, t: PlannedTensor, start: int, importance: torch.Tensor | None, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~nf4convert.quantize.quantize_nf4` of the piece of ``t`` that begins at element ``start``;
    with importance rows per expert (fused experts), each expert's run of the piece weighed by its own row."""
    import torch

    from .quantize import quantize_nf4

    if importance is None or importance.dim() == 1:
        return quantize_nf4(weight, name=t.name, first=start, importance=importance, **options)
    flat, per_expert = weight.reshape(-1), t.source.info.numel // importance.shape[0]
    stop = start + flat.numel()
    runs = [(a, min(stop, (a // per_expert + 1) * per_expert)) for a in [start, *range((start // per_expert + 1) * per_expert, stop, per_expert)]]
    parts = [quantize_nf4(flat[a - start : b - start], name=t.name, first=a, importance=importance[a // per_expert], **options) for a, b in runs]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def _scales(
    absmax: np.ndarray, t: PlannedTensor, *, options: Options, kernel: str, nested: tuple[Any, Any, float] | None = None
) -> list[tuple[str, Any, int]]:
    """The tensors that follow weight ``t``'s codes, once all its scales are known: absmax (8-bit with
    double quantization: ``nested`` where the pieces already did it, else over the whole tensor), the
    code tables, the quant-state blob."""
    parts: list[tuple[str, Any, int]] = [(f"{t.name}.quant_map", arrays.NF4_TABLE, 0)]
    offset = None
    if options.double_quant:
        if nested is None and kernel == "native":
            nested = arrays.double_quantize(absmax)
        elif nested is None:
            import torch

            from .quantize import double_quantize

            nested = double_quantize(torch.from_numpy(absmax), kernel)
        quantized, nested_absmax, offset = nested
        parts += [(f"{t.name}.absmax", quantized, 0), (f"{t.name}.nested_absmax", nested_absmax, 0), (f"{t.name}.nested_quant_map", arrays.DYNAMIC_TABLE, 0)]
    else:
        parts.append((f"{t.name}.absmax", absmax, 0))
    parts.append((t.outputs[-1][0], memoryview(encode_quant_state(t.quant_state(options, offset))), 0))
    return parts


def _nested_in_pieces(t: PlannedTensor, options: Options) -> bool:
    """Whether weight ``t``'s double quantization is done piece by piece (spec section 2.6): searched
    scales, whose codes must follow the 8-bit scales a loader will use."""
    return t.quantize and options.scales == "search" and options.double_quant


def _raw_path(t: PlannedTensor, task: ShardTask, importance: torch.Tensor | None) -> bool:
    """Whether weight ``t``'s pieces are quantized as numpy arrays by :func:`nf4convert.arrays.quantize`
    (no torch): the native kernel, not transposed, without importance rows per expert. Pieces torch
    decoded or transformed go through :func:`_quantize_tensor` whatever this says."""
    return task.kernel == "native" and not t.transpose and (importance is None or importance.dim() == 1)


class _NestedPieces:
    """Double quantization piece by piece (searched scales, spec section 2.6; the native kernel): the
    offset (the mean of the weight's first nested block), the 8-bit scales so far, and each piece's codes
    for the scales a loader will use, encoded while the piece is here."""

    def __init__(self) -> None:
        self.offset: float | None = None
        self.quantized: list[np.ndarray] = []
        self.nested: list[np.ndarray] = []

    def encode(self, values: np.ndarray, dtype: str, scales: np.ndarray, blocksize: int) -> np.ndarray:
        """The codes of a piece (raw bytes of ``dtype``) for its searched ``scales`` once double-quantized."""
        self.offset = arrays.exact_mean(scales[:NESTED_BLOCKSIZE]) if self.offset is None else self.offset
        q, n, _ = arrays.double_quantize(scales, self.offset)
        self.quantized.append(q), self.nested.append(n)
        return native.encode_blocks(values, dtype, blocksize, arrays.NF4_THRESHOLDS, arrays.dequantize_absmax(q, n, self.offset))

    def result(self) -> tuple[np.ndarray, np.ndarray, float]:
        return np.concatenate(self.quantized), np.concatenate(self.nested), self.offset


def _quantize_tensor(
    piece: Piece, t: PlannedTensor, start: int, *, task: ShardTask, importance: torch.Tensor | None
) -> tuple[torch.Tensor, np.ndarray, tuple[np.ndarray, str] | None]:
    """Quantize a piece with torch (the eager kernel, a GPU, a transposed weight, a piece torch decoded,
    importance rows per expert): its codes, its float32 block scales, and for searched scales its
    values as the native kernel takes them (for :meth:`_NestedPieces.encode`)."""
    from .quantize import raw

    weight = on_device(as_tensor(piece, t), t, task.device)
    packed, scales = quantize_piece(weight, t, start, importance, blocksize=t.blocksize, kernel=task.kernel, scales=task.options.scales)
    return packed, scales.cpu().numpy(), raw(weight) if task.options.scales == "search" else None


def _store(writer: ShardWriter, parts: list[tuple[str, Any, int]], done: int, progress: Progress | None) -> None:
    """Writer thread: write ``(key, data, byte offset)`` parts, then report ``done`` source bytes."""
    for key, value, offset in parts:
        writer.write(key, value, offset)
    _report(progress, done)


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
    """A shard whose bytes are written under a temporary name, all but its kept tensors (copied by
    :func:`seal_shard`); not yet synced, hashed or renamed."""

    task: ShardTask
    writer: ShardWriter
    hasher: FileHasher | None
    sources: dict[Path, SourceShard]  # open until the kept tensors are copied
    began: float
    progress: Progress | None = None
    kept: list[tuple[str, SourceShard, TensorInfo]] = field(default_factory=list)  # copied from the source as they are

    def close_sources(self) -> None:
        for src in self.sources.values():
            src.reader.close()

    def discard(self) -> None:
        """Remove the temporary shard, close the sources and stop hashing them (after an error)."""
        self.writer.close()
        self.writer.path.unlink(missing_ok=True)
        self.close_sources()
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
    written = WrittenShard(task, ShardWriter(temporary, [e for t in task.tensors for e in t.outputs], METADATA), hasher, sources, began, progress)
    writer = written.writer
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"nf4-{role}") for role in ("read", "write")]
    reader, io = pools
    options = task.options
    scalings = scalings_of(task.scaling, [t.name for t in task.tensors if t.scaled])
    importance = load_importance(task.importance, [t.name for t in task.tensors if t.quantize]) if task.importance else {}
    importance = {name: scaled_importance(v, *scalings.get(name, (None, None))) for name, v in importance.items()}
    try:
        items = [
            (t, start, stop)
            for t in task.tensors if t.quantize or _decoded(t)
            for start, stop in pieces(t, t.blocksize, _nested_in_pieces(t, options))
        ]  # fmt: skip
        raw = frozenset(t.name for t in task.tensors if t.quantize and _raw_path(t, task, importance.get(t.name)))
        weights = read_ahead(items, sources, reader, task.fp8_block, scalings, raw)
        pending: deque[Future] = deque()

        def submit(parts: list[tuple[str, Any, int]], done: int) -> None:
            pending.append(io.submit(_store, writer, parts, done, progress))
            while len(pending) > _MAX_PENDING:
                pending.popleft().result()

        for t in task.tensors:
            info = t.source.info
            src = sources[t.source.shard]
            src.check_unchanged()
            if not t.quantize and not _decoded(t):  # copied as it is, by seal_shard
                written.kept.append((t.name, src, info))
                continue
            if not t.quantize:  # a kept FP8 or MXFP4 weight: its bfloat16 decoding; a kept cut expert weight: its values
                size = DTYPE_SIZES[t.dtype]
                for start, stop in pieces(t, t.blocksize):
                    done = (stop - start) * (DTYPE_SIZES[t.source.info.dtype] if t.scale is None and t.source.packed is None else 1)  # source bytes
                    submit([(t.name, as_tensor(next(weights), t).to(torch_dtypes()[t.dtype]), start * size)], done)
                continue
            bs = t.blocksize
            absmax = np.empty(-(-info.numel // bs), dtype=np.float32)
            nested = _NestedPieces() if _nested_in_pieces(t, options) else None
            vector = importance.get(t.name)
            for start, stop in pieces(t, bs, nested is not None):
                piece = next(weights)
                with mapped_read(t, sources):
                    if t.name in raw and isinstance(piece, np.ndarray):
                        values = (piece, piece_dtype(t))
                        packed, scales = arrays.quantize(*values, bs, name=t.name, first=start, search=options.scales == "search", importance=vector)
                    else:
                        packed, scales, values = _quantize_tensor(piece, t, start, task=task, importance=vector)
                    if nested is not None:
                        packed = nested.encode(*values, scales, bs)
                absmax[start // bs : start // bs + scales.size] = scales
                submit([(t.name, packed, start // 2)], (stop - start) * DTYPE_SIZES[info.dtype])
                del packed
            submit(_scales(absmax, t, options=options, kernel=task.kernel, nested=nested.result() if nested else None), 0)
        for job in pending:
            job.result()
        return written
    except BaseException:
        written.discard()
        raise
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)


def seal_shard(written: WrittenShard) -> dict[str, Any]:
    """Copy a written shard's kept tensors and sync it on a thread while this one hashes it from the
    page cache (following the copy), collect the sources' hashes (refusing a source that changed
    meanwhile), store the record beside the shard, rename the shard into place and release the
    sources no later task reads; returns the record (see :func:`run_task`)."""
    task, writer = written.task, written.writer
    kept = sorted(written.kept, key=lambda k: writer.offsets[k[0]])
    prefix = WrittenPrefix(writer.offsets[kept[0][0]] if kept else writer.size)  # all but the kept tensors is written

    def copy_then_sync() -> None:
        try:
            for i, (name, src, info) in enumerate(kept):
                src.check_unchanged()
                writer.copy(name, src.reader, info, prefix.advance)
                prefix.advance(writer.offsets[kept[i + 1][0]] if i + 1 < len(kept) else writer.size)
                _report(written.progress, info.nbytes)
        except BaseException:
            prefix.fail()
            raise
        writer.finish()

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="nf4-copy") as pool:
            copied = pool.submit(copy_then_sync)
            try:
                record = file_record(writer.path, task.name, ready=prefix.wait)
            except InterruptedError:  # the copy stopped: its error
                copied.result()
                raise
            copied.result()
        written.close_sources()
        hashed = written.hasher.result() if written.hasher else []
        for src in written.sources.values():
            path, state = src.reader.path, src.state
            hashed_state = written.hasher.states.get(path, state) if written.hasher else state
            if file_state(path) != state or hashed_state != state:
                raise SourceError(f"{path}: changed while being converted")
        quantized = sum(t.quantize for t in task.tensors)
        seconds = round(time.perf_counter() - written.began, 3)
        record = {**record, "sources": hashed, "quantized": quantized, "kept": len(task.tensors) - quantized, "seconds": seconds}
        write_shard_record(task.folder, record)
        os.replace(writer.path, task.folder / task.name)
        fsync_folder(task.folder)
    except BaseException:
        written.discard()
        raise
    if task.fetcher:
        for path in task.release:
            task.fetcher.release(path)
    return record
