"""The planner: for every GPU type and count, the cheapest (or fastest) setup that fits, with its time and cost.
Standard library only.

For each GPU, GPU count and method the planner tries the setups the user left open: gradient checkpointing off
and on, the method's default optimizer (and 8-bit AdamW for full fine-tuning), and the data-parallel layouts of
``sharding.py`` (DDP, FSDP, ZeRO-1/2/3, CPU offload).  For every setup that fits at a micro-batch of one it
solves the largest micro-batch (up to the global batch's share per GPU, ``solver.py``), takes the gradient
accumulation that keeps the global batch, prices it (``cost.py``) and keeps the cheapest; ties go to the simpler
setup (no offload before offload, DDP before sharding).  Options the user gave are kept fixed.

Speed: memory depends on the GPU only through the fit threshold, so every estimate and every per-GPU sharded
estimate is computed once per (setup, micro-batch) and shared by all GPUs; a setup whose best possible time
(its largest micro-batch) cannot beat the best found so far is never searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cost import (DEFAULT_MFU, DEFAULT_SCALING_EFFICIENCY, CostEstimate, format_tokens, parse_tokens, run_cost)
from .errors import ConfigError, InfeasibleError
from .estimate import estimate
from .finetune import METHODS, FinetuneConfig, make_config
from .gpus import GPUSpec, get_gpu, list_gpus
from .models import ModelSpec
from .sharding import GPUS_PER_NODE, ShardedEstimate, Sharding, offload_traffic, shard
from .solver import largest_fitting
from .units import GiB, ceil_div, format_gib

#: Version of the JSON shape of ``Plan.as_dict``.
PLAN_SCHEMA = 1
#: Host RAM one GPU's offloaded states may take: cloud instances give roughly 100-250 GB of RAM per GPU (an
#: assumption on the low side; ``--cpu-memory-per-gpu`` changes it).  DeepSpeed's own estimator also adds 50 %
#: for pinned buffers, which we do not.
CPU_MEMORY_PER_GPU = 128 * GiB
#: Sequences per optimizer step when the user gives none: the QLoRA paper's Guanaco recipe (micro-batch 1 x 16
#: accumulation steps, artidoro/qlora finetune_guanaco_65b.sh).
DEFAULT_GLOBAL_BATCH = 16
DEFAULT_COUNTS = (1, 2, 4, 8)
SORTS = ("cost", "time")
#: Options that exist only for some methods (dropped for the others when several methods are planned).
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")
QLORA_ONLY = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
#: The alternative optimizer tried when the default does not fit (full fine-tuning only: LoRA states are tiny).
LEAN_OPTIM = {"full": "adamw_8bit"}
#: DeepSpeed cannot page bnb state: the unpaged equivalent it runs instead.
UNPAGED = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_8bit"}


def layouts(n_gpus: int, *, method: str = "full", offload: bool = True, strategies: tuple[str, ...] | None = None,
            gpus_per_node: int = GPUS_PER_NODE) -> list[Sharding]:
    """The data-parallel layouts the planner tries on ``n_gpus`` GPUs, simplest first.

    Full fine-tuning tries DDP, FSDP and DeepSpeed ZeRO-1/2/3 with their offloads.  LoRA and QLoRA shard with FSDP
    only (the FSDP-QLoRA route of HF/Answer.AI): their trainable states are tiny, so ZeRO-1/2 save nothing over
    DDP and ZeRO-3 nothing over FSDP FULL_SHARD, and DeepSpeed cannot keep bnb's paged optimizers.  ``strategies``
    (given by the user) overrides this choice.
    """
    if n_gpus == 1:
        out = [("single", "none"), ("zero2", "optimizer"), ("zero3", "params"), ("fsdp_full_shard", "params")]
    else:
        out = [("ddp", "none"), ("fsdp_full_shard", "none"), ("zero1", "none"), ("zero2", "none"),
               ("zero3", "none")]
        if n_gpus > gpus_per_node:
            out.append(("fsdp_hybrid_shard", "none"))
        out += [("zero2", "optimizer"), ("zero3", "optimizer"), ("fsdp_full_shard", "params"), ("zero3", "params")]
    result = []
    for strategy, off in out:
        if off != "none" and not offload:
            continue
        if strategies:
            if strategy not in strategies and not (n_gpus == 1 and strategy == "single"):
                continue
        elif method != "full" and strategy.startswith("zero"):
            continue
        elif method == "full" and n_gpus == 1 and strategy == "fsdp_full_shard":
            continue  # ZeRO-3 param offload covers it for full fine-tuning
        result.append(Sharding(strategy, n_gpus, off, gpus_per_node))
    return result


@dataclass(frozen=True)
class PlanRow:
    """The best setup of one (GPU, count, method), or why there is none."""

    gpu: GPUSpec
    n_gpus: int
    method: str
    feasible: bool
    reason: str = ""
    config: FinetuneConfig | None = None
    sharding: Sharding | None = None
    memory: ShardedEstimate | None = None
    cost: CostEstimate | None = None

    @property
    def cost_usd(self) -> float | None:
        return None if self.cost is None else self.cost.cost_usd

    @property
    def time_s(self) -> float | None:
        return None if self.cost is None else self.cost.time_s

    def as_dict(self) -> dict:
        d = {"gpu": self.gpu.name, "n_gpus": self.n_gpus, "method": self.method, "feasible": self.feasible,
             "reason": self.reason, "gpu_memory_bytes": self.gpu.memory_bytes}
        if self.config is not None:
            c = self.config
            d["setup"] = {"strategy": self.sharding.strategy, "offload": self.sharding.offload,
                          "micro_batch": c.batch_size, "gradient_accumulation_steps": c.gradient_accumulation_steps,
                          "global_batch": c.batch_size * c.gradient_accumulation_steps * self.n_gpus,
                          "seq_len": c.seq_len, "gradient_checkpointing": c.gradient_checkpointing,
                          "optim": c.optim, "options": c.options()}
        if self.memory is not None:
            d["per_gpu_device_total_bytes"] = self.memory.device_total_bytes
            d["per_gpu_peak_allocated_bytes"] = self.memory.peak_allocated_bytes
            d["cpu_bytes_per_node"] = self.memory.cpu_bytes_per_node
        if self.cost is not None:
            d.update(time_s=self.cost.time_s, gpu_hours=self.cost.gpu_hours, cost_usd=self.cost.cost_usd,
                     tokens_per_s=self.cost.tokens_per_s, price_usd_per_hour=self.cost.price_usd_per_hour,
                     mfu=self.cost.mfu, achieved_mfu=self.cost.achieved_mfu)
        return d


@dataclass(frozen=True)
class Plan:
    """Every (GPU, count, method) row, feasible ones ranked by ``sort`` first."""

    model: ModelSpec
    tokens: int
    epochs: float
    seq_len: int
    global_batch: int
    sort: str
    methods: tuple[str, ...]
    counts: tuple[int, ...]
    rows: tuple[PlanRow, ...]
    assumptions: tuple[str, ...] = field(default=())

    @property
    def feasible(self) -> list[PlanRow]:
        return [r for r in self.rows if r.feasible and r.cost is not None]

    def best(self, method: str | None = None) -> PlanRow:
        """The first-ranked feasible row (of ``method``); raises InfeasibleError when there is none."""
        for r in self.feasible:
            if method is None or r.method == method:
                return r
        what = f" with {method}" if method else ""
        raise InfeasibleError(f"no GPU setup in the plan fits {self.model.name}{what}: try more GPUs (--max-gpus), "
                              f"a shorter --seq-len or another --method")

    def as_dict(self) -> dict:
        return {"schema": PLAN_SCHEMA, "model": self.model.name, "tokens": self.tokens, "epochs": self.epochs,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "sort": self.sort,
                "methods": list(self.methods), "counts": list(self.counts),
                "assumptions": list(self.assumptions), "rows": [r.as_dict() for r in self.rows]}


class _Memo:
    """Estimates and sharded estimates shared by every GPU of a plan (memory never depends on the GPU)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.est: dict = {}
        self.sharded: dict = {}
        self._acc_invariant: bool | None = None
        self.shapes: dict = {}

    def shape(self, cfg: FinetuneConfig, batch_size: int, accumulation: int) -> FinetuneConfig:
        """``cfg`` with another micro-batch and accumulation (memoised: the planner asks for the same ones for
        every GPU, and a validated copy costs more than the lookup)."""
        key = (cfg, batch_size, accumulation)
        if key not in self.shapes:
            self.shapes[key] = cfg.with_(batch_size=batch_size, gradient_accumulation_steps=accumulation)
        return self.shapes[key]

    def memory(self, cfg: FinetuneConfig, layout: Sharding, exact: bool = False) -> ShardedEstimate:
        """Per-GPU memory of ``cfg`` under ``layout``.  Unless ``exact``, accumulation counts above 2 share the
        estimate of 2: what accumulation changes is whether gradients persist across micro-batches, not how many
        micro-batches there are (the planner re-checks its answer with ``exact=True``)."""
        if not exact and cfg.gradient_accumulation_steps > 2 and self.accumulation_invariant(cfg):
            cfg = self.shape(cfg, cfg.batch_size, 2)
        key = (cfg, layout)
        if key not in self.sharded:
            if cfg not in self.est:
                self.est[cfg] = estimate(self.spec, cfg)
            self.sharded[key] = shard(self.est[cfg], layout)
        return self.sharded[key]

    def accumulation_invariant(self, cfg: FinetuneConfig) -> bool:
        """Whether the memory model gives accumulation 2 and 3 the same phases (checked once per plan)."""
        if self._acc_invariant is None:
            a = estimate(self.spec, cfg.with_(gradient_accumulation_steps=2))
            b = estimate(self.spec, cfg.with_(gradient_accumulation_steps=3))
            self.est.setdefault(a.config, a)
            self._acc_invariant = [ph.components for ph in a.memory.phases] == \
                [ph.components for ph in b.memory.phases]
        return self._acc_invariant

    def max_batch(self, cfg: FinetuneConfig, layout: Sharding, capacity: int, choices: tuple[int, ...],
                  accumulation) -> int:
        """The largest micro-batch among ``choices`` (ascending) whose per-GPU device total, at the accumulation
        ``accumulation(b)`` it would run with, fits ``capacity``; 0 when none does.  Bisection over the choices:
        memory is monotone in the micro-batch (accumulation only adds the gradients to the forward phase, which
        is not above the backward's peak that holds them anyway), and the answer is checked exactly."""
        def fits(k: int) -> bool:
            b = choices[k - 1]
            c = self.shape(cfg, b, accumulation(b))
            return self.memory(c, layout).device_total_bytes <= capacity

        i = largest_fitting(fits, 1, len(choices))
        return choices[i - 1] if i else 0


