"""Time and dollars: token counts, the time formula against hand arithmetic, and how MFU, price, GPU count and
QLoRA dequantisation move the answer."""

from __future__ import annotations

import math

import pytest

from lora_budget.compute import step_flops
from lora_budget.cost import (BANDWIDTH_UTILISATION, DEFAULT_MFU, format_duration, parse_tokens, run_cost,
                              scaling_factor)
from lora_budget.errors import ConfigError
from lora_budget.finetune import make_config
from lora_budget.gpus import get_gpu
from lora_budget.models import get_model

#: Relative tolerance of float arithmetic done in another order (no modelling slack).
FLOAT_REL = 1e-9


@pytest.mark.parametrize("text,expected", [
    ("100M", 100_000_000), ("1.5B", 1_500_000_000), ("20000", 20_000), ("2k", 2_000), ("2K", 2_000),
    ("1e9", 1_000_000_000), (" 3 T ", 3 * 10**12), ("0.5G", 500_000_000), (12345, 12345), ("1.0000001M", 1_000_000),
])
def test_parse_tokens(text, expected):
    assert parse_tokens(text) == expected


@pytest.mark.parametrize("text", ["abc", "-5", "0", "1.5X", "", "100 MB", "1,000", "0.0001"])
def test_parse_tokens_refuses(text):
    with pytest.raises(ConfigError, match="token"):
        parse_tokens(text)


def test_time_is_flops_over_peak_times_mfu():
    spec, gpu = get_model("llama-2-7b"), get_gpu("a100-80gb")
    cfg = make_config("lora", batch_size=4, seq_len=1024, gradient_accumulation_steps=4)
    tokens = 50_000_000
    ce = run_cost(spec, cfg, gpu, tokens)
    fl = step_flops(spec, cfg)
    expected = tokens / cfg.tokens * fl.executed / (312e12 * DEFAULT_MFU["lora"])
    assert ce.time_s == pytest.approx(expected, rel=FLOAT_REL)
    assert ce.cost_usd == pytest.approx(expected / 3600 * 1.79, rel=FLOAT_REL)
    assert ce.global_batch == 16 and ce.optimizer_steps == math.ceil(tokens / (16 * 1024))
    assert ce.achieved_mfu == pytest.approx(DEFAULT_MFU["lora"], rel=FLOAT_REL)  # no recompute, no dequant


def test_mfu_price_epochs_and_gpus_move_the_answer():
    spec, gpu = get_model("llama-3.2-1b"), get_gpu("h100")
    cfg = make_config("full")
    base = run_cost(spec, cfg, gpu, 10_000_000)
    assert run_cost(spec, cfg, gpu, 10_000_000, mfu=base.mfu / 2).time_s == pytest.approx(2 * base.time_s)
    assert run_cost(spec, cfg, gpu, 10_000_000, price_usd_per_hour=10.0).cost_usd == \
        pytest.approx(base.gpu_hours * 10.0)
    assert run_cost(spec, cfg, gpu, 10_000_000, epochs=3).time_s == pytest.approx(3 * base.time_s)
    ideal = run_cost(spec, cfg, gpu, 10_000_000, n_gpus=4, scaling_efficiency=1.0)
    assert ideal.time_s == pytest.approx(base.time_s / 4) and ideal.cost_usd == pytest.approx(base.cost_usd)
    real = run_cost(spec, cfg, gpu, 10_000_000, n_gpus=4, scaling_efficiency=0.9)
    assert real.time_s == pytest.approx(ideal.time_s / 0.81)  # two doublings
    assert scaling_factor(1, 0.5) == 1.0 and scaling_factor(8, 0.9) == pytest.approx(0.729)


def test_qlora_adds_dequantisation_at_memory_bandwidth():
    spec, gpu = get_model("llama-2-7b"), get_gpu("a100-80gb")
    cfg = make_config("qlora", batch_size=2)
    ce = run_cost(spec, cfg, gpu, 1_000_000)
    fl = step_flops(spec, cfg)
    assert ce.dequant_s_per_microbatch == pytest.approx(fl.dequant_bytes / (2039e9 * BANDWIDTH_UTILISATION))
    micro_batches = 1_000_000 / cfg.tokens
    assert ce.time_s == pytest.approx(micro_batches * (ce.compute_s_per_microbatch + ce.dequant_s_per_microbatch))
    # dequantisation is per call, not per token: a larger micro-batch amortises it
    big = run_cost(spec, cfg.with_(batch_size=8), gpu, 1_000_000)
    assert big.time_s < ce.time_s
    assert big.dequant_s_per_microbatch == pytest.approx(ce.dequant_s_per_microbatch)


def test_no_price_gives_no_dollars_and_bare_capacity_needs_tflops():
    spec, cfg = get_model("llama-3.2-1b"), make_config("lora")
    bare = get_gpu("48GB")
    with pytest.raises(ConfigError, match="--tflops"):
        run_cost(spec, cfg, bare, 1000)
    ce = run_cost(spec, cfg, bare, 1000, tflops=100.0)
    assert ce.cost_usd is None and ce.time_s > 0
    assert run_cost(spec, cfg, bare, 1000, tflops=100.0, price_usd_per_hour=1.0).cost_usd > 0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mfu=0.0), "--mfu"), (dict(mfu=1.5), "--mfu"), (dict(epochs=0), "--epochs"),
    (dict(price_usd_per_hour=-1.0), "--price"), (dict(n_gpus=2, scaling_efficiency=0.0), "--scaling-efficiency"),
])
def test_bad_inputs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        run_cost(get_model("llama-3.2-1b"), make_config("lora"), get_gpu("a100"), 1000, **kwargs)


def test_format_duration():
    assert format_duration(42) == "42 s"
    assert format_duration(600) == "10.0 min"
    assert format_duration(7200) == "2.0 h"
    assert format_duration(5 * 86400) == "5.0 days"
