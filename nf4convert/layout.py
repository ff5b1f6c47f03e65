"""What a quantized weight becomes on disk (spec/FORMAT.md, section 4), and the quant-state blob.

Shared by the planner (sizes), the writer (contents) and the reader (validation).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .constants import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_STATE_SUFFIXES, QUANTIZABLE_DTYPES, SUPPORTED_VERSIONS
from .errors import FormatError, QuantizationError, UnsupportedVersionError

#: How ``nested_offset`` is written in the blob: fixed length, so the blob's size is known before quantizing.
OFFSET_FORMAT = "{:.9e}"


def transposed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with its last two dimensions swapped: how a transposed weight (GPT-2 ``Conv1D``; each
    expert of fused experts) is quantized."""
    return (*shape[:-2], shape[-1], shape[-2])


def check_blocksize(blocksize: int) -> None:
    """Raise :class:`QuantizationError` unless ``blocksize`` is one bitsandbytes accepts."""
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"invalid blocksize {blocksize}; choose one of {', '.join(map(str, BLOCKSIZES))}")


@dataclass(frozen=True)
class QuantState:
    """The parsed quant-state blob of one weight.

    Attributes:
        shape: the original (for ``Conv1D``: transposed) weight shape.
        dtype: the original dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``).
        blocksize: elements per absmax.
        offset: the double-quantization offset, or ``None`` without double quantization.
        quant_type: ``"nf4"`` (what nf4convert writes), or ``"fp4"`` in a bitsandbytes folder.
    """

    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    offset: float | None = None
    quant_type: str = "nf4"

    @property
    def nested(self) -> bool:
        return self.offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)


def encode_quant_state(state: QuantState) -> bytes:
    """The blob bitsandbytes' ``QuantState.as_dict(packed=True)`` writes, key for key.

    Without double quantization the bytes equal bitsandbytes'; with it, ``nested_offset``
    is written with :data:`OFFSET_FORMAT` instead of Python's shortest repr.
    """
    head = {"quant_type": state.quant_type, "blocksize": state.blocksize, "dtype": state.dtype, "shape": list(state.shape)}
    text = json.dumps(head)
    if state.nested:
        tail = json.dumps({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32"})
        text = f"{text[:-1]}, {tail[1:-1]}, \"nested_offset\": {OFFSET_FORMAT.format(state.offset)}}}"
    return text.encode("utf-8")


def decode_quant_state(blob: bytes, *, where: str, quant_types: tuple[str, ...] = ("nf4",)) -> QuantState:
    """Parse and check a quant-state blob.

    Args:
        quant_types: the 4-bit types accepted (bitsandbytes folders may hold ``"fp4"``).

    Raises:
        FormatError: not JSON, another 4-bit type, or fields of the wrong type or value; the message names ``where``.
    """
    try:
        d: Any = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError(f"{where}: quant-state blob is not JSON") from None
    if not isinstance(d, dict):
        raise FormatError(f"{where}: quant-state blob is not a JSON object")
    if d.get("quant_type") not in quant_types:
        raise FormatError(f"{where}: quant_type {d.get('quant_type')!r} is not {' or '.join(map(repr, quant_types))}")
    shape, blocksize, dtype = d.get("shape"), d.get("blocksize"), d.get("dtype")
    if not isinstance(shape, list) or not shape or not all(type(s) is int and s > 0 for s in shape):
        raise FormatError(f"{where}: bad shape {shape!r}")
    if type(blocksize) is not int or blocksize <= 0:
        raise FormatError(f"{where}: bad blocksize {blocksize!r}")
    if dtype not in QUANTIZABLE_DTYPES.values():
        raise FormatError(f"{where}: bad dtype {dtype!r}")
    offset = None
    if "nested_offset" in d:
        offset = d["nested_offset"]
        if (
            type(offset) not in (int, float)
            or not math.isfinite(offset)
            or d.get("nested_blocksize") != NESTED_BLOCKSIZE
            or d.get("nested_dtype") != "float32"
        ):
            raise FormatError(f"{where}: bad nested quantization fields")
    return QuantState(tuple(shape), dtype, blocksize, None if offset is None else float(offset), d["quant_type"])


def quantized_tensors(weight_key: str, state: QuantState) -> list[tuple[str, str, tuple[int, ...]]]:
    """The tensors ``(key, safetensors dtype, shape)`` that hold one quantized weight ``<module>.weight``."""
    nb = state.n_blocks
    out = [
        (weight_key, "U8", ((state.numel + 1) // 2, 1)),
        (f"{weight_key}.absmax", "U8" if state.nested else "F32", (nb,)),
        (f"{weight_key}.quant_map", "F32", (16,)),
    ]
    if state.nested:
        out += [
            (f"{weight_key}.nested_absmax", "F32", (-(-nb // NESTED_BLOCKSIZE),)),
            (f"{weight_key}.nested_quant_map", "F32", (256,)),
        ]
    out.append((f"{weight_key}.{QUANT_STATE_SUFFIXES[state.quant_type]}", "U8", (len(encode_quant_state(state)),)))
    return out


def quantization_config(*, double_quant: bool, compute_dtype: str, skip_modules: list[str]) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``, as transformers writes it for bitsandbytes NF4."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def check_version(manifest: dict[str, Any], *, where: str) -> int:
    """Return the manifest's format version, or raise if this reader does not support it.

    Raises:
        UnsupportedVersionError: a version outside :data:`~nf4convert.constants.SUPPORTED_VERSIONS`.
        FormatError: the field is missing.
    """
    version = manifest.get("format_version")
    if type(version) is not int:
        raise FormatError(f"{where}: no format_version")
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_VERSIONS))
        raise UnsupportedVersionError(
            f"{where}: format version {version} is not supported by this nf4convert (reads {supported}); upgrade nf4convert"
        )
    return version
