"""diffusers pipelines: a tiny Flux pipeline (CLIP and T5 text encoders, VAE, scheduler, local tokenizers)
converted in one command on the CPU, the published 4-bit pipelines' components in NF4 and the rest
copied byte for byte, one manifest over every file, loaded and run by ``load_model`` on the CPU.

The reference for the generation is the source pipeline with each quantized weight replaced by the
spec's numpy decode of the output's bytes (tests/reference.py)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from nf4convert.errors import OptionError
from nf4convert.load import load_model, load_state_dict
from nf4convert.pipeline import convert_pipeline
from nf4convert.plan import Options

from .hubserver import COMMIT
from .reference import reference_dequantize
from .test_hub import cache_repo
from .test_stream import online  # noqa: F401  (a fixture)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

QUANTIZED = ["text_encoder_2", "transformer"]
RUN = dict(prompt="a cat", num_inference_steps=2, height=16, width=16, guidance_scale=1.0, max_sequence_length=16, output_type="pt")


def _tokenizer(**tokens: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(string.printable[:95])}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", model_max_length=77, **tokens)


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("pipeline") / "flux-tiny")


def save_tiny_flux(path: Path) -> Path:
    """A tiny Flux pipeline saved by diffusers in ``path``."""
    torch.manual_seed(0)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=diffusers.AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        ),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )),
        tokenizer=_tokenizer(bos_token="<s>", eos_token="</s>"),
        text_encoder_2=transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        )),
        tokenizer_2=_tokenizer(eos_token="</s>"),
        transformer=diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        ),
    )  # fmt: skip
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_nf4(flux, tmp_path_factory) -> Path:
    return convert_pipeline(flux, tmp_path_factory.mktemp("nf4") / "flux-tiny-nf4", options=Options(double_quant=False, compute_dtype="float32"))


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**RUN, generator=torch.Generator().manual_seed(0)).images


def test_the_published_components_are_quantized_the_rest_copied_and_one_manifest_covers_every_file(flux, flux_nf4):
    source, output = files(flux), files(flux_nf4)
    manifest = json.loads(output["nf4convert.json"])
    assert [n for n, c in manifest["pipeline"].items() if c["quantized"]] == QUANTIZED
    copied = {n: b for n, b in source.items() if n.split("/")[0] not in QUANTIZED}
    assert {n: output[n] for n in copied} == copied  # model_index.json, VAE, CLIP, scheduler, tokenizers: byte for byte
    assert sorted(f["name"] for f in manifest["files"]) == sorted(n for n in output if n != "nf4convert.json")
    for name in QUANTIZED:
        assert json.loads(output[f"{name}/nf4convert.json"])["tensors"]["quantized"]
    assert "transformer/diffusion_pytorch_model.safetensors" in output and "text_encoder_2/model.safetensors" in output


def test_load_model_runs_the_pipeline_on_the_cpu_as_the_specs_decode_of_its_weights(flux, flux_nf4):
    ours = load_model(flux_nf4)
    assert type(ours).__name__ == "FluxPipeline" and ours.transformer.is_loaded_in_4bit and ours.text_encoder_2.is_loaded_in_4bit
    reference = diffusers.DiffusionPipeline.from_pretrained(flux)
    for name in QUANTIZED:
        module = getattr(reference, name)
        for key, w in load_state_dict(flux_nf4 / name).items():
            if hasattr(w, "quant_state"):
                qs = w.quant_state
                module.get_parameter(key).data = reference_dequantize(w.data, qs.absmax, tuple(qs.shape), torch.float32, qs.blocksize)
    torch.testing.assert_close(generate(ours), generate(reference), rtol=0, atol=1e-5)


def test_the_cli_converts_a_cached_hub_pipeline_offline_and_verify_inspect_and_dequantize_read_it(flux, tmp_path, cli):
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "someone/flux-tiny", files(flux))
    out = tmp_path / "flux-nf4"
    rc, text, err = cli("convert", "someone/flux-tiny", out, "--cache-dir", cache, "--quiet")
    assert rc == 0, err
    rc, text, err = cli("verify", out, "--source", flux)
    assert rc == 0 and text.startswith(f"OK {out}: ") and "quantized tensors vs source" in text, err
    rc, text, err = cli("inspect", out)
    assert rc == 0 and "nf4convert pipeline output (FluxPipeline)" in text and "transformer      diffusers FluxTransformer2DModel: NF4" in text
    rc, _, err = cli("dequantize", out, tmp_path / "plain", "--quiet")
    assert rc == 0, err
    plain = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "plain")
    assert isinstance(plain.transformer.transformer_blocks[0].ff.net[2], torch.nn.Linear) and generate(plain).shape == (1, 3, 16, 16)
    (out / "vae" / "config.json").write_text("{}")
    rc, text, err = cli("verify", out)
    assert rc == 8 and "FAIL vae/config.json: size or sha256 differs from the manifest" in text


def test_components_chooses_and_the_dry_run_writes_nothing(flux, tmp_path, cli):
    rc, text, err = cli("convert", flux, tmp_path / "out", "--components", "text_encoder_2", "--dry-run")
    assert rc == 0, err
    assert "quantize text_encoder_2 (transformers T5EncoderModel): chosen (--components)" in text
    assert "copy     transformer (diffusers FluxTransformer2DModel): not chosen (copied)" in text
    assert "Plan for text_encoder_2" in text and "Nothing written (--dry-run)." in text and not (tmp_path / "out").exists()
    rc, text, err = cli("convert", flux, tmp_path / "out", "--components", "vea")
    assert rc == 2 and text == "" and err.count("\n") == 1
    assert "--components 'vea': not a model component of the pipeline (those are: text_encoder, text_encoder_2, transformer, vae)" in err


def test_an_interrupted_pipeline_resumes_keeping_the_finished_components(flux, tmp_path, monkeypatch):
    import sys

    conversion = sys.modules["nf4convert.convert"]
    real, calls = conversion.convert, []

    def second_fails(src, dst, **kwargs):
        calls.append(Path(getattr(src, "path", src)).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst, **kwargs)

    monkeypatch.setattr(conversion, "convert", second_fails)
    with pytest.raises(KeyboardInterrupt):
        convert_pipeline(flux, tmp_path / "out")
    assert (tmp_path / "out.nf4convert-partial" / "text_encoder_2" / "nf4convert.json").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(conversion, "convert", real)
    calls.clear()
    monkeypatch.setattr(conversion, "convert", lambda src, dst, **kw: calls.append(Path(getattr(src, "path", src)).name) or real(src, dst, **kw))
    convert_pipeline(flux, tmp_path / "out")
    assert calls == ["transformer"] and (tmp_path / "out" / "nf4convert.json").is_file()


@pytest.mark.parametrize("change, message", [
    (lambda index: {**index, "transformer_2": ["diffusers", "FluxTransformer2DModel"]}, "names the component 'transformer_2' (diffusers FluxTransformer2DModel), and there is no folder transformer_2/"),
    (lambda index: {**index, "transformer": ["diffusers", "FluxTransformer9DModel"]}, "'transformer' is a diffusers FluxTransformer9DModel, a class diffusers"),
])  # fmt: skip
def test_a_bad_model_index_is_one_line_naming_it_and_nothing_is_written(flux, tmp_path, cli, change, message):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(flux, src)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps(change(index)))
    rc, text, err = cli("convert", src, tmp_path / "out")
    assert rc == 2 and text == "" and err.count("\n") == 1, err
    assert err.startswith(f"nf4convert: error: {src / 'model_index.json'}: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_importance_and_allow_pickle_are_refused_for_a_pipeline(flux, tmp_path, cli):
    with pytest.raises(OptionError, match="an importance file covers one model"):
        convert_pipeline(flux, tmp_path / "out", options=Options(scales="search", importance="imp.safetensors"))
    rc, _, err = cli("convert", flux, tmp_path / "out", "--allow-pickle")
    assert rc == 2 and "--allow-pickle is not supported for a diffusers pipeline yet" in err


def test_a_pipeline_on_a_dask_cluster_writes_the_same_bytes(flux, flux_nf4, tmp_path):
    pytest.importorskip("distributed")
    out = convert_pipeline(flux, tmp_path / "dask", options=Options(double_quant=False, compute_dtype="float32"), workers=2)
    assert files(out) == files(flux_nf4)


def test_the_pipeline_card_says_diffusers_and_its_cpu_snippet_runs(flux_nf4, tmp_path):
    from nf4convert.card import model_card

    from .test_card import run_snippets, snippets

    card = model_card(flux_nf4, repo_id="me/flux-nf4")
    assert "library_name: diffusers" in card and 'DiffusionPipeline.from_pretrained("me/flux-nf4", torch_dtype=torch.float32)' in card
    assert "| `transformer` | diffusers `FluxTransformer2DModel` | NF4: 28 weights" in card and "| `vae` | diffusers `AutoencoderKL` | as published (copied) |" in card
    assert len(snippets(card)) == 2
    printed = run_snippets(card, flux_nf4, "me/flux-nf4", tmp_path, skip="from diffusers import", after="print(type(pipe).__name__)")
    assert printed.strip().endswith("FluxPipeline")


def test_a_hub_pipeline_streams_each_components_shards_and_writes_the_same_bytes(flux, flux_nf4, tmp_path, cli, online):
    """--stream on a pipeline repo: small files first, each converted component's shards fetched one at a
    time and deleted, the copied components' weights fetched whole; the same bytes as from a local folder."""
    from .hubserver import serve

    out, scratch = tmp_path / "out", tmp_path / "out.nf4convert-scratch"
    with serve("org/flux-tiny", flux, scratch) as (hub, endpoint):
        online(endpoint)
        rc, text, err = cli("convert", "org/flux-tiny", out, "--stream", "--no-double-quant", "--compute-dtype", "float32", "--quiet")
    assert rc == 0, err
    ours, local = files(out), files(flux_nf4)
    assert {k: v for k, v in ours.items() if not k.endswith("nf4convert.json")} == {k: v for k, v in local.items() if not k.endswith("nf4convert.json")}
    assert json.loads(ours["nf4convert.json"])["source"] == {"name": "org/flux-tiny", "repo_id": "org/flux-tiny", "revision": COMMIT}
    fetched = sorted(name for name, _ in hub.scratch_at_download)
    assert fetched == sorted(p.relative_to(flux).as_posix() for p in flux.rglob("*.safetensors"))  # each once, whole
    assert not scratch.exists()
