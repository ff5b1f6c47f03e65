"""The default MoE output (experts quantized per expert) in stock transformers 4.57, the last 4.x.

Run by scripts/check_transformers4.sh in two environments:
  python check_transformers4.py make WORKDIR      (transformers 4.x) tiny MoE models saved by 4.x (float32)
  python check_transformers4.py convert WORKDIR   (transformers 5, the project's .venv) nf4convert convert, default options
  python check_transformers4.py check WORKDIR     (transformers 4.x) from_pretrained of our output: its logits and
                                                  every tensor equal bitsandbytes quantizing the source on load
                                                  (float32, the same llm_int8_skip_modules: routers and head kept)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

MODELS = {
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4)),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=96, shared_expert_intermediate_size=96)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=96, head_dim=16)),
}
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 100]])


def bnb_config(skip: list[str]):
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )


def logits(model) -> torch.Tensor:
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        return model.eval()(IDS).logits


def make(work: Path) -> None:
    import transformers

    for name, (config_name, extra) in MODELS.items():
        torch.manual_seed(0)
        model = getattr(transformers, name)(getattr(transformers, config_name)(**COMMON, **extra))
        model.save_pretrained(work / name / "src")


def convert(work: Path) -> None:
    from nf4convert import Options, convert

    for name in MODELS:
        out = convert(work / name / "src", work / name / "nf4", options=Options(double_quant=False, compute_dtype="float32"), force=True)
        print(f"{name}: converted to {out}")


def check(work: Path) -> int:
    import json

    import transformers
    from safetensors.torch import load_file

    failed = 0
    for name in MODELS:
        cls = getattr(transformers, name)
        skip = json.loads((work / name / "nf4" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
        peer = cls.from_pretrained(work / name / "src", quantization_config=bnb_config(skip), torch_dtype=torch.float32, device_map="cpu")
        peer.save_pretrained(work / name / "peer")  # before any forward
        model = cls.from_pretrained(work / name / "nf4", torch_dtype=torch.float32, device_map="cpu")
        same_logits = torch.equal(logits(model), logits(peer))
        ours, theirs = load_file(work / name / "nf4" / "model.safetensors"), load_file(work / name / "peer" / "model.safetensors")
        same_tensors = set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
        experts = sum(1 for k in ours if ".experts." in k and k.endswith(".weight.absmax"))
        print(f"{name}: transformers {transformers.__version__}: {experts} expert weights 4-bit; "
              f"logits equal bitsandbytes on load: {same_logits}; every tensor equal: {same_tensors}")
        failed += not (same_logits and same_tensors and experts)
    return failed


if __name__ == "__main__":
    step, work = sys.argv[1], Path(sys.argv[2])
    sys.exit({"make": make, "convert": convert, "check": check}[step](work) or 0)
