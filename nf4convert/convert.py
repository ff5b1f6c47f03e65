"""The conversion pipeline: source -> plan -> quantize -> write.

Weights are read in pieces of whole blocks (at most :data:`PIECE_BYTES` each) with ``pread`` into
two reused buffers, each on a reader thread while the one before is quantized in the calling
thread; a writer thread writes each piece's codes at its planned offset (and copies kept tensors in
chunks), then a weight's absmax once all its pieces are done (double quantization needs them all:
4 bytes per block, 1/16 of a bf16 weight at blocksize 64). Other threads hash, sync and journal
finished output shards; the source files are hashed from the start by the source's own thread.
Nothing is memory-mapped, so a source file truncated under the converter is a one-line error, not
SIGBUS; at most a few pieces are in flight, so peak memory grows neither with the model's size nor
with the largest tensor's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .constants import DTYPE_SIZES, DYNAMIC_MAP, FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, METADATA, NF4_CODE
from .errors import QuantizationError, SourceError
from .files import file_record, file_state
from .fp8 import decode_rows
from .layout import encode_quant_state
from .plan import Options, Plan, PlannedTensor, make_plan
from .quantize import dequantize_absmax, double_quantize, encode_nf4, quantize_nf4, resolve_kernel
from .resolve import resolve_source
from .source import Source
from .tensorfile import ShardReader, torch_dtypes
from .write import OutputFolder, ShardWriter

Progress = Callable[[int], None]
#: Pieces quantized ahead of the writer thread: bounds memory to a few pieces.
_MAX_PENDING = 2
#: The most source bytes of one weight read and quantized at a time: memory stays bounded whatever the
#: size of a single tensor, and the bytes written do not depend on it (blocks are independent).
PIECE_BYTES = 64 << 20

_NF4_TABLE = torch.tensor(NF4_CODE, dtype=torch.float32)
_DYNAMIC_TABLE = torch.tensor(DYNAMIC_MAP, dtype=torch.float32)


def plan_conversion(source: str | os.PathLike | Source, *, options: Options | None = None) -> Plan:
    """Plan a conversion without reading any tensor data (what ``--dry-run`` shows).

    Raises:
        SourceError, FormatError, QuantizationError, HubError: see :func:`convert`.
    """
    return make_plan(resolve_source(source), options or Options())


def pieces(t: PlannedTensor, blocksize: int) -> list[tuple[int, int]]:
    """The element ranges ``[start, stop)`` in which weight ``t`` is read and quantized: whole blocks,
    at most :data:`PIECE_BYTES` of source each (a transposed ``Conv1D`` weight in one piece). An FP8
    weight goes in whole rows, at most :data:`PIECE_BYTES` once decoded to float32."""
    info = t.source.info
    if t.transpose:
        return [(0, info.numel)]
    if t.scale is None:
        unit, size = blocksize, DTYPE_SIZES[info.dtype]
    else:
        unit, size = math.lcm(info.shape[1], blocksize), DTYPE_SIZES["F32"]
    step = max(unit, PIECE_BYTES // size // unit * unit)
    return [(start, min(info.numel, start + step)) for start in range(0, info.numel, step)]


def _on_device(weight: torch.Tensor, t: PlannedTensor, device: str) -> torch.Tensor:
    """A piece as the quantizer takes it: transposed for a ``Conv1D`` weight, on ``device``."""
    if t.transpose:
        weight = weight.t()
    if weight.device.type != device or t.transpose:
        weight = weight.to(device).contiguous()
    return weight


def _scales(absmax: torch.Tensor, t: PlannedTensor, *, options: Options, kernel: str, loader_scales: bool = False) -> tuple[list[tuple[str, Any, int]], torch.Tensor | None]:
    """The tensors that follow weight ``t``'s codes, once all its scales are known: absmax (8-bit with
    double quantization, over the whole tensor), the code tables, the quant-state blob; and, if asked,
    the scales a loader will use (``absmax`` itself without double quantization)."""
    parts: list[tuple[str, Any, int]] = [(f"{t.name}.quant_map", _NF4_TABLE, 0)]
    offset, used = None, absmax
    if options.double_quant:
        quantized, nested, offset = double_quantize(absmax, kernel)
        parts += [(f"{t.name}.absmax", quantized, 0), (f"{t.name}.nested_absmax", nested, 0), (f"{t.name}.nested_quant_map", _DYNAMIC_TABLE, 0)]
        used = dequantize_absmax(quantized, nested, offset) if loader_scales else None
    else:
        parts.append((f"{t.name}.absmax", absmax, 0))
    parts.append((t.outputs[-1][0], memoryview(encode_quant_state(t.quant_state(options, offset))), 0))
    return parts, used


def _passes(t: PlannedTensor, options: Options) -> int:
    """Reads of weight ``t``: two where its codes must follow its double-quantized searched scales
    (spec section 2.6), which need every piece's scales first; else one."""
    return 2 if t.quantize and options.scales == "search" and options.double_quant else 1


