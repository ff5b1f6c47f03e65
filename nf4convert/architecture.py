"""Which weights are quantized: asked of transformers where it knows the architecture, else name rules.

transformers' bitsandbytes integration replaces every module of exact type ``nn.Linear`` (or GPT-2
``Conv1D``) except tied weights, the output embeddings, the last module, ``_keep_in_fp32_modules``
and ``llm_int8_skip_modules``. :func:`decide` builds the model's skeleton on the meta device (no
memory), applies that same rule with transformers' own functions, and maps each module to the
checkpoint's tensor names through transformers' own key mapping (the renames and expert fusions it
applies when loading). Where transformers is missing, too old, or does not know the architecture,
the documented name rules of spec section 6.2 (:mod:`nf4convert.decisions`) decide, and the result
says so. transformers' answers are cached (see :func:`decide`).

MoE experts: transformers 5 fuses per-expert checkpoint weights into 3-D parameters, which
bitsandbytes leaves in full precision. With ``experts="quantize"`` each expert weight is quantized
as the 2-D tensor the checkpoint stores (the layout transformers 4.x and vLLM read), and experts a
checkpoint stores fused, as 3-D tensors, are quantized as they are stored (each expert's slice whole
blocks); ``experts="keep"`` keeps them, as transformers 5 does. Routers are never quantized.

Everything here works on names, shapes and ``config.json``; no tensor data is read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
from dataclasses import dataclass, replace
from typing import Any

from .decisions import (
    AS_TRANSFORMERS_NOTE, EXPERT_PATTERN, Decision, Decisions, decide_by_rules, fused_decision, is_fused_candidate, precheck,
    rules_as_transformers, settle, skip_reason,
)  # fmt: skip
from .decision_cache import cache_key, load_cached, store_cached
from .perexpert import per_expert_splits
from .source import split_info
from .tensorfile import TensorInfo


log = logging.getLogger("nf4convert")


class CannotAsk(Exception):
    """transformers cannot answer for this checkpoint (the message says why)."""


def _cache_key(infos: list[TensorInfo], config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, blocksize: int) -> str:
    """What transformers' decisions depend on, hashed (:func:`~nf4convert.decision_cache.cache_key`).

    Raises:
        CannotAsk: transformers cannot be imported (checked without importing it).
    """
    if sys.modules.get("transformers", True) is None or importlib.util.find_spec("transformers") is None:
        raise CannotAsk("transformers is not installed")
    version = importlib.metadata.version("transformers")
    if int(version.split(".")[0]) < 5:
        raise CannotAsk(f"transformers {version} < 5")
    return cache_key([version, config, [[i.name, i.dtype, list(i.shape)] for i in infos], list(skip), quantize_lm_head, experts, blocksize])


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
        transposed: fused experts that transformers transposes on load (``[E, b, a]`` -> ``[E, a, b]``)
            where the stored shape is not the model's.
    """

    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1
    layout: str | None = None
    transposed: bool = False


def _changed_on_load(converter: Any) -> str:
    """What a converter does to a tensor on load, in words."""
    return "changed by transformers on load (" + ", ".join(type(op).__name__ for op in converter.operations) + ")"


def _merge_layout(converter: Any) -> str | None:
    """``None`` if the converter stacks experts along dim 0 and concatenates its sources along dim 1
    (the per-expert -> 3-D fusion nf4convert reverses), else a description of what it does."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        return None
    return _changed_on_load(converter)


def _is_expert_transpose(converter: Any) -> bool:
    """Whether the converter only swaps the last two dimensions of 3-D experts stored the other way
    round (``[E, b, a]`` -> the model's ``[E, a, b]``; a tensor of the model's shape is left alone)."""
    ops = converter.operations
    return len(ops) == 1 and type(ops[0]).__name__ == "Transpose" and {ops[0].dim0, ops[0].dim1} == {1, 2} and ops[0].check_dims


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
        if _is_expert_transpose(converter):
            out[key] = KeyMapping(new, transposed=True)
            continue
        index = EXPERT_PATTERN.search(f".{key}")
        layout = _merge_layout(converter) if index else _changed_on_load(converter)
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


def is_experts_module(module: Any) -> bool:
    """An MoE experts module whose forward indexes its fused 3-D parameters one expert at a time:
    transformers' ``use_experts_implementation`` classes (``eager`` is the per-expert forward)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate")


def _fused_decision(info: TensorInfo, where: KeyMapping | None, model: Any, *, skip: tuple[str, ...], experts: str, blocksize: int) -> Decision:
    """Decide a 3-D tensor: fused experts where it loads into a 3-D parameter of the model."""
    if where is None:
        return Decision(False, "not a parameter of the model")
    try:
        param = model.get_parameter(where.key)
    except AttributeError:  # a buffer
        param = None
    module = model.get_submodule(where.key.rpartition(".")[0])
    if param is None or param.dim() != 3 or not is_experts_module(module):
        return Decision(False, "3-D")
    if where.layout is not None:
        return Decision(False, f"{where.layout} (kept, as transformers does)", expert=True, fused=True)
    shape = tuple(param.shape)
    swapped = (shape[0], shape[2], shape[1])
    transpose = where.transposed and info.shape != shape and info.shape == swapped
    if info.shape[0] == shape[0] and info.shape != shape and not transpose:
        return Decision(False, f"shape {list(info.shape)} differs from the model's {list(shape)}", expert=True, fused=True)
    decision = fused_decision(info, module=where.key.rpartition(".")[0], experts=shape[0], skip=skip, mode=experts, blocksize=blocksize)
    return replace(decision, transpose=True, reason=f"{decision.reason}, each expert transposed as transformers does") if transpose and decision.quantize else decision


