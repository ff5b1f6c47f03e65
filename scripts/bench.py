"""Benchmark nf4convert against its peers in one run, and print one table (also written as JSON).

Builds synthetic bf16 checkpoints of two kinds of shapes:
  - 7b: Llama-7B-shaped (hidden 4096, intermediate 11008, vocab 32000, `--layers` decoder layers,
    several shards);
  - huge: the shapes of the largest open models, in one file: a 53248 x 16384 weight (a Llama-3.1-405B
    MLP projection, 1.74 GB), a 65536 x 32768 weight (4.29 GB) and a 152064 x 3584 embedding (1.09 GB,
    kept); written in chunks, so building it takes little memory;
  - fp8: the huge shapes as a block-scaled FP8 checkpoint (DeepSeek-V3 style: F8_E4M3 weights with a
    float32 scale per 128 x 128 block), decoded while converting;
  - flux (not by default): a Flux.1-dev-shaped diffusers transformer, 11.9 G params (23.8 GB) in 5 GB
    shards, decided by diffusers' rules; compare with ``7b --layers 57``, an LLM of its size (11.8 G params);
then measures:
  - quantizer throughput (params/s): nf4convert (absmax and --scales search) vs
    bitsandbytes.functional.quantize_4bit, same tensors;
  - for each checkpoint, end-to-end `nf4convert convert` wall time vs a copy baseline that reads the same
    source bytes and writes (and fsyncs) as many bytes as the output has: the I/O floor. The first
    conversion (no cached decisions) once, then the median of 3 cached ones, each followed by a copy
    baseline (median of those); with --scales search once; the peak RSS of the conversions (child
    processes), and the CPU seconds of the median run by thread role (main: start-up and planning,
    quantizing; read; write; hashing the source; sealing; torch's native threads);
  - transformers loading the 7b source with a bitsandbytes NF4 config and save_pretrained (the peer's
    way), unless --no-peer;
  - output bits per parameter;
  - the 7b conversion again on a local Dask cluster (`--workers`, default 2), the Dask start included.

Usage: python scripts/bench.py [--shapes 7b,huge,fp8] [--layers 10] [--workdir bench-out] [--no-peer] [--keep] [--workers 2]
Needs bitsandbytes and transformers (pip install -e .[test]). Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000


def cut_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """bf16 tensors ``(name, shape)`` cut into shards of at most ``shard_bytes`` (a larger tensor alone), in order."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def make_checkpoint(path: Path, layers: int, shard_bytes: int = 2_000_000_000) -> int:
    """A Llama-shaped bf16 checkpoint with random weights, sharded with an index; returns its parameter count."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [(f"{p}.input_layernorm.weight", (HIDDEN,)), (f"{p}.post_attention_layernorm.weight", (HIDDEN,))]
        tensors += [(f"{p}.self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        tensors += [(f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN))]
        tensors += [(f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    shards = cut_shards(tensors, shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.ones(s, dtype=torch.bfloat16) if len(s) == 1 else w(*s) for n, s in shard}, path / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in shard})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": VOCAB,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    (path / "config.json").write_text(json.dumps(config))
    return sum(torch.Size(s).numel() for _, s in tensors)


#: The huge-shapes checkpoint: (name, shape) in file order.
HUGE = [
    ("model.embed_tokens.weight", (152064, 3584)),
    ("model.layers.0.mlp.down_proj.weight", (53248, 16384)),
    ("model.layers.0.mlp.up_proj.weight", (65536, 32768)),
]


def make_huge_checkpoint(path: Path) -> int:
    """The :data:`HUGE` tensors in one file, random bf16 written 64 MB at a time; returns the parameter count."""
    from nf4convert.write import ShardWriter, as_bytes

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    step = 32 << 20  # elements per chunk

    def chunks(numel: int):
        for start in range(0, numel, step):
            yield as_bytes((torch.randn(min(step, numel - start), generator=g) * 0.02).to(torch.bfloat16))

    writer = ShardWriter(path / "model.safetensors", [(n, "BF16", s) for n, s in HUGE], {"format": "pt"})
    for name, shape in HUGE:
        writer.write(name, chunks(torch.Size(shape).numel()))
    writer.finish()  # no config.json: no architecture has these shapes, so the name rules decide
    return sum(torch.Size(s).numel() for _, s in HUGE)


def make_fp8_checkpoint(path: Path) -> int:
    """The :data:`HUGE` shapes as a block-scaled FP8 checkpoint (DeepSeek-V3 style): the two weights F8_E4M3
    with a float32 ``_scale_inv`` per 128 x 128 block, the embedding bf16; written 1024 rows at a time."""
    from nf4convert.write import ShardWriter, as_bytes

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    entries = [HUGE[0] + ("BF16",)] + [e for n, s in HUGE[1:] for e in ((n, s, "F8_E4M3"), (n + "_scale_inv", (s[0] // 128, s[1] // 128), "F32"))]
    writer = ShardWriter(path / "model.safetensors", [(n, d, s) for n, s, d in entries], {"format": "pt"})
    emb_name, emb_shape = HUGE[0]
    writer.write(emb_name, (as_bytes((torch.randn(min(1024, emb_shape[0] - r), emb_shape[1], generator=g) * 0.02).to(torch.bfloat16)) for r in range(0, emb_shape[0], 1024)))
    for name, (rows, cols) in HUGE[1:]:
        scales = torch.empty(rows // 128, cols // 128)
        for r in range(0, rows, 1024):
            w = torch.randn(1024, cols, generator=g) * 0.02
            s = w.view(8, 128, cols // 128, 128).abs().amax(dim=(1, 3)) / 448
            scales[r // 128 : r // 128 + 8] = s
            q = (w.view(8, 128, cols // 128, 128) / s[:, None, :, None]).to(torch.float8_e4m3fn)
            writer.write(name, as_bytes(q.view(torch.uint8)), r * cols)
        writer.write(name + "_scale_inv", scales)
    writer.finish()
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps({"quantization_config": fp8}))  # no model_type: the name rules decide
    return sum(torch.Size(s).numel() for _, s in HUGE)


def make_flux_checkpoint(path: Path, shard_bytes: int = 5_000_000_000) -> int:
    """A Flux.1-dev-shaped diffusers transformer (FluxTransformer2DModel's default config with guidance:
    11.9 G params), random bf16 written 64 MB at a time into numbered shards with diffusers' index and
    ``config.json``: a diffusers component; returns the parameter count."""
    import diffusers

    from nf4convert.constants import DIFFUSERS_FILES
    from nf4convert.write import ShardWriter, as_bytes

    path.mkdir(parents=True)
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(guidance_embeds=True)
    tensors = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    shards = cut_shards(tensors, shard_bytes)
    g = torch.Generator().manual_seed(0)
    step = 32 << 20
    weight_map = {}
    for fname, shard in zip(DIFFUSERS_FILES.names(len(shards)), shards):
        writer = ShardWriter(path / fname, [(n, "BF16", s) for n, s in shard], {"format": "pt"})
        for name, shape in shard:
            numel = torch.Size(shape).numel()
            writer.write(name, (as_bytes((torch.randn(min(step, numel - a), generator=g) * 0.02).to(torch.bfloat16)) for a in range(0, numel, step)))
        writer.finish()
        weight_map.update({n: fname for n, _ in shard})
    (path / DIFFUSERS_FILES.index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({**dict(model.config), "_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__}))
    return sum(torch.Size(s).numel() for _, s in tensors)


CHILD = """
import atexit, json, os, resource, runpy, sys, threading, time
report_path, target, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
TICK, MAIN = os.sysconf("SC_CLK_TCK"), threading.get_native_id()
ROLES = {"nf4-read": "read (and FP8/MXFP4 decode)", "nf4-quantize": "quantize (kernel threads)", "nf4-write": "write", "nf4-copy": "copy kept tensors", "nf4-flush": "start writeback",
         "nf4-hash-source": "hash the source", "nf4-hash-read": "read for a hash", "nf4-seal": "seal (fsync, hash the output)"}
