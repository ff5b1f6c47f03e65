"""diffusers pipelines: a folder (or Hub repo) with ``model_index.json`` and one subfolder per component.

The components diffusers' published 4-bit pipelines quantize are quantized, each by the path of its
library (a diffusers model by :mod:`nf4convert.diffusers_models`' rules, a transformers text encoder by
transformers'), into its own subfolder: a complete nf4convert output with its own manifest, which
``from_pretrained`` of that library, ``load_model`` and ``verify`` read alone. Every other file (the VAE,
small text encoders, the scheduler, tokenizers, ``model_index.json``) is copied byte for byte. One
manifest at the top covers every file of the pipeline.

Which components (``diffusers/FLUX.1-dev-bnb-4bit`` and its kin quantize the denoiser and the large text
encoder): every diffusers model that is not an autoencoder (the VAE: small, and sensitive), and every
transformers model except CLIP text encoders (small: 123M and 695M parameters in Flux and SD3). T5,
UMT5, Llama and Gemma encoders are quantized. ``components`` chooses instead.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, PIPELINE_INDEX
from .errors import OptionError, SourceError
from .files import file_record, file_state, files_under, may_read
from .plan import Options
from .source import Source, open_source
from .write import OutputFolder

if TYPE_CHECKING:
    from .hub import StreamedPipeline

#: Component classes whose name starts so are autoencoders (VAEs): copied by default.
AUTOENCODERS = ("Autoencoder", "VQModel")
#: ``model_type`` prefixes of the small text encoders copied by default.
SMALL_TEXT_ENCODERS = ("clip",)


@dataclass(frozen=True)
class Component:
    """One entry of ``model_index.json``.

    Attributes:
        name: its key, and its subfolder.
        library: ``"diffusers"``, ``"transformers"``, or another package.
        class_name: the class the pipeline builds it with.
        quantize: whether it is quantized (else its files are copied).
        reason: why, in a few words.
    """

    name: str
    library: str
    class_name: str
    quantize: bool
    reason: str


def is_pipeline(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (it has ``model_index.json``)."""
    return path.is_dir() and (path / PIPELINE_INDEX).is_file()


def _weights(folder: Path) -> bool:
    return any(p.suffix == ".safetensors" for p in folder.iterdir() if p.is_file())


def _default(name: str, library: str, class_name: str, folder: Path, has_weights: bool) -> tuple[bool, str]:
    if not has_weights:
        return False, "no weights (copied)"
    if library == "diffusers":
        if class_name.startswith(AUTOENCODERS):
            return False, "the autoencoder (copied, as published 4-bit pipelines keep it)"
        return True, "the denoiser (quantized, as published 4-bit pipelines do)"
    if library == "transformers":
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if str(config.get("model_type", "")).startswith(SMALL_TEXT_ENCODERS):
            return False, "a small CLIP text encoder (copied, as published 4-bit pipelines keep it)"
        return True, "a large text encoder (quantized, as published 4-bit pipelines do)"
    return False, f"a {library} component (copied)"


def read_components(root: Path, components: tuple[str, ...] | None = None, *, weights: set[str] | None = None) -> list[Component]:
    """The pipeline's components, each with whether it is quantized.

    Args:
        components: quantize exactly these (``--components``); default: the module docstring's rule.
        weights: the components that have weights, where they are not in ``root`` (``--stream``).

    Raises:
        SourceError: ``model_index.json`` is not valid, names a component without its folder, or a
            class its library does not have.
        OptionError: ``components`` names one that is not a model component with weights.
    """
    index_path = root / PIPELINE_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{index_path}: not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(index, dict):
        raise SourceError(f"{index_path}: not a JSON object")
    found: list[Component] = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library, class_name = entry
        folder = root / name
        if "/" in name or not folder.is_dir() or not may_read(folder, root):
            raise SourceError(f"{index_path}: names the component {name!r} ({library} {class_name}), and there is no folder {name}/")
        if library in ("diffusers", "transformers"):
            module = __import__(library)
            if not hasattr(module, class_name):
                raise SourceError(f"{index_path}: {name!r} is a {library} {class_name}, a class {library} {module.__version__} does not have")
        has_weights = name in weights if weights is not None else _weights(folder)
        quantize, reason = _default(name, library, class_name, folder, has_weights)
        found.append(Component(name, library, class_name, quantize, reason))
    if components is not None:
        models = {c.name for c in found if c.library in ("diffusers", "transformers") and (c.name in weights if weights is not None else _weights(root / c.name))}
        unknown = [c for c in components if c not in models]
        if unknown:
            raise OptionError(f"--components {unknown[0]!r}: not a model component of the pipeline (those are: {', '.join(sorted(models))})")
        found = [
            Component(c.name, c.library, c.class_name, c.name in components, "chosen (--components)" if c.name in components else "not chosen (copied)")
            for c in found
        ]
    return found


