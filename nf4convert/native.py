"""The native NF4 kernel: ``kernel.c``, compiled at first use and called through ctypes.

The shared library is built once per source, compiler and platform into a cache folder
(``$NF4CONVERT_CACHE``, else ``$XDG_CACHE_HOME/nf4convert``, else ``~/.cache/nf4convert``)
and reused by later processes. ctypes releases the GIL during the call, so Python threads
quantize disjoint block ranges in parallel. It works on numpy arrays and never imports torch
(the default conversion runs without it). Where no C compiler works, :func:`library` returns
``None`` and the caller uses the eager torch kernel. ``NF4CONVERT_SIMD=0`` in the
environment selects the portable C path, ``NF4CONVERT_SIMD=avx2`` caps it at AVX2 where the CPU has
AVX-512 (same bytes; for debugging and the tests).

The functions that read a source may read a memory-mapped file once :func:`guard` says the
kernel's SIGBUS handler is in place: a file truncated under the mapping is then a
:class:`~nf4convert.errors.SourceError`, not the end of the process.
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
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from functools import cache
from pathlib import Path

import numpy as np

from .constants import ABSMAX_FLOOR, DTYPE_SIZES, SEARCH_GRID, SEARCH_MIN_SCALE
from .errors import SourceError
from .files import cache_dir

SOURCE = Path(__file__).with_name("kernel.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
_DTYPES = {"F32": 0, "F16": 1, "BF16": 2}
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
    lib.nf4_quantize_blocks.restype = ctypes.c_int
    lib.nf4_quantize_blocks.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.nf4_simd.restype = ctypes.c_int
    lib.nf4_guard.restype = ctypes.c_int
    lib.nf4_exponent_sums.restype = None
    lib.nf4_exponent_sums.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.nf4_quantize_nested.restype = None
    lib.nf4_quantize_nested.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p,
    ]  # fmt: skip
    lib.nf4_decode_fp8.restype = ctypes.c_int
    lib.nf4_decode_fp8.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 2, ctypes.c_void_p, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_int]
    lib.nf4_search_blocks.restype = ctypes.c_int
    lib.nf4_search_blocks.argtypes = [
        ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_float, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
    ]  # fmt: skip
    lib.nf4_encode_blocks.restype = ctypes.c_int
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


_guard_lock = threading.Lock()


def guard() -> bool:
    """Whether the kernel may read memory-mapped source files: its SIGBUS handler is in place
    (installed here, again where something replaced it), so that a file truncated under a mapping
    makes the reading call raise :class:`~nf4convert.errors.SourceError`. ``False`` without the
    kernel or where there is no SIGBUS (read through buffers then)."""
    lib = library()
    if lib is None:
        return False
    with _guard_lock:
        return lib.nf4_guard() == 0


def _check(rc: int) -> None:
    """Raise for a kernel call that met a truncated mapped file (``rc`` -1)."""
    if rc:
        raise SourceError("a source file shrank while it was being read")


#: The kernel's SIMD paths by level (``nf4_simd``): the best one the CPU has is used.
_LEVELS = ("portable", "avx2", "avx512")


def _simd() -> int:
    """The highest SIMD level the kernel may use: ``$NF4CONVERT_SIMD`` ``0`` (portable), ``avx2``, else all."""
    value = os.environ.get("NF4CONVERT_SIMD")
    return 0 if value == "0" else 1 if value == "avx2" else 2


def variant() -> str:
    """What the native kernel's quantizer runs as here: ``"avx512"``, ``"avx2"`` or ``"portable"``."""
    lib = library()
    return _LEVELS[min(_simd(), lib.nf4_simd())] if lib is not None else "portable"


