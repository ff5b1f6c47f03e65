"""The commands that read an NF4 checkpoint: ``inspect``, ``verify`` and ``dequantize`` (registered on
the group by :mod:`nf4convert.cli`), and what every command shares: sizes, exit codes, Hub folders.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click
from tqdm import tqdm

from .cli_show import print_pipeline_summary, print_summary
from .errors import OutputError, VerificationFailed
from .plan import DEFAULT_MAX_SHARD_SIZE

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """``"5GB"`` -> 5000000000, ``"2GiB"`` -> 2147483648, ``"1000"`` -> 1000.

    Raises:
        click.BadParameter: naming ``option``, for text that is no positive size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) if m else 0
    if size <= 0:
        raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 2GiB", param_hint=f"'{option}'")
    return size


#: The exit codes, as ``--help`` lists them (the error classes carry them: nf4convert.errors).
EXIT_CODES = (
    "Exit codes: 0 done; 1 other error; 2 bad option or source, or a device this machine lacks; 3 format; "
    "4 quantization; 5 output; 6 missing optional dependency; 7 load; 8 verification failed; 9 Hub; 10 cluster; 130 interrupted."
)


HUB_FOLDER = [
    click.option("--revision", default=None, help="A Hub repo id PATH: branch, tag or commit [default: main]."),
    click.option("--cache-dir", default=None, help="A Hub repo id PATH: the Hugging Face cache folder."),
]


def hub_folder(command: Callable) -> Callable:
    """PATH may be a Hub repo id, read through the local cache (``--revision``, ``--cache-dir``)."""
    for option in reversed(HUB_FOLDER):
        command = option(command)
    return command


@click.command(epilog=EXIT_CODES)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@hub_folder
def inspect(path: str, as_json: bool, revision: str | None, cache_dir: str | None) -> None:
    """Show what an NF4 folder (ours, or a bitsandbytes 4-bit one transformers or diffusers saved; a
    diffusers pipeline; local or a cached Hub repo id) or a Forge/ComfyUI NF4 .safetensors file holds:
    version, source, options, sizes."""
    from .pipeline import is_pipeline, pipeline_summary
    from .read import open_checkpoint
    from .resolve import resolve_folder

    folder = resolve_folder(path, revision=revision, cache_dir=cache_dir)
    summary = pipeline_summary(folder) if is_pipeline(folder) else open_checkpoint(folder, bitsandbytes_folders=True).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif is_pipeline(folder):
        print_pipeline_summary(summary)
    else:
        print_summary(summary)


