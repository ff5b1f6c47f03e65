"""Files: path safety for names read from files (indexes, manifests), sha256 records, the cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from .constants import MANIFEST_NAME, OUTPUT_MARK, VERIFY_REPORT

_HASH_CHUNK = 16 << 20


def cache_dir() -> Path:
    """nf4convert's cache folder (the built kernel, planning decisions): ``$NF4CONVERT_CACHE``, else
    ``$XDG_CACHE_HOME/nf4convert``, else ``~/.cache/nf4convert``. Nothing in it is needed: it only saves time."""
    if os.environ.get("NF4CONVERT_CACHE"):
        return Path(os.environ["NF4CONVERT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nf4convert"


def is_plain_relative(name: object) -> bool:
    """True for a relative POSIX path with no ``..``, no backslash and no empty or absolute part."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts


def containment(root: Path) -> Path:
    """The folder a checkpoint's files must resolve into: the folder itself, or for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<commit>``, files symlinked into ``../../blobs``) the repo folder."""
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent
    return root


def recorded_files(folder: Path) -> set[str] | None:
    """The files nf4convert wrote in ``folder`` and recorded there (relative POSIX paths), or ``None``
    when it is no output of nf4convert's.

    A ``convert`` output records its files in its manifest, a ``dequantize`` output in its mark
    (:data:`~nf4convert.constants.OUTPUT_MARK`); ``verify --save``'s report is nf4convert's too. A
    record that cannot be read records only itself: every other file then counts as the user's.
    """
    for record in (MANIFEST_NAME, OUTPUT_MARK):
        if (folder / record).is_file():
            try:
                listed = json.loads((folder / record).read_text(encoding="utf-8")).get("files", [])
                names = {f["name"] if isinstance(f, dict) else f for f in listed}
            except (OSError, ValueError, AttributeError, KeyError, TypeError):
                names = set()
            return {n for n in names if is_plain_relative(n)} | {record, VERIFY_REPORT}
    return None


def files_under(folder: Path) -> list[str]:
    """Every file (or link) under ``folder``, hidden ones too, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def may_read(path: Path, root: Path) -> bool:
    """Whether a file of the checkpoint folder ``root`` may be read where its links lead.

    In a Hugging Face cache snapshot the files are links the Hub client made into ``../../blobs``: they
    must resolve inside the repo's cache folder. In any other folder the links are the user's (weights
    kept in a store elsewhere): they are followed; names read from an index or manifest are checked
    apart, as names (:func:`is_plain_relative`).
    """
    repo = containment(root)
    return repo == root or is_inside(path, repo)


def is_inside(path: Path, root: Path) -> bool:
    """True if ``path`` resolves (symlinks followed) inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def human(n: float) -> str:
    """A byte count for people: ``83.45 MB`` (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def sha256_file(path: Path, *, stop: threading.Event | None = None, ready: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file, read in chunks into two reused buffers: a helper thread reads the next chunk
    while this one hashes (the copy out of the page cache then costs no time on a machine with a second
    core: the last shard's hash is what a conversion waits for at its end). ``ready(end)``, where
    given, returns once the file's first ``end`` bytes are written (:meth:`WrittenPrefix.wait`): the
    file may be hashed while its end is still being written.

    Raises:
        InterruptedError: ``stop`` was set before the end, or ``ready`` gave up.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size

        def fill(buffer: bytearray, at: int) -> int:
            if ready is not None:
                ready(min(size, at + len(buffer)))
            return f.readinto(buffer)

        if size < _HASH_CHUNK:  # a config, an index: no helper, no buffers to zero (16 ms for two of 16 MB)
            if ready is not None:
                ready(size)
            h.update(f.read())
            return h.hexdigest()
        buffers = (bytearray(_HASH_CHUNK), bytearray(_HASH_CHUNK))
        views = [memoryview(b) for b in buffers]
        with ThreadPoolExecutor(1, thread_name_prefix="nf4-hash-read") as pool:
            coming, i, at = pool.submit(fill, buffers[0], 0), 0, 0
            while n := coming.result():
                if stop is not None and stop.is_set():
                    raise InterruptedError(f"{path}: hashing stopped")
                at += n
                coming = pool.submit(fill, buffers[(i + 1) % 2], at)
                h.update(views[i % 2][:n])
                i += 1
    return h.hexdigest()


class WrittenPrefix:
    """How far from its start a file is written, for a reader that follows the writer (the hash of a
    shard whose kept tensors are still being copied). Only grows."""

    def __init__(self, end: int) -> None:
        self._end = end
        self._failed = False
        self._changed = threading.Condition()

    def advance(self, end: int) -> None:
        """The first ``end`` bytes are written."""
        with self._changed:
            self._end = max(self._end, end)
            self._changed.notify_all()

    def fail(self) -> None:
        """The writer stopped: a waiting reader gives up."""
        with self._changed:
            self._failed = True
            self._changed.notify_all()

    def wait(self, end: int) -> None:
        """Return once the first ``end`` bytes are written.

        Raises:
            InterruptedError: the writer stopped before.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._end >= end or self._failed)
            if self._end < end:
                raise InterruptedError("the writer stopped")


