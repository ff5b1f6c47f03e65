"""Forge's and ComfyUI's NF4 checkpoints: one ``.safetensors`` file, the original model's key names
(fused ``qkv``, ``model.diffusion_model.`` prefixes), each 4-bit weight stored as bitsandbytes'
``Linear4bit`` saves it (``weight``, ``weight.absmax``, ``weight.quant_map``, ... and the
``weight.quant_state.bitsandbytes__nf4`` blob), beside kept tensors of any dtype (a VAE in bf16, a
text encoder in FP8).

``inspect``, ``verify`` and ``dequantize`` read such a file given as itself; ``dequantize`` writes it
back as one plain file of the same name, equal to bitsandbytes' own dequantization. The file's
neighbours (a ``config.json``, other checkpoints) are not its and are neither read nor copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .test_bnb_folders import bitsandbytes_dequantization

bnb = pytest.importorskip("bitsandbytes")

KINDS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
PREFIX = "model.diffusion_model."


def flux_like(quant_type: str, double_quant: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A Flux-shaped diffusion model under its original key names, its linear layers bitsandbytes
    ``Linear4bit`` quantized on the CPU, and its full-precision weights (the source)."""
    torch.manual_seed(0)
    linears = {"double_blocks.0.img_attn.qkv": (64, 192), "double_blocks.0.img_attn.proj": (64, 64), "double_blocks.0.img_mlp.0": (64, 256),
               "single_blocks.0.linear1": (64, 320), "final_layer.linear": (64, 48)}  # fmt: skip
    model, source = torch.nn.Module(), {}
    for name, (n_in, n_out) in linears.items():
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=torch.bfloat16, compress_statistics=double_quant, quant_type=quant_type)
        weight, bias = (torch.randn(n_out, n_in) * 0.02).to(torch.bfloat16), torch.randn(n_out).to(torch.bfloat16)
        layer.weight.data, layer.bias.data = weight.clone(), bias.clone()  # bf16, as Forge quantizes them
        source |= {f"{PREFIX}{name}.weight": weight, f"{PREFIX}{name}.bias": bias}
        parent = model
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], layer.to("cpu"))  # quantized here
    return model, source


def kept() -> dict[str, torch.Tensor]:
    """What an all-in-one checkpoint keeps beside the 4-bit model: norms, a VAE, an FP8 text encoder."""
    torch.manual_seed(1)
    return {
        f"{PREFIX}double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16, dtype=torch.bfloat16),
        "vae.decoder.conv_in.weight": torch.randn(8, 4, 3, 3).to(torch.bfloat16),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(32, 32).to(torch.float8_e4m3fn),
    }


def forge_file(folder: Path, quant_type: str = "nf4", double_quant: bool = False) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    """The file Forge writes (its loader saves ``Linear4bit``'s state dict as it is), in ``folder``
    beside a ``config.json`` and a checkpoint that are not its; and the model and source it holds."""
    model, source = flux_like(quant_type, double_quant)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "flux1-tiny-bnb-nf4.safetensors"
    save_file({f"{PREFIX}{k}": v.contiguous() for k, v in model.state_dict().items()} | kept(), path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "note": "another model's"}))
    save_file({"unrelated.weight": torch.zeros(4)}, folder / "other.safetensors")
    return path, model, source


