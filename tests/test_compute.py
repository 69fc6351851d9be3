"""FLOPs per token against values derived by hand: the 6·N rule, LoRA's frozen backward, the recompute of
gradient checkpointing, QLoRA's per-call dequantisation, MoE's active experts."""

from __future__ import annotations

import pytest

from lora_budget.compute import dequant_bytes_per_element, six_n, step_flops, token_flops
from lora_budget.finetune import make_config
from lora_budget.models import get_model

# tiny_llama (conftest): h=256, i=688, L=2, n_h=4 (head_dim 64, h_q=256), n_kv=2 (h_kv=128), V=1000.
#   per layer: q 256*256 + k 256*128 + v 256*128 + o 256*256 + gate/up/down 3*256*688 = 724,992 weights
TINY_LAYER_WEIGHTS = 65_536 + 32_768 + 32_768 + 65_536 + 528_384
TINY_N = 2 * TINY_LAYER_WEIGHTS + 1000 * 256  # decoder Linears + lm_head = 1,705,984
#   LoRA r=8 on q_proj (256->256) and v_proj (256->128): 8*(256+256) + 8*(256+128) = 7,168 per layer
TINY_LORA_QV_R8 = 2 * (8 * 512 + 8 * 384)


def tiny_attention_flops(seq_len: int) -> int:
    """Forward attention FLOPs per token: Q.K^T and P.V, 2*s*h_q each, per layer (PaLM convention)."""
    return 2 * 2 * 2 * seq_len * 256


@pytest.mark.parametrize("seq_len", [1, 128, 512])
def test_full_training_is_six_n_plus_three_attention(tiny_llama, seq_len):
    cfg = make_config("full", seq_len=seq_len, gradient_checkpointing=False)
    f = step_flops(tiny_llama, cfg)
    assert six_n(tiny_llama) == TINY_N == 1_705_984
    per_token = 6 * TINY_N + 3 * tiny_attention_flops(seq_len)
    assert f.model == per_token * cfg.tokens
    assert f.forward == (2 * TINY_N + tiny_attention_flops(seq_len)) * cfg.tokens
    assert f.recompute == 0 and f.executed == f.model


def test_lora_backward_skips_frozen_weight_gradients(tiny_llama):
    s = 64
    cfg = make_config("lora", seq_len=s, batch_size=3)  # peft default targets q_proj, v_proj; r=8
    f = step_flops(tiny_llama, cfg)
    fwd = 2 * TINY_N + tiny_attention_flops(s) + 2 * TINY_LORA_QV_R8
    # base matmuls: input gradients only (1 forward); attention 2 forwards; adapters input + weight grads
    bwd = 2 * TINY_N + 2 * tiny_attention_flops(s) + 2 * 2 * TINY_LORA_QV_R8
    assert f.forward == fwd * cfg.tokens
    assert f.backward == bwd * cfg.tokens


def test_checkpointing_recomputes_the_decoder_layers_not_the_head(tiny_llama):
    s = 32
    off = step_flops(tiny_llama, make_config("full", seq_len=s))
    on = step_flops(tiny_llama, make_config("full", seq_len=s, gradient_checkpointing=True))
    assert on.model == off.model
    assert on.recompute == (2 * 2 * TINY_LAYER_WEIGHTS + tiny_attention_flops(s)) * s
    lora_on = step_flops(tiny_llama, make_config("lora", seq_len=s, gradient_checkpointing=True))
    assert lora_on.recompute == (2 * 2 * TINY_LAYER_WEIGHTS + tiny_attention_flops(s) + 2 * TINY_LORA_QV_R8) * s


def test_qlora_dequantises_each_weight_once_per_call(tiny_llama):
    cfg = make_config("qlora", seq_len=16)  # checkpointing on: forward, recompute, backward
    f = step_flops(tiny_llama, cfg)
    assert f.dequant_calls_per_weight == 3
    # nf4 with double quantisation: 0.5 B packed + (1 B + 4 B / 256) / 64 absmax + 2 B bf16 output per element
    per_element = 0.5 + (1 + 4 / 256) / 64 + 2
    assert dequant_bytes_per_element(cfg) == pytest.approx(per_element)
    assert f.dequant_bytes == int(3 * 2 * TINY_LAYER_WEIGHTS * per_element)
    no_dq = make_config("qlora", seq_len=16, gradient_checkpointing=False, bnb_4bit_use_double_quant=False)
    g = step_flops(tiny_llama, no_dq)
    assert g.dequant_calls_per_weight == 2
    assert g.dequant_bytes == int(2 * 2 * TINY_LAYER_WEIGHTS * (0.5 + 4 / 64 + 2))
    # the same FLOPs as LoRA with the same adapters (all-linear r=64 here)
    lora = step_flops(tiny_llama, make_config("lora", seq_len=16, lora_rank=64, target_modules="all-linear",
                                              gradient_checkpointing=True))
    assert (f.forward, f.backward, f.recompute) == (lora.forward, lora.backward, lora.recompute)
    assert step_flops(tiny_llama, make_config("lora", seq_len=16)).dequant_bytes == 0


def test_llama_2_7b_six_n():
    # matmul parameters: 32 layers x (4*4096^2 + 3*4096*11008) + lm_head 32000*4096 = 6,607,077,376
    # (the 6,738,415,616 total less the 131,072,000 embedding and 266,240 norm weights)
    spec = get_model("llama-2-7b")
    assert six_n(spec) == 6_607_077_376
    f = step_flops(spec, make_config("full", seq_len=1))
    assert f.model == 6 * 6_607_077_376 + 3 * 4 * 32 * 1 * 4096


#: LoRA's model FLOPs are (2N + 3A + 3·adapters) against full's 3N + 3A: close to 2/3 for a short sequence and
#: small adapters.  The band allows for the attention and adapter terms.
LORA_OVER_FULL_BAND = (0.66, 0.70)
#: Checkpointing adds about one forward of the decoder (no lm_head) to full's three: close to 4/3.
RECOMPUTE_OVER_FULL_BAND = (1.30, 1.34)


def test_known_ratios_on_a_7b():
    spec = get_model("llama-2-7b")
    full = step_flops(spec, make_config("full"))
    lora = step_flops(spec, make_config("lora"))
    lo, hi = LORA_OVER_FULL_BAND
    assert lo < lora.model / full.model < hi
    ck = step_flops(spec, make_config("full", gradient_checkpointing=True))
    lo, hi = RECOMPUTE_OVER_FULL_BAND
    assert lo < ck.executed / full.executed < hi


def test_moe_counts_active_experts_only():
    spec = get_model("mixtral-8x7b")
    tf = token_flops(spec, make_config("lora", target_modules="q_proj,v_proj"))
    h, i, L = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers
    attn = 2 * h * h + 2 * h * spec.kv_dim
    assert tf.decoder_matmul == 2 * L * (attn + 2 * 3 * h * i + 8 * h)


def test_attention_grows_with_sequence(tiny_llama):
    short = token_flops(tiny_llama, make_config("lora", seq_len=128))
    long = token_flops(tiny_llama, make_config("lora", seq_len=4096))
    assert long.attention == 32 * short.attention
    assert long.decoder_matmul == short.decoder_matmul
