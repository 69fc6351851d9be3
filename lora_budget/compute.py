"""FLOPs of one training step: forward, backward, gradient-checkpointing recompute, and QLoRA dequantisation.

Standard library only.  Counts follow the usual model-FLOPs convention (Kaplan et al. 2020 section 2.1; PaLM,
Chowdhery et al. 2022 appendix B; nanoGPT ``estimate_mfu``):

- a matmul ``[T, in] @ [in, out]`` costs ``2·T·in·out`` FLOPs (one multiply and one add per term);
- attention scores ``Q·Kᵀ`` and the weighted sum ``P·V`` cost ``2·s·h_q`` each per token per layer in forward,
  with the full sequence length ``s`` (the causal mask's half is *not* subtracted: this is PaLM's ``12·L·H·Q·T``
  term and the convention behind published MFU figures, so the two stay comparable).  GQA does not change it;
- backward costs the forward once more for the *input* gradient of every matmul on the path to a trainable
  parameter, and once more for the *weight* gradient of each trainable weight only.  Full fine-tuning therefore
  costs ``3×`` the forward (the ``6·N`` rule); a frozen LoRA/QLoRA base costs ``2×`` the forward for its matmuls
  (no weight gradients) and the adapters cost ``3×`` their own (tiny) forward;
- attention has no weights: its backward (dQ, dK, dV and dP) is two forwards' worth of matmuls;
- gradient checkpointing (HF checkpoints each decoder layer) runs every decoder layer's forward a second time in
  backward; the lm_head and the loss are not recomputed;
- elementwise work (norms, activations, softmax, rotary, residual adds, the loss) and the embedding lookup are
  not counted: they are bandwidth-bound and a few percent of the matmul FLOPs at these sizes;
- one approximation: layer 0's q/k/v (and gate/up) base matmuls need no input gradient under LoRA without
  checkpointing (their input, the frozen embedding, needs no grad).  We count it anyway (< 1/L of the
  backward of those modules), so the LoRA figures are an upper bound by well under 1 %.

QLoRA dequantisation is not a matmul: bitsandbytes ``MatMul4Bit`` dequantises the whole 4-bit weight to the
compute dtype at every Linear call (forward, the checkpoint recompute, and backward for the input gradient;
memory-accounting.md section 2.3), whatever the number of tokens.  It is memory-bandwidth bound, so we count
the bytes it moves (``dequant_bytes``) and cost.py turns them into seconds with the GPU's bandwidth.

Symbols: ``T`` tokens of a micro-batch (batch_size·seq_len), ``s`` seq_len, ``L`` num_hidden_layers, ``h``
hidden_size, ``h_q`` num_attention_heads·head_dim, ``V`` vocab_size, ``r`` LoRA rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .finetune import FinetuneConfig
from .models import ModelSpec
from .params import count_params, layer_linears, lora_params
from .units import dtype_bytes

#: Bytes one bnb 4-bit element occupies in the packed weight (two 4-bit codes per uint8).
PACKED_BYTES_PER_ELEMENT = 0.5
#: bnb blocksize of 4-bit quantisation (one absmax per 64 weights) and of double quantisation (256 absmax).
QUANT_BLOCK = 64
DQ_BLOCK = 256


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one micro-batch of ``tokens`` tokens on one GPU, by part (all int).

    ``forward``: the model's forward (decoder matmuls, attention, lm_head, LoRA adapters).  ``backward``: input
    and weight gradients.  ``recompute``: the decoder layers' forward again under gradient checkpointing.
    ``model`` = forward + backward is what MFU is defined on; ``executed`` adds the recompute (PaLM's "hardware
    FLOPs").  ``dequant_bytes``: bytes read and written by QLoRA's per-call dequantisation (not FLOPs; see the
    module docstring); ``dequant_calls_per_weight``: how often each 4-bit weight is dequantised per micro-batch.
    """

    tokens: int
    forward: int
    backward: int
    recompute: int
    dequant_bytes: int = 0
    dequant_calls_per_weight: int = 0

    @property
    def model(self) -> int:
        return self.forward + self.backward

    @property
    def executed(self) -> int:
        return self.forward + self.backward + self.recompute

    @property
    def model_per_token(self) -> float:
        return self.model / self.tokens

    @property
    def executed_per_token(self) -> float:
        return self.executed / self.tokens

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "forward": self.forward, "backward": self.backward,
                "recompute": self.recompute, "model": self.model, "executed": self.executed,
                "model_per_token": self.model_per_token, "executed_per_token": self.executed_per_token,
                "dequant_bytes": self.dequant_bytes, "dequant_calls_per_weight": self.dequant_calls_per_weight}


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token by part, for one model and sequence length.

    ``decoder_matmul``: every decoder layer's Linear weights (MoE: attention, the router and the top-k active
    experts) = ``2·L·Σ in·out``.  ``attention``: ``4·L·s·h_q`` (scores and weighted sum).  ``lm_head``: ``2·V·h``
    (a matmul even when tied to the embedding).  ``adapters``: ``2·L·Σ r·(in+out)`` over the adapted modules
    (2 FLOPs per LoRA parameter, ``params.lora_params``).
    """

    decoder_matmul: int
    attention: int
    lm_head: int
    adapters: int

    @property
    def forward(self) -> int:
        return self.decoder_matmul + self.attention + self.lm_head + self.adapters


def token_flops(spec: ModelSpec, cfg: FinetuneConfig) -> TokenFlops:
    """Forward FLOPs per token of ``spec`` at ``cfg.seq_len`` (see ``TokenFlops``)."""
    L, h, V, s = spec.num_hidden_layers, spec.hidden_size, spec.vocab_size, cfg.seq_len
    per_layer = sum(m.in_features * m.out_features for m in layer_linears(spec))
    if spec.is_moe:
        E, k, i = spec.num_local_experts, spec.num_experts_per_tok, spec.intermediate_size
        per_layer += k * 3 * h * i + E * h  # active experts (gate, up, down) + router logits
    # every adapter weight (lora_A r x in, lora_B out x r) is one multiply-add per token: 2 FLOPs per parameter
    # (peft's Mixtral expert adapters included; they are a negligible share either way)
    adapters = 2 * lora_params(spec, cfg)[0] if cfg.is_lora else 0
    return TokenFlops(decoder_matmul=2 * L * per_layer, attention=4 * L * s * spec.q_dim, lm_head=2 * V * h,
                      adapters=adapters)


def dequant_bytes_per_element(cfg: FinetuneConfig) -> float:
    """Bytes moved to dequantise one 4-bit weight element: packed code + absmax read, compute-dtype write."""
    absmax = (1 + 4 / DQ_BLOCK) / QUANT_BLOCK if cfg.bnb_4bit_use_double_quant else 4 / QUANT_BLOCK
    return PACKED_BYTES_PER_ELEMENT + absmax + dtype_bytes(cfg.bnb_4bit_compute_dtype)


@lru_cache(maxsize=4096)
def step_flops(spec: ModelSpec, cfg: FinetuneConfig) -> StepFlops:
    """FLOPs (and QLoRA dequantisation bytes) of one micro-batch of ``cfg`` on one GPU.

    Full fine-tuning: forward F, backward 2F (``6·N`` per token plus three times the attention term).  LoRA and
    QLoRA: the base matmuls' backward is one forward (input gradients only), attention's two, the adapters' two
    (input and weight gradients); the lm_head needs its input gradient only.  Checkpointing adds the decoder
    layers' forward once more.
    """
    tf = token_flops(spec, cfg)
    T = cfg.tokens
    fwd = tf.forward
    if cfg.method == "full":
        bwd = 2 * (tf.decoder_matmul + tf.lm_head) + 2 * tf.attention
    else:
        bwd = (tf.decoder_matmul + tf.lm_head) + 2 * tf.attention + 2 * tf.adapters
    recompute = (tf.decoder_matmul + tf.attention + tf.adapters) if cfg.gradient_checkpointing else 0
    dq_bytes = 0
    calls = 0
    if cfg.method == "qlora":
        calls = 2 + (1 if cfg.gradient_checkpointing else 0)  # forward, backward (+ recompute)
        n = count_params(spec).quantized
        dq_bytes = int(calls * n * dequant_bytes_per_element(cfg))
    return StepFlops(tokens=T, forward=fwd * T, backward=bwd * T, recompute=recompute * T,
                     dequant_bytes=dq_bytes, dequant_calls_per_weight=calls)


def six_n(spec: ModelSpec) -> int:
    """The ``6·N`` rule's N for a dense model: matmul parameters a token passes through (decoder Linear weights
    and the lm_head; the embedding lookup is not a matmul)."""
    pc = count_params(spec)
    return spec.num_hidden_layers * pc.per_layer_linear_weights + spec.vocab_size * spec.hidden_size


__all__ = ["StepFlops", "TokenFlops", "token_flops", "step_flops", "dequant_bytes_per_element", "six_n"]