@pytest.mark.parametrize("quant_type, double_quant", KINDS)
def test_dequantize_writes_one_file_of_its_name_equal_to_bitsandbytes(tmp_path, cli, quant_type, double_quant):
    path, model, _ = forge_file(tmp_path / "checkpoints", quant_type, double_quant)
    code, out, err = cli("dequantize", path, tmp_path / "plain", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [".nf4convert-output", path.name]
    plain = load_file(tmp_path / "plain" / path.name)
    expected = {PREFIX + k: v for k, v in bitsandbytes_dequantization(model).items()}
    assert len(expected) == 5 and [k for k, v in expected.items() if not (plain[k].dtype == torch.bfloat16 and torch.equal(plain[k], v))] == []
    for key, value in kept().items():  # byte for byte, FP8 too
        assert plain[key].dtype == value.dtype and torch.equal(plain[key].view(torch.uint8), value.view(torch.uint8))
    assert not any(k.endswith((".absmax", ".quant_map", "bitsandbytes__nf4", "bitsandbytes__fp4")) for k in plain)
    assert sorted(plain) == sorted([*expected, *(k.replace(".weight", ".bias") for k in expected), *kept()])


def test_a_large_single_file_stays_one_file_whatever_the_shard_size(tmp_path, cli):
    path, _, _ = forge_file(tmp_path / "checkpoints")
    code, _, err = cli("dequantize", path, tmp_path / "plain", "--quiet", "--max-shard-size", "1KB")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [".nf4convert-output", path.name]


def test_dequantize_writes_beside_the_file_and_force_replaces_only_its_own_output(tmp_path, cli):
    path, _, _ = forge_file(tmp_path / "checkpoints")
    out = tmp_path / "checkpoints" / "plain"  # beside the file: not inside it
    assert cli("dequantize", path, out, "--quiet")[0] == 0
    assert cli("dequantize", path, out, "--quiet", "--force")[0] == 0
    code, _, err = cli("dequantize", path, tmp_path / "checkpoints", "--quiet", "--force")
    assert code == 5 and "the output folder must not contain the source" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    code, _, err = cli("dequantize", path, tmp_path / "mine", "--quiet", "--force")
    assert code == 5 and "not a folder nf4convert wrote" in err and (tmp_path / "mine" / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["config.json", path.name, "other.safetensors", "plain"]


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("fp4", True)])
def test_inspect_says_what_the_file_is_and_counts_its_weights(tmp_path, cli, quant_type, double_quant):
    path, _, _ = forge_file(tmp_path / "checkpoints", quant_type, double_quant)
    dq = "double quantization" if double_quant else "no double quantization"
    code, out, err = cli("inspect", path)
    assert code == 0, err
    assert out.splitlines()[0] == f"{path}: bitsandbytes 4-bit single file, Forge/ComfyUI layout ({quant_type.upper()}, {dq}; no nf4convert manifest)"
    code, out, err = cli("inspect", path, "--json")
    summary = json.loads(out)
    assert summary["path"] == str(path) and summary["shards"] == 1
    assert summary["quantized"]["tensors"] == 5 and summary["quantized"]["parameters"] == 64 * (192 + 64 + 256 + 320 + 48)
    assert summary["kept"]["tensors"] == 5 + 3  # the biases and the others


