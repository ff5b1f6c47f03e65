"""The native NF4 kernel: ``kernel.c``, compiled at first use and called through ctypes.

The shared library is built once per source, compiler and platform into a cache folder
(``$NF4CONVERT_CACHE``, else ``$XDG_CACHE_HOME/nf4convert``, else ``~/.cache/nf4convert``)
and reused by later processes. ctypes releases the GIL during the call, so Python threads
quantize disjoint block ranges in parallel. Where no C compiler works, :func:`library`
returns ``None`` and the caller uses the eager torch kernel. ``NF4CONVERT_SIMD=0`` in the
environment selects the portable C path over AVX2 (same bytes; for debugging and the tests).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import torch

from .constants import ABSMAX_FLOOR, SEARCH_GRID, SEARCH_MIN_SCALE
from .files import cache_dir

SOURCE = Path(__file__).with_name("kernel.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Elements per call: enough to amortize the call, few enough to share a tensor between threads.
_ELEMENTS_PER_CALL = 1 << 20


def _compiler() -> str | None:
    return next((shutil.which(c) for c in (os.environ.get("CC", ""), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def build() -> Path:
    """Compile ``kernel.c`` into a shared library (or reuse a cached one); return its path.

    Raises:
        OSError, subprocess.CalledProcessError: no working C compiler.
    """
    cc = _compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler (cc, gcc or clang) on the PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(FLAGS).encode(), platform.platform().encode()])).hexdigest()[:16]
    folder = cache_dir()
    lib = folder / f"nf4kernel-{key}{'.dll' if sys.platform == 'win32' else '.so'}"
    if lib.exists():
        return lib
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: build for this process only
        folder = Path(tempfile.mkdtemp(prefix="nf4convert-"))
        lib = folder / lib.name
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        built = Path(tmp) / lib.name
        subprocess.run([cc, *FLAGS, "-o", str(built), str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(built, lib)  # atomic: concurrent first uses each build, one wins
    return lib


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(build()))
    except subprocess.CalledProcessError as e:
        first = (e.stderr or b"").decode(errors="replace").strip().splitlines()[:1]
        return None, f"{e.cmd[0]} failed: {first[0] if first else f'exit {e.returncode}'}"
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    lib.nf4_quantize_blocks.restype = None
    lib.nf4_quantize_blocks.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.nf4_simd.restype = ctypes.c_int
    lib.nf4_exponent_sums.restype = None
    lib.nf4_exponent_sums.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.nf4_quantize_nested.restype = None
    lib.nf4_quantize_nested.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.nf4_decode_fp8.restype = None
    lib.nf4_decode_fp8.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 2, ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int]
    lib.nf4_search_blocks.restype = None
    lib.nf4_search_blocks.argtypes = [
        ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.nf4_encode_blocks.restype = None
    lib.nf4_encode_blocks.argtypes = [
        ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on the first call in a process), or ``None`` where it cannot be built."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why :func:`library` is ``None`` (empty when it is not)."""
    return _load()[1]


def _simd() -> bool:
    return os.environ.get("NF4CONVERT_SIMD") != "0"


def variant() -> str:
    """What the native kernel runs as here: ``"avx2"`` or ``"portable"``."""
    lib = library()
    return "avx2" if _simd() and lib is not None and lib.nf4_simd() else "portable"


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="nf4-quantize")