def batch_choices(per_gpu: int) -> tuple[int, ...]:
    """Micro-batches that keep ``per_gpu`` sequences per GPU and optimizer step exactly: its divisors, each with
    ``per_gpu // b`` accumulation steps (16 -> 1, 2, 4, 8, 16).  Time per token does not depend on the
    accumulation, so the largest divisor that fits is the best choice."""
    return tuple(b for b in range(1, per_gpu + 1) if per_gpu % b == 0)


def _method_config(method: str, options: dict, explicit: bool) -> FinetuneConfig:
    opts = dict(options)
    if not explicit:
        if method == "full":
            for k in LORA_ONLY + QLORA_ONLY:
                opts.pop(k, None)
        elif method == "lora":
            for k in QLORA_ONLY:
                opts.pop(k, None)
    return make_config(method, **opts)


def _candidates(method: str, base: FinetuneConfig, fixed: set, layout: Sharding) -> list[FinetuneConfig]:
    """The configs to try for one method under one layout (batch size still open), in preference order."""
    ckpts = [base.gradient_checkpointing] if "gradient_checkpointing" in fixed else [False, True]
    optims = [base.optim]
    if "optim" not in fixed and method in LEAN_OPTIM:
        optims.append(LEAN_OPTIM[method])
    out = []
    for ck in ckpts:  # fastest first: a setup found early lets the planner skip the slower ones unestimated
        for optim in optims:
            if layout.deepspeed and optim in UNPAGED:
                if "optim" in fixed:
                    continue
                optim = UNPAGED[optim]
            cfg = base.with_(gradient_checkpointing=ck, optim=optim)
            if cfg not in out:
                out.append(cfg)
    return out


