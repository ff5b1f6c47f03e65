"""diffusers models (pipeline components): converted on the CPU to exactly what diffusers' own bitsandbytes
NF4 ``save_pretrained`` writes, decided by diffusers' rules, loaded on the CPU by ``load_model`` through
diffusers' own ``from_pretrained``.

The reference is diffusers' own NF4 model: diffusers refuses bitsandbytes without a GPU, so the tests
that build it bypass that one check (``validate_environment``), inside the test only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nf4convert.convert import convert, plan_conversion
from nf4convert.errors import MissingDependencyError, SourceError
from nf4convert.load import float_numerics, load_model
from nf4convert.plan import Options

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("bitsandbytes")

#: tiny configs of the families diffusers' bitsandbytes documentation covers, and a UNet
MODELS = {
    "FluxTransformer2DModel": dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ),
    "SD3Transformer2DModel": dict(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ),
    "WanTransformer3DModel": dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16, freq_dim=256,
        ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ),
    "UNet2DConditionModel": dict(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for name, kwargs in MODELS.items():
        torch.manual_seed(0)
        getattr(diffusers, name)(**kwargs).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def diffusers_on_cpu(monkeypatch):
    """diffusers' own bitsandbytes quantizer with its GPU check bypassed (for building the reference only)."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)


def diffusers_nf4(name: str, src: Path, out: Path) -> torch.nn.Module:
    config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = getattr(diffusers, name).from_pretrained(src, quantization_config=config, torch_dtype=torch.float32, device_map="cpu")
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_a_component_converts_to_exactly_what_diffusers_writes(name, sources, tmp_path, diffusers_on_cpu):
    from safetensors.torch import load_file

    out = convert(sources[name], tmp_path / "nf4", options=Options(double_quant=False))
    reference = diffusers_nf4(name, sources[name], tmp_path / "ref")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "nf4convert.json"]
    ours, theirs = load_file(out / "diffusion_pytorch_model.safetensors"), load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors")
    assert set(ours) == set(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    a, b = (json.loads((f / "config.json").read_text()) for f in (out, tmp_path / "ref"))
    assert {k: v for k, v in a.items() if k != "_name_or_path"} == {k: v for k, v in b.items() if k != "_name_or_path"}
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in reference.modules())
    manifest = json.loads((out / "nf4convert.json").read_text())
    assert len(manifest["tensors"]["quantized"]) == linear4bit
    assert manifest["decided_by"] == f"diffusers {diffusers.__version__} ({name})"


def test_a_bfloat16_wan_is_written_as_diffusers_writes_it_its_float32_modules_in_float32(sources, tmp_path, diffusers_on_cpu):
    from safetensors.torch import load_file

    src = tmp_path / "bf16"
    diffusers.WanTransformer3DModel.from_pretrained(sources["WanTransformer3DModel"], torch_dtype=torch.bfloat16).save_pretrained(src)
    plan = plan_conversion(src, options=Options(double_quant=False))
    cast = {t.name for t in plan.kept if t.dtype == "F32"}
    assert any(".time_embedder." in n for n in cast) and not any(t.dtype == "F32" for t in plan.quantized)
    out = convert(plan, tmp_path / "nf4")
    config = diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    diffusers.WanTransformer3DModel.from_pretrained(src, quantization_config=config, torch_dtype=torch.bfloat16, device_map="cpu").save_pretrained(tmp_path / "ref")
    ours, theirs = load_file(out / "diffusion_pytorch_model.safetensors"), load_file(tmp_path / "ref" / "diffusion_pytorch_model.safetensors")
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_load_model_runs_a_component_on_the_cpu_equal_to_diffusers_own_nf4(sources, tmp_path, diffusers_on_cpu):
    src = sources["FluxTransformer2DModel"]
    out = convert(src, tmp_path / "nf4", options=Options(double_quant=False))
    ours = float_numerics(load_model(out))
    theirs = float_numerics(diffusers_nf4("FluxTransformer2DModel", src, tmp_path / "ref"))
    assert type(ours) is type(theirs) and ours.is_loaded_in_4bit
    g = torch.Generator().manual_seed(0)
    x = dict(
        hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
    )  # fmt: skip
    with torch.no_grad():
        assert torch.equal(ours(**x).sample, theirs(**x).sample)
    assert not torch.cuda.is_available()  # diffusers' own loader would refuse this machine


def test_diffusers_own_nf4_folders_are_read_by_inspect_verify_and_dequantize(sources, tmp_path, cli, diffusers_on_cpu):
    folder = tmp_path / "ref"
    diffusers_nf4("FluxTransformer2DModel", sources["FluxTransformer2DModel"], folder)
    rc, out, err = cli("inspect", folder)
    assert rc == 0 and "bitsandbytes 4-bit folder saved by diffusers (NF4" in out, err
    rc, out, err = cli("verify", folder)
    assert rc == 0 and out.startswith(f"OK {folder}"), err
    assert type(load_model(folder)).__name__ == "FluxTransformer2DModel"  # no manifest: its structure is checked
    rc, _, err = cli("dequantize", folder, tmp_path / "plain", "--quiet")
    assert rc == 0, err
    model = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "plain")
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) > 0


