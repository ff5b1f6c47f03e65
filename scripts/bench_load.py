"""Benchmark loading: nf4convert.load_model vs transformers on the same NF4 folder vs quantize-on-load.

One run, three child processes on the same synthetic Llama-shaped checkpoint (scripts/bench.py):
  - nf4convert.load_model(NF4 folder);
  - transformers AutoModelForCausalLM.from_pretrained(NF4 folder) (bitsandbytes pre-quantized load);
  - transformers from_pretrained(bf16 source, BitsAndBytesConfig NF4): quantize on load, the usual way.
Prints load seconds (timed inside the child, imports excluded), load plus a first forward pass (which
touches every weight, so lazily mapped pages count), peak RSS and (on a GPU) peak GPU memory, with ratios.
With --batches, tokens/s of the dense model through load_model vs the bf16 source at those batch sizes.

Then an MoE row: a small gpt-oss-shaped model (fused 3-D experts, random bf16 weights) converted with the
defaults, its tokens/s through nf4convert.load_model (4-bit experts, dequantized per routed expert) vs the
bf16 model in transformers (its default experts implementation, and the eager one that load_model's
experts run), batch 1, prefill of --moe-tokens tokens.
Usage: python scripts/bench_load.py [--layers 10] [--moe-layers 4] [--workdir bench-out] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench import make_checkpoint, run_measured

CHILD = """
import json, sys, time, torch
mode, folder, device = sys.argv[1:4]
import bitsandbytes, transformers, nf4convert.load
transformers.LlamaForCausalLM  # resolve transformers' lazy imports before the clock starts
start = time.perf_counter()
if mode == "nf4convert":
    model = nf4convert.load.load_model(folder, device=device)
elif mode == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map=device)
else:
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, device_map=device)
loaded = time.perf_counter() - start
with torch.no_grad():  # the first forward touches every weight: lazily mapped pages load here
    model(torch.arange(1, 9).unsqueeze(0).to(device))
gpu = {"peak_gpu": torch.cuda.max_memory_allocated()} if device != "cpu" else {}
print(json.dumps({"seconds": loaded, "with_first_forward": time.perf_counter() - start, **gpu}))
"""

THROUGHPUT_CHILD = """
import json, sys, time, torch
mode, folder, device, tokens, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
import transformers, nf4convert.load
if mode == "nf4convert":
    model = nf4convert.load.load_model(folder, device=device, compute_dtype=torch.bfloat16)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    if mode == "bf16-eager":  # the experts implementation load_model's 4-bit experts run
        model.config._experts_implementation = "eager"
ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0)).to(device)
with torch.no_grad():
    model(ids)  # warm up
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        model(ids)
    if device != "cpu":
        torch.cuda.synchronize()
print(json.dumps({"tokens_per_s": 3 * batch * tokens / (time.perf_counter() - start)}))
"""


def make_moe(path: Path, layers: int) -> None:
    """A gpt-oss-shaped MoE with random bf16 weights: 16 experts of 1024 x 1024, top-4, fused in the checkpoint."""
    import torch
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, num_local_experts=16, num_experts_per_tok=4, layer_types=["full_attention"] * layers,
    )
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def throughput(work: Path, src: Path, nf4: Path, *, tokens: int, batch: int, device: str, modes: tuple[str, ...]) -> dict:
    """tokens/s of a prefill of ``batch`` x ``tokens`` through each of ``modes`` (nf4convert: load_model of
    ``nf4``; bf16, bf16-eager: transformers on ``src``), one child process each."""
    script = work / "throughput_child.py"
    script.write_text(THROUGHPUT_CHILD)
    out = {}
    for mode in modes:
        folder = nf4 if mode == "nf4convert" else src
        print(f"{src.name} {mode}, batch {batch} ...", file=sys.stderr)
        _, rss, text, _ = run_measured([str(script), mode, str(folder), device, str(tokens), str(batch)], work)
        out[mode] = {**json.loads(text.strip().splitlines()[-1]), "peak_rss": rss, "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}
    return out


def moe_row(work: Path, layers: int, tokens: int, device: str) -> dict:
    src, nf4 = work / f"moe-src-{layers}l", work / f"moe-nf4-{layers}l"
    if not (src / "config.json").exists():
        make_moe(src, layers)
    if not (nf4 / "nf4convert.json").exists():
        subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(src), str(nf4), "--quiet", "--force"], check=True)
    return throughput(work, src, nf4, tokens=tokens, batch=1, device=device, modes=("nf4convert", "bf16", "bf16-eager"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--moe-layers", type=int, default=4)
    ap.add_argument("--moe-tokens", type=int, default=128)
    ap.add_argument("--batches", default="", help="Also tokens/s of the dense model at these batch sizes (e.g. 1,16), 128 tokens each.")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(exist_ok=True)
    src, nf4 = work / f"load-src-{args.layers}l", work / f"load-nf4-{args.layers}l"
    if not (src / "config.json").exists():
        shutil.rmtree(src, ignore_errors=True)
        make_checkpoint(src, args.layers)
    if not (nf4 / "nf4convert.json").exists():
        subprocess.run([sys.executable, "-m", "nf4convert", "convert", str(src), str(nf4), "--quiet", "--force"], check=True)
    script = work / "load_child.py"
    script.write_text(CHILD)
    results = {}
    for mode, folder in [("nf4convert", nf4), ("transformers", nf4), ("quantize-on-load", src)]:
        print(f"{mode} ...", file=sys.stderr)
        _, rss, out, _ = run_measured([str(script), mode, str(folder), args.device], work)
        results[mode] = {**json.loads(out.strip().splitlines()[-1]), "peak_rss": rss}
    moe = moe_row(work, args.moe_layers, args.moe_tokens, args.device)
    batches = [int(b) for b in args.batches.split(",") if b]
    dense = {b: throughput(work, src, nf4, tokens=128, batch=b, device=args.device, modes=("nf4convert", "bf16")) for b in batches}
    (work / "bench_load.json").write_text(json.dumps({**results, "moe": moe, "dense_tokens_per_s": dense}, indent=2))
    base = results["nf4convert"]
    print("| load | load s | vs nf4convert | load + first forward s | vs nf4convert | peak RSS | peak GPU memory |\n|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        gpu = f"{r['peak_gpu'] / 2**20:,.0f} MiB" if "peak_gpu" in r else "-"
        print(
            f"| {mode} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.1f}x | {r['with_first_forward']:.2f} | "
            f"{r['with_first_forward'] / base['with_first_forward']:.1f}x | {r['peak_rss'] / 2**20:,.0f} MiB | {gpu} |"
        )
    for b, rows in dense.items():
        print(f"\n| dense, batch {b}, 128 tokens | tokens/s | vs bf16 |\n|---|---|---|")
        for mode, r in rows.items():
            print(f"| {mode} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / rows['bf16']['tokens_per_s']:.2f}x |")
    print(f"\n| MoE ({args.moe_layers} layers, 16 experts, top-4), {args.moe_tokens} tokens | tokens/s | vs bf16 | weights | peak RSS |\n|---|---|---|---|---|")
    for mode, r in moe.items():
        print(f"| {mode} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / moe['bf16']['tokens_per_s']:.2f}x | {r['bytes'] / 2**20:,.0f} MiB | {r['peak_rss'] / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
