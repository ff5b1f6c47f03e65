"""What nf4convert adds to transformers' own bitsandbytes loading: 4-bit MoE experts.

``load_model`` loads a folder with transformers' ``from_pretrained``, so every loading rule of
transformers applies as is: key renames, ignored buffers, weights computed at init, tied weights,
the caller's model class, the load report. transformers picks the quantizer that fills the model
from the folder's ``quantization_config``; for bitsandbytes 4-bit that is ``Bnb4BitHfQuantizer``.
:class:`NF4HfQuantizer` is that quantizer with two additions:

- **Per-expert MoE weights.** transformers 5 fuses an MoE block's experts into 3-D parameters
  (``experts.gate_up_proj``) with a converter that stacks the per-expert checkpoint tensors.
  Stacking packed 4-bit bytes gives garbage, so stock transformers refuses such a folder. Here
  each such converter also collects the weights' companions (``.absmax``, ``.quant_map``, ...);
  when they are there, :class:`PackPerExpert` rebuilds each expert's ``Params4bit`` (no
  re-quantization) and puts a :class:`~nf4convert.experts.NF4Experts` in place of the fused
  parameter. Full-precision experts (``--experts keep``) go through transformers' own operations.
- **Fused 3-D MoE weights.** Experts a checkpoint stores fused (``experts.gate_up_proj``
  ``[E, 2I, H]``, gpt-oss, Granite MoE, ...) are one NF4 tensor with the usual companions, the layout
  ``bitsandbytes.nn.parametrize`` writes. Stock transformers would load the packed bytes into the
  float parameter; :class:`PackFused` converters, put before the model's own (its renames still
  apply), collect them with their companions and put a :class:`~nf4convert.experts.NF4Experts`
  in place of the parameter (nf4convert stores them in the model's layout).
- **Layers the folder does not quantize stay ``nn.Linear``.** A head that ``config.json`` names but
  the weights lack (base-model weights, ``architectures: [BertForMaskedLM]``) is initialized by
  transformers, which cannot initialize an empty 4-bit weight: only the layers whose weights the
  folder stores in 4 bits become ``Linear4bit``.
- **CPU-independent shapes.** bitsandbytes' AVX-512 CPU decode is wrong for weights whose rows are not
  whole blocks: those layers decode as one row (:mod:`nf4convert.rowdecode`), right on every CPU. Its
  AVX512-BF16 CPU path fails on layers with
  ``out_features % 32 != 0`` or ``in_features % blocksize != 0``; it is turned off for those. The
  layers that keep it refuse a forward on another device after ``.to(device)`` moved them in its
  layout (:func:`~nf4convert.rowdecode.refuse_cpu_layout_off_cpu`; bitsandbytes' ``.cuda()`` converts it back, ``.to`` does not).

:func:`nf4_quantizer` makes transformers use it for the duration of one ``from_pretrained`` call.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import bitsandbytes as bnb
import torch
from transformers.core_model_loading import ConversionOps, MergeModulelist, WeightConverter
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from .architecture import map_keys
from .errors import LoadError
from .experts import NF4Experts, place_experts
from .hfloading import registered
from .rowdecode import prepare_for_cpu, refuse_cpu_layout_off_cpu

#: the key under which transformers looks up the bitsandbytes 4-bit quantizer class
_BNB_4BIT = "bitsandbytes_4bit"


class PackPerExpert(ConversionOps):
    """The operation of one per-expert -> fused converter: ``NF4Experts`` from 4-bit experts, else
    transformers' own operations (``operations``) on full-precision ones."""

    def __init__(self, hf_quantizer: NF4HfQuantizer, weights: list[str], operations: list[ConversionOps]) -> None:
        self.hf_quantizer = hf_quantizer  # transformers then leaves the collected tensors' dtypes alone
        self.weights = weights
        self.operations = operations

    def convert(self, input_dict: dict[str, list[torch.Tensor]], *, model: Any, full_layer_name: str, missing_keys: set[str] | None = None, **kwargs: Any) -> dict:
        companions = {k: v for k, v in input_dict.items() if k not in self.weights}
        if not companions:
            for op in self.operations:
                input_dict = op.convert(input_dict, model=model, full_layer_name=full_layer_name, missing_keys=missing_keys, **kwargs)
            return input_dict
        module_name, _, name = full_layer_name.rpartition(".")
        count = model.get_parameter(full_layer_name).shape[0]
        try:
            grid = [[self._expert(input_dict, w, e, full_layer_name, count) for w in self.weights] for e in range(count)]
        except LoadError as e:
            self.hf_quantizer.errors.append(e)
            raise
        module = model.get_submodule(module_name)
        place_experts(module, name, NF4Experts.from_per_expert(grid, module._parameters[name].dtype))
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}

    @staticmethod
    def _expert(input_dict: dict[str, list[torch.Tensor]], weight: str, expert: int, target: str, count: int) -> Any:
        datas = input_dict.get(weight, [])
        stats = {k[len(weight) + 1 :]: v for k, v in input_dict.items() if k.startswith(weight + ".")}
        if any(len(v) != count for v in [datas, *stats.values()]):
            raise LoadError(f"{target}: the checkpoint lacks some of its {count} experts")
        data = datas[expert]
        return bnb.nn.Params4bit.from_prequantized(data, {k: v[expert] for k, v in stats.items()}, requires_grad=False, device=data.device)


