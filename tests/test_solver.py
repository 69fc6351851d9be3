"""The fit solver: every answer is the largest that fits, and one more does not (checked through estimate)."""

from __future__ import annotations

import random

import pytest

from lora_budget.errors import ConfigError, InfeasibleError
from lora_budget.estimate import estimate
from lora_budget.finetune import make_config
from lora_budget.gpus import get_gpu
from lora_budget.models import get_model
from lora_budget.sharding import Sharding, shard
from lora_budget.solver import accumulation_steps, largest_fitting, max_batch_size, max_seq_len, micro_batch_for


def test_largest_fitting_on_thresholds():
    rng = random.Random(6)
    for _ in range(300):
        threshold = rng.randint(0, 5000)
        hi = rng.choice([None, rng.randint(1, 6000)])
        calls = []

        def fits(n):
            calls.append(n)
            return n <= threshold

        got = largest_fitting(fits, 1, hi)
        assert got == (min(threshold, hi) if hi is not None else threshold)
        assert len(calls) <= 2 * 13 + 2  # logarithmic


def _fits(spec, cfg, gpu):
    return estimate(spec, cfg, gpu).device_total_bytes <= gpu.memory_bytes


@pytest.mark.parametrize("model,method,gpu,seq", [
    ("llama-2-7b", "lora", "a100-80gb", 512),
    ("llama-2-7b", "qlora", "rtx-4090", 2048),
    ("llama-3.1-8b", "full", "h200", 1024),
    ("qwen2.5-0.5b", "lora", "t4", 4096),
])
def test_max_batch_is_the_largest_that_fits(model, method, gpu, seq):
    spec, g = get_model(model), get_gpu(gpu)
    cfg = make_config(method, seq_len=seq)
    sol = max_batch_size(spec, cfg, g)
    assert not sol.capped
    assert _fits(spec, cfg.with_(batch_size=sol.value), g)
    assert not _fits(spec, cfg.with_(batch_size=sol.value + 1), g)
    assert sol.estimate.device_total_bytes <= g.memory_bytes < sol.next_estimate.device_total_bytes


@pytest.mark.parametrize("model,method,gpu,multiple", [
    ("llama-3.1-8b", "qlora", "rtx-4090", 1),
    ("llama-3.1-8b", "qlora", "a100-80gb", 64),
    ("mistral-7b", "lora", "a100-80gb", 128),
])
def test_max_seq_is_the_longest_that_fits(model, method, gpu, multiple):
    spec, g = get_model(model), get_gpu(gpu)
    cfg = make_config(method)
    sol = max_seq_len(spec, cfg, g, multiple_of=multiple)
    assert sol.value % multiple == 0 and not sol.capped
    assert _fits(spec, cfg.with_(seq_len=sol.value), g)
    assert not _fits(spec, cfg.with_(seq_len=sol.value + multiple), g)


def test_capped_at_the_limit():
    spec, g = get_model("qwen2.5-0.5b"), get_gpu("h200")
    sol = max_batch_size(spec, make_config("lora", seq_len=128), g, limit=8)
    assert sol.capped and sol.value == 8 and sol.next_estimate is None
    seq = max_seq_len(spec, make_config("qlora"), g, limit=1000)
    assert seq.capped and seq.value == 1000


def test_infeasible_says_how_much():
    with pytest.raises(InfeasibleError, match="does not fit RTX-4090 even at batch-size 1: needs"):
        max_batch_size(get_model("llama-3.1-70b"), make_config("full"), get_gpu("rtx-4090"))


def test_solver_on_a_sharded_rank():
    spec, g = get_model("llama-3.1-70b"), get_gpu("a100-80gb")
    layout = Sharding("fsdp_full_shard", 8)
    cfg = make_config("full", gradient_checkpointing=True, optim="adamw_8bit")

    def memory(c):
        return shard(estimate(spec, c, g), layout)

    sol = max_batch_size(spec, cfg, g, memory=memory)
    assert memory(cfg.with_(batch_size=sol.value)).device_total_bytes <= g.memory_bytes
    assert memory(cfg.with_(batch_size=sol.value + 1)).device_total_bytes > g.memory_bytes
    with pytest.raises(InfeasibleError):  # one GPU cannot hold it
        max_batch_size(spec, cfg, g)


@pytest.mark.parametrize("global_batch,max_fit,n,expected", [
    (16, 5, 1, (4, 4)),     # 4 x 4 = 16, not 5 x 4 = 20
    (16, 16, 1, (16, 1)),
    (16, 100, 1, (16, 1)),  # never more than the global batch
    (16, 3, 2, (2, 4)),     # 8 per GPU: 2 x 4 (3 x 3 would make 9)
    (16, 1, 8, (1, 2)),
    (10, 4, 4, (3, 1)),     # 3 per GPU (ceil 10/4): the one case that overshoots
    (32, 3, 1, (2, 16)),
])
def test_micro_batch_for(global_batch, max_fit, n, expected):
    assert micro_batch_for(global_batch, max_fit, n) == expected
    micro, acc = expected
    assert micro * acc == -(-global_batch // n) and micro <= max_fit


def test_accumulation_steps():
    assert accumulation_steps(64, 4, 2) == 8
    assert accumulation_steps(65, 4, 2) == 9
    assert accumulation_steps(1, 4) == 1
    with pytest.raises(ConfigError):
        accumulation_steps(0, 4)
