"""Benchmark `nf4convert dequantize` of a Forge/ComfyUI single NF4 file against bitsandbytes.

The file: a Flux-sized stack of linear weights (bf16, random), converted by `nf4convert convert` into
one shard with --no-double-quant: the Forge/ComfyUI layout, whose 4-bit tensors are byte-identical to
what bitsandbytes' Linear4bit state dict holds (tests/test_single_file.py), beside kept bf16 tensors.

One run, two child processes on the same file, page cache warm:
  - nf4convert dequantize FILE OUT (streams a chunk of blocks at a time into one output file);
  - what a user writes with bitsandbytes: safetensors.load_file, Params4bit.from_prequantized and
    bitsandbytes.functional.dequantize_4bit per weight, save_file of the whole dict.
Prints wall seconds and peak RSS of each and their ratios, and checks that both outputs hold the same
tensors, bit for bit (two independent decodes).
Usage: python scripts/bench_single_file.py [--layers 16] [--workdir bench-single-file]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bench import run_measured

PEER = """
import sys, torch, bitsandbytes as bnb
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:3]
sd = load_file(src)
weights = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in sd if k.endswith(".quant_state.bitsandbytes__nf4")]
out = {k: v for k, v in sd.items() if not any(k == w or k.startswith(w + ".") for w in weights)}
for w in weights:
    stats = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
    p = bnb.nn.Params4bit.from_prequantized(sd[w], stats, requires_grad=False, device="cpu")
    out[w] = bnb.functional.dequantize_4bit(p.data, p.quant_state)
save_file(out, dst)
"""

HIDDEN, MLP = 3072, 12288


def make_file(workdir: Path, layers: int) -> Path:
    """The Forge-layout NF4 file of ``layers`` MLP pairs (``[MLP, HIDDEN]`` and ``[HIDDEN, MLP]``) and norms."""
    single = workdir / "flux-like-bnb-nf4.safetensors"
    if single.exists():
        return single
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for name, shape in (("mlp.0", (MLP, HIDDEN)), ("mlp.2", (HIDDEN, MLP))):
            tensors[f"model.diffusion_model.blocks.{i}.{name}.weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        tensors[f"model.diffusion_model.blocks.{i}.norm.scale"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    source = workdir / "flux-like.safetensors"
    save_file(tensors, source)
    del tensors
    converted = workdir / "converted"
    shutil.rmtree(converted, ignore_errors=True)
    run_measured(["nf4convert", "convert", str(source), str(converted), "--no-double-quant", "--max-shard-size", "1TB", "--quiet"], workdir)
    (converted / "model.safetensors").rename(single)
    shutil.rmtree(converted)
    source.unlink()
    return single


def same_tensors(a: Path, b: Path) -> bool:
    with safe_open(a, "pt") as f, safe_open(b, "pt") as g:
        return set(f.keys()) == set(g.keys()) and all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=Path("bench-single-file"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    single = make_file(args.workdir, args.layers)
    ours_out, peer_out = args.workdir / "ours", args.workdir / "peer.safetensors"
    shutil.rmtree(ours_out, ignore_errors=True)
    single.read_bytes()  # warm: both read it from the page cache
    ours = run_measured(["nf4convert", "dequantize", str(single), str(ours_out), "--quiet"], args.workdir)
    (args.workdir / "peer.py").write_text(PEER)
    peer = run_measured([str(args.workdir / "peer.py"), str(single), str(peer_out)], args.workdir)
    equal = same_tensors(ours_out / single.name, peer_out)
    gb = (ours_out / single.name).stat().st_size / 1e9
    print(f"{single.name}: {single.stat().st_size / 1e9:.2f} GB NF4 -> {gb:.2f} GB bf16, {args.layers * 2} 4-bit weights; outputs equal: {equal}")
    print("| dequantize | seconds | peak RSS |")
    print("|---|---|---|")
    print(f"| nf4convert dequantize | {ours.seconds:.2f} | {ours.peak_rss / 2**20:.0f} MiB |")
    print(f"| bitsandbytes (load_file, from_prequantized, dequantize_4bit, save_file) | {peer.seconds:.2f} | {peer.peak_rss / 2**20:.0f} MiB |")
    print(f"| ratio (ours / bitsandbytes) | {ours.seconds / peer.seconds:.2f}x | {ours.peak_rss / peer.peak_rss:.2f}x |")
    if not equal:
        sys.exit("the two decodes differ")


if __name__ == "__main__":
    main()
