"""``lora-budget plan`` (which GPU, how many, how long, how much), ``cost`` (one setup's time and dollars) and
``solve`` (the largest micro-batch and sequence that fit).  Standard library and click only."""

from __future__ import annotations

import click

from ..cli import FINETUNE_KEYS, emit_json, finetune_options, handle_errors, pop_config, resolve_model
from ..units import format_gb, format_gib, format_params


def _money(usd) -> str:
    return "-" if usd is None else f"${usd:,.2f}"


def _raw_options(kwargs: dict) -> dict:
    """The training options the user gave (None = left to the planner), removed from ``kwargs``."""
    opts = {k: kwargs.pop(k) for k in FINETUNE_KEYS}
    if opts.get("lora_alpha") is not None and float(opts["lora_alpha"]).is_integer():
        opts["lora_alpha"] = int(opts["lora_alpha"])
    return {k: v for k, v in opts.items() if v is not None}


def _method_given() -> bool:
    ctx = click.get_current_context()
    src = ctx.get_parameter_source("method")
    return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")


def render_plan(p, top: int | None = None, feasible_only: bool = False) -> str:
    """The plan as a table: feasible rows ranked, then the rows that do not fit with the reason."""
    from ..cost import format_duration, format_tokens
    from ..params import count_params

    lines = [f"Plan for {p.model.name} ({format_params(count_params(p.model).total)} parameters): "
             f"{format_tokens(p.tokens)} tokens x {p.epochs:g} epoch(s), sequences of {p.seq_len}, "
             f"global batch {p.global_batch}, ranked by {p.sort}", ""]
    head = (f"{'#':>3}  {'GPU':<14} {'n':>2}  {'method':<6} {'layout':<30} {'batch':>8}  {'ckpt':<4} {'optim':<18}"
            f" {'per-GPU peak':>13} {'time':>10} {'cost':>12}")
    lines.append(head)
    feasible = [r for r in p.rows if r.feasible]
    shown = feasible[:top] if top else feasible
    notes = {}
    for i, r in enumerate(shown, 1):
        c = r.config
        mark = ""
        if r.gpu.notes:
            notes.setdefault(r.gpu.name, r.gpu.notes)
            mark = "*"
        t = "-" if r.cost is None else format_duration(r.cost.time_s)
        lines.append(f"{i:>3}  {r.gpu.name + mark:<14} {r.n_gpus:>2}  {r.method:<6} {r.sharding.label:<30} "
                     f"{f'{c.batch_size}x{c.gradient_accumulation_steps}':>8}  "
                     f"{'on' if c.gradient_checkpointing else 'off':<4} {c.optim:<18} "
                     f"{format_gib(r.memory.device_total_bytes):>13} {t:>10} {_money(r.cost_usd):>12}"
                     + (f"  ({r.reason})" if r.reason else "")
                     + (f"  CPU RAM {format_gib(r.memory.cpu_bytes_per_node)} per node" if r.memory.cpu_bytes_per_node
                        else ""))
    if not feasible:
        lines.append("    (no setup fits: try more GPUs with --max-gpus, a shorter --seq-len or another --method)")
    if top and len(feasible) > top:
        lines.append(f"    ... {len(feasible) - top} more feasible rows (drop --top to see them)")
    infeasible = [r for r in p.rows if not r.feasible]
    if infeasible and not feasible_only:
        lines.append("")
        lines.append("Does not fit:")
        for r in infeasible:
            lines.append(f"     {r.gpu.name:<14} {r.n_gpus:>2}  {r.method:<6} {r.reason}")
    lines.append("")
    lines.append("batch = micro-batch x gradient accumulation steps per GPU; per-GPU peak = device total "
                 "(allocator reserve and CUDA context included).")
    for name, note in notes.items():
        lines.append(f"* {name}: {note}")
    lines.append("Assumptions:")
    for a in p.assumptions:
        lines.append(f"  - {a}")
    return "\n".join(lines)


