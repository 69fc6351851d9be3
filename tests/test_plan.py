"""The planner and the plan/cost/solve commands: feasible rows fit and use the largest micro-batch that fits,
rows are ranked, output is stable, fixed options stay fixed, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli
from lora_budget.errors import ConfigError, InfeasibleError, UnknownGPUError
from lora_budget.estimate import estimate
from lora_budget.gpus import get_gpu
from lora_budget.models import get_model
from lora_budget.plan import batch_choices, compare_methods, gpu_counts, layouts, plan, resolve_gpus
from lora_budget.sharding import shard

GPUS = "rtx-4090,a100-80gb,h100,l40s,a6000"
#: Relative tolerance of a product of factors recomputed in another order.
FLOAT_REL = 1e-9


@pytest.fixture(scope="module")
def plan_8b():
    return plan(get_model("llama-3.1-8b"), "20M", gpus=resolve_gpus(GPUS), counts=(1, 2, 4))


def test_feasible_rows_fit_and_are_ranked_by_cost(plan_8b):
    feasible = [r for r in plan_8b.rows if r.feasible]
    assert feasible and {r.method for r in feasible} == {"full", "lora", "qlora"}
    costs = [r.cost_usd for r in feasible]
    assert costs == sorted(costs)
    for r in feasible:
        # recomputed from scratch through the public API
        mem = shard(estimate(plan_8b.model, r.config), r.sharding)
        assert mem.device_total_bytes == r.memory.device_total_bytes <= r.gpu.memory_bytes
        assert r.config.batch_size * r.config.gradient_accumulation_steps * r.n_gpus == plan_8b.global_batch


def test_micro_batch_is_the_largest_choice_that_fits(plan_8b):
    for r in plan_8b.rows:
        if not r.feasible:
            continue
        choices = batch_choices(-(-plan_8b.global_batch // r.n_gpus))
        bigger = [b for b in choices if b > r.config.batch_size]
        if bigger:
            b = bigger[0]
            acc = -(-plan_8b.global_batch // (b * r.n_gpus))
            c = r.config.with_(batch_size=b, gradient_accumulation_steps=acc)
            assert shard(estimate(plan_8b.model, c), r.sharding).device_total_bytes > r.gpu.memory_bytes


def test_planner_finds_the_brute_force_optimum():
    """The pruning (time bounds, memo, bisection) never loses the cheapest setup: compare with trying every
    layout, optimizer, checkpointing and micro-batch choice."""
    from lora_budget.cost import run_cost
    from lora_budget.finetune import make_config
    from lora_budget.plan import _candidates
    from lora_budget.sharding import offload_traffic

    spec = get_model("llama-3.1-8b")
    gpus = resolve_gpus("rtx-4090,a100-40gb")
    p = plan(spec, "5M", gpus=gpus, counts=(1, 2))
    estimates: dict = {}
    for row in p.rows:
        best = None
        base = make_config(row.method)
        for layout in layouts(row.n_gpus, method=row.method):
            for cfg in _candidates(row.method, base, set(), layout):
                for b in batch_choices(-(-p.global_batch // row.n_gpus)):
                    c = cfg.with_(batch_size=b, gradient_accumulation_steps=p.global_batch // (b * row.n_gpus))
                    if c not in estimates:
                        estimates[c] = estimate(spec, c)
                    mem = shard(estimates[c], layout)
                    if mem.device_total_bytes > row.gpu.memory_bytes or mem.cpu_bytes_per_gpu > 128 * 2**30:
                        continue
                    ce = run_cost(spec, c, row.gpu, p.tokens, n_gpus=row.n_gpus, offload=offload_traffic(mem))
                    if best is None or ce.cost_usd < best:
                        best = ce.cost_usd
        if best is None:
            assert not row.feasible
        else:
            assert row.feasible and row.cost_usd == pytest.approx(best, rel=FLOAT_REL)


def test_infeasible_rows_say_why():
    p = plan(get_model("llama-3.1-8b"), "20M", gpus=resolve_gpus(GPUS), counts=(1, 2), offload=False)
    bad = [r for r in p.rows if not r.feasible]
    assert bad  # without CPU offload, full fine-tuning of an 8B does not fit one 24 GB card
    for r in bad:
        assert r.reason.startswith("does not fit: the leanest setup (") and "GiB per GPU" in r.reason
    rtx_full = next(r for r in bad if r.gpu.name == "RTX-4090" and r.n_gpus == 1 and r.method == "full")
    assert rtx_full.cost is None


def test_plan_is_stable():
    args = dict(gpus=resolve_gpus("a100-80gb,rtx-4090"), counts=(1, 2), methods=("lora", "qlora"))
    a = json.dumps(plan(get_model("llama-2-7b"), "100M", **args).as_dict(), sort_keys=True)
    b = json.dumps(plan(get_model("llama-2-7b"), 100_000_000, **args).as_dict(), sort_keys=True)
    assert a == b


def test_fixed_options_stay_fixed():
    p = plan(get_model("llama-2-7b"), "10M", methods=("lora",), gpus=resolve_gpus("a100-80gb,rtx-4090"),
             counts=(1,), options={"gradient_checkpointing": True, "seq_len": 1024, "lora_rank": 16})
    for r in p.feasible:
        assert r.config.gradient_checkpointing and r.config.seq_len == 1024 and r.config.lora_rank == 16
    q = plan(get_model("llama-2-7b"), "10M", methods=("lora",), gpus=resolve_gpus("a100-80gb"), counts=(1, 2),
             options={"batch_size": 2, "gradient_accumulation_steps": 3})
    assert q.global_batch == 6
    for r in q.feasible:
        assert (r.config.batch_size, r.config.gradient_accumulation_steps) == (2, 3)


def test_sort_by_time():
    p = plan(get_model("llama-3.2-1b"), "10M", methods=("lora",), gpus=resolve_gpus("a100-80gb,h100"),
             counts=(1, 2, 4), sort="time")
    times = [r.time_s for r in p.feasible]
    assert times == sorted(times)


def test_no_bf16_gpus_are_refused_with_a_reason():
    p = plan(get_model("llama-3.2-1b"), "1M", methods=("lora",), gpus=resolve_gpus("t4"), counts=(1,))
    assert not p.rows[0].feasible and "no bf16" in p.rows[0].reason


def test_compare_methods_factors_multiply_to_the_ratio():
    cmp = compare_methods(get_model("llama-2-7b"), "100M", gpus=resolve_gpus("a100-80gb,rtx-4090"), counts=(1, 8))
    assert set(cmp.best) == {"full", "lora", "qlora"}
    for m, f in cmp.factors.items():
        product = f["flops"] * f["mfu"] * f["gpu_price"] * f["overheads"]
        assert product == pytest.approx(f["cost_ratio"], rel=FLOAT_REL)
        assert f["cost_ratio"] == pytest.approx(cmp.best["full"].cost_usd / cmp.best[m].cost_usd)
    assert cmp.factors["lora"]["flops"] > 1.3  # frozen base weights skip their weight gradients


def test_layouts_and_counts():
    assert [s.strategy for s in layouts(1)] == ["single", "zero2", "zero3"]
    assert all(not s.deepspeed for s in layouts(4, method="qlora"))
    assert "fsdp_hybrid_shard" in [s.strategy for s in layouts(16)]
    assert [s.strategy for s in layouts(2, offload=False, strategies=("zero3",))] == ["zero3"]
    assert gpu_counts(8) == (1, 2, 4, 8) and gpu_counts(6) == (1, 2, 4) and gpu_counts(3, True) == (1, 2, 3)
    assert batch_choices(16) == (1, 2, 4, 8, 16) and batch_choices(12) == (1, 2, 3, 4, 6, 12)
    assert batch_choices(1) == (1,)


@pytest.mark.parametrize("call,exc,needle", [
    (lambda: plan(get_model("llama-2-7b"), "12Q"), ConfigError, "token count"),
    (lambda: plan(get_model("llama-2-7b"), "1M", sort="speed"), ConfigError, "--sort"),
    (lambda: plan(get_model("llama-2-7b"), "1M", price_usd_per_hour=1.0), ConfigError, "one GPU type"),
    (lambda: plan(get_model("llama-2-7b"), "1M", counts=(0,)), ConfigError, "GPU counts"),
    (lambda: plan(get_model("llama-2-7b"), "1M", methods=("ia3",)), ConfigError, "unknown method"),
    (lambda: resolve_gpus("a100,h1000"), UnknownGPUError, "unknown GPU"),
    (lambda: gpu_counts(0), ConfigError, "--max-gpus"),
])
def test_errors(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()


def test_offload_needs_host_ram():
    args = dict(methods=("full",), gpus=resolve_gpus("a100-80gb"), counts=(1,))
    p = plan(get_model("llama-65b"), "1M", **args)
    assert not p.rows[0].feasible and "host RAM" in p.rows[0].reason
    q = plan(get_model("llama-65b"), "1M", cpu_memory_per_gpu=None, **args)
    row = q.rows[0]
    assert row.feasible and row.sharding.offload != "none"
    assert row.memory.cpu_bytes_per_gpu > 128 * 2**30 and row.cost.offload_s_per_step > 0


def test_best_raises_when_nothing_fits():
    p = plan(get_model("llama-3.1-70b"), "1M", methods=("full",), gpus=resolve_gpus("rtx-3060-12gb"), counts=(1,),
             offload=False)
    with pytest.raises(InfeasibleError):
        p.best()


# ---- commands --------------------------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_plan_command_json_and_table():
    r = run("plan", "llama-2-7b", "--tokens", "100M", "--method", "qlora", "--gpus", "a100-80gb,rtx-4090",
            "--max-gpus", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["methods"] == ["qlora"] and d["counts"] == [1, 2] and d["tokens"] == 100_000_000
    assert all(row["method"] == "qlora" for row in d["rows"])
    first = d["rows"][0]
    assert first["feasible"] and first["cost_usd"] > 0 and first["setup"]["micro_batch"] >= 1
    t = run("plan", "llama-2-7b", "--tokens", "100M", "--gpus", "a100-80gb,rtx-4090", "--max-gpus", "2",
            "--no-offload")
    assert t.exit_code == 0
    assert "Does not fit:" in t.output and "Assumptions:" in t.output and "GiB" in t.output
    assert {"full", "lora", "qlora"} <= set(t.output.split())  # no --method: all three planned


def test_plan_compare_command():
    r = run("plan", "llama-2-7b", "--tokens", "100M", "--gpus", "a100-80gb", "--compare-methods")
    assert r.exit_code == 0, r.output
    assert "full / lora" in r.output and "full / qlora" in r.output


def test_cost_command():
    r = run("cost", "llama-2-7b", "--gpu", "a100-80gb", "--tokens", "100M", "--method", "lora", "--batch-size", "4",
            "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["tokens_processed"] == 100_000_000 and d["micro_batch"] == 4 and d["cost_usd"] > 0
    assert d["memory"]["fits"] is True
    t = run("cost", "llama-3.1-70b", "--gpu", "h100", "--tokens", "1B", "--method", "full", "--n-gpus", "8",
            "--strategy", "zero3", "--offload", "optimizer", "--gradient-checkpointing")
    assert t.exit_code == 0, t.output
    assert "CPU memory per node" in t.output and "PCIe" in t.output


def test_solve_command():
    r = run("solve", "llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--seq-len", "2048",
            "--global-batch", "32", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    spec, g = get_model("llama-3.1-8b"), get_gpu("rtx-4090")
    b = d["batch_size"]["value"]
    assert d["batch_size"]["device_total_bytes"] <= g.memory_bytes < d["batch_size"]["next_device_total_bytes"]
    assert d["accumulation"]["micro_batch"] <= b and d["accumulation"]["effective_global_batch"] >= 32
    assert d["seq_len"]["value"] > 2048


@pytest.mark.parametrize("args,needle", [
    (["plan", "llama-2-7b", "--tokens", "lots"], "cannot read token count"),
    (["plan", "llama-2-7b", "--tokens", "1M", "--gpus", "h1000"], "unknown GPU"),
    (["plan", "llama-2-7b", "--tokens", "1M", "--price", "2"], "one GPU type"),
    (["plan", "llama-2-7b", "--tokens", "1M", "--method", "full", "--lora-rank", "8"], "LoRA/QLoRA only"),
    (["cost", "llama-2-7b", "--gpu", "h1000", "--tokens", "1M"], "unknown GPU"),
    (["cost", "llama-2-7b", "--gpu", "48GB", "--tokens", "1M"], "--tflops"),
    (["cost", "llama-2-7b", "--gpu", "a100", "--tokens", "0"], "at least 1 token"),
    (["cost", "llama-2-7b", "--gpu", "a100", "--tokens", "1M", "--n-gpus", "2", "--strategy", "ddp",
      "--offload", "optimizer"], "not available"),
    (["solve", "llama-3.1-70b", "--gpu", "rtx-4090", "--method", "full"], "does not fit"),
])
def test_command_errors_are_one_line(args, needle):
    r = run(*args)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("Error: ") and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_planner_is_light():
    code = ("import sys, lora_budget.plan as p, lora_budget.models as m; "
            "p.plan(m.get_model('llama-2-7b'), '1M', gpus=p.resolve_gpus('a100'), counts=(1,)); "
            "print(','.join(x for x in ('torch', 'transformers', 'pandas', 'matplotlib', 'numpy') "
            "if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
