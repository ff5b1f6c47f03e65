"""--allow-pickle: pickled *.bin weights only through torch.load(weights_only=True), staged as safetensors."""

from __future__ import annotations

import json
import os
import shutil

import torch

from .test_convert import load_all
from .test_hub import cache_repo


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_copy(llama_dir, folder):
    """The same checkpoint with its weights as one pickled pytorch_model.bin (tied-storage safe)."""
    folder.mkdir()
    torch.save(load_all(llama_dir), folder / "pytorch_model.bin")
    for name in ("config.json", "generation_config.json"):
        shutil.copy(llama_dir / name, folder / name)
    return folder


def test_pickled_weights_are_refused_without_the_flag(llama_dir, tmp_path, cli):
    src = pickled_copy(llama_dir, tmp_path / "src")
    code, _, err = cli("convert", src, tmp_path / "out", "--quiet")
    assert code == 2 and "*.bin only with --allow-pickle" in err


def test_allow_pickle_converts_to_the_same_bytes_and_cleans_its_staging(llama_dir, tmp_path, cli):
    src = pickled_copy(llama_dir, tmp_path / "src")
    code, _, err = cli("convert", src, tmp_path / "out", "--quiet", "--allow-pickle")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    code, _, _ = cli("convert", llama_dir, tmp_path / "ref", "--quiet")
    a, b = load_all(tmp_path / "out"), load_all(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "out" / "nf4convert.json").read_text())
    assert [f["name"] for f in manifest["source"]["pickled_files"]] == ["pytorch_model.bin"]


def test_a_hostile_pickle_is_refused_and_never_executed(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"a.weight": Exploit(marker)}, src / "pytorch_model.bin")
    code, _, err = cli("convert", src, tmp_path / "out", "--quiet", "--allow-pickle")
    assert code == 2 and "not a weights-only PyTorch checkpoint" in err and "nothing was executed" in err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_pickle_only_hub_repo_converts_with_the_flag(llama_dir, tmp_path, cli):
    src = pickled_copy(llama_dir, tmp_path / "src")
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "org/old-llama", {p.name: p.read_bytes() for p in src.iterdir()})
    code, _, err = cli("convert", "org/old-llama", tmp_path / "out", "--cache-dir", cache, "--quiet")
    assert code == 2 and "only read with --allow-pickle" in err
    code, _, err = cli("convert", "org/old-llama", tmp_path / "out", "--cache-dir", cache, "--quiet", "--allow-pickle")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "nf4convert.json").read_text())
    assert manifest["source"]["repo_id"] == "org/old-llama"


def test_a_pickled_file_converts_with_the_flag_and_verify_reads_it_too(llama_dir, tmp_path, cli):
    """The file form (the folder's side files come along), and the summary's verify step, which runs."""
    src = pickled_copy(llama_dir, tmp_path / "src")
    code, _, err = cli("convert", src / "pytorch_model.bin", tmp_path / "out", "--quiet")
    assert code == 2 and "pickled *.bin weights are read only with --allow-pickle" in err
    code, out, err = cli("convert", src / "pytorch_model.bin", tmp_path / "out", "--allow-pickle")
    assert code == 0, err
    step = f"nf4convert verify {tmp_path / 'out'} --source {src / 'pytorch_model.bin'} --allow-pickle"
    assert step in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    code, _, _ = cli("convert", llama_dir, tmp_path / "ref", "--quiet")
    a, b = load_all(tmp_path / "out"), load_all(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, out, err = cli(*step.split()[1:])
    assert code == 0 and out.startswith(f"OK {tmp_path / 'out'}"), err
    code, _, err = cli("verify", tmp_path / "out", "--source", src)
    assert code == 2 and "*.bin only with --allow-pickle" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref", "src"]
