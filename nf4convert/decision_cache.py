"""The libraries' answers (which tensors transformers or diffusers quantizes), kept in nf4convert's cache folder: importing its
modeling code costs seconds, and a resumed or repeated conversion plans the same.

An answer is stored under a hash of everything it depends on; :data:`RULES` is in that hash, so a
change of how transformers is asked leaves earlier answers behind. An answer is written atomically, and
a cache that cannot be read or written is no error: it only saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .decisions import Decision, Decisions
from .files import cache_dir

#: The version of how the libraries are asked (2: layers read outside their forward kept, experts cut
#: where transformers loads them per expert; 3: a kept tensor's dtype).
RULES = 3


def cache_key(what: list[Any]) -> str:
    """The key of an answer that depends on ``what`` (JSON-serializable), this nf4convert and :data:`RULES`."""
    from . import __version__

    return hashlib.sha256(json.dumps([__version__, RULES, *what], sort_keys=True).encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_dir() / "decisions" / f"{key}.json"


def load(key: str) -> Any:
    """The JSON value stored under ``key``, or ``None`` (none, or unreadable)."""
    try:
        return json.loads(_path(key).read_text())
    except (OSError, ValueError):
        return None


def store(key: str, value: Any) -> None:
    """Store a JSON value under ``key``, atomically; a cache that cannot be written is no error."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        pass


def load_cached(key: str) -> Decisions | str | None:
    """A library's cached answer: its decisions, or why it could not answer (a string), or ``None``."""
    try:
        d = load(key)
        if "cannot_ask" in d:
            return str(d["cannot_ask"])
        return Decisions(d["decided_by"], {n: Decision(*v) for n, v in d["tensors"].items()}, d["skip_modules"], d["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_cached(key: str, answer: Decisions | str) -> None:
    """Store a library's answer (see :func:`store`)."""
    if isinstance(answer, str):
        store(key, {"cannot_ask": answer})
        return
    tensors = {n: [d.quantize, d.reason, d.transpose, d.expert, d.fused, d.dtype] for n, d in answer.tensors.items()}
    store(key, {"decided_by": answer.decided_by, "tensors": tensors, "skip_modules": answer.skip_modules, "splits": answer.splits})
