"""The model card (``README.md``) of an NF4 folder, rendered from its manifest: what was converted,
with which settings, how well, and which loaders read it, with a usage snippet for each.

The card fits the library whose files the folder holds: a sentence-transformers model (``modules.json``:
pooling and normalisation modules beside the transformer) gets ``library_name: sentence-transformers``,
``pipeline_tag: sentence-similarity`` and a ``SentenceTransformer`` snippet that gives its embeddings;
anything else is a transformers model, used through its own class. ``pipeline_tag``, ``license``,
``datasets`` and ``language`` come from the source's card (recorded in the manifest when converting);
``base_model`` is the source repo. The caller may override ``base_model`` and ``license``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .awq import scaling_summary
from .constants import VERIFY_REPORT
from .files import human
from .libraries import library_for

#: What stands for the repo id in a card rendered without one (``push`` puts the repo id in).
REPO_PLACEHOLDER = "REPO_ID"
#: Libraries whose files in a folder say how the model is used: marker file -> (library_name, default pipeline_tag).
def _config(root: Path) -> dict[str, Any]:
    return _config_of(root / "config.json")


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _settings(m: dict[str, Any], total: int) -> list[str]:
    """The settings table, for people."""
    options, summary = m.get("options", {}), m.get("summary", {})
    kept = m.get("tensors", {}).get("kept", [])
    has_head = any("output head" in t.get("reason", "") for t in kept) or options.get("quantize_lm_head")
    rows = [
        ("block size", options.get("blocksize") if not options.get("small_blocks") else f"{options.get('blocksize')}, and 32 for the modules matching {', '.join(options['small_blocks'][:4])}{' ...' if len(options['small_blocks']) > 4 else ''} (a size budget's choice)"),
        ("double quantization", _yes(options.get("double_quant"))),
        ("scales", "searched per block (lower error, same format)" if options.get("scales") == "search" else "absmax (bitsandbytes' rule)"),
        *([("activation-aware scaling", f"{scaling_summary(options['awq'])}, before quantizing; the float model's function is unchanged, the format is stock bitsandbytes; the scales are in `{options['awq']['file']}`")] if options.get("awq") else []),
        ("compute dtype", options.get("compute_dtype")),
        *([("output head quantized", _yes(options.get("quantize_lm_head")))] if has_head else []),
        ("kept in their dtype", f"{summary.get('tensors_kept')} tensors ({', '.join(options.get('skip') or []) or 'embeddings, norms, biases, routers, head'})"),
        ("parameters", f"{summary.get('parameters', 0):,} ({summary.get('quantized_parameters', 0):,} quantized)"),
        ("size", human(total)),
        ("bits per parameter", f"{summary.get('bits_per_parameter', 0):.2f} overall, {summary.get('quantized_bits_per_parameter', 0):.2f} for quantized weights"),
    ]
    return ["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _usage(m: dict[str, Any], root: Path, repo: str) -> list[str]:
    """The card's "Use" section: a snippet for each loader the manifest lists (the library's, :mod:`nf4convert.libraries`)."""
    config = _config(root)
    download = ["from huggingface_hub import snapshot_download"]
    own = ["With nf4convert's loader (`pip install 'nf4convert[load]'`):", "", "```python", *download,
           "from nf4convert.load import load_model", f'model = load_model(snapshot_download("{repo}"))', "```", ""]  # fmt: skip
    if not any(loader.startswith("nf4convert.load_model") for loader in m.get("loaders", [])):
        return ["Into your own module (`pip install 'nf4convert[load]'`): its `nn.Linear` layers become `Linear4bit`:", "",
                "```python", *download, "from nf4convert.load import load_state_dict, replace_linear",
                f'replace_linear(module, load_state_dict(snapshot_download("{repo}")))', "```", ""]  # fmt: skip
    return library_for(config or None, root).usage(m, config, repo, own)


def model_card(path: str | os.PathLike, *, repo_id: str | None = None, base_model: str | None = None, license: str | None = None) -> str:
    """Render the model card (``README.md``) of an NF4 folder from its manifest (and verify report, if saved).

    Args:
        repo_id: the repo it goes to: the title and the snippets' id (default: the folder name and
            :data:`REPO_PLACEHOLDER`).
        base_model: the repo it was converted from (default: the source repo the manifest records).
        license: its license (default: the source card's).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .pipeline import pipeline_manifest
    from .read import open_checkpoint

    if (pipeline := pipeline_manifest(Path(path))) is not None:
        return _pipeline_card(Path(path), pipeline, repo_id=repo_id, base_model=base_model, license=license)
    ckpt = open_checkpoint(path)
    m = ckpt.manifest
    source = m.get("source", {})
    base = base_model or source.get("repo_id")
    lib = library_for(_config(ckpt.root) or None, ckpt.root)
    library_name, default_task = lib.name, lib.default_task
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        library_name=library_name,
        pipeline_tag=source.get("pipeline_tag") or default_task,
        license=license or source.get("license"),
        datasets=source.get("datasets"),
        language=source.get("language"),
        tags=["nf4", "4-bit", "bitsandbytes", "nf4convert", *(["sentence-transformers"] if library_name == "sentence-transformers" else [])],
    )
    total = sum(f["size"] for f in m.get("files", []))
    of = f"[{base}](https://huggingface.co/{base})" if base else f"`{source.get('name')}`"
    revision = f"; source revision `{source['revision']}`" if source.get("revision") else ""
    lines = [
        f"# {repo_id or ckpt.root.resolve().name}",
        "",
        f"NF4 (4-bit NormalFloat, bitsandbytes) weights of {of}, converted with nf4convert {m.get('tool', {}).get('version')} "
        f"(format v{m.get('format_version')}; `nf4convert.json` holds the hashes and provenance{revision}).",
        "",
        *_settings(m, total),
    ]
    report_path = ckpt.root / VERIFY_REPORT
    s = json.loads(report_path.read_text()).get("summary", {}) if report_path.is_file() else {}
    if s.get("rel_rmse"):
        sqnr = f", SQNR mean {s['sqnr_db']['mean']:.1f} dB (min {s['sqnr_db']['min']:.1f} dB)" if s.get("sqnr_db") else ""
        lines += [f"Quantization error against the source (`nf4convert verify --source`): relative RMSE mean {s['rel_rmse']['mean']:.4f} "
                  f"(max {s['rel_rmse']['max']:.4f}){sqnr}.", ""]  # fmt: skip
    lines += [f"Loads in: {'; '.join(m['loaders'])}.", ""] if m.get("loaders") else []
    lines += ["## Use", "", *_usage(m, ckpt.root, repo_id or REPO_PLACEHOLDER)]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _pipeline_card(root: Path, m: dict[str, Any], *, repo_id: str | None, base_model: str | None, license: str | None) -> str:
    """The card of a diffusers pipeline output: its components (each 4-bit one's settings), and the two
    ways to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    from .read import open_checkpoint

    source = m.get("source", {})
    base = base_model or source.get("repo_id")
    repo = repo_id or REPO_PLACEHOLDER
    index = _config_of(root / "model_index.json")
    data = ModelCardData(
        base_model=base, base_model_relation="quantized" if base else None, library_name="diffusers",
        pipeline_tag=source.get("pipeline_tag"), license=license or source.get("license"), tags=["nf4", "4-bit", "bitsandbytes", "nf4convert"],
    )  # fmt: skip
    rows = ["| component | class | weights |", "|---|---|---|"]
    dtype = "bfloat16"
    for name, c in m["pipeline"].items():
        if c.get("quantized"):
            part = open_checkpoint(root / name).manifest
            dtype = part.get("options", {}).get("compute_dtype") or dtype
            summary = part.get("summary", {})
            weights = f"NF4: {summary.get('tensors_quantized')} weights, {summary.get('quantized_bits_per_parameter', 0):.2f} bits per quantized parameter"
        else:
            weights = "as published (copied)"
        rows.append(f"| `{name}` | {c.get('library')} `{c.get('class')}` | {weights} |")
    of = f"[{base}](https://huggingface.co/{base})" if base else f"`{source.get('name')}`"
    total = sum(f["size"] for f in m.get("files", []))
    lines = [
        f"# {repo_id or root.resolve().name}", "",
        f"The {index.get('_class_name', 'diffusers')} pipeline of {of} with its large components in NF4 (4-bit NormalFloat, bitsandbytes), "
        f"converted with nf4convert on the CPU ({human(total)}; `nf4convert.json` holds every file's hash).", "",
        *rows, "",
        "## Use", "",
        "With diffusers and bitsandbytes, on a GPU (diffusers' bitsandbytes loader refuses a machine without one):", "",
        "```python", "import torch", "from diffusers import DiffusionPipeline",
        f'pipe = DiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.{dtype})', "```", "",
        "On any machine, the CPU included, with nf4convert's loader (diffusers' own loading, no GPU needed):", "",
        "```python", "from huggingface_hub import snapshot_download", "from nf4convert.load import load_model",
        f'pipe = load_model(snapshot_download("{repo}"))', "```", "",
    ]  # fmt: skip
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _config_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}

