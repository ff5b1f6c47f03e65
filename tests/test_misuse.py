"""Random CLI misuse: any subcommand, any order of existing, missing and wrong paths and options.
Whatever happens, no traceback and every file that existed before is byte-identical after (only
nf4convert's own output may be replaced, with --force)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

PATHS = ["src", "src/model.safetensors", "src/inside", "mine", "mine/keep.txt", "nf4", "missing", "org/name", "new-out", "new-out"]
OPTIONS = [["--force"], ["--dry-run"], ["--quiet"], ["--verbose"], ["--device", "foo"], ["--skip", "nomatch"], ["--blocksize", "48"], ["--json"], ["--source", "src"], ["--source", "mine"], []]
COMMANDS = ["convert", "inspect", "verify", "dequantize", "push", "importance"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    root = tmp_path_factory.mktemp("misuse")
    (root / "src").mkdir()
    save_file({"a.weight": torch.randn(64, 64), "a.bias": torch.randn(64)}, root / "src" / "model.safetensors")
    (root / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "mine" / "notes").mkdir(parents=True)
    (root / "mine" / "keep.txt").write_text("mine")
    (root / "mine" / "notes" / "a.md").write_text("also mine")
    from nf4convert.convert import convert

    convert(root / "src", root / "nf4")
    return root


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(COMMANDS),
    paths=st.lists(st.sampled_from(PATHS), max_size=3),
    options=st.lists(st.sampled_from(OPTIONS), max_size=3),
)
def test_no_misuse_shows_a_traceback_or_loses_a_file(sandbox, cli, monkeypatch, command, paths, options):
    monkeypatch.chdir(sandbox)
    before = snapshot(sandbox)
    argv = [command, *paths, *[a for o in options for a in o]]
    try:
        code, out, err = cli(*argv)
    except Exception as e:  # noqa: BLE001 - the point: nothing but SystemExit may leave main
        pytest.fail(f"{argv}: {type(e).__name__}: {e}")
    assert "Traceback" not in out + err, argv
    after = snapshot(sandbox)
    # new-out is the commands' own; nf4 is nf4convert's output, which --force may replace
    changed = [name for name, data in before.items() if after.get(name) != data and not name.startswith(("new-out", "nf4/"))]
    assert changed == [], (argv, changed)
    if code != 0 and err.strip():
        assert len([line for line in err.strip().splitlines() if line.startswith("nf4convert: error")]) <= 1, (argv, err)
    for made in sandbox.iterdir():  # what the command created is removed for the next example
        if made.name.startswith("new-out") or made.name.startswith("org"):
            shutil.rmtree(made) if made.is_dir() else made.unlink()
