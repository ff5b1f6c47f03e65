"""The model card (``README.md``) of an NF4 folder, rendered from its manifest: what was converted,
with which settings, how well, and which loaders read it (with a usage snippet for each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: The report ``nf4convert verify --save`` writes into the folder; the card quotes its summary.
VERIFY_REPORT = "nf4convert-verify.json"


def model_card(path: str | os.PathLike) -> str:
    """Render the model card (``README.md``) of an NF4 folder from its manifest (and verify report, if saved)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .read import open_checkpoint

    ckpt = open_checkpoint(path)
    m = ckpt.manifest
    source, options, summary = m.get("source", {}), m.get("options", {}), m.get("summary", {})
    base = source.get("repo_id")
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        library_name="transformers",
        license=source.get("license"),
        tags=["nf4", "4-bit", "bitsandbytes", "nf4convert"],
    )
    total = sum(f["size"] for f in m.get("files", []))
    name = Path(path).resolve().name
    lines = [
        f"# {name}",
        "",
        f"NF4 (4-bit NormalFloat, bitsandbytes) weights of [{base}](https://huggingface.co/{base})," if base else f"NF4 (4-bit NormalFloat, bitsandbytes) weights of `{source.get('name')}`,",
        f"converted with nf4convert {m.get('tool', {}).get('version')} (format v{m.get('format_version')}, see `nf4convert.json` for hashes and provenance"
        + (f"; source revision `{source['revision']}`)." if source.get("revision") else ")."),
        "",
        "| setting | value |",
        "|---|---|",
        f"| block size | {options.get('blocksize')} |",
        f"| double quantization | {options.get('double_quant')} |",
        f"| compute dtype | {options.get('compute_dtype')} |",
        f"| output head quantized | {options.get('quantize_lm_head')} |",
        f"| kept in original dtype | {summary.get('tensors_kept')} tensors ({', '.join(options.get('skip') or []) or 'embeddings, norms, biases, output head'}) |",
        f"| parameters | {summary.get('parameters', 0):,} ({summary.get('quantized_parameters', 0):,} quantized) |",
        f"| size | {total / 1e9:.2f} GB |",
        f"| bits per parameter | {summary.get('bits_per_parameter')} overall, {summary.get('quantized_bits_per_parameter')} for quantized weights |",
        "",
    ]
    report_path = Path(path) / VERIFY_REPORT
    if report_path.is_file():
        s = json.loads(report_path.read_text()).get("summary", {})
        if s.get("rel_rmse"):
            sqnr = f", SQNR mean {s['sqnr_db']['mean']:.2f} dB (min {s['sqnr_db']['min']:.2f} dB)" if s.get("sqnr_db") else ""
            lines += [
                "Quantization error against the source (`nf4convert verify --source`): relative RMSE mean "
                f"{s['rel_rmse']['mean']:.4f} (max {s['rel_rmse']['max']:.4f}){sqnr}.",
                "",
            ]
    repo = "REPO_ID"
    config = json.loads((ckpt.root / "config.json").read_text()) if (ckpt.root / "config.json").is_file() else {}
    cls = (config.get("architectures") or ["AutoModel"])[0]
    experts = [t for t in m.get("tensors", {}).get("quantized", []) if t.get("expert")]
    transformers_use = [
        "```python",
        f"from transformers import {cls}",
        f'model = {cls}.from_pretrained("{repo}", device_map="auto")',
        "```",
        "",
    ]
    own_use = [
        "With nf4convert's loader (`pip install 'nf4convert[load]'`):",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from nf4convert.load import load_model",
        f'model = load_model(snapshot_download("{repo}"), device="cuda")',
        "```",
        "",
    ]
    lines += [f"Loads in: {'; '.join(m['loaders'])}.", ""] if m.get("loaders") else []
    if not any(loader.startswith("nf4convert.load_model") for loader in m.get("loaders", [])):
        lines += [
            "## Use",
            "",
            "Into your own module (`pip install 'nf4convert[load]'`): its `nn.Linear` layers become `Linear4bit`:",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            "from nf4convert.load import load_state_dict, replace_linear",
            f'replace_linear(module, load_state_dict(snapshot_download("{repo}")))',
            "```",
            "",
        ]
    elif any(len(t["shape"]) == 3 for t in experts):
        parametrize = [loader for loader in m["loaders"] if "parametrize" in loader]
        lines += [
            "## Use",
            "",
            "The MoE experts are 4-bit, stored fused as 3-D tensors (the layout `bitsandbytes.nn.parametrize` writes).",
            "bitsandbytes' transformers integration does not quantize such parameters; nf4convert's loader runs them:",
            "",
            *own_use,
            *([f"Without nf4convert: {parametrize[0]}, given the companions stored beside it.", ""] if parametrize else []),
        ]
    elif experts:
        lines += [
            "## Use",
            "",
            "The MoE experts are 4-bit, stored per expert. transformers 5 fuses experts into 3-D parameters",
            "that bitsandbytes does not quantize, so it cannot load them; nf4convert's loader runs them on",
            "transformers 5:",
            "",
            *own_use,
            "transformers 4.x (experts are per-expert `Linear4bit` there) loads the folder as is:",
            "",
            *transformers_use,
        ]
    else:
        lines += [
            "## Use",
            "",
            "With transformers and bitsandbytes (no extra step: the layout is the one `save_pretrained` writes):",
            "",
            *transformers_use,
            *own_use,
        ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
