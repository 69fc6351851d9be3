"""``lora-budget report`` (a report folder: predicted vs measured, or the LoRA claims) and ``lora-budget chart``.

Thin commands over ``lora_budget.report``; matplotlib is imported inside the command bodies only, so registering
these commands keeps ``lora-budget estimate`` light.
"""

from __future__ import annotations

import click

#: Chart kinds of ``lora-budget chart``.
CHART_KINDS = ("breakdown", "seq-len", "batch", "fit-matrix", "parity", "claims")
#: Defaults when no --gpu is given: a 24 GB and an 80 GB card, the two budgets most people hold.
DEFAULT_LINE_GPUS = ("RTX-4090", "A100-80GB")
DEFAULT_FIT_GPUS = ("RTX-4090", "L4", "L40S", "RTX-A6000", "A100-40GB", "A100-80GB", "H100-SXM", "H200")
DEFAULT_FIT_MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-7b", "gemma-2-9b", "qwen2.5-14b",
                      "gemma-2-27b", "qwen2.5-32b", "llama-3.1-70b", "qwen2.5-72b")
SEQ_SWEEP = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_SWEEP = (1, 2, 4, 8, 16, 32, 64)
METHOD_LABELS = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


def _configs(methods, batch_size, seq_len, lora_rank, gradient_checkpointing):
    from ..finetune import make_config

    out = {}
    for m in methods:
        opts = dict(batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing)
        if m != "full":
            opts["lora_rank"] = lora_rank
        out[METHOD_LABELS[m]] = make_config(m, **opts)
    return out


