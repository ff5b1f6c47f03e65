"""Bad input: a one-line error naming the file or tensor, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nf4convert.errors import FormatError, NF4ConvertError, SourceError
from nf4convert.tensorfile import read_header


def model_folder(root: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"a.weight": torch.randn(64, 64), "a.bias": torch.randn(64)}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


def assert_refused(cli, tmp_path: Path, source: Path, *, match: str, code: int | None = None, extra: tuple = ()) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = cli("convert", source, tmp_path / "out", "--quiet", *extra)
    assert rc != 0 and (code is None or rc == code)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nf4convert: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no partial folder


def test_missing_source(cli, tmp_path):
    assert_refused(cli, tmp_path, tmp_path / "nope", match="nope: no such file or folder", code=2)


def test_empty_folder(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(cli, tmp_path, tmp_path / "empty", match="no *.safetensors weights")


def test_pickled_weights_only_are_not_read(cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_refused(cli, tmp_path, tmp_path / "src", match="pytorch_model.bin: other weight formats are not read")
    assert_refused(cli, tmp_path, tmp_path / "src" / "pytorch_model.bin", match="not a .safetensors file")


def test_truncated_shard(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(cli, tmp_path, src, match="model.safetensors: tensor", code=3)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"not json at all", "header is not JSON"),
        (b"[1, 2, 3]", "header is not a JSON object"),
        (b'{"a.weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}', "unknown dtype 'Q9'"),
        (b'{"a.weight": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}', "shape [-4] is not a list of non-negative"),
        (b'{"a.weight": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 16]}}', "do not hold F32"),
        (b'{"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}', "overlaps"),
        (b'{"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}', "duplicate tensor name"),
        (b'{"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}', "past the end of the file"),
    ],
)
def test_corrupt_headers(cli, tmp_path, header, match):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(32))
    assert_refused(cli, tmp_path, src, match=match, code=3)


def test_header_length_larger_than_the_file_or_the_limit(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(FormatError, match="more than the 100000000 allowed"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(FormatError, match="truncated"):
        read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(FormatError, match="too short"):
        read_header(path)


def write_index(src: Path, weight_map: dict[str, str]) -> None:
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_names_a_missing_shard(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    write_index(src, {"a.weight": "model.safetensors", "a.bias": "model-00002-of-00002.safetensors"})
    assert_refused(cli, tmp_path, src, match="shard 'model-00002-of-00002.safetensors' (for 'a.bias') does not exist")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd.safetensors", "sub/../../x.safetensors"])
def test_index_paths_outside_the_source_are_refused(cli, tmp_path, shard):
    src = model_folder(tmp_path / "src")
    save_file({"x": torch.zeros(1)}, tmp_path / "outside.safetensors")
    write_index(src, {"a.weight": "model.safetensors", "a.bias": shard})
    assert_refused(cli, tmp_path, src, match="is not a file inside the source")


@pytest.mark.parametrize("index", [True, False])
def test_a_local_folder_whose_weights_link_into_a_store_elsewhere_converts(cli, tmp_path, index):
    """git-annex, DVC, a shared model store: the user's own links are followed; the names read from
    the index are still checked as names (above)."""
    src = model_folder(tmp_path / "src")
    store = tmp_path / "store"
    store.mkdir()
    save_file({"b.weight": torch.randn(64, 64)}, store / "blob-2")
    os.symlink(store / "blob-2", src / "model-2.safetensors")
    (store / "tokenizer.json").write_text("{}")
    os.symlink(store / "tokenizer.json", src / "tokenizer.json")
    if index:
        write_index(src, {"a.weight": "model.safetensors", "a.bias": "model.safetensors", "b.weight": "model-2.safetensors"})
    rc, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "out" / "nf4convert.json").read_text())
    assert "b.weight" in {t["name"] for t in manifest["tensors"]["quantized"]}
    assert "tokenizer.json" in {f["name"] for f in manifest["files"]}
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_a_hub_snapshot_link_leaving_the_repos_cache_folder_is_refused(cli, tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    model_folder(snapshot)
    save_file({"b.weight": torch.zeros(64, 64)}, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", snapshot / "model-2.safetensors")
    rc, _, err = cli("convert", snapshot, tmp_path / "out", "--quiet")
    assert rc == 2 and err.strip().endswith("model-2.safetensors: leads outside the source folder")
    assert not (tmp_path / "out").exists()


def test_index_that_disagrees_with_the_shards(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    write_index(src, {"a.weight": "model.safetensors"})
    assert_refused(cli, tmp_path, src, match="'a.bias' is not listed for this shard")
    write_index(src, {"a.weight": "model.safetensors", "a.bias": "model.safetensors", "ghost": "model.safetensors"})
    assert_refused(cli, tmp_path, src, match="lists 'ghost'")


def test_duplicate_tensor_names_across_shards(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    save_file({"a.bias": torch.zeros(64)}, src / "model-extra.safetensors")
    assert_refused(cli, tmp_path, src, match="duplicate tensor 'a.bias' in model-extra.safetensors and model.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_leaves_no_partial_output(cli, tmp_path, bad):
    w = torch.randn(128, 64)
    w[100, 3] = bad
    src = model_folder(tmp_path / "src", {"good.weight": torch.randn(64, 64), "bad.weight": w})
    assert_refused(cli, tmp_path, src, match="bad.weight: contains NaN or Inf (first in elements 6400..6463)", code=4)


def test_existing_output_is_refused_without_force_and_replaced_with_it(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    rc, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert rc == 0, err
    assert_refused(cli, tmp_path, src, match="already exists (--force, or force=True in Python, replaces it)", code=5)
    (tmp_path / "out" / "model.safetensors").write_bytes(b"stale")
    rc, _, err = cli("convert", src, tmp_path / "out", "--quiet", "--force")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors", "nf4convert.json"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != b"stale"


@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_force_never_replaces_a_folder_nf4convert_did_not_write(cli, tmp_path, command):
    src = model_folder(tmp_path / "src")
    if command == "dequantize":
        rc, _, err = cli("convert", src, tmp_path / "nf4", "--quiet")
        assert rc == 0, err
        src = tmp_path / "nf4"
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "keep.txt").write_text("mine")
    (mine / "notes" / "a.md").write_text("also mine")
    rc, _, err = cli(command, src, mine, "--quiet", "--force")
    assert rc == 5 and "Traceback" not in err
    assert err.strip() == f"nf4convert: error: {mine}: not a folder nf4convert wrote (2 files: keep.txt, notes/a.md); force replaces only nf4convert's own output, so nothing was deleted: choose another output folder"
    assert (mine / "keep.txt").read_text() == "mine" and (mine / "notes" / "a.md").read_text() == "also mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", "mine"] + (["nf4"] if command == "dequantize" else []))


def test_dequantize_refuses_an_output_before_it_reads_or_shows_progress(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    rc, _, err = cli("convert", src, tmp_path / "nf4", "--quiet")
    assert rc == 0, err
    (tmp_path / "mine.txt").write_text("mine")
    rc, out, err = cli("dequantize", tmp_path / "nf4", tmp_path / "mine.txt")
    assert rc == 5 and out == "" and err == f"nf4convert: error: {tmp_path / 'mine.txt'}: exists and is not a folder\n"
    assert (tmp_path / "mine.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "nf4", "src"]


def test_force_replaces_an_empty_folder_and_dequantize_output(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    (tmp_path / "empty").mkdir()
    rc, _, err = cli("convert", src, tmp_path / "empty", "--quiet", "--force")
    assert rc == 0, err
    for _ in range(2):  # the second run replaces the first's output
        rc, _, err = cli("dequantize", tmp_path / "empty", tmp_path / "plain", "--quiet", "--force")
        assert rc == 0, err
    assert (tmp_path / "plain" / ".nf4convert-output").is_file()


def written_by(command: str, cli, tmp_path: Path) -> tuple[Path, Path]:
    """``command``'s input (a model folder, or for dequantize its conversion) and its output ``out``, written once."""
    src = model_folder(tmp_path / "src")
    if command == "dequantize":
        assert cli("convert", src, tmp_path / "nf4", "--quiet")[0] == 0
        src = tmp_path / "nf4"
    out = tmp_path / "out"
    assert cli(command, src, out, "--quiet")[0] == 0
    return src, out