def test_verify_checks_the_file_and_measures_it_against_its_source(tmp_path, cli):
    path, _, source = forge_file(tmp_path / "checkpoints")
    save_file(source | kept(), tmp_path / "flux1-tiny.safetensors")
    code, out, err = cli("verify", path)
    assert code == 0, err
    assert out.startswith(f"OK {path}: bitsandbytes 4-bit single file, Forge/ComfyUI layout (NF4, no double quantization; no nf4convert manifest): 28 tensors, each 4-bit weight complete")
    code, out, err = cli("verify", path, "--source", tmp_path / "flux1-tiny.safetensors", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert sorted(report["quality"]) == sorted(k for k in source if k.endswith(".weight"))
    assert 0.05 < report["summary"]["rel_rmse"]["max"] < 0.15  # NF4's error on Gaussian weights


def test_verify_names_a_broken_weight_and_fails(tmp_path, cli):
    path, model, _ = forge_file(tmp_path / "checkpoints")
    tensors = load_file(path)
    del tensors[f"{PREFIX}final_layer.linear.weight.absmax"]
    save_file(tensors, path)
    code, out, err = cli("verify", path)
    assert code == 8 and f"FAIL {path}: {PREFIX}final_layer.linear.weight.absmax is missing" in out


def test_a_quant_map_other_than_bitsandbytes_table_is_refused_not_decoded(tmp_path, cli):
    """The decoding assumes bitsandbytes' tables, as its kernels do: a file whose table differs would
    decode to other values than its writer meant, so it is refused, naming the tensor."""
    path, _, _ = forge_file(tmp_path / "checkpoints", "nf4", True)
    for suffix, table in [("quant_map", "NF4 code"), ("nested_quant_map", "dynamic")]:
        tensors = load_file(path)
        key = f"{PREFIX}double_blocks.0.img_attn.qkv.weight.{suffix}"
        original = tensors[key].clone()
        tensors[key] = original.flip(0).contiguous()
        save_file(tensors, path)
        code, _, err = cli("dequantize", path, tmp_path / "plain", "--quiet")
        assert code == 3 and err.strip() == (
            f"nf4convert: error: {path}: {key} is not bitsandbytes' {table} table; a decoding with another table is not supported"
        )
        assert not (tmp_path / "plain").exists()
        tensors[key] = original
        save_file(tensors, path)


def test_a_plain_file_and_a_file_of_a_folder_are_pointed_elsewhere(tmp_path, cli):
    save_file({"w.weight": torch.randn(4, 4)}, tmp_path / "plain.safetensors")
    code, _, err = cli("inspect", tmp_path / "plain.safetensors")
    assert code == 3 and "not an NF4 checkpoint (neither a folder nor a .safetensors file of bitsandbytes 4-bit weights)" in err
    (tmp_path / "notes.txt").write_text("not weights")
    code, _, err = cli("dequantize", tmp_path / "notes.txt", tmp_path / "out", "--quiet")
    assert code == 3 and "notes.txt: not an NF4 checkpoint" in err and not (tmp_path / "out").exists()
    src = tmp_path / "src.safetensors"
    save_file({"l.weight": torch.randn(64, 64)}, src)
    assert cli("convert", src, tmp_path / "ours", "--quiet")[0] == 0
    code, _, err = cli("inspect", tmp_path / "ours" / "model.safetensors")
    assert code == 2 and err.strip() == f"nf4convert: error: {tmp_path / 'ours' / 'model.safetensors'}: a file of the NF4 folder {tmp_path / 'ours'}; give the folder"


def test_a_folder_of_such_files_names_the_file_to_give(tmp_path, cli):
    path, _, _ = forge_file(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "config.json").unlink()
    code, _, err = cli("inspect", tmp_path / "checkpoints")
    assert code == 3 and err.strip() == (
        f"nf4convert: error: {tmp_path / 'checkpoints'}: no nf4convert.json nor config.json, but {path.name} holds bitsandbytes 4-bit weights: give the file ({path})"
    )


def test_verify_save_of_a_single_file_is_refused_before_any_work(tmp_path, cli):
    path, _, _ = forge_file(tmp_path / "checkpoints")
    before = sorted(p.name for p in path.parent.iterdir())
    code, _, err = cli("verify", path, "--save")
    assert code == 2 and "--save writes the report into an output folder" in err
    assert sorted(p.name for p in path.parent.iterdir()) == before


def test_other_commands_say_which_commands_read_it(tmp_path, cli):
    from nf4convert import load_model
    from nf4convert.errors import LoadError

    path, _, _ = forge_file(tmp_path / "checkpoints")
    code, _, err = cli("push", path, "me/flux1-tiny-nf4", "--dry-run")
    assert code == 3 and err.strip() == (
        f"nf4convert: error: {path}: a bitsandbytes 4-bit single file (Forge/ComfyUI layout), not an nf4convert output: inspect, verify and dequantize read it"
    )
    with pytest.raises(LoadError, match=r"names no model to build; load it in Forge or ComfyUI, or 'nf4convert dequantize' it"):
        load_model(path)


def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path, cli):
    (tmp_path / "broken.safetensors").write_bytes(b"garbage!!")
    for command in (["inspect"], ["verify"], ["dequantize"]):
        code, _, err = cli(*command, tmp_path / "broken.safetensors", *([tmp_path / "out"] if command == ["dequantize"] else []))
        assert code == 3 and err.startswith(f"nf4convert: error: {tmp_path / 'broken.safetensors'}: header claims") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]


def test_a_symlinked_file_is_read_where_it_leads(tmp_path, cli):
    """A Hub cache snapshot's files are links into blobs/: the file the user names is read."""
    path, model, _ = forge_file(tmp_path / "blobs")
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / path.name).symlink_to(path)
    code, _, err = cli("dequantize", tmp_path / "snapshot" / path.name, tmp_path / "plain", "--quiet")
    assert code == 0, err
    assert (tmp_path / "plain" / path.name).is_file() and not (tmp_path / "plain" / path.name).is_symlink()


