"""Where a source comes from: a local folder or file, a Hub repo id through the local cache, or (opted
in) pickled ``*.bin`` weights staged as safetensors. Above :mod:`nf4convert.source` and
:mod:`nf4convert.hub`, which it chooses between.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SourceError, SourceNotFoundError
from .files import FileHasher
from .source import Source, open_source


def resolve_folder(path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """An NF4 folder to read: a local folder, or a Hub repo id's snapshot (through the local cache).

    Raises:
        HubError: the repo cannot be resolved (see :func:`nf4convert.hub.open_hub_source`).
    """
    from .hub import hub_snapshot, is_repo_id

    return hub_snapshot(str(path), revision=revision, cache_dir=cache_dir) if is_repo_id(str(path)) else Path(path)


def resolve_source(
    source: str | os.PathLike | Source,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    allow_pickle_staging: Path | None = None,
    stream_scratch: Path | None = None,
) -> Source:
    """A local folder or ``.safetensors`` file, or a Hub repo id (``org/name``, through the local cache).

    Args:
        allow_pickle_staging: if given, a source with only pickled ``*.bin`` weights is read with
            ``torch.load(weights_only=True)`` and staged as safetensors in this (new) folder; otherwise
            such a source is refused.
        stream_scratch: for a Hub repo id, do not download the weights first: fetch each shard into this
            (new) folder when it is converted (:func:`nf4convert.hub.open_streamed_source`).

    Raises:
        SourceNotFoundError, SourceError, FormatError: a bad local source.
        HubError: the repo cannot be resolved (see :func:`nf4convert.hub.open_hub_source`).
    """
    if isinstance(source, Source):
        return source
    from .hub import is_repo_id, open_hub_source, open_streamed_source  # huggingface_hub loads only for repo ids

    if stream_scratch is not None:
        if not is_repo_id(str(source)):
            raise SourceError(f"{source}: --stream fetches a Hub repo one shard at a time; a local source needs no streaming")
        return open_streamed_source(str(source), stream_scratch, revision=revision, token=token)
    if is_repo_id(str(source)):
        return open_hub_source(str(source), revision=revision, cache_dir=cache_dir, token=token, allow_pickle_staging=allow_pickle_staging)
    path = Path(source)
    if allow_pickle_staging is not None and path.is_file() and path.suffix == ".bin":
        from .pickled import stage_pickled

        return stage_pickled(path, allow_pickle_staging)
    try:
        return open_source(source)
    except SourceNotFoundError:
        if allow_pickle_staging is None or not path.is_dir():
            raise
        from .pickled import stage_pickled

        return stage_pickled(path, allow_pickle_staging)


def source_hasher(src: Source) -> FileHasher | None:
    """Begin the sha256 of a local source's shards in a background thread (``None`` for a streamed
    source, whose shards are not here yet). Needs no torch: started before torch and transformers
    load, it hashes on the core they leave idle."""
    return FileHasher([(p, p.relative_to(src.root).as_posix()) for p in src.shards]) if src.fetcher is None else None


def resolve_pipeline(source: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Path | None:
    """The folder of a diffusers pipeline SOURCE (local, or a Hub repo's snapshot in the cache), else ``None``.

    Raises:
        HubError: a repo id that cannot be resolved.
    """
    from .hub import hub_snapshot, is_repo_id
    from .pipeline import is_pipeline

    if is_repo_id(source):
        snapshot = hub_snapshot(source, revision=revision, cache_dir=cache_dir, token=token)
        return snapshot if is_pipeline(snapshot) else None
    return Path(source) if is_pipeline(Path(source)) else None

