"""Large weights are read, quantized and written in pieces of whole blocks: the bytes are those of the
whole weight, and resume, determinism and the truncated-source error hold for pieces too, read through
a buffer or mapped."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from nf4convert.constants import DTYPE_SIZES
from nf4convert.convert import convert
from nf4convert.pieces import pieces
from nf4convert.errors import QuantizationError
from nf4convert.plan import Options, make_plan
from nf4convert.source import open_source

conversion = importlib.import_module("nf4convert.pieces")


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "odd.weight": torch.randn(301, 1001),  # float32, odd numel, a partial last block
        "wide.weight": torch.randn(513, 2048).to(torch.bfloat16) * 0.02,
        "half.weight": torch.randn(77, 640).to(torch.float16),
        "norm.weight": torch.ones(64),
    }
    save_file(tensors, tmp_path / "src.safetensors")
    return tmp_path / "src.safetensors"


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("scales", ["absmax", "search"])
def test_pieces_give_the_bytes_of_the_whole_weight(source, tmp_path, monkeypatch, blocksize, double_quant, scales):
    """With --scales search and double quantization, pieces are whole nested blocks (2 to 19 of them here)."""
    options = Options(blocksize=blocksize, double_quant=double_quant, scales=scales)
    whole = convert(source, tmp_path / "whole", options=options)
    monkeypatch.setattr(conversion, "PIECE_BYTES", 4096)  # 2 to 512 pieces per weight
    nested = scales == "search" and double_quant
    for t in make_plan(open_source(source), options).quantized:
        ranges = pieces(t, blocksize, nested)
        assert len(ranges) > 1 or t.source.info.numel <= 256 * blocksize
        assert not nested or all(start % (256 * blocksize) == 0 for start, _ in ranges)
    assert files(convert(source, tmp_path / "pieces", options=options)) == files(whole)


def test_pieces_are_whole_blocks_covering_the_weight(source, monkeypatch):
    monkeypatch.setattr(conversion, "PIECE_BYTES", 10_000)
    for t in make_plan(open_source(source), Options()).quantized:
        ranges = pieces(t, 64)
        assert ranges[0][0] == 0 and ranges[-1][1] == t.source.info.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        size = DTYPE_SIZES[t.source.info.dtype]
        assert all(start % 64 == 0 and (stop - start) * size <= 10_000 for start, stop in ranges)


def test_a_non_finite_value_in_a_later_piece_names_its_place_in_the_weight(tmp_path, monkeypatch):
    w = torch.randn(64, 1024)
    w[50, 7] = float("nan")  # element 51207, in piece 12 of 16
    save_file({"a.weight": w}, tmp_path / "src.safetensors")
    monkeypatch.setattr(conversion, "PIECE_BYTES", 16384)
    with pytest.raises(QuantizationError, match=r"a\.weight: contains NaN or Inf \(first in elements 51200\.\.51263\)"):
        convert(tmp_path / "src.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_source_truncated_inside_a_weight_is_an_error_naming_it(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"big.weight": torch.randn(1024, 1024)}, src)
    code = f"""