def render_comparison(cmp) -> str:
    """The cheapest setup of each method and what drives the cost ratios."""
    from ..cost import format_duration, format_tokens

    p = cmp.plan
    lines = [f"Cheapest setup per method for {p.model.name} on the same data: {format_tokens(p.tokens)} tokens x "
             f"{p.epochs:g} epoch(s), sequences of {p.seq_len}, global batch {p.global_batch}", ""]
    for m in ("full", "lora", "qlora"):
        r = cmp.best.get(m)
        if r is None:
            lines.append(f"  {m:<6} no setup fits the GPUs and counts planned")
            continue
        c = r.config
        lines.append(f"  {m:<6} {r.n_gpus} x {r.gpu.name:<12} {r.sharding.label:<30} batch {c.batch_size}x"
                     f"{c.gradient_accumulation_steps}, ckpt {'on' if c.gradient_checkpointing else 'off'}, "
                     f"{c.optim}: {format_gib(r.memory.device_total_bytes)} per GPU, "
                     f"{format_duration(r.cost.time_s)}, {r.cost.gpu_hours:,.1f} GPU-h, {_money(r.cost_usd)}; "
                     f"{r.cost.flops.executed_per_token / 1e9:,.1f} GFLOP/token executed")
    if cmp.factors:
        lines.append("")
        lines.append("Cost of full fine-tuning over each method = FLOPs x MFU x GPU price x overheads:")
        for m, f in cmp.factors.items():
            if m == "full":
                continue
            lines.append(f"  full / {m:<5} = {f['cost_ratio']:.2f}x  =  FLOPs per token {f['flops']:.2f}x"
                         f"  x  MFU {f['mfu']:.2f}x  x  GPU $ per TFLOP-hour {f['gpu_price']:.2f}x"
                         f"  x  overheads {f['overheads']:.2f}x")
        lines.append("")
        lines.append("  FLOPs: frozen base weights skip their weight gradients (LoRA backward ~ 1 forward instead of "
                     "2); checkpointing adds a forward back.  GPU price: memory decides which GPUs (and how many) a "
                     "method can use at all; the cheapest $/TFLOP-hour GPUs are the small-memory ones.  Overheads: "
                     "multi-GPU scaling, QLoRA dequantisation, CPU offload.")
    elif "full" not in cmp.best:
        lines.append("")
        lines.append("Full fine-tuning fits none of the planned setups, so there is no finite ratio: raise --max-gpus.")
    lines.append("Assumptions:")
    for a in p.assumptions:
        lines.append(f"  - {a}")
    return "\n".join(lines)


def render_cost(ce, mem) -> str:
    from ..cost import format_duration, format_tokens

    fl = ce.flops
    lines = [f"{ce.model}, {ce.method} on {ce.n_gpus} x {ce.gpu} ({ce.sharding}): "
             f"{format_tokens(ce.tokens_processed)} tokens ({format_tokens(ce.tokens)} x {ce.epochs:g} epoch(s))",
             f"  micro-batch {ce.micro_batch} x {ce.seq_len} tokens, accumulation {ce.gradient_accumulation_steps}, "
             f"global batch {ce.global_batch} sequences, {ce.optimizer_steps:,} optimizer steps",
             "",
             f"  FLOPs per token        {fl.model_per_token / 1e9:12,.2f} GFLOP model"
             f" ({fl.executed_per_token / 1e9:,.2f} executed with recompute)",
             f"  per micro-batch        {ce.compute_s_per_microbatch:12.3f} s compute at MFU {ce.mfu:.2f} of "
             f"{ce.peak_tflops:g} TFLOP/s"]
    if ce.dequant_s_per_microbatch:
        lines.append(f"                         {ce.dequant_s_per_microbatch:12.3f} s QLoRA dequantisation "
                     f"({fl.dequant_calls_per_weight} per weight, {format_gb(fl.dequant_bytes)} moved)")
    if ce.offload_s_per_microbatch or ce.offload_s_per_step:
        lines.append(f"                         {ce.offload_s_per_microbatch:12.3f} s parameter offload; "
                     f"{ce.offload_s_per_step:.3f} s per optimizer step (PCIe + CPU AdamW)")
    lines += [f"  throughput             {ce.tokens_per_s:12,.0f} tokens/s (all GPUs); achieved MFU "
              f"{ce.achieved_mfu:.3f}",
              f"  time                   {format_duration(ce.time_s):>12}  ({ce.gpu_hours:,.2f} GPU-hours)",
              f"  cost                   {_money(ce.cost_usd):>12}"
              + (f"  at ${ce.price_usd_per_hour:g}/GPU-hour ({ce.price_source})" if ce.price_usd_per_hour is not None
                 else "  (no price: give --price)")]
    if mem is not None:
        verdict = "fits" if mem.fits else "DOES NOT FIT"
        lines += ["", f"  memory per GPU         {format_gib(mem.device_total_bytes):>12} device total "
                      f"({format_gb(mem.device_total_bytes)}): {verdict} on {mem.gpu.label}"]
        if mem.cpu_bytes_per_node:
            lines.append(f"  CPU memory per node    {format_gib(mem.cpu_bytes_per_node):>12} of offloaded states")
    lines.append("")
    lines.append("Assumptions:")
    for a in ce.assumptions:
        lines.append(f"  - {a}")
    if mem is not None:
        for a in mem.notes:
            lines.append(f"  - {a}")
    return "\n".join(lines)


