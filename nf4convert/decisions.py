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
from typing import Any
from dataclasses import dataclass, field

from .constants import QUANTIZABLE_DTYPES
from .errors import SourceError
from .tensorfile import TensorInfo

RULES = "name rules"
#: Said in ``decided_by`` where the name rules decide an architecture of :data:`AS_TRANSFORMERS` for transformers.
AS_TRANSFORMERS_NOTE = "decided as transformers does"
#: transformers model classes (``architectures`` in ``config.json``) whose checkpoints the name rules decide
#: exactly as transformers does: every tensor and the skip list, tied output head or not, with ``--skip`` or
#: not, though not with ``--quantize-lm-head`` (tests/test_architectures.py checks each against the transformers
#: installed). These are decided without importing transformers' modeling code, which costs seconds (issue 25).
#: Dense decoders of ``nn.Linear`` or ``Conv1D`` only: MoE experts, whose key mapping transformers changes
#: between versions, and FalconForCausalLM (FalconLinear is not ``nn.Linear``) are always asked.
AS_TRANSFORMERS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM",
    "PhiForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "OPTForCausalLM", "BloomForCausalLM", "GPTBigCodeForCausalLM",
    "StableLmForCausalLM", "GemmaForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM", "GraniteForCausalLM", "SmolLM3ForCausalLM",
    "Starcoder2ForCausalLM",
})  # fmt: skip

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
#: Name rules: a 3-D tensor is fused MoE experts ``[experts, rows, columns]`` in a module of one of these names.
FUSED_EXPERT_MODULES = ("experts", "block_sparse_moe")
#: ``config.json`` fields that give the number of routed experts.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Decision:
    """What happens to one checkpoint tensor, and why.

    Attributes:
        quantize: quantized (else kept byte for byte).
        reason: why, in a few words.
        transpose: quantize the transpose (GPT-2 ``Conv1D``; of fused experts, each expert's slice).
        expert: an MoE expert weight (per expert, or fused).
        fused: fused MoE experts, a 3-D ``[experts, rows, columns]`` tensor (spec section 2.7).
        dtype: for a kept tensor the library stores in another dtype (diffusers' float32 modules), that
            safetensors dtype; else ``None`` (kept as it is).
    """

    quantize: bool
    reason: str
    transpose: bool = False
    expert: bool = False
    fused: bool = False
    dtype: str | None = None


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
    #: fused experts tensor -> the per-expert weights it is cut into, ``[name, expert, start, stop,
    #: transposed]`` each (:class:`~nf4convert.source.Split`), where transformers loads them per expert
    splits: dict[str, list[list[Any]]] = field(default_factory=dict)

    @property
    def as_transformers(self) -> bool:
        """Decided by transformers, or by the name rules where they decide as it does: its loader reads the output."""
        return self.decided_by.startswith("transformers") or AS_TRANSFORMERS_NOTE in self.decided_by

    @property
    def experts_quantized(self) -> bool:
        """Per-expert 4-bit weights that transformers 5 fuses on load (not those cut from fused experts
        for a family it loads per expert)."""
        cut = {spec[0] for specs in self.splits.values() for spec in specs}
        return any(d.quantize and d.expert and name not in cut for name, d in self.tensors.items())

    @property
    def fused_experts_quantized(self) -> bool:
        return any(d.quantize and d.fused for d in self.tensors.values())

    @property
    def fused_experts_transposed(self) -> bool:
        """Fused experts stored transposed from the model's layout in the source (transformers
        transposes them on load, which it cannot do to 4-bit bytes) are quantized."""
        return any(d.quantize and d.fused and d.transpose for d in self.tensors.values())


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


def is_fused_candidate(info: TensorInfo) -> bool:
    """A 3-D tensor, which only fused MoE experts can make quantizable."""
    return len(info.shape) == 3


