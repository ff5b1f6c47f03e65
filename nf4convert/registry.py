"""Where nf4convert steps into a library's loading: an entry of its registry (transformers' and
diffusers' quantizer classes by ``quant_method``), swapped for one block.

The libraries choose the quantizer that fills a model from the folder's ``quant_method``, in a
registry with no per-call argument; :func:`swapped` replaces one entry for the duration of a block
(one block at a time, process-wide) and restores it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

_SWAP = threading.Lock()


@contextlib.contextmanager
def swapped(registry: MutableMapping[str, Any], key: str, value: Any) -> Iterator[None]:
    """Within the block, ``registry[key]`` is ``value``; the library's own entry comes back after."""
    with _SWAP:
        stock = registry[key]
        registry[key] = value
        try:
            yield
        finally:
            registry[key] = stock
