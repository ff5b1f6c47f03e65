"""The conversion driver: plan, then one task per output shard (:mod:`nf4convert.task`), then the
index, side files, config and manifest from the tasks' records, and the rename into place.

The tasks run one after the other in this process, or on Dask workers (:mod:`nf4convert.cluster`,
``workers``/``scheduler``): the same function, the same bytes. Finished shards are journaled as
their records come back, so an interrupted conversion resumes after them whichever way it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .constants import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from .errors import NF4ConvertError, QuantizationError, SourceError
from .files import FileHasher, file_record, file_state
from .awq import SCALES_FILE, scaling_manifest, write_scales
from .importance import importance_record
from .plan import Options, Plan, PlannedTensor, make_plan
from .kernels import resolve_kernel
from .resolve import resolve_source, source_hasher
from .source import Source
from .task import Progress, ShardTask, seal_shard, write_shard
from .write import OutputFolder

#: Called with each finished task's record (``run_task``'s), in the driver.
Finished = Callable[[dict[str, Any]], None]


def plan_conversion(
    source: str | os.PathLike | Source | Plan, *, options: Options | None = None, kernel: str = "auto", hashes: FileHasher | None = None
) -> Plan:
    """Plan a conversion (what ``--dry-run`` shows) without reading tensor data, except that a size
    budget (``options.bits``) first measures every weight's quantization error (:mod:`nf4convert.budget`,
    with ``kernel``). A :class:`Plan` is returned as it is.

    ``hashes``: the source shards' sha256, begun before planning (:func:`~nf4convert.resolve.source_hasher`),
    kept as ``plan.hashes`` for the conversion.

    Raises:
        SourceError, FormatError, QuantizationError, HubError: see :func:`convert`.
    """
    if isinstance(source, Plan):
        return source
    src = resolve_source(source)
    try:
        plan = make_plan(src, options or Options())
        if plan.options.bits is not None:
            from .budget import apply_budget

            plan = apply_budget(plan, kernel=resolve_kernel(kernel, "cpu"))
    except BaseException:
        if hashes is not None:
            hashes.cancel()
        raise
    plan.hashes = hashes
    return plan


def shard_tasks(plan: Plan, folder: Path, *, kernel: str = "native", device: str = "cpu") -> list[ShardTask]:
    """One :class:`ShardTask` per output shard, in order. Each source shard is hashed by the first task
    that reads it and released (``--stream``: deleted) by the last."""
    first: dict[Path, int] = {}
    last: dict[Path, int] = {}
    importance = Path(plan.options.importance).resolve() if plan.options.importance else None
    tasks = [
        ShardTask(
            name, tuple(shard), plan.options, folder, plan.source.fp8_block, fetcher=plan.source.fetcher,
            importance=importance if plan.options.scales == "search" else None, scaling=importance if plan.options.awq else None, kernel=kernel, device=device,
        )  # fmt: skip
        for name, shard in zip(plan.shard_names(), plan.shards)
    ]
    for i, task in enumerate(tasks):
        for path in task.source_shards:
            first.setdefault(path, i)
            last[path] = i
    root = plan.source.root
    return [
        replace(
            task,
            hash_sources=() if plan.hashes else tuple((p, p.relative_to(root).as_posix()) for p in task.source_shards if first[p] == i),
            release=tuple(p for p in task.source_shards if last[p] == i),
        )
        for i, task in enumerate(tasks)
    ]


def run_serially(tasks: list[ShardTask], finished: Finished, progress: Progress | None = None) -> None:
    """Run the tasks in this process, in order: this thread writes each shard (:func:`write_shard`)
    while a background thread seals the one before (:func:`seal_shard`: sync, hash, rename, release its
    source shards) and then, with a fetcher (``--stream``), fetches the next task's source shards: two
    source shards on disk at a time, the one being converted and the next. The last shard is sealed in
    this thread, while the background one may still seal the one before (both cores hash)."""
    with ThreadPoolExecutor(1, thread_name_prefix="nf4-seal") as background:
        sealed = fetched = None
        try:
            for i, task in enumerate(tasks):
                if fetched is not None:
                    fetched.result()
                following = tasks[i + 1] if i + 1 < len(tasks) else None  # fetched once the shard before this one is sealed
                fetched = background.submit(_fetch_all, following) if following and following.fetcher else None
                written = write_shard(task, progress)
                record = seal_shard(written) if following is None else None  # the last: here, beside the one before's seal
                if sealed is not None:
                    done, sealed = sealed, None
                    finished(done.result())
                if record is not None:
                    finished(record)
                else:
                    sealed = background.submit(seal_shard, written)
        except BaseException:
            if sealed is not None and sealed.exception() is None:  # journal the shard sealed before the failure
                finished(sealed.result())
            raise
        if sealed is not None:
            finished(sealed.result())


def _fetch_all(task: ShardTask) -> None:
    for path in task.source_shards:
        task.fetcher.fetch(path)


def fingerprint(plan: Plan) -> str:
    """What must not change for a partial conversion to be resumed: format and tool version, options,
    the planned output layout, and the source shards' identity (:meth:`Source.identity`)."""
    shards = [[name, [list(e) for t in shard for e in t.outputs]] for name, shard in zip(plan.shard_names(), plan.shards)]
    key = [FORMAT_VERSION, __version__, manifest_options(plan), shards, plan.source.identity()]
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
        "importance": importance_record(o.importance, len(plan.weighted)) if o.importance else None,
        "budget": plan.budget,
        "small_blocks": list(o.small_blocks),
        "awq": scaling_manifest(plan.scaling, len([t for t in plan.tensors if t.scaled]), o.importance) if plan.scaling else None,
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
                {"name": t.name, "shape": list(t.source.info.shape), "dtype": t.source.info.dtype, "transposed": t.transpose, "expert": t.expert, **_cut(t)}
                for t in plan.quantized
            ],
            "kept": [
                {"name": t.name, "shape": list(t.source.info.shape), "dtype": t.source.info.dtype, "reason": t.reason, **_cut(t), **({"cast": t.cast} if t.cast else {})}
                for t in plan.kept
            ],
        },
    }


