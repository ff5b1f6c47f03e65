"""The package's public surface: importing and converting need neither bitsandbytes nor transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_and_convert_without_bitsandbytes_or_transformers(tmp_path):
    code = f"""
import sys
sys.modules["bitsandbytes"] = None
sys.modules["transformers"] = None
import torch
from safetensors.torch import save_file
import nf4convert
save_file({{"layer.weight": torch.randn(64, 128)}}, r"{tmp_path}/w.safetensors")
out = nf4convert.convert(r"{tmp_path}/w.safetensors", r"{tmp_path}/out", options=nf4convert.Options(blocksize=32))
print(nf4convert.verify(out)["ok"], sorted(nf4convert.open_checkpoint(out).quant_states))
try:
    nf4convert.load_model(out)
except nf4convert.errors.MissingDependencyError as e:
    print(e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "True ['layer.weight']"
    assert lines[1] == "load_model needs transformers and accelerate: pip install 'nf4convert[load]'"


def test_starting_the_cli_and_planning_do_not_import_torch(llama_dir):
    """Starting the CLI costs no torch import (its start-up is seconds); without transformers (the name
    rules decide) planning needs no torch either."""
    code = f"""
import sys
import nf4convert, nf4convert.cli
from nf4convert.resolve import resolve_source
from nf4convert.plan import make_plan, Options
src = resolve_source(r"{llama_dir}")
print("torch" in sys.modules)
sys.modules["transformers"] = None  # the name rules decide: planning itself needs no torch either
plan = make_plan(src, Options())
print("torch" in sys.modules, len(plan.shards) == len(src.shards))
import nf4convert.convert, nf4convert.verify, nf4convert.dequantize
print(all(callable(f) and not isinstance(f, type(sys)) for f in (nf4convert.convert, nf4convert.verify, nf4convert.dequantize)))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "False", "True", "True"]


def test_source_hashing_stops_when_cancelled(tmp_path, monkeypatch):
    """A file of several chunks stops between them (one smaller than a chunk is hashed at once)."""
    import threading

    import pytest

    from nf4convert import files

    monkeypatch.setattr(files, "_HASH_CHUNK", 10)
    (tmp_path / "f").write_bytes(b"x" * 100)
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        files.sha256_file(tmp_path / "f", stop=stop)


def test_a_file_hashed_in_chunks_read_ahead_is_its_sha256(tmp_path, monkeypatch):
    """sha256_file reads the next chunk on a helper thread while it hashes one: every chunk in order,
    the last one short; a file smaller than a chunk, an empty one too, at once."""
    import hashlib
    import os

    from nf4convert import files

    monkeypatch.setattr(files, "_HASH_CHUNK", 1000)
    for size in (0, 1, 999, 1000, 1001, 4567):
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert files.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest(), size


@pytest.mark.parametrize("size", [700, 4567])  # smaller than a chunk, and several chunks
def test_a_file_hashed_while_its_end_is_written_is_its_final_sha256(tmp_path, monkeypatch, size):
    """With ``ready``, sha256_file reads no byte before the writer says it is written: the hash of a file
    (sized first, its bytes written in order by another thread, slowly) is that of its final bytes."""
    import hashlib
    import os
    import threading
    import time

    from nf4convert import files

    monkeypatch.setattr(files, "_HASH_CHUNK", 1000)
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(bytes(size))  # zeros where the writer has not been yet
    prefix = files.WrittenPrefix(0)

    def writer() -> None:
        with open(path, "r+b", buffering=0) as f:
            for at in range(0, size, 97):
                time.sleep(0.001)
                f.seek(at)
                f.write(data[at : at + 97])
                prefix.advance(at + 97)

    thread = threading.Thread(target=writer)
    thread.start()
    assert files.sha256_file(path, ready=prefix.wait) == hashlib.sha256(data).hexdigest()
    thread.join()


def test_a_hash_waiting_on_a_writer_that_stopped_gives_up(tmp_path):
    import threading

    from nf4convert import files

    (tmp_path / "f").write_bytes(bytes(100))
    prefix = files.WrittenPrefix(10)
    threading.Timer(0.05, prefix.fail).start()
    with pytest.raises(InterruptedError):
        files.sha256_file(tmp_path / "f", ready=prefix.wait)
