"""``--stream``: a Hub repo converted one source shard at a time through a scratch folder, against a
Hub served on 127.0.0.1 (tests/hubserver.py): the bytes of a conversion from the cache, peak scratch
disk, resume after kill -9, headers read with range requests, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nf4convert.convert import convert
from nf4convert.errors import HubError, SourceError
from nf4convert.resolve import resolve_source

from .hubserver import COMMIT, folder_bytes, serve
from .test_cluster import files
from .test_hub import cache_repo

REPO = "org/tiny-llama"


@pytest.fixture
def repo(llama_dir, tmp_path):
    """The tiny Llama (10 source shards) with a model card, as a Hub repo folder."""
    root = tmp_path / "repo"
    root.mkdir()
    for p in llama_dir.iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama\n")
    return root


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub in this process may reach the network (the suite runs with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def use(endpoint: str) -> None:  # what HF_ENDPOINT sets when huggingface_hub is imported
        monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")

    return use


def test_stream_writes_the_bytes_of_a_conversion_from_the_cache_with_two_source_shards_on_disk_at_most(repo, tmp_path, online):
    scratch = tmp_path / "out.nf4convert-scratch"
    cache = tmp_path / "cache"
    cache_repo(cache, REPO, {p.name: p.read_bytes() for p in repo.iterdir()}, COMMIT)
    with serve(REPO, repo, scratch) as (hub, endpoint):
        online(endpoint)
        streamed = convert(resolve_source(REPO, stream_scratch=scratch), tmp_path / "out")
        cached = convert(resolve_source(REPO, cache_dir=cache), tmp_path / "cached")
    assert {k: v for k, v in files(streamed).items() if k != "nf4convert.json"} == {k: v for k, v in files(cached).items() if k != "nf4convert.json"}
    # the manifest too: same provenance, same source hashes (the cached shards' taken from their blob names)
    manifest = json.loads((cached / "nf4convert.json").read_text())
    for record in manifest["source"]["files"]:
        assert record.pop("sha256_from", None) in (None, "huggingface cache blob name")
    assert json.loads((streamed / "nf4convert.json").read_text()) == manifest
    assert json.loads((streamed / "nf4convert.json").read_text())["source"]["revision"] == COMMIT

    shards = {p.name: p.stat().st_size for p in repo.glob("*.safetensors")}
    downloads = [(name, before) for name, before in hub.scratch_at_download]
    assert sorted(name for name, _ in downloads) == sorted(shards)  # each shard fetched once, whole
    small = sum(p.stat().st_size for p in repo.iterdir() if p.suffix != ".safetensors")
    peak = max(before + shards[name] for name, before in downloads)  # scratch when a download starts, plus that shard
    assert peak <= 2 * max(shards.values()) + small + 64 * 1024, (peak, max(shards.values()))  # + huggingface_hub's metadata files
    assert max(before for _, before in downloads) >= min(shards.values())  # the next shard is fetched while one is converted
    ranged = [r for m, name, r in hub.requests if m == "GET" and r is not None]
    assert len(ranged) == 2 * len(shards)  # each header: the length prefix, then the JSON
    assert not scratch.exists() or folder_bytes(scratch) <= small + 64 * 1024  # every shard deleted once converted


def test_a_killed_streamed_conversion_resumes_without_fetching_finished_shards_again(repo, tmp_path):
    """kill -9 once two output shards are journaled; the rerun fetches only the shards not yet done and
    gives the uninterrupted bytes."""
    out = tmp_path / "out"
    code = """
import json, os, signal, sys
from pathlib import Path
from nf4convert.convert import convert
from nf4convert.resolve import resolve_source
out, kill = Path(sys.argv[1]), sys.argv[2] == "kill"
journal = out.with_name(out.name + ".nf4convert-partial") / "nf4convert-progress.json"
def progress(n):
    if kill and journal.exists() and len(json.loads(journal.read_text())["shards"]) >= 2:
        os.kill(os.getpid(), signal.SIGKILL)