def register(cli) -> None:
    from ..cli import emit_json, handle_errors

    @cli.command()
    @click.argument("records", nargs=-1, type=click.Path())
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="Report folder to write, e.g. reports/my-gpu.")
    @click.option("--published/--no-published", default=True, show_default=True,
                  help="Include the published measurements (measurements/published/rows.csv).")
    @click.option("--claims", is_flag=True, help="Write the LoRA/QLoRA claims report instead (no records).")
    @click.option("--json", "as_json", is_flag=True, help="Print the files written and the summary as JSON.")
    @handle_errors
    def report(records, out, published, claims, as_json):
        """Write a report folder: predictions beside measurements, or the LoRA/QLoRA claims checked.

        RECORDS are measurement JSON files or folders of them (written by `lora-budget measure`).  The folder gets
        index.md with the charts, comparison.csv (predicted, measured, relative error per row), summary.csv
        (median and worst error by method, source and counter) and the charts as PNG and SVG.  Regenerating
        from the same inputs gives the same bytes.

        \b
        Examples:
            lora-budget report --out reports/published
            lora-budget report measurements/ --out reports/my-gpu --no-published
            lora-budget report --claims --out reports/claims
        """
        from ..errors import ConfigError
        from ..report.build import build_claims_report, build_report

        if claims:
            if records:
                raise ConfigError("--claims takes no measurement records")
            rep = build_claims_report(out)
        else:
            rep = build_report(out, records=records, published=published)
        if as_json:
            emit_json({"folder": str(rep.folder), "files": [p.name for p in rep.files], "summary": rep.summary})
            return
        click.echo(f"Wrote {len(rep.files)} files to {rep.folder}/: " + ", ".join(p.name for p in rep.files))
        if claims:
            for key, verdict in rep.summary.items():
                click.echo(f"  {key:<18} {verdict}")
        else:
            s = rep.summary
            click.echo(f"{s['comparisons']} comparisons: median |error| {100 * s['median_abs_rel_error']:.1f}%, "
                       f"worst {100 * s['worst_abs_rel_error']:.1f}% ({s['worst']}); "
                       f"{s['not_compared']} not compared (see index.md)")

    @cli.command()
    @click.argument("kind", type=click.Choice(CHART_KINDS))
    @click.argument("args", nargs=-1)
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="Chart file: .png or .svg.")
    @click.option("--gpu", "gpus", multiple=True,
                  help="GPU capacity line / fit-matrix column (repeatable; catalog name or a size such as 48GB).")
    @click.option("--method", "methods", multiple=True, type=click.Choice(("full", "lora", "qlora")),
                  help="Methods to draw (repeatable) [all three; fit-matrix: lora].")
    @click.option("--batch-size", type=int, default=1, show_default=True, help="Micro-batch.")
    @click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per sequence.")
    @click.option("--lora-rank", type=int, default=None, help="LoRA r for lora/qlora [method default].")
    @click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
                  help="Force checkpointing on or off [method default].")
    @click.option("--published/--no-published", default=True, show_default=True,
                  help="parity: include the published measurements.")
    @handle_errors
    def chart(kind, args, out, gpus, methods, batch_size, seq_len, lora_rank, gradient_checkpointing, published):
        """Write one chart as PNG or SVG: breakdown, sweeps, fit matrix, parity or claims.

        ARGS depend on KIND:

        \b
          breakdown MODEL    memory at the peak by component, one stacked bar per method
          seq-len MODEL      peak memory vs sequence length (256 ... 32768), one line per method
          batch MODEL        peak memory vs micro-batch (1 ... 64), one line per method
          fit-matrix [MODEL...]  models x GPUs: fits / fits with a suggested change / does not fit
          parity [RECORD...] predicted vs measured for records and the published rows
          claims [MODEL...]  LoRA trainable share and memory saving per model

        \b
        Examples:
            lora-budget chart breakdown llama-3.1-8b --gpu RTX-4090 --out breakdown.png
            lora-budget chart seq-len mistral-7b --method lora --method qlora --gpu 24GB --out seq.svg
            lora-budget chart fit-matrix --method qlora --out fit.png
        """
        from ..errors import ConfigError
        from ..gpus import get_gpu
        from ..models import get_model
        from ..report import charts, tables

        line_gpus = [get_gpu(g) for g in (gpus or DEFAULT_LINE_GPUS)]
        chosen = methods or ("full", "lora", "qlora")
        if kind in ("breakdown", "seq-len", "batch"):
            if len(args) != 1:
                raise ConfigError(f"chart {kind} takes one MODEL")
            spec = get_model(args[0])
            cfgs = _configs(chosen, batch_size, seq_len, lora_rank, gradient_checkpointing)
            if kind == "breakdown":
                fig = charts.breakdown_figure(tables.breakdown_bars(spec, cfgs), line_gpus,
                                              f"{spec.name}, batch {batch_size} x {seq_len}: memory at the peak (GiB)")
            else:
                axis, values = ("seq_len", SEQ_SWEEP) if kind == "seq-len" else ("batch_size", BATCH_SWEEP)
                fixed = f"batch {batch_size}" if axis == "seq_len" else f"{seq_len} tokens"
                fig = charts.sweep_figure(tables.sweep(spec, cfgs, axis, values), axis, line_gpus,
                                          f"{spec.name} ({fixed}): peak memory, NVML view (GiB)")
        elif kind == "fit-matrix":
            if len(chosen) != 1 and methods:
                raise ConfigError("chart fit-matrix draws one method: give --method once")
            method = methods[0] if methods else "lora"
            specs = [get_model(m) for m in (args or DEFAULT_FIT_MODELS)]
            fit_gpus = [get_gpu(g) for g in (gpus or DEFAULT_FIT_GPUS)]
            cfg = _configs((method,), batch_size, seq_len, lora_rank, gradient_checkpointing)[METHOD_LABELS[method]]
            fig = charts.fit_matrix_figure(tables.fit_matrix(specs, fit_gpus, cfg),
                                           f"{METHOD_LABELS[method]}, batch {batch_size} x {seq_len}: does it fit? "
                                           "(device total, GiB)")
        elif kind == "parity":
            from ..published import load_published

            comps = []
            if published:
                comps += tables.compare_published(load_published())[0]
            if args:
                comps += tables.compare_records(args)[0]
            if not comps:
                raise ConfigError("nothing to compare: give measurement records, or keep --published")
            fig = charts.parity_figure(comps)
        else:  # claims
            from ..report import claims

            models = args or claims.SHARE_MODELS
            shares = claims.trainable_shares(models)
            savings = claims.memory_savings([m for m in models if get_model(m).model_type != "gpt2"],
                                            shapes=((batch_size, seq_len),))
            fig = charts.claims_figure(shares, savings, f"LoRA claims (batch {batch_size} x {seq_len})")
        path = charts.save_figure(fig, out)
        click.echo(f"Wrote {path}")
