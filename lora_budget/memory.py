"""The memory model: bytes of every tensor class of one training step, and the peak of each phase.

Sections refer to ``memory-accounting.md`` (shared reference).  Every component is an ``int`` number of bytes.
The peak of a phase is the sum of the components live at that moment (``Phase.components``), so every total is
computed from its parts.  ``peak_allocated`` predicts ``torch.cuda.max_memory_allocated``; ``peak_reserved``
adds the caching allocator's reserve; ``device_total`` adds the CUDA context (what NVML reads for the process).
Paged optimizer state lives in CUDA managed memory outside the allocator: it is reported as ``offloaded``, never
added to the device totals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .activations import attention_implementation, layer_activations, mlp_adapter_moments, precision
from .finetune import FinetuneConfig
from .models import ModelSpec
from .params import count_params, layer_adapters, layer_linears, lora_params, resolve_targets
from .units import MiB, ceil_div, dtype_bytes, round_up

#: The caching allocator rounds every request up to a multiple of 512 bytes (kMinBlockSize).
BLOCK = 512
#: cuBLAS workspace through the caching allocator: 4096 KiB x 8 on sm90, two handles (forward thread and the
#: autograd backward thread) - CublasHandlePool.cpp; 8.125 MiB per handle on older GPUs.  We budget 2 x 32 MiB.
CUBLAS_WORKSPACE = 2 * 32 * MiB
#: Reserved minus allocated at the peak (fragmentation and cached blocks), as a fraction of peak allocated.
#: A heuristic (memory-accounting.md section 9: 5-15 %); calibrate with ``lora-budget measure`` on your GPU.
RESERVE_FRACTION = 0.08
#: CUDA context of a process with lazy module loading, plus lazily loaded cuBLAS/cuDNN kernels (section 9:
#: 300-700 MB).  NVML's per-process figure adds it to the allocator's reserved memory.
CUDA_CONTEXT = 500 * MiB
#: 0-dim and tiny tensors alive at the end of forward (loss, its total weight, the shifted labels' view ...): one
#: 512 B block each, counted on the dry run.
SMALL_BLOCKS = 3
#: bnb paged optimizers page a state buffer only when the parameter has at least this many elements.
PAGED_MIN_NUMEL = 100_000
#: bnb 8-bit optimizers keep fp32 state for parameters with fewer elements than this (min_8bit_size).
MIN_8BIT_SIZE = 4096
#: bnb >= 0.44 blockwise 8-bit optimizer block size (one fp32 absmax per block per state).
OPT8_BLOCK = 256


def lora_forward_transient(spec: ModelSpec, cfg: FinetuneConfig) -> int:
    """Largest short-lived tensor of a LoRA adapter's forward, bytes (memory-accounting.md 6.5).

    peft casts the adapter input to fp32 (a copy when the input is bf16/fp16) and, with dropout under autocast,
    the fp32 dropout output lives until lora_A has cast it to bf16; neither is saved for backward.
    """
    if not cfg.is_lora:
        return 0
    p = precision(cfg)

    worst = 0
    for m in resolve_targets(spec, cfg.target_modules):
        if p.quantized:
            width = p.compute if m.input == "attn_out" else 4
        else:
            width = p.compute if m.input == "attn_out" else p.residual
        per = (4 if width != 4 else 0) + (4 if cfg.lora_dropout > 0 and p.autocast else 0)
        worst = max(worst, _blk(cfg.tokens * m.in_features * per))
    return worst


def _blk(n: int) -> int:
    """Bytes the allocator hands out for a request of n bytes (0 stays 0)."""
    return round_up(n, BLOCK) if n > 0 else 0


# ---------------------------------------------------------------------------------------------------------------
# Parameter tensors
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """A parameter tensor of the model as the optimizer sees it: elements and bytes per element."""

    numel: int
    itemsize: int
    embedding: bool = False

    @property
    def bytes(self) -> int:
        return _blk(self.numel * self.itemsize)


def base_tensors(spec: ModelSpec, cfg: FinetuneConfig) -> tuple[Tensor, ...]:
    """Every dense (not 4-bit) base parameter tensor, in its dtype after loading / kbit preparation."""
    p = precision(cfg)
    return _base_tensors(spec, p.param, p.quantized)


@functools.lru_cache(maxsize=256)
def _base_tensors(spec: ModelSpec, w: int, quantized: bool) -> tuple[Tensor, ...]:
    h, V, L = spec.hidden_size, spec.vocab_size, spec.num_hidden_layers
    out = [Tensor(V * h, w, embedding=True)]
    if spec.model_type == "gpt2":
        out.append(Tensor(spec.max_position_embeddings * h, w, embedding=True))
    if not spec.tie_word_embeddings:
        out.append(Tensor(V * h, w))
    n_norms = 4 if spec.model_type == "gemma2" else 2
    norm_tensors = [h, h] if spec.model_type == "gpt2" else [h]
    for _ in range(L):
        for m in layer_linears(spec):
            if not quantized:
                out.append(Tensor(m.in_features * m.out_features, w))
            if m.bias:
                out.append(Tensor(m.out_features, w))
        for _ in range(n_norms):
            out.extend(Tensor(n, w) for n in norm_tensors)
        if spec.is_moe:
            E, i = spec.num_local_experts, spec.intermediate_size
            out += [Tensor(E * 2 * i * h, w), Tensor(E * h * i, w), Tensor(E * h, w)]
    out.extend(Tensor(n, w) for n in norm_tensors)
    return tuple(out)


def quantized_weight_bytes(numel: int, double_quant: bool) -> int:
    """Device bytes of one bnb 4-bit weight of ``numel`` elements, each storage rounded to 512 B (section 2.2).

    packed uint8 ceil(n/2); absmax fp32 per 64 (no DQ) or uint8 per 64 + fp32 per 256 absmax + fp32 offset +
    fp32[256] state2 code (DQ); the fp32[16] nf4/fp4 code table.
    """
    blocks = ceil_div(numel, 64)
    b = _blk(ceil_div(numel, 2)) + _blk(64)
    if double_quant:
        b += _blk(blocks) + _blk(4 * ceil_div(blocks, 256)) + _blk(4) + _blk(1024)
    else:
        b += _blk(4 * blocks)
    return b


def lora_tensors(spec: ModelSpec, cfg: FinetuneConfig) -> tuple[Tensor, ...]:
    """lora_A [r, in] and lora_B [out, r] of every adapted module, in the adapter dtype."""
    if not cfg.is_lora:
        return ()
    return _lora_tensors(spec, cfg.with_(batch_size=1, seq_len=1, gradient_accumulation_steps=1))


@functools.lru_cache(maxsize=256)
def _lora_tensors(spec: ModelSpec, cfg: FinetuneConfig) -> tuple[Tensor, ...]:
    a = precision(cfg).adapter
    per_layer = []
    for ad in layer_adapters(spec, cfg):
        per_layer += [Tensor(ad.a_numel, a), Tensor(ad.b_numel, a)]
    return tuple(per_layer) * spec.num_hidden_layers


def layer_grad_bytes(spec: ModelSpec, cfg: FinetuneConfig) -> int:
    """Gradient bytes of one decoder layer's parameters under full fine-tuning."""
    one = spec.with_(num_hidden_layers=1)
    two = spec.with_(num_hidden_layers=2)
    return sum(t.bytes for t in base_tensors(two, cfg)) - sum(t.bytes for t in base_tensors(one, cfg))


