"""Print the architecture matrix: for each tiny model of tests/architectures.py and each experts mode, what
decided, the quantized and kept parameters, and output size / source size (bf16 source, double quant).

Sizes come from the plan (no conversion is run); `pytest tests/test_architectures.py` checks the loads.
Usage: python scripts/arch_matrix.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nf4convert import Options, plan_conversion  # noqa: E402
from tests.architectures import ARCHITECTURES, MOE, build  # noqa: E402


def main() -> None:
    print("| architecture | kind | experts | quantized params | kept params | output / source | decided by |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, _, _) in ARCHITECTURES.items():
            src = Path(tmp) / name
            build(name, dtype=torch.bfloat16).save_pretrained(src)
            for mode in ("quantize", "keep") if name in MOE else ("quantize",):
                try:
                    plan = plan_conversion(src, options=Options(experts=mode))
                except Exception as e:  # an architecture transformers quantizes nothing of
                    print(f"| {name} | {kind} | {mode} | 0 | all | - | refused: {str(e).split('(', 1)[-1].rstrip(')')} |")
                    continue
                q = sum(t.source.info.numel for t in plan.quantized)
                k = sum(t.source.info.numel for t in plan.kept)
                ratio = plan.output_bytes / plan.source.nbytes
                decided = plan.decided_by.split(" (")[0] if plan.decided_by.startswith("transformers") else plan.decided_by
                print(f"| {name} | {kind} | {mode if name in MOE else '-'} | {q:,} | {k:,} | {ratio:.3f} | {decided} |")


if __name__ == "__main__":
    main()
