"""The Hugging Face Hub at both ends: a repo id as a source (through the local cache, offline if
``HF_HUB_OFFLINE=1``), and publishing an NF4 folder with a model card.

huggingface_hub is imported here only, when a repo id or ``push`` is used.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .card import model_card
from .errors import FormatError, HubError, SourceNotFoundError, VerificationFailed
from .pickled import PICKLE_PATTERN, stage_pickled
from .source import SIDE_FILE_PATTERNS, Source, open_source
from .tensorfile import TensorInfo, header_length, parse_header

#: A Hub repo id: ``name`` or ``org/name``.
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
#: What a conversion downloads: shards, the index, side files and the source card (for its metadata). Never pickles.
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "README.md", *SIDE_FILE_PATTERNS]
CARD_NAME = "README.md"


def is_repo_id(text: str) -> bool:
    """True if ``text`` is not an existing local path and has the form ``org/name``."""
    return "/" in text and REPO_ID.match(text) is not None and not Path(text).exists()


def hub_snapshot(
    repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None, token: str | None = None, pickled: bool = False
) -> Path:
    """A Hub repo's snapshot folder in the local cache: its weights and side files (and ``*.bin`` with
    ``pickled``), downloaded only where online and missing.

    Raises:
        HubError: unknown or gated repo, unknown revision, or not cached while offline; one line each.
    """
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision):
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=ALLOW_PATTERNS + ([PICKLE_PATTERN] if pickled else [])
            )
        )


def open_hub_source(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    allow_pickle_staging: Path | None = None,
) -> Source:
    """Resolve a Hub repo to its snapshot in the local cache (downloading only what is needed when online).

    With ``allow_pickle_staging``, ``*.bin`` weights are fetched too and, if the repo has no
    safetensors, staged there as safetensors (see :mod:`nf4convert.pickled`).

    Raises:
        HubError: unknown or gated repo, unknown revision, or not cached while offline; one line each.
        SourceNotFoundError: the repo has no safetensors weights.
    """
    where = f"{repo_id}@{revision or 'main'}"
    folder = hub_snapshot(repo_id, revision=revision, cache_dir=cache_dir, token=token, pickled=allow_pickle_staging is not None)
    try:
        src = open_source(folder)
    except SourceNotFoundError:
        if allow_pickle_staging is None:
            raise SourceNotFoundError(
                f"{where}: no safetensors weights in the repository (pickled *.bin weights are only read with --allow-pickle)"
            ) from None
        src = stage_pickled(folder, allow_pickle_staging)
    src.name = repo_id
    src.provenance.update(repo_id=repo_id, revision=folder.name)
    return src


@dataclass(frozen=True)
class HubShards:
    """The safetensors shards of one Hub repo commit, fetched one at a time into a scratch folder
    (``--stream``, :class:`~nf4convert.source.ShardFetcher`); sent to Dask workers with the tasks.

    Attributes:
        repo_id, commit: the repo and the commit every file is fetched at.
        folder: the scratch folder (the source's root).
        published: ``name -> (size, sha256)`` as the Hub lists each shard (names relative to ``folder``).
        endpoint: the Hub's URL; token: for private and gated repos (``None``: the worker's own).
        prefix: where ``folder`` is in the repo (``"transformer/"``: a pipeline's component), else ``""``.
    """

    repo_id: str
    commit: str
    folder: Path
    published: dict[str, tuple[int, str]]
    endpoint: str
    token: str | None = None
    prefix: str = ""

    def names(self) -> list[str]:
        return sorted(self.published)

    def _name(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()

    def _remote(self, name: str) -> str:
        return self.prefix + name

    def header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Two range requests: the length prefix, then the JSON header."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        name = self._name(path)
        size = self.published[name][0]
        url = hf_hub_url(self.repo_id, self._remote(name), revision=self.commit, endpoint=self.endpoint)

        def get(first: int, last: int) -> bytes:
            headers = {**build_hf_headers(token=self.token), "Range": f"bytes={first}-{last}", "Accept-Encoding": "identity"}
            with _hub_errors(self.repo_id, self.commit, name):
                r = get_session().get(url, headers=headers, follow_redirects=True)
                hf_raise_for_status(r)
            if r.status_code != 206 and first:  # a server that ignores Range sends the whole file
                return r.content[first : last + 1]
            return r.content[: last - first + 1]

        try:
            n = header_length(get(0, 7), size)
            return parse_header(get(8, 7 + n), size) if n else parse_header(b"", size)
        except FormatError as e:
            raise FormatError(f"{self.repo_id}/{name}: {e}") from None

    def fetch(self, path: Path) -> Path:
        """``hf_hub_download`` into the scratch folder (not the shared cache); a complete copy is kept."""
        from huggingface_hub import hf_hub_download

        name = self._name(path)
        root = self.folder.parents[self.prefix.count("/") - 1] if self.prefix else self.folder  # the repo's local copy
        with _hub_errors(self.repo_id, self.commit, name):
            got = Path(hf_hub_download(self.repo_id, self._remote(name), revision=self.commit, local_dir=root, token=self.token, endpoint=self.endpoint))
        if got.stat().st_size != self.published[name][0]:
            raise HubError(f"{self.repo_id}/{name}: downloaded {got.stat().st_size} bytes, the Hub lists {self.published[name][0]}")
        return got

    def release(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        return [{"name": name, "size": size, "sha256": sha} for name, (size, sha) in sorted(self.published.items())]

    def identity(self) -> list[list[Any]]:
        return [[self.repo_id, self.commit], *([r["name"], r["size"], r["sha256"]] for r in self.records())]


@contextmanager
def _hub_errors(repo_id: str, revision: str | None = None, file: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP client's errors into one-line :class:`HubError` s."""
    from huggingface_hub import errors as hub

    where = f"{repo_id}@{revision or 'main'}" + (f": {file}" if file else "")
    try:
        yield
    except hub.GatedRepoError:
        raise HubError(f"{repo_id}: gated repository; accept its terms on the Hub and pass --token (or set HF_TOKEN)") from None
    except hub.RepositoryNotFoundError:
        raise HubError(f"{repo_id}: repository not found (private? pass --token or set HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found") from None
    except hub.LocalEntryNotFoundError:
        also = "" if file else f"; no local folder {repo_id} exists either"
        raise HubError(f"{where}: not in the local Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no network){also}") from None
    except hub.OfflineModeIsEnabled:
        raise HubError(f"{where}: --stream fetches from the Hub, which HF_HUB_OFFLINE=1 forbids (convert from the cache without --stream)") from None
    except hub.EntryNotFoundError:
        raise HubError(f"{where}: no such file in the repository") from None
    except HubError:
        raise
    except Exception as e:  # noqa: BLE001 - HTTP errors, and connection errors of the HTTP client (not OSErrors)
        raise HubError(f"{where}: Hub request failed ({e.__class__.__name__})") from None


def _listing(repo_id: str, revision: str | None, token: str | None) -> tuple[str, dict[str, tuple[int, str]], list[str]]:
    """A repo commit's shards (``name -> (size, sha256)`` as the Hub lists them) and small files.

    Raises:
        HubError: the repo or revision cannot be resolved, a shard has no LFS size and sha256, or the
            Hub is unreachable or offline.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import constants as hub_constants

    where = f"{repo_id}@{revision or 'main'}"
    with _hub_errors(repo_id, revision):
        info = HfApi(endpoint=hub_constants.ENDPOINT, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    published: dict[str, tuple[int, str]] = {}
    small = []
    for f in info.siblings or []:
        if f.rfilename.endswith(".safetensors"):
            if f.lfs is None or f.size is None:
                raise HubError(f"{where}: {f.rfilename} has no LFS size and sha256 in the Hub's listing")
            published[f.rfilename] = (f.size, f.lfs.sha256)
        elif any(fnmatch.fnmatch(Path(f.rfilename).name, g) for g in ALLOW_PATTERNS):
            small.append(f.rfilename)
    return str(info.sha), published, small


def _download(repo_id: str, commit: str, names: list[str], scratch: Path, token: str | None) -> None:
    from huggingface_hub import constants as hub_constants
    from huggingface_hub import hf_hub_download

    scratch.mkdir(parents=True, exist_ok=True)
    with _hub_errors(repo_id, commit):
        for name in names:
            hf_hub_download(repo_id, name, revision=commit, local_dir=scratch, token=token, endpoint=hub_constants.ENDPOINT)


def _streamed(repo_id: str, commit: str, scratch: Path, prefix: str, published: dict[str, tuple[int, str]], token: str | None) -> Source:
    """The source in ``scratch / prefix``, its shards (``published``, repo names) fetched when converted."""
    from huggingface_hub import constants as hub_constants

    mine = {n[len(prefix) :]: v for n, v in published.items() if n.startswith(prefix) and "/" not in n[len(prefix) :]}
    if not mine:
        raise SourceNotFoundError(f"{repo_id}@{commit}{'/' + prefix.rstrip('/') if prefix else ''}: no safetensors weights in the repository")
    src = open_source(scratch / prefix, fetcher=HubShards(repo_id, commit, scratch / prefix, mine, hub_constants.ENDPOINT, token, prefix))
    src.name = repo_id
    src.provenance.update(repo_id=repo_id, revision=commit)
    return src


def open_streamed_source(repo_id: str, scratch: Path, *, revision: str | None = None, token: str | None = None) -> Source:
    """A Hub repo read without downloading its weights first (``--stream``): the listing, the small
    files (into ``scratch``) and each shard's header (two range requests); a shard is fetched into
    ``scratch`` only when a task converts it (:class:`HubShards`).

    Raises:
        HubError: the repo or revision cannot be resolved, or the Hub is unreachable or offline.
        SourceNotFoundError, SourceError, FormatError: as :func:`~nf4convert.source.open_source`.
    """
    commit, published, small = _listing(repo_id, revision, token)
    _download(repo_id, commit, [n for n in small if "/" not in n], scratch, token)
    return _streamed(repo_id, commit, scratch, "", published, token)


def open_streamed_pipeline(repo_id: str, scratch: Path, *, revision: str | None = None, token: str | None = None) -> StreamedPipeline | None:
    """A Hub repo that holds a diffusers pipeline, read as ``--stream`` reads a model: its small files (every
    component's config and tokenizer files) into ``scratch``; ``None`` for a repo that is no pipeline.

    Raises:
        HubError: as :func:`open_streamed_source`.
    """
    from .constants import PIPELINE_INDEX

    commit, published, small = _listing(repo_id, revision, token)
    if PIPELINE_INDEX not in small:
        return None
    _download(repo_id, commit, small, scratch, token)
    return StreamedPipeline(repo_id, commit, scratch, published, token)


@dataclass(frozen=True)
class StreamedPipeline:
    """A pipeline on the Hub, its small files in ``scratch``: each component's weights fetched when needed."""

    repo_id: str
    commit: str
    scratch: Path
    published: dict[str, tuple[int, str]]
    token: str | None

    def weights(self) -> set[str]:
        """The components that have weights."""
        return {name.split("/")[0] for name in self.published if name.count("/") == 1}

    def download(self, component: str) -> None:
        """Fetch a component's weights (one that is copied, not converted)."""
        _download(self.repo_id, self.commit, sorted(n for n in self.published if n.startswith(component + "/")), self.scratch, self.token)

    def source(self, component: str) -> Source:
        """A component to convert, its shards fetched one at a time as it is converted."""
        return _streamed(self.repo_id, self.commit, self.scratch, component + "/", self.published, self.token)

    def identity(self) -> list[Any]:
        return [self.repo_id, self.commit, sorted(self.published.items())]


#: Marks the section ``push`` adds to a README.md of the user's (a later push replaces only it).
CARD_SECTION = ("<!-- nf4convert: quantization section -->", "<!-- nf4convert: end -->")


def _with_section(own: str, card: str) -> str:
    """The user's README ``own`` with the card's metadata filled in where ``own`` lacks it (tags
    added) and its body in a marked section: replacing the section a previous push added, if any."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    ours = ModelCard(card)
    if REGEX_YAML_BLOCK.search(own):
        theirs = ModelCard(own)
        data, own_body = theirs.data.to_dict(), theirs.text
    else:  # a README without front matter: nothing to merge (ModelCard would warn that it has none)
        data, own_body = {}, own
    for key, value in ours.data.to_dict().items():
        if key == "tags":
            data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *value]))
        elif data.get(key) is None:
            data[key] = value
    body = own_body
    start, end = CARD_SECTION
    if start in body and end in body:
        body = body[: body.index(start)] + body[body.index(end) + len(end) :]
    section = "\n".join(line.replace("# ", "## Quantization: ", 1) if i == 0 else line for i, line in enumerate(ours.text.strip().splitlines()))
    return str(ModelCard(f"---\n{ModelCardData(**data).to_yaml()}\n---\n{body.rstrip()}\n\n{start}\n{section}\n{end}\n"))


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    replace_card: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Verify an NF4 folder and upload it to ``repo_id`` with its model card, in one commit (the
    conventions of ``hf upload``).

    The card goes up from memory: nothing in the folder is written or replaced. A README.md of the
    user's in the folder is kept: the card's metadata fills what it lacks and its body goes in a
    marked section (``replace_card`` uploads the card alone instead).

    Args:
        revision: the branch to upload to (created if needed); default ``main``.
        create_pr: open a pull request with the commit instead of committing to the branch.
        base_model: the repo it was converted from, for the card (default: the recorded source repo).
        license: the card's license (default: the source card's).

    Returns:
        ``{"card": str, "files": [names], "url": str | None}`` (``url`` is ``None`` for a dry run).

    Raises:
        VerificationFailed: the folder does not match its manifest; nothing is uploaded.
        HubError: a bad repo id or base model, or the Hub refused (bad token, no permission, network).
    """
    from .pipeline import pipeline_manifest
    from .read import open_checkpoint, require_nf4_folder
    from .verify import verify

    if not REPO_ID.match(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id (org/name)")
    if base_model is not None and not REPO_ID.match(base_model):
        raise HubError(f"--base-model {base_model!r} is not a Hub repo id (org/name)")
    require_nf4_folder(path)  # a bitsandbytes folder has no manifest to check and upload by
    report = verify(path)
    if not report["ok"]:
        raise VerificationFailed(f"{path}: {len(report['problems'])} problem(s), first: {report['problems'][0]}; not uploading")
    root = Path(path)
    manifest = pipeline_manifest(root) or open_checkpoint(root).manifest
    card = model_card(root, repo_id=repo_id, base_model=base_model, license=license)
    own = root / CARD_NAME
    if own.is_file() and not replace_card:
        card = _with_section(own.read_text(encoding="utf-8", errors="replace"), card)
    files = sorted({f["name"] for f in manifest["files"]} | {"nf4convert.json", CARD_NAME})
    if dry_run:
        return {"card": card, "files": files, "url": None}
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import errors as hub

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=root / name) for name in files if name != CARD_NAME]
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
        info = api.create_commit(
            repo_id,
            operations,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload NF4 weights ({root.resolve().name}) with nf4convert",
        )
    except hub.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        raise HubError(f"{repo_id}: upload rejected (HTTP {status}); check the token's write permission") from None
    except Exception as e:  # noqa: BLE001 - the HTTP client's connection errors are not OSErrors; answers it cannot parse
        raise HubError(f"{repo_id}: upload failed ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    url = getattr(info, "pr_url", None) if create_pr else None
    return {"card": card, "files": files, "url": str(url or getattr(info, "commit_url", info))}