@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_force_replaces_only_what_nf4convert_wrote_and_keeps_the_users_files(cli, tmp_path, command):
    """A README.md kept beside the weights (push merges it into the card), results of an evaluation:
    --force replaces the files the manifest (or dequantize's mark) lists, and nothing else."""
    src, out = written_by(command, cli, tmp_path)
    ours = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    (out / "README.md").write_text("# my notes")
    (out / "eval").mkdir()
    (out / "eval" / "results.csv").write_text("ppl,7.1")
    rc, _, err = cli(command, src, out, "--quiet", "--force")
    assert rc == 0, err
    assert (out / "README.md").read_text() == "# my notes" and (out / "eval" / "results.csv").read_text() == "ppl,7.1"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(ours + ["README.md", "eval/results.csv"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", "out"] + (["nf4"] if command == "dequantize" else []))


@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_force_refuses_before_the_work_where_a_users_file_has_the_name_of_an_output_file(cli, tmp_path, command):
    src, out = written_by(command, cli, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "model.safetensors.index.json").write_text("mine")  # the output writes it only when sharded
    big = ["--max-shard-size", "1KB"]
    (out / "model-00001-of-00002.safetensors").write_text("mine")
    rc, stdout, err = cli(command, src, out, "--force", *big)
    assert rc == 5 and stdout == ""
    assert err.strip() == (
        f"nf4convert: error: {out}: holds model-00001-of-00002.safetensors, model.safetensors.index.json, not written by nf4convert, "
        "where the new output writes its own: nothing was deleted; move them out of the folder, then run again"
    )
    assert all(p.read_bytes() == data for p, data in before.items())
    assert (out / "model-00001-of-00002.safetensors").read_text() == "mine"


def test_output_inside_the_source_is_refused(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    rc, _, err = cli("convert", src, src / "nf4", "--quiet")
    assert rc == 5 and "must not lie inside the source folder" in err
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_already_quantized_source_is_refused(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert_refused(cli, tmp_path, src, match="already quantized (bitsandbytes)")


def test_bad_config_json(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    (src / "config.json").write_text("{not json")
    assert_refused(cli, tmp_path, src, match="config.json: not valid JSON")


def test_nothing_to_quantize(cli, tmp_path):
    src = model_folder(tmp_path / "src", {"norm.weight": torch.ones(64)})
    assert_refused(cli, tmp_path, src, match="no tensor to quantize", code=4)


def test_fp8_weights_without_a_config_are_refused_saying_why(cli, tmp_path):
    """A ComfyUI-style FP8 file (no config.json; plain or with per-tensor scale_weight) says how its FP8
    weights decode nowhere this reader knows: refused, saying so, rather than read one way or another."""
    src = tmp_path / "flux1-dev-fp8.safetensors"
    save_file({"img_in.weight": torch.randn(128, 64).to(torch.float8_e4m3fn), "img_in.scale_weight": torch.tensor([0.5]),
               "txt_in.weight": torch.randn(128, 64).to(torch.float8_e4m3fn)}, src)  # fmt: skip
    code, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert code == 4 and err.strip() == (
        f"nf4convert: error: {src.name}: no tensor to quantize (its 2 2-D weights are FP8 and no quantization_config says how they decode: "
        "an FP8 source is read with its config.json (spec 6.3))"
    )
    assert not (tmp_path / "out").exists()


def test_every_error_is_a_nf4convert_error_and_a_builtin():
    assert issubclass(SourceError, ValueError) and issubclass(SourceError, NF4ConvertError)
    from nf4convert.errors import OutputError, SourceNotFoundError

    assert issubclass(SourceNotFoundError, FileNotFoundError) and issubclass(OutputError, OSError)


def test_debug_flag_shows_the_traceback(tmp_path):
    from nf4convert.cli import main
    from nf4convert.errors import SourceNotFoundError

    with pytest.raises(SourceNotFoundError):
        main(["--debug", "convert", str(tmp_path / "nope"), str(tmp_path / "out")])


def test_console_script_exits_non_zero_with_one_line(tmp_path):
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "nf4convert", "convert", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == f"nf4convert: error: {tmp_path / 'nope'}: no such file or folder"


@pytest.mark.parametrize(
    "device, match",
    [
        ("foo", "--device 'foo': not a device"),
        ("mps", "--device mps: nf4convert runs on the CPU or a CUDA GPU, not mps"),
        ("cuda", "--device cuda: no CUDA GPU here"),
        ("cuda:7", "--device cuda:7: "),
    ],
)
def test_a_device_this_machine_lacks_is_refused_before_any_work(cli, tmp_path, device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    src = model_folder(tmp_path / "src")
    assert_refused(cli, tmp_path, src, match=match, code=2, extra=("--device", device))


def test_importance_refuses_a_missing_device_first(cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = cli("importance", tmp_path / "nowhere", tmp_path / "imp.safetensors", "--text", tmp_path / "none.txt", "--device", "cuda")
    assert rc == 2 and err.strip() == "nf4convert: error: --device cuda: no CUDA GPU here (torch " + torch.__version__ + " sees none)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["exists", "inside"])
def test_a_dry_run_makes_the_real_runs_output_checks(cli, tmp_path, where):
    src = model_folder(tmp_path / "src")
    out = src / "nf4" if where == "inside" else tmp_path / "out"
    if where == "exists":
        out.mkdir()
    rc, stdout, err = cli("convert", src, out, "--dry-run")
    assert rc == 5 and "Nothing written" not in stdout
    assert ("already exists" if where == "exists" else "must not lie inside the source folder") in err


def test_a_numbered_shard_missing_without_an_index_is_refused(cli, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in (1, 3):
        save_file({f"l{i}.weight": torch.randn(64, 64)}, src / f"model-{i:05d}-of-00003.safetensors")
    assert_refused(cli, tmp_path, src, match="shard 2 of 3 is missing (model-00002-of-00003.safetensors; 1 missing in all, and no model.safetensors.index.json)", code=2)


@pytest.mark.parametrize(
    "pattern, hint",
    [
        ("pooler", "modules like it: pooler.dense"),
        ("*.mlp.gate", "modules like it: l0.mlp.gate_proj"),
        ("mlp", "e.g. '*mlp*'"),
    ],
)
def test_a_skip_pattern_that_matches_no_module_is_refused_with_close_ones(cli, tmp_path, pattern, hint):
    tensors = {"l0.mlp.gate_proj.weight": torch.randn(64, 64), "pooler.dense.weight": torch.randn(64, 64)}
    src = model_folder(tmp_path / "src", tensors)
    assert_refused(cli, tmp_path, src, match=f"--skip {pattern!r} matches no module", code=2, extra=("--skip", pattern))
    rc, _, err = cli("convert", src, tmp_path / "out", "--skip", pattern, "--dry-run")
    assert rc == 2 and hint in err


def test_a_skip_glob_that_matches_is_taken(cli, tmp_path):
    src = model_folder(tmp_path / "src", {"l0.mlp.gate_proj.weight": torch.randn(64, 64), "pooler.dense.weight": torch.randn(64, 64)})
    rc, out, err = cli("convert", src, "--dry-run", "--skip", "*pooler*")
    assert rc == 0, err


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(cli, tmp_path):
    from nf4convert.write import OutputFolder

    src = model_folder(tmp_path / "src")
    with OutputFolder(tmp_path / "out", source=src):  # a run in progress (this process)
        rc, _, err = cli("convert", src, tmp_path / "out", "--quiet")
        assert rc == 5 and err.strip() == f"nf4convert: error: {tmp_path / 'out'}: another nf4convert run (pid {os.getpid()}) is writing it; wait for it to finish"
        assert (tmp_path / "out.nf4convert-partial").is_dir()  # the first run's work is left alone
    assert not (tmp_path / "out.nf4convert-lock").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    (tmp_path / "out.nf4convert-lock").write_text("999999")  # left by a kill -9: no process holds it
    rc, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def mount_tmpfs(where: Path, options: str) -> bool:
    import subprocess

    where.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB file system (tmpfs; needs root, skipped elsewhere)."""
    import subprocess

    if not mount_tmpfs(tmp_path / "small", "size=1M"):
        pytest.skip("cannot mount a tmpfs here")
    yield tmp_path / "small"
    subprocess.run(["umount", str(tmp_path / "small")], check=True)


def test_too_little_free_space_is_refused_before_writing(cli, tmp_path, small_disk):
    src = model_folder(tmp_path / "src", {"a.weight": torch.randn(2048, 1024)})  # 1.1 MB of NF4
    rc, _, err = cli("convert", src, small_disk / "out", "--quiet")
    assert rc == 5 and err.count("\n") == 1
    assert f"nf4convert: error: {small_disk}: the output needs 2.1 MB more, 1.0 MB free there" == err.strip()
    assert list(small_disk.iterdir()) == []


def test_verify_save_on_a_read_only_folder_is_an_output_error(cli, tmp_path):
    import shutil
    import subprocess

    src = model_folder(tmp_path / "src")
    rc, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert rc == 0, err
    ro = tmp_path / "ro"
    if not mount_tmpfs(ro, "size=4M"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copytree(tmp_path / "out", ro / "out")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        rc, _, err = cli("verify", ro / "out", "--save")
        assert rc == 5 and err.strip() == f"nf4convert: error: {ro / 'out' / 'nf4convert-verify.json'}: cannot write the report (Read-only file system)"
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_force_onto_a_mount_point_is_an_output_error_and_keeps_it(cli, tmp_path):
    import subprocess

    src = model_folder(tmp_path / "src")
    out = tmp_path / "out"
    if not mount_tmpfs(out, "size=4M"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        rc, _, err = cli("convert", src, out, "--quiet", "--force")  # empty: --force may replace it
        assert rc == 5 and "cannot put the output in place (Device or resource busy; a mount point cannot be replaced" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"] and list(out.iterdir()) == []
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_inspect_of_a_folder_that_is_not_ours_says_so_and_what_to_run(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    rc, _, err = cli("inspect", src)
    assert rc == 3 and err.strip() == (
        f"nf4convert: error: {src}: not an nf4convert output (no nf4convert.json) nor a bitsandbytes 4-bit folder "
        f"(no such quantization_config in config.json); 'nf4convert convert {src} --dry-run' shows what converting it would do"
    )
    rc, _, err = cli("inspect", src / "model.safetensors")
    assert rc == 3 and err.strip() == (
        f"nf4convert: error: {src / 'model.safetensors'}: not an NF4 checkpoint (neither a folder nor a .safetensors file of bitsandbytes 4-bit weights); "
        f"'nf4convert convert {src / 'model.safetensors'} --dry-run' shows what converting it would do"
    )


def test_quiet_and_verbose_together_are_refused(cli, tmp_path):
    rc, _, err = cli("convert", model_folder(tmp_path / "src"), tmp_path / "out", "--quiet", "--verbose")
    assert rc == 2 and "--quiet and --verbose contradict each other" in err and not (tmp_path / "out").exists()


def test_debug_works_after_the_subcommand_too(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(tmp_path / "nope"), str(tmp_path / "out"), "--debug"], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr and "SourceNotFoundError" in p.stderr


def test_the_summary_says_sizes_time_and_next_steps(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    rc, out, err = cli("convert", src, tmp_path / "out")
    assert rc == 0, err
    first, second = out.strip().splitlines()
    assert first.startswith(f"Wrote {tmp_path / 'out'}: ") and "x smaller" in first and " s" in first
    assert second.startswith(f"Next: nf4convert verify {tmp_path / 'out'} --source {src}")


@pytest.mark.parametrize("source, expected", [
    ("src", "src-nf4"), ("src/", "src-nf4"), ("src/model.safetensors", "src-nf4"), ("loose/w.safetensors", "loose/w-nf4"), ("org/name", "name-nf4"),
])  # fmt: skip
def test_output_defaults_to_name_nf4_beside_the_model_never_inside_its_folder(source, expected, tmp_path, monkeypatch):
    from nf4convert.cli import default_output

    monkeypatch.chdir(tmp_path)
    model_folder(tmp_path / "src")
    (tmp_path / "loose").mkdir()
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "loose" / "w.safetensors")
    assert default_output(source) == expected


@pytest.mark.parametrize("args", [[], ["--dry-run"]])
def test_convert_dot_from_inside_the_model_folder_writes_beside_it(cli, tmp_path, monkeypatch, args):
    src = model_folder(tmp_path / "model")
    monkeypatch.chdir(src)
    rc, out, err = cli("convert", ".", "--quiet", *args)
    assert rc == 0 and err == "", err
    assert (tmp_path / "model-nf4" / "nf4convert.json").is_file() == (args == [])
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_an_empty_source_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli("convert", "")
    assert rc == 2 and out == "" and err == "nf4convert: error: SOURCE is empty: give a folder, a .safetensors file or a Hub repo id (see: nf4convert convert --help)\n"
    assert list(tmp_path.iterdir()) == []


def test_a_single_files_output_is_never_a_side_file_of_its_folders_next_conversion(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    assert cli("convert", src / "model.safetensors", "--quiet")[0] == 0
    assert (tmp_path / "src-nf4").is_dir() and sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]
    assert cli("convert", src / "model.safetensors", src / "file-nf4", "--quiet")[0] == 0  # an output put inside it on purpose
    rc, _, err = cli("convert", src, tmp_path / "folder-nf4", "--quiet")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "folder-nf4" / "nf4convert.json").read_text())
    assert sorted(f["name"] for f in manifest["files"]) == ["config.json", "model.safetensors"]


def test_convert_without_output_writes_name_nf4_beside_the_source(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    rc, out, err = cli("convert", src, "--quiet")
    assert rc == 0, err
    assert (tmp_path / "src-nf4" / "nf4convert.json").is_file()


def test_the_first_conversion_of_a_model_says_it_asks_transformers(cli, tmp_path, monkeypatch, llama_dir):
    monkeypatch.setenv("NF4CONVERT_CACHE", str(tmp_path / "cache"))
    src = llama_dir  # a Llama with its head quantized is asked (the name rules' skip list may differ there)
    rc, _, err = cli("convert", src, tmp_path / "a", "--quantize-lm-head")
    assert rc == 0 and "nf4convert: asking transformers which modules it quantizes" in err
    rc, _, err = cli("convert", src, tmp_path / "b", "--quantize-lm-head")
    assert rc == 0 and "asking transformers" not in err  # cached


@pytest.mark.parametrize("args, message", [
    (["--bits", "abc"], "Invalid value for '--bits': 'abc' is not a valid float."),
    (["--bits", "2"], "--bits 2: a budget is 4.127 (every weight in NF4) to 16 bits per parameter"),
    (["--max-shard-size", "abc"], "Invalid value for '--max-shard-size': 'abc' is not a size like 5GB, 500MB or 2GiB"),
    (["--max-shard-size", "0"], "Invalid value for '--max-shard-size': '0' is not a size like 5GB, 500MB or 2GiB"),
    (["--blocksize", "48"], "Invalid value for '--blocksize': '48' is not one of"),
])  # fmt: skip
def test_a_bad_option_value_is_one_line_naming_the_option_exit_2(cli, tmp_path, args, message):
    src = model_folder(tmp_path / "src")
    rc, out, err = cli("convert", src, tmp_path / "out", *args)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"nf4convert: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_dequantize_max_shard_size_is_checked_as_convert_checks_it(cli, tmp_path):
    src = model_folder(tmp_path / "src")
    assert cli("convert", src, tmp_path / "nf4", "--quiet")[0] == 0
    rc, out, err = cli("dequantize", tmp_path / "nf4", tmp_path / "plain", "--max-shard-size", "big")
    assert rc == 2 and out == "" and err.startswith("nf4convert: error: Invalid value for '--max-shard-size': 'big'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["convert", "dequantize"])
def test_an_output_whose_parent_folder_is_missing_is_named(cli, tmp_path, command):
    src = model_folder(tmp_path / "src")
    if command == "dequantize":
        assert cli("convert", src, tmp_path / "nf4", "--quiet")[0] == 0
        src = tmp_path / "nf4"
    rc, out, err = cli(command, src, tmp_path / "typo" / "out")
    assert rc == 5 and out == "" and err == f"nf4convert: error: {tmp_path / 'typo'}: no such folder (the output's parent folder must exist)\n"
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", [[], ["convert"], ["inspect"], ["verify"], ["dequantize"], ["push"], ["importance"]])
def test_help_lists_the_exit_codes(cli, command):
    rc, out, _ = cli(*command, "--help")
    assert rc == 0 and "Exit codes: 0 done; 1 other error; 2 bad option or source" in " ".join(out.split())
    assert "5 output; 6 missing optional dependency; 7 load; 8 verification failed; 9 Hub; 10 cluster" in " ".join(out.split())