def fused_decision(info: TensorInfo, *, module: str, experts: int | None, skip: tuple[str, ...], mode: str, blocksize: int) -> Decision:
    """Decide fused MoE experts ``[experts, rows, columns]`` (spec section 2.7): quantized with each
    expert's slice a run of whole blocks, else kept, saying why.

    Args:
        module: the tensor's module name(s) as ``--skip`` matches them.
        experts: how many experts the model has (``None``: unknown).
        mode: ``--experts``.

    Raises:
        SourceError: the tensor's expert count differs from the model's.
    """
    if info.dtype not in QUANTIZABLE_DTYPES:
        return Decision(False, f"dtype {info.dtype}", expert=True, fused=True)
    if info.numel == 0:
        return Decision(False, "empty", expert=True, fused=True)
    if experts is not None and info.shape[0] != experts:
        raise SourceError(f"{info.name}: {info.shape[0]} experts in a fused tensor {list(info.shape)}, but the model has {experts}")
    skipped = skip_reason((module,), skip)
    if skipped:
        return Decision(False, skipped, expert=True, fused=True)
    if mode == "keep":
        return Decision(False, "MoE experts, fused (--experts keep)", expert=True, fused=True)
    per_expert = info.shape[1] * info.shape[2]
    if per_expert % blocksize:
        why = f"an expert's {per_expert} values are not whole blocks of {blocksize} (kept: a block would span two experts)"
        return Decision(False, why, expert=True, fused=True)
    return Decision(True, "MoE experts, fused 3-D", expert=True, fused=True)


def skip_reason(modules: tuple[str, ...], skip: tuple[str, ...]) -> str | None:
    return next((f"--skip {p}" for p in skip for m in modules if fnmatch.fnmatchcase(m, p)), None)


def config_experts(config: dict) -> int | None:
    """The number of routed experts ``config.json`` gives (text config included), if any."""
    for cfg in (config, config.get("text_config") or {}):
        found = next((cfg[k] for k in EXPERT_COUNT_FIELDS if type(cfg.get(k)) is int), None)
        if found is not None:
            return found
    return None


def rule_decision(info: TensorInfo, *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, blocksize: int) -> Decision:
    """Decide one tensor by the name rules of spec section 6."""
    if is_fused_candidate(info):
        module = info.name.removesuffix(".weight")
        parts = module.split(".")
        if len(parts) < 2 or parts[-2] not in FUSED_EXPERT_MODULES:
            return Decision(False, "3-D")
        return fused_decision(info, module=module, experts=config_experts(config), skip=skip, mode=experts, blocksize=blocksize)
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
    so the list never says more than the files hold. Fused experts are not modules a skip list names."""
    while True:
        quantized = {n for n, d in tensors.items() if d.quantize and not d.fused}
        listed = entries(quantized)
        covered = {n: e for n in quantized for m in modules(n) if (e := covering_entry(m, listed))}
        if not covered:
            return sorted(listed)
        for n, e in covered.items():
            tensors[n] = Decision(False, f"a loader would read it unquantized (skip entry {e!r} covers it)", expert=tensors[n].expert)


def rules_as_transformers(infos: list[TensorInfo], *, config: dict, quantize_lm_head: bool) -> str | None:
    """The model class, where the name rules decide this checkpoint as transformers would (:data:`AS_TRANSFORMERS`):
    one of those classes, no 3-D or per-expert tensor, and the output head not quantized."""
    names = config.get("architectures") or []
    if len(names) != 1 or names[0] not in AS_TRANSFORMERS or quantize_lm_head:
        return None
    if any(is_fused_candidate(i) or EXPERT_PATTERN.search(f".{i.name}") for i in infos):
        return None
    return names[0]


def decide_by_rules(
    infos: list[TensorInfo], *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, blocksize: int, why: str
) -> Decisions:
    """Decide every tensor by the name rules; ``why`` says why transformers did not."""
    tensors = {i.name: rule_decision(i, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts, blocksize=blocksize) for i in infos}
    kept_2d = {i.name[: -len(".weight")] for i in infos if precheck(i) is None}

    def entries(quantized: set[str]) -> set[str]:
        listed = {m for m in kept_2d if f"{m}.weight" not in quantized}
        return listed if quantize_lm_head else listed | {"lm_head"}

    skip_modules = settle(tensors, entries, lambda name: (name[: -len(".weight")],))
    return Decisions(f"{RULES} ({why})", tensors, skip_modules)
