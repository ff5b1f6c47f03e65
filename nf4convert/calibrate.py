"""Measuring importance (spec section 2.6) a block at a time, in the memory of one block.

transformers builds the model on the meta device and loads only the modules outside its blocks (the
embedding, the final norm); every block (a module of a class the model names in ``_no_split_modules``,
the unit transformers itself never splits across devices) is mapped to ``"disk"``. transformers' disk
offload then reads it from the checkpoint's own safetensors when it runs and drops it afterwards
(accelerate's hooks, one module's weights at a time), so peak memory is about one block plus the
activations, whatever the model's size. Weights transformers changes on load (experts it fuses) are
written once, in the model's dtype, to a scratch folder beside the output and removed afterwards.

The calibration text is cut into whole windows, run in batches of at most ``batch_tokens`` tokens
(16,384 by default: one batch for a few thousand words, so each block is read once; a longer text
reads the model once per batch, and its activations stay bounded). Every
``nn.Linear``/``Conv1D`` input is recorded by a forward hook. Fused MoE experts (transformers'
``use_experts_implementation`` modules, run with their ``eager`` per-expert loop) are recorded by a
:class:`~torch.overrides.TorchFunctionMode` that sees which expert's slice each ``F.linear`` multiplies:
the tokens routed to that expert. An expert that received no calibration token takes the mean of its
layer's experts, and the file counts them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .awq import METADATA_KEY as AWQ_KEY
from .awq_search import Searcher, scaling_file
from .decisions import EXPERT_PATTERN
from .errors import LoadError, MissingDependencyError, SourceError, SourceNotFoundError
from .files import sha256_file
from .importance import write_importance

if TYPE_CHECKING:
    import torch


def measure_importance(
    model: str | os.PathLike, text_file: str | os.PathLike, output: str | os.PathLike, *,
    device: str = "cpu", window: int = 512, batch_tokens: int = 16384, force: bool = False, progress: bool = False,
    revision: str | None = None, cache_dir: str | os.PathLike | None = None, awq: bool = False, blocksize: int = 64,
) -> int:  # fmt: skip
    """Measure the importance file ``output`` of ``model`` (a local folder, or a Hub repo id through
    the local cache) over the text of ``text_file``, a block at a time (see the module docstring), on
    ``device``, in batches of at most ``batch_tokens`` tokens. Returns the number of weights it weighs.

    With ``awq``, the activation-aware scaling (:mod:`nf4convert.awq`) is found and searched in the same
    pass, on each block's first batch, for NF4 at ``blocksize`` (:mod:`nf4convert.awq_search`), and stored
    in the file for ``convert --awq``.

    Raises:
        MissingDependencyError: transformers is not installed.
        SourceNotFoundError: no text file.
        SourceError: a text shorter than one window (the message says how many tokens are needed).
        OutputError: ``output`` exists (and is not an importance file when ``force``).
        LoadError: a model transformers cannot load, or whose blocks it does not name.
        DeviceError: ``device`` does not exist here.
    """
    from .importance import check_replaceable
    from .layout import check_blocksize
    from .kernels import check_device
    from .resolve import resolve_folder
    from .source import open_source

    check_device(device)
    check_blocksize(blocksize)
    text_path, out = Path(text_file), Path(output)
    if not text_path.is_file():
        raise SourceNotFoundError(f"{text_path}: no such calibration text file")
    check_replaceable(out, force=force)
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingDependencyError("measuring importance runs the model: pip install 'nf4convert[load]'") from None
    folder = resolve_folder(model, revision=revision, cache_dir=cache_dir)
    source = open_source(folder)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(
            f"{folder}: no tokenizer transformers can load ({e.__class__.__name__}): the calibration text is read with the model's "
            "tokenizer; put its files (tokenizer.json, tokenizer_config.json, ...) in the model folder"
        ) from None
    ids = tokenizer(text_path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt", verbose=False).input_ids[0]
    unknown = float((ids == tokenizer.unk_token_id).float().mean()) if tokenizer.unk_token_id is not None and len(ids) else 0.0
    if unknown >= 0.5:  # transformers builds a near-empty tokenizer from a config alone
        raise LoadError(
            f"{folder}: its tokenizer reads {unknown:.0%} of the calibration text as unknown tokens ({len(tokenizer)} tokens known): "
            "put the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) in the model folder"
        )
    if len(ids) < window:  # checked before the model is built
        raise SourceError(f"{text_path}: {len(ids)} tokens of calibration text, fewer than one window of {window}: give at least {window} tokens of text (or a smaller --window)")
    windows = ids[: len(ids) // window * window].view(-1, window)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.offload-", dir=out.parent) as scratch:
        net = load_streamed(folder, source.config or {}, device, Path(scratch))
        statistics = Statistics(net)
        searcher = Searcher(net, blocks(net), blocksize=blocksize, pause=statistics.paused) if awq else None
        try:
            with statistics, torch.no_grad():
                _forward(net, windows.to(device), batch_tokens=batch_tokens, progress=progress)
        finally:
            statistics.close()
            if searcher:
                searcher.close()
    keys = [t.name for t in source.tensors]
    vectors, unrouted = statistics.vectors(net, keys)
    metadata = {"text_sha256": sha256_file(text_path), "windows": str(len(windows)), "experts_without_tokens": str(unrouted)}
    if searcher:
        scales, scaling = scaling_file(searcher.found, net, keys, blocksize=blocksize)
        vectors = {**vectors, **scales}
        metadata[AWQ_KEY] = json.dumps(scaling)
    write_importance(out, vectors, metadata)
    return len(vectors)


def _load(auto: Any, folder: Path, **kwargs: Any) -> Any:
    """``auto.from_pretrained(folder, **kwargs)``, its failure one :class:`LoadError` line."""
    try:
        return auto.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{folder}: transformers cannot load it ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from None


def blocks(model: torch.nn.Module) -> list[str]:
    """The names of ``model``'s blocks: its outermost modules of the classes it lists in ``_no_split_modules``.

    Raises:
        LoadError: the model names none, or none of its modules is one.
    """
    classes = set(getattr(model, "_no_split_modules", None) or [])
    found: list[str] = []
    for name, m in model.named_modules():
        if name and type(m).__name__ in classes and not (found and name.startswith(f"{found[-1]}.")):
            found.append(name)
    if not found:
        raise LoadError(f"cannot find the blocks of {type(model).__name__} on its meta skeleton (no module of its _no_split_modules {sorted(classes)})")
    return found


def device_map(model: torch.nn.Module, block_names: list[str], device: str) -> dict[str, str]:
    """Every block on ``"disk"``, the output head too where it is not tied (it never runs here), and
    the rest of the model on ``device``, in as few entries as cover it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {k.rpartition(".")[0] for pair in (getattr(model, "all_tied_weights_keys", None) or {}).items() for k in pair}
    offloaded = set(block_names)
    entries: dict[str, str] = {}

    def place(prefix: str, module: torch.nn.Module) -> None:
        inside = [n for n in offloaded if not prefix or n.startswith(f"{prefix}.")]
        if prefix in offloaded or (head is not None and module is head and prefix not in tied):
            entries[prefix] = "disk"
        elif not inside:
            entries[prefix] = device
        elif module._parameters or module._buffers:
            raise LoadError(f"{prefix or type(model).__name__} holds its own weights beside its blocks: they cannot be streamed")
        else:
            for name, child in module.named_children():
                place(f"{prefix}.{name}" if prefix else name, child)

    place("", model)
    return entries