def _no_bf16(gpu: GPUSpec, cfg: FinetuneConfig) -> bool:
    uses_bf16 = cfg.dtype == "bfloat16" or cfg.mixed_precision == "bf16" or (
        cfg.method == "qlora" and cfg.bnb_4bit_compute_dtype == "bfloat16")
    return uses_bf16 and "no bf16" in gpu.notes


def plan(spec: ModelSpec, tokens, *, epochs: float = 1.0, methods: tuple[str, ...] | None = None,
         gpus: list[GPUSpec] | None = None, counts: tuple[int, ...] = DEFAULT_COUNTS, options: dict | None = None,
         global_batch: int | None = None, sort: str = "cost", mfu: float | None = None,
         price_usd_per_hour: float | None = None, scaling_efficiency: float = DEFAULT_SCALING_EFFICIENCY,
         strategies: tuple[str, ...] | None = None, offload: bool = True,
         gpus_per_node: int = GPUS_PER_NODE, cpu_memory_per_gpu: int | None = CPU_MEMORY_PER_GPU) -> Plan:
    """Plan fine-tuning ``spec`` on ``tokens`` x ``epochs`` over GPU types x counts x methods.

    Args:
        tokens: a count or a string such as "100M".
        methods: the methods to plan (default: all three).  Options that do not apply to a method are dropped
            for it when several methods are planned.
        gpus: GPU types (default: the catalog).  counts: GPU counts per job.
        options: training options the user fixed (``make_config`` names); the rest the planner chooses.
        global_batch: sequences per optimizer step (default 16, or micro-batch x accumulation when both are
            fixed).
        sort: "cost" or "time".  mfu: one MFU for every method (default: ``cost.DEFAULT_MFU``).
        price_usd_per_hour: override the price (only with a single GPU type).
        strategies: restrict the data-parallel strategies; offload: allow CPU offload.
        cpu_memory_per_gpu: host RAM one GPU's offloaded states may take (bytes; None: no limit).

    Raises:
        ConfigError: bad tokens, sort, counts, price with several GPUs, or a bad option.
    """
    tokens = parse_tokens(tokens)
    if sort not in SORTS:
        raise ConfigError(f"unknown --sort {sort!r}: use cost or time")
    counts = tuple(sorted(set(counts)))
    if not counts or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
        raise ConfigError(f"GPU counts must be positive integers, got {counts!r}")
    explicit = methods is not None
    methods = tuple(methods) if methods else METHODS
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}: use full, lora or qlora")
    gpus = list(gpus) if gpus else list_gpus()
    if price_usd_per_hour is not None and len(gpus) != 1:
        raise ConfigError("--price applies to one GPU type: give exactly one --gpus entry with it")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    fixed = set(options)
    bases = {m: _method_config(m, options, explicit and len(methods) == 1) for m in methods}
    any_base = next(iter(bases.values()))
    if global_batch is None:
        if "batch_size" in fixed and "gradient_accumulation_steps" in fixed:
            global_batch = any_base.batch_size * any_base.gradient_accumulation_steps
        else:
            global_batch = DEFAULT_GLOBAL_BATCH
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"--global-batch must be a positive integer, got {global_batch!r}")

    memo = _Memo(spec)
    rows: list[PlanRow] = []
    for gpu in gpus:
        for n in counts:
            for method in methods:
                layouts_n = layouts(n, method=method, offload=offload, strategies=strategies,
                                    gpus_per_node=gpus_per_node)
                rows.append(_best_row(spec, gpu, n, method, bases[method], fixed, layouts_n, memo, tokens, epochs,
                                      global_batch, sort, mfu, price_usd_per_hour, scaling_efficiency,
                                      cpu_memory_per_gpu))

    def key(r: PlanRow):
        if r.feasible and r.cost is not None:
            metric = r.cost.cost_usd if (sort == "cost" and r.cost.cost_usd is not None) else None
            return (0, metric is None, metric if metric is not None else r.cost.time_s, r.cost.time_s,
                    r.gpu.name, r.n_gpus, r.method)
        return (1, r.feasible is False, 0, 0, r.gpu.name, r.n_gpus, r.method)

    rows.sort(key=key)
    mfus = {m: (mfu if mfu is not None else DEFAULT_MFU[m]) for m in methods}
    assumptions = (
        f"{format_tokens(tokens)} tokens x {epochs:g} epoch(s) in packed sequences of {any_base.seq_len} tokens, "
        f"global batch {global_batch} sequences per optimizer step",
        "MFU " + ", ".join(f"{m} {v:.2f}" for m, v in mfus.items())
        + (" (defaults: assumptions, see lora_budget.cost.DEFAULT_MFU)" if mfu is None else " (given)"),
        f"data-parallel scaling {scaling_efficiency:g} per doubling of the GPU count (NVLink-class links; "
        "PCIe-only cards such as the RTX series scale worse)",
        "CPU offload: at most " + (format_gib(cpu_memory_per_gpu) if cpu_memory_per_gpu is not None else "unlimited")
        + " of host RAM per GPU for offloaded states",
        "prices: catalog on-demand prices per GPU-hour (see `lora-budget gpus`), override with --price"
        if price_usd_per_hour is None else f"price ${price_usd_per_hour:g} per GPU-hour (given)",
        "memory: lora_budget's analytical model (device total incl. CUDA context per GPU); fits = below the "
        "driver-reported total",
    )
    return Plan(model=spec, tokens=tokens, epochs=epochs, seq_len=any_base.seq_len, global_batch=global_batch,
                sort=sort, methods=methods, counts=counts, rows=tuple(rows), assumptions=assumptions)


