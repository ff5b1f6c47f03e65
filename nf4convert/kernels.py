"""Which quantizer kernel runs where: the device named, and the native or the eager kernel.

Torch-free for the CPU, so that the default conversion never imports torch; a GPU's name is
checked with torch.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from . import native
from .constants import KERNELS
from .errors import DeviceError, QuantizationError

log = logging.getLogger("nf4convert")


def check_device(device: str | Any) -> str:
    """The device ``device`` names (a string or a ``torch.device``), if this machine has it: the CPU, or
    a CUDA GPU that torch sees; returns its name as torch writes it (``"cpu"``, ``"cuda:1"``).

    Raises:
        DeviceError: not a device name, a kind of device nf4convert does not run on, or one this
            machine (or this build of torch) lacks.
    """
    if str(device) == "cpu":
        return "cpu"
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {device}: nf4convert runs on the CPU or a CUDA GPU, not {parsed.type}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA GPU here (torch {torch.__version__} sees none)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return str(parsed)


def on_cpu(device: str | Any) -> bool:
    """Whether the (checked) device is the CPU."""
    return str(device).split(":")[0] == "cpu"


def resolve_kernel(kernel: str = "auto", device: str | Any = "cpu") -> str:
    """Name the kernel that ``kernel`` means for ``device`` on this machine: ``"native"`` or ``"eager"``.

    ``"auto"`` means native on the CPU where it builds (the first call in a process may compile
    it, well under a second; later processes reuse the cached library), else eager.

    Raises:
        QuantizationError: ``kernel`` is not one of :data:`KERNELS`, or native is asked for
            where it cannot run.
        DeviceError: see :func:`check_device`.
    """
    cpu = on_cpu(check_device(device))
    if kernel not in KERNELS:
        raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "eager" or (kernel == "auto" and not cpu):
        return "eager"
    if not cpu:
        raise QuantizationError(f"the native kernel runs on the CPU only, not {device}; use --kernel eager or auto")
    if native.library() is not None:
        return "native"
    if kernel == "native":
        raise QuantizationError(f"the native kernel is unavailable ({native.unavailable_reason()}); use --kernel eager or auto")
    _warn_fallback(native.unavailable_reason())
    return "eager"


@cache
def _warn_fallback(reason: str) -> None:
    log.warning("native NF4 kernel unavailable (%s); using the eager kernel", reason)


def describe_kernel(kernel: str = "auto", device: str | Any = "cpu") -> str:
    """What ``--verbose`` reports: the kernel, and for native, its variant and threads."""
    chosen = resolve_kernel(kernel, device)
    return f"native ({native.variant()}, {native.threads()} threads)" if chosen == "native" else f"eager ({check_device(device).split(':')[0]})"
