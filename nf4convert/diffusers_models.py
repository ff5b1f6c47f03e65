"""diffusers models (a pipeline's components: Flux, SD3, Wan transformers, UNets, ...): which tensors
diffusers' bitsandbytes integration quantizes, and how it names and configures a 4-bit folder.

A diffusers model folder has a ``config.json`` with ``_class_name`` (and ``_diffusers_version``) and
weights ``diffusion_pytorch_model.safetensors``. diffusers' ``BnB4BitDiffusersQuantizer`` replaces
every module that is an ``nn.Linear`` (``isinstance``, unlike transformers' exact type) except the
model's ``_keep_in_fp32_modules`` and ``llm_int8_skip_modules``, each matched as a prefix
(``key + "."`` in the module's name) or exactly; it has no rule for heads, embedders or the last
layer. :func:`ask_diffusers` builds the model class on the meta device (no memory) and applies that
rule with diffusers' own model (its parameter names are the checkpoint's). :func:`quantization_config`
is diffusers' own ``BitsAndBytesConfig`` serialized, as its ``save_pretrained`` writes it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .decisions import Decision, Decisions, precheck, skip_reason
from .errors import MissingDependencyError, SourceError
from .tensorfile import TensorInfo


def _diffusers_available(config: dict) -> None:
    if importlib.util.find_spec("diffusers") is None:
        raise MissingDependencyError(
            f"config.json is a diffusers {config['_class_name']}: which layers diffusers quantizes is decided by diffusers itself: pip install diffusers"
        )


def _diffusers(config: dict) -> Any:
    _diffusers_available(config)
    import diffusers

    return diffusers


def model_class(config: dict) -> Any:
    """The diffusers class ``config.json``'s ``_class_name`` names.

    Raises:
        MissingDependencyError: diffusers is not installed.
        SourceError: this diffusers does not know the class (the message names its version).
    """
    diffusers = _diffusers(config)
    cls = getattr(diffusers, config["_class_name"], None)
    if cls is None or not hasattr(cls, "from_config"):
        raise SourceError(
            f"config.json: diffusers {diffusers.__version__} has no model class {config['_class_name']!r} "
            f"(written by diffusers {config.get('_diffusers_version')}): a newer diffusers may know it"
        )
    return cls


def meta_model(config: dict) -> Any:
    """The diffusers model of ``config`` built on the meta device.

    Raises:
        MissingDependencyError, SourceError: see :func:`model_class`; or diffusers cannot build it from this config.
    """
    import torch

    cls = model_class(config)
    try:
        with torch.device("meta"):
            return cls.from_config({k: v for k, v in config.items() if k != "quantization_config"})
    except Exception as e:  # noqa: BLE001 - a config this class cannot be built from
        raise SourceError(f"config.json: diffusers cannot build {cls.__name__} from it ({type(e).__name__}: {str(e)[:80]})") from None


def _not_converted(name: str, keep: list[str]) -> str | None:
    """The entry of diffusers' list of modules not to convert that covers module ``name`` (its rule)."""
    return next((k for k in keep if k + "." in name or k == name), None)


def ask_diffusers(infos: list[TensorInfo], *, config: dict, skip: tuple[str, ...]) -> Decisions:
    """Decide every tensor of a diffusers model's checkpoint as diffusers' bitsandbytes integration does.

    Raises:
        MissingDependencyError, SourceError: see :func:`meta_model`.
    """
    import torch

    diffusers = _diffusers(config)
    model = meta_model(config)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    modules = dict(model.named_modules())
    tensors: dict[str, Decision] = {}
    skipped: list[str] = []
    for info in infos:
        pre = precheck(info)
        module_name, _, param = info.name.rpartition(".")
        module = modules.get(module_name)
        fp32 = _not_converted(module_name, keep)
        if fp32 and info.dtype in ("F16", "BF16"):  # diffusers keeps (and saves) these modules in float32
            tensors[info.name] = Decision(False, f"kept in float32 by diffusers (_keep_in_fp32_modules: {fp32!r}), stored as float32", dtype="F32")
        elif pre is not None:
            tensors[info.name] = pre
        elif module is None or param != "weight":
            tensors[info.name] = Decision(False, "not a parameter of the model" if module is None else "not a weight")
        elif not isinstance(module, torch.nn.Linear):
            tensors[info.name] = Decision(False, f"{type(module).__name__} (not nn.Linear)")
        elif tuple(module.weight.shape) != info.shape:
            tensors[info.name] = Decision(False, f"shape {list(info.shape)} differs from the model's {list(module.weight.shape)}")
        elif fp32:
            tensors[info.name] = Decision(False, f"kept in float32 by diffusers (_keep_in_fp32_modules: {fp32!r})")
        elif why := skip_reason((module_name,), skip):
            tensors[info.name] = Decision(False, why)
            skipped.append(module_name)
        else:
            tensors[info.name] = Decision(True, "linear weight")
    return Decisions(f"diffusers {diffusers.__version__} ({type(model).__name__})", tensors, sorted(skipped))


def decide_diffusers(infos: list[TensorInfo], *, config: dict, skip: tuple[str, ...]) -> Decisions:
    """:func:`ask_diffusers`, its answer cached (:mod:`nf4convert.decision_cache`) under a hash of the
    diffusers version, ``config.json``, every tensor's name, dtype and shape, and ``skip``: importing
    diffusers' modeling code and building the model cost seconds, and a repeated conversion plans the same.

    Raises:
        MissingDependencyError, SourceError: see :func:`meta_model`.
    """
    import importlib.metadata

    from .decision_cache import cache_key, load_cached, store_cached

    _diffusers_available(config)
    key = cache_key(["diffusers", importlib.metadata.version("diffusers"), config, [[i.name, i.dtype, list(i.shape)] for i in infos], list(skip)])
    cached = load_cached(key)
    if isinstance(cached, Decisions):
        return cached
    decisions = ask_diffusers(infos, config=config, skip=skip)
    store_cached(key, decisions)
    return decisions


def quantization_config(*, double_quant: bool, compute_dtype: str, skip_modules: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` as diffusers' ``save_pretrained`` writes it: its own
    ``BitsAndBytesConfig``, serialized (``llm_int8_skip_modules`` null where nothing is skipped); cached
    (:mod:`nf4convert.decision_cache`), as importing diffusers costs seconds."""
    import importlib.metadata

    from .decision_cache import cache_key, load, store

    key = cache_key(["diffusers quantization_config", importlib.metadata.version("diffusers"), double_quant, compute_dtype, skip_modules])
    cached = load(key)
    if isinstance(cached, dict):
        return cached
    import diffusers
    import torch

    config = diffusers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=skip_modules or None,
    )  # fmt: skip
    answer = config.to_dict()
    store(key, answer)
    return answer
