"""LoRA trainable counts against peft's rules and real peft, and 4-bit storage against bitsandbytes."""

from __future__ import annotations

import pytest

from lora_budget.errors import ConfigError
from lora_budget.finetune import make_config
from lora_budget.memory import quantized_weight_bytes
from lora_budget.models import get_model
from lora_budget.params import lora_params

ALL7 = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

#: memory-accounting.md section 1.3 (peft on the HF classes): LoRA r=16 all-linear.
ALL_LINEAR_R16 = {
    "llama-2-7b": (39_976_960, 224),
    "llama-3-8b": (41_943_040, 224),
    "llama-3.2-1b": (11_272_192, 112),
    "mistral-7b": (41_943_040, 224),
    "qwen2-7b": (40_370_176, 196),
    "gemma-7b": (50_003_968, 196),
    "phi-3-mini": (25_165_824, 128),
}


@pytest.mark.parametrize("name,expected", sorted(ALL_LINEAR_R16.items()))
def test_all_linear_r16_reference(name, expected):
    cfg = make_config("lora", lora_rank=16, target_modules="all-linear")
    assert lora_params(get_model(name), cfg) == expected


def test_qv_default_by_hand():
    spec = get_model("llama-3-8b")  # GQA: v_proj is 4096 -> 1024
    r = 8
    per_layer = r * (4096 + 4096) + r * (4096 + 1024)
    assert lora_params(spec, make_config("lora")) == (32 * per_layer, 64)


def _peft_trainable(spec, targets, r):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.AutoConfig.for_model(**spec.with_(num_hidden_layers=2).to_hf_config())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    kw = {} if targets is None else {"target_modules": targets}
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, task_type="CAUSAL_LM", **kw))
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "phi-3-mini",
                                  "mixtral-8x7b", "mistral-7b"])
@pytest.mark.parametrize("targets", [None, "all-linear", ALL7])
def test_lora_counts_equal_real_peft(name, targets):
    spec = get_model(name)
    if spec.model_type == "phi3" and targets != "all-linear":
        targets = "qkv_proj,o_proj" if targets is None else "qkv_proj,o_proj,gate_up_proj,down_proj"
    if spec.model_type == "mixtral" and targets != "all-linear":
        targets = "q_proj,k_proj,v_proj,o_proj" if targets else "q_proj,v_proj"
    small = spec.with_(num_hidden_layers=2)
    peft_targets = targets if targets in (None, "all-linear") else targets.split(",")
    ours, _ = lora_params(small, make_config("lora", lora_rank=16, target_modules=targets))
    assert ours == _peft_trainable(spec, peft_targets, 16)


def test_mixtral_without_targets_is_refused_like_peft():
    with pytest.raises(ConfigError, match="target-modules"):
        lora_params(get_model("mixtral-8x7b"), make_config("lora"))


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ConfigError, match="lora-rank"):
        lora_params(get_model("qwen2.5-0.5b"), make_config("lora", lora_rank=4096))


def test_unknown_target_is_refused():
    with pytest.raises(ConfigError, match="not found"):
        lora_params(get_model("llama-2-7b"), make_config("lora", target_modules="query,value"))


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (688, 256), (28672, 8192), (1000, 3)])
@pytest.mark.parametrize("dq", [True, False])
def test_4bit_storage_equals_bitsandbytes(shape, dq):
    """Quantise on the meta device with bitsandbytes and count each storage rounded to 512 B."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=dq, quant_type="nf4")
    p = p._quantize("meta")
    qs = p.quant_state
    tensors = [p, qs.absmax, qs.code]
    if dq:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    rounded = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in tensors)
    assert quantized_weight_bytes(shape[0] * shape[1], dq) == rounded