def load_streamed(folder: Path, config: dict, device: str, scratch: Path) -> torch.nn.Module:
    """The model of ``folder`` (its ``architectures[0]``, in its own dtype) with its blocks offloaded
    to the checkpoint's files (see the module docstring)."""
    import torch

    from .architecture import CannotAsk, is_experts_module, meta_model
    from .hfloading import spec_fp8

    try:
        skeleton = meta_model(config)
    except CannotAsk as e:
        raise LoadError(f"{folder}: transformers cannot build it ({e})") from None
    names = blocks(skeleton)
    kwargs: dict[str, Any] = {}
    if any(is_experts_module(m) for m in skeleton.modules()):
        kwargs["experts_implementation"] = "eager"  # the per-expert loop, whose slices Statistics sees
    dispatch = logging.getLogger("accelerate.big_modeling")  # "Some parameters are on the meta device because they were offloaded"
    level = dispatch.level
    dispatch.setLevel(logging.ERROR)
    try:
        with spec_fp8():  # FP8 weights decoded as the spec says, edge blocks included
            model = _load(
                type(skeleton), folder, device_map=device_map(skeleton, names, str(torch.device(device))), offload_folder=str(scratch),
                dtype="auto", use_safetensors=True, **kwargs,
            )  # fmt: skip
    finally:
        dispatch.setLevel(level)
    return model.eval()