def trainable_tensors(spec: ModelSpec, cfg: FinetuneConfig) -> list[Tensor]:
    """The parameters that get a .grad and optimizer state."""
    if cfg.method == "full":
        return base_tensors(spec, cfg)
    return lora_tensors(spec, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerMemory:
    """Optimizer state on the device, paged (managed memory, off the allocator), and step temporaries."""

    device: int
    paged: int
    step_temporary: int
    notes: tuple[str, ...] = ()


def optimizer_memory(spec: ModelSpec, cfg: FinetuneConfig, tensors: list[Tensor] | None = None) -> OptimizerMemory:
    """Optimizer state bytes for ``cfg.optim`` (section 4)."""
    tensors = trainable_tensors(spec, cfg) if tensors is None else tensors
    o = cfg.optim
    if o == "sgd":
        return OptimizerMemory(0, 0, 0, ("torch SGD without momentum keeps no state",))
    if o in ("adamw_torch", "adamw_torch_fused"):
        states = sum(2 * t.bytes for t in tensors)
        if o == "adamw_torch_fused":
            steps = len(tensors) * BLOCK  # a 0-dim fp32 step tensor per parameter on the device
            return OptimizerMemory(states + steps, 0, 0, ("fused AdamW: states in the parameter dtype",))
        # foreach: _foreach_sqrt(exp_avg_sq) materialises one copy of all second moments during step()
        temp = sum(t.bytes for t in tensors)
        return OptimizerMemory(states, 0, temp, ("foreach AdamW (torch default on CUDA): one sqrt copy of "
                                                 "exp_avg_sq during step()",))
    eight = o in ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
    paged = o.startswith("paged")
    dev = 0
    off = 0
    quant_maps = 0
    for t in tensors:
        if eight and t.numel >= MIN_8BIT_SIZE and not t.embedding:
            b = 2 * _blk(t.numel) + 2 * _blk(4 * ceil_div(t.numel, OPT8_BLOCK))
            if not quant_maps:  # qmap1 / qmap2: the 256-entry fp32 dynamic maps, shared by all 8-bit states
                quant_maps = 2 * _blk(256 * 4)
                dev += quant_maps
        else:  # 32-bit states (fp32 whatever the param dtype; Trainer overrides embeddings to 32-bit)
            b = 2 * _blk(4 * t.numel)
        if paged and t.numel >= PAGED_MIN_NUMEL:
            off += b
        else:
            dev += b
    notes = ["bnb " + ("8-bit" if eight else "32-bit") + " AdamW: in-place blockwise update, no temporaries"]
    if paged:
        notes.append("paged: state buffers of params >= 1e5 elements live in CUDA managed memory (reported as "
                     "offloaded, not in torch's allocator counters)")
    return OptimizerMemory(dev, off, 0, tuple(notes))


# ---------------------------------------------------------------------------------------------------------------
# Activations outside the layers, logits and loss
# ---------------------------------------------------------------------------------------------------------------
def logits_width(spec: ModelSpec, cfg: FinetuneConfig) -> int:
    """Bytes per element of the logits lm_head returns (compute dtype; fp32 lm_head without autocast)."""
    p = precision(cfg)
    if p.autocast:
        return 2
    return 4 if p.quantized else p.param


@dataclass(frozen=True)
class LossMemory:
    """Logits and cross-entropy tensors (section 8), bytes for one micro-batch."""

    saved: int  # log_softmax output (fp32, N x V) + shifted int64 labels kept for backward
    forward_transient: int  # bf16 logits + fp32 upcast (or accelerate's fp32 copy) while the loss is computed
    backward_transient: int  # grad of log_softmax output + grad input (both fp32 N x V) at the start of backward


def loss_memory(spec: ModelSpec, cfg: FinetuneConfig) -> LossMemory:
    N, V = cfg.tokens, spec.vocab_size
    wl = logits_width(spec, cfg)
    logits = _blk(N * V * wl)
    up = _blk(N * V * 4) if wl != 4 else 0
    saved = _blk(N * V * 4) + _blk(8 * N)
    if spec.extra("final_logit_softcapping"):
        saved += logits  # Gemma-2: logits = tanh(logits / cap) * cap; tanh saves its output
    # while the loss is computed the model still holds the final norm output (its hidden_states variable)
    # (for full fine-tuning that tensor is lm_head's saved input, already counted in the activations)
    hidden = 0 if cfg.method == "full" else _blk(N * spec.hidden_size * precision(cfg).residual)
    return LossMemory(saved=saved, forward_transient=logits + up + hidden, backward_transient=2 * _blk(N * V * 4))


def mask_bytes(spec: ModelSpec, cfg: FinetuneConfig, types: int | None = None) -> int:
    """Bytes of the additive attention masks transformers materialises for eager attention: [b, 1, s, s] in the
    hidden-state dtype, one per attention type of the model (Gemma-2: sliding and full), or ``types`` of them
    (the bottom layer's checkpoint holds its own type's only)."""
    if attention_implementation(spec, cfg) != "eager":
        return 0
    n = (2 if spec.model_type == "gemma2" else 1) if types is None else types
    return n * _blk(cfg.batch_size * cfg.seq_len * cfg.seq_len * precision(cfg).residual)


def rotary_bytes(spec: ModelSpec, cfg: FinetuneConfig) -> int:
    """Rotary cos and sin [1, s, head_dim] in the hidden-state dtype, shared by all layers (GPT-2 has none)."""
    if spec.model_type == "gpt2":
        return 0
    return 2 * _blk(cfg.seq_len * spec.d_head * precision(cfg).residual)


def top_saved(spec: ModelSpec, cfg: FinetuneConfig) -> int:
    """Bytes saved outside the decoder layers (final norm, lm_head input / weight cast), without the loss."""
    p = precision(cfg)
    h, V, T = spec.hidden_size, spec.vocab_size, cfg.tokens
    full = cfg.method == "full"
    gemma = spec.model_type in ("gemma", "gemma2")
    b = T * (4 * h + 4)  # final norm: fp32 input + rsqrt
    if gemma:
        b += _blk(4 * h)  # (1 + weight.float()) saved by GemmaRMSNorm
    if full:
        b += T * (4 if gemma else p.residual) * h  # normalised x for the norm weight's grad (Gemma: fp32)
        b += T * p.compute * h if (p.autocast and p.param != p.compute) else 0  # lm_head's own input cast
        if not (p.autocast and p.param != p.compute):
            b += T * p.residual * h  # lm_head saves its input (the final norm output)
    if p.autocast and p.param == 4:
        b += 2 * V * h  # bf16 cast of the fp32 lm_head weight, saved for the input gradient
    b += rotary_bytes(spec, cfg)
    b += SMALL_BLOCKS * BLOCK
    return b


# ---------------------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Phase:
    """Components live at the peak of one phase; ``total`` is their sum."""

    name: str
    components: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())