def quantize_blocks(blocks: torch.Tensor, thresholds: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> None:
    """Quantize full blocks (a contiguous CPU ``[rows, bs]`` tensor, bs a multiple of 32) into
    ``packed`` (uint8 ``[rows * bs // 2]``) and ``absmax`` (float32 ``[rows]``), on
    ``torch.get_num_threads()`` threads."""
    lib = library()
    assert lib is not None and blocks.is_contiguous() and blocks.shape[1] % 32 == 0
    rows, bs = blocks.shape
    per_call = max(1, _ELEMENTS_PER_CALL // bs)
    t = thresholds.contiguous()
    args = (blocks.data_ptr(), _DTYPES[blocks.dtype])
    out = (t.data_ptr(), ABSMAX_FLOOR, packed.data_ptr(), absmax.data_ptr(), int(_simd()))

    def run(first: int) -> None:
        lib.nf4_quantize_blocks(*args, first, min(per_call, rows - first), bs, *out)

    starts = range(0, rows, per_call)
    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        for first in starts:
            run(first)
    else:
        list(_pool(threads).map(run, starts))


def _split(rows: int, cols: int, run) -> None:
    """Call ``run(first, count)`` over ranges of rows (or blocks) of ``cols`` elements, about
    :data:`_ELEMENTS_PER_CALL` elements a call, on ``torch.get_num_threads()`` threads."""
    per_call = max(1, _ELEMENTS_PER_CALL // max(1, cols))
    starts = range(0, rows, per_call)
    threads = min(torch.get_num_threads(), len(starts))
    jobs = [(first, min(per_call, rows - first)) for first in starts]
    if threads <= 1:
        for job in jobs:
            run(*job)
    else:
        list(_pool(threads).map(lambda job: run(*job), jobs))


def decode_fp8(data: torch.Tensor, scale: torch.Tensor, first_row: int, block: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    """float32 decoding of FP8 rows (``data`` uint8 ``[rows, cols]``, contiguous; see ``nf4_decode_fp8``)
    into ``out`` (float32, contiguous, as many elements); returns ``out`` shaped ``[rows, cols]``."""
    lib = library()
    rows, cols = data.shape
    out = out.view(rows, cols)
    s = scale.contiguous()

    def run(first: int, count: int) -> None:
        lib.nf4_decode_fp8(
            data.data_ptr() + first * cols, count, cols, s.data_ptr(), s.shape[1],
            first_row + first, block[0], block[1], out.data_ptr() + 4 * first * cols, int(_simd()),
        )  # fmt: skip

    _split(rows, cols, run)
    return out


def search_blocks(
    flat: torch.Tensor, bs: int, thresholds: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, packed: torch.Tensor,
    importance: torch.Tensor | None = None, offset: int = 0, grid: tuple[float, ...] = SEARCH_GRID,
) -> None:
    """``--scales search`` of every block of ``flat`` (contiguous CPU) into ``absmax`` and ``packed``;
    a partial last block must already hold its absmax encoding, which it keeps where the search does not
    apply. Each element's error is weighted by ``importance`` of its column (``offset`` is ``flat``'s
    first element's place in its matrix); ``grid``: the candidates' factors (the spec's is
    :data:`~nf4convert.constants.SEARCH_GRID`; others are for measuring); see ``nf4_search_blocks``."""
    lib = library()
    t, c = thresholds.contiguous(), code.contiguous()
    imp = importance.contiguous() if importance is not None else None
    cols = imp.numel() if imp is not None else 1
    if not 0 < len(grid) <= 16:
        raise ValueError("the search takes 1 to 16 grid factors")
    factors = (ctypes.c_float * len(grid))(*grid)
    n = flat.numel()

    def run(first: int, count: int) -> None:
        lib.nf4_search_blocks(
            flat.data_ptr(), _DTYPES[flat.dtype], n, first, count, bs, t.data_ptr(), c.data_ptr(), factors, len(grid),
            ABSMAX_FLOOR, SEARCH_MIN_SCALE, imp.data_ptr() if imp is not None else None, cols, offset,
            absmax.data_ptr(), packed.data_ptr(), int(_simd()),
        )  # fmt: skip

    _split(absmax.numel(), bs, run)


def encode_blocks(flat: torch.Tensor, bs: int, thresholds: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed codes of ``flat`` for the given per-block scales; see ``nf4_encode_blocks``."""
    lib = library()
    t, s = thresholds.contiguous(), scales.contiguous()
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)

    def run(first: int, count: int) -> None:
        lib.nf4_encode_blocks(
            flat.data_ptr(), _DTYPES[flat.dtype], n, first, count, bs, t.data_ptr(), s.data_ptr(), SEARCH_MIN_SCALE, packed.data_ptr(), int(_simd())
        )  # fmt: skip

    _split(s.numel(), bs, run)
    return packed


def exponent_sums(values: torch.Tensor) -> list[int]:
    """Significands of non-negative finite float32 values summed by biased exponent (256 sums)."""
    v = values.contiguous()
    sums = torch.zeros(256, dtype=torch.int64)
    library().nf4_exponent_sums(v.data_ptr(), v.numel(), sums.data_ptr())
    return sums.tolist()


def quantize_nested(absmax: torch.Tensor, offset: float, thresholds: torch.Tensor, nested_blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of ``absmax - offset`` per block of ``nested_blocksize``, and each block's scale."""
    a, t = absmax.contiguous(), thresholds.contiguous()
    codes = torch.empty(a.numel(), dtype=torch.uint8)
    nested = torch.empty(-(-a.numel() // nested_blocksize), dtype=torch.float32)
    library().nf4_quantize_nested(a.data_ptr(), a.numel(), nested_blocksize, offset, t.data_ptr(), ABSMAX_FLOOR, codes.data_ptr(), nested.data_ptr())
    return codes, nested
