"""The architecture matrix: tiny random-weight models of 53 transformers architectures, converted, then
loaded by transformers and by ``nf4convert.load_model``, checked against bitsandbytes quantizing on load.

- every architecture: with ``--experts keep`` (what stock transformers 5 loads), every tensor equals
  transformers' own ``save_pretrained`` of the model bitsandbytes quantized on load; ``load_model(OUT)``
  is ``from_pretrained(OUT)`` (class, module types, tensors), and both outputs equal that model's
  exactly (no double quant);
- MoE, default ``--experts quantize``: every expert weight is quantized per expert, routers never, and
  ``load_model(OUT)``'s logits equal the same model with each expert weight replaced by its NF4
  dequantization;
- what decided, and the exact skip list, are in the plan and the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nf4convert.convert import convert, plan_conversion
from nf4convert.errors import LoadError, QuantizationError
from nf4convert.architecture import ask_transformers, decide, map_keys
from nf4convert.decisions import AS_TRANSFORMERS
from nf4convert.load import float_numerics, load_model, load_state_dict
from nf4convert.plan import Options

from .architectures import ARCHITECTURES, FUSED, MOE, assert_same_model, build, inputs, save_checkpoint
from .test_convert import load_all

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

NO_NF4 = {"FalconForCausalLM"}  # transformers quantizes none of its layers (FalconLinear is not nn.Linear)
#: transformers splits a fused in_proj on load: nf4convert keeps it (4-bit bytes cannot be split), bitsandbytes
#: on load quantizes the pieces (and its save_pretrained concatenates their 4-bit bytes): the two loaders of
#: our output are compared with each other only
SPLIT_ON_LOAD = {"LaraMiniForCausalLM"}
OPTIONS = dict(double_quant=False, compute_dtype="float32")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Each architecture saved once by transformers (float32), on first use."""
    root = tmp_path_factory.mktemp("arch")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = save_checkpoint(name, root / name)
        return cache[name]

    return get


def on_load(name: str, src: Path) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return float_numerics(getattr(transformers, name).from_pretrained(src, quantization_config=config, device_map="cpu").eval())


def output(model: torch.nn.Module, x: dict) -> torch.Tensor:
    """The model's main output; MoE experts run transformers' eager implementation (the one that indexes
    experts, as ``load_model``'s 4-bit experts do), so that every loader computes the same way."""
    for module in model.modules():
        if hasattr(module, "is_concatenated"):
            module.config._experts_implementation = "eager"
    with torch.no_grad():
        o = model(**x)
    return next(getattr(o, k) for k in ("logits", "logits_per_image", "last_hidden_state") if getattr(o, k, None) is not None)


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in NO_NF4])
def test_output_equals_bitsandbytes_on_load_in_both_loaders(name, sources, tmp_path):
    src = sources(name)
    out = convert(src, tmp_path / "nf4", options=Options(experts="keep", **OPTIONS))
    peer = on_load(name, src)
    ours = load_all(out)
    assert any(k.endswith(".absmax") for k in ours)
    if name not in SPLIT_ON_LOAD:
        peer.save_pretrained(tmp_path / "peer")
        theirs = load_all(tmp_path / "peer")
        # transformers saves fused experts in the model's layout; the published (and our kept) ones may be transposed
        ours = {k: v.transpose(1, 2) if v.dim() == 3 and v.shape != theirs[k].shape else v for k, v in ours.items()}
        assert set(ours) == set(theirs)
        assert [k for k in theirs if not torch.equal(ours[k], theirs[k])] == []
    x = inputs(name, peer)
    theirs, ours = getattr(transformers, name).from_pretrained(out, device_map="cpu"), load_model(out)
    expected = output(float_numerics(theirs) if name in SPLIT_ON_LOAD else peer, x)
    assert_same_model(ours, theirs)
    # kept float experts: the same values, but the float matmuls of separately loaded copies can differ in the last bit
    exact = dict(rtol=0, atol=1e-6 if name in FUSED else 0)
    torch.testing.assert_close(output(float_numerics(theirs), x), expected, **exact)
    torch.testing.assert_close(output(float_numerics(ours), x), expected, **exact)
    manifest = json.loads((out / "nf4convert.json").read_text())
    decided = f"name rules ({name}: decided as transformers does)" if name in AS_TRANSFORMERS else f"transformers {transformers.__version__} ({name})"
    assert manifest["decided_by"] == decided