def _sharding(strategy, n_gpus, offload, gpus_per_node):
    from ..sharding import Sharding

    if strategy is None:
        strategy = "single" if n_gpus == 1 and offload == "none" else ("ddp" if offload == "none" else "zero3")
    return Sharding(strategy, n_gpus, offload, gpus_per_node)


def register(cli):
    from ..plan import SORTS
    from ..sharding import GPUS_PER_NODE, OFFLOADS, STRATEGIES

    @cli.command("plan")
    @click.argument("model")
    @click.option("--tokens", required=True, help="Dataset size in tokens: 100M, 1.5B, 20000 (K/M/B/T are 10^3..)")
    @click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the dataset.")
    @finetune_options
    @click.option("--gpus", "gpu_names", default=None,
                  help="Comma list of GPUs to consider (catalog names or sizes) [the whole catalog].")
    @click.option("--max-gpus", type=int, default=8, show_default=True, help="Largest GPU count per job.")
    @click.option("--all-counts", is_flag=True, help="Try every count 1..max-gpus, not only powers of two.")
    @click.option("--global-batch", type=int, default=None,
                  help="Sequences per optimizer step [16, or batch x accumulation when both are given].")
    @click.option("--sort", type=click.Choice(SORTS), default="cost", show_default=True, help="Rank by.")
    @click.option("--mfu", type=float, default=None, help="Model FLOPs utilisation [full 0.40, lora 0.35, qlora 0.30].")
    @click.option("--price", type=float, default=None, help="USD per GPU-hour (with a single --gpus entry).")
    @click.option("--scaling-efficiency", type=float, default=None,
                  help="Data-parallel efficiency per doubling of GPUs [0.95].")
    @click.option("--strategy", "strategies", multiple=True, type=click.Choice(STRATEGIES),
                  help="Restrict the multi-GPU layouts (repeatable) [planner's choice].")
    @click.option("--offload/--no-offload", default=True, show_default=True, help="Allow CPU offload layouts.")
    @click.option("--gpus-per-node", type=int, default=GPUS_PER_NODE, show_default=True)
    @click.option("--cpu-memory-per-gpu", default="128GiB", show_default=True,
                  help="Host RAM per GPU that offloaded states may take (a size such as 256GiB, or 'unlimited').")
    @click.option("--top", type=int, default=None, help="Show only the N best feasible rows.")
    @click.option("--feasible-only", is_flag=True, help="Hide the rows that do not fit.")
    @click.option("--compare-methods", is_flag=True,
                  help="Cheapest setup of full, LoRA and QLoRA on the same data, and what drives the cost ratios.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @handle_errors
    def plan_cmd(model, tokens, epochs, gpu_names, max_gpus, all_counts, global_batch, sort, mfu, price,
                 scaling_efficiency, strategies, offload, gpus_per_node, cpu_memory_per_gpu, top, feasible_only,
                 compare_methods, as_json, **kwargs):
        """Which GPU, how many, how long and how much: the best setup for every GPU type and count.

        Without --method, full fine-tuning, LoRA and QLoRA are all planned (the "[default: lora]" below is the
        other commands' default).  Training options you give stay fixed; the planner chooses the rest: micro-batch,
        accumulation, checkpointing, optimizer and multi-GPU layout.

        \b
        Example:
            lora-budget plan llama-3.1-8b --tokens 100M --method qlora
            lora-budget plan llama-65b --tokens 100M --compare-methods
        """
        from ..cost import DEFAULT_SCALING_EFFICIENCY
        from ..plan import compare_methods as run_compare
        from ..plan import gpu_counts, plan, resolve_gpus
        from ..units import parse_size

        spec = resolve_model(model)
        given = _method_given()
        method = kwargs["method"]
        if given:
            pop_config(dict(kwargs))  # validates the options for the method (one-line error on a bad one)
        kwargs.pop("method")
        options = _raw_options(kwargs)
        args = dict(epochs=epochs, gpus=resolve_gpus(gpu_names), counts=gpu_counts(max_gpus, all_counts),
                    options=options, global_batch=global_batch, sort=sort, mfu=mfu, price_usd_per_hour=price,
                    scaling_efficiency=DEFAULT_SCALING_EFFICIENCY if scaling_efficiency is None
                    else scaling_efficiency,
                    strategies=tuple(strategies) or None, offload=offload, gpus_per_node=gpus_per_node,
                    cpu_memory_per_gpu=None if cpu_memory_per_gpu.strip().lower() == "unlimited"
                    else parse_size(cpu_memory_per_gpu))
        if compare_methods:
            cmp = run_compare(spec, tokens, **args)
            if as_json:
                emit_json(cmp.as_dict())
            else:
                click.echo(render_comparison(cmp))
            return
        p = plan(spec, tokens, methods=(method,) if given else None, **args)
        if as_json:
            emit_json(p.as_dict())
        else:
            click.echo(render_plan(p, top=top, feasible_only=feasible_only))

    @cli.command("cost")
    @click.argument("model")
    @click.option("--gpu", required=True, help="Catalog GPU name (a bare capacity needs --tflops).")
    @click.option("--tokens", required=True, help="Dataset size in tokens: 100M, 1.5B, 20000.")
    @click.option("--epochs", type=float, default=1.0, show_default=True)
    @finetune_options
    @click.option("--n-gpus", type=int, default=1, show_default=True, help="Data-parallel GPUs.")
    @click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
                  help="Multi-GPU layout [single for 1 GPU, ddp otherwise].")
    @click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True)
    @click.option("--gpus-per-node", type=int, default=GPUS_PER_NODE, show_default=True)
    @click.option("--mfu", type=float, default=None, help="Model FLOPs utilisation [full 0.40, lora 0.35, qlora 0.30].")
    @click.option("--price", type=float, default=None, help="USD per GPU-hour [catalog price].")
    @click.option("--tflops", type=float, default=None, help="Dense bf16 peak TFLOP/s [catalog].")
    @click.option("--scaling-efficiency", type=float, default=None, help="Per doubling of GPUs [0.95].")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @handle_errors
    def cost_cmd(model, gpu, tokens, epochs, n_gpus, strategy, offload, gpus_per_node, mfu, price, tflops,
                 scaling_efficiency, as_json, **kwargs):
        """Time and cost of one setup: MODEL on --n-gpus x --gpu for --tokens x --epochs.

        \b
        Example:
            lora-budget cost llama-2-7b --gpu a100-80gb --tokens 100M --method lora
        """
        from ..cost import DEFAULT_SCALING_EFFICIENCY, parse_tokens, run_cost
        from ..estimate import estimate
        from ..gpus import get_gpu
        from ..sharding import offload_traffic, shard

        spec = resolve_model(model)
        cfg = pop_config(kwargs)
        g = get_gpu(gpu)
        n = parse_tokens(tokens)
        layout = _sharding(strategy, n_gpus, offload, gpus_per_node)
        mem = shard(estimate(spec, cfg, g), layout)
        ce = run_cost(spec, cfg, g, n, epochs=epochs, n_gpus=n_gpus, sharding_label=layout.label,
                      offload=offload_traffic(mem), mfu=mfu, price_usd_per_hour=price, tflops=tflops,
                      scaling_efficiency=DEFAULT_SCALING_EFFICIENCY if scaling_efficiency is None
                      else scaling_efficiency)
        if as_json:
            d = ce.as_dict()
            d["memory"] = mem.as_dict()
            emit_json(d)
        else:
            click.echo(render_cost(ce, mem))

    @cli.command("solve")
    @click.argument("model")
    @click.option("--gpu", required=True, help="Catalog GPU name or a capacity such as 48GB / 24GiB.")
    @finetune_options
    @click.option("--global-batch", type=int, default=None,
                  help="Sequences per optimizer step to keep with gradient accumulation.")
    @click.option("--n-gpus", type=int, default=1, show_default=True)
    @click.option("--strategy", type=click.Choice(STRATEGIES), default=None)
    @click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True)
    @click.option("--multiple-of", type=int, default=1, show_default=True,
                  help="Round the longest sequence down to a multiple of this.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @handle_errors
    def solve_cmd(model, gpu, global_batch, n_gpus, strategy, offload, multiple_of, as_json, **kwargs):
        """The largest micro-batch and the longest sequence that fit GPU, and the accumulation for a global batch.

        The micro-batch is solved at --seq-len, the sequence at --batch-size; both are exact (one more does not
        fit).

        \b
        Example:
            lora-budget solve llama-3.1-8b --gpu rtx-4090 --method qlora --seq-len 2048 --global-batch 32
        """
        from ..errors import ConfigError, InfeasibleError
        from ..estimate import estimate
        from ..gpus import get_gpu
        from ..sharding import shard
        from ..solver import max_batch_size, max_seq_len, micro_batch_for

        spec = resolve_model(model)
        cfg = pop_config(kwargs)
        g = get_gpu(gpu)
        layout = _sharding(strategy, n_gpus, offload, 8)
        if multiple_of < 1:
            raise ConfigError("--multiple-of must be a positive integer")

        def memory(c):
            return shard(estimate(spec, c, g), layout)

        out = {"model": spec.name, "gpu": {"name": g.name, "memory_bytes": g.memory_bytes},
               "sharding": layout.as_dict(), "options": cfg.options()}
        lines = [f"{spec.name} with {cfg.method} on {g.label}" + (f", {layout.label} over {n_gpus} GPUs"
                                                                   if n_gpus > 1 or offload != "none" else "")]
        answers = 0
        for name, solve in (("batch_size", lambda: max_batch_size(spec, cfg, g, memory=memory)),
                            ("seq_len", lambda: max_seq_len(spec, cfg, g, multiple_of=multiple_of, memory=memory))):
            try:
                sol = solve()
            except InfeasibleError as exc:
                out[name] = {"error": str(exc)}
                lines.append(f"  {name.replace('_', '-')}: none fits ({exc})")
                continue
            answers += 1
            out[name] = sol.as_dict()
            at = f"at --seq-len {cfg.seq_len}" if name == "batch_size" else f"at --batch-size {cfg.batch_size}"
            proof = ("capped by the search limit" if sol.capped else
                     f"{sol.value + (1 if name == 'batch_size' else multiple_of)} needs "
                     f"{format_gib(sol.next_estimate.device_total_bytes, 3)}")
            lines.append(f"  largest {name.replace('_', '-'):<11} {sol.value:>8,} {at}: "
                         f"{format_gib(sol.estimate.device_total_bytes, 3)} of {format_gib(g.memory_bytes, 3)} "
                         f"({proof})")
            if name == "batch_size" and global_batch:
                if global_batch < 1:
                    raise ConfigError("--global-batch must be a positive integer")
                # accumulation keeps the gradients across micro-batches: check the setup as it will run, and
                # step the micro-batch down in the (rare) case that this tips it over
                limit = sol.value
                while True:
                    micro, acc = micro_batch_for(global_batch, limit, n_gpus)
                    ok = memory(cfg.with_(batch_size=micro, gradient_accumulation_steps=acc)).device_total_bytes \
                        <= g.memory_bytes
                    if ok or micro == 1:
                        break
                    limit = micro - 1
                out["accumulation"] = {"global_batch": global_batch, "micro_batch": micro,
                                       "gradient_accumulation_steps": acc,
                                       "effective_global_batch": micro * acc * n_gpus, "fits": ok}
                lines.append(f"  global batch {global_batch}: micro-batch {micro} x {acc} accumulation steps x "
                             f"{n_gpus} GPU(s) = {micro * acc * n_gpus} sequences per optimizer step"
                             + ("" if ok else " (DOES NOT FIT with accumulation: lower the micro-batch)"))
        if not answers:
            raise InfeasibleError(out["batch_size"]["error"])
        if as_json:
            emit_json(out)
        else:
            click.echo("\n".join(lines))
