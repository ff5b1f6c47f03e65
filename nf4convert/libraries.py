"""The libraries whose models nf4convert converts and loads, each one unit answering the same questions:

- is this folder mine (:meth:`Library.owns`),
- which tensors are quantized and why (:meth:`Library.decide`, asked of the library itself),
- the output's weights file names and ``quantization_config`` (:attr:`Library.files`,
  :meth:`Library.quantization_config`),
- which loaders read the output (:meth:`Library.loaders`), and the card's library, task and snippets
  (:attr:`Library.name`, :attr:`Library.default_task`, :meth:`Library.usage`),
- how nf4convert loads it (:meth:`Library.load`).

A new library is a new :class:`Library` and its place in :data:`LIBRARIES`; the rest of nf4convert asks
:func:`library_for`. The heavy parts stay where the data's way puts them (transformers' decisions in
:mod:`nf4convert.architecture`, its loading in :mod:`nf4convert.load`, diffusers' in
:mod:`nf4convert.diffusers_models` and :mod:`nf4convert.diffusers_loader`); a unit says which one a
question goes to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .constants import DIFFUSERS_FILES, TRANSFORMERS_FILES, WeightFiles, weight_files
from .decisions import Decisions
from .errors import MissingDependencyError
from .tensorfile import TensorInfo


def _snippet(*lines: str) -> list[str]:
    return ["```python", *lines, "```", ""]


class Library:
    """One library's answers (see the module docstring). The base is transformers'."""

    #: the Hub's ``library_name``
    name = "transformers"
    #: the card's ``pipeline_tag`` where the source's card sets none
    default_task: str | None = None
    files: WeightFiles = TRANSFORMERS_FILES

    def owns(self, config: dict | None, root: Path | None) -> bool:
        """Whether the model folder (its ``config.json``, its files) is this library's."""
        return True

    def decide(self, infos: list[TensorInfo], *, config: dict | None, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, blocksize: int) -> Decisions:
        """Every tensor's decision, asked of the library where it can answer."""
        from .architecture import decide

        return decide(infos, config=config, skip=skip, quantize_lm_head=quantize_lm_head, experts=experts, blocksize=blocksize)

    def quantization_config(self, *, double_quant: bool, compute_dtype: str, skip_modules: list[str]) -> dict[str, Any]:
        """``config.json``'s ``quantization_config``, as the library's ``save_pretrained`` writes it."""
        from .layout import quantization_config

        return quantization_config(double_quant=double_quant, compute_dtype=compute_dtype, skip_modules=skip_modules)

    def loaders(self, decisions: Decisions, config: dict | None) -> list[str]:
        """The loaders that read the output (what the tests check): a model loader only where the output
        has a ``config.json`` of an architecture transformers knew when converting."""
        if config is None or not decisions.as_transformers:
            why = "no config.json" if config is None else decisions.decided_by
            return [f"nf4convert.load_state_dict + replace_linear into your own module ({why})"]
        if decisions.fused_experts_transposed:  # stock from_pretrained would transpose the 4-bit bytes
            return ["nf4convert.load_model (transformers 5)"]
        if decisions.fused_experts_quantized:
            return [
                "nf4convert.load_model (transformers 5)",
                "transformers 5 from_pretrained(ignore_mismatched_sizes=True), then bitsandbytes.nn.parametrize."
                "replace_parameter_4bit_prequantized on each fused expert parameter",
            ]
        if decisions.experts_quantized:
            return ["nf4convert.load_model (transformers 5)", "transformers 4.x from_pretrained (experts as per-expert Linear4bit)"]
        return ["transformers from_pretrained (bitsandbytes)", "nf4convert.load_model"]

    def usage(self, manifest: dict[str, Any], config: dict[str, Any], repo: str, own: list[str]) -> list[str]:
        """The card's "Use" section (``own``: nf4convert's ``load_model`` snippet, with its line before)."""
        cls = (config.get("architectures") or ["AutoModel"])[0]
        loaders = manifest.get("loaders", [])
        experts = [t for t in manifest.get("tensors", {}).get("quantized", []) if t.get("expert")]
        stock = _snippet(f"from transformers import {cls}", f'model = {cls}.from_pretrained("{repo}")')
        if any(len(t["shape"]) == 3 for t in experts):
            parametrize = [loader for loader in loaders if "parametrize" in loader]
            return ["The MoE experts are 4-bit, stored fused as 3-D tensors (the layout `bitsandbytes.nn.parametrize` writes).",
                    "bitsandbytes' transformers integration does not quantize such parameters; nf4convert's loader runs them:", "",
                    *own, *([f"Without nf4convert: {parametrize[0]}, given the companions stored beside it.", ""] if parametrize else [])]  # fmt: skip
        if experts and any(loader.startswith("transformers 4.x") for loader in loaders):
            return ["The MoE experts are 4-bit, stored per expert. transformers 5 fuses experts into 3-D parameters",
                    "that bitsandbytes does not quantize, so it cannot load them; nf4convert's loader runs them on", "transformers 5:", "",
                    *own, "transformers 4.x (experts are per-expert `Linear4bit` there) loads the folder as is:", "", *stock]  # fmt: skip
        return ["With transformers and bitsandbytes (no extra step: the layout is the one `save_pretrained` writes):", "", *stock, *own]

    def load(self, ckpt: Any, config: dict, model_class: Any, *, device: Any, dtype: Any, compute_dtype: Any, **kwargs: Any) -> Any:
        """The model, through the library's own ``from_pretrained`` (:func:`nf4convert.load.load_model`)."""
        from .load import load_transformers

        return load_transformers(ckpt, config, model_class, device=device, dtype=dtype, compute_dtype=compute_dtype, **kwargs)