seen, began = {}, []  # native id -> [role, CPU s]; the main thread's CPU when the first task thread appeared

def cpu(tid):
    try:
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return None

def sample():
    for t in threading.enumerate():
        role = "main" if t.native_id == MAIN else "sampler" if t.name == "bench-sampler" else next((r for p, r in ROLES.items() if t.name.startswith(p)), "other Python threads")
        c = cpu(t.native_id)
        if c is not None:
            if role == ROLES["nf4-read"] and not began:
                began.append(cpu(MAIN))
            seen[t.native_id] = [role, c]

def loop():
    while True:
        sample()
        time.sleep(0.02)

def report():  # VmHWM: this process's own peak RSS (ru_maxrss would include the forked parent's pages)
    sample()
    u = resource.getrusage(resource.RUSAGE_SELF)
    by = {}
    for role, c in seen.values():
        by[role] = by.get(role, 0.0) + c
    main = by.pop("main", 0.0)
    start = began[0] if began else main
    by.update({"main: start-up (imports) and planning": start, "main: quantize and orchestrate": main - start})
    by["native threads (torch, OpenMP)"] = max(0.0, u.ru_utime + u.ru_stime - sum(by.values()))
    rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    json.dump({"peak_rss": rss * 1024, "cpu_s": by, "user_s": u.ru_utime, "system_s": u.ru_stime}, open(report_path, "w"))

