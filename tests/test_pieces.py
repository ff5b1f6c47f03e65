"""Large weights are read, quantized and written in pieces of whole blocks: the bytes are those of the
whole weight, and resume, determinism and the truncated-source error hold for pieces too."""

from __future__ import annotations

import importlib
import json
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