@pytest.mark.parametrize("prefix", ["", "diffusion."])
def test_verify_matches_a_source_that_names_the_weights_with_another_prefix(tmp_path, cli, prefix):
    """Black Forest Labs' own file names Flux's weights without ``model.diffusion_model.``; a Forge
    NF4 file holds them with it: each weight is measured against its own original all the same."""
    path, _, source = forge_file(tmp_path / "checkpoints")
    save_file({prefix + k.removeprefix(PREFIX): v for k, v in source.items()}, tmp_path / "flux1-tiny.safetensors")
    code, out, err = cli("verify", path, "--source", tmp_path / "flux1-tiny.safetensors", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["source_names"] == {"strip": PREFIX, "add": prefix}
    assert len(report["quality"]) == 5 and report["summary"]["rel_rmse"]["max"] < 0.15
    code, out, _ = cli("verify", path, "--source", tmp_path / "flux1-tiny.safetensors")
    assert out.splitlines()[-1] == f"   (named in the source with the prefix {prefix!r} for {PREFIX!r})"


def test_renaming_keeps_names_that_match_and_finds_the_prefix_that_names_the_most():
    from nf4convert.errors import SourceError
    from nf4convert.verify import renaming

    assert renaming(["a.w", "b.w"], {"a.w", "x.w"}) == ("", "")  # one matches as it is: no renaming
    assert renaming(["m.a.w", "m.b.w"], {"a.w", "b.w"}) == ("m.", "")
    assert renaming(["a.w", "b.w"], {"m.a.w", "m.b.w"}) == ("", "m.")
    assert renaming(["p.blocks.0.w", "p.blocks.1.w"], {"q.blocks.0.w", "q.blocks.1.w", "z.0.w"}) == ("p.", "q.")
    assert renaming(["a.w"], {"b.v"}) == ("", "")
    assert renaming(["m.x.q.weight", "m.y.k.weight", "m.z.v.weight"], {"h.0.q.weight", "h.0.c.weight"}) == ("", "")  # another model
    with pytest.raises(SourceError, match=r"under several prefixes alike \('refiner\.', 'unet\.'\): which one was converted cannot be told"):
        renaming(["m.blocks.0.w", "m.blocks.1.w"], {"unet.blocks.0.w", "unet.blocks.1.w", "refiner.blocks.0.w", "refiner.blocks.1.w"})


def bfl_flux(path: Path) -> dict[str, torch.Tensor]:
    """A Flux transformer under Black Forest Labs' own key names (no config.json: the name rules decide)."""
    torch.manual_seed(2)
    h, t = 128, {}
    for name, n_in, n_out in [("img_in", 64, h), ("time_in.in_layer", 256, h), ("double_blocks.0.img_attn.qkv", h, 3 * h),
                              ("double_blocks.0.img_mlp.2", 4 * h, h), ("single_blocks.0.linear1", h, 7 * h), ("final_layer.linear", h, 64)]:  # fmt: skip
        t[f"{name}.weight"], t[f"{name}.bias"] = (torch.randn(n_out, n_in) * 0.02).to(torch.bfloat16), torch.zeros(n_out, dtype=torch.bfloat16)
    t["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(64, dtype=torch.bfloat16)
    save_file(t, path)
    return t


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_converted_single_file_is_the_layout_forge_and_comfyui_load(tmp_path, cli, double_quant):
    """A single-file source converted into one shard is a file of the Forge/ComfyUI layout: every 4-bit
    weight loads through bitsandbytes' own ``Params4bit.from_prequantized`` (what their NF4 loaders
    call) and decodes there to what the spec says, and bitsandbytes saves its quant state back to the
    same bytes (without double quantization; with it, only nested_offset's spelling differs: spec 4.1)."""
    source = bfl_flux(tmp_path / "flux1-tiny.safetensors")
    flags = ["--max-shard-size", "1TB"] + ([] if double_quant else ["--no-double-quant"])
    assert cli("convert", tmp_path / "flux1-tiny.safetensors", tmp_path / "out", "--quiet", *flags)[0] == 0
    (tmp_path / "checkpoints").mkdir()
    single = tmp_path / "checkpoints" / "flux1-tiny-nf4.safetensors"
    single.write_bytes((tmp_path / "out" / "model.safetensors").read_bytes())
    code, out, err = cli("inspect", single)
    assert code == 0 and out.startswith(f"{single}: bitsandbytes 4-bit single file, Forge/ComfyUI layout (NF4, "), err
    assert cli("dequantize", single, tmp_path / "plain", "--quiet")[0] == 0
    plain, stored = load_file(tmp_path / "plain" / single.name), load_file(single)
    weights = [k for k in source if k.endswith(".weight") and k + ".quant_map" in stored]
    assert len(weights) == 6
    for key in weights:
        stats = {k[len(key) + 1 :]: v for k, v in stored.items() if k.startswith(key + ".")}
        param = bnb.nn.Params4bit.from_prequantized(stored[key], dict(stats), requires_grad=False, device="cpu")  # it pops from the dict
        qs = param.quant_state
        absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
        flat = bnb.functional.QuantState(absmax=absmax, shape=torch.Size([qs.shape.numel()]), dtype=qs.dtype, blocksize=qs.blocksize, quant_type="nf4", code=qs.code)
        assert torch.equal(bnb.functional.dequantize_4bit(param.data, quant_state=flat).reshape(qs.shape), plain[key])
        saved = qs.as_dict(packed=True)
        same = [k for k, v in saved.items() if torch.equal(v.view(torch.uint8), stats[k].view(torch.uint8))]
        assert sorted(same) == sorted(stats if not double_quant else set(stats) - {"quant_state.bitsandbytes__nf4"})


def test_dequantize_dtype_casts_the_weights_and_leaves_fp8_tensors_as_stored(tmp_path, cli):
    """An FP8 tensor's value may need a scale stored beside it (ComfyUI's scaled FP8): a cast alone
    would change what it means, so --dtype leaves it as it is."""
    path, model, _ = forge_file(tmp_path / "checkpoints")
    assert cli("dequantize", path, tmp_path / "plain", "--quiet", "--dtype", "float32")[0] == 0
    plain = load_file(tmp_path / "plain" / path.name)
    expected = {PREFIX + k: v for k, v in bitsandbytes_dequantization(model).items()}
    assert all(plain[k].dtype == torch.float32 and torch.equal(plain[k], v.float()) for k, v in expected.items())
    for key, value in kept().items():
        want = value.dtype if value.dtype == torch.float8_e4m3fn else torch.float32
        assert plain[key].dtype == want and torch.equal(plain[key], value.to(want))


def test_a_cached_hub_repo_of_such_files_names_the_files_to_give_and_they_are_read_offline(tmp_path, cli):
    """lllyasviel/flux1-dev-bnb-nf4 holds two such files and no config.json: the repo id says which
    files to give, with the snapshot's path; the file, a link into blobs/, is then read."""
    from .test_hub import cache_repo

    path, _, _ = forge_file(tmp_path / "made")
    data = path.read_bytes()
    snapshot = cache_repo(tmp_path / "hf-cache", "someone/flux1-tiny-bnb-nf4", {"flux1-tiny-bnb-nf4.safetensors": data, "flux1-tiny-bnb-nf4-v2.safetensors": data})
    code, _, err = cli("inspect", "someone/flux1-tiny-bnb-nf4", "--cache-dir", tmp_path / "hf-cache")
    assert code == 3 and err.strip() == (
        f"nf4convert: error: {snapshot}: no nf4convert.json nor config.json, but flux1-tiny-bnb-nf4-v2.safetensors, flux1-tiny-bnb-nf4.safetensors "
        f"hold bitsandbytes 4-bit weights: give the file ({snapshot / 'flux1-tiny-bnb-nf4-v2.safetensors'}, ...)"
    )
    code, out, err = cli("inspect", snapshot / "flux1-tiny-bnb-nf4-v2.safetensors")
    assert code == 0 and "Forge/ComfyUI layout (NF4" in out, err