@pytest.mark.parametrize("name", sorted(AS_TRANSFORMERS))
def test_the_name_rules_decide_these_architectures_as_transformers_does(name, tmp_path):
    """What lets their first conversion skip transformers' modeling import (seconds): every tensor's
    treatment and the skip list, with the output head tied or not, with --skip or not."""
    from nf4convert.source import open_source

    treatment = lambda d: {n: (t.quantize, t.transpose, t.expert, t.fused) for n, t in d.tensors.items()}  # noqa: E731
    for tied in (False, True):
        build(name, tie_word_embeddings=tied).save_pretrained(tmp_path / str(tied))
        src = open_source(tmp_path / str(tied))
        infos = [t.info for t in src.tensors]
        for skip in ((), ("*.0.*",)):
            options = dict(config=src.config, skip=skip, quantize_lm_head=False, experts="quantize", blocksize=64)
            ours, theirs = decide(infos, **options), ask_transformers(infos, **options)
            assert ours.decided_by == f"name rules ({name}: decided as transformers does)" and ours.as_transformers
            assert treatment(ours) == treatment(theirs)
            assert sorted(ours.skip_modules) == sorted(theirs.skip_modules)
        with_head = decide(infos, **{**options, "quantize_lm_head": True})  # the rules' skip list differs there: asked
        assert with_head.decided_by == f"transformers {transformers.__version__} ({name})"


@pytest.mark.parametrize("name", [n for n in MOE if n not in FUSED])
def test_moe_experts_are_quantized_per_expert_and_load_model_runs_them(name, sources, tmp_path):
    from nf4convert.experts import NF4Experts, nf4_weight
    from nf4convert.quantize import dequantize

    src = sources(name)
    plan = plan_conversion(src, options=Options(**OPTIONS))
    experts = [t for t in plan.tensors if ".experts." in t.name and t.name.endswith(".weight")]
    assert experts and all(t.quantize and t.expert for t in experts)
    routers = [t for t in plan.tensors if t.name.endswith((".gate.weight", ".router.weight")) and "experts" not in t.name]
    assert routers and not any(t.quantize for t in routers)
    assert {t.name.removesuffix(".weight") for t in routers} <= set(plan.skip_modules)
    assert plan.loaders[0].startswith("nf4convert.load_model")
    out = convert(src, tmp_path / "nf4", options=Options(**OPTIONS))

    model = float_numerics(load_model(out))
    packed = [m for m in model.modules() if isinstance(m, NF4Experts) and not m.fused]
    assert packed and all(part.packed.dtype == torch.uint8 for p in packed for part in p.parts)
    # the reference: bitsandbytes on load, with every fused expert parameter replaced by the
    # dequantization of our per-expert files, run by the same (eager) experts implementation
    reference = on_load(name, src)
    state_dict = load_state_dict(out)
    experts: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for key, where in map_keys(reference, list(state_dict)).items():
        if where.expert is not None:
            experts.setdefault(where.key, {})[where.expert, where.part] = dequantize(nf4_weight(state_dict[key]))
    for key, parts in experts.items():
        module_name, _, attr = key.rpartition(".")
        module = reference.get_submodule(module_name)
        fused = torch.stack([torch.cat([w for (e, _), w in sorted(parts.items()) if e == expert]) for expert in sorted({e for e, _ in parts})])
        setattr(module, attr, torch.nn.Parameter(fused, requires_grad=False))
        module.config._experts_implementation = "eager"
    x = inputs(name, reference)
    assert torch.equal(output(model, x), output(reference, x))


def test_stock_transformers_5_refuses_per_expert_nf4_so_keep_mode_exists(sources, tmp_path):
    out = convert(sources("MixtralForCausalLM"), tmp_path / "nf4", options=Options(**OPTIONS))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.MixtralForCausalLM.from_pretrained(out, device_map="cpu")


def test_an_architecture_transformers_quantizes_nothing_of_is_refused_saying_why(sources):
    with pytest.raises(QuantizationError, match=r"no tensor to quantize .*FalconLinear \(not nn.Linear\)"):
        plan_conversion(sources("FalconForCausalLM"))