def _best_row(spec, gpu, n, method, base, fixed, layouts_n, memo: _Memo, tokens, epochs, global_batch, sort, mfu,
              price, scaling, cpu_limit) -> PlanRow:
    if _no_bf16(gpu, base):
        return PlanRow(gpu, n, method, False, f"{gpu.name} has no bf16 support: plan it with --dtype float16")
    cap_acc = base.gradient_accumulation_steps if "gradient_accumulation_steps" in fixed else 1
    b_cap = max(1, ceil_div(global_batch, n * cap_acc))
    choices = batch_choices(b_cap)

    def accumulation(b: int) -> int:
        return cap_acc if "gradient_accumulation_steps" in fixed else ceil_div(global_batch, b * n)
    timed = bool(gpu.bf16_tflops) and (method != "qlora" or bool(gpu.bandwidth_gbps))
    best = None  # (metric, rank, row)
    leanest = None  # (device_total, label) at the smallest micro-batch
    host_short = None  # (CPU bytes per GPU, layout) of an offload setup that fits the GPU but not the host RAM
    rank = 0
    for layout in layouts_n:
        key = ("candidates", method, layout.deepspeed)
        if key not in memo.shapes:
            try:
                memo.shapes[key] = _candidates(method, base, fixed, layout)
            except ConfigError:
                memo.shapes[key] = []
        cands = memo.shapes[key]
        for cfg in cands:
            rank += 1
            b1 = base.batch_size if "batch_size" in fixed else 1

            def price_it(c: FinetuneConfig, mem: ShardedEstimate | None) -> CostEstimate:
                return run_cost(spec, c, gpu, tokens, epochs=epochs, n_gpus=n, sharding_label=layout.label,
                                offload=None if mem is None else offload_traffic(mem), mfu=mfu,
                                price_usd_per_hour=price, scaling_efficiency=scaling)

            def metric(ce: CostEstimate) -> float:
                return ce.cost_usd if (sort == "cost" and ce.cost_usd is not None) else ce.time_s

            # The best this setup can do is at its largest micro-batch with no offload cost: skip the setup,
            # without estimating its memory, when even that cannot beat the best found so far.
            if best is not None and timed and "batch_size" not in fixed:
                bound = price_it(memo.shape(cfg, b_cap, accumulation(b_cap)), None)
                if (metric(bound), rank) >= best[:2]:
                    continue
            try:
                m1 = memo.memory(memo.shape(cfg, b1, accumulation(b1)), layout)
            except ConfigError:
                continue
            if leanest is None or m1.device_total_bytes < leanest[0]:
                leanest = (m1.device_total_bytes, f"{layout.label}, checkpointing "
                           f"{'on' if cfg.gradient_checkpointing else 'off'}, {cfg.optim}, micro-batch {b1}")
            if m1.device_total_bytes > gpu.memory_bytes:
                continue
            if cpu_limit is not None and m1.cpu_bytes_per_gpu > cpu_limit:
                host_short = (m1.cpu_bytes_per_gpu, layout.label)
                continue
            if "batch_size" in fixed:
                b = b1
                acc = accumulation(b)
            else:
                b = memo.max_batch(cfg, layout, gpu.memory_bytes, choices, accumulation)
                if not b:
                    continue
                acc = accumulation(b)
            c = memo.shape(cfg, b, acc)
            mem = memo.memory(c, layout)
            if not timed:
                if best is None:
                    best = (0.0, rank, PlanRow(gpu, n, method, True, "no TFLOP/s or bandwidth for this GPU: time "
                                               "and cost unknown", c, layout, mem, None))
                continue
            ce = price_it(c, mem)
            cand = (metric(ce), rank, PlanRow(gpu, n, method, True, "", c, layout, mem, ce))
            if best is None or cand[:2] < best[:2]:
                best = cand
    if best is not None:
        return best[2]
    if leanest is None:
        return PlanRow(gpu, n, method, False, "no valid setup for the given options")
    if host_short is not None:
        return PlanRow(gpu, n, method, False,
                       f"fits the GPU only with CPU offload ({host_short[1]}), which needs "
                       f"{format_gib(host_short[0])} of host RAM per GPU, more than the "
                       f"{format_gib(cpu_limit)} allowed (--cpu-memory-per-gpu)")
    return PlanRow(gpu, n, method, False,
                   f"does not fit: the leanest setup ({leanest[1]}) needs {format_gib(leanest[0])} per GPU, "
                   f"the GPU has {format_gib(gpu.memory_bytes)}")