class SentenceTransformers(Library):
    """A sentence-transformers model: a transformers model (its weights, decisions and loading) with its
    pooling and normalisation modules beside it (``modules.json``)."""

    name = "sentence-transformers"
    default_task = "sentence-similarity"

    def owns(self, config: dict | None, root: Path | None) -> bool:
        return root is not None and (root / "modules.json").is_file()

    def usage(self, manifest: dict[str, Any], config: dict[str, Any], repo: str, own: list[str]) -> list[str]:
        return ["With sentence-transformers and bitsandbytes (its pooling and normalisation modules are in the repo):", "",
                *_snippet("from sentence_transformers import SentenceTransformer", f'model = SentenceTransformer("{repo}")',
                          'embeddings = model.encode(["The weather is lovely today.", "It is sunny outside."])'),
                "The transformer alone, with nf4convert's loader:", "", *own[2:]]  # fmt: skip


class Diffusers(Library):
    """A diffusers model (a pipeline's component): ``config.json`` with ``_class_name`` and
    ``_diffusers_version`` (:mod:`nf4convert.diffusers_models`, :mod:`nf4convert.diffusers_loader`)."""

    name = "diffusers"
    files = DIFFUSERS_FILES

    def owns(self, config: dict | None, root: Path | None) -> bool:
        return weight_files(config) is DIFFUSERS_FILES

    def decide(self, infos: list[TensorInfo], *, config: dict | None, skip: tuple[str, ...], quantize_lm_head: bool, experts: str, blocksize: int) -> Decisions:
        from .diffusers_models import decide_diffusers

        return decide_diffusers(infos, config=config or {}, skip=skip)

    def quantization_config(self, *, double_quant: bool, compute_dtype: str, skip_modules: list[str]) -> dict[str, Any]:
        from .diffusers_models import quantization_config

        return quantization_config(double_quant=double_quant, compute_dtype=compute_dtype, skip_modules=skip_modules)

    def loaders(self, decisions: Decisions, config: dict | None) -> list[str]:
        return ["diffusers from_pretrained (bitsandbytes; needs a GPU)", "nf4convert.load_model (CPU or GPU)"]

    def usage(self, manifest: dict[str, Any], config: dict[str, Any], repo: str, own: list[str]) -> list[str]:
        dtype = manifest.get("options", {}).get("compute_dtype") or "bfloat16"
        cls = config["_class_name"]
        return ["With diffusers and bitsandbytes, on a GPU (diffusers' bitsandbytes loader refuses a machine without one):", "",
                *_snippet("import torch", f"from diffusers import {cls}", f'model = {cls}.from_pretrained("{repo}", torch_dtype=torch.{dtype})'),
                "On any machine, the CPU included, with nf4convert's loader (diffusers' own loading, no GPU needed):", "", *own[2:]]  # fmt: skip

    def load(self, ckpt: Any, config: dict, model_class: Any, *, device: Any, dtype: Any, compute_dtype: Any, **kwargs: Any) -> Any:
        try:
            from .diffusers_loader import load_diffusers
        except ImportError:
            raise MissingDependencyError("this folder is a diffusers model: pip install 'nf4convert[diffusers]'") from None
        return load_diffusers(ckpt, config, model_class, device=device, dtype=dtype, compute_dtype=compute_dtype, **kwargs)


#: In the order they are asked: the first that owns a folder is its library.
LIBRARIES: tuple[Library, ...] = (SentenceTransformers(), Diffusers(), Library())


def library_for(config: dict | None, root: Path | None = None) -> Library:
    """The library of the model whose ``config.json`` is ``config`` (in folder ``root``, where known)."""
    return next(lib for lib in LIBRARIES if lib.owns(config, root))
