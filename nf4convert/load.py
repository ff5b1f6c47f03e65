"""Loading an NF4 folder into ``bitsandbytes.nn.Linear4bit`` modules on any device, without re-quantizing.

Needs the optional extras (``pip install 'nf4convert[load]'``: bitsandbytes, transformers,
accelerate). Two ways in:

- :func:`load_model`: a transformers model, through transformers' own ``from_pretrained`` with
  :mod:`nf4convert.hfquantizer` adding what it lacks (per-expert 4-bit MoE experts, layers without
  4-bit weights kept as ``nn.Linear``, bitsandbytes' AVX512-BF16 path off where it fails).
- :func:`load_state_dict` and :func:`replace_linear`: any ``nn.Module`` (no ``config.json`` needed).
  Every tensor is read from the memory-mapped shards and copied straight to ``device`` (on the CPU
  it stays a view of a private copy-on-write mapping); quantized weights become ``Params4bit``
  through ``Params4bit.from_prequantized``, so no float copy of a quantized weight ever exists.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .architecture import CannotAsk, map_keys, meta_model
from .architecture import model_class as model_class_of
from .constants import MANIFEST_NAME, QUANTIZABLE_DTYPES
from .errors import LoadError, MissingDependencyError
from .libraries import library_for
from .loaded import refuse_uninitialized
from .pipeline import is_pipeline
from .layout import quantized_tensors
from .read import NF4Checkpoint, is_bitsandbytes_4bit, open_checkpoint
from .tensorfile import SafetensorsFile


class LoadResult(NamedTuple):
    """Keys the module expected and did not get, and keys given that it has no place for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


#: bitsandbytes' optional CPU kernel from the Hub (AVX512-BF16 CPUs): logger -> the start of a message
#: about fetching it that means nothing is wrong (bitsandbytes falls back to its own kernel).
_KERNEL_FETCH_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
}


