"""What the command line shows: a conversion plan, an inspected NF4 folder or pipeline. Part of the CLI,
the only place that prints."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import click

from .awq import scaling_summary
from .files import human
from .plan import Plan


def print_plan(plan: Plan, *, verbose: bool) -> None:
    """The plan (``--dry-run``, ``--verbose``): what is quantized and kept, and why, sizes, loaders."""
    src = plan.source
    reasons = Counter(t.reason for t in plan.kept)
    click.echo(f"Plan for {src.name}: {len(src.shards)} source shard(s), {human(src.nbytes)}")
    click.echo(f"  decided by {plan.decided_by}")
    q_params = sum(t.source.info.numel for t in plan.quantized)
    click.echo(f"  quantize {len(plan.quantized):>5} tensors, {q_params:,} parameters -> {human(sum(t.output_bytes for t in plan.quantized))}")
    click.echo(f"  keep     {len(plan.kept):>5} tensors -> {human(sum(t.output_bytes for t in plan.kept))}")
    for reason, count in reasons.most_common():
        click.echo(f"           {count:>5} {reason}")
    click.echo(
        f"  output: {human(plan.output_bytes)} in {len(plan.shards)} shard(s); {plan.bits_per_parameter:.3f} bits/parameter overall, "
        f"{plan.quantized_bits_per_parameter:.3f} for the quantized weights"
    )
    if plan.budget is not None:
        b = plan.budget
        kept = ", ".join(b["kept"][:6]) + (f", ... ({len(b['kept'])} in all)" if len(b["kept"]) > 6 else "")
        keeps = (f"keeps {b['kept_parameters']:,} parameters in {len(b['kept'])} module(s) (by {b['measure']} removed per extra bit): {kept}" if kept
                 else "keeps no module")
        small = f"; blocksize 32 for {b['small_blocks_parameters']:,} parameters" if b["small_blocks"] else ""
        click.echo(f"  budget --bits {b['bits']:g}: {b['bits_per_parameter']:.3f} bits/parameter over the weights that would be quantized; {keeps}{small}")
    if plan.scaling is not None:
        from .awq import describe

        lines = describe(plan.scaling)
        click.echo(f"  activation-aware scaling (--awq): {lines[0]}, {sum(t.scaled for t in plan.tensors)} tensors transformed")
        for line in lines[1:]:
            click.echo(f"  {line}")
    click.echo(f"  loads in: {'; '.join(plan.loaders)}")
    if verbose:
        for t in plan.tensors:
            mark = "Q" if t.quantize else "K"
            click.echo(f"  {mark} {t.name} {t.source.info.dtype} {list(t.source.info.shape)}  ({t.reason})")


def print_pipeline_summary(p: dict[str, Any]) -> None:
    """``inspect`` of a pipeline: each component, 4-bit or copied."""
    click.echo(f"{p['path']}: {p['kind']} ({p['pipeline']})")
    for name, c in p["components"].items():
        q = c["summary"]
        what = f"NF4, {q['quantized']['tensors']} tensors quantized, {human(q['bytes'])}, {q['quantized_bits_per_parameter']:.3f} bits/parameter for quantized weights" if q else "copied as is"
        click.echo(f"  {name:<16} {c['library']} {c['class']}: {what}")


def print_summary(s: dict[str, Any]) -> None:
    """``inspect`` of an NF4 folder (:meth:`~nf4convert.read.NF4Checkpoint.summary`)."""
    source = s["source"]
    written = f" (written by nf4convert {s['tool_version']})" if s["tool_version"] else ""
    click.echo(f"{s['path']}: {s['kind']}{written}")
    if source:
        short = {k: (f"[{', '.join(map(str, v[:3]))}, ... ({len(v)})]" if isinstance(v, list) and len(v) > 3 else v) for k, v in source.items()}
        click.echo(f"  source:    {', '.join(f'{k}={v}' for k, v in short.items())}")
    options = dict(s["options"])
    budget, small, scaling = options.pop("budget", None), options.pop("small_blocks", None), options.pop("awq", None)
    if s["blocksizes"]:  # what the weights have, whatever the options said
        options["blocksize"] = ", ".join(f"{b} ({n} weights)" for b, n in sorted(s["blocksizes"].items(), key=lambda kv: -kv[1])) if len(s["blocksizes"]) > 1 else next(iter(s["blocksizes"]))
    if options:
        click.echo(f"  options:   {', '.join(f'{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}' for k, v in options.items())}")
    if budget:
        kept = f"keeps {len(budget['kept'])} module(s) ({budget['kept_parameters']:,} parameters)" if budget["kept"] else "keeps no module"
        blocks = f"; blocksize 32 for {budget['small_blocks_parameters']:,} parameters ({', '.join(small or [])})" if small else ""
        click.echo(f"  budget:    --bits {budget['bits']:g}: {budget['bits_per_parameter']:.3f} bits/parameter over the weights that would be quantized; {kept}{blocks}")
    if scaling:
        click.echo(f"  scaling:   activation-aware (--awq), {scaling_summary(scaling)}; sha256 {scaling['sha256'][:16]}...")
    if s["decided_by"]:
        click.echo(f"  decided by {s['decided_by']}")
    if s["loaders"]:
        click.echo(f"  loads in:  {'; '.join(s['loaders'])}")
    for kind in ("quantized", "kept"):
        d = s[kind]
        click.echo(f"  {kind + ':':<10} {d['tensors']} tensors, {d['parameters']:,} parameters, {human(d['bytes'])}")
    click.echo(f"  total:     {human(s['bytes'])} in {s['shards']} shard(s)")
    click.echo(f"  bits/parameter: {s['bits_per_parameter']:.3f} overall, {s['quantized_bits_per_parameter']:.3f} for quantized weights")
