"""Benchmark loading: nf4convert.load_model vs transformers on the same NF4 folder vs quantize-on-load.

One run, three child processes on the same synthetic Llama-shaped checkpoint (scripts/bench.py):
  - nf4convert.load_model(NF4 folder);
  - transformers AutoModelForCausalLM.from_pretrained(NF4 folder) (bitsandbytes pre-quantized load);
  - transformers from_pretrained(bf16 source, BitsAndBytesConfig NF4): quantize on load, the usual way.
Prints load seconds (timed inside the child, imports excluded), load plus a first forward pass (which
touches every weight, so lazily mapped pages count), and peak RSS, with ratios.
Usage: python scripts/bench_load.py [--layers 10] [--workdir bench-out] [--device cpu]
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
print(json.dumps({"seconds": loaded, "with_first_forward": time.perf_counter() - start}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--device", default="cpu")
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
        _, rss, out = run_measured([str(script), mode, str(folder), args.device], work)
        results[mode] = {**json.loads(out.strip().splitlines()[-1]), "peak_rss": rss}
    (work / "bench_load.json").write_text(json.dumps(results, indent=2))
    base = results["nf4convert"]
    print("| load | load s | vs nf4convert | load + first forward s | vs nf4convert | peak RSS |\n|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.1f}x | {r['with_first_forward']:.2f} | "
            f"{r['with_first_forward'] / base['with_first_forward']:.1f}x | {r['peak_rss'] / 2**20:,.0f} MiB |"
        )


if __name__ == "__main__":
    main()
