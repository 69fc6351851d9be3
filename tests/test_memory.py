"""Structural properties of the memory model: totals are sums of parts, memory grows with the workload."""

from __future__ import annotations

import pytest

from lora_budget.estimate import estimate, suggestions
from lora_budget.finetune import make_config
from lora_budget.gpus import get_gpu
from lora_budget.models import get_model

CASES = [
    ("llama-2-7b", "full", {}),
    ("llama-2-7b", "lora", {}),
    ("llama-2-7b", "qlora", {}),
    ("llama-3.1-8b", "lora", dict(target_modules="all-linear", lora_dropout=0.05, mixed_precision="bf16")),
    ("mixtral-8x7b", "qlora", {}),
    ("gemma-2-2b", "lora", dict(gradient_checkpointing=True)),
    ("phi-3-mini", "lora", dict(target_modules="all-linear", attn_implementation="eager")),
    ("qwen2.5-7b", "full", dict(optim="adamw_torch", gradient_accumulation_steps=4)),
]


@pytest.mark.parametrize("name,method,opts", CASES)
def test_totals_are_sums_of_parts(name, method, opts):
    est = estimate(get_model(name), make_config(method, **opts))
    m = est.memory
    for ph in m.phases:
        assert ph.total == sum(ph.components.values())
        assert all(isinstance(v, int) and v >= 0 for v in ph.components.values())
    assert m.peak_allocated == max(ph.total for ph in m.phases)
    assert m.peak_reserved == m.peak_allocated + m.reserve
    assert m.device_total == m.peak_reserved + m.context
    d = est.as_dict()
    for key in ("total_params", "trainable_params", "peak_allocated_bytes", "peak_reserved_bytes",
                "device_total_bytes", "offloaded_bytes", "components", "phases", "assumptions"):
        assert key in d


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("field,small,big", [("batch_size", 1, 4), ("seq_len", 512, 4096)])
def test_grows_with_batch_and_sequence(method, field, small, big):
    """The forward/backward peak grows strictly; the overall peak never shrinks (for full fine-tuning of a 7B
    model at batch 1 the optimizer step, which does not depend on the batch, can stay the peak)."""
    spec = get_model("llama-2-7b")
    a = estimate(spec, make_config(method, **{field: small})).memory
    b = estimate(spec, make_config(method, **{field: big})).memory
    for step in ("first_step", "steady_state"):
        phase = {ph.name: ph.total for ph in a.phases}, {ph.name: ph.total for ph in b.phases}
        assert phase[1][f"{step}.backward"] > phase[0][f"{step}.backward"]
        assert phase[1][f"{step}.forward"] > phase[0][f"{step}.forward"]
    assert b.peak_allocated >= a.peak_allocated


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_grows_with_rank(method):
    spec = get_model("llama-2-7b")
    a = estimate(spec, make_config(method, lora_rank=8)).peak_allocated_bytes
    b = estimate(spec, make_config(method, lora_rank=128)).peak_allocated_bytes
    assert b > a


def test_methods_order_for_7b():
    spec = get_model("llama-2-7b")
    full = estimate(spec, make_config("full")).peak_allocated_bytes
    lora = estimate(spec, make_config("lora")).peak_allocated_bytes
    qlora = estimate(spec, make_config("qlora", lora_rank=8, target_modules="q_proj,v_proj")).peak_allocated_bytes
    assert full > lora > qlora


def test_paged_state_is_offloaded_not_counted():
    spec = get_model("llama-2-7b")
    paged = estimate(spec, make_config("full", optim="paged_adamw_32bit"))
    plain = estimate(spec, make_config("full", optim="adamw_torch_fused"))
    assert paged.memory.offloaded > 0
    assert plain.memory.offloaded == 0
    assert paged.memory.components["optimizer_state"] < plain.memory.components["optimizer_state"]


def test_headline_question_uses_qlora_paper_setup():
    est = estimate(get_model("llama-65b"), make_config("qlora"), get_gpu("48GB"))
    cfg = est.config
    assert (cfg.lora_rank, cfg.target_modules, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_use_double_quant,
            cfg.optim, cfg.gradient_checkpointing, cfg.batch_size, cfg.seq_len) == (
        64, "all-linear", "nf4", True, "paged_adamw_32bit", True, 1, 512)
    assert est.fits is not None
    assert est.headroom_bytes == 48 * 10**9 - est.device_total_bytes


def test_suggestions_lower_the_peak():
    est = estimate(get_model("llama-2-7b"), make_config("full"), get_gpu("24GiB"))
    assert not est.fits
    sugg = suggestions(est)
    assert sugg
    assert all(s.estimate.device_total_bytes < est.device_total_bytes for s in sugg)
    assert any(s.fits for s in sugg)


@pytest.mark.parametrize("targets,modules", [("q_proj", ["q_proj"]), ("q_proj,v_proj", ["q_proj", "v_proj"]),
                                             ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])])
def test_adapter_activations_follow_the_targets(targets, modules):
    """bf16 base, fp32 adapters, no dropout, no autocast: each adapted module saves its own fp32 input cast
    (4 bytes x in_features) and lora_A's output (4 bytes x r) - memory-accounting.md 6.5."""
    from lora_budget.activations import layer_activations
    from lora_budget.params import layer_linears

    spec = get_model("llama-3-8b")
    cfg = make_config("lora", target_modules=targets, lora_rank=16)
    ins = {m.name: m.in_features for m in layer_linears(spec)}
    assert layer_activations(spec, cfg).adapters == sum(4 * ins[n] + 4 * 16 for n in modules)
