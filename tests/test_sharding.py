"""Multi-GPU memory: sharded states add back up to the unsharded state, each strategy shards what it should,
offload empties the GPU of what it moves, and invalid layouts are refused."""

from __future__ import annotations

import pytest

from lora_budget.errors import ConfigError
from lora_budget.estimate import estimate
from lora_budget.finetune import make_config
from lora_budget.memory import RESERVE_FRACTION
from lora_budget.models import get_model
from lora_budget.sharding import NCCL_BUFFERS, STRATEGIES, Sharding, offload_traffic, shard

PARAMS = ("weights", "quantized_weights", "lora_adapters")
GRADS = ("gradients",)
OPTIM = ("optimizer_state", "optimizer_step_temporaries", "fp32_master_weights", "fp32_gradients")
#: What each strategy divides over its shard group.
SHARDED = {
    "single": (), "ddp": (),
    "zero1": OPTIM, "zero2": GRADS + OPTIM, "zero3": PARAMS + GRADS + OPTIM,
    "fsdp_full_shard": PARAMS + GRADS + OPTIM, "fsdp_hybrid_shard": PARAMS + GRADS + OPTIM,
    "fsdp_shard_grad_op": GRADS + OPTIM,
}


@pytest.fixture(scope="module")
def full_7b():
    return estimate(get_model("llama-2-7b"), make_config("full", gradient_checkpointing=True))


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "single"])
@pytest.mark.parametrize("n", [2, 3, 8, 16])
def test_shards_add_back_to_the_unsharded_state(full_7b, strategy, n):
    sh = shard(full_7b, Sharding(strategy, n))
    N = sh.sharding.shard_size
    assert N == (min(n, 8) if strategy == "fsdp_hybrid_shard" else 1 if strategy == "ddp" else n)
    for key, total in sh.state.items():
        per_gpu = sh.per_gpu_state[key]
        if key in SHARDED[strategy]:
            # ceil division: N shards hold the whole state, padded by less than one byte per shard
            assert 0 <= per_gpu * N - total < N, key
        else:
            assert per_gpu == total, key
    assert sh.state["weights"] == full_7b.memory.components["weights"]
    assert sh.state["gradients"] == full_7b.memory.components["gradients"]


def test_one_gpu_single_is_the_estimate(full_7b):
    sh = shard(full_7b, Sharding())
    assert [p.components for p in sh.phases] == [p.components for p in full_7b.memory.phases]
    assert sh.device_total_bytes == full_7b.device_total_bytes


def test_ddp_adds_a_gradient_bucket_copy_and_nccl(full_7b):
    sh = shard(full_7b, Sharding("ddp", 4))
    grads = full_7b.memory.components["gradients"]
    assert sh.buffers["ddp_gradient_buckets"] == grads
    for mine, base in zip(sh.phases, full_7b.memory.phases):  # allocated at wrap time, live in every phase
        assert mine.total == base.total + grads
    assert sh.context == full_7b.memory.context + NCCL_BUFFERS
    assert sh.reserve == int(sh.peak_allocated_bytes * RESERVE_FRACTION)


def test_deepspeed_keeps_fp32_master_and_states(full_7b):
    P = full_7b.trainable_params
    sh = shard(full_7b, Sharding("zero2", 8))
    assert sh.state["fp32_master_weights"] == 4 * P
    assert sh.state["fp32_gradients"] == 4 * P
    # torch AdamW states in bf16 on one GPU (2 x 2 B) become fp32 on DeepSpeed's master copy (2 x 4 B)
    assert sh.state["optimizer_state"] == 2 * full_7b.memory.components["optimizer_state"]
    fsdp = shard(full_7b, Sharding("fsdp_full_shard", 8))
    assert fsdp.state["fp32_master_weights"] == 0
    # LoRA adapters are fp32 already: no master copy
    lora = estimate(get_model("llama-2-7b"), make_config("lora"))
    assert shard(lora, Sharding("zero3", 2)).state["fp32_master_weights"] == 0


