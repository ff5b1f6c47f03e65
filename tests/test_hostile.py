"""Hostile and broken input: fuzzed headers and quant-state blobs, a full disk, and Ctrl-C."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nf4convert.errors import FormatError
from nf4convert.layout import decode_quant_state
from nf4convert.tensorfile import read_header

# CI runs a short fuzz; run longer by hand with NF4CONVERT_FUZZ_EXAMPLES=20000
EXAMPLES = int(os.environ.get("NF4CONVERT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "Q4", 7]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-8, 2**40), min_size=0, max_size=3) | json_values,
    }
)
headers = st.dictionaries(st.text(max_size=12), entries | json_values, max_size=5)


def write(path, header: bytes, data: bytes, declared: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
def test_fuzzed_json_headers_are_read_or_refused_with_format_error(tmp_path, header, data):
    path = tmp_path / "f.safetensors"
    write(path, json.dumps(header).encode(), data)
    try:
        tensors, _ = read_header(path)
    except FormatError:
        return
    end = 0
    for info in tensors.values():  # whatever is accepted is consistent
        assert info.start >= 8 and info.end <= path.stat().st_size and info.start == max(end, info.start)
        end = info.end


@FUZZ
@given(raw=st.binary(max_size=256), declared=st.integers(0, 2**64 - 1) | st.none())
def test_fuzzed_raw_bytes_are_refused_with_format_error(tmp_path, raw, declared):
    path = tmp_path / "f.safetensors"
    write(path, raw, b"", declared)
    try:
        read_header(path)
    except FormatError:
        pass


def test_deeply_nested_header_is_refused_not_a_recursion_error(tmp_path):
    path = tmp_path / "f.safetensors"
    write(path, b"[" * 100_000 + b"]" * 100_000, b"")
    with pytest.raises(FormatError):
        read_header(path)


@FUZZ
@given(blob=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_quant_state_blobs_are_parsed_or_refused(blob):
    try:
        state = decode_quant_state(blob, where="w")
    except FormatError:
        return
    assert state.numel > 0 and state.blocksize > 0


def test_full_disk_mid_write_leaves_nothing_that_looks_complete(tmp_path, cli, monkeypatch):
    save_file({f"l{i}.weight": torch.randn(256, 256) for i in range(6)}, tmp_path / "src.safetensors")
    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    code, _, err = cli("convert", tmp_path / "src.safetensors", tmp_path / "out", "--quiet")
    assert code == 5 and err.strip() == f"nf4convert: error: {tmp_path / 'out.nf4convert-partial'}: cannot write the output (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def source_with_shards(tmp_path):
    save_file({f"l{i}.weight": torch.randn(1024, 4096) for i in range(12)}, tmp_path / "src.safetensors")
    return tmp_path / "src.safetensors"


def start_convert(src, out):
    """The CLI in a process of its own, with Ctrl-C's default action: a suite run in the background of a
    shell (``cmd &``) ignores SIGINT, and a child inherits that, so Python would install no handler."""
    return subprocess.Popen(
        [sys.executable, "-m", "nf4convert", "convert", str(src), str(out), "--kernel", "eager", "--max-shard-size", "5MB", "--quiet"],
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_shards(partial, proc, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        journal = partial / "nf4convert-progress.json"
        if journal.exists() and len(json.loads(journal.read_text())["shards"]) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("the conversion finished or stalled before the kill point")


def test_ctrl_c_exits_promptly_keeping_only_a_partial_folder_that_resumes(tmp_path):
    src = source_with_shards(tmp_path)
    proc = start_convert(src, tmp_path / "out")
    partial = tmp_path / "out.nf4convert-partial"
    wait_for_shards(partial, proc, 1)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 15
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("nf4convert: interrupted"), (proc.returncode, err, sorted(os.listdir(tmp_path)))
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nf4convert-partial", "src.safetensors"]
    done = start_convert(src, tmp_path / "out")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0 and "resuming" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.safetensors"]


def test_killed_conversions_resume_to_byte_identical_output(tmp_path):
    src = source_with_shards(tmp_path)
    reference = start_convert(src, tmp_path / "reference")
    assert reference.wait(timeout=300) == 0
    for kill_after in (1, 3):  # shards journaled before kill -9: the next one is half written
        proc = start_convert(src, tmp_path / "out")
        wait_for_shards(tmp_path / "out.nf4convert-partial", proc, kill_after)
        proc.kill()
        proc.wait()
        assert not (tmp_path / "out").exists()
    resumed = start_convert(src, tmp_path / "out")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    names = sorted(p.name for p in (tmp_path / "reference").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir()) and len(names) > 5
    for name in names:
        assert (tmp_path / "reference" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_a_kill_after_a_shard_is_in_place_and_before_the_journal_resumes_after_it(tmp_path):
    """The journal lists a shard once the next one is written; its record beside it is written
    before the rename, so a kill -9 in between still finds the shard done."""
    src = source_with_shards(tmp_path)
    partial = tmp_path / "out.nf4convert-partial"
    proc = start_convert(src, tmp_path / "out")
    deadline = time.monotonic() + 120
    while not any(partial.glob("model-*.safetensors")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    in_place = sorted(p.name for p in partial.glob("model-*.safetensors"))
    journaled = [r["name"] for r in json.loads((partial / "nf4convert-progress.json").read_text())["shards"]]
    assert in_place and len(journaled) < len(in_place)  # killed between a rename and its journal entry
    resumed = start_convert(src, tmp_path / "out")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"resuming, {len(in_place)} shard(s) already done" in err
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_a_partial_folder_from_other_options_is_discarded(tmp_path, cli):
    src = source_with_shards(tmp_path)
    proc = start_convert(src, tmp_path / "out")
    wait_for_shards(tmp_path / "out.nf4convert-partial", proc, 1)
    proc.kill()
    proc.wait()
    code, _, err = cli("convert", src, tmp_path / "out", "--kernel", "eager", "--max-shard-size", "5MB", "--blocksize", "128", "--quiet")
    assert code == 0 and "starting over" in err
    assert json.loads((tmp_path / "out" / "nf4convert.json").read_text())["options"]["blocksize"] == 128


def test_output_does_not_depend_on_the_thread_count(tmp_path):
    src = source_with_shards(tmp_path)
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(src), str(tmp_path / threads), "--quiet", "--max-shard-size", "20MB"],
                       env=env, check=True)
    for f in sorted(p.name for p in (tmp_path / "1").iterdir()):
        assert (tmp_path / "1" / f).read_bytes() == (tmp_path / "2" / f).read_bytes(), f


def test_a_source_that_changes_during_conversion_is_refused(tmp_path):
    from nf4convert.convert import convert
    from nf4convert.errors import SourceError

    src = tmp_path / "src.safetensors"
    save_file({f"l{i}.weight": torch.randn(256, 256) for i in range(4)}, src)

    def rewritten(_: int) -> None:  # another process rewrites the file in place while it is read
        os.utime(src, ns=(1, 1))

    with pytest.raises(SourceError, match="changed while being converted"):
        convert(src, tmp_path / "out", progress=rewritten, kernel="eager")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_a_source_truncated_during_conversion_is_an_error_not_a_crash(tmp_path):
    """A shrinking source is a SourceError, not SIGBUS: a piece read with pread gives a short read, a mapped
    one the native kernel's guard."""
    src = tmp_path / "src.safetensors"
    save_file({f"l{i}.weight": torch.randn(512, 512) for i in range(6)}, src)
    code = f"""
import os
from nf4convert.convert import convert
from nf4convert.errors import SourceError
def truncate(_):
    os.truncate(r"{src}", os.path.getsize(r"{src}") // 3)
try:
    convert(r"{src}", r"{tmp_path / 'out'}", progress=truncate)
except SourceError as e:
    print("SourceError", e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr)  # a SIGBUS would be returncode -7
    assert p.stdout.startswith("SourceError") and "changed while being converted" in p.stdout
    assert sorted(q.name for q in tmp_path.iterdir()) == ["src.safetensors"]


def test_a_short_read_names_the_file_and_tensor(tmp_path):
    from nf4convert.errors import SourceError
    from nf4convert.tensorfile import ShardReader

    src = tmp_path / "src.safetensors"
    save_file({"a.weight": torch.randn(64, 64)}, src)
    info = read_header(src)[0]["a.weight"]
    os.truncate(src, info.start + 100)
    reader = ShardReader(src)
    try:
        with pytest.raises(SourceError, match=r"src\.safetensors: ends inside tensor 'a\.weight'"):
            list(reader.chunks(info))
    finally:
        reader.close()


def test_a_source_changed_before_its_kept_tensors_are_copied_is_refused(tmp_path):
    """Kept tensors are copied when the shard is sealed, after the weights, while the shard is hashed
    behind the copy: a source that changed by then is a SourceError, the hash stops, nothing is left."""
    src = tmp_path / "src.safetensors"
    save_file({"a.bias": torch.randn(1 << 20), "b.weight": torch.randn(256, 256), "c.weight": torch.randn(256, 256)}, src)
    weights = 2 * 256 * 256 * 4
    done = []

    def changed_after_the_weights(n: int) -> None:  # progress: source bytes as they are written
        done.append(n)
        if sum(done) == weights:
            os.utime(src, ns=(1, 1))

    from nf4convert.convert import convert
    from nf4convert.errors import SourceError

    with pytest.raises(SourceError, match="changed while being converted"):
        convert(src, tmp_path / "out", progress=changed_after_the_weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]