def ask_transformers(infos: list[TensorInfo], *, config: dict, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, blocksize: int) -> Decisions:
    """Decide from the model transformers builds for ``config`` (see the module docstring).

    Raises:
        CannotAsk: transformers cannot answer for this checkpoint.
    """
    transformers = _transformers()
    from transformers.quantizers.quantizers_utils import should_convert_module

    model = meta_model(config)
    where = {name: m.key for name, m in map_keys(model, [i.name for i in infos if len(i.shape) == 3]).items()}
    splits = per_expert_splits(model, infos, where)  # changes the model as transformers' quantizers do
    infos = [part for i in infos for part in ([split_info(i, *spec) for spec in splits[i.name]] if i.name in splits else [i])]
    linear, conv1d = _replaced_types()
    mapping = map_keys(model, [i.name for i in infos])
    if not any(i.name in mapping for i in infos if precheck(i) is None):
        raise CannotAsk(f"no 2-D weight of the checkpoint is a parameter of {type(model).__name__}")
    not_converted = _not_converted(model, quantize_lm_head=quantize_lm_head)
    patterns = list(not_converted)
    tensors: dict[str, Decision] = {}
    for info in infos:
        where = mapping.get(info.name)
        if is_fused_candidate(info):
            tensors[info.name] = _fused_decision(info, where, model, skip=skip, experts=experts, blocksize=blocksize)
            continue
        pre = precheck(info)
        if pre is not None or where is None:
            tensors[info.name] = pre or Decision(False, "not a parameter of the model")
            continue
        module_name, _, param = where.key.rpartition(".")
        ckpt_module = info.name[: -len(".weight")]
        skipped = skip_reason((ckpt_module, module_name), skip)
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
    _keep_read_outside(model, mapping, tensors)
    parts = {spec[0] for specs in splits.values() for spec in specs}
    for name in parts:  # MoE experts, as the per-expert checkpoint weights of other families
        d = tensors[name]
        if d.quantize and experts == "keep":
            d = Decision(False, "MoE expert (--experts keep)")
        tensors[name] = replace(d, expert=True, reason=f"{d.reason}, cut from the fused experts: transformers loads these experts per expert when 4-bit")
    skip_modules = _skip_modules(model, infos, mapping, tensors, linear, conv1d)
    return Decisions(f"transformers {transformers.__version__} ({type(model).__name__})", tensors, skip_modules, splits)


def _keep_read_outside(model: Any, mapping: dict[str, KeyMapping], tensors: dict[str, Decision]) -> None:
    """Keep, in place, the weights the model computes with outside their layer's forward (a 4-bit layer
    would hand it packed bytes: :mod:`nf4convert.directreads`)."""
    from .directreads import read_outside

    layers = {mapping[n].key.rpartition(".")[0]: n for n, d in tensors.items() if d.quantize and not d.expert and n in mapping}
    found = read_outside(model, sorted(layers))
    if found is None:
        log.info("%s: its forward could not be traced on the meta device; no layer is known to be read outside its forward", type(model).__name__)
    for layer, operation in (found or {}).items():
        owner = type(model.get_submodule(layer.rpartition(".")[0])).__name__ if "." in layer else type(model).__name__
        tensors[layers[layer]] = Decision(False, f"read outside its layer by {owner} ({operation} of the weight): a 4-bit weight would fail there")


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
        return listed | {m for i in infos if i.name not in quantized and precheck(i) is None for m in modules(i.name)}

    return settle(tensors, entries, modules)


def decide(
    infos: list[TensorInfo], *, config: dict | None, skip: tuple[str, ...] = (), quantize_lm_head: bool = False, experts: str = "quantize", blocksize: int = 64
) -> Decisions:
    """Decide every tensor of a checkpoint: by transformers where it can answer, else by the name rules.

    transformers' answer is kept in the cache folder under a hash of everything it depends on (the
    versions, ``config.json``, every tensor's name, dtype and shape, the options): importing
    transformers' modeling code costs seconds, and a resumed or repeated conversion plans the same.
    So is its refusal (an architecture it does not know); a ``config.json`` without ``model_type``
    is refused without importing it, and the architectures the name rules decide as transformers
    does (:data:`~nf4convert.decisions.AS_TRANSFORMERS`) are not asked.

    Raises:
        SourceError: fused experts whose expert count differs from the model's.
    """
    config = config or {}
    try:
        if not config:
            raise CannotAsk("no config.json")
        if "model_type" not in config:  # known without importing transformers
            raise CannotAsk("config.json has no model_type")
        model = rules_as_transformers(infos, config=config, quantize_lm_head=quantize_lm_head)
        if model is not None:
            return decide_by_rules(infos, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts, blocksize=blocksize, why=f"{model}: {AS_TRANSFORMERS_NOTE}")
        key = _cache_key(infos, config, skip, quantize_lm_head, experts, blocksize)
        cached = load_cached(key)
        if isinstance(cached, str):
            raise CannotAsk(cached)
        if cached is not None:
            return cached
        log.info("asking transformers which modules it quantizes (its modeling import takes seconds; cached for the next conversion)")
        try:
            decisions = ask_transformers(infos, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts, blocksize=blocksize)
        except CannotAsk as e:
            store_cached(key, str(e))  # an architecture transformers does not know stays unknown to this version
            raise
        store_cached(key, decisions)
        return decisions
    except CannotAsk as e:
        why = str(e)
    return decide_by_rules(infos, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts, blocksize=blocksize, why=why)