class _SourceShard:
    """A source shard read with ``pread`` (see :class:`ShardReader`), and its size and
    modification time when opened."""

    def __init__(self, path: Path) -> None:
        self.reader = ShardReader(path)
        self.state = file_state(path)

    def check_unchanged(self) -> None:
        """Refuse to go on if the file changed since it was opened."""
        if file_state(self.reader.path) != self.state:
            raise SourceError(f"{self.reader.path}: changed while being converted")


def _read_ahead(
    items: list[tuple[PlannedTensor, int, int]], sources: dict[Path, _SourceShard], pool: ThreadPoolExecutor, fp8_block: tuple[int, int] | None
) -> Iterator[torch.Tensor]:
    """The pieces ``(tensor, start, stop)`` in order, each read on ``pool`` while the one before is
    quantized: two reused buffers of the largest piece's size, whatever the model's size. A piece is a
    flat tensor (FP8 decoded to float32 with ``fp8_block`` scales), or the shaped weight where it is
    quantized transposed."""
    size = max(((stop - start) * DTYPE_SIZES[t.source.info.dtype] for t, start, stop in items), default=0)
    buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(2 if len(items) > 1 else len(items))]
    decoded_size = max((stop - start for t, start, stop in items if t.scale is not None), default=0)
    decoded = [torch.empty(decoded_size, dtype=torch.float32) for _ in buffers] if decoded_size else []

    scales: dict[str, torch.Tensor] = {}  # the FP8 scales of the weight being read (small: one per block)

    def read(i: int) -> torch.Tensor:
        t, start, stop = items[i]
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
        return data.view(info.shape) if t.transpose else data

    coming = pool.submit(read, 0) if items else None
    for i in range(len(items)):
        piece = coming.result()
        coming = pool.submit(read, i + 1) if i + 1 < len(items) else None
        yield piece


def _store(writer: ShardWriter, parts: list[tuple[str, Any, int]], done: int, progress: Progress | None) -> None:
    """Writer thread: write ``(key, data, byte offset)`` parts, then report ``done`` source bytes."""
    for key, value, offset in parts:
        writer.write(key, value, offset)
    if progress and done:
        progress(done)


def _seal(writer: ShardWriter, out: OutputFolder, name: str, syncer: ThreadPoolExecutor) -> dict[str, Any]:
    """Hash a written shard while another thread syncs it, then journal it; off the writer
    thread, so writing goes on."""
    synced = syncer.submit(writer.finish)
    record = file_record(out.path(name), name)
    synced.result()
    return out.record_shard(record)


