"""``lora-budget measure`` (one configuration, one record) and ``lora-budget sweep`` (many, resumable).

Importing this module imports click and the torch-free core only; the harness (torch stack) is imported by the
command bodies.
"""

from __future__ import annotations

import datetime as _dt

import click

from ..errors import ConfigError
from ..units import GiB, format_gb, format_gib, format_params

DEFAULT_OUT = "measurements/{date}-{gpu}"
OUT_HELP = ("Folder of the records; {date} (UTC, YYYY-MM-DD), {gpu} (GPU name as NVML reports it, or 'cpu') and "
            "{name} (sweep name) are filled in.")


def resolve_out(template: str, device: str, name: str = "") -> str:
    """Fill {date}, {gpu} and {name} in an output folder (the GPU through NVML: CUDA is not initialised here)."""
    from ..measure.env import gpu_slug

    gpu = "cpu"
    if device == "cuda" and "{gpu}" in template:
        from ..gpus import detect_gpus

        found = detect_gpus()
        gpu = gpu_slug(found[0].name) if found else "cuda"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    try:
        return template.format(date=date, gpu=gpu, name=name or "sweep")
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"--out {template!r}: only {{date}}, {{gpu}} and {{name}} can be filled in") from None


def gib(n: int) -> str:
    """GiB with 2 decimals, 4 below 1 GiB (small models)."""
    return format_gib(n, 2 if n >= GiB else 4)


def _row(label: str, n, pred=None) -> str:
    if n is None:
        return f"  {label:<34} {'-':>14}"
    text = f"  {label:<34} {gib(n):>14} {n:>17,} B"
    if pred:
        text += f"   predicted {gib(pred):>12}  (measured / predicted {n / pred:.3f})"
    return text


def render_measurement(rec, path=None) -> str:
    """Human-readable summary of a Measurement."""
    m, p, o, env = rec.measured, rec.predicted, rec.options, rec.env
    where = env.get("gpu_name") or "CPU (storage tracker)"
    lines = [f"{rec.model_name} {o['method']} batch {o['batch_size']} x {o['seq_len']} on {where}: {rec.status}"
             + (f" ({rec.error})" if rec.error else "")]
    cap = rec.run.get("memory_cap_bytes")
    if cap:
        lines.append(f"  memory cap {format_gib(cap)} ({format_gb(cap)})")
    if p.get("error"):
        lines.append(f"  no prediction: {p['error']}")
    lines.append(_row("peak allocated (measured steps)", m.get("peak_allocated_bytes"), p.get("peak_allocated_bytes")))
    if rec.device == "cuda":
        lines.append(_row("peak reserved", m.get("peak_reserved_bytes"), p.get("peak_reserved_bytes")))
        lines.append(_row("peak active", m.get("peak_active_bytes")))
        lines.append(_row("CUDA context (NVML)", m.get("context_bytes"),
                          (p.get("overheads") or {}).get("cuda_context")))
        lines.append(_row("NVML device used peak", m.get("nvml_device_used_peak_bytes"), p.get("device_total_bytes")))
        lines.append(_row("NVML process used peak", m.get("nvml_process_used_peak_bytes")))
    lines.append(_row("model after build", m.get("model_allocated_bytes")))
    if m.get("failure"):
        f = m["failure"]
        lines.append(f"  failed during {f.get('stage')} ({f.get('phase') or '-'}): allocated "
                     f"{gib(f['allocated_bytes']) if f.get('allocated_bytes') is not None else '-'} at failure")
    if m.get("step_time_s"):
        lines.append(f"  step time {m['step_time_s']:.4f} s (median of {len(m['steps']) - rec.run['warmup']} after "
                     f"{rec.run['warmup']} warm-up), {m['tokens_per_second']:,.0f} tokens/s")
    if m.get("total_params"):
        lines.append(f"  parameters {format_params(m['total_params'])}, trainable "
                     f"{format_params(m['trainable_params'])} ({m['trainable_params']:,})")
    if path is not None:
        lines.append(f"record: {path}")
    return "\n".join(lines)