#: A Hugging Face cache blob of an LFS file: ``.../blobs/<sha256>``, named by the hash huggingface_hub
#: checked when it downloaded the file.
_CACHE_BLOB = re.compile(r"^[0-9a-f]{64}$")
#: How the manifest says a source hash was not computed here.
HUB_CACHE_HASH = "huggingface cache blob name"
#: A file modified this recently may still change within its timestamp's granularity: its hash is not kept.
_RACY_NS = 1_000_000_000


def _identity(st: os.stat_result) -> list[int]:
    """What any rewrite of a file changes (git's index keeps the same): device, inode, size, and the
    modification and status-change times (the latter cannot be set back by a user)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _entry(path: Path) -> Path:
    return cache_dir() / "hashes" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:40]}.json"


def remembered_sha256(path: Path) -> str | None:
    """The sha256 an earlier run computed for ``path``, if the file is provably unchanged since (the same
    :func:`_identity`); ``NF4CONVERT_HASH_CACHE=0`` turns the cache off."""
    if os.environ.get("NF4CONVERT_HASH_CACHE") == "0":
        return None
    try:
        entry = json.loads(_entry(path).read_text(encoding="utf-8"))
        known = entry["identity"] == _identity(os.stat(path)) and entry["path"] == str(path.resolve())
        return entry["sha256"] if known and isinstance(entry["sha256"], str) and _CACHE_BLOB.match(entry["sha256"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_sha256(path: Path, before: os.stat_result, sha256: str) -> None:
    """Keep ``sha256`` of ``path``, read while it had stat ``before``, if it still has (best effort: a
    cache that cannot be written only costs the next run a read)."""
    if os.environ.get("NF4CONVERT_HASH_CACHE") == "0":
        return
    try:
        now = os.stat(path)
        if _identity(now) != _identity(before) or time.time_ns() - max(now.st_mtime_ns, now.st_ctime_ns) < _RACY_NS:
            return
        entry = _entry(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_native_id()}.tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "identity": _identity(now), "sha256": sha256}), encoding="utf-8")
        os.replace(tmp, entry)
    except OSError:
        pass


def cached_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache gives a file for free: a snapshot file links to ``blobs/<sha256>``
    for LFS files (a small file's blob is named by its git hash, 40 hex digits: none then)."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and _CACHE_BLOB.match(target.name) else None


def file_record(
    path: Path, name: str, *, stop: threading.Event | None = None, trust_cache: bool = False, ready: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """``{"name", "size", "sha256"}`` of one file, as the manifest lists it.

    Args:
        trust_cache: take the sha256 from a Hugging Face cache blob's name where there is one
            (:func:`cached_sha256`; the record then says so in ``"sha256_from"``), else from an earlier
            run's hash of the provably unchanged file (:func:`remembered_sha256`), instead of reading
            the file. The record does not say the latter: it is the hash reading would give, and the
            manifest stays the same bytes whichever run, process or worker hashed first (spec 8). A
            file it reads is remembered for the next run.
        stop, ready: as :func:`sha256_file`'s.
    """
    known = cached_sha256(path) if trust_cache else None
    if known is not None:
        return {"name": name, "size": path.stat().st_size, "sha256": known, "sha256_from": HUB_CACHE_HASH}
    known = remembered_sha256(path) if trust_cache else None
    if known is not None:
        return {"name": name, "size": path.stat().st_size, "sha256": known}
    before = os.stat(path)
    digest = sha256_file(path, stop=stop, ready=ready)
    if trust_cache:
        remember_sha256(path, before, digest)
    return {"name": name, "size": before.st_size, "sha256": digest}


def file_state(path: Path) -> tuple[int, int]:
    """A file's size and modification time (ns): what changes when it is rewritten."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class FileHasher:
    """:func:`file_record` of several source files (a Hugging Face cache blob's hash taken from its
    name), computed in a background thread from creation on.

    Each file's :func:`file_state` is taken before it is read (:attr:`states`), so that a caller
    can tell whether the hashed bytes are still the file's. The thread is a daemon and checks
    :meth:`cancel` between chunks, so an abandoned hasher neither delays the process's exit nor
    keeps reading.
    """

    def __init__(self, files: list[tuple[Path, str]]) -> None:
        self._stop = threading.Event()
        self._records: list[dict[str, Any]] = []
        self.states: dict[Path, tuple[int, int]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(files,), name="nf4-hash-source", daemon=True)
        self._thread.start()

    def _run(self, files: list[tuple[Path, str]]) -> None:
        if hasattr(os, "setpriority"):  # Linux threads have their own nice value: yield to the quantizer,
            try:  # use idle cores (while torch loads, while output shards are sealed)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
            except OSError:
                pass
        try:
            for path, name in files:
                self.states[path] = file_state(path)
                self._records.append(file_record(path, name, stop=self._stop, trust_cache=True))
        except BaseException as e:  # re-raised by result(), in the caller's thread
            self._error = e

    def result(self) -> list[dict[str, Any]]:
        """The records, in the given order, once all are hashed.

        Raises:
            OSError: a file could not be read.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._records

    def cancel(self) -> None:
        self._stop.set()