atexit.register(report)
threading.Thread(target=loop, name="bench-sampler", daemon=True).start()
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


class Measured(NamedTuple):
    """One child run: wall seconds, peak RSS bytes, its stdout, and CPU seconds by thread role (sampled
    from /proc every 20 ms; the main thread split where the first task thread appeared)."""

    seconds: float
    peak_rss: int
    stdout: str
    cpu: dict


def run_measured(argv: list[str], workdir: Path, env: dict | None = None) -> Measured:
    """Run ``python -m MODULE ...`` or ``python SCRIPT.py ...`` in a child (with ``env`` added)."""
    report = workdir / "child-report.json"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(report), *argv], capture_output=True, text=True, env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed: {proc.stderr[-2000:]}")
    child = json.loads(report.read_text())
    return Measured(elapsed, child["peak_rss"], proc.stdout, {**child["cpu_s"], "user": child["user_s"], "system": child["system_s"]})


def quantizer_throughput(repeats: int = 5) -> dict[str, float]:
    """params/s of both quantizers on the same Llama-7B-shaped bf16 tensors (median of warm runs)."""
    import bitsandbytes.functional as F

    from nf4convert.quantize import quantize_nf4

    g = torch.Generator().manual_seed(1)
    tensors = [(torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for s in [(INTERMEDIATE, HIDDEN), (HIDDEN, HIDDEN)]]
    params = sum(t.numel() for t in tensors)

    def timed(fn) -> float:
        for t in tensors:
            fn(t)  # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            for t in tensors:
                fn(t)
            runs.append(time.perf_counter() - start)
        return params / statistics.median(runs)

    ours = timed(lambda t: quantize_nf4(t, blocksize=64))
    search = timed(lambda t: quantize_nf4(t, blocksize=64, scales="search"))
    importance = torch.rand(HIDDEN, generator=g)  # every test tensor has HIDDEN columns
    weighted = timed(lambda t: quantize_nf4(t, blocksize=64, scales="search", importance=importance))
    bnb = timed(lambda t: F.quantize_4bit(t, blocksize=64, quant_type="nf4"))
    return {"nf4convert": ours, "nf4convert_search": search, "nf4convert_search_importance": weighted, "bitsandbytes": bnb}


COPY_CHUNK = 16 << 20


def efficient_copy(source: Path, out_bytes: int, target: Path, *, kernel_copy: bool) -> float:
    """The I/O floor of a conversion: read every source shard and write (and fsync) ``out_bytes``, as an
    efficient copy does: one reused buffer filled by ``readinto``; the bytes written either from that
    buffer (a quarter of each read, as NF4 is a quarter of bf16) or, with ``kernel_copy``, by
    ``os.copy_file_range`` from the source without passing through user space."""
    start = time.perf_counter()
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    written = 0
    with open(target, "wb", buffering=0) as out:
        for shard in sorted(source.glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as f:
                if kernel_copy:
                    want = min(out_bytes - written, shard.stat().st_size)
                    while want > 0 and (n := os.copy_file_range(f.fileno(), out.fileno(), want)):
                        written, want = written + n, want - n
                    f.seek(0)
                while n := f.readinto(buffer):
                    keep = 0 if kernel_copy else min(n // 4 + 1, n, out_bytes - written)
                    if keep > 0:
                        out.write(view[:keep])
                        written += keep
        buffer[:] = bytes(len(buffer))
        while written < out_bytes:
            written += out.write(view[: min(len(buffer), out_bytes - written)])
        os.fsync(out.fileno())
    return time.perf_counter() - start


def settle_bytes(source: Path, out_bytes: int, *, cold: bool) -> int:
    """What a run allocates afresh, to :func:`settle_memory` before it: the output, the source's page
    cache when cold, and 1 GiB of buffers."""
    return out_bytes + (sum(p.stat().st_size for p in source.glob("*.safetensors")) if cold else 0) + (1 << 30)


def copy_floor(source: Path, out_bytes: int, target: Path, *, cold: bool) -> float:
    """The faster of the two efficient copies (:func:`efficient_copy`), each from a dropped page cache
    (``cold``) or with the source read once before (warm): the floor a conversion is divided by."""
    times = []
    for kernel_copy in (False, True):
        drop_page_cache(source) if cold else warm(source)
        settle_memory(settle_bytes(source, out_bytes, cold=cold))
        times.append(efficient_copy(source, out_bytes, target, kernel_copy=kernel_copy))
        target.unlink()
    return min(times)


def drop_page_cache(*folders: Path) -> str:
    """Empty the page cache: the whole machine's where this process may (``/proc/sys/vm/drop_caches`` as
    root), else each file's under ``folders`` (``posix_fadvise(POSIX_FADV_DONTNEED)``, after a sync).
    Returns which."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for folder in folders:
            for path in [folder] if folder.is_file() else (p for p in folder.rglob("*") if p.is_file()):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "posix_fadvise"


def settle_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory, then free it. On a virtual machine that hands free memory back
    to its host (this one: after the page cache is dropped, a first touch of 3 GiB took 1.30 s, the next
    ones 0.37-0.52 s), whichever run comes first after memory was freed pays for the host backing it
    again; run before each conversion and each copy, it gives both the same start."""
    np.ones(nbytes, dtype=np.uint8)


def warm(source: Path) -> None:
    """Read every source shard once (into the page cache); returns None (no cache dropped)."""
    buffer = bytearray(COPY_CHUNK)
    for shard in sorted(source.glob("*.safetensors")):
        with open(shard, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


PEER = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, device_map="cpu")
m.save_pretrained(sys.argv[2])
"""


def measure(src: Path, work: Path, workers: int | None = None, repeats: int = 3) -> dict:
    """For one checkpoint, in this order: the first conversion (an empty decisions cache, as for a model
    never converted here: transformers' modeling import and its meta model; the compiled kernel is kept),
    warm; then ``repeats`` rounds of a cold conversion (page cache dropped before), a cold copy floor, a
    warm conversion (the source read once before) and a warm copy floor (medians of each); one ``--scales
    search`` conversion, warm; with ``workers``, one on a local Dask cluster of that many worker
    processes. Before each conversion and each copy, :func:`settle_memory`. CPU seconds by thread role are the median warm run's; the source's hashes are those of
    the hash cache after the first conversion (``sha256_from``), as for any repeated conversion."""
    from nf4convert.files import cache_dir

    out = work / "nf4"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["nf4convert", "convert", str(src), str(out), "--quiet"]
    fresh = work / "first-cache"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    for kernel in cache_dir().glob("nf4kernel-*"):
        shutil.copy2(kernel, fresh / kernel.name)
    print(f"nf4convert convert {src.name} (first conversion: no cached decisions, no remembered hashes) ...", file=sys.stderr)
    warm(src)
    first = run_measured(cmd, work, env={"NF4CONVERT_CACHE": str(fresh)})
    shutil.rmtree(fresh)
    manifest = json.loads((out / "nf4convert.json").read_text())
    out_bytes = sum(f["size"] for f in manifest["files"])
    from nf4convert.files import file_record

    for shard in src.glob("*.safetensors"):  # remembered, as after any conversion of this source here
        file_record(shard, shard.name, trust_cache=True)
    runs: dict[str, list] = {"cold": [], "warm": [], "cold_copy": [], "warm_copy": []}
    method = None
    for i in range(repeats):
        for state in ("cold", "warm"):
            shutil.rmtree(out, ignore_errors=True)
            how = drop_page_cache(src, work) if state == "cold" else warm(src)
            method = how or method
            settle_memory(settle_bytes(src, out_bytes, cold=state == "cold"))
            print(f"nf4convert convert {src.name} ({state}, run {i + 1} of {repeats}) ...", file=sys.stderr)
            runs[state].append(run_measured(cmd, work))
            shutil.rmtree(out)
            runs[f"{state}_copy"].append(copy_floor(src, out_bytes, work / "copy.bin", cold=state == "cold"))
    median = {state: sorted(runs[state], key=lambda m: m.seconds)[len(runs[state]) // 2] for state in ("cold", "warm")}
    floor = {state: statistics.median(runs[f"{state}_copy"]) for state in ("cold", "warm")}
    print(f"nf4convert convert {src.name} --scales search ...", file=sys.stderr)
    warm(src)
    search_s = run_measured([*cmd, "--scales", "search"], work).seconds
    shutil.rmtree(out)
    dask_s = None
    if workers:
        print(f"nf4convert convert {src.name} --workers {workers} ...", file=sys.stderr)
        dask_s = run_measured([*cmd, "--workers", str(workers)], work).seconds
        shutil.rmtree(out)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    largest = max(t["shape"][0] * t["shape"][1] * 2 for t in manifest["tensors"]["quantized"] + manifest["tensors"]["kept"] if len(t["shape"]) == 2)
    return {
        "parameters": manifest["summary"]["parameters"], "bytes": src_bytes, "largest_tensor_bytes": largest,
        "shards": len(list(src.glob("*.safetensors"))), "dropped_by": method,
        **{f"{state}_s": median[state].seconds for state in ("cold", "warm")},
        **{f"{state}_runs_s": [m.seconds for m in runs[state]] for state in ("cold", "warm")},
        **{f"{state}_copy_s": floor[state] for state in ("cold", "warm")},
        **{f"{state}_copy_runs_s": runs[f"{state}_copy"] for state in ("cold", "warm")},
        **{f"{state}_vs_copy": median[state].seconds / floor[state] for state in ("cold", "warm")},
        "first_convert_s": first.seconds, "first_vs_warm_copy": first.seconds / floor["warm"],
        "convert_peak_rss": max(m.peak_rss for m in [first, *runs["cold"], *runs["warm"]]), "cpu_s": median["warm"].cpu,
        "cold_cpu_s": median["cold"].cpu, "first_cpu_s": first.cpu,
        "search_s": search_s, "output_bytes": out_bytes, "dask_s": dask_s, "workers": workers,
        "bits_per_parameter": manifest["summary"]["bits_per_parameter"],
        "quantized_bits_per_parameter": manifest["summary"]["quantized_bits_per_parameter"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b,huge,fp8", help="checkpoints to measure, comma-separated: 7b, huge, fp8, flux")
    ap.add_argument("--layers", type=int, default=10, help="decoder layers of the 7b checkpoint (10: 2.3 G params, 4.6 GB)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--no-peer", action="store_true", help="skip transformers + bitsandbytes save_pretrained")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints for the next run")
    ap.add_argument("--workers", type=int, default=2, help="also convert the 7b checkpoint on a local Dask cluster of N workers (0: no)")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(exist_ok=True)
    sources = {}
    for shape in args.shapes.split(","):
        src = work / {"7b": f"llama-{args.layers}l-bf16", "huge": "huge-bf16", "fp8": "huge-fp8", "flux": "flux-dev-bf16"}[shape]
        if not any(src.glob("*.safetensors")):
            shutil.rmtree(src, ignore_errors=True)
            print(f"building {src} ...", file=sys.stderr)
            {"7b": lambda p: make_checkpoint(p, args.layers), "huge": make_huge_checkpoint, "fp8": make_fp8_checkpoint, "flux": make_flux_checkpoint}[shape](src)
        sources[shape] = src

    print("quantizer throughput ...", file=sys.stderr)
    q = quantizer_throughput()
    runs = {shape: measure(src, work, args.workers if shape == "7b" else None) for shape, src in sources.items()}

    peer = None
    if not args.no_peer and "7b" in sources:
        print("transformers + bitsandbytes load and save_pretrained ...", file=sys.stderr)
        peer_out = work / "peer"
        shutil.rmtree(peer_out, ignore_errors=True)
        script = work / "peer.py"
        script.write_text(PEER)
        peer = run_measured([str(script), str(sources["7b"]), str(peer_out)], work)[:2]  # seconds, peak RSS
        shutil.rmtree(peer_out, ignore_errors=True)

    result = {
        "quantizer_params_per_s": q, "quantizer_ratio": q["nf4convert"] / q["bitsandbytes"], "runs": runs,
        "peer_s": peer[0] if peer else None, "peer_peak_rss": peer[1] if peer else None, "threads": torch.get_num_threads(),
    }
    (work / "bench.json").write_text(json.dumps(result, indent=2))
    gb = 1e9
    rows = [
        ("quantizer, nf4convert", f"{q['nf4convert'] / 1e6:,.0f} M params/s", f"{result['quantizer_ratio']:.1f}x bitsandbytes"),
        ("quantizer, nf4convert --scales search", f"{q['nf4convert_search'] / 1e6:,.0f} M params/s", f"{q['nf4convert_search'] / q['nf4convert']:.2f}x absmax"),
        ("quantizer, nf4convert --scales search --importance", f"{q['nf4convert_search_importance'] / 1e6:,.0f} M params/s", f"{q['nf4convert_search_importance'] / q['nf4convert']:.2f}x absmax"),
        ("quantizer, bitsandbytes quantize_4bit", f"{q['bitsandbytes'] / 1e6:,.0f} M params/s", "1.0x"),
    ]
    for shape, r in runs.items():
        p, s_ = r["parameters"], r["warm_s"]
        rows += [
            (f"{shape}: checkpoint", f"{p / 1e9:.2f} G params, {r['bytes'] / gb:.2f} GB, {r['shards']} shard(s), largest tensor {r['largest_tensor_bytes'] / gb:.2f} GB as bf16", ""),
            *[(f"{shape}: nf4convert convert, {state} (page cache {'dropped by ' + r['dropped_by'] if state == 'cold' else 'holding the source'}; median of {len(r[state + '_runs_s'])})",
               f"{r[state + '_s']:.1f} s ({p / r[state + '_s'] / 1e6:,.0f} M params/s, {r['bytes'] / r[state + '_s'] / gb:.2f} GB/s)", f"{r[state + '_vs_copy']:.2f}x the {state} copy floor")
              for state in ("cold", "warm")],
            *[(f"{shape}: copy floor, {state} (efficient copy: readinto one buffer, or copy_file_range; write+fsync the output's bytes; median of {len(r[state + '_copy_runs_s'])})", f"{r[state + '_copy_s']:.1f} s", "1.00x")
              for state in ("cold", "warm")],
            (f"{shape}: nf4convert convert, first conversion (no cached decisions or hashes), warm", f"{r['first_convert_s']:.1f} s", f"{r['first_vs_warm_copy']:.2f}x the warm copy floor"),
            (f"{shape}: CPU seconds of the median warm run", ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s"].items() if v >= 0.05), ""),
            (f"{shape}: CPU seconds of the first conversion", ", ".join(f"{k} {v:.1f}" for k, v in r["first_cpu_s"].items() if v >= 0.05), ""),
            (f"{shape}: nf4convert convert --scales search, warm", f"{r['search_s']:.1f} s ({p / r['search_s'] / 1e6:,.0f} M params/s)", f"{r['search_s'] / r['warm_copy_s']:.2f}x the warm copy floor"),
            *([(f"{shape}: nf4convert convert --workers {r['workers']} (local Dask cluster, its start included)", f"{r['dask_s']:.1f} s ({p / r['dask_s'] / 1e6:,.0f} M params/s)", f"{s_ / r['dask_s']:.2f}x the single process's speed")] if r["dask_s"] else []),
            (f"{shape}: peak RSS, nf4convert convert", f"{r['convert_peak_rss'] / 2**20:,.0f} MiB", ""),
            (f"{shape}: output", f"{r['output_bytes'] / gb:.2f} GB, {r['bits_per_parameter']:.3f} bits/param overall", f"{r['quantized_bits_per_parameter']:.3f} for quantized weights"),
        ]
    if peer:
        rows += [
            ("7b: transformers+bnb load + save_pretrained", f"{peer[0]:.1f} s", f"nf4convert {peer[0] / runs['7b']['warm_s']:.1f}x faster (warm)"),
            ("7b: peak RSS, transformers+bnb", f"{peer[1] / 2**20:,.0f} MiB", f"{peer[1] / runs['7b']['convert_peak_rss']:.1f}x nf4convert's"),
        ]
    print("| measure | value | ratio |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if not args.keep:
        for src in sources.values():
            shutil.rmtree(src)


if __name__ == "__main__":
    main()
