"""``estimate --dry-run`` and ``compare``: the real HF training step traced on fake tensors, beside the estimate.

torch, transformers, peft and bitsandbytes are imported inside the command bodies only (``lora_budget[dryrun]``).
"""

from __future__ import annotations

import sys
import time

import click

from ..units import format_gb, format_gib


def _progress(msg: str) -> None:
    click.echo(f"  [dry run] {msg}", err=True)


def _trace(spec, cfg):
    from ..dryrun import dry_run

    click.echo(f"Tracing {spec.name} ({cfg.method}) on fake tensors: 2 training steps ...", err=True)
    t = time.perf_counter()
    result = dry_run(spec, cfg, progress=_progress)
    click.echo(f"  done in {time.perf_counter() - t:.1f} s", err=True)
    return result


def run_dry_estimate(spec, cfg, gpu, as_json: bool) -> None:
    """Print the dry run of one setup (text or JSON with the estimate's keys where they apply)."""
    from ..cli import emit_json

    from ..memory import CUBLAS_WORKSPACE, CUDA_CONTEXT, RESERVE_FRACTION

    r = _trace(spec, cfg)
    d = r.as_dict()
    if cfg.is_lora:  # the traced model holds the adapters too; `estimate` counts the base model's parameters
        d["total_params"] = r.total_params - r.trainable_params
    # the traced tensors plus the CUDA-only items the estimator adds, so the keys match `estimate --json`
    allocated = r.peak_allocated_bytes + CUBLAS_WORKSPACE
    d["peak_allocated_bytes"] = allocated
    d["traced_peak_bytes"] = r.peak_allocated_bytes
    d["peak_reserved_bytes"] = allocated + int(allocated * RESERVE_FRACTION)
    d["device_total_bytes"] = d["peak_reserved_bytes"] + CUDA_CONTEXT
    d["assumptions"] = list(cfg.assumptions) + [
        f"peak_allocated = traced tensors + cuBLAS workspaces ({CUBLAS_WORKSPACE // 2**20} MiB)",
        f"peak_reserved = allocated x (1 + {RESERVE_FRACTION}) (allocator reserve heuristic)",
        f"device_total = reserved + CUDA context ({CUDA_CONTEXT // 2**20} MiB)"]
    if gpu is not None:
        d["gpu"] = {"name": gpu.name, "memory_bytes": gpu.memory_bytes}
        d["fits"] = d["device_total_bytes"] <= gpu.memory_bytes
        d["headroom_bytes"] = gpu.memory_bytes - d["device_total_bytes"]
    if as_json:
        emit_json(d)
        return
    click.echo(f"{spec.name}, method {cfg.method}: {r.total_params:,} parameters, {r.trainable_params:,} trainable")
    click.echo("Peak by phase (tensors traced; no CUDA context, workspaces or allocator reserve):")
    for name, v in r.phases.items():
        click.echo(f"  {name:<28} {format_gib(v):>14} {format_gb(v):>13}")
    click.echo(f"  {'= peak of traced tensors':<28} {format_gib(r.peak_allocated_bytes):>14} "
               f"{format_gb(r.peak_allocated_bytes):>13}")
    for key, label in (("peak_allocated_bytes", "+ cuBLAS workspaces"), ("peak_reserved_bytes", "+ allocator reserve"),
                       ("device_total_bytes", "+ CUDA context (NVML)")):
        click.echo(f"  {label:<28} {format_gib(d[key]):>14} {format_gb(d[key]):>13}")
    if r.offloaded_bytes:
        click.echo(f"  paged optimizer state (off the allocator): {format_gib(r.offloaded_bytes)}")
    if gpu is not None:
        click.echo(f"{'FITS' if d['fits'] else 'DOES NOT FIT'} on {gpu.label}: headroom "
                   f"{format_gib(d['headroom_bytes'])}")
    click.echo("CUDA behaviour emulated:")
    for e in r.emulations:
        click.echo(f"  - {e}")


def register(cli) -> None:
    from ..cli import emit_json, finetune_options, handle_errors, pop_config, resolve_model

    @cli.command()
    @click.argument("model")
    @finetune_options
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @handle_errors
    def compare(model, as_json, **kwargs):
        """Analytical estimate beside the dry run, per component and phase, with the difference."""
        from ..agreement import compare as run_compare
        from ..estimate import estimate

        spec = resolve_model(model)
        cfg = pop_config(kwargs)
        est = estimate(spec, cfg)
        cmp = run_compare(est, _trace(spec, cfg))
        if as_json:
            emit_json({"model": spec.name, "options": cfg.options(),
                       "peak": {"estimate": cmp.peak_estimate, "dry_run": cmp.peak_dry, "error": cmp.peak_error},
                       "components": {k: {"estimate": e, "dry_run": d} for k, (e, d) in cmp.components.items()},
                       "phases": {k: {"estimate": e, "dry_run": d} for k, (e, d) in cmp.phases.items()}})
            return
        click.echo(f"{'':<30} {'estimate':>14} {'dry run':>14} {'difference':>12}")
        rows = [(f"component {k}", e, d) for k, (e, d) in cmp.components.items()]
        rows += [(k, e, d) for k, (e, d) in cmp.phases.items()]
        rows.append(("peak allocated", cmp.peak_estimate, cmp.peak_dry))
        for name, e, d in rows:
            diff = f"{100 * (e / d - 1):+.2f}%" if d else ("=" if e == d else "n/a")
            click.echo(f"{name:<30} {format_gib(e):>14} {format_gib(d):>14} {diff:>12}")
        click.echo("(cuBLAS workspaces, allocator reserve and CUDA context are CUDA-only and left out of both)",
                   err=True)
        sys.stdout.flush()