def _forward(model: torch.nn.Module, windows: torch.Tensor, *, batch_tokens: int, progress: bool) -> None:
    """Run the bare model (no output head) on ``windows``, in batches of at most ``batch_tokens`` tokens
    (at least one window; each batch reads every block once), with a progress bar over the blocks."""
    from tqdm import tqdm

    base = model.base_model
    names = blocks(model)
    per_batch = max(1, batch_tokens // windows.shape[1])
    batches = windows.split(per_batch)
    bar = tqdm(total=len(names) * len(batches), unit="block", desc="measuring", disable=not progress)
    hooks = [model.get_submodule(n).register_forward_hook(lambda *_: bar.update() and None) for n in names]
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(base.forward).parameters else {}
    try:
        for batch in batches:
            base(input_ids=batch, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise LoadError(f"running {type(base).__name__} on the calibration text failed ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from None
    finally:
        bar.close()
        for h in hooks:
            h.remove()


class Statistics:
    """Sums of squared inputs per column of every linear weight (forward hooks) and of every fused
    expert's slice (a torch function mode over the experts modules' forwards), while active."""

    def __init__(self, model: torch.nn.Module) -> None:
        import torch
        from torch.overrides import TorchFunctionMode
        from transformers.pytorch_utils import Conv1D

        from .architecture import is_experts_module

        self.sums: dict[str, Any] = {}
        self.paused_now = False
        self.counts: dict[str, Any] = defaultdict(int)
        self.fused: dict[str, tuple[Any, Any]] = {}  # parameter -> (sums [E, columns], tokens [E])
        self.expert_linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and EXPERT_PATTERN.search(f".{n}.")]
        self._slices: dict[int, tuple[Any, str, int]] = {}
        self._current: tuple[str, torch.nn.Module] | None = None
        statistics = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = func(*args, **(kwargs or {}))
                if statistics._current is not None and not statistics.paused_now:
                    statistics._see(func, args, kwargs or {}, out)
                return out

        self._mode = Mode() if any(is_experts_module(m) for m in model.modules()) else contextlib.nullcontext()  # its per-op cost only where it sees something
        self._hooks = [m.register_forward_hook(self._linear(f"{n}.weight")) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
        for name, m in model.named_modules():
            if is_experts_module(m):
                self._hooks.append(m.register_forward_pre_hook(lambda module, _args, name=name: self._enter(name, module)))
                self._hooks.append(m.register_forward_hook(lambda *_: self._enter(None, None)))

    def __enter__(self) -> Statistics:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing meanwhile (the scaling search's probe runs)."""
        self.paused_now = True
        try:
            yield
        finally:
            self.paused_now = False

    def _enter(self, name: str | None, module: Any) -> None:
        self._current = (name, module) if name is not None else None
        self._slices.clear()

    def _linear(self, name: str) -> Any:
        def record(_module: Any, inputs: tuple, _output: Any) -> None:
            if self.paused_now:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            self.sums[name] = self.sums.get(name, 0) + (x * x).sum(0)
            self.counts[name] += x.shape[0]

        return record

    def _see(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Remember which expert an indexed 3-D parameter slice is; record ``F.linear`` inputs by one."""
        import torch

        name, module = self._current
        if func is torch.Tensor.__getitem__:
            param, index = args
            if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
                index = int(index)
            if isinstance(index, int) and isinstance(param, torch.Tensor) and param.dim() == 3:
                owner = next((p for p, t in module._parameters.items() if t is param), None)
                if owner is not None:
                    self._slices[id(out)] = (out, f"{name}.{owner}", index % param.shape[0])
        elif func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            hit = self._slices.get(id(weight))
            if hit is not None and hit[0] is weight:
                _, key, expert = hit
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                experts = module._parameters[key.rpartition(".")[2]].shape[0]
                sums, tokens = self.fused.setdefault(key, (torch.zeros(experts, x.shape[1], dtype=torch.float64, device=x.device), torch.zeros(experts, dtype=torch.long)))
                sums[expert] += (x * x).sum(0)
                tokens[expert] += x.shape[0]

    def vectors(self, model: torch.nn.Module, checkpoint_keys: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """The importance vectors under the checkpoint's names (a ``[experts, columns]`` matrix for a
        fused 3-D weight), and how many experts received no token (they take their layer's mean)."""
        from .architecture import map_keys

        linear = {k: (s / max(1, self.counts[k])).float().cpu() for k, s in self.sums.items()}
        unrouted: set[tuple[str, int]] = set()  # (experts module, expert)
        fused: dict[str, torch.Tensor] = {}
        for key, (sums, tokens) in self.fused.items():
            seen = tokens > 0
            means = (sums / tokens.clamp(min=1).to(sums.device)[:, None]).float().cpu()
            means[~seen] = means[seen].mean(0)
            fused[key] = means
            unrouted.update((key.rpartition(".")[0], int(e)) for e in (~seen).nonzero().flatten())
        groups: dict[str, list[torch.Tensor]] = defaultdict(list)
        for k, v in linear.items():
            groups[_expert_group(k)].append(v)
        for k in self.expert_linears:
            group = groups.get(_expert_group(k))
            if k not in linear and group:
                linear[k] = sum(group) / len(group)
                expert = EXPERT_PATTERN.search(k)
                unrouted.add((k[: expert.start()], int(expert.group(1))))
        out: dict[str, torch.Tensor] = {}
        for name, where in map_keys(model, checkpoint_keys).items():
            if where.expert is not None and where.key in fused:
                out[name] = fused[where.key][where.expert].clone()
            elif where.expert is None and where.key in fused:
                out[name] = fused[where.key]
            elif where.key in linear:
                out[name] = linear[where.key]
        return out, len(unrouted)


def _expert_group(name: str) -> str:
    """An expert weight's name with its expert index wildcarded: the weights a missing one averages."""
    return EXPERT_PATTERN.sub(".experts.*.", name) if EXPERT_PATTERN.search(name) else name

