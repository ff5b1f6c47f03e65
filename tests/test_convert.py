"""Streaming conversion of real (tiny, random) transformers checkpoints, checked against transformers + bitsandbytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nf4convert.constants import INDEX_NAME, MANIFEST_NAME
from nf4convert.convert import convert
from nf4convert.plan import Options
from nf4convert.read import open_checkpoint
from nf4convert.files import sha256_file
from nf4convert.load import float_numerics

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def on_the_fly(src: Path, *, double_quant: bool, auto_cls=None):
    """The model transformers + bitsandbytes quantize while loading (the peer's way)."""
    cls = auto_cls or transformers.AutoModelForCausalLM
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32
    )
    return cls.from_pretrained(src, quantization_config=config, device_map="cpu")


@pytest.fixture(scope="module")
def llama_reference(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """transformers' own save_pretrained of the model bitsandbytes quantized on the fly (no double quant), before any forward."""
    ref = tmp_path_factory.mktemp("ref") / "bnb"
    on_the_fly(llama_dir, double_quant=False).save_pretrained(ref)
    return ref


def test_without_double_quant_every_tensor_is_byte_identical_to_transformers_save(llama_dir, llama_reference, tmp_path):
    out = convert(llama_dir, tmp_path / "out", options=Options(double_quant=False, max_shard_size=60_000))
    ours, theirs = load_all(out), load_all(llama_reference)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def test_with_double_quant_the_4bit_codes_are_identical_and_absmax_within_one_step(llama_dir, tmp_path):
    ref = tmp_path / "bnb"
    on_the_fly(llama_dir, double_quant=True).save_pretrained(ref)
    out = convert(llama_dir, tmp_path / "out")
    ours, theirs = load_all(out), load_all(ref)
    assert set(ours) == set(theirs)
    weights = [k for k in theirs if k.endswith(".weight") and f"{k}.absmax" in theirs]
    assert weights
    for key in weights:
        assert torch.equal(ours[key], theirs[key]), key
        assert (ours[f"{key}.absmax"].int() - theirs[f"{key}.absmax"].int()).abs().max() <= 1, key


def test_output_is_sharded_with_an_index_and_metadata(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "out", options=Options(max_shard_size=60_000))
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt", "nf4convert.format": "nf4convert", "nf4convert.version": "1"}
    # every companion of a quantized weight sits in the same shard as the weight
    for key, shard in index["weight_map"].items():
        base = key.split(".weight.")[0] + ".weight" if ".weight." in key else key
        assert index["weight_map"][base] == shard


def test_each_output_shard_holds_tensors_of_one_source_shard(llama_dir, tmp_path):
    """Spec section 7: shards are cut at source shard boundaries too, so each output shard is one task
    reading one source shard (with --stream, one download)."""
    source_of = json.loads((llama_dir / INDEX_NAME).read_text())["weight_map"]
    out = convert(llama_dir, tmp_path / "out")
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    sources = {}
    for key, shard in index.items():
        base = key.split(".weight.")[0] + ".weight" if ".weight." in key else key
        sources.setdefault(shard, set()).add(source_of[base])
    assert all(len(s) == 1 for s in sources.values())
    assert len(sources) == len(set(source_of.values()))


def test_transformers_loads_the_output_and_its_logits_match_the_on_the_fly_model(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "out", options=Options(compute_dtype="float32"))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    ours = float_numerics(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
    peer = float_numerics(on_the_fly(llama_dir, double_quant=True))
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        a, b = ours(ids).logits, peer(ids).logits
    # same 4-bit codes; the absmax differ only by bitsandbytes' machine-dependent double-quant rounding
    assert torch.allclose(a, b, atol=2e-2, rtol=0)


def test_transformers_logits_are_exactly_equal_without_double_quant(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "out", options=Options(double_quant=False, compute_dtype="float32"))
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    ours = float_numerics(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
    peer = float_numerics(on_the_fly(llama_dir, double_quant=False))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, peer(ids).logits)


def test_gpt2_conv1d_weights_are_quantized_transposed_like_transformers(gpt2_dir, tmp_path):
    ref = tmp_path / "bnb"
    on_the_fly(gpt2_dir, double_quant=False).save_pretrained(ref)
    out = convert(gpt2_dir, tmp_path / "out", options=Options(double_quant=False))
    ours, theirs = load_all(out), load_all(ref)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert all(t["transposed"] for t in manifest["tensors"]["quantized"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_bert_encoder_matches_transformers(bert_dir, tmp_path):
    ref = tmp_path / "bnb"
    on_the_fly(bert_dir, double_quant=False, auto_cls=transformers.AutoModel).save_pretrained(ref)
    out = convert(bert_dir, tmp_path / "out", options=Options(double_quant=False))
    ours, theirs = load_all(out), load_all(ref)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_manifest_records_options_source_hashes_outputs_and_decisions(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "out", options=Options(skip=("*.mlp.down_proj",)))
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format"] == "nf4convert" and m["format_version"] == 1
    assert m["options"]["blocksize"] == 64 and m["options"]["double_quant"] is True
    assert m["options"]["compute_dtype"] == "bfloat16"
    for record in m["source"]["files"]:
        assert sha256_file(llama_dir / record["name"]) == record["sha256"]
    names = {r["name"] for r in m["files"]}
    shards = set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values())
    assert {"config.json", "generation_config.json", INDEX_NAME} | shards == names
    for record in m["files"]:
        assert (out / record["name"]).stat().st_size == record["size"]
        assert sha256_file(out / record["name"]) == record["sha256"]
    kept = {t["name"]: t["reason"] for t in m["tensors"]["kept"]}
    assert kept["model.layers.0.mlp.down_proj.weight"] == "--skip *.mlp.down_proj"
    assert kept["lm_head.weight"].startswith("output head")
    assert kept["model.embed_tokens.weight"] == "embedding"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_quantize_lm_head_quantizes_it_and_transformers_still_loads(llama_dir, tmp_path):
    out = convert(llama_dir, tmp_path / "out", options=Options(quantize_lm_head=True))
    ckpt = open_checkpoint(out)
    assert "lm_head.weight" in ckpt.quant_states
    model = float_numerics(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu"))
    assert type(model.lm_head).__name__ == "Linear4bit"
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_output_is_deterministic(llama_dir, tmp_path):
    a = convert(llama_dir, tmp_path / "a", kernel="native")
    b = convert(llama_dir, tmp_path / "b", kernel="eager")  # its source hashes remembered from the first: the same manifest
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_a_source_hash_is_remembered_only_while_the_file_is_provably_unchanged(tmp_path, monkeypatch):
    """A shard hashed once is not read again for its hash while its device, inode, size, modification
    and status-change times stay; rewritten with its size and modification time restored, it is read
    again (its status-change time moved) and the manifest has the new hash; NF4CONVERT_HASH_CACHE=0
    turns the cache off; a file written this instant is not remembered (it may still change unseen)."""
    import os
    import time

    from safetensors.torch import save_file

    from nf4convert import files

    monkeypatch.setenv("NF4CONVERT_CACHE", str(tmp_path / "cache"))
    src, shard = tmp_path / "src", tmp_path / "src" / "model.safetensors"
    src.mkdir()
    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(64, 128, dtype=torch.bfloat16)}, shard)
    with monkeypatch.context() as racy:  # however slow the machine, the file counts as just written
        racy.setattr(files, "_RACY_NS", 3600 * 10**9)
        convert(src, tmp_path / "0")
    assert files.remembered_sha256(shard) is None  # written too recently to be sure of its timestamp
    time.sleep(1.1)
    first = json.loads((convert(src, tmp_path / "1") / MANIFEST_NAME).read_text())["source"]["files"][0]
    assert files.remembered_sha256(shard) == first["sha256"] == sha256_file(shard)
    second = (convert(src, tmp_path / "2") / MANIFEST_NAME).read_bytes()
    assert second == (tmp_path / "1" / MANIFEST_NAME).read_bytes()

    data, st = bytearray(shard.read_bytes()), shard.stat()
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and shard.stat().st_mtime_ns == st.st_mtime_ns
    assert files.remembered_sha256(shard) is None
    third = json.loads((convert(src, tmp_path / "3") / MANIFEST_NAME).read_text())["source"]["files"][0]
    assert third["sha256"] == sha256_file(shard) != first["sha256"]

    time.sleep(1.1)
    monkeypatch.setenv("NF4CONVERT_HASH_CACHE", "0")
    convert(src, tmp_path / "4")
    assert files.remembered_sha256(shard) is None
    monkeypatch.delenv("NF4CONVERT_HASH_CACHE")
    assert files.remembered_sha256(shard) is None  # the rewrite was never remembered


def test_dry_run_writes_nothing_and_shows_the_plan(llama_dir, tmp_path, cli):
    code, out, err = cli("convert", llama_dir, tmp_path / "out", "--dry-run")
    assert code == 0
    assert "quantize    14 tensors" in out and "output head" in out and "bits/parameter" in out
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_cli_convert_then_inspect(llama_dir, tmp_path, cli):
    code, out, err = cli("convert", llama_dir, tmp_path / "out", "--quiet", "--blocksize", "128", "--no-double-quant")
    assert (code, out) == (0, "")
    code, out, _ = cli("inspect", tmp_path / "out", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["format_version"] == 1 and summary["options"]["blocksize"] == 128
    assert summary["quantized"]["tensors"] == 14 and summary["kept"]["tensors"] == 7
    assert summary["quantized_bits_per_parameter"] == pytest.approx(4 + 32 / 128, abs=0.1)  # + per-tensor quant_map and blob
    assert summary["decided_by"] == "name rules (LlamaForCausalLM: decided as transformers does)"
    code, out, _ = cli("inspect", tmp_path / "out")
    assert code == 0 and "out: nf4convert output, format v1 (written by nf4convert" in out
    assert "  decided by name rules (LlamaForCausalLM: decided as transformers does)" in out and "  loads in:  transformers from_pretrained (bitsandbytes); nf4convert.load_model" in out


def test_the_default_conversion_never_imports_torch_and_keeps_openmp_from_spinning(llama_dir, tmp_path):
    """What the warm conversion's speed rests on (docs/performance.md): the default conversion (the
    native kernel, absmax or searched scales) reads, quantizes and writes numpy arrays and never imports torch
    (about a second of start-up); the source hasher starts before planning; where torch is loaded
    (other options), its OpenMP threads sleep after their parallel regions instead of spinning
    against the kernel's threads. The output is the one torch's path writes."""
    import os
    import subprocess
    import sys

    code = """
import os, sys
import nf4convert.resolve as resolve
began = resolve.source_hasher
def spy(src):
    print("torch" in sys.modules, os.environ.get("OMP_WAIT_POLICY"))
    return began(src)
resolve.source_hasher = spy
from nf4convert.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
print("torch" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for name, extra in (("out", []), ("search", ["--scales", "search"])):
        p = subprocess.run([sys.executable, "-c", code, "convert", str(llama_dir), str(tmp_path / name), "-q", *extra], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["False", "PASSIVE", "False"], name
    convert(llama_dir, tmp_path / "eager", kernel="eager")
    convert(llama_dir, tmp_path / "search-here", options=Options(scales="search"))  # in a process that has torch
    for shard in (tmp_path / "out").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "eager" / shard.name).read_bytes()
        assert (tmp_path / "search" / shard.name).read_bytes() == (tmp_path / "search-here" / shard.name).read_bytes()


def test_dry_run_says_what_decided_and_which_loaders_read_the_output(llama_dir, cli):
    code, out, err = cli("convert", llama_dir, "--dry-run")
    assert code == 0, err
    assert "  decided by name rules (LlamaForCausalLM: decided as transformers does)" in out
    assert "  loads in: transformers from_pretrained (bitsandbytes); nf4convert.load_model" in out
    assert "embedding" in out and "Nothing written (--dry-run)." in out


def test_single_file_source(llama_dir, tmp_path):
    from safetensors.torch import save_file

    tensors = {"layer.weight": torch.randn(64, 64), "layer.bias": torch.randn(64)}
    save_file(tensors, tmp_path / "one.safetensors")
    out = convert(tmp_path / "one.safetensors", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "nf4convert.json"]
    assert set(open_checkpoint(out).quant_states) == {"layer.weight"}


def test_kept_tensors_copied_through_a_buffer_where_the_kernel_cannot_are_the_same_bytes(llama_dir, tmp_path, monkeypatch):
    """Kept tensors go from source to output inside the kernel (copy_file_range); across file systems or
    where it is missing, through a buffer: the same bytes either way."""
    import errno
    import os

    direct = convert(llama_dir, tmp_path / "direct")

    def cross_device(*_args, **_kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    buffered = convert(llama_dir, tmp_path / "buffered")
    for f in sorted(p.name for p in direct.iterdir()):
        assert (direct / f).read_bytes() == (buffered / f).read_bytes(), f


def test_kept_tensors_copied_while_the_shard_is_hashed_give_its_true_hash(llama_dir, tmp_path, monkeypatch):
    """Kept tensors are copied at the seal, a chunk at a time, while the shard is hashed behind the
    copy: the same bytes as whole copies, and the manifest's hash is the file's."""
    from nf4convert import files
    from nf4convert.tensorfile import ShardReader

    whole = convert(llama_dir, tmp_path / "whole")
    monkeypatch.setattr(ShardReader, "CHUNK", 4096)  # the embedding in about 200 copies
    monkeypatch.setattr(files, "_HASH_CHUNK", 8192)  # the hash waits on the copy, chunk after chunk
    chunked = convert(llama_dir, tmp_path / "chunked")
    for f in sorted(p.name for p in whole.iterdir()):
        assert (whole / f).read_bytes() == (chunked / f).read_bytes(), f
    for record in json.loads((chunked / MANIFEST_NAME).read_text())["files"]:
        assert sha256_file(chunked / record["name"]) == record["sha256"]
