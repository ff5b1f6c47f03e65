"""Which weights are quantized: asked of transformers where it knows the architecture, else name rules.

transformers' bitsandbytes integration replaces every module of exact type ``nn.Linear`` (or GPT-2
``Conv1D``) except tied weights, the output embeddings, the last module, ``_keep_in_fp32_modules``
and ``llm_int8_skip_modules``. :func:`decide` builds the model's skeleton on the meta device (no
memory), applies that same rule with transformers' own functions, and maps each module to the
checkpoint's tensor names through transformers' own key mapping (the renames and expert fusions it
applies when loading). Where transformers is missing, too old, or does not know the architecture,
the documented name rules of spec section 6 decide, and the result says so.

MoE experts: transformers 5 fuses per-expert checkpoint weights into 3-D parameters, which
bitsandbytes leaves in full precision. With ``experts="quantize"`` each expert weight is quantized
as the 2-D tensor the checkpoint stores (the layout transformers 4.x and vLLM read);
``experts="keep"`` keeps them, as transformers 5 does. Routers are never quantized.

Everything here works on names, shapes and ``config.json``; no tensor data is read.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


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


class CannotAsk(Exception):
    """transformers cannot answer for this checkpoint (the message says why)."""


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


def _precheck(info: TensorInfo) -> Decision | None:
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


def _skipped(modules: tuple[str, ...], skip: tuple[str, ...]) -> str | None:
    return next((f"--skip {p}" for p in skip for m in modules if fnmatch.fnmatchcase(m, p)), None)


def rule_decision(info: TensorInfo, *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str) -> Decision:
    """Decide one tensor by the name rules of spec section 6."""
    pre = _precheck(info)
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
    skipped = _skipped((module,), skip)
    if skipped:
        return Decision(False, skipped)
    expert = _EXPERT.search(f".{module}.") is not None
    if expert and experts == "keep":
        return Decision(False, "MoE expert (--experts keep)", expert=True)
    transpose = parts[-1] in CONV1D_MODULES.get(config.get("model_type", ""), ())
    reason = "MoE expert" if expert else "linear weight (Conv1D, transposed)" if transpose else "linear weight"
    return Decision(True, reason, transpose, expert)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CannotAsk("transformers is not installed") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise CannotAsk(f"transformers {transformers.__version__} < 5")
    return transformers


def model_class(config: dict) -> tuple[Any, Any]:
    """The transformers class and config object for a ``config.json`` dict (``architectures[0]``, else
    the ``AutoModel`` class of its ``model_type``).

    Raises:
        CannotAsk: transformers is missing, older than 5, or does not know the architecture.
    """
    transformers = _transformers()
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if "model_type" not in config:
        raise CannotAsk("config.json has no model_type")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
    except (ValueError, KeyError, TypeError) as e:
        raise CannotAsk(f"transformers {transformers.__version__} does not know model_type {config['model_type']!r} ({e.__class__.__name__})") from None
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        try:
            cls = transformers.AutoModel._model_mapping[type(cfg)]
        except KeyError:
            raise CannotAsk(f"transformers has no model class for {names[0] if names else config['model_type']!r}") from None
    return cls, cfg


def meta_model(config: dict) -> Any:
    """The model of ``config`` built on the meta device: its modules, parameter names and shapes, no memory.

    Raises:
        CannotAsk: see :func:`model_class`; or building the skeleton failed.
    """
    import torch

    cls, cfg = model_class(config)
    try:
        with torch.device("meta"):
            return cls(cfg)
    except Exception as e:  # an architecture transformers knows but cannot build from this config
        raise CannotAsk(f"building {cls.__name__} on the meta device failed ({e.__class__.__name__}: {str(e)[:80]})") from None


@dataclass(frozen=True)
class KeyMapping:
    """Where one checkpoint tensor goes in a transformers 5 model.

    Attributes:
        key: the model's parameter name (after transformers' renames).
        expert: for a per-expert weight fused by transformers into a 3-D parameter: its expert index.
        part: which of the fused parameter's concatenated sources (gate, up, ...) it is.
        parts: how many sources are concatenated.
        layout: ``None`` when the tensor loads as is, else why it cannot be mapped (an unsupported fusion).
    """

    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1
    layout: str | None = None


def _merge_layout(converter: Any) -> str | None:
    """``None`` if the converter stacks experts along dim 0 and concatenates its sources along dim 1
    (the per-expert -> 3-D fusion nf4convert reverses), else a description of what it does."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        return None
    return "fused by transformers with " + ", ".join(name for name, _ in ops)


def map_keys(model: Any, keys: list[str]) -> dict[str, KeyMapping]:
    """Map checkpoint tensor names to ``model``'s parameters with transformers' own load-time key mapping.

    Keys that land nowhere in the model are left out.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    out: dict[str, KeyMapping] = {}
    for key in keys:
        new, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
        if new not in params and key in params:
            new, pattern = rename_source_key(key, [], [], model.base_model_prefix, params)
        if new not in params:
            continue
        if pattern is None:
            out[key] = KeyMapping(new)
            continue
        converter = by_pattern[pattern]
        index = _EXPERT.search(f".{key}")
        layout = _merge_layout(converter) if index else "fused by transformers on load"
        sources = list(converter.source_patterns)
        out[key] = KeyMapping(new, int(index.group(1)) if index else None, sources.index(pattern), len(sources), layout)
    return out


def _not_converted(model: Any, *, quantize_lm_head: bool) -> dict[str, str]:
    """transformers' own list of modules its bitsandbytes integration leaves alone, with the reason."""
    from transformers.quantizers.base import get_keys_to_not_convert

    reasons: dict[str, str] = {}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for k in {*tied.keys(), *tied.values()}:
        reasons[k.removesuffix(".weight")] = "tied weight"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if head is not None and module is head and name not in reasons:
            reasons[name] = "" if quantize_lm_head else "output head (--quantize-lm-head to quantize it)"
    for name in get_keys_to_not_convert(model):
        reasons.setdefault(name, "the model's last module (transformers keeps it)")
    for name in getattr(model, "_keep_in_fp32_modules", None) or []:
        reasons.setdefault(name, "kept in float32 by transformers (_keep_in_fp32_modules)")
    return {k: v for k, v in reasons.items() if v}