convert(resolve_source("org/tiny-llama", stream_scratch=out.with_name(out.name + ".nf4convert-scratch")), out, progress=progress)
"""
    with serve(REPO, repo) as (hub, endpoint):
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}

        def run(target, kill=False):
            return subprocess.run([sys.executable, "-c", code, str(target), "kill" if kill else "-"], capture_output=True, text=True, env=env, timeout=300)

        assert run(tmp_path / "reference").returncode == 0
        hub.requests.clear()
        assert run(out, kill=True).returncode == -9 and not out.exists()
        first = [name for m, name, r in hub.requests if m == "GET" and r is None and name.endswith(".safetensors")]
        hub.requests.clear()
        resumed = run(out)
        assert resumed.returncode == 0, resumed.stderr
        second = [name for m, name, r in hub.requests if m == "GET" and r is None and name.endswith(".safetensors")]
    assert files(out) == files(tmp_path / "reference")
    assert len(set(first)) >= 2 and len(second) <= 10 - 2  # journaled shards are not fetched again


def test_stream_refuses_a_local_source(llama_dir, tmp_path, cli):
    rc, _, err = cli("convert", llama_dir, tmp_path / "out", "--stream", "-q")
    assert rc == 2 and err.strip().endswith("--stream fetches a Hub repo one shard at a time; a local source needs no streaming")
    assert not list(tmp_path.iterdir())


def test_stream_offline_is_one_line(tmp_path, cli):
    rc, _, err = cli("convert", REPO, tmp_path / "out", "--stream", "-q")
    assert rc == HubError.exit_code and err.count("\n") == 1 and "which HF_HUB_OFFLINE=1 forbids" in err, err
    assert not list(tmp_path.iterdir())


def test_a_shard_whose_bytes_differ_from_the_listing_is_refused(repo, tmp_path, online):
    """The Hub lists a shard's sha256; a download that hashes otherwise fails the conversion."""
    scratch = tmp_path / "scratch"
    with serve(REPO, repo, scratch) as (hub, endpoint):
        online(endpoint)
        source = resolve_source(REPO, stream_scratch=scratch)
        name = sorted(p.name for p in repo.glob("*.safetensors"))[-1]
        data = bytearray((repo / name).read_bytes())
        data[-1] ^= 1  # a flipped bit in the last tensor, after the listing was read
        (repo / name).write_bytes(bytes(data))
        with pytest.raises(SourceError, match=f"{name}: the downloaded shard does not match the size and sha256 its repository publishes"):
            convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_with_dask_each_worker_fetches_its_own_shards(repo, tmp_path, online):
    distributed = pytest.importorskip("distributed")
    scratch = tmp_path / "out.nf4convert-scratch"
    with serve(REPO, repo, scratch) as (hub, endpoint):
        online(endpoint)
        serial = convert(resolve_source(REPO, stream_scratch=tmp_path / "serial-scratch"), tmp_path / "serial")
        hub.requests.clear()
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", env=env) as cluster:
            out = convert(resolve_source(REPO, stream_scratch=scratch), tmp_path / "out", scheduler=cluster.scheduler_address)
    assert files(out) == files(serial)
    fetched = sorted(name for m, name, r in hub.requests if m == "GET" and r is None and name.endswith(".safetensors"))
    assert fetched == sorted(p.name for p in repo.glob("*.safetensors"))


def test_a_hub_failure_mid_conversion_keeps_the_finished_shards_and_the_same_command_resumes(repo, tmp_path, online, cli):
    names = sorted(p.name for p in repo.glob("*.safetensors"))
    with serve(REPO, repo) as (hub, endpoint):
        online(endpoint)
        hub.missing.add(names[4])
        rc, _, err = cli("convert", REPO, tmp_path / "out", "--stream", "-q")
        assert rc == HubError.exit_code and err.count("\n") == 1, err
        assert f"{names[4]}: no such file in the repository (4 of 10 shards done, kept in {tmp_path / 'out.nf4convert-partial'}: the same command resumes)" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nf4convert-partial", "repo"]  # nothing that looks complete
        hub.missing.clear()
        hub.requests.clear()
        rc, _, err = cli("convert", REPO, tmp_path / "out", "--stream", "-q")
        assert rc == 0, err
        fetched = sorted(name for m, name, r in hub.requests if m == "GET" and r is None and name.endswith(".safetensors"))
        reference = convert(resolve_source(REPO, stream_scratch=tmp_path / "scratch"), tmp_path / "reference")
    assert fetched == names[4:]
    assert files(tmp_path / "out") == files(reference)
