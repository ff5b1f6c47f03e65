"""The ``nf4convert`` command line. The only place that prints or exits.

Commands are thin: their flags are the library's arguments. Every
:class:`~nf4convert.errors.NF4ConvertError` (and any ``OSError``) becomes one line on
stderr and a non-zero exit; ``--debug`` (or ``NF4CONVERT_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__
from .cli_outputs import EXIT_CODES, dequantize, inspect, parse_size, verify
from .constants import BLOCKSIZES, DEFAULT_BLOCKSIZE, EXPERT_MODES, KERNELS, SCALE_METHODS
from .errors import NF4ConvertError
from .files import human
from .cli_show import print_plan
from .plan import DEFAULT_MAX_SHARD_SIZE, Options
from .source import Source

@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="nf4convert")
@click.option("--debug", is_flag=True, envvar="NF4CONVERT_DEBUG", help="Show tracebacks of errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Convert safetensors checkpoints to bitsandbytes-compatible NF4, and inspect the result."""
    ctx.obj = {"debug": debug}


for _command in (inspect, verify, dequantize):
    cli.add_command(_command)


@cli.command(epilog=EXIT_CODES)
@click.argument("source")
@click.argument("output", required=False)
@click.option("--blocksize", type=click.Choice([str(b) for b in BLOCKSIZES]), default=str(DEFAULT_BLOCKSIZE), show_default=True, help="Weights per absmax scale.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="8-bit quantize the absmax scales (QLoRA).")
@click.option("--compute-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="bnb_4bit_compute_dtype to record [default: the weights' dtype].")
@click.option("--skip", "skip", multiple=True, metavar="PATTERN", help="Keep modules whose whole name matches this glob (repeatable), e.g. '*.self_attn.o_proj', '*pooler*'.")
@click.option("--keep-lm-head/--quantize-lm-head", default=True, show_default=True, help="Keep the output head unquantized.")
@click.option("--scales", type=click.Choice(SCALE_METHODS), default="absmax", show_default=True, help="Block scales: absmax (bit-exact with bitsandbytes) or search (lower error, same format).")
@click.option("--importance", type=click.Path(), default=None, help="With --scales search: weight each error by its input column's activation energy (a file from `nf4convert importance`).")
@click.option("--awq", is_flag=True, help="Apply the activation-aware scaling of the --importance file (`nf4convert importance --awq`): a function-preserving rescaling of norms and linear layers before quantizing; same format, 0 bytes.")
@click.option("--experts", type=click.Choice(EXPERT_MODES), default="quantize", show_default=True, help="MoE expert weights: quantize per expert, or keep them as transformers 5 does.")
@click.option("--bits", type=float, default=None, metavar="B", help="Size budget: average B bits per parameter over the weights that would be quantized (e.g. 4.5); bits go where they remove the most error: blocksize 32 for some modules, others kept in their dtype. Measures every weight first.")
@click.option("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE // 10**9) + "GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--dry-run", is_flag=True, help="Show the plan (what is quantized, kept, sizes); write nothing.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if nf4convert wrote it (or it is empty); never a folder of yours.")
@click.option("--kernel", type=click.Choice(KERNELS), default="auto", show_default=True, help="Quantizer kernel (all give the same bytes).")
@click.option("--device", default="cpu", show_default=True, help="Device to quantize on (cpu, cuda).")
@click.option("--revision", default=None, help="Hub source: branch, tag or commit [default: main].")
@click.option("--cache-dir", default=None, help="Hub source: the Hugging Face cache folder.")
@click.option("--token", default=None, envvar="HF_TOKEN", help="Hub token (or HF_TOKEN), for private and gated repos.")
@click.option("--stream", is_flag=True, help="Hub source: fetch one shard at a time into a scratch folder beside OUTPUT, deleting each once converted.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Run the shard tasks on a local Dask cluster of N worker processes.")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Run the shard tasks on this Dask cluster (e.g. tcp://host:8786); its workers must see SOURCE and OUTPUT.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled *.bin weights (torch.load weights_only=True) when there are no safetensors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("-v", "--verbose", is_flag=True, help="List every tensor and the kernel used.")
@click.option("--push-to", default=None, metavar="REPO_ID", help="Then verify OUTPUT and upload it to this Hub repo (as `push`; --token is used).")
@click.option("--components", default=None, metavar="NAMES", help="A diffusers pipeline: the components to quantize, comma-separated [default: the denoiser and large text encoders, as published 4-bit pipelines].")
def convert(
    source: str,
    output: str | None,
    blocksize: str,
    double_quant: bool,
    compute_dtype: str | None,
    skip: tuple[str, ...],
    keep_lm_head: bool,
    scales: str,
    importance: str | None,
    awq: bool,
    experts: str,
    bits: float | None,
    max_shard_size: str,
    dry_run: bool,
    force: bool,
    kernel: str,
    device: str,
    revision: str | None,
    cache_dir: str | None,
    token: str | None,
    stream: bool,
    workers: int | None,
    scheduler: str | None,
    allow_pickle: bool,
    quiet: bool,
    verbose: bool,
    push_to: str | None,
    components: str | None,
) -> None:
    """Convert SOURCE (a safetensors folder or file, or a Hub repo id) to NF4 in OUTPUT (default:
    NAME-nf4 beside a local SOURCE, ./NAME-nf4 for a repo id)."""
    from .resolve import resolve_pipeline, resolve_source

    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose contradict each other: choose one")
    if push_to is not None:
        from .hub import REPO_ID

        if not REPO_ID.match(push_to):
            raise click.UsageError(f"--push-to {push_to!r} is not a Hub repo id (org/name)")
    logging.getLogger("nf4convert").setLevel(logging.WARNING if quiet else logging.INFO)
    if output is None:
        output = default_output(source)

    options = Options(
        blocksize=int(blocksize),
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        skip=skip,
        quantize_lm_head=not keep_lm_head,
        max_shard_size=parse_size(max_shard_size),
        experts=experts,
        scales=scales,
        importance=importance,
        bits=bits,
        awq=awq,
    )
    # beside OUTPUT like the partial folder, removed when done
    beside = lambda kind: Path(output).with_name(f"{Path(output).name}.nf4convert-{kind}")  # noqa: E731
    staging = beside("staging") if allow_pickle else None
    scratch = beside("scratch") if stream else None
    for folder in (staging, scratch):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    # torch's OpenMP threads spin after each parallel region by default; between the native kernel's
    # calls the conversion's torch work is small, so spinning only takes CPU from the kernel, hashing
    # and I/O threads (docs/performance.md: 1.9 s of 8 user seconds on the 7b bench). Before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        if device != "cpu":  # a GPU this machine lacks is refused before any work (the CPU's kernel: in _convert)
            from .kernels import resolve_kernel

            resolve_kernel(kernel, device)
        streamed = None
        if stream:  # a pipeline on the Hub is read as --stream reads a model
            from .hub import is_repo_id, open_streamed_pipeline

            streamed = open_streamed_pipeline(source, scratch, revision=revision, token=token) if is_repo_id(source) else None
        pipeline = streamed.scratch if streamed else None if stream else resolve_pipeline(source, revision=revision, cache_dir=cache_dir, token=token)
        if pipeline is not None:
            if allow_pickle:
                raise click.UsageError("--allow-pickle is not supported for a diffusers pipeline yet: convert without it")
            chosen = tuple(c.strip() for c in components.split(",") if c.strip()) if components is not None else None
            about = {"name": pipeline.name} if pipeline == Path(source) else {"name": source, "repo_id": source, **({"revision": streamed.commit} if streamed else {})}
            run = {"force": force, "kernel": kernel, "device": device, "workers": workers, "scheduler": scheduler, "streamed": streamed}
            path = _convert_pipeline(pipeline, output, options, chosen, about, run, dry_run=dry_run, quiet=quiet, verbose=verbose)
            if push_to is not None and path is not None:
                from .hub import push as run_push

                report_push(run_push(path, push_to, token=token))
            return
        if components is not None:
            raise click.UsageError(f"--components chooses among a diffusers pipeline's components; {source} is not a pipeline (no model_index.json)")
        src = resolve_source(source, revision=revision, cache_dir=cache_dir, token=token, allow_pickle_staging=staging, stream_scratch=scratch)
        run = {"force": force, "kernel": kernel, "device": device, "workers": workers, "scheduler": scheduler}
        path = _convert(src, output, options, dry_run=dry_run, run=run, quiet=quiet, verbose=verbose, pushing=push_to is not None)
        if push_to is not None and path is not None:
            from .hub import push as run_push

            report_push(run_push(path, push_to, token=token))
    finally:
        for folder in (staging, scratch):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def _convert_pipeline(
    folder: Path, output: str, options: Options, chosen: tuple[str, ...] | None, about: dict[str, str], run: dict[str, Any], *,
    dry_run: bool, quiet: bool, verbose: bool,
) -> Path | None:  # fmt: skip
    """Show the pipeline's components (and with --dry-run or --verbose each quantized one's plan), then
    convert it (``run``: :func:`nf4convert.pipeline.convert_pipeline`'s keywords); returns the output
    folder (``None`` for a dry run)."""
    from .convert import plan_conversion
    from .pipeline import component_options, convert_pipeline, open_component, read_components
    from .write import check_output

    check_output(Path(output), source=folder, force=run["force"])
    parts = read_components(folder, chosen, weights=run["streamed"].weights() if run["streamed"] else None)
    if dry_run or not quiet:
        click.echo(f"Pipeline {folder.name}: {len(parts)} components")
        for c in parts:
            click.echo(f"  {'quantize' if c.quantize else 'copy':<8} {c.name} ({c.library} {c.class_name}): {c.reason}")
    if dry_run or verbose:
        for c in (c for c in parts if c.quantize):
            source = open_component(folder, c.name, run["streamed"])
            print_plan(plan_conversion(source, options=component_options(source, options), kernel=run["kernel"]), verbose=verbose)
    if dry_run:
        click.echo("Nothing written (--dry-run).")
        return None
    streamed = run["streamed"]
    quantized = {c.name for c in parts if c.quantize}
    if streamed:
        total = sum(size for name, (size, _) in streamed.published.items() if name.split("/")[0] in quantized)
    else:
        total = sum(p.stat().st_size for name in quantized for p in (folder / name).glob("*.safetensors"))
    began = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=quiet, file=sys.stderr) as bar:
        path = convert_pipeline(folder, output, options=options, components=chosen, progress=bar.update, provenance=about, **run)
    if not quiet:
        click.echo(f"Wrote {path}: {sum(c.quantize for c in parts)} components in NF4, the rest copied, in {time.perf_counter() - began:.1f} s")
        click.echo(f"Next: nf4convert verify {path} --source {folder}  |  python -c \"import nf4convert; nf4convert.load_model('{path}')\"")
    return path


def default_output(source: str) -> str:
    """OUTPUT when none is given: ``<name>-nf4`` beside a local source (a file's model folder when the
    file sits in one with a ``config.json``: never inside the model's folder, whose later conversion
    would take the output for side files), in the current folder for a Hub repo id
    (``org/name`` -> ``./name-nf4``).

    Raises:
        click.UsageError: an empty SOURCE.
    """
    if not source.strip():
        raise click.UsageError("SOURCE is empty: give a folder, a .safetensors file or a Hub repo id")
    path = Path(source)
    if not path.exists():
        return str(Path(f"{Path(source.rstrip('/')).name}-nf4"))
    path = Path(os.path.normpath(source))
    if path.name in ("", ".."):  # ".", "..": the folder's own name
        path = path.resolve()
    if path.is_file() and (path.parent / "config.json").is_file():
        path = path.parent
    name = f"{path.stem if path.is_file() else path.name}-nf4"
    return str(path.with_name(name))


def _convert(
    src: Source, output: str, options: Options, *, dry_run: bool, run: dict[str, Any], quiet: bool, verbose: bool, pushing: bool = False
) -> Path | None:
    """Plan, show and run the conversion of an opened source (``run``: :func:`nf4convert.convert.convert`'s
    keywords); returns the output folder (``None`` for a dry run). ``pushing``: the upload follows (the
    summary's next steps leave ``push`` out)."""
    from .resolve import source_hasher
    from .write import check_output

    check_output(Path(output), source=src.path, force=run["force"])  # a dry run makes the same checks (the names, once planned)
    hashes = None if dry_run else source_hasher(src)  # begun before planning, on the idle core
    try:
        from .kernels import resolve_kernel

        resolve_kernel(run["kernel"], run["device"])  # a kernel this machine lacks is refused before any writing
    except NF4ConvertError:
        if hashes is not None:
            hashes.cancel()
        raise
    from .convert import output_files, plan_conversion

    plan = plan_conversion(src, options=options, kernel=run["kernel"], hashes=hashes)
    try:
        check_output(Path(output), source=src.path, force=run["force"], writes=output_files(plan))
    except NF4ConvertError:
        if hashes is not None:
            hashes.cancel()
        raise
    if dry_run or verbose:
        print_plan(plan, verbose=verbose)
    if dry_run:
        click.echo("Nothing written (--dry-run).")
        return None
    from .convert import convert as run_convert
    from .kernels import describe_kernel

    chosen = describe_kernel(run["kernel"], run["device"])
    if verbose:
        click.echo(f"kernel: {chosen}")
    began = time.perf_counter()
    def skipped(nbytes: int) -> None:  # a resumed run's finished shards: counted, not as speed
        bar.initial = bar.n = nbytes
        bar.refresh()

    try:
        with tqdm(total=plan.source.nbytes, unit="B", unit_scale=True, desc="converting", disable=quiet, file=sys.stderr) as bar:
            with logging_redirect_tqdm(loggers=[logging.getLogger("nf4convert")]):  # messages on their own line
                path = run_convert(plan, output, progress=bar.update, resumed=skipped, **run)
    except (click.exceptions.Abort, KeyboardInterrupt):
        from .write import PARTIAL_SUFFIX

        click.echo(f"nf4convert: interrupted; the finished shards are in {output}{PARTIAL_SUFFIX}: the same command resumes", err=True)
        sys.exit(130)
    if not quiet:
        src = plan.source
        click.echo(
            f"Wrote {path}: {human(src.nbytes)} -> {human(plan.output_bytes)} ({src.nbytes / max(1, plan.output_bytes):.1f}x smaller), "
            f"{plan.bits_per_parameter:.3f} bits/parameter, in {time.perf_counter() - began:.1f} s"
        )
        loads = any(loader.startswith("nf4convert.load_model") for loader in plan.loaders)
        pickled = " --allow-pickle" if "pickled_files" in src.provenance else ""
        steps = [f"nf4convert verify {path} --source {src.path}{pickled}"] + ([] if pushing else [f"nf4convert push {path} ORG/NAME"])
        steps += [f"python -c \"import nf4convert; nf4convert.load_model('{path}')\""] if loads else []
        click.echo("Next: " + "  |  ".join(steps))
    return path


@cli.command(epilog=EXIT_CODES)
@click.argument("model")
@click.argument("output")
@click.option("--text", "text_file", required=True, type=click.Path(), help="Calibration text (a few thousand words of the kind of text the model will see).")
@click.option("--device", default="cpu", show_default=True, help="Device to run the model on.")
@click.option("--window", type=click.IntRange(min=16), default=512, show_default=True, help="Tokens per window; the text is cut into whole windows.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=16384, show_default=True, help="Tokens per forward pass (whole windows); each pass reads every block once, so more tokens mean more activation memory and fewer reads.")
@click.option("--revision", default=None, help="For a Hub repo id: the branch, tag or commit (from the local cache).")
@click.option("--cache-dir", default=None, help="For a Hub repo id: the Hugging Face cache folder.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is an importance file nf4convert wrote.")
@click.option("--awq", is_flag=True, help="Also find and search the activation-aware scaling (for `convert --awq`), on each block's first batch.")
@click.option("--blocksize", type=click.Choice([str(b) for b in BLOCKSIZES]), default=str(DEFAULT_BLOCKSIZE), show_default=True, help="With --awq: the NF4 blocksize the scales are searched for.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def importance(
    model: str, output: str, text_file: str, device: str, window: int, batch_tokens: int, revision: str | None, cache_dir: str | None, force: bool,
    awq: bool, blocksize: str, quiet: bool,
) -> None:  # fmt: skip
    """Measure the importance file for `convert --scales search --importance OUTPUT`: the mean squared
    activation entering each linear layer (and each MoE expert) of MODEL (a local folder, or a Hub repo id
    in the local cache) over a text, one block at a time (the memory of one block, whatever the model's size).
    With --awq, also the activation-aware scaling for `convert --awq --importance OUTPUT`."""
    from .calibrate import measure_importance

    n = measure_importance(
        model, text_file, output, device=device, window=window, batch_tokens=batch_tokens, force=force, progress=not quiet, revision=revision,
        cache_dir=cache_dir, awq=awq, blocksize=int(blocksize),
    )  # fmt: skip
    click.echo(f"Wrote {output}: importance of {n} weights")
    if awq:
        from .awq import describe, record

        for line in describe(record(output) or {}):
            click.echo(f"  {line}")


PUSH_OPTIONS = [
    click.option("--private", is_flag=True, help="Create the repo as private."),
    click.option("--revision", "--branch", "revision", default=None, help="Upload to this branch (created if needed) [default: main]."),
    click.option("--create-pr", is_flag=True, help="Open a pull request with the upload instead of committing to the branch."),
    click.option("--commit-message", default=None, help="The commit message."),
    click.option("--token", default=None, envvar="HF_TOKEN", help="Hub token with write access (or HF_TOKEN)."),
    click.option("--base-model", default=None, help="The card's base_model: the repo it was converted from [default: the source repo]."),
    click.option("--license", "license_", default=None, help="The card's license [default: the source card's]."),
    click.option("--replace-card", is_flag=True, help="Upload the generated card alone, not the folder's own README.md with a section added."),
]


def push_options(command: Callable) -> Callable:
    """The options of ``hf upload`` (and the card's) that ``push`` and ``convert --push-to`` take."""
    for option in reversed(PUSH_OPTIONS):
        command = option(command)
    return command


def report_push(result: dict[str, Any]) -> None:
    click.echo(f"Uploaded {len(result['files'])} files: {result['url']}")


@cli.command(epilog=EXIT_CODES)
@click.argument("path")
@click.argument("repo_id")
@push_options
@click.option("--dry-run", is_flag=True, help="Print the model card and the file list; upload nothing.")
def push(path: str, repo_id: str, dry_run: bool, license_: str | None, **options: Any) -> None:
    """Verify PATH, write its model card and upload it to the Hub as REPO_ID (one commit)."""
    from .hub import push as run_push

    result = run_push(path, repo_id, dry_run=dry_run, license=license_, **options)
    if dry_run:
        click.echo(result["card"])
        click.echo("Files that would be uploaded:")
        for name in result["files"]:
            click.echo(f"  {name}")
        click.echo("Nothing uploaded (--dry-run).")
    else:
        report_push(result)


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning expected errors into one line and an exit code."""
    debug = os.environ.get("NF4CONVERT_DEBUG") == "1" or "--debug" in (argv if argv is not None else sys.argv[1:])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nf4convert: %(message)s"))
    logger = logging.getLogger("nf4convert")
    logger.addHandler(handler)
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]  # accepted after the subcommand too
    try:
        return cli.main(args=args, prog_name="nf4convert", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("nf4convert: interrupted (run the same command again to resume a conversion)", err=True)
        sys.exit(130)
    except click.ClickException as e:  # one line, as every error (click's own would print the usage first)
        ctx = getattr(e, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if isinstance(e, click.UsageError) and ctx is not None else ""
        click.echo(f"nf4convert: error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except (NF4ConvertError, OSError) as e:
        if debug:
            raise
        message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        click.echo(f"nf4convert: error: {message}", err=True)
        sys.exit(getattr(e, "exit_code", 1))
    finally:
        logger.removeHandler(handler)
