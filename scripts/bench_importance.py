"""Benchmark `nf4convert importance` (a block at a time) against the whole-model pass it replaces.

One run of each, in child processes, on the same synthetic Llama-7B-shaped bf16 checkpoint with --layers
decoder layers (scripts/bench.py's; 16 layers = 6.9 GB) and a character-level tokenizer:
  - `nf4convert importance SRC OUT --text T --window W` (blocks offloaded to the checkpoint's own files);
  - the whole-model pass: transformers AutoModel.from_pretrained(SRC) in memory, forward hooks on every
    nn.Linear, the same windows in one batch (what `nf4convert importance` did before it streamed).
Prints wall seconds (imports included), peak RSS and their ratios, and the largest relative difference
between the two sets of vectors (the same operations on the same weights: expected 0).
With --source DIR, a real checkpoint with its own tokenizer instead (e.g. eval.py's SmolLM2 bf16 folder),
on --windows windows of scripts/data/apache-2.0.txt. With --awq, also `nf4convert importance --awq` (the
activation-aware scaling found and searched in the same pass), and then `convert --awq` beside a plain
`convert`, each with its wall time and peak RSS.
Usage: python scripts/bench_importance.py [--layers 16] [--windows 2] [--window 128] [--source DIR] [--awq] [--workdir bench-out]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import make_checkpoint, run_measured

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.architectures import save_tokenizer  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "apache-2.0.txt"

WHOLE = """
import sys, torch, transformers
from safetensors.torch import save_file
src, text, window, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = transformers.AutoModel.from_pretrained(src, dtype="auto").eval()
ids = transformers.AutoTokenizer.from_pretrained(src)(open(text).read(), return_tensors="pt").input_ids[0]
windows = ids[: len(ids) // window * window].view(-1, window)
vectors = {}
def hook(name):
    def record(_m, inputs, _o):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        vectors[name] = (x * x).mean(0).float()
    return record
for name, m in model.named_modules():
    if isinstance(m, torch.nn.Linear):
        m.register_forward_hook(hook(name + ".weight"))
with torch.no_grad():
    model(input_ids=windows)
save_file(vectors, out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--source", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out"))
    ap.add_argument("--awq", action="store_true", help="Also importance --awq, and convert with and without --awq.")
    args = ap.parse_args()
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calibration.txt"
    if args.source is not None:
        src = args.source.resolve()
        text.write_text(TEXT.read_text())
    else:
        src = work / f"llama7b-{args.layers}-layers"
        if not (src / "config.json").exists():
            make_checkpoint(src, args.layers)
        if not (src / "tokenizer.json").exists():
            save_tokenizer(src)
        text.write_text(TEXT.read_text()[: args.windows * args.window])  # one token per character
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    ours, theirs = work / "importance-streamed.safetensors", work / "importance-whole.safetensors"
    ours.unlink(missing_ok=True)
    streamed = run_measured(["nf4convert", "importance", str(src), str(ours), "--text", str(text), "--window", str(args.window), "-q"], work)
    whole_script = work / "whole_model_pass.py"
    whole_script.write_text(WHOLE)
    whole = run_measured([str(whole_script), str(src), str(text), str(args.window), str(theirs)], work)
    a, b = load_file(ours), load_file(theirs)
    a = {k.removeprefix("model."): v for k, v in a.items()}  # the bare model's names lack the task model's prefix
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    diff = max(float(((a[k] - b[k]).abs() / b[k].abs().clamp(min=1e-30)).max()) for k in a)
    gib = 2**30
    what = src.name if args.source else f"{args.layers} Llama-7B-shaped layers"
    with safe_open(ours, "pt") as f:
        windows = int(f.metadata()["windows"])
    print(f"checkpoint: {what}, {size / 1e9:.2f} GB; {windows} windows of {args.window} tokens; torch {torch.__version__}")
    print("| pass | wall s | peak RSS | vs whole model |")
    print("|---|---|---|---|")
    print(f"| nf4convert importance (a block at a time) | {streamed[0]:.1f} | {streamed[1] / gib:.2f} GiB | {streamed[0] / whole[0]:.2f}x time, {streamed[1] / whole[1]:.2f}x RSS |")
    print(f"| whole model in memory | {whole[0]:.1f} | {whole[1] / gib:.2f} GiB | 1.00x |")
    print(f"largest relative difference between the vectors: {diff:.3g} over {len(a)} weights")
    if args.awq:
        import shutil

        scaled = work / "importance-awq.safetensors"
        scaled.unlink(missing_ok=True)
        searched = run_measured(["nf4convert", "importance", str(src), str(scaled), "--text", str(text), "--window", str(args.window), "--awq", "-q"], work)
        print(f"| nf4convert importance --awq | {searched[0]:.1f} | {searched[1] / gib:.2f} GiB | {searched[0] / streamed[0]:.2f}x time, {searched[1] / streamed[1]:.2f}x RSS of importance |")
        rows = {}
        for name, extra in (("convert --scales search --importance", []), ("convert --awq --scales search --importance", ["--awq"])):
            out = work / "awq-convert-out"
            shutil.rmtree(out, ignore_errors=True)
            rows[name] = run_measured(["nf4convert", "convert", str(src), str(out), "--scales", "search", "--importance", str(scaled), *extra, "-q"], work)
            shutil.rmtree(out, ignore_errors=True)
        base = rows["convert --scales search --importance"]
        for name, (seconds, rss, *_) in rows.items():
            print(f"| {name} | {seconds:.1f} | {rss / gib:.2f} GiB | {seconds / base[0]:.2f}x time, {rss / base[1]:.2f}x RSS |")
    (work / "bench_importance.json").write_text(json.dumps({
        "checkpoint": what, "bytes": size, "windows": windows, "window": args.window, "max_rel_diff": diff,
        "streamed": {"seconds": streamed[0], "peak_rss": streamed[1]}, "whole": {"seconds": whole[0], "peak_rss": whole[1]},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
