"""spec/FORMAT.md and the code agree: its tables equal the constants, its vectors equal the quantizer's bytes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from nf4convert.constants import DYNAMIC_MAP, FORMAT_VERSION, NF4_CODE
from nf4convert.layout import QuantState, decode_quant_state, encode_quant_state
from nf4convert.quantize import NF4_THRESHOLDS, NF4Weight, dequantize, quantize_nf4, quantize_weight

from .reference import reference_search

SPEC = Path(__file__).resolve().parent.parent / "spec"
TEXT = (SPEC / "FORMAT.md").read_text()
VECTORS = json.loads((SPEC / "vectors" / "vectors.json").read_text())
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def table(name: str) -> list[list[str]]:
    body = re.search(rf"<!-- table:{name} -->\n(.*?)<!-- end -->", TEXT, re.S).group(1)
    rows = [r.strip().strip("|").split("|") for r in body.strip().splitlines()[2:]]
    return [[c.strip() for c in r] for r in rows]


def bits(value: float) -> int:
    return int(np.float32(value).view(np.uint32))


def test_spec_names_the_current_version():
    assert f"# nf4convert on-disk format, version {FORMAT_VERSION}" in TEXT


def test_code_table_in_spec_equals_constants():
    rows = table("nf4_code")
    assert [int(r[0]) for r in rows] == list(range(16))
    assert [int(r[2], 16) for r in rows] == [bits(v) for v in NF4_CODE]
    assert [np.float32(r[1]) for r in rows] == [np.float32(v) for v in NF4_CODE]


def test_threshold_table_in_spec_equals_the_midpoints():
    rows = table("nf4_thresholds")
    assert [int(r[2], 16) for r in rows] == [bits(v) for v in NF4_THRESHOLDS.tolist()]


def test_dynamic_map_in_spec_equals_constants():
    values = [int(h, 16) for r in table("dynamic_map") for h in r[1].split()]
    assert values == [bits(v) for v in DYNAMIC_MAP]


@pytest.mark.parametrize("case", VECTORS["vectors"], ids=lambda c: c["name"])
def test_vectors(case):
    dtype = DTYPES[case["dtype"]]
    w = torch.frombuffer(bytearray.fromhex(case["input"]), dtype=dtype).reshape(case["shape"])
    q = quantize_weight(w, blocksize=case["blocksize"], double_quant=case["double_quant"])
    assert q.packed.numpy().tobytes().hex() == case["weight"]
    assert q.absmax.numpy().tobytes().hex() == case["absmax"]
    state = QuantState(tuple(case["shape"]), case["dtype"], case["blocksize"], q.offset)
    assert encode_quant_state(state).decode() == case["quant_state"]
    if case["double_quant"]:
        assert q.nested_absmax.numpy().tobytes().hex() == case["nested_absmax"]
        assert float(q.offset).hex() == case["offset"]
    # a reader that sees only the stored bytes rebuilds the same weight
    parsed = decode_quant_state(case["quant_state"].encode(), where=case["name"])
    stored = NF4Weight(
        torch.frombuffer(bytearray.fromhex(case["weight"]), dtype=torch.uint8).reshape(-1, 1),
        torch.frombuffer(bytearray.fromhex(case["absmax"]), dtype=torch.uint8 if parsed.nested else torch.float32),
        parsed.shape, dtype, parsed.blocksize,
        torch.frombuffer(bytearray.fromhex(case["nested_absmax"]), dtype=torch.float32) if parsed.nested else None,
        parsed.offset,
    )
    assert torch.equal(dequantize(stored), dequantize(q))
    assert math.prod(parsed.shape) == w.numel()


@pytest.mark.parametrize("case", VECTORS["search_vectors"], ids=lambda c: c["name"])
def test_search_vectors(case):
    """``--scales search`` (section 2.6, no double quantization): the codes and float32 scales."""
    w = torch.frombuffer(bytearray.fromhex(case["input"]), dtype=DTYPES[case["dtype"]]).reshape(case["shape"])
    importance = torch.frombuffer(bytearray.fromhex(case["importance"]), dtype=torch.float32) if case["importance"] else None
    packed, scales = quantize_nf4(w, blocksize=case["blocksize"], kernel="native", scales="search", importance=importance)
    assert packed.numpy().tobytes().hex() == case["weight"]
    assert scales.numpy().tobytes().hex() == case["absmax"]
    spec = reference_search(w, case["blocksize"], quantize_nf4(w, blocksize=case["blocksize"], kernel="native"), importance)
    assert torch.equal(spec[0], packed) and torch.equal(spec[1], scales)


@pytest.mark.parametrize("case", VECTORS["mxfp4_vectors"], ids=lambda c: c["name"])
def test_mxfp4_vectors(case):
    """MXFP4 sources (section 6.4): blocks and scales decode to these bfloat16 values, ``[E, G * 32, R]``."""
    from nf4convert.mxfp4 import decode

    blocks = torch.frombuffer(bytearray.fromhex(case["blocks"]), dtype=torch.uint8).reshape(case["blocks_shape"])
    scales = torch.frombuffer(bytearray.fromhex(case["scales"]), dtype=torch.uint8).reshape(case["blocks_shape"][:-1])
    assert decode(blocks, scales, name=case["name"]).to(torch.bfloat16).view(torch.uint8).numpy().tobytes().hex() == case["decoded"]


def test_blob_without_double_quant_is_what_bitsandbytes_writes():
    from bitsandbytes.utils import pack_dict_to_tensor

    state = QuantState((4096, 11008), "bfloat16", 64)
    ref = pack_dict_to_tensor({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": (4096, 11008)})
    assert encode_quant_state(state) == bytes(ref.tolist())


def test_blob_offset_has_a_fixed_length():
    lengths = {len(encode_quant_state(QuantState((8, 8), "float16", 64, o))) for o in (0.0, 1e-30, 0.05, 3.4e38)}
    assert len(lengths) == 1


def test_name_rules_in_spec_equal_the_code():
    from nf4convert import decisions as a

    section = TEXT[TEXT.index("### 6.2 Decided by name rules") : TEXT.index("## 7. Side files")]
    for names in (a.EMBEDDING_NAMES, a.OUTPUT_HEADS, a.ROUTER_NAMES, a.MOE_BLOCKS, *a.CONV1D_MODULES.values(), a.CONV1D_MODULES):
        for name in names:
            assert f"`{name}`" in section, name


def test_search_encoder_constants_in_spec_equal_the_code():
    from nf4convert.constants import SEARCH_GRID, SEARCH_MIN_SCALE

    section = TEXT[TEXT.index("### 2.6 Encoders") : TEXT.index("## 3. Double quantization")]
    assert f"`SEARCH_GRID` (`{', '.join(str(f) for f in SEARCH_GRID)}`)" in section
    assert f"`SEARCH_MIN_SCALE` (`{SEARCH_MIN_SCALE:g}`)" in section
