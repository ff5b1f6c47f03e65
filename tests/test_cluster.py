"""Shard tasks on Dask (the ``distributed`` extra): the same bytes as one process, on a local cluster
of worker processes and through ``--scheduler``; a worker killed mid-task; one-line errors. Skipped
where Dask is not installed, except the test that says how to install it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nf4convert.convert import convert


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Six source shards of two 1024 x 1024 float32 weights each (6 tasks)."""
    root = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    weight_map = {}
    for i in range(6):
        name = f"model-{i + 1:05d}-of-00006.safetensors"
        tensors = {f"layers.{i}.{p}.weight": torch.randn(1024, 1024) for p in ("up", "down")}
        save_file(tensors, root / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    import json

    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.fixture(scope="module")
def serial(sharded, tmp_path_factory) -> Path:
    return convert(sharded, tmp_path_factory.mktemp("serial") / "out")


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


def test_a_local_cluster_of_two_worker_processes_writes_the_serial_bytes(cluster, sharded, serial, tmp_path):
    out = convert(sharded, tmp_path / "out", scheduler=cluster.scheduler_address)
    assert files(out) == files(serial)


def test_cli_workers_starts_its_own_local_cluster_with_the_same_bytes(sharded, serial, tmp_path, cli):
    pytest.importorskip("distributed")
    rc, _, err = cli("convert", sharded, tmp_path / "out", "--workers", "2", "--quiet")
    assert rc == 0, err
    assert files(tmp_path / "out") == files(serial)


def test_a_worker_killed_inside_a_task_is_replaced_and_the_output_is_unchanged(cluster, sharded, serial, tmp_path):
    """kill -9 of the worker process running a task once that task's shard is half written: Dask runs
    the task again on a live worker; the stray half shard is not part of the output."""
    from distributed import Client

    out = tmp_path / "out"
    partial = out.with_name(out.name + ".nf4convert-partial")
    with Client(cluster) as client:
        client.run(lambda: setattr(__import__("nf4convert.pieces").pieces, "PIECE_BYTES", 4096))  # slow tasks: 1024 pieces a weight
        result: dict[str, object] = {}

        def drive() -> None:
            try:
                result["out"] = convert(sharded, out, scheduler=cluster.scheduler_address)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        driver = threading.Thread(target=drive)
        driver.start()
        deadline = time.monotonic() + 120
        while not (partial.is_dir() and any(partial.glob(".*.tmp"))):  # a task is writing its shard
            assert time.monotonic() < deadline and driver.is_alive(), result
            time.sleep(0.005)
        busy = [address for address, keys in client.processing().items() if keys]
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        driver.join(timeout=300)
    assert "error" not in result, result
    assert files(out) == files(serial)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_task_error_on_a_worker_is_the_same_one_line_error(cluster, tmp_path, cli):
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    save_file({"a.weight": w}, tmp_path / "src.safetensors")
    rc, _, err = cli("convert", tmp_path / "src.safetensors", tmp_path / "out", "--scheduler", cluster.scheduler_address, "--quiet")
    assert rc == 4 and err.strip() == "nf4convert: error: a.weight: contains NaN or Inf (first in elements 192..255)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


@pytest.mark.parametrize(
    "args, match",
    [
        (("--workers", "2", "--scheduler", "tcp://127.0.0.1:1"), "give one of them"),
        (("--scheduler", "tcp://127.0.0.1:1"), "tcp://127.0.0.1:1: cannot reach the Dask scheduler"),
    ],
)
def test_bad_cluster_options_are_one_line_errors(sharded, tmp_path, args, match):
    pytest.importorskip("distributed")
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    p = subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(sharded), str(tmp_path / "out"), *args, "-q"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 10 and p.stderr.count("\n") == 1 and match in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


def test_without_dask_the_cluster_options_say_how_to_install_it(sharded, tmp_path):
    code = f"""
import sys
sys.modules["distributed"] = None
from nf4convert.cli import main
main(["convert", r"{sharded}", r"{tmp_path / 'out'}", "--workers", "2", "-q"])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip() == "nf4convert: error: --workers and --scheduler need Dask: pip install 'nf4convert[distributed]'"
    assert not list(tmp_path.iterdir())

