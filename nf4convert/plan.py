"""The conversion plan: which tensors are quantized, which are kept and why, and the output shards.

The choice is made by :mod:`nf4convert.architecture` from the model transformers builds for
``config.json`` on the meta device, or by name rules where it cannot (spec/FORMAT.md, section 6):
a plan costs no tensor reads.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections import Counter
from dataclasses import dataclass, field, replace

from .constants import (
    BLOCKSIZES,
    BUDGET_BITS,
    DEFAULT_BLOCKSIZE,
    DTYPE_SIZES,
    EXPERT_MODES,
    SCALE_METHODS,
    QUANTIZABLE_DTYPES,
    WeightFiles,
)
from .decisions import Decisions
from .awq import check_scalings
from .awq import record as awq_record
from .errors import OptionError, QuantizationError
from .files import FileHasher
from .fp8 import LOGICAL_DTYPE, pair_scales
from .importance import check_importance, importance_shape, read_importance_header
from .layout import QuantState, check_blocksize, quantized_tensors, transposed
from .libraries import Library, library_for
from .source import Source, SourceTensor, split_tensor

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000


@dataclass(frozen=True)
class Options:
    """Conversion options (the CLI's flags).

    Attributes:
        blocksize: elements per absmax (32 ... 4096).
        double_quant: 8-bit quantize the absmax (QLoRA's double quantization).
        compute_dtype: recorded as ``bnb_4bit_compute_dtype``; ``None`` means the weights' own dtype.
        skip: glob patterns over module names whose weights are kept.
        quantize_lm_head: quantize the output head too (kept by default).
        max_shard_size: output shard size limit in bytes.
        experts: MoE expert weights: ``"quantize"`` (per expert) or ``"keep"`` (as transformers 5 does).
        scales: each block's scale: ``"absmax"`` (bit-exact with bitsandbytes) or ``"search"`` (least squared
            error, spec section 2.6; the same format and loaders).
        importance: with ``"search"``, an importance file (:mod:`nf4convert.importance`) that weights each
            element's error by its input column's activation energy.
        bits: a size budget in bits per parameter of the weights that would be quantized: the modules
            whose quantization costs the most per extra bit are kept (:mod:`nf4convert.budget`).
        small_blocks: glob patterns over module names (as ``skip``) whose weights are quantized at
            blocksize 32, the smallest bitsandbytes reads (each weight's quant state says its own
            blocksize); what a size budget buys besides kept modules.
        awq: apply the activation-aware scaling the importance file holds (:mod:`nf4convert.awq`) to
            the weights before they are quantized (and to the norms and biases it divides).
    """

    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = True
    compute_dtype: str | None = None
    skip: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    experts: str = "quantize"
    scales: str = "absmax"
    importance: str | None = None
    bits: float | None = None
    small_blocks: tuple[str, ...] = ()
    awq: bool = False

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize)
        if self.compute_dtype not in (None, *QUANTIZABLE_DTYPES.values()):
            raise OptionError(f"invalid compute dtype {self.compute_dtype!r}; choose float32, float16 or bfloat16")
        if self.max_shard_size <= 0:
            raise OptionError("max shard size must be positive")
        if self.scales not in SCALE_METHODS:
            raise OptionError(f"invalid scale method {self.scales!r}; choose {' or '.join(SCALE_METHODS)}")
        if self.awq and self.importance is None:
            raise OptionError("--awq applies the scales measured by `nf4convert importance --awq`: give that file with --importance")
        if self.importance is not None and self.scales != "search" and not self.awq:
            raise OptionError("--importance weights the scale search (--scales search) or carries activation-aware scales (--awq): it needs one of them")
        if self.bits is not None and not BUDGET_BITS[0] <= self.bits <= BUDGET_BITS[1]:
            raise OptionError(f"--bits {self.bits:g}: a budget is {BUDGET_BITS[0]} (every weight in NF4) to {BUDGET_BITS[1]:g} bits per parameter")
        if self.experts not in EXPERT_MODES:
            raise OptionError(f"invalid experts mode {self.experts!r}; choose {' or '.join(EXPERT_MODES)}")


@dataclass(frozen=True)
class PlannedTensor:
    """What happens to one source tensor.

    Attributes:
        source: the source tensor.
        quantize: whether it is quantized (else copied byte for byte).
        reason: why, in a few words.
        transpose: quantize the transpose (GPT-2 ``Conv1D`` weights).
        expert: a per-expert MoE weight.
        outputs: the output tensors ``(key, dtype, shape)`` it becomes.
        scale: for an FP8 weight, its ``_scale_inv`` tensor (:mod:`nf4convert.fp8`).
        blocksize: elements per absmax of this weight (the options', or 32 for ``small_blocks``).
        cast: for a kept tensor written in another dtype than the source's (diffusers' float32
            modules), that safetensors dtype.
        scaled: transformed by the activation-aware scaling (``--awq``) before it is quantized or written.
    """

    source: SourceTensor
    quantize: bool
    reason: str
    transpose: bool = False
    expert: bool = False
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    scale: SourceTensor | None = None
    blocksize: int = DEFAULT_BLOCKSIZE
    cast: str | None = None
    scaled: bool = False

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dtype(self) -> str:
        """The safetensors dtype the tensor is written as (a quantized one counts as): its own, bfloat16
        for a decoded FP8 weight, or the one it is cast to."""
        return self.cast or (LOGICAL_DTYPE if self.scale is not None else self.source.info.dtype)

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(shape) * DTYPE_SIZES[dtype] for _, dtype, shape in self.outputs)

    def quant_state(self, options: Options, offset: float | None = None) -> QuantState:
        """The quant state this tensor is written with (``offset`` is known after quantizing)."""
        shape = transposed(self.source.info.shape) if self.transpose else self.source.info.shape
        dtype = QUANTIZABLE_DTYPES[self.dtype]
        return QuantState(tuple(shape), dtype, self.blocksize, (offset or 0.0) if options.double_quant else None)


@dataclass
class Plan:
    """The whole conversion, decided before any tensor is read."""

    source: Source
    options: Options
    tensors: list[PlannedTensor]
    decisions: Decisions
    shards: list[list[PlannedTensor]] = field(default_factory=list)
    weighted: list[str] = field(default_factory=list)  # the quantized weights the importance file weights
    budget: dict | None = None  # what --bits kept (nf4convert.budget.apply_budget)
    scaling: dict | None = None  # the activation-aware scaling applied (--awq): the importance file's record
    hashes: FileHasher | None = None  # the source shards' hashes, begun while planning (convert.plan_conversion)

    @property
    def quantized(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if t.quantize]

    @property
    def kept(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if not t.quantize]

    @property
    def parameters(self) -> int:
        return sum(t.source.info.numel for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(t.output_bytes for t in self.tensors)

    @property
    def bits_per_parameter(self) -> float:
        """Output bits per source parameter, all tensors counted."""
        return 8 * self.output_bytes / max(1, self.parameters)

    @property
    def quantized_bits_per_parameter(self) -> float:
        """Output bits per parameter of the quantized weights alone (4.127 at blocksize 64 with double quant)."""
        params = sum(t.source.info.numel for t in self.quantized)
        return 8 * sum(t.output_bytes for t in self.quantized) / max(1, params)

    @property
    def compute_dtype(self) -> str:
        if self.options.compute_dtype:
            return self.options.compute_dtype
        dtypes = [t.dtype for t in self.quantized]
        return QUANTIZABLE_DTYPES[max(set(dtypes), key=dtypes.count)] if dtypes else "float32"

    @property
    def decided_by(self) -> str:
        """What decided which tensors are quantized: transformers (version, class) or the name rules."""
        return self.decisions.decided_by

    @property
    def skip_modules(self) -> list[str]:
        """``llm_int8_skip_modules``: the exact modules a loader must leave unquantized."""
        return self.decisions.skip_modules

    @property
    def library(self) -> Library:
        """The source's library (:mod:`nf4convert.libraries`): its decisions, file names, config, loaders."""
        return library_for(self.source.config, self.source.root)

    @property
    def loaders(self) -> list[str]:
        """Which loaders read the output (what the tests check)."""
        return self.library.loaders(self.decisions, self.source.config)

    @property
    def files(self) -> WeightFiles:
        """How the output's weights files are named: as the source's library names them."""
        return self.library.files

    def quantization_config(self) -> dict:
        return self.library.quantization_config(double_quant=self.options.double_quant, compute_dtype=self.compute_dtype, skip_modules=self.skip_modules)

    def shard_names(self) -> list[str]:
        return self.files.names(len(self.shards))


def check_skip_patterns(patterns: tuple[str, ...], tensor_names: list[str]) -> None:
    """Refuse a ``--skip`` pattern that matches no module of the checkpoint, naming close ones.

    Patterns are globs over whole module names (``fnmatch``, case-sensitive): ``*pooler*`` or
    ``pooler.dense`` match BERT's pooler, a bare ``pooler`` does not.

    Raises:
        OptionError: the first pattern that matches nothing.
    """
    modules = sorted({name.rpartition(".")[0] or name for name in tensor_names})
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            continue
        core = pattern.strip("*.")
        close = [m for m in modules if core and core in m][:3] or difflib.get_close_matches(pattern, modules, n=3, cutoff=0.4)
        hint = f"; modules like it: {', '.join(close)}" if close else ""
        raise OptionError(f"--skip {pattern!r} matches no module (patterns are globs over whole module names, e.g. '*{core}*'){hint}")


def make_plan(source: Source, options: Options) -> Plan:
    """Plan the conversion of ``source``: classify every tensor and cut the output into shards.

    Tensors go to shards in source order; a shard is closed at the end of each source shard (so that
    each output shard is one task reading one source shard, :mod:`nf4convert.task`) and before the
    tensor that would take it past ``options.max_shard_size`` (a tensor larger than the limit gets a
    shard of its own).

    Raises:
        QuantizationError: nothing to quantize would be an empty conversion, so it is refused.
    """
    check_skip_patterns(options.skip, [t.name for t in source.tensors])
    scales = pair_scales([t.info for t in source.tensors], source.fp8_block, where=source.name) if source.fp8_block else {}
    folded = {s.name for s in scales.values()}
    owners = {t.name: t for t in source.tensors}
    tensors = [t for t in source.tensors if t.name not in folded]
    decisions = library_for(source.config, source.root).decide(
        [replace(t.info, dtype=LOGICAL_DTYPE) if t.name in scales else t.info for t in tensors], config=source.config,
        skip=options.skip, quantize_lm_head=options.quantize_lm_head, experts=options.experts, blocksize=options.blocksize,
    )  # fmt: skip
    if decisions.splits:  # fused experts that transformers loads per expert: one weight per expert
        tensors = [part for t in tensors for part in ([split_tensor(t, *spec) for spec in decisions.splits[t.name]] if t.name in decisions.splits else [t])]
    planned = []
    for tensor in tensors:
        d = decisions.tensors[tensor.name]
        scale = owners[scales[tensor.name].name] if tensor.name in scales else None
        small = d.quantize and any(fnmatch.fnmatchcase(tensor.name.rpartition(".")[0], p) for p in options.small_blocks)
        p = PlannedTensor(tensor, d.quantize, d.reason, d.transpose, d.expert, scale=scale, blocksize=BLOCKSIZES[0] if small else options.blocksize, cast=d.dtype)
        if d.quantize:
            outputs = quantized_tensors(tensor.name, p.quant_state(options))
        else:
            outputs = [(tensor.name, p.dtype, tensor.info.shape)]
        planned.append(replace(p, outputs=tuple(outputs)))
    plan = Plan(source, options, planned, decisions)
    if options.importance is not None:
        shapes = {t.name: importance_shape(t.source.info.shape, transposed=t.transpose) for t in plan.quantized}
        plan.weighted = check_importance(read_importance_header(options.importance), shapes, where=options.importance)
    if options.awq:
        plan.scaling = awq_record(options.importance)
        if plan.scaling is None:
            raise QuantizationError(f"{options.importance}: holds no activation-aware scales; measure them with `nf4convert importance --awq`")
        scaled = plan.scaling["tensors"]
        if not scaled:
            reasons = sorted({r["reason"] for r in plan.scaling.get("refused", [])})[:2]
            raise QuantizationError(
                f"{options.importance}: no activation-aware scaling preserves this model's function"
                + (f" ({'; '.join(reasons)})" if reasons else "") + ": convert without --awq"
            )
        check_scalings(options.importance, scaled, {t.name: tuple(t.source.info.shape) for t in plan.tensors if t.source.split is None and t.source.packed is None})
        plan.tensors = planned = [replace(t, scaled=True) if t.name in scaled else t for t in planned]
    if not plan.quantized:
        reasons = Counter(t.reason for t in plan.kept if len(t.source.info.shape) == 2 and t.dtype in QUANTIZABLE_DTYPES)
        fp8 = sum(len(t.source.info.shape) == 2 and t.source.info.dtype.startswith("F8_") for t in plan.kept)
        why = (
            f"{decisions.decided_by}: " + ", ".join(f"{n} x {r}" for r, n in reasons.most_common(3)) if reasons
            else f"its {fp8} 2-D weights are FP8 and no quantization_config says how they decode: an FP8 source is read with its config.json (spec 6.3)" if fp8
            else "no 2-D floating-point linear weights found"
        )
        raise QuantizationError(f"{source.name}: no tensor to quantize ({why})")
    shard: list[PlannedTensor] = []
    size = 0
    for t in planned:
        if shard and (size + t.output_bytes > options.max_shard_size or t.source.shard != shard[-1].source.shard):
            plan.shards.append(shard)
            shard, size = [], 0
        shard.append(t)
        size += t.output_bytes
    plan.shards.append(shard)
    return plan
