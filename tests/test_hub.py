"""Hub sources through the local cache (offline), allow-patterns, the model card, and push --dry-run.

The Hub itself is out of reach here: the cache is laid out on disk exactly as huggingface_hub lays
it (blobs/, refs/, snapshots/ with relative symlinks), and huggingface_hub.scan_cache_dir checks it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, scan_cache_dir
from huggingface_hub.utils import filter_repo_objects

from nf4convert.convert import convert
from nf4convert.card import model_card
from nf4convert.hub import ALLOW_PATTERNS, push

from .test_convert import load_all

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Lay out ``files`` as a cached model repo at ``commit`` (ref ``main``), as huggingface_hub does."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1), "blobs", blob))
    return snapshot


@pytest.fixture
def hub_cache(llama_dir, tmp_path):
    cache = tmp_path / "hf-cache"
    files = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny llama\n"
    files["pytorch_model.bin"] = b"\x80\x04 never unpickled"
    cache_repo(cache, "org/tiny-llama", files)
    cache_repo(cache, "org/pickles-only", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04 never unpickled"})
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {"org/tiny-llama", "org/pickles-only"}
    return cache


def test_repo_id_converts_offline_from_the_cache_and_records_provenance(hub_cache, llama_dir, tmp_path, cli):
    code, _, err = cli("convert", "org/tiny-llama", tmp_path / "out", "--cache-dir", hub_cache, "--quiet")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "nf4convert.json").read_text())
    assert manifest["source"]["repo_id"] == "org/tiny-llama"
    assert manifest["source"]["revision"] == COMMIT
    assert manifest["source"]["license"] == "apache-2.0"
    assert not any(f["name"].endswith(".bin") for f in manifest["source"]["files"] + manifest["files"])
    local = convert(llama_dir, tmp_path / "local")
    a, b = load_all(tmp_path / "out"), load_all(local)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_shards_sha256_comes_from_its_blob_name_and_says_so(hub_cache, tmp_path, cli):
    """huggingface_hub names an LFS file's cache blob by the sha256 it checked when downloading: the
    shard is not hashed again, and the manifest says where its hash came from; verify still reads it."""
    code, _, err = cli("convert", "org/tiny-llama", tmp_path / "out", "--cache-dir", hub_cache, "--quiet")
    assert code == 0, err
    files = {f["name"]: f for f in json.loads((tmp_path / "out" / "nf4convert.json").read_text())["source"]["files"]}
    snapshot = next(hub_cache.glob("models--org--tiny-llama/snapshots/*"))
    shards = [name for name in files if name.endswith(".safetensors")]
    assert shards
    for name in shards:
        assert files[name]["sha256_from"] == "huggingface cache blob name"
        assert files[name]["sha256"] == hashlib.sha256((snapshot / name).read_bytes()).hexdigest()
    assert "sha256_from" not in files["config.json"]  # a side file is hashed as ever
    code, out, err = cli("verify", tmp_path / "out", "--source", "org/tiny-llama", "--cache-dir", hub_cache)
    assert code == 0, err


def test_allow_patterns_fetch_weights_configs_and_tokenizers_never_pickles():
    names = ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json",
             "tokenizer.model", "1_Pooling/config.json", "README.md", "LICENSE", "pytorch_model.bin",
             "model.gguf", "flax_model.msgpack", "consolidated.pth", "onnx/model.onnx"]
    kept = set(filter_repo_objects(names, allow_patterns=ALLOW_PATTERNS))
    assert kept == set(names[:8])


@pytest.mark.parametrize(
    "repo, revision, match",
    [
        ("org/not-cached", None, "org/not-cached@main: not in the local Hugging Face cache"),
        ("org/tiny-llama", "v2.0", "org/tiny-llama@v2.0: not in the local Hugging Face cache"),
        ("org/pickles-only", None, "org/pickles-only@main: no safetensors weights in the repository (pickled *.bin weights are only read with --allow-pickle)"),
    ],
)
def test_unresolvable_repos_fail_in_one_line(hub_cache, tmp_path, cli, repo, revision, match):
    args = ["convert", repo, tmp_path / "out", "--cache-dir", hub_cache, "--quiet"] + (["--revision", revision] if revision else [])
    code, _, err = cli(*args)
    assert code != 0 and err.count("\n") == 1 and match in err
    assert not (tmp_path / "out").exists()


def test_verify_resolves_a_repo_id_source_as_convert_does(hub_cache, tmp_path, cli):
    cli("convert", "org/tiny-llama", tmp_path / "out", "--cache-dir", hub_cache, "--quiet")
    code, out, err = cli("verify", tmp_path / "out", "--source", "org/tiny-llama", "--cache-dir", hub_cache)
    assert code == 0, err
    assert out.startswith("OK ") and "quantized tensors vs source" in out


def test_a_mistyped_local_folder_says_no_such_folder_exists_either(hub_cache, tmp_path, cli):
    code, _, err = cli("convert", "big/lama", tmp_path / "out", "--cache-dir", hub_cache, "--quiet")
    assert code == 9 and err.count("\n") == 1
    assert err.strip().endswith("no local folder big/lama exists either")


def test_model_card_round_trips_through_huggingface_hub(hub_cache, tmp_path, cli):
    cli("convert", "org/tiny-llama", tmp_path / "out", "--cache-dir", hub_cache, "--quiet")
    code, _, _ = cli("verify", tmp_path / "out", "--save", "--source", next(hub_cache.glob("models--org--tiny-llama/snapshots/*")))
    assert code == 0
    card = ModelCard(model_card(tmp_path / "out"))
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-llama" and data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert {"nf4", "4-bit", "bitsandbytes"} <= set(data["tags"])
    assert "relative RMSE mean" in card.text and "load_model(" in card.text and "| block size | 64 |" in card.text


def test_push_dry_run_shows_card_and_files_and_uploads_nothing(llama_dir, tmp_path, cli):
    out = convert(llama_dir, tmp_path / "out")
    code, stdout, err = cli("push", out, "me/tiny-llama-nf4", "--dry-run")
    assert code == 0, err
    assert "base_model_relation" not in stdout.split("---")[1]  # a local source has no base repo
    assert 'from_pretrained("me/tiny-llama-nf4"' in stdout and "Nothing uploaded (--dry-run)." in stdout
    assert "  model.safetensors" in stdout and "  nf4convert.json" in stdout and "  README.md" in stdout
    assert not (out / "README.md").exists()


def test_push_refuses_a_folder_that_fails_verification(llama_dir, tmp_path, cli):
    out = convert(llama_dir, tmp_path / "out")
    (out / "config.json").write_text("{}")
    code, _, err = cli("push", out, "me/x", "--dry-run")
    assert code == 8 and "config.json: size" in err and "not uploading" in err
    with pytest.raises(Exception, match="not a Hub repo id"):
        push(out, "not a repo id!", dry_run=True)


def test_model_card_loads_with_the_architectures_own_class(bert_dir, tmp_path):
    card = model_card(convert(bert_dir, tmp_path / "out"))
    assert "from transformers import BertModel" in card and "BertModel.from_pretrained(" in card
    assert "AutoModelForCausalLM" not in card
    assert "Loads in: transformers from_pretrained (bitsandbytes); nf4convert.load_model." in card


def test_model_card_of_quantized_moe_experts_says_which_loaders_read_them(tmp_path):
    from .architectures import build

    build("MixtralForCausalLM").save_pretrained(tmp_path / "src")
    card = model_card(convert(tmp_path / "src", tmp_path / "out"))
    assert "Loads in: nf4convert.load_model (transformers 5); transformers 4.x from_pretrained" in card
    assert card.index("load_model(snapshot_download") < card.index("MixtralForCausalLM.from_pretrained(")


def test_model_card_of_fused_experts_names_the_parametrize_path_and_no_stock_load(tmp_path):
    from .architectures import build

    build("GraniteMoeForCausalLM").save_pretrained(tmp_path / "src")
    card = model_card(convert(tmp_path / "src", tmp_path / "out"))
    assert "Loads in: nf4convert.load_model (transformers 5); transformers 5 from_pretrained(ignore_mismatched_sizes=True)" in card
    assert "stored fused as 3-D tensors" in card and "load_model(snapshot_download" in card
    assert "GraniteMoeForCausalLM.from_pretrained(" not in card
