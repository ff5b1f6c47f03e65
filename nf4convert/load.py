"""Loading an NF4 folder into ``bitsandbytes.nn.Linear4bit`` modules on any device, without re-quantizing.

Needs the optional extras (``pip install 'nf4convert[load]'``: bitsandbytes, transformers,
accelerate). Every tensor is read from the memory-mapped shards and copied straight to
``device`` (on the CPU it stays a view of a private copy-on-write mapping); quantized weights
become ``Params4bit`` through ``Params4bit.from_prequantized``, so no float copy of a
quantized weight ever exists.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .architecture import CannotAsk, map_keys, model_class
from .constants import QUANTIZABLE_DTYPES
from .errors import LoadError, MissingDependencyError
from .experts import place_experts
from .layout import quantized_tensors
from .read import NF4Checkpoint, open_checkpoint
from .tensorfile import SafetensorsFile


class LoadResult(NamedTuple):
    """Keys the module expected and did not get, and keys given that it has no place for."""

    missing_keys: list[str]
    unexpected_keys: list[str]


#: What bitsandbytes logs at import on AVX512-BF16 CPUs when the optional ``kernels`` package (which
#: downloads a CPU kernel from the Hub) is absent; it then uses its own built-in kernel.
_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_KERNELS_WARNING)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' import-time warning about the optional Hub ``kernels`` package (AVX512-BF16
    CPUs only; bitsandbytes falls back to its own kernel, so nothing is wrong). Call before bitsandbytes
    is imported (directly or through transformers); other bitsandbytes messages are kept. Idempotent."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropKernelsWarning) for f in logger.filters):
        logger.addFilter(_DropKernelsWarning())


def float_numerics(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bitsandbytes' AVX512-BF16 CPU path in every ``Linear4bit`` of ``model``, so that a CPU
    forward dequantizes and multiplies in the compute dtype, the same on every CPU.

    That path (taken only on CPUs with AVX512-BF16, in eval mode) repacks each weight on its first
    forward and computes in bfloat16: results then depend on the CPU, and it fails outright for
    ``out_features % 32 != 0`` or ``in_features % blocksize != 0`` (which :func:`replace_linear`
    already turns it off for). Returns ``model``.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
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


def to_model_keys(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[list[torch.Tensor]]]]:
    """Rename checkpoint keys as transformers does when loading, and gather per-expert MoE weights by
    the fused parameter they make up: ``(state dict, {fused parameter: [expert][source] tensors})``.

    Raises:
        LoadError: a tensor transformers fuses in a way nf4convert does not map, or an expert missing.
    """
    mapping = map_keys(model, list(state_dict))
    renamed: dict[str, torch.Tensor] = {}
    slots: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    sizes: dict[str, int] = {}
    for key, value in state_dict.items():
        where = mapping.get(key)
        if where is None or (where.expert is None and where.layout is None):
            renamed[where.key if where else key] = value
        elif where.layout is not None:
            raise LoadError(f"{key}: {where.layout}; nf4convert.load_model cannot place it")
        else:
            slots.setdefault(where.key, {})[(where.expert, where.part)] = value
            sizes[where.key] = where.parts
    experts = {}
    for key, parts in slots.items():
        count = model.get_parameter(key).shape[0]
        grid = [[parts.get((e, p)) for p in range(sizes[key])] for e in range(count)]
        if any(t is None for row in grid for t in row):
            raise LoadError(f"{key}: the checkpoint lacks some of its {count} experts")
        experts[key] = grid
    return renamed, experts


def load_model(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Build the transformers model of an NF4 folder with ``Linear4bit`` layers, weights straight on ``device``.

    The architecture comes from ``config.json`` and is built without allocating weights; then
    :func:`load_state_dict` and :func:`replace_linear` fill it, and weights are tied as the config says.
    Checkpoint keys are renamed as transformers renames them when loading; per-expert MoE weights become
    :class:`~nf4convert.experts.PackedExperts` in place of transformers 5's fused expert parameters. Also
    loads bitsandbytes 4-bit folders saved by transformers (no manifest), e.g. 4.x per-expert MoE ones.

    Args:
        path: the NF4 folder.
        device: where the model goes.
        compute_dtype: override ``bnb_4bit_compute_dtype`` from ``config.json``.

    Returns:
        The model, in eval mode, with ``is_loaded_in_4bit = True`` (as transformers sets it).

    Raises:
        MissingDependencyError: transformers, accelerate or bitsandbytes is missing.
        LoadError: no ``config.json``, or the weights do not fit the architecture.
        FormatError, UnsupportedVersionError: the folder fails the spec's structural checks.

    Example:
        >>> model = load_model("./Llama-3-8B-nf4", device="cuda")            # doctest: +SKIP
    """
    _transformers()
    from accelerate import init_empty_weights

    ckpt = open_checkpoint(path, bitsandbytes_folders=True)
    config_path = ckpt.root / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{ckpt.root}: no config.json to build the model from (use load_state_dict and replace_linear)")
    config_dict = json.loads(config_path.read_text())
    quant = config_dict.pop("quantization_config", {}) or {}
    try:
        cls, config = model_class(config_dict)
    except CannotAsk as e:
        raise LoadError(f"{ckpt.root}: cannot build the model: {e}") from None
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    dtype = compute_dtype or getattr(torch, quant.get("bnb_4bit_compute_dtype") or "float32")
    if str(dtype).removeprefix("torch.") not in QUANTIZABLE_DTYPES.values():
        raise LoadError(f"unsupported compute dtype {dtype}")
    state_dict, experts = to_model_keys(model, load_state_dict(ckpt, device=device))
    tied = {k for k in getattr(model, "all_tied_weights_keys", {}) or {} if k not in state_dict}
    result = replace_linear(model, state_dict, compute_dtype=dtype, strict=False)
    for key, grid in experts.items():
        module_name, _, name = key.rpartition(".")
        place_experts(model.get_submodule(module_name), name, grid)
    missing = [k for k in result.missing_keys if k not in tied and k not in experts]
    if missing or result.unexpected_keys:
        raise LoadError(f"{ckpt.root}: weights do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buffer.to(device)
    model.config.quantization_config = quant
    model.is_loaded_in_4bit = True
    return model.eval()