import importlib, os
from nf4convert.errors import SourceError
from nf4convert.convert import convert
c = importlib.import_module("nf4convert.pieces")
c.PIECE_BYTES = 65536
def truncate(_):
    os.truncate(r"{src}", os.path.getsize(r"{src}") // 2)
try:
    convert(r"{src}", r"{tmp_path / 'out'}", progress=truncate)
except SourceError as e:
    print("SourceError", e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("SourceError") and "ends inside tensor 'big.weight'" in p.stdout
    assert sorted(q.name for q in tmp_path.iterdir()) == ["src.safetensors"]


def test_a_conversion_killed_inside_a_weight_resumes_to_the_same_bytes(tmp_path):
    """kill -9 from the progress callback inside a weight (pieces of 256 KiB, 16 to a weight) once two
    shards are journaled; the resumed conversion gives the uninterrupted one's bytes."""
    src = tmp_path / "src.safetensors"
    save_file({f"l{i}.weight": torch.randn(1024, 1024) for i in range(12)}, src)  # 4 MiB each; 0.53 MB of output: a shard each
    code = """
import importlib, json, os, signal, sys, time
from nf4convert.convert import convert
from nf4convert.plan import Options
c = importlib.import_module("nf4convert.pieces")
c.PIECE_BYTES = 1 << 18
journal, kill, done = sys.argv[2] + ".nf4convert-partial/nf4convert-progress.json", sys.argv[3] == "kill", 0
def journaled():
    return os.path.exists(journal) and len(json.load(open(journal))["shards"]) >= 2
def progress(n):  # the writer thread, slowed down so that finished shards are journaled meanwhile
    global done
    done += n
    time.sleep(0.01)
    if kill and done % (4 << 20) and journaled():
        os.kill(os.getpid(), signal.SIGKILL)
convert(sys.argv[1], sys.argv[2], options=Options(max_shard_size=1_000_000), progress=progress)
"""

    def run(out, kill=False):
        return subprocess.run([sys.executable, "-c", code, str(src), str(out), "kill" if kill else "-"], capture_output=True, text=True, timeout=300)

    assert run(tmp_path / "reference").returncode == 0
    killed = run(tmp_path / "out", kill=True)
    assert killed.returncode == -9 and not (tmp_path / "out").exists()
    assert len(json.loads((tmp_path / "out.nf4convert-partial" / "nf4convert-progress.json").read_text())["shards"]) >= 2
    assert run(tmp_path / "out").returncode == 0
    assert files(tmp_path / "out") == files(tmp_path / "reference")


SHRINK = """
import os, sys
import numpy as np
from nf4convert import arrays, native
from nf4convert.errors import SourceError
from nf4convert.tensorfile import ShardReader, read_header

src = sys.argv[1]
info, data = read_header(src)[0]["w"], open(src, "rb").read()
assert native.guard()


def shrunk():
    with open(src, "wb") as f:
        f.write(data)
    view = np.frombuffer(ShardReader(src).map_cached(info, 0, info.nbytes), dtype=np.uint8)
    os.truncate(src, info.start + 4096)  # the rest of the mapping is gone: an access there is SIGBUS
    return view


blocks = info.nbytes // 2 // 64
calls = {
    "quantize": lambda v: arrays.quantize(v, "BF16", 64),
    "search": lambda v: arrays.quantize(v, "BF16", 64, search=True),
    "encode": lambda v: native.encode_blocks(v, "BF16", 64, arrays.NF4_THRESHOLDS, np.ones(blocks, np.float32)),
    "decode FP8": lambda v: native.decode_fp8(v.reshape(-1, 1024), np.ones((64, 8), np.float32), 0, (128, 128), np.empty(v.size, np.float32)),
}
for name, call in calls.items():
    try:
        call(shrunk())
    except SourceError as e:
        print(name, "SourceError:", e, flush=True)
print("outside the kernel", flush=True)
print(int(shrunk().sum()))  # not the kernel: SIGBUS ends the process, as without the guard
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGBUS on a truncated mapping, as Linux gives it")
@pytest.mark.parametrize("faulthandler", [False, True])
def test_the_kernel_survives_a_mapped_source_that_shrinks(tmp_path, faulthandler):
    """Each kernel function that reads a mapped source returns a SourceError when the file is truncated
    under the mapping, on two threads; a SIGBUS anywhere else still ends the process, through the handler
    installed before the kernel's (Python's faulthandler, which prints its traceback, or the default)."""
    from nf4convert import native

    if native.library() is None:
        pytest.skip(native.unavailable_reason())
    save_file({"w": torch.randn(2048, 1024).to(torch.bfloat16)}, tmp_path / "src.safetensors")  # 2 kernel calls a function
    flags = ["-X", "faulthandler"] if faulthandler else []
    env = {**os.environ, "NF4CONVERT_THREADS": "2"}
    p = subprocess.run([sys.executable, *flags, "-c", SHRINK, str(tmp_path / "src.safetensors")], capture_output=True, text=True, timeout=120, env=env)
    lines = p.stdout.splitlines()
    assert lines == [f"{name} SourceError: a source file shrank while it was being read" for name in ("quantize", "search", "encode", "decode FP8")] + [
        "outside the kernel"
    ], p.stderr
    assert p.returncode == -signal.SIGBUS
    assert ("Bus error" in p.stderr) == faulthandler


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_default_conversion_reads_its_weights_mapped_and_gives_the_eager_bytes(source, tmp_path):
    """The native kernel reads whole-block pieces straight from a mapping of the source (no copy through
    a buffer); the partial last block of odd.weight goes through a buffer. Same bytes as the eager
    kernel, which reads every piece with pread."""
    seen = []

    def progress(_: int) -> None:
        with open("/proc/self/maps") as maps:
            seen.append(str(source) in maps.read())

    mapped = convert(source, tmp_path / "mapped", progress=progress)
    assert any(seen)
    assert files(mapped) == files(convert(source, tmp_path / "eager", kernel="eager"))


def file_system(path) -> str:
    """The type of the file system ``path`` is on (Linux: the longest mount point above it)."""
    mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    return max(((point, kind) for point, kind in mounts if str(path).startswith(point.rstrip("/") + "/")), key=lambda m: len(m[0]))[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and /proc/mounts")
def test_a_mapped_piece_is_only_one_the_page_cache_holds_and_inside_the_file(tmp_path):
    """map_cached maps a range only where every page is cached (a piece on disk is read through a buffer:
    as fast, and its copy overlaps the wait), and refuses a range the file no longer holds."""
    from nf4convert.errors import SourceError
    from nf4convert.tensorfile import ShardReader, read_header

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.randn(1024, 1024)}, src)
    info = read_header(src)[0]["w"]
    reader = ShardReader(src)
    try:
        view = reader.map_cached(info, 4096, 1 << 20)
        assert view is not None and bytes(view[:8]) == src.read_bytes()[info.start + 4096 : info.start + 4104]
        view.release()
        fd = os.open(src, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        os.close(fd)
        if file_system(src) != "tmpfs":  # whose pages never leave memory
            assert reader.map_cached(info, 4096, 1 << 20) is None
        os.truncate(src, info.start + 100)
        with pytest.raises(SourceError, match=r"src\.safetensors: ends inside tensor 'w'"):
            reader.map_cached(info, 0, info.nbytes)
    finally:
        reader.close()