def threads() -> int:
    """Threads the kernel runs on: ``$NF4CONVERT_THREADS`` where set (a positive integer), else the CPUs
    this process may run on. (Not torch's thread count: the default conversion runs without torch.)"""
    value = os.environ.get("NF4CONVERT_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="nf4-quantize")


def _ptr(a: np.ndarray | None) -> int | None:
    """The address of a C-contiguous array's first element (``None`` for ``None``)."""
    if a is None:
        return None
    assert a.flags.c_contiguous
    return a.ctypes.data


def _split(rows: int, cols: int, run) -> None:
    """Call ``run(first, count)`` over ranges of rows (or blocks) of ``cols`` elements, about
    :data:`_ELEMENTS_PER_CALL` elements a call, on :func:`threads` threads. Returns, or raises the first
    call's error, only once every call has ended: the caller may then free what they read and wrote
    (a mapping unmapped under a running call would crash it)."""
    per_call = max(1, _ELEMENTS_PER_CALL // max(1, cols))
    starts = range(0, rows, per_call)
    jobs = [(first, min(per_call, rows - first)) for first in starts]
    count = min(threads(), len(jobs))
    if count <= 1:
        for job in jobs:
            run(*job)
    else:
        calls = [_pool(count).submit(run, *job) for job in jobs]
        wait(calls)
        for call in calls:
            call.result()


def quantize_blocks(values: np.ndarray, dtype: str, bs: int, thresholds: np.ndarray, packed: np.ndarray, absmax: np.ndarray) -> None:
    """Quantize full blocks (``values``: the raw, C-contiguous bytes of ``rows * bs`` elements of
    ``dtype``, ``"F32"``, ``"F16"`` or ``"BF16"``; ``bs`` a multiple of 32) into ``packed`` (uint8
    ``[rows * bs // 2]``) and ``absmax`` (float32 ``[rows]``), on :func:`threads` threads."""
    lib = library()
    assert lib is not None and bs % 32 == 0
    src, size = _ptr(values), DTYPE_SIZES[dtype]
    out = (_ptr(thresholds), ABSMAX_FLOOR, _ptr(packed), _ptr(absmax), _simd())
    _split(values.nbytes // size // bs, bs, lambda first, count: _check(lib.nf4_quantize_blocks(src, _DTYPES[dtype], first, count, bs, *out)))


def decode_fp8(data: np.ndarray, scale: np.ndarray, first_row: int, block: tuple[int, int], out: np.ndarray) -> np.ndarray:
    """float32 decoding of FP8 rows (``data`` uint8 ``[rows, cols]``, C-contiguous; see ``nf4_decode_fp8``)
    into ``out`` (float32, C-contiguous, as many elements); returns ``out`` shaped ``[rows, cols]``."""
    lib = library()
    rows, cols = data.shape
    out = out.reshape(rows, cols)
    q, s, o = _ptr(data), _ptr(scale), _ptr(out)

    def run(first: int, count: int) -> None:
        _check(lib.nf4_decode_fp8(q + first * cols, count, cols, s, scale.shape[1], first_row + first, block[0], block[1], o + 4 * first * cols, _simd()))

    _split(rows, cols, run)
    return out


def search_blocks(
    values: np.ndarray, dtype: str, bs: int, thresholds: np.ndarray, code: np.ndarray, absmax: np.ndarray, packed: np.ndarray,
    importance: np.ndarray | None = None, offset: int = 0, grid: tuple[float, ...] = SEARCH_GRID,
) -> None:
    """``--scales search`` of every block of ``values`` (raw bytes of ``dtype``, C-contiguous) into
    ``absmax`` and ``packed``; a partial last block must already hold its absmax encoding, which it
    keeps where the search does not apply. Each element's error is weighted by ``importance`` of its
    column (float32; ``offset`` is the first element's place in its matrix); ``grid``: the candidates'
    factors (the spec's is :data:`~nf4convert.constants.SEARCH_GRID`; others are for measuring); see
    ``nf4_search_blocks``."""
    lib = library()
    cols = importance.size if importance is not None else 1
    if not 0 < len(grid) <= 16:
        raise ValueError("the search takes 1 to 16 grid factors")
    factors = (ctypes.c_float * len(grid))(*grid)
    n = values.nbytes // DTYPE_SIZES[dtype]
    src, t, c, imp, a, p = _ptr(values), _ptr(thresholds), _ptr(code), _ptr(importance), _ptr(absmax), _ptr(packed)

    def run(first: int, count: int) -> None:
        _check(lib.nf4_search_blocks(
            src, _DTYPES[dtype], n, first, count, bs, t, c, factors, len(grid), ABSMAX_FLOOR, SEARCH_MIN_SCALE, imp, cols, offset, a, p, _simd(),
        ))  # fmt: skip

    _split(absmax.size, bs, run)


def encode_blocks(values: np.ndarray, dtype: str, bs: int, thresholds: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Packed codes (uint8 ``[(n + 1) // 2]``) of ``values`` (raw bytes of ``dtype``) for the given
    float32 per-block scales; see ``nf4_encode_blocks``."""
    lib = library()
    n = values.nbytes // DTYPE_SIZES[dtype]
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    src, t, s, p = _ptr(values), _ptr(thresholds), _ptr(scales), _ptr(packed)
    _split(scales.size, bs, lambda first, count: _check(lib.nf4_encode_blocks(src, _DTYPES[dtype], n, first, count, bs, t, s, SEARCH_MIN_SCALE, p, _simd())))
    return packed


#: Scales (one per block) a thread takes at the least in the double quantization's calls.
_SCALES_PER_THREAD = 1 << 16


def _in_parts(n: int, unit: int, run) -> None:
    """``run(i, start, stop)`` over parts ``i`` of ``[0, n)`` cut at multiples of ``unit``, one a thread
    (at most :func:`threads`, each of at least :data:`_SCALES_PER_THREAD` elements); returns, or raises
    the first error, once all have ended."""
    units = -(-n // unit)
    count = max(1, min(threads(), units, n // _SCALES_PER_THREAD))
    bounds = [min(n, units * i // count * unit) for i in range(count + 1)]
    if count == 1:
        run(0, 0, n)
        return
    calls = [_pool(count).submit(run, i, bounds[i], bounds[i + 1]) for i in range(count)]
    wait(calls)
    for call in calls:
        call.result()


def exponent_sums(values: np.ndarray) -> list[int]:
    """Significands of non-negative finite float32 values summed by biased exponent (256 sums; integers,
    so the parts summed on several threads add up to the same)."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    parts = np.zeros((threads(), 256), dtype=np.int64)
    lib = library()
    _in_parts(v.size, 1, lambda i, start, stop: lib.nf4_exponent_sums(_ptr(v) + 4 * start, stop - start, _ptr(parts) + 8 * 256 * i))
    return parts.sum(axis=0).tolist()


def quantize_nested(absmax: np.ndarray, offset: float, thresholds: np.ndarray, nested_blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes of ``absmax - offset`` per block of ``nested_blocksize``, and each block's scale
    (blocks are independent: several threads take whole blocks)."""
    a = np.ascontiguousarray(absmax, dtype=np.float32)
    codes = np.empty(a.size, dtype=np.uint8)
    nested = np.empty(-(-a.size // nested_blocksize), dtype=np.float32)
    lib, t = library(), _ptr(thresholds)

    def run(_: int, start: int, stop: int) -> None:
        lib.nf4_quantize_nested(_ptr(a) + 4 * start, stop - start, nested_blocksize, offset, t, ABSMAX_FLOOR, _ptr(codes) + start, _ptr(nested) + 4 * (start // nested_blocksize))

    _in_parts(a.size, nested_blocksize, run)
    return codes, nested