def _convert_tensors(plan: Plan, out: OutputFolder, *, kernel: str, device: str, progress: Progress | None) -> tuple[list, list]:
    """Quantize in this thread while worker threads read ahead, write, and hash, sync and journal
    finished shards for resuming; at most ``_MAX_PENDING`` tensors wait for the writer. Shards the
    journal already holds are skipped. Returns output and source records."""
    sources = {path: _SourceShard(path) for path in plan.source.shards}
    writers: list[ShardWriter] = []
    pools = [ThreadPoolExecutor(1, thread_name_prefix=f"nf4-{role}") for role in ("read", "write", "seal", "sync")]
    reader, io, sealer, syncer = pools
    try:
        todo = [(name, shard) for name, shard in zip(plan.shard_names(), plan.shards) if name not in out.completed]
        bs = plan.options.blocksize
        items = [
            (t, start, stop)
            for _, shard in todo for t in shard if t.quantize or t.scale
            for _ in range(_passes(t, plan.options)) for start, stop in pieces(t, bs)
        ]  # fmt: skip
        weights = _read_ahead(items, sources, reader, plan.source.fp8_block)
        pending: deque[Future] = deque()
        records: list[Future] = []

        def submit(writer: ShardWriter, parts: list[tuple[str, Any, int]], done: int) -> None:
            pending.append(io.submit(_store, writer, parts, done, progress))
            while len(pending) > _MAX_PENDING:
                pending.popleft().result()

        for name, shard in todo:
            writer = ShardWriter(out.path(name), [e for t in shard for e in t.outputs], METADATA)
            writers.append(writer)
            for t in shard:
                info = t.source.info
                src = sources[t.source.shard]
                src.check_unchanged()
                if not t.quantize and t.scale is None:
                    submit(writer, [(t.name, src.reader.chunks(info), 0)], info.nbytes)
                    continue
                if not t.quantize:  # a kept FP8 weight: its bfloat16 decoding
                    for start, stop in pieces(t, bs):
                        submit(writer, [(t.name, next(weights).to(torch.bfloat16), start * 2)], stop - start)
                    continue
                absmax = torch.empty(-(-info.numel // bs), dtype=torch.float32, device=device)
                two_pass = _passes(t, plan.options) == 2
                for start, stop in pieces(t, bs):
                    weight = _on_device(next(weights), t, device)
                    packed, scales = quantize_nf4(weight, blocksize=bs, kernel=kernel, name=t.name, first=start, scales=plan.options.scales)
                    absmax[start // bs : start // bs + scales.numel()] = scales
                    parts = [] if two_pass else [(t.name, packed, start // 2)]  # else written in the second pass
                    submit(writer, parts, (stop - start) * DTYPE_SIZES[info.dtype])
                    del packed
                parts, used = _scales(absmax, t, options=plan.options, kernel=kernel, loader_scales=two_pass)
                submit(writer, parts, 0)
                for start, stop in pieces(t, bs) if two_pass else ():
                    weight = _on_device(next(weights), t, device)
                    submit(writer, [(t.name, encode_nf4(weight, used[start // bs : -(-stop // bs)], blocksize=bs), start // 2)], 0)
            records.append(io.submit(sealer.submit, _seal, writer, out, name, syncer))
        for job in pending:
            job.result()
        for r in records:
            r.result().result()
        outputs = [out.completed[name] for name in plan.shard_names()]  # journaled before, or just now
        hashed = plan.source.shard_records()
        for src in sources.values():
            src.check_unchanged()
        return outputs, hashed
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
        for w in writers:
            w.close()
        for src in sources.values():
            src.reader.close()


def fingerprint(plan: Plan) -> str:
    """What must not change for a partial conversion to be resumed: format and tool version, options,
    the planned output layout, and each source shard's name, size, modification time and header."""
    sources = []
    for path in plan.source.shards:
        with open(path, "rb") as f:
            prefix = f.read(8)
            header = prefix + f.read(int.from_bytes(prefix, "little"))
        st = path.stat()
        sources.append([path.name, st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()])
    shards = [[name, [list(e) for t in shard for e in t.outputs]] for name, shard in zip(plan.shard_names(), plan.shards)]
    key = [FORMAT_VERSION, __version__, manifest_options(plan), shards, sources]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def manifest_options(plan: Plan) -> dict[str, Any]:
    o = plan.options
    return {
        "blocksize": o.blocksize,
        "double_quant": o.double_quant,
        "compute_dtype": plan.compute_dtype,
        "skip": list(o.skip),
        "quantize_lm_head": o.quantize_lm_head,
        "max_shard_size": o.max_shard_size,
        "experts": o.experts,
        "scales": o.scales,
    }


def manifest(plan: Plan, *, files: list[dict[str, Any]], source_files: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``nf4convert.json`` manifest (spec section 8). Deterministic: no times, no absolute paths."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool": {"name": "nf4convert", "version": __version__},
        "options": manifest_options(plan),
        "decided_by": plan.decided_by,
        "loaders": plan.loaders,
        "source": {"name": plan.source.name, **plan.source.provenance, "files": source_files},
        "files": files,
        "summary": {
            "parameters": plan.parameters,
            "quantized_parameters": sum(t.source.info.numel for t in plan.quantized),
            "tensors_quantized": len(plan.quantized),
            "tensors_kept": len(plan.kept),
            "bytes": plan.output_bytes,
            "bits_per_parameter": round(plan.bits_per_parameter, 4),
            "quantized_bits_per_parameter": round(plan.quantized_bits_per_parameter, 4),
        },
        "tensors": {
            "quantized": [
                {"name": t.name, "shape": list(t.source.info.shape), "dtype": t.source.info.dtype, "transposed": t.transpose, "expert": t.expert}
                for t in plan.quantized
            ],
            "kept": [
                {"name": t.name, "shape": list(t.source.info.shape), "dtype": t.source.info.dtype, "reason": t.reason}
                for t in plan.kept
            ],
        },
    }


def convert(
    source: str | os.PathLike | Source,
    output: str | os.PathLike,
    *,
    options: Options | None = None,
    force: bool = False,
    kernel: str = "auto",
    device: str = "cpu",
    progress: Progress | None = None,
) -> Path:
    """Convert a safetensors checkpoint to NF4 (spec/FORMAT.md), streaming tensor by tensor.

    Args:
        source: a folder of safetensors shards, a single ``.safetensors`` file, a Hub repo id, or a
            :class:`Source` (see :func:`resolve_source` for Hub options).
        output: the folder to create.
        options: quantization and sharding options.
        force: replace an existing output folder.
        kernel: quantizer kernel, ``"auto"``, ``"native"`` or ``"eager"`` (same bytes).
        device: where to quantize (``"cpu"``, ``"cuda"``); the output is the same.
        progress: called with the number of source bytes done after each tensor.

    Returns:
        The output folder.

    Raises:
        SourceNotFoundError, SourceError: a missing, empty or malformed source.
        FormatError: a corrupt safetensors shard.
        QuantizationError: a weight with NaN/Inf, or bad options.
        OutputError: the output exists (without ``force``) or lies inside the source.
        HubError: a repo id that cannot be resolved.

    Example:
        >>> convert("./Llama-3-8B", "./Llama-3-8B-nf4")              # doctest: +SKIP
        PosixPath('Llama-3-8B-nf4')
    """
    plan = plan_conversion(source, options=options)
    src, options = plan.source, plan.options
    kernel = resolve_kernel(kernel, device)
    if options.scales == "search" and kernel != "native":
        raise QuantizationError("--scales search runs in the native kernel only (the CPU, with a C compiler)")
    src.start_hashing()
    try:
        with OutputFolder(Path(output), source=src.path, force=force, fingerprint=fingerprint(plan)) as out:
            return _write_output(plan, out, kernel=kernel, device=device, progress=progress)
    except BaseException:
        src.stop_hashing()
        raise


def _write_output(plan: Plan, out: OutputFolder, *, kernel: str, device: str, progress: Progress | None) -> Path:
    """The tensors, the index, side files, config and manifest, then the rename into place."""
    src = plan.source
    files, source_files = _convert_tensors(plan, out, kernel=kernel, device=device, progress=progress)
    if len(plan.shards) > 1:
        weight_map = {key: name for name, shard in zip(plan.shard_names(), plan.shards) for t in shard for key, _, _ in t.outputs}
        index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out.path(INDEX_NAME), index)
        files.append(file_record(out.path(INDEX_NAME), INDEX_NAME))
    names = [p.relative_to(src.root).as_posix() for p in src.side_files]
    for side, name in zip(src.side_files, names):
        out.path(name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(side, out.path(name))
    if src.config is not None:
        names.append("config.json")
        _write_json(out.path("config.json"), {**src.config, "quantization_config": plan.quantization_config()})
    files += [file_record(out.path(name), name) for name in names]
    side_inputs = src.side_files + ([src.root / "config.json"] if src.config is not None else [])
    source_files += [file_record(p, p.relative_to(src.root).as_posix()) for p in side_inputs]
    source_files.sort(key=lambda r: r["name"])
    _write_json(out.path(MANIFEST_NAME), manifest(plan, files=sorted(files, key=lambda r: r["name"]), source_files=source_files))
    return out.commit()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