@dataclass(frozen=True)
class MemoryBreakdown:
    """Every component's size, the phases built from them, and the three totals."""

    components: dict
    phases: tuple[Phase, ...]
    offloaded: int
    reserve: int
    context: int
    notes: tuple[str, ...]

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda ph: ph.total)

    @property
    def peak_allocated(self) -> int:
        return self.peak_phase.total

    @property
    def peak_reserved(self) -> int:
        return self.peak_allocated + self.reserve

    @property
    def device_total(self) -> int:
        return self.peak_reserved + self.context


def memory_breakdown(spec: ModelSpec, cfg: FinetuneConfig) -> MemoryBreakdown:
    """Predict the memory of one training step of ``spec`` under ``cfg``."""
    p = precision(cfg)
    pc = count_params(spec)
    L = spec.num_hidden_layers
    T = cfg.tokens
    h = spec.hidden_size
    notes: list[str] = []

    # weights ------------------------------------------------------------------------------------------------
    dense = base_tensors(spec, cfg)
    weights = sum(t.bytes for t in dense)
    quant = 0
    if p.quantized:
        dq = cfg.bnb_4bit_use_double_quant
        for m in layer_linears(spec):
            quant += L * quantized_weight_bytes(m.in_features * m.out_features, dq)
    adapters = sum(t.bytes for t in lora_tensors(spec, cfg))
    buffers = _blk(4 * (spec.d_head // 2)) if spec.model_type != "gpt2" else 0  # rotary inv_freq
    # gradients and optimizer -------------------------------------------------------------------------------
    trainable = trainable_tensors(spec, cfg)
    grads = sum(t.bytes for t in trainable)
    opt = optimizer_memory(spec, cfg, trainable)
    # activations ----------------------------------------------------------------------------------------------
    embed_grad = cfg.method == "full" or (cfg.gradient_checkpointing and cfg.is_lora)
    la = layer_activations(spec, cfg)
    la0 = la if embed_grad else layer_activations(spec, cfg, input_requires_grad=False)
    per_layer = la.bytes(cfg)
    layer0 = la0.bytes(cfg)
    top = top_saved(spec, cfg)
    loss = loss_memory(spec, cfg)
    if cfg.gradient_checkpointing:
        ckpt = L * _blk(T * p.residual * h)  # each layer's input, kept by the checkpoint
        # eager attention's additive masks [b, 1, s, s] (one per attention type: Gemma-2 alternates sliding and
        # full layers) are inputs of every checkpointed layer, kept until the end of backward
        top += mask_bytes(spec, cfg)
        saved_layers = ckpt
        # an fp32 residual stream: the first norm's fp32 "upcast" is the checkpointed input itself
        recompute = per_layer - (T * 4 * h if p.residual == 4 else 0) + T * la.recompute_extra
    else:
        saved_layers = layer0 + (L - 1) * per_layer
        recompute = 0
    autocast_cache = 0
    if p.autocast and cfg.method == "full" and p.param == 4:
        # trainable fp32 Linear weights: their bf16 casts are cached until the outermost autocast exits
        autocast_cache = 2 * L * pc.per_layer_linear_weights
    elif p.autocast and cfg.is_lora:
        autocast_cache = sum(2 * t.numel for t in lora_tensors(spec, cfg))
    if cfg.gradient_checkpointing and L:
        # the recomputed layer runs under autocast again: its weight casts are saved by its matmuls
        recompute += autocast_cache // L
    dequant = 0
    if p.quantized:
        biggest = max(m.in_features * m.out_features for m in layer_linears(spec))
        dequant = _blk(biggest * dtype_bytes(cfg.bnb_4bit_compute_dtype))
    workspace = CUBLAS_WORKSPACE

    # use_cache=True (the config default) without checkpointing: the DynamicCache keeps every layer's k and v
    # until the outputs are dropped.  Usually those are the tensors SDPA saves anyway; under autocast with an fp32
    # residual stream (QLoRA, fp32 master weights) SDPA saves bf16 casts and the cached fp32 k/v are extra.
    kv_cache = 0
    if not cfg.gradient_checkpointing and p.autocast and p.residual == 4 and spec.model_type != "gpt2":
        kv_cache = L * 2 * _blk(T * spec.kv_dim * 4)
        notes.append("use_cache=True (config default) without gradient checkpointing: the KV cache holds fp32 k/v "
                     "of every layer until the forward's outputs are dropped")
    components = {
        "weights": weights,
        "quantized_weights": quant,
        "lora_adapters": adapters,
        "buffers": buffers,
        "gradients": grads,
        "optimizer_state": opt.device,
        "optimizer_step_temporaries": opt.step_temporary,
        "activations": saved_layers + top,
        "logits_loss": loss.saved + max(loss.forward_transient, loss.backward_transient),
        "recompute": recompute,
        "backward_working_set": 0,
        "kv_cache": kv_cache,
        "autocast_cache": autocast_cache,
        "dequant_transient": dequant,
        "cuda_workspace": workspace,
    }

    static = {"weights": weights, "quantized_weights": quant, "lora_adapters": adapters, "buffers": buffers,
              "cuda_workspace": workspace}
    k = cfg.gradient_accumulation_steps
    w_mlp = 4 if p.quantized else p.compute  # dtype of the MLP intermediates and their gradients
    lora_fwd = lora_forward_transient(spec, cfg)
    i_mlp = spec.intermediate_size * (spec.num_experts_per_tok if spec.is_moe else 1)
    phases = []
    for step in ("first_step", "steady_state"):
        s = opt.device if step == "steady_state" else 0
        g_fwd = grads if k > 1 else 0  # grads of earlier micro-batches persist across accumulation
        # forward: at the loss (logits and their fp32 copies) or inside the last layer (a dequantised weight)
        fwd_loss = dict(static, optimizer_state=s, gradients=g_fwd, activations=saved_layers + top,
                        logits_loss=loss.saved + loss.forward_transient, autocast_cache=autocast_cache,
                        kv_cache=kv_cache)
        fwd_layer = dict(static, optimizer_state=s, gradients=g_fwd, activations=saved_layers,
                         autocast_cache=autocast_cache, dequant_transient=max(dequant, lora_fwd))
        fwd = max(fwd_loss, fwd_layer, key=lambda c: sum(c.values()))
        # backward starts with the loss gradient; the autocast casts saved inside checkpointed layers are gone
        bwd_start = dict(static, optimizer_state=s, gradients=g_fwd, activations=saved_layers + top,
                         logits_loss=loss.saved + loss.backward_transient,
                         autocast_cache=0 if cfg.gradient_checkpointing else autocast_cache)
        def layer_inputs(above: int) -> int:
            """Rotary cos / sin and eager attention masks: inputs of every checkpointed layer (at the bottom
            layer only its own attention type's mask is left)."""
            return rotary_bytes(spec, cfg) + mask_bytes(spec, cfg, types=1 if above and L > 1 else None)

        # inside the layers' backward, going down from the top layer: the layer's saved tensors (recomputed under
        # checkpointing) while, for full fine-tuning, the weight gradients of the layers above accumulate.  Both
        # grow linearly in the layer index, so the largest is at the top or the bottom layer.
        if cfg.method == "full":
            g_layer = layer_grad_bytes(spec, cfg)
            # lm_head's weight gradient exists from the start of backward; with tied embeddings it is the
            # embedding's, otherwise the embedding's own arrives at the end
            g_top = grads - L * g_layer - (0 if spec.tie_word_embeddings else
                                           sum(t.bytes for t in dense if t.embedding))
            g_mlp = L and (sum(t.bytes for t in base_tensors(spec.with_(num_hidden_layers=1), cfg))
                           - sum(t.bytes for t in base_tensors(spec.with_(num_hidden_layers=1, intermediate_size=1,
                                                                          num_local_experts=0,
                                                                          num_experts_per_tok=0), cfg)))
            per_saved = _blk(T * p.residual * h) if cfg.gradient_checkpointing else per_layer
            candidates = []
            for above in (0, L - 1):
                below = L - above
                acts = (below * per_saved + layer_inputs(above) if cfg.gradient_checkpointing else
                        (below - 1) * per_layer + (layer0 if below == 1 else per_layer))
                candidates.append(dict(static, optimizer_state=s, gradients=(grads if k > 1 else g_top + above * g_layer),
                                       activations=acts + (top if above == 0 and not cfg.gradient_checkpointing else 0),
                                       recompute=recompute, dequant_transient=dequant,
                                       autocast_cache=autocast_cache if above == 0 else 0))
                if cfg.gradient_checkpointing:
                    # at the end of the layer's MLP backward (gate/up weight gradients): every MLP weight gradient
                    # exists beside the recomputed attention activations, the MLP input, the gradients of the
                    # gate and up outputs and the incoming gradient
                    if spec.is_moe:
                        # MoE: at the experts' gate_up weight gradient the router's input and routing tensors
                        # and the gathered expert input (grouped_mm's saved input) are still alive
                        E_, k_ = spec.num_local_experts, spec.num_experts_per_tok
                        keep = p.compute * h + k_ * h * p.param + 4 * E_ + 36 * k_ + 13
                        mlp_freed = max(0, la.mlp - keep)
                        mlp_in = 0
                    else:
                        mlp_freed, mlp_in = la.mlp, _blk(T * h * p.compute)
                    candidates.append(dict(static, optimizer_state=s,
                                           gradients=(grads if k > 1 else g_top + above * g_layer + g_mlp),
                                           activations=acts, recompute=max(0, recompute - T * mlp_freed),
                                           backward_working_set=_blk(T * h * p.residual) + mlp_in
                                           + _blk(2 * T * i_mlp * w_mlp)
                                           + (_blk(T * spec.num_experts_per_tok * h * p.compute) if spec.is_moe
                                              else 0)))
                    if not spec.is_moe:
                        # at the MLP product's backward: down_proj's weight gradient, the product's gradient and
                        # the two it makes, beside the whole recomputed layer
                        # (down_proj's saved input and, for Gemma-2, the post-MLP norm's saved tensors are gone)
                        g_down = _blk(h * spec.intermediate_size * p.param)
                        candidates.append(dict(static, optimizer_state=s,
                                               gradients=(grads if k > 1 else g_top + above * g_layer + g_down),
                                               activations=acts,
                                               recompute=recompute - T * (p.compute * spec.intermediate_size
                                                                          + la.post_mlp_norm),
                                               backward_working_set=_blk(T * h * p.residual)
                                               + 3 * _blk(T * i_mlp * w_mlp)))
            # the end of backward: every gradient exists and the embedding's arrives - through the embedding
            # output's gradient [T, h]; with tied embeddings as a second V x h gradient added to lm_head's
            tied_extra = 2 * _blk(spec.vocab_size * h * p.param) if spec.tie_word_embeddings else \
                _blk(T * h * p.residual)
            candidates.append(dict(static, optimizer_state=s, gradients=grads, recompute=tied_extra))
            bwd_layers = max(candidates, key=lambda c: sum(c.values()))
        else:
            # inside a layer's backward (its activations, recomputed under checkpointing, all alive) with the
            # incoming gradient [T, h]:
            # - at the MLP product's backward: its incoming gradient (down_proj's grad input; the sum of the base
            #   and adapter paths while both partial gradients still exist) and the two gradients it makes, [T, i]
            #   each; the down_proj adapter's saved input is gone by then and its gradients exist;
            # - at a 4-bit Linear's backward: one [T, i] gradient beside the dequantised weight;
            # - under checkpointing, in the recomputed forward at an adapter's transient.
            # Going down, the layers' saved tensors (or checkpoints) are freed while the adapters' gradients
            # accumulate: under checkpointing the bottom layer can be the larger (r=64 on every linear layer of
            # the 65B QLoRA setup: 38 MB of gradients against a 17 MB checkpoint per layer).
            g_layer = grads // L if L else 0
            grad_in = _blk(T * h * p.residual)
            r = cfg.lora_rank
            g_down = sum(_blk(r * m.in_features * p.adapter) + _blk(r * m.out_features * p.adapter)
                         for m in resolve_targets(spec, cfg.target_modules) if m.input == "act")
            # inside an adapted MLP module's forward (recomputed under checkpointing, beside the gradients that
            # started the recompute): activations.mlp_adapter_moments
            mm = mlp_adapter_moments(spec, cfg, la)
            moment = max((T * pt + fixed for pt, fixed in mm.moments), default=None)
            candidates = []
            for above in ((0, L - 1) if cfg.gradient_checkpointing else (0,)):
                below = L - above
                if cfg.gradient_checkpointing:
                    acts = below * _blk(T * p.residual * h) + layer_inputs(above)
                else:
                    acts = (below - 1) * per_layer + (layer0 if below == 1 else per_layer)
                g = grads if k > 1 else above * g_layer
                base = dict(static, optimizer_state=s, gradients=g, activations=acts, recompute=recompute)
                at_mlp = dict(base, gradients=g if k > 1 else g + g_down,
                              backward_working_set=grad_in + 3 * _blk(T * i_mlp * w_mlp))
                at_mlp["recompute" if cfg.gradient_checkpointing else "activations"] -= T * la.down_adapter
                candidates.append(at_mlp)
                candidates.append(dict(base, dequant_transient=dequant,
                                       backward_working_set=grad_in + _blk(T * i_mlp * w_mlp)))
                if cfg.gradient_checkpointing:
                    candidates.append(dict(base, dequant_transient=max(dequant, lora_fwd),
                                           backward_working_set=grad_in))
                    if moment is not None:
                        candidates.append(dict(base, recompute=recompute + moment,
                                               backward_working_set=grad_in + T * mm.recompute_trigger))
                if spec.is_moe and cfg.target_modules == "all-linear":
                    # peft's ParamWrapper on the 3-D experts: the backward of down_proj's grouped_mm makes the
                    # gradient of the whole merged W + B @ A weight [E, h, i] beside its input's gradient
                    E_, k_ = spec.num_local_experts, spec.num_experts_per_tok
                    ew = p.param
                    candidates.append(dict(base, backward_working_set=grad_in
                                           + _blk(E_ * h * spec.intermediate_size * ew)
                                           + _blk(k_ * T * spec.intermediate_size * ew)))
            bwd_layers = max(candidates, key=lambda c: sum(c.values()))
        opt_step = dict(static, optimizer_state=opt.device, gradients=grads,
                        optimizer_step_temporaries=opt.step_temporary)
        phases.append(Phase(f"{step}.forward", fwd))
        bwd = max((Phase(f"{step}.backward", bwd_start), Phase(f"{step}.backward", bwd_layers)),
                  key=lambda ph: ph.total)
        phases.append(bwd)
        phases.append(Phase(f"{step}.optimizer_step", opt_step))
    peak = max(ph.total for ph in phases)
    reserve = int(peak * RESERVE_FRACTION)
    notes.extend(opt.notes)
    if spec.is_moe and cfg.is_lora and cfg.target_modules == "all-linear" and cfg.lora_dropout > 0:
        notes.append("WARNING: peft 0.21 refuses lora_dropout != 0 on Mixtral's expert parameters, which all-linear "
                     "adapts: this setup fails in the real libraries (use --lora-dropout 0 or attention targets)")
    if dtype_bytes(spec.dtype) != dtype_bytes(cfg.dtype) and any(a.startswith("dtype=") for a in cfg.assumptions):
        notes.append(f"{spec.name}'s checkpoint is {spec.dtype}: loaded with dtype='auto' (the transformers 5 "
                     f"default) it takes {dtype_bytes(spec.dtype)} bytes per weight, not {dtype_bytes(cfg.dtype)}; "
                     f"pass --dtype {spec.dtype} to estimate that")
    if attention_implementation(spec, cfg) != cfg.attn_implementation:
        notes.append(f"{spec.model_type} has no SDPA support in transformers 5.24 (attention soft-capping): "
                     "transformers falls back to eager attention, which saves [b, heads, s, s] scores per layer")
    if spec.is_moe and p.quantized:
        notes.append("WARNING: transformers 5 keeps Mixtral's 3-D expert weights unquantised (bitsandbytes "
                     "replaces nn.Linear only) and prepare_model_for_kbit_training upcasts them to fp32: the "
                     "experts cost 4 bytes per parameter here, not 0.5, and compute in fp32 (grouped_mm ignores "
                     "autocast)")
    return MemoryBreakdown(components=components, phases=tuple(phases), offloaded=opt.paged, reserve=reserve,
                           context=CUDA_CONTEXT, notes=tuple(notes))
