"""The ``lora-budget`` command line.  Thin click commands over the library; ``--json`` everywhere.

Core commands (estimate, fit, models, gpus) import only the standard library and click.  Feature commands live in
``lora_budget/commands/<feature>.py`` (each with a ``register(cli)`` function) and import their heavy
dependencies inside the command body.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys

import click

from . import __version__
from .errors import LoraBudgetError
from .finetune import ATTN_IMPLEMENTATIONS, METHODS, MIXED_PRECISION, OPTIMS, QUANT_TYPES, make_config
from .units import format_gb, format_gib, format_params

#: Feature modules under lora_budget/commands that add commands to the group.
FEATURE_COMMANDS = ("dryrun", "measure", "report", "plan", "ask")


def fail(message: str, code: int = 1):
    """Print one line on stderr and exit non-zero."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def handle_errors(f):
    """Turn LoraBudgetError (and bad input raised as ValueError by the library) into one line + exit 1."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except LoraBudgetError as exc:
            fail(str(exc))

    return wrapper


def finetune_options(f):
    """The training options shared by estimate, fit, plan and measure (HF/peft/bnb names in kebab-case)."""
    opts = [
        click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True,
                     help="full fine-tuning, LoRA (bf16 base) or QLoRA (4-bit base)."),
        click.option("--batch-size", type=int, default=None, help="Micro-batch per device [1]."),
        click.option("--seq-len", type=int, default=None, help="Tokens per sequence [512]."),
        click.option("--gradient-accumulation-steps", type=int, default=None, help="Micro-batches per step [1]."),
        click.option("--lora-rank", type=int, default=None, help="LoRA r [8; qlora 64]."),
        click.option("--lora-alpha", type=float, default=None, help="LoRA alpha [8; qlora 16]."),
        click.option("--lora-dropout", type=float, default=None, help="LoRA dropout [0.0; qlora 0.05]."),
        click.option("--target-modules", default=None,
                     help="Comma list of peft module names, or all-linear [peft default; qlora all-linear]."),
        click.option("--dtype", default=None, help="Load dtype: bfloat16, float16, float32 [bfloat16]."),
        click.option("--mixed-precision", type=click.Choice(MIXED_PRECISION), default=None,
                     help="Trainer autocast: no, bf16, fp16 [no; qlora bf16]."),
        click.option("--optim", type=click.Choice(OPTIMS), default=None,
                     help="HF optim name [adamw_torch_fused; qlora paged_adamw_32bit]."),
        click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                     help="Recompute each layer in backward [off; qlora on]."),
        click.option("--attn-implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), default=None,
                     help="Attention kernel [sdpa]."),
        click.option("--padding/--no-padding", default=None,
                     help="Batches padded with an attention mask (disables GQA-in-SDPA and flash) [off]."),
        click.option("--bnb-4bit-quant-type", type=click.Choice(QUANT_TYPES), default=None, help="QLoRA [nf4]."),
        click.option("--bnb-4bit-use-double-quant/--no-bnb-4bit-use-double-quant", default=None,
                     help="QLoRA double quantisation [on]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


FINETUNE_KEYS = ("batch_size", "seq_len", "gradient_accumulation_steps", "lora_rank", "lora_alpha", "lora_dropout",
                 "target_modules", "dtype", "mixed_precision", "optim", "gradient_checkpointing",
                 "attn_implementation", "padding", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")


def pop_config(kwargs: dict, file_options: dict | None = None):
    """Remove the finetune options from a command's kwargs and build the FinetuneConfig.

    ``file_options`` (from a config file) fill what the command line left unset.
    """
    method = kwargs.pop("method")
    opts = {k: kwargs.pop(k) for k in FINETUNE_KEYS}
    if file_options:
        ctx = click.get_current_context(silent=True)
        given = ctx is not None and ctx.get_parameter_source("method") == click.core.ParameterSource.COMMANDLINE
        if file_options.get("method") and not given:
            method = file_options["method"]
        for k, v in file_options.items():
            if k != "method" and opts.get(k) is None:
                opts[k] = v
    if opts.get("lora_alpha") is not None and float(opts["lora_alpha"]).is_integer():
        opts["lora_alpha"] = int(opts["lora_alpha"])
    return make_config(method, **opts)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-budget")
def cli():
    """How much GPU memory, time and money fine-tuning an LLM takes with full fine-tuning, LoRA or QLoRA.

    \b
    Example:
        lora-budget fit llama-65b --method qlora --gpu 48GB
    """


def _row(name: str, n: int) -> str:
    return f"  {name:<28} {format_gib(n):>14} {format_gb(n):>13}"


def render_estimate(est, verbose: bool = True) -> str:
    """Human-readable text of an Estimate."""
    from .estimate import Estimate  # noqa: F401  (type only)

    m = est.memory
    cfg = est.config
    lines = [
        f"{est.model.name} ({est.model.model_type}), method {cfg.method}: "
        f"{format_params(est.total_params)} parameters, {format_params(est.trainable_params)} trainable "
        f"({100.0 * est.trainable_params / est.total_params:.3f}%)",
        f"  batch {cfg.batch_size} x {cfg.seq_len} tokens, grad accumulation {cfg.gradient_accumulation_steps}, "
        f"dtype {cfg.dtype}, mixed precision {cfg.mixed_precision}, optim {cfg.optim}, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, attention {cfg.attn_implementation}",
    ]
    if cfg.is_lora:
        tm = cfg.target_modules if isinstance(cfg.target_modules, str) else (
            ",".join(cfg.target_modules) if cfg.target_modules else "peft default")
        lines.append(f"  LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} dropout={cfg.lora_dropout} on {tm} "
                     f"({est.adapted_modules} modules)")
    if cfg.method == "qlora":
        lines.append(f"  4-bit {cfg.bnb_4bit_quant_type}, double quant {'on' if cfg.bnb_4bit_use_double_quant else 'off'},"
                     f" compute {cfg.bnb_4bit_compute_dtype}")
    peak = m.peak_phase
    lines.append("")
    lines.append(f"Breakdown at the peak ({peak.name}):")
    for k, v in peak.components.items():
        if v:
            lines.append(_row(k, v))
    lines.append(_row("= peak allocated", m.peak_allocated))
    lines.append(_row("+ allocator reserve", m.reserve))
    lines.append(_row("= peak reserved", m.peak_reserved))
    lines.append(_row("+ CUDA context", m.context))
    lines.append(_row("= device total (NVML)", m.device_total))
    if m.offloaded:
        lines.append(_row("paged optimizer state", m.offloaded) + "  (CUDA managed memory, not counted above)")
    if verbose:
        lines.append("")
        lines.append("Peak by phase:")
        for ph in m.phases:
            lines.append(_row(ph.name, ph.total))
    if est.gpu is not None:
        lines.append("")
        verdict = "FITS" if est.fits else "DOES NOT FIT"
        lines.append(f"{verdict} on {est.gpu.label}: headroom {format_gib(est.headroom_bytes)} "
                     f"({format_gb(est.headroom_bytes)})")
    if verbose:
        lines.append("")
        lines.append("Assumptions:")
        for a in list(cfg.assumptions) + list(m.notes):
            lines.append(f"  - {a}")
    return "\n".join(lines)


def resolve_model(name: str):
    """A catalog name, HF id, config.json path, or a bare size such as 65B / 8x7B (said on stderr)."""
    from .models import get_model
    from .sizes import is_bare_size, resolve_size

    if is_bare_size(name):
        spec, why = resolve_size(name)
        click.echo(f"Model: {why}", err=True)
        return spec
    return get_model(name)


def config_files_option(f):
    return click.option("--config", "config_files", multiple=True, type=click.Path(exists=True),
                        help="peft adapter_config.json, TrainingArguments JSON/YAML, BitsAndBytesConfig or axolotl "
                             "YAML (repeatable); command-line options win.")(f)


def model_and_config(model, kwargs, config_files):
    """The ModelSpec and FinetuneConfig of a command, with its --config files (their notes go to stderr)."""
    file_options = None
    if config_files:
        from .configfile import describe_ignored, load_options

        method, opts, ignored, model_name = load_options(*config_files)
        file_options = dict(opts, **({"method": method} if method else {}))
        lines = describe_ignored(ignored)
        if lines:
            click.echo("Config files:\n" + "\n".join(lines), err=True)
        model = model or model_name
    if not model:
        fail("give MODEL (or a --config file that names its base model)")
    return resolve_model(model), pop_config(kwargs, file_options)


def resolve_gpu(name: str | None):
    if name is None:
        return None
    from .gpus import get_gpu

    return get_gpu(name)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@cli.command()
@click.argument("model", required=False)
@finetune_options
@config_files_option
@click.option("--gpu", default=None, help="Catalog GPU name or a capacity such as 48GB / 24GiB.")
@click.option("--dry-run", "dry_run", is_flag=True,
              help="Trace the real HF training step on fake tensors instead (needs lora_budget[dryrun]).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def estimate(model, gpu, dry_run, as_json, config_files, **kwargs):
    """Predict the memory of one training step of MODEL (catalog name, HF id, config.json path or a size: 65B)."""
    from .estimate import estimate as run_estimate

    spec, cfg = model_and_config(model, kwargs, config_files)
    g = resolve_gpu(gpu)
    if dry_run:
        from .commands.dryrun import run_dry_estimate

        run_dry_estimate(spec, cfg, g, as_json)
        return
    est = run_estimate(spec, cfg, g)
    if as_json:
        emit_json(est.as_dict())
    else:
        click.echo(render_estimate(est))


@cli.command()
@click.argument("model", required=False)
@finetune_options
@config_files_option
@click.option("--gpu", default=None, help="Catalog GPU name or a capacity such as 48GB / 24GiB [this machine's "
                                          "GPU, free memory, through NVML].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def fit(model, gpu, as_json, config_files, **kwargs):
    """Does MODEL fit on GPU? Yes or no, with the peak, the headroom and changes that would make it fit."""
    from .estimate import estimate as run_estimate
    from .estimate import suggestions

    spec, cfg = model_and_config(model, kwargs, config_files)
    if gpu is None:
        from .commands.ask import default_gpu

        g, why = default_gpu()
        click.echo(f"GPU: {why}", err=True)
    else:
        g = resolve_gpu(gpu)
    est = run_estimate(spec, cfg, g)
    sugg = [] if est.fits else suggestions(est)
    if as_json:
        d = est.as_dict()
        d["suggestions"] = [{"change": s.change, "device_total_bytes": s.estimate.device_total_bytes,
                             "peak_allocated_bytes": s.estimate.peak_allocated_bytes, "fits": s.fits}
                            for s in sugg]
        emit_json(d)
        return
    verdict = "YES" if est.fits else "NO"
    click.echo(f"{verdict}: {spec.name} with {cfg.method} "
               f"{'fits' if est.fits else 'does not fit'} on {g.label}: needs {format_gib(est.device_total_bytes)} "
               f"({format_gb(est.device_total_bytes)}) with the CUDA context, "
               f"headroom {format_gib(est.headroom_bytes)}.")
    click.echo("")
    click.echo(render_estimate(est))
    if sugg:
        click.echo("")
        click.echo("Changes that lower the peak (device total each):")
        for s in sugg:
            mark = "fits" if s.fits else "still too big"
            click.echo(f"  {s.change:<60} {format_gib(s.estimate.device_total_bytes):>12}  {mark}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json):
    """List the built-in model catalog with exact parameter counts."""
    from .models import list_models
    from .params import count_params

    rows = []
    for m in list_models():
        rows.append({"name": m.name, "hf_id": m.hf_id, "model_type": m.model_type,
                     "total_params": count_params(m).total, "hidden_size": m.hidden_size,
                     "num_hidden_layers": m.num_hidden_layers, "vocab_size": m.vocab_size, "source": m.source})
    if as_json:
        emit_json(rows)
        return
    click.echo(f"{'name':<18} {'type':<8} {'parameters':>18}  hf id")
    for r in rows:
        click.echo(f"{r['name']:<18} {r['model_type']:<8} {r['total_params']:>18,}  {r['hf_id']}")


@cli.command()
@click.option("--detect", is_flag=True, help="List the GPUs of this machine through NVML instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def gpus(detect, as_json):
    """List the GPU catalog (memory as the driver reports it, bf16 TFLOP/s, price), or detect local GPUs."""
    from .gpus import detect_gpus, list_gpus

    if detect:
        found = detect_gpus()
        if as_json:
            emit_json([d.__dict__ for d in found])
            return
        if not found:
            click.echo("No GPU found through NVML (nvidia-ml-py missing, no driver, or no NVIDIA GPU). "
                       "Give --gpu to fit/estimate instead.")
            return
        for d in found:
            click.echo(f"#{d.index} {d.name}: total {format_gib(d.total_bytes)}, free {format_gib(d.free_bytes)}, "
                       f"driver {d.driver}")
        return
    rows = list_gpus()
    if as_json:
        emit_json([{"name": g.name, "memory_bytes": g.memory_bytes, "bf16_tflops": g.bf16_tflops,
                    "bandwidth_gbps": g.bandwidth_gbps, "price_usd_per_hour": g.price_usd_per_hour,
                    "price_as_of": g.price_as_of, "price_source": g.price_source, "vendor": g.vendor,
                    "aliases": list(g.aliases), "notes": g.notes} for g in rows])
        return
    click.echo(f"{'name':<14} {'memory':>11} {'memory':>10} {'bf16 TF/s':>10} {'GB/s':>6} {'$/h':>6}")
    for g in rows:
        price = f"{g.price_usd_per_hour:.2f}" if g.price_usd_per_hour is not None else "-"
        click.echo(f"{g.name:<14} {format_gib(g.memory_bytes):>11} {format_gb(g.memory_bytes, 1):>10} "
                   f"{g.bf16_tflops:>10.1f} {g.bandwidth_gbps:>6.0f} {price:>6}")


def _register_features() -> None:
    for name in FEATURE_COMMANDS:
        try:
            mod = importlib.import_module(f"lora_budget.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lora_budget.commands.{name}":
                continue
            raise
        mod.register(cli)


_register_features()