def _replaced_types() -> tuple[Any, Any]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return torch.nn.Linear, Conv1D


def ask_transformers(infos: list[TensorInfo], *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str) -> Decisions:
    """Decide from the model transformers builds for ``config`` (see the module docstring).

    Raises:
        CannotAsk: transformers cannot answer for this checkpoint.
    """
    transformers = _transformers()
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = meta_model(config)
    linear, conv1d = _replaced_types()
    mapping = map_keys(model, [i.name for i in infos])
    if not any(i.name in mapping for i in infos if _precheck(i) is None):
        raise CannotAsk(f"no 2-D weight of the checkpoint is a parameter of {type(model).__name__}")
    not_converted = _not_converted(model, quantize_lm_head=quantize_lm_head)
    patterns = list(not_converted)
    tensors: dict[str, Decision] = {}
    for info in infos:
        pre = _precheck(info)
        where = mapping.get(info.name)
        if pre is not None or where is None:
            tensors[info.name] = pre or Decision(False, "not a parameter of the model")
            continue
        module_name, _, param = where.key.rpartition(".")
        ckpt_module = info.name[: -len(".weight")]
        skipped = _skipped((ckpt_module, module_name), skip)
        if where.expert is not None or where.layout is not None:
            if where.layout is not None:
                tensors[info.name] = Decision(False, f"{where.layout} (kept, as transformers does)", expert=where.expert is not None)
            elif skipped:
                tensors[info.name] = Decision(False, skipped, expert=True)
            elif experts == "keep":
                tensors[info.name] = Decision(False, "MoE expert (--experts keep)", expert=True)
            else:
                tensors[info.name] = Decision(True, "MoE expert", expert=True)
            continue
        module = model.get_submodule(module_name)
        if param != "weight" or not (type(module) is linear or isinstance(module, conv1d)):
            tensors[info.name] = Decision(False, f"{type(module).__name__} (not nn.Linear)")
            continue
        if tuple(module.weight.shape) != info.shape:
            tensors[info.name] = Decision(False, f"shape {list(info.shape)} differs from the model's {list(module.weight.shape)}")
            continue
        if not should_convert_module(module_name, patterns):
            why = next((r for p, r in not_converted.items() if not should_convert_module(module_name, [p])), "kept by transformers")
            tensors[info.name] = Decision(False, why)
            continue
        if skipped:
            tensors[info.name] = Decision(False, skipped)
            continue
        is_conv1d = isinstance(module, conv1d)
        tensors[info.name] = Decision(True, "linear weight (Conv1D, transposed)" if is_conv1d else "linear weight", is_conv1d)
    skip_modules = _skip_modules(model, infos, mapping, tensors, linear, conv1d)
    return Decisions(f"transformers {transformers.__version__} ({type(model).__name__})", tensors, skip_modules)


def _skip_modules(model: Any, infos: list[TensorInfo], mapping: dict[str, KeyMapping], tensors: dict[str, Decision], linear: Any, conv1d: Any) -> list[str]:
    """Every ``nn.Linear``/``Conv1D`` of the model whose weight is not quantized (tied ones not stored in
    the checkpoint included), and every kept 2-D weight's module in both spellings."""
    linears = {name for name, m in model.named_modules() if type(m) is linear or isinstance(m, conv1d)}

    def modules(name: str) -> tuple[str, ...]:
        where = mapping.get(name)
        own = name[: -len(".weight")]
        return (own, where.key.rpartition(".")[0]) if where is not None and where.expert is None else (own,)

    def entries(quantized: set[str]) -> set[str]:
        listed = linears - {modules(n)[-1] for n in quantized}
        return listed | {m for i in infos if i.name not in quantized and _precheck(i) is None for m in modules(i.name)}

    return _settle(tensors, entries, modules)


def _settle(tensors: dict[str, Decision], entries: Callable[[set[str]], set[str]], modules: Callable[[str], tuple[str, ...]]) -> list[str]:
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


def decide(infos: list[TensorInfo], *, config: dict | None, skip: tuple[str, ...] = (), quantize_lm_head: bool = False, experts: str = "quantize") -> Decisions:
    """Decide every tensor of a checkpoint: by transformers where it can answer, else by the name rules."""
    config = config or {}
    try:
        if not config:
            raise CannotAsk("no config.json")
        return ask_transformers(infos, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts)
    except CannotAsk as e:
        why = str(e)
    tensors = {i.name: rule_decision(i, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts) for i in infos}
    kept_2d = {i.name[: -len(".weight")] for i in infos if _precheck(i) is None}

    def entries(quantized: set[str]) -> set[str]:
        listed = {m for m in kept_2d if f"{m}.weight" not in quantized}
        return listed if quantize_lm_head else listed | {"lm_head"}

    skip_modules = _settle(tensors, entries, lambda name: (name[: -len(".weight")],))
    return Decisions(f"{RULES} ({why})", tensors, skip_modules)