@click.command(epilog=EXIT_CODES)
@click.argument("path")
@click.option("--source", default=None, help="The checkpoint PATH was converted from (folder, file or Hub repo id): also measure each tensor's error.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--save", is_flag=True, help="Also write the report to PATH/nf4convert-verify.json (push puts its figures in the model card).")
@click.option("--revision", default=None, help="Hub repo ids (PATH, --source): branch, tag or commit [default: main].")
@click.option("--cache-dir", default=None, help="Hub repo ids (PATH, --source): the Hugging Face cache folder.")
@click.option("--allow-pickle", is_flag=True, help="With --source: read pickled *.bin weights (torch.load weights_only=True), staged as safetensors in a temporary folder.")
def verify(path: str, source: str | None, as_json: bool, save: bool, revision: str | None, cache_dir: str | None, allow_pickle: bool) -> None:
    """Check PATH's files against its manifest and the spec (and, with --source, the quantization error).
    PATH may be a bitsandbytes 4-bit folder transformers or diffusers saved, or a Forge/ComfyUI NF4
    .safetensors file (their structure is checked: they have no manifest), or a cached Hub repo id."""
    import tempfile

    from .constants import VERIFY_REPORT
    from .pipeline import is_pipeline
    from .resolve import resolve_folder, resolve_source
    from .verify import verify as run_verify

    path = str(resolve_folder(path, revision=revision, cache_dir=cache_dir))
    if save and Path(path).is_file():
        raise click.UsageError(f"--save writes the report into an output folder; {path} is a single file: use --json and keep its output")
    with tempfile.TemporaryDirectory(prefix="nf4convert-staging-") as scratch:
        staging = Path(scratch) / "staged" if allow_pickle else None
        if source is None:
            src = None
        elif is_pipeline(Path(path)):  # its components are measured against the source pipeline's
            src = resolve_folder(source, revision=revision, cache_dir=cache_dir)
        else:
            src = resolve_source(source, revision=revision, cache_dir=cache_dir, allow_pickle_staging=staging)
        report = run_verify(path, source=src)
    if save and report["ok"]:
        try:
            (Path(path) / VERIFY_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as e:
            raise OutputError(f"{Path(path) / VERIFY_REPORT}: cannot write the report ({e.strerror})") from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for problem in report["problems"]:
            click.echo(f"FAIL {problem}")
        if report["ok"] and report["files"]:
            click.echo(f"OK {path}: {report['files']} files match the manifest, {report['tensors']} tensors follow format v1")
        elif report["ok"]:
            click.echo(f"OK {path}: {report['kind']}: {report['tensors']} tensors, each 4-bit weight complete and consistent")
        if report.get("quality"):
            s = report["summary"]
            sqnr = f"SQNR mean {s['sqnr_db']['mean']:.2f} dB (min {s['sqnr_db']['min']:.2f})" if s["sqnr_db"] else "no error"
            click.echo(f"   {len(report['quality'])} quantized tensors vs source: relative RMSE mean {s['rel_rmse']['mean']:.4f} (max {s['rel_rmse']['max']:.4f}), "
                       f"{sqnr}, max abs error {s['max_abs_err']['max']:.3g}")
            if report.get("source_names"):
                click.echo(f"   (named in the source with the prefix {report['source_names']['add']!r} for {report['source_names']['strip']!r})")
    if not report["ok"]:
        raise VerificationFailed(f"{path}: {len(report['problems'])} problem(s), first: {report['problems'][0]}")


@click.command(epilog=EXIT_CODES)
@click.argument("path")
@click.argument("output")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None, help="Cast 16/32/64-bit floating-point tensors; FP8 ones stay as stored [default: each weight's original dtype].")
@click.option("--max-shard-size", default=str(DEFAULT_MAX_SHARD_SIZE // 10**9) + "GB", show_default=True, help="Largest output shard.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if nf4convert wrote it (or it is empty); never a folder of yours.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@hub_folder
def dequantize(path: str, output: str, dtype: str | None, max_shard_size: str, force: bool, quiet: bool, revision: str | None, cache_dir: str | None) -> None:
    """Write PATH's weights back as a plain safetensors checkpoint in OUTPUT. PATH: an nf4convert output
    or a bitsandbytes 4-bit folder transformers or diffusers saved (NF4 or FP4), local or a cached Hub
    repo id, or a Forge/ComfyUI NF4 .safetensors file (written back as one file of its name in OUTPUT)."""
    import torch

    from .dequantize import dequantize_folder, dequantize_pipeline, output_files
    from .pipeline import is_pipeline
    from .read import open_checkpoint
    from .resolve import resolve_folder
    from .write import check_output

    folder = resolve_folder(path, revision=revision, cache_dir=cache_dir)
    if is_pipeline(folder):
        check_output(Path(output), source=folder, force=force)
        with tqdm(unit="B", unit_scale=True, desc="dequantizing", disable=quiet, file=sys.stderr) as bar:
            out = dequantize_pipeline(folder, output, dtype=getattr(torch, dtype) if dtype else None, max_shard_size=parse_size(max_shard_size), force=force, progress=bar.update)
        if not quiet:
            click.echo(f"Wrote {out}")
        return
    ckpt = open_checkpoint(folder, bitsandbytes_folders=True)
    kind, size = ckpt.kind, parse_size(max_shard_size, "--max-shard-size")
    writes = output_files(ckpt, dtype=getattr(torch, dtype) if dtype else None, max_shard_size=size)
    check_output(Path(output), source=folder, force=force, writes=writes)  # before any output, as convert
    if not quiet:
        click.echo(f"Reading {folder}: {kind}")
    with tqdm(unit="B", unit_scale=True, desc="dequantizing", disable=quiet, file=sys.stderr) as bar:
        out = dequantize_folder(
            folder, output, dtype=getattr(torch, dtype) if dtype else None, max_shard_size=size, force=force,
            progress=bar.update, total=lambda n: bar.reset(total=n),
        )
    if not quiet:
        click.echo(f"Wrote {out}")
