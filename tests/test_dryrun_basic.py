"""lora_budget.dryrun: the torch-free surface, the missing-extra error, and the consistency of a tiny dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_budget.errors import MissingDependencyError
from lora_budget.finetune import make_config
from lora_budget.models import ModelSpec

TINY = ModelSpec(name="tiny-llama", model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


# ---- torch-free ----------------------------------------------------------------------------------------------------
def test_import_does_not_import_torch():
    code = ("import sys, lora_budget.dryrun as d; from lora_budget.dryrun.result import DryRunResult; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(d.PHASES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "first_step.forward" in out.stdout


def test_missing_dependency_message(monkeypatch):
    import lora_budget.dryrun as dryrun

    monkeypatch.setitem(sys.modules, "torch", None)      # makes `import torch` raise ImportError
    with pytest.raises(MissingDependencyError) as err:
        dryrun.dry_run(TINY, make_config("lora"))
    assert "pip install 'lora_budget[dryrun]'" in str(err.value)
    assert "torch" in str(err.value)


def test_result_as_dict_is_json():
    from lora_budget.dryrun import CATEGORIES, PHASES, DryRunResult

    phases = {p: 100 + i for i, p in enumerate(PHASES)}
    bd = {p: {c: 25 for c in CATEGORIES} for p in PHASES}
    r = DryRunResult(total_params=10, trainable_params=2, weights_bytes=512, quant_state_bytes=0, adapter_bytes=0,
                     gradients_bytes=512, optimizer_state_bytes=1024, offloaded_bytes=0, activations_bytes=2048,
                     peak_allocated_bytes=105, phases=phases, phase_breakdown=bd, emulations=("x",),
                     timings={"build": 0.1, "trace": 0.2}, versions={"torch": "2"})
    d = json.loads(json.dumps(r.as_dict()))
    assert d["source"] == "dry-run"
    for key in ("total_params", "trainable_params", "peak_allocated_bytes", "offloaded_bytes", "components", "phases",
                "phase_breakdown", "emulations", "timings", "versions"):
        assert key in d
    assert d["components"] == {"weights": 512, "gradients": 512, "optimizer_state": 1024, "activations": 2048}
    assert r.peak_phase == "steady_state.optimizer_step"
    with pytest.raises(Exception):
        r.total_params = 3          # frozen


# ---- with the extra ------------------------------------------------------------------------------------------------
def _needs_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")


def _round(n):
    return -(-n // 512) * 512


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_tiny_dry_run_is_consistent(method):
    _needs_torch()
    from lora_budget.dryrun import CATEGORIES, PHASES, dry_run

    cfg = make_config(method, batch_size=2, seq_len=64)
    r = dry_run(TINY, cfg, progress=lambda msg: None)
    assert tuple(r.phases) == PHASES
    assert r.peak_allocated_bytes == max(r.phases.values())
    for ph in PHASES:
        bd = r.phase_breakdown[ph]
        assert tuple(bd) == CATEGORIES
        assert sum(bd.values()) == r.phases[ph]
        assert bd["weights"] == r.weights_bytes               # weights never change
    # forward of the first step: no gradients, no optimizer state yet
    assert r.phase_breakdown["first_step.forward"]["gradients"] == 0
    assert r.phase_breakdown["first_step.forward"]["optimizer_state"] == 0
    assert r.phase_breakdown["steady_state.forward"]["optimizer_state"] == r.optimizer_state_bytes
    assert 0 < r.activations_bytes < r.peak_allocated_bytes
    assert r.weights_bytes + r.gradients_bytes + r.optimizer_state_bytes <= r.peak_allocated_bytes
    assert r.offloaded_bytes == (0 if method != "qlora" else r.offloaded_bytes)
    assert r.emulations and all(isinstance(x, str) for x in r.emulations)
    assert set(r.timings) >= {"build", "trace"}
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= set(r.versions)
    json.dumps(r.as_dict())
    if method != "qlora":
        # fused AdamW (the default): exp_avg + exp_avg_sq like the grads, one 512 B device 'step' per tensor
        n = sum(1 for p in _trainable(method))
        assert r.optimizer_state_bytes == 2 * r.gradients_bytes + 512 * n


def _trainable(method):
    from lora_budget.dryrun.build import build_model

    model = build_model(TINY, make_config(method), device="meta")
    return [p for p in model.parameters() if p.requires_grad]


def test_param_counts_match_hf_model():
    """total / trainable params equal sum(numel) of the HF (+ peft) model; 4-bit weights count unpacked."""
    _needs_torch()
    import torch
    from transformers import AutoModelForCausalLM

    from lora_budget.dryrun import dry_run
    from lora_budget.dryrun.build import hf_config

    cfg = make_config("lora")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config(TINY, cfg))
    n_base = sum(p.numel() for p in base.parameters())

    full = dry_run(TINY, make_config("full", seq_len=16))
    assert full.total_params == full.trainable_params == n_base

    lora = dry_run(TINY, make_config("lora", seq_len=16))
    r = 8
    h, kv = TINY.hidden_size, TINY.kv_dim
    n_lora = TINY.num_hidden_layers * r * ((h + h) + (h + kv))         # q_proj, v_proj (peft default targets)
    assert lora.trainable_params == n_lora
    assert lora.total_params == n_base + n_lora
    # fp32 adapters: q_proj A/B and v_proj A are r x h, v_proj B is kv x r
    assert lora.adapter_bytes == TINY.num_hidden_layers * (3 * _round(4 * r * h) + _round(4 * r * kv))

    qlora = dry_run(TINY, make_config("qlora", seq_len=16))
    assert qlora.total_params == n_base + qlora.trainable_params      # 4-bit weights counted unpacked
    assert qlora.quant_state_bytes > 0
    assert qlora.weights_bytes - qlora.adapter_bytes < 0.7 * (n_base * 4)   # far below fp32 (embeddings stay fp32)


def test_paged_optimizer_state_is_offloaded():
    _needs_torch()
    from lora_budget.dryrun import dry_run

    spec = TINY.with_(vocab_size=1024)            # 131,072-element embedding: >= 1e5, so bnb pages its state
    from lora_budget.dryrun.build import build_model

    cfg = make_config("full", optim="paged_adamw_32bit", seq_len=16)
    paged = dry_run(spec, cfg)
    assert paged.offloaded_bytes == 2 * 2 * 1024 * 128 * 4          # embed_tokens + lm_head, state1 + state2 fp32
    small = [p.numel() for p in build_model(spec, cfg, device="meta").parameters() if p.numel() < 1e5]
    assert paged.optimizer_state_bytes == sum(2 * _round(4 * n) for n in small)   # fp32 states on the device


def test_steps_must_cover_the_steady_state():
    _needs_torch()
    from lora_budget.dryrun import dry_run
    from lora_budget.errors import ConfigError

    with pytest.raises(ConfigError):
        dry_run(TINY, make_config("lora", seq_len=16), steps=1)


def test_fp32_experts_trace_with_the_grouped_mm_emulation():
    """QLoRA keeps Mixtral's 3-D experts unquantised and prepare_model_for_kbit_training makes them fp32; CUDA's
    grouped_mm takes fp32 (its per-group fallback), the meta kernel of fake tensors only bf16.  The dry run
    emulates CUDA and says so; the estimate warns about the fp32 experts."""
    pytest.importorskip("bitsandbytes")
    from lora_budget.dryrun import dry_run
    from lora_budget.estimate import estimate

    spec = ModelSpec(name="tiny-mixtral", model_type="mixtral", hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                     num_local_experts=4, num_experts_per_tok=2)
    cfg = make_config("qlora", lora_dropout=0.0, seq_len=32)
    r = dry_run(spec, cfg)
    assert any(line.startswith("grouped_mm (MoE experts) in float32") for line in r.emulations)
    assert any("experts cost 4 bytes per parameter" in n for n in estimate(spec, cfg).memory.notes)
    # a bf16 model uses the bf16 kernel: nothing is emulated
    r16 = dry_run(spec, make_config("lora", target_modules="q_proj,v_proj", seq_len=32))
    assert not any(line.startswith("grouped_mm") for line in r16.emulations)