def pipeline_files(root: Path, components: list[Component]) -> list[str]:
    """The pipeline's own files besides its components' folders (``model_index.json``, a README, ...)."""
    inside = {c.name for c in components}
    return [name for name in files_under(root) if name.split("/")[0] not in inside and not name.startswith(".")]


def _copy(src: Path, dst: Path, names: list[str]) -> None:
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, dst / name)


def write_pipeline(
    source: Path,
    output: Path,
    components: list[Component],
    *,
    build: Callable[[Path, Path], None],
    force: bool = False,
    fingerprint: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the pipeline ``source`` into ``output``: each quantized component by ``build(src, dst)`` (a
    conversion), every other file copied, then the pipeline's manifest, and the rename into place.

    A run interrupted with the same ``fingerprint`` keeps the components it finished (their manifest is
    there) and resumes the one it was in (its own partial folder).

    Raises:
        OutputError: as for a conversion.
    """
    others = {c.name: files_under(source / c.name) for c in components if not c.quantize}
    top = pipeline_files(source, components)
    with OutputFolder(output, source=source, force=force, fingerprint=fingerprint, writes=set(top)) as out:
        for c in components:
            target = out.path(c.name)
            if c.quantize:
                if not (target / MANIFEST_NAME).is_file():
                    build(source / c.name, target)
            else:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                _copy(source / c.name, target, others[c.name])
        _copy(source, out.partial, top)
        records = []
        for c in components:
            if c.quantize:  # the component's own manifest has hashed its files
                own = json.loads((out.path(c.name) / MANIFEST_NAME).read_text())
                records += [{**r, "name": f"{c.name}/{r['name']}"} for r in own["files"]]
                records.append(file_record(out.path(c.name) / MANIFEST_NAME, f"{c.name}/{MANIFEST_NAME}"))
            else:
                records += [file_record(out.path(c.name) / name, f"{c.name}/{name}") for name in others[c.name]]
        records += [file_record(out.path(name), name) for name in top]
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "pipeline": {c.name: {"library": c.library, "class": c.class_name, "quantized": c.quantize, "reason": c.reason} for c in components},
            "source": provenance or {"name": source.name},
            "files": sorted(records, key=lambda r: r["name"]),
        }
        (out.path(MANIFEST_NAME)).write_text(json.dumps(manifest, indent=2) + "\n")
        return out.commit()


def pipeline_manifest(root: Path) -> dict[str, Any] | None:
    """The pipeline manifest of an nf4convert pipeline output, or ``None`` for anything else."""
    path = root / MANIFEST_NAME
    if not path.is_file() or not (root / PIPELINE_INDEX).is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("pipeline"), dict) else None


def pipeline_summary(root: Path) -> dict[str, Any]:
    """What ``nf4convert inspect`` shows of a pipeline: each component, and for a 4-bit one its folder's
    summary (:meth:`~nf4convert.read.NF4Checkpoint.summary`)."""
    from .read import open_checkpoint

    manifest = pipeline_manifest(root)
    index = json.loads((root / PIPELINE_INDEX).read_text())
    quantized = set(quantized_components(root))
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        summary = open_checkpoint(root / name, bitsandbytes_folders=True).summary() if name in quantized else None
        components[name] = {"library": entry[0], "class": entry[1], "quantized": name in quantized, "summary": summary}
    return {
        "path": str(root),
        "kind": "nf4convert pipeline output" if manifest else "diffusers pipeline with bitsandbytes 4-bit components",
        "pipeline": index.get("_class_name"),
        "components": components,
    }


def quantized_components(root: Path) -> list[str]:
    """The quantized components of a pipeline output (ours: its manifest; diffusers': those whose
    ``config.json`` has a bitsandbytes 4-bit ``quantization_config``)."""
    from .read import is_bitsandbytes_4bit

    manifest = pipeline_manifest(root)
    if manifest is not None:
        return [name for name, c in manifest["pipeline"].items() if c.get("quantized")]
    index = json.loads((root / PIPELINE_INDEX).read_text())
    return [name for name in index if not name.startswith("_") and (root / name).is_dir() and is_bitsandbytes_4bit(root / name)]


def convert_pipeline(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    options: Options | None = None,
    components: tuple[str, ...] | None = None,
    force: bool = False,
    kernel: str = "auto",
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    provenance: dict[str, Any] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    streamed: StreamedPipeline | None = None,
) -> Path:
    """Convert a diffusers pipeline folder: its chosen components to NF4 (:func:`read_components`), the
    rest copied, one manifest over every file.

    Args:
        options: the conversion options, for each quantized component; a ``--skip`` pattern applies to
            the components it matches (and must match one).
        provenance: what the manifest says of the source (default: the folder's name); the fields its
            ``README.md`` front matter sets are added (license, pipeline_tag, ...).
        workers, scheduler: run each component's shard tasks on a Dask cluster (as :func:`~nf4convert.convert.convert`).
        streamed: ``source`` is the scratch folder of a pipeline on the Hub (``--stream``): each converted
            component's shards are fetched one at a time as it is converted, the copied ones whole.

    Returns:
        The output folder: the pipeline's layout, loadable by ``DiffusionPipeline.from_pretrained`` (on a
        GPU) and ``nf4convert.load_model`` (anywhere).

    Raises:
        SourceError, OptionError: see :func:`read_components`; and those of :func:`nf4convert.convert.convert`.
    """
    from .convert import convert

    source, options = Path(source), options or Options()
    if options.importance is not None:
        raise OptionError("--importance: an importance file covers one model; convert each component of the pipeline with its own")
    parts = read_components(source, components, weights=streamed.weights() if streamed else None)
    plans = {c.name: component_options(open_component(source, c.name, streamed), options) if options.skip else options for c in parts if c.quantize}
    unused = [p for p in options.skip if not any(p in o.skip for o in plans.values())]
    if unused:
        raise OptionError(f"--skip {unused[0]!r} matches no module of the quantized components ({', '.join(plans)})")
    files = streamed.identity() if streamed else [[n, *file_state(source / n)] for n in files_under(source)]
    identity = [[c.name, c.quantize] for c in parts] + files + [repr(options)]
    fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    if streamed:
        for c in parts:
            if not c.quantize and c.name in streamed.weights():
                streamed.download(c.name)

    def build(src: Path, dst: Path) -> None:
        convert(open_component(source, src.name, streamed), dst, options=plans[src.name], kernel=kernel, device=device, progress=progress, workers=workers, scheduler=scheduler)

    from .source import card_fields

    about = {"name": source.name, **(provenance or {}), **card_fields(source / "README.md")}
    return write_pipeline(source, Path(output), parts, build=build, force=force, fingerprint=fingerprint, provenance=about)


def open_component(root: Path, name: str, streamed: StreamedPipeline | None = None) -> Source:
    """A component of the pipeline in ``root`` as a source (of ``streamed``: its shards fetched when converted)."""
    return streamed.source(name) if streamed is not None else open_source(root / name)


def component_options(source: Source, options: Options) -> Options:
    """``options`` for one component: the ``--skip`` patterns that match its modules."""
    if not options.skip:
        return options
    modules = [t.name.rpartition(".")[0] for t in source.tensors]
    return replace(options, skip=tuple(p for p in options.skip if any(fnmatch.fnmatchcase(m, p) for m in modules)))