class _DropKernelFetch(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Drop the messages of bitsandbytes' attempt to fetch its optional CPU kernel from the Hub
    (``kernels-community``, on AVX512-BF16 CPUs): offline, the ``kernels`` package says it skips the
    publisher trust check, then bitsandbytes says the fetch failed; it falls back to its own kernel, so
    nothing is wrong. Call before bitsandbytes is imported (directly or through transformers); other
    messages are kept. Idempotent."""
    for name, prefix in _KERNEL_FETCH_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKernelFetch) for f in logger.filters):
            logger.addFilter(_DropKernelFetch(prefix))


def float_numerics(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``Linear4bit`` of ``model`` compute the same, right values on every CPU: bitsandbytes'
    AVX512-BF16 CPU path off, and the layers whose rows are not whole blocks decoded as one row
    (:func:`nf4convert.rowdecode.exact_on_cpu`), so that a CPU forward dequantizes right and multiplies
    in the compute dtype. For models loaded by other means (stock ``from_pretrained``);
    :func:`load_model` does the second part itself.

    The AVX512-BF16 path (taken only on CPUs with AVX512-BF16, in eval mode) repacks each weight on its
    first forward and computes in bfloat16: results then depend on the CPU, and it fails outright for
    ``out_features % 32 != 0`` or ``in_features % blocksize != 0`` (which :func:`replace_linear`
    already turns it off for). Returns ``model``.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    if layers:
        from .rowdecode import exact_on_cpu

        exact_on_cpu(model)
    return model


def _bnb() -> Any:
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError:
        raise MissingDependencyError("loading NF4 weights needs bitsandbytes: pip install 'nf4convert[load]'") from None
    return bitsandbytes


def _transformers() -> Any:
    quiet_bitsandbytes()
    try:
        import accelerate  # noqa: F401  (init_empty_weights)
        import transformers
    except ImportError:
        raise MissingDependencyError("load_model needs transformers and accelerate: pip install 'nf4convert[load]'") from None
    return transformers


def _place(f: SafetensorsFile, key: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor on ``device``: on the CPU a view of the private (copy-on-write) mapping, elsewhere a copy."""
    t = f.tensor(key)
    if dtype is not None and t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t if device.type == "cpu" else t.to(device=device, copy=True)


def load_state_dict(
    path: str | os.PathLike | NF4Checkpoint, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read an NF4 folder into a state dict on ``device``.

    Args:
        path: the folder (or an already opened :class:`~nf4convert.read.NF4Checkpoint`).
        device: where the tensors go (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: cast the kept floating-point tensors (norms, embeddings, biases) to this dtype.

    Returns:
        ``<module>.weight`` -> ``bitsandbytes.nn.Params4bit`` for quantized weights (their companion
        tensors are folded into its quant state), name -> tensor for everything else.

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
        FormatError, UnsupportedVersionError: the folder fails the spec's structural checks.

    Example:
        >>> sd = load_state_dict("./Llama-3-8B-nf4", device="cuda")          # doctest: +SKIP
    """
    bnb = _bnb()
    ckpt = path if isinstance(path, NF4Checkpoint) else open_checkpoint(path)
    companions = {
        name: key for key, state in ckpt.quant_states.items() for name, _, _ in quantized_tensors(key, state) if name != key
    }
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for shard, tensors in ckpt.shards.items():
        # CPU tensors stay views of a private mapping: pages load on first use, as transformers does
        f = SafetensorsFile(ckpt.root / shard, copy_on_write=True)
        for key in tensors:
            if key in ckpt.quant_states:
                stats = {
                    name[len(key) + 1 :]: _place(f, name, device)
                    for name, _, _ in quantized_tensors(key, ckpt.quant_states[key])
                    if name != key
                }
                out[key] = bnb.nn.Params4bit.from_prequantized(_place(f, key, device), stats, requires_grad=False, device=device)
            elif key not in companions:
                out[key] = _place(f, key, device, dtype)
        if device.type != "cpu":
            f.close()
    return out


def _is_conv1d(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def replace_linear(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    compute_dtype: torch.dtype | None = None,
    strict: bool = True,
) -> LoadResult:
    """Swap every ``nn.Linear`` (and GPT-2 ``Conv1D``) whose weight is quantized in ``state_dict`` for a
    ``bitsandbytes.nn.Linear4bit``, and load every other tensor into ``module`` (by assignment, in place).

    Args:
        module: any module; its parameters may be on the meta device.
        state_dict: as returned by :func:`load_state_dict`.
        compute_dtype: the ``Linear4bit`` compute dtype (default: each weight's original dtype).
        strict: raise if keys are missing or unexpected, as ``load_state_dict(strict=True)`` does.

    Returns:
        The missing and unexpected keys.

    Raises:
        LoadError: a quantized weight does not fit its layer, or (``strict``) keys do not match.
    """
    bnb = _bnb()
    from .rowdecode import exact_on_cpu

    replaced: set[str] = set()
    for name, child in list(module.named_modules()):
        key = f"{name}.weight" if name else "weight"
        weight = state_dict.get(key)
        if not isinstance(weight, bnb.nn.Params4bit) or not (isinstance(child, torch.nn.Linear) or _is_conv1d(child)):
            continue
        out_features, in_features = weight.quant_state.shape
        expected = tuple(child.weight.shape[::-1] if _is_conv1d(child) else child.weight.shape)
        if expected != (out_features, in_features):
            raise LoadError(f"{key}: quantized shape {list(weight.quant_state.shape)} does not fit the layer's {list(expected)}")
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype or weight.quant_state.dtype,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = weight
        weight.module = layer
        layer.quant_state = weight.quant_state
        if weight.device.type == "cpu":
            # bitsandbytes' AVX512-BF16 path repacks on the first forward and fails on these shapes
            layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu and (
                out_features % 32 == 0 and in_features % weight.blocksize == 0
            )
        exact_on_cpu(layer)
        _set_submodule(module, name, layer)
        replaced.add(key)
    rest = {k: v for k, v in state_dict.items() if k not in replaced}
    result = module.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in replaced]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        raise LoadError(f"state dict does not fit the module: {', '.join(p for p in parts if p)}")
    return LoadResult(missing, unexpected)


def _model_class(transformers: Any, model_class: Any, config: dict, root: Path, keys: list[str]) -> Any:
    """The class ``from_pretrained`` is called on: the caller's, refusing a class built for another
    ``model_type``; else the class whose weights the folder holds (:func:`default_class`)."""
    if model_class is None:
        return default_class(config, keys, root=root)
    if isinstance(model_class, str):
        model_class = getattr(transformers, model_class, None) or _fail(f"transformers has no class {model_class!r}")
    expected = getattr(getattr(model_class, "config_class", None), "model_type", None)
    if expected and expected != config.get("model_type"):
        raise LoadError(f"{root}: {model_class.__name__} is a {expected!r} model, the weights are {config.get('model_type')!r}")
    return model_class


def default_class(config: dict, keys: list[str], *, root: Path) -> Any:
    """The class whose weights the folder holds: the one ``config.json``'s ``architectures`` names, unless
    none of its head's weights is stored (many sentence-transformers checkpoints name
    ``BertForMaskedLM`` over a base model's weights), then the base model (``AutoModel``'s class).

    The head is every parameter outside the base model (``base_model_prefix``), tied ones aside; the
    folder's tensor names are mapped with transformers' own load-time key mapping.

    Raises:
        LoadError: transformers cannot build a model from ``config.json``.
    """
    try:
        cls, cfg = model_class_of(config)
    except CannotAsk as e:
        raise LoadError(f"{root}: cannot build the model: {e}") from None
    base = getattr(cls, "base_model_prefix", "")
    try:
        base_cls = model_class_of({k: v for k, v in config.items() if k != "architectures"})[0]
    except CannotAsk:
        return cls
    if base_cls is cls or not base:
        return cls
    model = meta_model(config)
    if not isinstance(getattr(model, base, None), torch.nn.Module):
        return cls
    head = [name for name, _ in model.named_parameters() if not name.startswith(base + ".")]
    stored = {m.key for m in map_keys(model, keys).values()}
    return base_cls if head and not stored.intersection(head) else cls


def _fail(message: str) -> Any:
    raise LoadError(message)


def load_model(
    path: str | os.PathLike,
    model_class: Any = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    compute_dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Load an NF4 folder with transformers' ``from_pretrained``, weights straight on ``device`` as
    ``Linear4bit`` layers, never re-quantized.

    Everything transformers does when loading applies (key renames, ignored buffers, weights computed
    at init, tied weights, its load report); :mod:`nf4convert.hfquantizer` adds per-expert 4-bit MoE
    experts (which stock transformers 5 refuses) and turns off bitsandbytes' AVX512-BF16 CPU path on
    the layer shapes it fails on. Reads nf4convert outputs and bitsandbytes 4-bit folders saved by
    transformers (no manifest, e.g. 4.x per-expert MoE ones), after checking their structure.

    Args:
        path: the NF4 folder.
        model_class: a transformers class (``AutoModelForMaskedLM``, ``BertModel``, or its name);
            default: the class whose weights the folder holds (:func:`default_class`: the one
            ``config.json``'s ``architectures`` names, or the base model where none of that head's
            weights is stored). A head the caller's class adds and the weights lack is initialized
            and reported by transformers (a warning, as in ``from_pretrained``); any other weight
            missing from the folder is an error.
        device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: the dtype of the weights that are not quantized, as ``from_pretrained(dtype=...)``.
        compute_dtype: override ``bnb_4bit_compute_dtype`` (float32, float16 or bfloat16).
        **kwargs: passed to ``from_pretrained`` (``output_loading_info=True``, ``attn_implementation``, ...).

    Returns:
        The model in eval mode, as ``from_pretrained`` returns it (``is_loaded_in_4bit`` is ``True``);
        with ``output_loading_info=True``, ``(model, loading_info)``. Every weight of it was read from
        the folder or computed by the model's own rules (tied weights, buffers, transformers' ignore
        lists), or is in a head the caller's class adds.

    Raises:
        MissingDependencyError: transformers, accelerate or bitsandbytes is missing.
        LoadError: not an NF4 folder, no ``config.json``, a class for another model type, a bad
            compute dtype, transformers could not load the weights into the class, or a weight of the
            model would be random (not in the folder, and not a head the caller's class adds).
        FormatError, UnsupportedVersionError: the folder fails the spec's structural checks.

    Example:
        >>> model = load_model("./Llama-3-8B-nf4", device="cuda")            # doctest: +SKIP
        >>> mlm = load_model("./bert-nf4", AutoModelForMaskedLM)             # doctest: +SKIP
    """
    _transformers()  # the loaders of every library need transformers and accelerate, and bitsandbytes
    _bnb()
    root = Path(path)
    if is_pipeline(root):
        try:
            from .diffusers_loader import load_pipeline
        except ImportError:
            raise MissingDependencyError("this folder is a diffusers pipeline: pip install 'nf4convert[diffusers]'") from None
        return load_pipeline(root, device=device, dtype=dtype, compute_dtype=compute_dtype, **kwargs)
    if root.is_dir() and not (root / MANIFEST_NAME).exists() and not is_bitsandbytes_4bit(root):
        raise LoadError(f"{root}: not an NF4 folder (no {MANIFEST_NAME}, no bitsandbytes 4-bit quantization_config); convert it first: nf4convert convert")
    ckpt = open_checkpoint(root, bitsandbytes_folders=True)
    if ckpt.single_file:
        raise LoadError(
            f"{root}: a bitsandbytes 4-bit single file (Forge/ComfyUI layout) names no model to build; load it in Forge or ComfyUI, "
            "or 'nf4convert dequantize' it back to full precision"
        )
    config_path = ckpt.root / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{ckpt.root}: no config.json to build the model from (use load_state_dict and replace_linear)")
    config_dict = json.loads(config_path.read_text())
    if compute_dtype is not None and str(compute_dtype).removeprefix("torch.") not in QUANTIZABLE_DTYPES.values():
        raise LoadError(f"unsupported compute dtype {compute_dtype} (float32, float16 or bfloat16)")
    return library_for(config_dict, ckpt.root).load(ckpt, config_dict, model_class, device=device, dtype=dtype, compute_dtype=compute_dtype, **kwargs)


def load_transformers(
    ckpt: NF4Checkpoint, config_dict: dict, model_class: Any, *, device: torch.device | str, dtype: Any, compute_dtype: torch.dtype | None, **kwargs: Any
) -> Any:
    """A transformers model folder through the class's own ``from_pretrained`` with
    :class:`~nf4convert.hfquantizer.NF4HfQuantizer` (:func:`load_model`'s transformers part)."""
    transformers = _transformers()
    keys = [name for tensors in ckpt.shards.values() for name in tensors]
    cls = _model_class(transformers, model_class, config_dict, ckpt.root, keys)
    if compute_dtype is not None:
        config = transformers.AutoConfig.from_pretrained(ckpt.root)
        config.quantization_config["bnb_4bit_compute_dtype"] = str(compute_dtype).removeprefix("torch.")
        kwargs["config"] = config
    if dtype is not None:
        kwargs["dtype"] = dtype
    with_info = kwargs.pop("output_loading_info", False)
    from .hfquantizer import nf4_quantizer

    with nf4_quantizer({name: state.shape for name, state in ckpt.quant_states.items()}) as refused:
        try:
            model, info = cls.from_pretrained(ckpt.root, device_map={"": torch.device(device)}, output_loading_info=True, **kwargs)
        except (RuntimeError, ValueError, TypeError, KeyError, OSError) as e:
            if refused:
                raise refused[0] from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LoadError(f"{ckpt.root}: transformers cannot load it as {cls.__name__}: {first}") from e
    refuse_uninitialized(model, info, root=ckpt.root, caller_class=model_class is not None)
    return (model, info) if with_info else model