def register(cli) -> None:
    """Add ``measure`` and ``sweep`` to the click group (called by lora_budget.cli)."""
    from ..cli import emit_json, fail, finetune_options, handle_errors, pop_config, resolve_model

    @cli.command()
    @click.argument("model")
    @finetune_options
    @click.option("--steps", type=int, default=3, show_default=True, help="Measured optimizer steps.")
    @click.option("--warmup", type=int, default=1, show_default=True, help="Steps run before the measured ones.")
    @click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
                  help="cuda, or cpu (real steps counted by the storage tracker; small models).")
    @click.option("--memory-cap", default=None,
                  help="Behave as a card of this size: 48GB, 24GiB or a catalog GPU name (the CUDA context "
                       "counts against it).")
    @click.option("--seed", type=int, default=0, show_default=True, help="torch seed of weights and batches.")
    @click.option("--out", default=DEFAULT_OUT, show_default=True, help=OUT_HELP)
    @click.option("--allow-busy", is_flag=True, help="Measure even when the GPU is in use by something else.")
    @click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
    @handle_errors
    def measure(model, steps, warmup, device, memory_cap, seed, out, allow_busy, as_json, **kwargs):
        """Run real training steps of MODEL with random weights and record what the device used.

        Writes one immutable JSON record (never overwrites one).  An out-of-memory error is a result (status
        oom).  Needs lora_budget[measure]; nothing is downloaded.

        \b
        Example:
            lora-budget measure llama-2-7b --method qlora --seq-len 512 --memory-cap 48GB
        """
        from ..measure.harness import measure as run_measure
        from ..measure.record import write_record
        from ..measure.sweep import parse_cap

        spec = resolve_model(model)
        cfg = pop_config(kwargs)
        cap = parse_cap(memory_cap)
        folder = resolve_out(out, device)
        say = None if as_json else (lambda msg: click.echo(msg, err=True))
        rec = run_measure(spec, cfg, device=device, steps=steps, warmup=warmup, memory_cap_bytes=cap, seed=seed,
                          allow_busy=allow_busy, run_info={"command": "measure", "model_arg": model},
                          progress=say)
        path = write_record(rec, folder)
        if as_json:
            d = rec.as_dict()
            d["path"] = str(path)
            emit_json(d)
        else:
            click.echo(render_measurement(rec, path))
        if rec.status == "failed":
            fail(f"the measurement failed: {rec.error} (recorded in {path})")

    @cli.command()
    @click.argument("sweep_file", type=click.Path(exists=True, dir_okay=False))
    @click.option("--out", default=DEFAULT_OUT, show_default=True, help=OUT_HELP + " Resume by giving the same "
                  "folder again.")
    @click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help="Override the file's device.")
    @click.option("--memory-cap", default=None, help="Override every memory cap: 48GB, 24GiB, a GPU name or none.")
    @click.option("--steps", type=int, default=None, help="Override the file's measured steps.")
    @click.option("--warmup", type=int, default=None, help="Override the file's warm-up steps.")
    @click.option("--isolate/--no-isolate", default=False, show_default=True,
                  help="One Python process per configuration (a crash or a leak loses nothing else).")
    @click.option("--time-budget", type=float, default=None,
                  help="Seconds after which no new configuration starts (isolated ones are stopped at it).")
    @click.option("--retry-failed", is_flag=True, help="Measure again configurations whose records all failed.")
    @click.option("--allow-busy", is_flag=True, help="Measure even when the GPU is in use by something else.")
    @click.option("--list", "list_only", is_flag=True, help="Show the configurations and which are measured; "
                  "run nothing.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary (or the list) as JSON.")
    @handle_errors
    def sweep(sweep_file, out, device, memory_cap, steps, warmup, isolate, time_budget, retry_failed, allow_busy,
              list_only, as_json):
        """Measure every configuration of SWEEP_FILE (JSON or YAML grid), skipping those already recorded in --out.

        Each record is written as soon as its run ends, so a killed sweep resumes where it stopped.

        \b
        Example:
            lora-budget sweep sweeps/gpu_check.json --isolate --time-budget 420
        """
        from ..measure.sweep import load_sweep, run_sweep, status_rows

        sw = load_sweep(sweep_file, device=device, memory_cap=memory_cap, steps=steps, warmup=warmup)
        folder = resolve_out(out, sw.device, sw.name)
        if list_only:
            rows = status_rows(sw, folder)
            if as_json:
                emit_json({"sweep": sw.name, "device": sw.device, "out": folder, "configurations": rows})
                return
            done = sum(r["measured"] for r in rows)
            click.echo(f"{sw.name}: {len(rows)} configurations on {sw.device} ({sw.warmup} warm-up + {sw.steps} "
                       f"steps each), {done} measured in {folder}")
            for r in rows:
                click.echo(f"  {r['index']:>3} {r['key']}  {r['label']}: {r['outcome'] or 'pending'}")
            return
        summary = run_sweep(sw, folder, isolate=isolate, time_budget_s=time_budget, retry_failed=retry_failed,
                            allow_busy=allow_busy, progress=None if as_json else
                            (lambda msg: click.echo(msg, err=True)))
        if as_json:
            d = summary.as_dict()
            d.update({"sweep": sw.name, "out": folder})
            emit_json(d)
            return
        counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.statuses.items())) or "none"
        click.echo(f"{sw.name}: {len(summary.written)} new record(s) in {folder} ({counts}); "
                   f"{summary.already} already measured; {summary.not_run} not run"
                   + (f"; {len(summary.missing)} skipped for a missing package" if summary.missing else ""))
        if summary.stopped:
            click.echo(summary.stopped)


__all__ = ["register", "render_measurement", "resolve_out"]