def test_more_gpus_less_memory_per_gpu(full_7b):
    for strategy in ("zero3", "fsdp_full_shard"):
        totals = [shard(full_7b, Sharding(strategy, n)).device_total_bytes for n in (2, 4, 8)]
        assert totals[0] > totals[1] > totals[2]
    # ZeRO-1 < DDP, ZeRO-2 < ZeRO-1, ZeRO-3 < ZeRO-2 on the same 8 GPUs (full fine-tuning of a 7B)
    z = {s: shard(full_7b, Sharding(s, 8)).device_total_bytes for s in ("ddp", "zero1", "zero2", "zero3")}
    assert z["ddp"] > z["zero1"] > z["zero2"] > z["zero3"]


def test_activations_are_per_gpu(full_7b):
    sh = shard(full_7b, Sharding("fsdp_full_shard", 8))
    for mine, base in zip(sh.phases, full_7b.memory.phases):
        for key in ("activations", "logits_loss", "recompute", "cuda_workspace"):
            assert mine.components.get(key, 0) == base.components.get(key, 0)


@pytest.mark.parametrize("strategy,offload,moved", [
    ("zero1", "optimizer", OPTIM),
    ("zero2", "optimizer", GRADS + OPTIM),
    ("zero3", "optimizer", GRADS + OPTIM),
    ("zero3", "params", PARAMS + GRADS + OPTIM),
    ("fsdp_full_shard", "params", PARAMS + GRADS + OPTIM),
])
def test_offload_moves_states_to_the_cpu(full_7b, strategy, offload, moved):
    sh = shard(full_7b, Sharding(strategy, 4, offload))
    for key in moved:
        assert sh.per_gpu_state[key] == 0
    on_gpu = shard(full_7b, Sharding(strategy, 4))
    assert sh.cpu_bytes_per_gpu == sum(on_gpu.per_gpu_state[k] for k in moved)
    assert sh.cpu_bytes_per_node == 4 * sh.cpu_bytes_per_gpu
    assert sh.device_total_bytes < on_gpu.device_total_bytes
    traffic = offload_traffic(sh)
    assert traffic.per_step_bytes + traffic.per_microbatch_bytes > 0 and traffic.host_step_params > 0
    assert offload_traffic(on_gpu).per_step_bytes == 0


@pytest.mark.parametrize("kwargs,needle", [
    (dict(strategy="ddp", n_gpus=2, offload="optimizer"), "not available"),
    (dict(strategy="fsdp_full_shard", n_gpus=2, offload="optimizer"), "--offload params"),
    (dict(strategy="zero2", n_gpus=2, offload="params"), "needs zero3"),
    (dict(strategy="single", n_gpus=2), "one GPU"),
    (dict(strategy="zero4", n_gpus=2), "unknown sharding strategy"),
    (dict(strategy="ddp", n_gpus=0), "positive integer"),
    (dict(strategy="ddp", n_gpus=2, offload="disk"), "unknown offload"),
])
def test_invalid_layouts(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        Sharding(**kwargs)


def test_deepspeed_refuses_paged_optimizers():
    est = estimate(get_model("llama-3.2-1b"), make_config("qlora"))
    with pytest.raises(ConfigError, match="page"):
        shard(est, Sharding("zero3", 2))
    assert shard(est, Sharding("fsdp_full_shard", 2)).paged == -(-est.memory.offloaded // 2)


def test_qlora_fsdp_shards_the_4bit_weights():
    est = estimate(get_model("llama-3.1-70b"), make_config("qlora"))
    q = est.memory.components["quantized_weights"]
    sh = shard(est, Sharding("fsdp_full_shard", 4))
    assert sh.per_gpu_state["quantized_weights"] == -(-q // 4)
    assert sh.device_total_bytes < est.device_total_bytes
