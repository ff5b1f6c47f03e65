"""What happens to each tensor of a checkpoint, and the name rules that decide where transformers cannot.

:class:`Decision` records are what the plan, the dry run and the manifest carry. The name rules
(spec section 6.2) decide from names, shapes, dtypes and ``config.json`` alone. The skip list a
loader reads (``llm_int8_skip_modules``) must never cover a quantized module under any loader's
matching rule: :func:`settle` keeps such a tensor instead.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .constants import QUANTIZABLE_DTYPES
from .tensorfile import TensorInfo

RULES = "name rules"

#: Name rules (spec section 6): module names (last component) that are output heads.
OUTPUT_HEADS = ("lm_head", "embed_out")
#: Last components of embedding modules (besides any component containing "embed").
EMBEDDING_NAMES = ("wte", "wpe", "shared", "relative_attention_bias")
#: Last components of MoE routers (under a component naming an MoE block).
ROUTER_NAMES = ("gate", "router")
MOE_BLOCKS = ("mlp", "moe", "block_sparse_moe", "feed_forward", "ffn")
#: model_type -> last components of GPT-2 style ``Conv1D`` modules, whose weight is stored transposed.
CONV1D_MODULES = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
}
EXPERT_PATTERN = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class Decision:
    """What happens to one checkpoint tensor, and why.

    Attributes:
        quantize: quantized (else kept byte for byte).
        reason: why, in a few words.
        transpose: quantize the transpose (GPT-2 ``Conv1D``).
        expert: a per-expert MoE weight.
    """

    quantize: bool
    reason: str
    transpose: bool = False
    expert: bool = False


@dataclass
class Decisions:
    """The decision for every tensor of a checkpoint, and what a loader must be told.

    Attributes:
        decided_by: ``"transformers 5.x (ClassName)"`` or ``"name rules (why transformers did not)"``.
        tensors: checkpoint tensor name -> :class:`Decision`.
        skip_modules: ``llm_int8_skip_modules``: exact names of the modules a loader must leave
            unquantized, in the model's and the checkpoint's spelling; none of them covers a
            quantized module under any loader's matching rule (:func:`covers`).
    """

    decided_by: str
    tensors: dict[str, Decision]
    skip_modules: list[str] = field(default_factory=list)

    @property
    def experts_quantized(self) -> bool:
        return any(d.quantize and d.expert for d in self.tensors.values())


def covering_entry(module: str, entries: set[str]) -> str | None:
    """The ``llm_int8_skip_modules`` entry that keeps ``module`` unquantized in some loader, if any.

    The union of the loaders' rules, for entries that are plain module names: transformers 5 matches
    from the start up to a module boundary, or as a suffix; transformers 4.x matches equal names,
    ``entry + "."`` anywhere in the name, or the last component alone.
    """
    if module in entries:
        return module
    candidates = [module[i:] for i in range(1, len(module))]  # suffixes
    candidates.append(module.rpartition(".")[2])
    starts = [0] + [i + 1 for i, c in enumerate(module) if c == "."]
    candidates += [module[i:j] for i in starts for j in starts[1:] if j - 1 > i]  # `entry + "."` inside
    return next((c for c in candidates if c in entries), None)


def precheck(info: TensorInfo) -> Decision | None:
    """What no architecture changes: only 2-D floating-point ``*.weight`` tensors can be quantized."""
    if not info.name.endswith(".weight"):
        return Decision(False, "not a weight")
    if info.dtype not in QUANTIZABLE_DTYPES:
        return Decision(False, f"dtype {info.dtype}")
    if len(info.shape) != 2:
        return Decision(False, f"{len(info.shape)}-D")
    if info.numel == 0:
        return Decision(False, "empty")
    return None


def skip_reason(modules: tuple[str, ...], skip: tuple[str, ...]) -> str | None:
    return next((f"--skip {p}" for p in skip for m in modules if fnmatch.fnmatchcase(m, p)), None)


def rule_decision(info: TensorInfo, *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str) -> Decision:
    """Decide one tensor by the name rules of spec section 6."""
    pre = precheck(info)
    if pre is not None:
        return pre
    module = info.name[: -len(".weight")]
    parts = module.split(".")
    is_head = parts[-1] in OUTPUT_HEADS
    if not is_head and (parts[-1] in EMBEDDING_NAMES or any("embed" in p for p in parts)):
        return Decision(False, "embedding")
    if is_head and not quantize_lm_head:
        return Decision(False, "output head (--quantize-lm-head to quantize it)")
    if is_head and config.get("tie_word_embeddings"):
        return Decision(False, "output head tied to the input embedding")
    if parts[-1] in ROUTER_NAMES and len(parts) > 1 and parts[-2] in MOE_BLOCKS:
        return Decision(False, "MoE router")
    skipped = skip_reason((module,), skip)
    if skipped:
        return Decision(False, skipped)
    expert = EXPERT_PATTERN.search(f".{module}.") is not None
    if expert and experts == "keep":
        return Decision(False, "MoE expert (--experts keep)", expert=True)
    transpose = parts[-1] in CONV1D_MODULES.get(config.get("model_type", ""), ())
    reason = "MoE expert" if expert else "linear weight (Conv1D, transposed)" if transpose else "linear weight"
    return Decision(True, reason, transpose, expert)


def settle(tensors: dict[str, Decision], entries: Callable[[set[str]], set[str]], modules: Callable[[str], tuple[str, ...]]) -> list[str]:
    """The skip list ``entries`` gives for the quantized tensors, after keeping every quantized tensor
    that an entry would cover (a loader would build it unquantized): repeated until nothing changes,
    so the list never says more than the files hold."""
    while True:
        quantized = {n for n, d in tensors.items() if d.quantize}
        listed = entries(quantized)
        covered = {n: e for n in quantized for m in modules(n) if (e := covering_entry(m, listed))}
        if not covered:
            return sorted(listed)
        for n, e in covered.items():
            tensors[n] = Decision(False, f"a loader would read it unquantized (skip entry {e!r} covers it)", expert=tensors[n].expert)


def decide_by_rules(infos: list[TensorInfo], *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, why: str) -> Decisions:
    """Decide every tensor by the name rules; ``why`` says why transformers did not."""
    tensors = {i.name: rule_decision(i, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts) for i in infos}
    kept_2d = {i.name[: -len(".weight")] for i in infos if precheck(i) is None}

    def entries(quantized: set[str]) -> set[str]:
        listed = {m for m in kept_2d if f"{m}.weight" not in quantized}
        return listed if quantize_lm_head else listed | {"lm_head"}

    skip_modules = settle(tensors, entries, lambda name: (name[: -len(".weight")],))
    return Decisions(f"{RULES} ({why})", tensors, skip_modules)