def resolve_gpus(names) -> list[GPUSpec]:
    """GPU specs from a comma-separated string or a list of names (catalog names, aliases or sizes)."""
    if names is None:
        return list_gpus()
    if isinstance(names, str):
        names = [p for p in names.split(",") if p.strip()]
    out = []
    for name in names:
        g = get_gpu(name.strip())
        if g not in out:
            out.append(g)
    if not out:
        raise ConfigError("--gpus is empty")
    return out


def gpu_counts(max_gpus: int, all_counts: bool = False) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``max_gpus`` (powers of two), or every count 1..max_gpus."""
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or max_gpus < 1:
        raise ConfigError(f"--max-gpus must be a positive integer, got {max_gpus!r}")
    if all_counts:
        return tuple(range(1, max_gpus + 1))
    out = []
    n = 1
    while n <= max_gpus:
        out.append(n)
        n *= 2
    return tuple(out)


# ------------------------------------------------------------------------------------------------------------
# Method comparison: what makes LoRA/QLoRA cheaper than full fine-tuning (or not)
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodComparison:
    """The cheapest plan row of each method on the same data, and the factors of the cost ratio.

    ``factors[m]`` explains ``cost(full) / cost(m)`` as a product: ``flops`` (executed FLOPs per token, full over
    m), ``mfu`` (m's MFU over full's), ``gpu_price`` (full's GPU $ per peak TFLOP-hour over m's) and ``overheads``
    (the rest: multi-GPU scaling, QLoRA dequantisation, offload transfers).
    """

    plan: Plan
    best: dict
    factors: dict

    def as_dict(self) -> dict:
        return {"model": self.plan.model.name, "tokens": self.plan.tokens, "epochs": self.plan.epochs,
                "best": {m: r.as_dict() for m, r in self.best.items()},
                "factors": self.factors, "assumptions": list(self.plan.assumptions)}


def compare_methods(spec: ModelSpec, tokens, **kwargs) -> MethodComparison:
    """Plan all three methods on the same data and explain the cost ratios (see ``MethodComparison``)."""
    kwargs.pop("methods", None)
    p = plan(spec, tokens, methods=METHODS, **kwargs)
    best = {}
    for m in METHODS:
        try:
            best[m] = p.best(m)
        except InfeasibleError:
            continue
    factors = {}
    if "full" in best:
        f = best["full"].cost
        for m, row in best.items():
            c = row.cost
            if c.cost_usd is None or f.cost_usd is None:
                continue
            ratio = f.cost_usd / c.cost_usd
            flops = f.flops.executed_per_token / c.flops.executed_per_token
            mfu_f = c.mfu / f.mfu
            gpu_f = (f.price_usd_per_hour / f.peak_tflops) / (c.price_usd_per_hour / c.peak_tflops)
            factors[m] = {"cost_ratio": ratio, "flops": flops, "mfu": mfu_f, "gpu_price": gpu_f,
                          "overheads": ratio / (flops * mfu_f * gpu_f),
                          "executed_flops_per_token": c.flops.executed_per_token,
                          "model_flops_per_token": c.flops.model_per_token}
    return MethodComparison(plan=p, best=best, factors=factors)


__all__ = ["Plan", "PlanRow", "plan", "layouts", "resolve_gpus", "gpu_counts", "compare_methods",
           "MethodComparison", "DEFAULT_GLOBAL_BATCH"]