def test_the_card_says_diffusers_and_its_cpu_snippet_runs(sources, tmp_path):
    from nf4convert.card import model_card

    from .test_card import run_snippets, snippets

    out = convert(sources["FluxTransformer2DModel"], tmp_path / "flux-nf4")
    card = model_card(out, repo_id="me/flux-nf4")
    assert "library_name: diffusers" in card and "FluxTransformer2DModel.from_pretrained(\"me/flux-nf4\", torch_dtype=torch.float32)" in card
    assert "needs a GPU" in card or "on a GPU" in card
    assert len(snippets(card)) == 2
    printed = run_snippets(card, out, "me/flux-nf4", tmp_path, skip="from diffusers import", after="print(type(model).__name__)")
    assert printed.strip().endswith("FluxTransformer2DModel")


def test_an_unknown_class_is_one_line_naming_the_file(sources, tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    for f in sources["FluxTransformer2DModel"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer9DModel", "_diffusers_version": "9.0.0"}))
    rc, out, err = cli("convert", src, tmp_path / "out")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert f"config.json: diffusers {diffusers.__version__} has no model class 'FluxTransformer9DModel' (written by diffusers 9.0.0)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_without_diffusers_a_component_is_refused_not_guessed(sources, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="config.json is a diffusers FluxTransformer2DModel: .* pip install diffusers"):
        plan_conversion(sources["FluxTransformer2DModel"])


def test_every_diffusers_transformer_is_decided_as_diffusers_replaces_its_layers():
    """Each transformer class diffusers ships, built from its default config on the meta device: the
    layers nf4convert quantizes are exactly those diffusers' bitsandbytes integration replaces."""
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from nf4convert.diffusers_models import ask_diffusers
    from nf4convert.tensorfile import TensorInfo

    checked = []
    for name in sorted(n for n in dir(diffusers) if n.endswith(("Transformer2DModel", "Transformer3DModel", "TransformerModel"))):
        cls = getattr(diffusers, name)
        try:
            with torch.device("meta"):
                model = cls()
        except Exception:  # noqa: BLE001 - a class without a default config
            continue
        config = {**dict(model.config), "_class_name": name, "_diffusers_version": diffusers.__version__}
        infos = [TensorInfo(k, "F32", tuple(v.shape), 0, 4 * v.numel()) for k, v in model.state_dict().items()]
        ours = {n.removesuffix(".weight") for n, d in ask_diffusers(infos, config=config, skip=()).tensors.items() if d.quantize}
        keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
        replaced = replace_with_bnb_linear(model, modules_to_not_convert=keep, quantization_config=diffusers.BitsAndBytesConfig(load_in_4bit=True))
        theirs = {n for n, m in replaced.named_modules() if type(m).__name__ == "Linear4bit"}
        assert ours == theirs, name
        checked.append(name)
    assert {"FluxTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel"} <= set(checked)
    assert len(checked) >= 10, checked


def test_a_bad_config_is_a_source_error(tmp_path):
    from nf4convert.diffusers_models import meta_model

    with pytest.raises(SourceError, match="config.json: diffusers cannot build FluxTransformer2DModel from it"):
        meta_model({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", "num_attention_heads": "many"})


def test_diffusers_answer_is_cached_under_a_hash_of_what_it_depends_on(sources, tmp_path, monkeypatch):
    import nf4convert.diffusers_models as models

    monkeypatch.setenv("NF4CONVERT_CACHE", str(tmp_path / "cache"))
    first = plan_conversion(sources["FluxTransformer2DModel"])
    assert len(list((tmp_path / "cache" / "decisions").glob("*.json"))) == 1
    monkeypatch.setattr(models, "ask_diffusers", lambda *a, **k: pytest.fail("asked again"))
    again = plan_conversion(sources["FluxTransformer2DModel"])
    assert [(t.name, t.quantize, t.reason) for t in again.tensors] == [(t.name, t.quantize, t.reason) for t in first.tensors]
    with pytest.raises(pytest.fail.Exception, match="asked again"):
        plan_conversion(sources["FluxTransformer2DModel"], options=Options(skip=("*.norm.linear",)))


def test_a_component_without_its_config_is_one_line_naming_it(sources, tmp_path, cli):
    src = tmp_path / "transformer"
    src.mkdir()
    (src / "diffusion_pytorch_model.safetensors").write_bytes((sources["FluxTransformer2DModel"] / "diffusion_pytorch_model.safetensors").read_bytes())
    rc, out, err = cli("convert", src, tmp_path / "out")
    assert rc == 2 and out == "" and err == (
        f"nf4convert: error: {src / 'config.json'}: missing: diffusers weights (diffusion_pytorch_model.safetensors) "
        "are decided from their model's config.json (its _class_name)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer"]

