"""Importance weights for ``--scales search`` (spec section 2.6): how much each input column of a
weight matters, as the mean squared activation entering it over some calibration text (the idea of
llama.cpp's importance matrix). The weighted search keeps the scales that preserve the weights those
activations multiply most; the file format and the decoder are unchanged.

The importance file is safetensors: one float32 vector per weight, under the weight's checkpoint
name, as long as the weight's input dimension (``shape[1]``; a transposed ``Conv1D`` weight's
``shape[0]``). :func:`collect` measures it with transformers; reading needs neither torch nor
transformers until the vectors are used.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LoadError, MissingDependencyError, OutputError, QuantizationError, SourceError, SourceNotFoundError
from .files import sha256_file
from .tensorfile import SafetensorsFile, TensorInfo, read_header

if TYPE_CHECKING:
    import torch


def read_importance_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """The vectors an importance file holds, checked for dtype and rank (not read).

    Raises:
        QuantizationError: not a safetensors file of float32 vectors (one line, naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise QuantizationError(f"{path}: no such importance file")
    try:
        infos, _ = read_header(path)
    except Exception as e:  # noqa: BLE001 - FormatError or OSError: either way, not a usable file
        raise QuantizationError(f"{path}: not an importance file ({e})") from None
    for info in infos.values():
        if info.dtype != "F32" or len(info.shape) != 1:
            raise QuantizationError(f"{path}: {info.name} is {info.dtype} {list(info.shape)}, expected a float32 vector")
    return infos


def check_importance(infos: dict[str, TensorInfo], columns: dict[str, int], *, where: str) -> list[str]:
    """The quantized weights (``name -> input columns``) that ``infos`` weights.

    Raises:
        QuantizationError: a vector of the wrong length, or no vector for any quantized weight.
    """
    for name, info in infos.items():
        if name in columns and info.shape[0] != columns[name]:
            raise QuantizationError(f"{where}: {name} has {info.shape[0]} importance values, the weight has {columns[name]} input columns")
    covered = [name for name in columns if name in infos]
    if not covered:
        raise QuantizationError(f"{where}: names none of the weights to quantize (an importance file of another model?)")
    return covered


def load_importance(path: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """The vectors of ``names`` (those the file has), as float32 tensors.

    Raises:
        QuantizationError: a vector with a negative, NaN or infinite value.
    """
    with SafetensorsFile(path) as f:
        vectors = {name: f.tensor(name).clone() for name in names if name in f.tensors}
    for name, v in vectors.items():
        if not bool((v >= 0).all()) or not bool(v.isfinite().all()):
            raise QuantizationError(f"{path}: {name} has negative, NaN or infinite importance values")
    return vectors


def importance_record(path: str | os.PathLike, weighted: int) -> dict[str, Any]:
    """What the manifest records of the importance file: its sha256 and how many weights it weighted."""
    return {"sha256": sha256_file(Path(path)), "weighted_tensors": weighted}


def collect(model: torch.nn.Module, tokenizer: Any, text: str, *, window: int = 512) -> dict[str, torch.Tensor]:
    """Mean squared input activation of every ``nn.Linear`` and ``Conv1D`` of a transformers model over
    ``text``, in windows of ``window`` tokens: ``{module name + ".weight": float32 [input columns]}``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module: torch.nn.Module, inputs: tuple, _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    hooks = [
        m.register_forward_hook(hook(f"{n}.weight"))
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D))
    ]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                model(ids[start : start + window][None].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: (s / max(1, counts[name])).float().cpu() for name, s in sums.items() if math.isfinite(float(s.sum()))}


def measure_importance(model_dir: str | os.PathLike, text_file: str | os.PathLike, output: str | os.PathLike, *, device: str = "cpu", window: int = 512, force: bool = False) -> int:
    """Load the model in ``model_dir`` with transformers (its own dtype, on ``device``), :func:`collect`
    over the text of ``text_file`` and write the importance file ``output`` (atomically). Returns the
    number of weights measured.

    Raises:
        MissingDependencyError: transformers is not installed.
        SourceNotFoundError, LoadError, OutputError: no text file, a model transformers cannot load, an existing output.
        SourceError: a text shorter than one window (the message says how many tokens are needed).
        DeviceError: ``device`` does not exist here.
    """
    from .quantize import check_device

    check_device(device)
    text_path, out = Path(text_file), Path(output)
    if not text_path.is_file():
        raise SourceNotFoundError(f"{text_path}: no such calibration text file")
    if out.exists() and not force:
        raise OutputError(f"{out}: already exists (--force, or force=True in Python, replaces it)")
    try:
        import transformers
        from safetensors.torch import save_file
    except ImportError:
        raise MissingDependencyError("measuring importance runs the model: pip install 'nf4convert[load]'") from None
    text = text_path.read_text(encoding="utf-8", errors="replace")
    tokenizer = _load(transformers.AutoTokenizer, model_dir)
    tokens = len(tokenizer(text).input_ids)  # checked before the model is loaded
    if tokens < window:
        raise SourceError(f"{text_path}: {tokens} tokens of calibration text, fewer than one window of {window}: give at least {window} tokens of text (or a smaller --window)")
    model = _load(transformers.AutoModel, model_dir, dtype="auto", use_safetensors=True).to(device).eval()
    base = getattr(model, "base_model_prefix", "")
    vectors = collect(model, tokenizer, text, window=window)
    # AutoModel is the bare model: its modules lack the task model's prefix that checkpoints name
    names = _checkpoint_names(model_dir, vectors, base)
    tmp = out.with_name(out.name + ".tmp")
    save_file({names[k]: v.contiguous() for k, v in vectors.items()}, tmp, metadata={"nf4convert.importance": "1", "text_sha256": sha256_file(text_path)})
    os.replace(tmp, out)
    return len(vectors)


def _load(auto: Any, model_dir: str | os.PathLike, **kwargs: Any) -> Any:
    """``auto.from_pretrained(model_dir, **kwargs)``, its failure one :class:`LoadError` line."""
    try:
        return auto.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LoadError(f"{model_dir}: transformers cannot load it ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from None


def _checkpoint_names(model_dir: str | os.PathLike, vectors: dict[str, Any], prefix: str) -> dict[str, str]:
    """Module names of the bare model -> the checkpoint's tensor names (with ``prefix.`` where the
    checkpoint has it)."""
    from .source import open_source

    keys = {t.name for t in open_source(model_dir).tensors}
    return {k: f"{prefix}.{k}" if k not in keys and f"{prefix}.{k}" in keys else k for k in vectors}