class PackFused(ConversionOps):
    """The operation of one fused-experts converter: ``NF4Experts`` from the 3-D NF4 tensor and its
    companions (``sources``: the converter's source patterns -> the companion's suffix, ``""`` for the
    packed codes)."""

    def __init__(self, hf_quantizer: NF4HfQuantizer, sources: dict[str, str]) -> None:
        self.hf_quantizer = hf_quantizer
        self.sources = sources

    def convert(self, input_dict: dict[str, list[torch.Tensor]], *, model: Any, full_layer_name: str, missing_keys: set[str] | None = None, **kwargs: Any) -> dict:
        tensors = {self.sources[k]: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        module_name, _, name = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters[name]
        try:
            packed = tensors.pop("")
            state = bnb.functional.QuantState.from_dict(tensors, device=packed.device)
        except (KeyError, ValueError) as e:
            error = LoadError(f"{full_layer_name}: incomplete fused NF4 experts ({type(e).__name__}: {e})")
            self.hf_quantizer.errors.append(error)
            raise error from None
        shape, target = tuple(state.shape), tuple(param.shape)
        if shape != target:
            error = LoadError(f"{full_layer_name}: fused NF4 experts of shape {list(shape)} do not fit the model's {list(target)}")
            self.hf_quantizer.errors.append(error)
            raise error
        place_experts(module, name, NF4Experts.from_fused(packed, state, param.dtype))
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class NF4HfQuantizer(Bnb4BitHfQuantizer):
    """transformers' bitsandbytes 4-bit quantizer, plus per-expert 4-bit experts, full-precision layers
    for weights the folder does not quantize, and CPU-independent shapes. :func:`nf4_quantizer` makes
    a subclass per load that carries the folder's facts."""

    #: the folder's quantized weights (checkpoint names) and their shapes
    quantized: dict[str, tuple[int, ...]] = {}
    #: what the expert packing refused during this load
    errors: list[LoadError]

    def _process_model_before_weight_loading(self, model: Any, device_map: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        skipped = self.get_modules_to_not_convert(model, config.llm_int8_skip_modules, model._keep_in_fp32_modules)
        targets = {m.key for m in map_keys(model, sorted(self.quantized)).values()}
        absent = [
            name
            for name, module in model.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D))
            and f"{name}.weight" not in targets
            and should_convert_module(name, skipped)
        ]
        if absent:
            config.llm_int8_skip_modules = list(config.llm_int8_skip_modules or skipped) + absent
        super()._process_model_before_weight_loading(model, device_map, **kwargs)

    def _fused_converters(self, model: Any, suffixes: list[str]) -> list[WeightConverter]:
        """A converter for each fused-experts parameter of the folder, matching its key after the model's
        renames (the part after the layer number) and its companions."""
        fused = [name for name, shape in self.quantized.items() if len(shape) == 3]
        leaves = sorted({re.split(r"\.\d+\.", m.key)[-1] for m in map_keys(model, fused).values()})
        converters = []
        for leaf in leaves:
            sources = {re.escape(leaf + suffix) + "$": suffix for suffix in ["", *suffixes]}
            converters.append(WeightConverter(list(sources), leaf, operations=[PackFused(self, sources)]))
        return converters

    def update_weight_conversions(self, weight_conversions: list, model: Any) -> list:
        suffixes = [n.removeprefix("weight") for n in self.serialized_names["weight"] if n != "weight"]
        updated = self._fused_converters(model, suffixes)
        for converter in weight_conversions:
            sources = list(getattr(converter, "_original_source_patterns", []))
            if (
                isinstance(converter, WeightConverter)
                and any(isinstance(op, MergeModulelist) for op in converter.operations)
                and all(s.endswith(".weight") for s in sources)
            ):
                op = PackPerExpert(self, sources, list(converter.operations))
                converter = converter.copy(sources + [s + x for s in sources for x in suffixes], converter._original_target_patterns, operations=[op])
            updated.append(converter)
        return super().update_weight_conversions(updated, model)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for module in prepare_for_cpu(model):
            module.register_forward_pre_hook(refuse_cpu_layout_off_cpu)
        return super()._process_model_after_weight_loading(model, **kwargs)


@contextlib.contextmanager
def nf4_quantizer(quantized: dict[str, tuple[int, ...]]) -> Iterator[list[LoadError]]:
    """Within the block, transformers loads bitsandbytes 4-bit folders with :class:`NF4HfQuantizer`.

    transformers chooses the quantizer class by the folder's ``quant_method`` from its registry;
    :func:`~nf4convert.hfloading.registered` swaps the entry for the block.

    Args:
        quantized: the checkpoint names of the folder's 4-bit weights, and their shapes.

    Yields:
        The list of errors the expert packing met (the reason behind transformers' conversion error).
    """
    errors: list[LoadError] = []
    quantizer = type("NF4HfQuantizer", (NF4HfQuantizer,), {"quantized": dict(quantized), "errors": errors})
    with registered(_BNB_4BIT, quantizer):
        yield errors
