"""Compare sentence embeddings of an NF4 folder with its float32 source (and with bitsandbytes quantizing on load).

Mean-pooled, L2-normalized embeddings (the all-MiniLM-L6-v2 recipe) over the sentences in
scripts/data/sentences.txt; prints cosine similarity to float32 (mean and min) of the NF4 folder
loaded by transformers' from_pretrained and by nf4convert.load_model, and of bitsandbytes
quantizing the source on load.
Usage: python scripts/embeddings.py SOURCE NF4_FOLDER [--json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BitsAndBytesConfig

from nf4convert.load import float_numerics, load_model, quiet_bitsandbytes

quiet_bitsandbytes()

SENTENCES = (Path(__file__).resolve().parent / "data" / "sentences.txt").read_text().splitlines()


def embed(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    float_numerics(model)  # the same float32 numerics on every CPU
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main(source: str, nf4: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(source)
    reference = embed(AutoModel.from_pretrained(source), tokenizer)
    ours = embed(AutoModel.from_pretrained(nf4, device_map="cpu"), tokenizer)
    loaded = embed(load_model(nf4), tokenizer)
    config = json.loads((Path(nf4) / "config.json").read_text())["quantization_config"]
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=config["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=getattr(torch, config["bnb_4bit_compute_dtype"]),
    )
    peer = embed(AutoModel.from_pretrained(source, quantization_config=bnb, device_map="cpu"), tokenizer)
    cos = (ours * reference).sum(-1)
    cos_peer = (peer * reference).sum(-1)
    cos_loaded = (loaded * reference).sum(-1)
    return {
        "sentences": len(SENTENCES),
        "nf4convert": {"mean": cos.mean().item(), "min": cos.min().item()},
        "nf4convert_load_model": {"mean": cos_loaded.mean().item(), "min": cos_loaded.min().item()},
        "bitsandbytes_on_load": {"mean": cos_peer.mean().item(), "min": cos_peer.min().item()},
        "max_abs_diff_vs_bitsandbytes": (ours - peer).abs().max().item(),
        "max_abs_diff_load_model_vs_from_pretrained": (loaded - ours).abs().max().item(),
    }


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2])
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        print(f"cosine to float32 over {result['sentences']} sentences:")
        labels = {"nf4convert": "NF4 from_pretrained", "nf4convert_load_model": "NF4 load_model", "bitsandbytes_on_load": "bitsandbytes on load"}
        for name, label in labels.items():
            print(f"  {label:<22} mean {result[name]['mean']:.4f}  min {result[name]['min']:.4f}")
        print(f"  max |nf4convert - bitsandbytes| embedding difference: {result['max_abs_diff_vs_bitsandbytes']:.2e}")
        print(f"  max |load_model - from_pretrained| embedding difference: {result['max_abs_diff_load_model_vs_from_pretrained']:.2e}")