def _cut(t: PlannedTensor) -> dict[str, Any]:
    """For a weight cut from fused experts, where it lies in the source (spec sections 6.1 and 8)."""
    split = t.source.split
    if split is None:
        return {}
    return {"cut_from": {"name": split.fused.name, "shape": list(split.fused.info.shape), "expert": split.expert, "start": split.start, "stop": split.stop, "transposed": split.transposed}}


def convert(
    source: str | os.PathLike | Source | Plan,
    output: str | os.PathLike,
    *,
    options: Options | None = None,
    force: bool = False,
    kernel: str = "auto",
    device: str = "cpu",
    progress: Progress | None = None,
    resumed: Progress | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> Path:
    """Convert a safetensors checkpoint to NF4 (spec/FORMAT.md), streaming tensor by tensor.

    Args:
        source: a folder of safetensors shards, a single ``.safetensors`` file, a Hub repo id, a
            :class:`Source` (see :func:`resolve_source` for Hub options and ``--stream``), or a
            :class:`Plan` of one (``options`` is then the plan's).
        output: the folder to create.
        options: quantization and sharding options.
        force: replace an existing output folder that nf4convert wrote, or an empty one.
        kernel: quantizer kernel, ``"auto"``, ``"native"`` or ``"eager"`` (same bytes).
        device: where to quantize (``"cpu"``, ``"cuda"``); the output is the same.
        progress: called with a number of source bytes done, as they are done (a resumed run's
            finished shards too, unless ``resumed`` is given).
        resumed: called once with the source bytes of the shards a resumed run finds done.
        workers: run the shard tasks on a local Dask cluster of this many worker processes.
        scheduler: run them on the Dask cluster at this address (its workers must see source and output).

    On a machine with few cores, set ``OMP_WAIT_POLICY=PASSIVE`` in the environment before torch is
    imported (the CLI does): torch's OpenMP threads otherwise spin between its small operations here,
    taking CPU from the quantizing and hashing threads (docs/performance.md).

    Returns:
        The output folder.

    Raises:
        SourceNotFoundError, SourceError: a missing, empty or malformed source.
        FormatError: a corrupt safetensors shard.
        QuantizationError: a weight with NaN/Inf, or bad options.
        OutputError: the output exists (without ``force``) or lies inside the source.
        HubError: a repo id that cannot be resolved.
        ClusterError: Dask is not installed, the scheduler cannot be reached, or a task kept failing.

    Example:
        >>> convert("./Llama-3-8B", "./Llama-3-8B-nf4")              # doctest: +SKIP
        PosixPath('Llama-3-8B-nf4')
    """
    kernel = resolve_kernel(kernel, device)
    if isinstance(source, Plan):
        plan = source
    else:
        src = resolve_source(source)
        plan = plan_conversion(src, options=options, kernel=kernel, hashes=source_hasher(src))
    try:
        if plan.options.scales == "search" and kernel != "native":
            raise QuantizationError("--scales search runs in the native kernel only (the CPU, with a C compiler)")
        if workers is not None or scheduler is not None:
            from .cluster import check_cluster_options

            check_cluster_options(workers, scheduler)
        with OutputFolder(Path(output), source=plan.source.path, force=force, fingerprint=fingerprint(plan), writes=output_files(plan)) as out:
            every = shard_tasks(plan, out.partial, kernel=kernel, device=device)
            tasks = [t for t in every if t.name not in out.completed]
            side = sum(f.stat().st_size for f in plan.source.side_files)
            out.reserve(plan.output_bytes - sum(r["size"] for r in out.completed.values()) + side + (1 << 20))
            done = sum(t.source_bytes for t in every if t.name in out.completed)
            if done and (resumed or progress):
                (resumed or progress)(done)
            try:
                if workers is None and scheduler is None:
                    run_serially(tasks, out.record_shard, progress)
                else:
                    from .cluster import run_on_dask

                    run_on_dask(tasks, out.record_shard, progress, workers=workers, scheduler=scheduler)
            except NF4ConvertError as e:
                if e.resumable and out.completed:
                    raise type(e)(f"{e} ({len(out.completed)} of {len(every)} shards done, kept in {out.partial}: the same command resumes)") from None
                raise
            return _write_output(plan, out)
    finally:
        if plan.hashes is not None:
            plan.hashes.cancel()  # done by now, or abandoned with the conversion


def _source_records(plan: Plan, journal: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The source shards' records as the tasks hashed them (a shard no task reads is hashed here). A
    remote source's are those it publishes, each checked against the hash of the downloaded shard."""
    hashed = {r["name"]: r for record in journal for r in record["sources"]}
    fetcher, root = plan.source.fetcher, plan.source.root
    if plan.hashes is not None:
        hashed.update((r["name"], r) for r in plan.hashes.result())
        for path, state in plan.hashes.states.items():
            if file_state(path) != state:
                raise SourceError(f"{path}: changed while being converted")
    if fetcher is None:
        names = [(p, p.relative_to(root).as_posix()) for p in plan.source.shards]
        return [hashed.get(name) or file_record(p, name, trust_cache=True) for p, name in names]
    published = fetcher.records()
    for r in published:
        if hashed.get(r["name"], r) != r:
            raise SourceError(f"{r['name']}: the downloaded shard does not match the size and sha256 its repository publishes")
    return published


def output_files(plan: Plan) -> set[str]:
    """Every file the output of ``plan`` holds (relative POSIX paths): shards, index, side files, config,
    manifest. What a replaced output's files of the user's must not be named (:func:`check_output`)."""
    src = plan.source
    names = {*plan.shard_names(), MANIFEST_NAME, *(p.relative_to(src.root).as_posix() for p in src.side_files), *([SCALES_FILE] if plan.scaling else [])}
    return names | ({plan.files.index} if len(plan.shards) > 1 else set()) | ({"config.json"} if src.config is not None else set())


def _write_output(plan: Plan, out: OutputFolder) -> Path:
    """The index, side files, config and manifest once every shard is written, then the rename into place."""
    src = plan.source
    journal = [out.completed[name] for name in plan.shard_names()]
    files = [{k: r[k] for k in ("name", "size", "sha256")} for r in journal]
    source_files = _source_records(plan, journal)
    if len(plan.shards) > 1:
        weight_map = {key: name for name, shard in zip(plan.shard_names(), plan.shards) for t in shard for key, _, _ in t.outputs}
        index = {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(out.path(plan.files.index), index)
        files.append(file_record(out.path(plan.files.index), plan.files.index))
    names = [p.relative_to(src.root).as_posix() for p in src.side_files]
    for side, name in zip(src.side_files, names):
        out.path(name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(side, out.path(name))
    if src.config is not None:
        names.append("config.json")
        _write_json(out.path("config.json"), {**src.config, "quantization_config": plan.quantization_config()})
    if plan.scaling is not None:  # what verify --source compares with
        write_scales(plan.options.importance, out.path(SCALES_FILE))
        names.append(SCALES_FILE)
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