def test_whisper_tied_proj_out_not_in_the_checkpoint_is_in_the_skip_list(sources):
    plan = plan_conversion(sources("WhisperForConditionalGeneration"))
    assert "proj_out" in plan.skip_modules
    assert "proj_out.weight" not in {t.name for t in plan.tensors}


def test_roberta_skip_list_names_the_tied_decoder_not_the_whole_head(sources):
    plan = plan_conversion(sources("RobertaForMaskedLM"))
    assert "lm_head.dense.weight" in {t.name for t in plan.quantized}
    assert "lm_head.decoder" in plan.skip_modules and "lm_head" not in plan.skip_modules


def test_t5_keeps_its_float32_modules(sources):
    plan = plan_conversion(sources("T5ForConditionalGeneration"))
    wo = [t for t in plan.tensors if t.name.endswith("DenseReluDense.wo.weight")]
    assert wo and all(not t.quantize and "_keep_in_fp32_modules" in t.reason for t in wo)


def test_without_transformers_the_name_rules_decide_and_say_so(sources):
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["transformers"] = None
from nf4convert.convert import plan_conversion
plan = plan_conversion(r"{sources('MixtralForCausalLM')}")
print(plan.decided_by)
print(sorted({{t.reason for t in plan.tensors if t.name.endswith("gate.weight")}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["name rules (transformers is not installed)", "['MoE router']"]


def test_load_model_reads_per_expert_bitsandbytes_folders_without_a_manifest(sources, tmp_path):
    """What transformers 4.x saves for an MoE model quantized on load: per-expert Linear4bit weights,
    plain safetensors metadata, no manifest (our default output, stripped of what is ours)."""
    from safetensors.torch import save_file

    ours = convert(sources("Qwen3MoeForCausalLM"), tmp_path / "nf4", options=Options(**OPTIONS))
    foreign = tmp_path / "saved-by-transformers-4"
    foreign.mkdir()
    (foreign / "config.json").write_bytes((ours / "config.json").read_bytes())
    save_file(load_all(ours), foreign / "model.safetensors", metadata={"format": "pt"})
    x = inputs("Qwen3MoeForCausalLM", build("Qwen3MoeForCausalLM"))
    assert torch.equal(output(float_numerics(load_model(foreign)), x), output(float_numerics(load_model(ours)), x))
    (foreign / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(LoadError, match="not an NF4 folder"):
        load_model(foreign)


def test_transformers_decisions_are_cached_under_a_hash_of_what_they_depend_on(sources, tmp_path, monkeypatch):
    from nf4convert.architecture import decide
    from nf4convert.source import open_source

    monkeypatch.setenv("NF4CONVERT_CACHE", str(tmp_path / "cache"))
    src = open_source(sources("MixtralForCausalLM"))
    infos = [t.info for t in src.tensors]
    first = decide(infos, config=src.config)
    cached = list((tmp_path / "cache" / "decisions").glob("*.json"))
    assert len(cached) == 1
    assert decide(infos, config=src.config) == first
    decide(infos, config=src.config, experts="keep")  # other options: another entry
    assert len(list((tmp_path / "cache" / "decisions").glob("*.json"))) == 2
    cached[0].write_text("{not json")  # a damaged entry is recomputed
    assert decide(infos, config=src.config) == first


def test_an_architecture_transformers_does_not_know_is_asked_once_and_no_model_type_or_llama_never(sources, tmp_path):
    """Its refusal is cached like an answer; a config.json without model_type is refused, and a Llama
    decided by the name rules, without importing transformers (seconds of every first conversion)."""
    import os
    import subprocess
    import sys

    src = sources("LlamaForCausalLM")
    env = {**os.environ, "NF4CONVERT_CACHE": str(tmp_path / "cache")}
    code = """
import json, sys
from nf4convert.architecture import decide
from nf4convert.source import open_source
src = open_source(sys.argv[1])
config = json.loads(sys.argv[2])
print(decide([t.info for t in src.tensors], config=config).decided_by, "transformers" in sys.modules)
"""
    run = lambda config: subprocess.run([sys.executable, "-c", code, str(src), json.dumps(config)], env=env, capture_output=True, text=True, check=True).stdout.split()
    unknown = {"model_type": "no-such-architecture"}
    first, again = run(unknown), run(unknown)  # decided_by ..., whether transformers was imported
    assert first[-1] == "True" and again[-1] == "False" and first[:-1] == again[:-1] and "'no-such-architecture'" in " ".join(first)
    assert run({"quantization_config": {"quant_method": "fp8"}})[-1] == "False"
    assert run(json.loads((src / "config.json").read_text())) == ["name", "rules", "(LlamaForCausalLM:", "decided", "as", "transformers", "does)", "False"]


def test_a_folder_missing_an_expert_is_a_load_error_naming_the_parameter(sources, tmp_path):
    from safetensors.torch import save_file


    ours = convert(sources("MixtralForCausalLM"), tmp_path / "nf4", options=Options(**OPTIONS))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((ours / "config.json").read_bytes())
    tensors = {k: v for k, v in load_all(ours).items() if ".experts.3.w1." not in k or "layers.0." not in k}
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: the checkpoint lacks some of its 4 experts"):
        load_model(broken)


def test_an_architecture_transformers_does_not_know_is_a_load_error(tmp_path):

    out = convert_plain_weight(tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    with pytest.raises(LoadError, match="cannot build the model: transformers .* does not know model_type 'no-such-model'"):
        load_model(out)


def test_a_layer_the_model_reads_outside_its_forward_stays_in_full_precision(tmp_path):
    """Mamba's mixer multiplies by ``dt_proj.weight`` itself: a 4-bit dt_proj fails in every loader,
    bitsandbytes quantizing on load too. Decided by tracing the model's forward on the meta device."""
    from nf4convert.experts import nf4_weight

    from .reference import reference_dequantize

    config = transformers.MambaConfig(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)
    torch.manual_seed(0)
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path / "src")
    plan = plan_conversion(tmp_path / "src", options=Options(**OPTIONS))
    read = {t.name: t.reason for t in plan.kept if "read outside" in t.reason}
    assert read == {f"backbone.layers.{i}.mixer.dt_proj.weight": "read outside its layer by MambaMixer (matmul of the weight): a 4-bit weight would fail there" for i in (0, 1)}
    assert {n.removesuffix(".weight") for n in read} <= set(plan.skip_modules)
    assert any(t.name.endswith("mixer.in_proj.weight") for t in plan.quantized)
    with pytest.raises(RuntimeError):
        x = {"input_ids": torch.tensor([[1, 5, 9, 42, 7]])}
        output(on_load("MambaForCausalLM", tmp_path / "src"), x)
    out = convert(plan, tmp_path / "nf4")
    ours = float_numerics(load_model(out))
    theirs = float_numerics(transformers.MambaForCausalLM.from_pretrained(out, device_map="cpu"))
    reference = transformers.MambaForCausalLM.from_pretrained(tmp_path / "src").eval()
    for key, weight in load_state_dict(out).items():
        if hasattr(weight, "quant_state"):
            q = nf4_weight(weight)
            reference.get_parameter(key).data = reference_dequantize(q.packed, q.absmax, q.shape, torch.float32, q.blocksize)
    assert torch.equal(output(ours, x), output(theirs, x))
    torch.testing.assert_close(output(ours, x), output(reference, x), rtol=0, atol=1e-5)


def test_a_forward_that_cannot_be_traced_on_the_meta_device_reads_nothing_outside(sources):
    from nf4convert.architecture import meta_model
    from nf4convert.directreads import read_outside

    config = json.loads((sources("T5ForConditionalGeneration") / "config.json").read_text())
    model = meta_model(config)
    layers = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert read_outside(model, layers) is None  # an encoder-decoder needs more than input_ids
    assert not hasattr(model.config, "_is_quantized")


def convert_plain_weight(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    (tmp_path / "src").mkdir()
    save_file({"layer.weight": torch.randn(64, 64)}, tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return convert(tmp_path / "src", tmp_path / "nf4")


@pytest.mark.parametrize("field, value, match", [("experts", "fuse", "invalid experts mode 'fuse'"), ("scales", "mse", "invalid scale method 'mse'")])
def test_bad_options_are_refused(field, value, match):
    with pytest.raises(QuantizationError, match=match):
        Options(**{field: value})
