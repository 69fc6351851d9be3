"""Activation memory: the tensors a decoder layer saves for backward, per token, for every precision mode.

The count walks the ops of one HF decoder layer (transformers 5.x ``modeling_llama.py`` and siblings) and adds
each storage that autograd keeps, following torch's rule that an op saves an input only when it needs it for the
gradient of another input that requires grad (memory-accounting.md section 6).  Storages that several ops save
(the norm output read by q, k and v) are counted once.  All results are bytes per token of one layer unless the
name says otherwise; ``T = batch_size * seq_len``.

The CUDA behaviour is modelled (dropout masks are bool, flash/mem-efficient SDPA saves out + logsumexp); the dry
run (``lora_budget.dryrun``) emulates the same behaviour on the CPU and is the referee for every term here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .finetune import FinetuneConfig
from .models import ModelSpec
from .params import LinearModule, layer_linears, resolve_targets
from .units import dtype_bytes


@dataclass(frozen=True)
class Precision:
    """Byte widths of one setup.

    ``param``: bytes of the (dense) base weights after loading (and, for QLoRA, of the unquantised ones after
    ``prepare_model_for_kbit_training``, which upcasts them to fp32).  ``residual``: dtype of the residual stream
    between layers.  ``compute``: dtype Linear outputs take (autocast dtype when autocast is on).  ``adapter``:
    LoRA weights (fp32 since peft 0.12).  ``autocast``: Trainer ``bf16=True``/``fp16=True``.
    """

    param: int
    residual: int
    compute: int
    adapter: int
    autocast: bool
    quantized: bool


def precision(cfg: FinetuneConfig) -> Precision:
    """Byte widths for ``cfg`` (see memory-accounting.md section 5, table of modes A-E)."""
    load = dtype_bytes(cfg.dtype)
    autocast = cfg.mixed_precision != "no"
    ac = 2 if autocast else None
    if cfg.method == "qlora":
        # prepare_model_for_kbit_training casts every non-4-bit param to fp32: the residual stream becomes fp32.
        return Precision(param=4, residual=4, compute=ac or 4, adapter=4, autocast=autocast, quantized=True)
    adapter = 4 if load < 4 else load  # peft autocast_adapter_dtype=True: bf16/fp16 adapters are upcast to fp32
    return Precision(param=load, residual=load, compute=ac or load, adapter=adapter, autocast=autocast,
                     quantized=False)


def _blk(n: int) -> int:
    """Allocator bytes of an n-byte request (512-byte blocks)."""
    return -(-n // 512) * 512 if n > 0 else 0


#: Model types whose transformers 5.24 class has no SDPA support (``_supports_sdpa = False``: Gemma-2's attention
#: soft-capping); transformers falls back to eager attention for them.
NO_SDPA = ("gemma2",)


def attention_implementation(spec: ModelSpec, cfg: FinetuneConfig) -> str:
    """The attention implementation the model really runs with (``sdpa`` becomes ``eager`` for NO_SDPA)."""
    if cfg.attn_implementation == "sdpa" and spec.model_type in NO_SDPA:
        return "eager"
    return cfg.attn_implementation


def _eager(spec: ModelSpec, cfg: FinetuneConfig) -> bool:
    return attention_implementation(spec, cfg) == "eager"


def _adapter_saved(m: LinearModule, x_width: int, shared_inputs: set, cfg: FinetuneConfig, p: Precision) -> int:
    """Bytes/token a LoRA adapter on module ``m`` saves (memory-accounting.md 6.5/6.6).

    ``x_width``: bytes per element of the module's input.  ``shared_inputs`` collects inputs already counted
    (the adapter's fp32 input is the same storage for q, k, v when no cast or dropout makes a copy).
    """
    r = cfg.lora_rank
    n = m.in_features
    dropout = cfg.lora_dropout > 0
    total = 0
    if dropout:
        total += 1 * n  # native_dropout keeps a bool mask on CUDA
        if p.autocast:
            total += 2 * n  # lora_A saves the autocast bf16 cast of the dropout output
        else:
            total += p.adapter * n  # lora_A saves the dropout output in the adapter dtype
    else:
        if p.autocast:
            total += 2 * n  # each module's lora_A casts its input (no cache for activations)
        elif x_width == p.adapter:
            # no cast: lora_A saves x itself, shared with the other modules reading the same input
            if m.input not in shared_inputs:
                shared_inputs.add(m.input)
                total += p.adapter * n
        else:
            total += p.adapter * n  # a separate fp32 cast per module
    total += (2 if p.autocast else p.adapter) * r  # lora_B saves lora_A's output
    return total


@dataclass(frozen=True)
class LayerActivations:
    """Saved bytes per token for one decoder layer, by part (all int).  ``per_token`` is their sum; ``per_seq``
    holds the terms that grow with sequence length (eager attention's probabilities), bytes per token per
    position of the sequence, and ``per_layer`` bytes that do not scale with tokens (autocast weight casts)."""

    norms: int
    attention: int
    mlp: int
    adapters: int
    per_seq: int
    per_layer: int
    #: bytes/token a recomputed layer (gradient checkpointing, ``use_cache=False``) saves beyond the forward:
    #: with a fused qkv_proj and no KV cache copy, V is a view of the qkv output and keeps all of it
    recompute_extra: int = 0
    #: the layer's inputs (``LinearModule.input`` names) whose own storage is saved by an adapter that reads them
    #: without a cast or dropout (a LoRA layer's other inputs are freed once their consumers have run)
    saved_inputs: frozenset = frozenset()
    #: bytes/token the norm after the MLP saves (Gemma-2's post_feedforward_layernorm; part of ``norms``)
    post_mlp_norm: int = 0
    #: (module, bytes/token its adapter saves) for every adapted Linear, in forward order; part of ``adapters``
    adapter_saved: tuple = ()

    @property
    def down_adapter(self) -> int:
        """Bytes/token the down_proj adapter saves (its input or the input's cast, lora_A's output), freed by the
        adapter's backward before the MLP product's backward runs."""
        return sum(b for m, b in self.adapter_saved if m.input == "act")

    @property
    def per_token(self) -> int:
        return self.norms + self.attention + self.mlp + self.adapters

    def bytes(self, cfg: FinetuneConfig) -> int:
        """Saved bytes of one layer for the micro-batch of ``cfg``."""
        T = cfg.tokens
        return T * self.per_token + T * cfg.seq_len * self.per_seq + self.per_layer


def layer_activations(spec: ModelSpec, cfg: FinetuneConfig, *, input_requires_grad: bool = True) -> LayerActivations:
    """What one decoder layer saves for backward (memory-accounting.md 6.1-6.7).

    ``input_requires_grad=False`` is layer 0 of a LoRA model whose frozen embedding output needs no grad: its
    first norm then saves nothing.
    """
    p = precision(cfg)
    h, i, hq, hkv, n_h = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim, spec.num_attention_heads
    full = cfg.method == "full"
    res = p.residual
    targets = set(resolve_targets(spec, cfg.target_modules)) if cfg.is_lora else set()  # compared by value
    linears = layer_linears(spec)
    adapted = [m for m in linears if m in targets]

    # ---- norms ---------------------------------------------------------------------------------------------
    # RMSNorm: fp32 upcast of the input (the input itself when already fp32) + rsqrt [T,1] fp32; with a trainable
    # weight also the normalised x in the input dtype (Gemma: kept in fp32).
    def norm(x_requires_grad: bool) -> int:
        if not x_requires_grad and not full:
            return 0
        b = 4 * h + 4
        if full:
            b += (4 if spec.model_type in ("gemma", "gemma2") else res) * h
        return b

    n_norms = 4 if spec.model_type == "gemma2" else 2
    norms = norm(input_requires_grad) + norm(True) * (n_norms - 1)
    gemma_norm = 0
    if spec.model_type in ("gemma", "gemma2"):
        # GemmaRMSNorm multiplies by (1 + weight.float()): that fp32 [h] tensor is saved by every norm call
        gemma_norm = (n_norms - (0 if input_requires_grad or full else 1)) * _blk(4 * h)

    # ---- Linear inputs saved by trainable weights (full fine-tuning) ---------------------------------------------
    w_in = p.compute  # width of what a Linear sees (its own cast under autocast)
    attention = 0
    mlp = 0
    per_layer = 0
    if full:
        if p.autocast and p.param != p.compute:
            # each Linear saves its own autocast cast of the input; weights cast per call and kept (cached)
            attention += (3 if spec.model_type != "phi3" else 1) * w_in * h  # q, k, v each cast their input
            # (the weight casts of trainable fp32 leaves live in the autocast cache: memory.py)
            if spec.is_moe:
                mlp += w_in * h  # only the router is an autocast F.linear (grouped_mm experts are not)
            else:
                mlp += (2 if spec.model_type != "phi3" else 1) * w_in * h + w_in * i
        else:
            attention += w_in * h  # q/k/v share the norm output
            mlp += w_in * h  # gate/up (MoE: router and experts) share the norm output
            if not spec.is_moe:
                mlp += w_in * i  # down_proj saves the product
            # (o_proj's input is the SDPA output, counted with the attention core below)
    # ---- attention core --------------------------------------------------------------------------------------
    act = 2 if p.autocast else (4 if p.quantized else p.compute)  # q/k/v dtype entering attention
    kv_width = hkv
    if (_eager(spec, cfg) or cfg.padding) and spec.num_key_value_heads > 1:
        # repeat_kv expands K and V (no enable_gqa with a mask; eager always repeats) into a copy
        kv_width = hq
    elif _eager(spec, cfg) and cfg.batch_size > 1 and spec.num_key_value_heads < spec.num_attention_heads:
        # a single kv head: repeat_kv's expand + reshape is a stride-0 view (SDPA saves the unexpanded storage),
        # but eager's matmuls fold batch and heads into one bmm dim, which copies the view when batch > 1
        kv_width = hq
    if _eager(spec, cfg):
        # q, repeated k and v, o_proj input copy; fp32 softmax probabilities + their cast to the compute dtype
        # q is saved by q @ k^T only for k's gradient: layer 0 of a LoRA model without a k adapter has none
        k_needs_grad = input_requires_grad or any(m.name in ("k_proj", "qkv_proj") for m in adapted)
        attention += (act * hq if k_needs_grad else 0) + 2 * act * kv_width + (act * hq if full else 0)
        per_seq = n_h * (4 + (act if act != 4 else 0))
        if spec.extra("attn_logit_softcapping"):
            per_seq += n_h * act  # Gemma-2: tanh(scores / cap) * cap; tanh saves its output
    else:
        attention += act * hq + 2 * act * kv_width + act * hq + 4 * n_h  # q, k, v, out (= o_proj input), lse
        if spec.model_type == "phi3" and full:
            attention += act * hq  # Phi-3's o_proj saves a contiguous copy of the attention output
        per_seq = 0
        if cfg.padding:
            attention += act * cfg.seq_len  # the additive mask [b,1,s,s] converted per call and saved
    # (QLoRA under autocast: the fp32 q/k/v are cast for SDPA and the casts are what it saves, at act = 2 bytes)
    # ---- MLP activations (gate out, act out, up out) -----------------------------------------------------------
    if spec.is_moe:
        E, k = spec.num_local_experts, spec.num_experts_per_tok
        # transformers' grouped_mm experts cast their input to the expert weights' dtype and grouped_mm is not
        # autocast-enabled: the experts compute in the dtype of their (unquantised) 3-D weights, fp32 for QLoRA
        # and fp32 training under autocast alike
        ew = p.param
        experts_adapted = cfg.is_lora and cfg.target_modules == "all-linear"
        if full or experts_adapted:
            if experts_adapted:
                # peft's ParamWrapper merges W + B @ A per forward: the merged expert weights are saved
                per_layer += _blk(E * 2 * i * h * ew) + _blk(E * h * i * ew)
            # gathered input and down output (k x w.h), gate_up out (k x 2w.i), act and product (k x 2w.i);
            # fp32 router softmax (4E), top-k indices / sort / routing weights (about 36k + 4 bytes)
            mlp += k * (2 * ew * h + 4 * ew * i) + 4 * E + 36 * k + 13
        else:  # frozen experts and router save no inputs, only what the activation and routing products need
            mlp += k * (ew * h + 3 * ew * i) + 4 * E + 36 * k + 13
    else:
        mlp_width = 4 if p.quantized else p.compute
        mlp += 3 * mlp_width * i  # gate_proj out (SiLU input), SiLU out, up_proj out
    # ---- LoRA adapters -------------------------------------------------------------------------------------
    adapters = 0
    # an adapter that reads its input without a cast saves that storage; SDPA's output (counted above) is o_proj's
    # input (transpose + reshape of the kernel's [b, s, h, d] output is a view)
    shared: set = set() if _eager(spec, cfg) or spec.model_type == "phi3" else {"attn_out"}
    adapter_saved = []
    widths = {"norm1": res if not p.quantized else 4, "norm2": res if not p.quantized else 4,
              "attn_out": act, "act": 4 if p.quantized else p.compute}
    widths["ln_1"], widths["ln_2"] = widths["norm1"], widths["norm2"]  # GPT-2 names of the same inputs
    for m in adapted:
        saved = _adapter_saved(m, widths[m.input], shared, cfg, p)
        if m.input == "norm1" and not input_requires_grad and cfg.lora_dropout > 0:
            # frozen embedding output: no dropout mask is needed, the dropout output is still saved by lora_A
            saved -= m.in_features
        adapter_saved.append((m, saved))
        adapters += saved
    if spec.is_moe and cfg.is_lora and cfg.target_modules == "all-linear":
        # peft 0.21 adapts the router (an nn.Parameter module) like a Linear h -> E
        router = LinearModule("gate", h, spec.num_local_experts, False, "mlp", "norm2")
        adapters += _adapter_saved(router, widths["norm2"], shared, cfg, p)
    # Without checkpointing the config default use_cache=True copies K and V into the DynamicCache (torch.cat),
    # and attention saves the copies; a recomputed layer runs with use_cache=False.  A fused qkv_proj (Phi-3)
    # then hands SDPA a view of its output as V: unless autocast casts it (the fp32 QLoRA output), the whole
    # [T, hq + 2 hkv] output stays, beside the rotated Q and K copies.
    qkv_width = 4 if p.quantized else p.compute
    fused = any(m.name == "qkv_proj" for m in linears)
    recompute_extra = act * (hq + hkv) if fused and qkv_width == act else 0
    return LayerActivations(norms=norms, attention=attention, mlp=mlp, adapters=adapters, per_seq=per_seq,
                            per_layer=per_layer + gemma_norm, adapter_saved=tuple(adapter_saved),
                            recompute_extra=recompute_extra, saved_inputs=frozenset(shared),
                            post_mlp_norm=norm(True) if spec.model_type == "gemma2" else 0)


@dataclass(frozen=True)
class MlpMoments:
    """The peaks inside the forward of the MLP's modules relative to the layer's saved set, as (bytes/token,
    bytes) pairs, and the gradient tensors alive when a checkpointed layer's recompute starts (beside the incoming
    gradient), bytes/token."""

    moments: tuple
    recompute_trigger: int


def mlp_adapter_moments(spec: ModelSpec, cfg: FinetuneConfig, la: LayerActivations | None = None) -> MlpMoments:
    """The highest moments inside the forward of the MLP's LoRA modules, bytes/token relative to the layer's
    whole saved set (``LayerActivations.bytes``): what of the layer is saved by then, minus what is not saved
    yet, plus what lives only then.  Empty when no MLP module is adapted (or for MoE / GPT-2 layers).

    Per 4-bit MLP module the dequantising forward of its base layer; per adapted MLP module (gate/up or gate_up,
    then down; peft 0.21 ``lora.Linear`` / ``lora.bnb.Linear4bit``):
    the base output (bnb: its clone, in the input dtype), the fp32 input copy peft makes for the adapter when it
    is not what lora_A saves, and at the scaling: lora_B's output and the scaled copy (autocast: bf16, else the
    adapter dtype), or at the sum: the scaled copy and the sum.  The MLP's input (the second norm's output) and
    the product entering down_proj live in the MLP's frame whether saved or not.  These moments are those of a
    recomputed layer (gradient checkpointing): its recompute stops at down_proj's lora_A.  ``la``: the layer's
    ``layer_activations`` when the caller has it.
    """
    none = MlpMoments((), 0)
    if not cfg.is_lora or spec.is_moe or spec.model_type == "gpt2":
        return none
    p = precision(cfg)
    h, i = spec.hidden_size, spec.intermediate_size
    targets = set(resolve_targets(spec, cfg.target_modules))
    mods = [m for m in layer_linears(spec) if m.input in ("norm2", "act")]
    if not any(m in targets for m in mods):
        return none
    la = la or layer_activations(spec, cfg)
    w = 4 if p.quantized else p.compute  # MLP intermediates (bnb returns the input dtype)
    w_res = w  # a LoRA module's base output
    wl = 2 if p.autocast else p.adapter  # lora_B output and its scaled copy
    wa = w_res if p.quantized else max(w_res, wl)  # the sum (bnb converts the adapter output first)
    widths = {"norm2": 4 if p.quantized else p.residual, "act": w}
    dropout = cfg.lora_dropout > 0
    saved = {m: 0 for m in mods}
    saved.update((m, b) for m, b in la.adapter_saved if m in saved)  # what each module's adapter saves
    # the MLP's own saved outputs, created by each module in turn
    fused = mods[0].name == "gate_up_proj"
    outs = {m: (3 * w * i if fused else 2 * w * i) if m.input == "norm2" and (fused or m.name == "gate_proj")
            else (w * i if m.input == "norm2" else 0) for m in mods}
    moments: list[tuple[int, int]] = []
    cb = dtype_bytes(cfg.bnb_4bit_compute_dtype)
    recomputed = [m for m in mods if m.input != "act" or m in targets]  # the recompute stops before a frozen down
    # alive in the frames whether saved or not: the residual after attention (unless the second norm's fp32
    # upcast is that tensor itself), the MLP's input, the product entering down_proj
    frame = (p.residual * h if p.residual != 4 else 0) + (0 if "norm2" in la.saved_inputs else widths["norm2"] * h)
    product_live = 0 if "act" in la.saved_inputs else w * i
    later = sum(saved.values()) + sum(outs.values())  # MLP items not saved yet at the first module
    for m in mods:
        o, n = m.out_features, m.in_features
        later -= saved[m] + outs[m]
        here = frame + (product_live if m.input == "act" else 0)
        if p.quantized and m in recomputed:
            # bnb Linear4bit's forward on CUDA: the input cast to the compute dtype, the dequantised weight (and
            # with double quantisation the fp32 absmax, dequantised and offset), the output in the compute dtype
            absmax = 2 * _blk(4 * -(-o * n // 64)) if cfg.bnb_4bit_use_double_quant else 0
            moments.append((-(later + saved[m] + outs[m]) + here + (cb * n if widths[m.input] != cb else 0) + cb * o,
                            _blk(cb * o * n) + absmax))
        if m not in targets:
            continue
        # peft's fp32 copy of the input lives through the adapter's forward; it is saved only without dropout
        # and autocast (then it is part of saved[m]); under autocast the fp32 dropout output is a transient
        x_copy = 4 * n if widths[m.input] != 4 and (dropout or p.autocast) else 0
        if m.input == "act":
            # the recompute stops once the last saved tensor exists: down_proj's lora_A output (lora_B's input)
            drop = 4 * n if dropout and p.autocast else 0
            moments.append((-later + here + x_copy + drop + w_res * o, 0))
            continue
        at_scale = w_res * o + 2 * wl * o
        at_sum = w_res * o + wl * o + wa * o
        # saved so far: everything but the items of later modules and this module's outputs
        moments.append((-(later + outs[m]) + here + x_copy + max(at_scale, at_sum), 0))
    # Under checkpointing the layer is recomputed when the first backward node with saved tensors runs.  With an
    # adapted down_proj that is its lora_B: the gradient of the adapter path exists by then (the scaled copy's
    # gradient, and with a sum in another dtype the base output's gradient cast back).  Without
    # it, bnb's frozen down_proj saves nothing and the MLP product's gradient [T, i] exists first.
    down = next((m for m in mods if m.input == "act"), None)
    if down in targets:
        trigger = h * (wl + (w_res if wa != w_res else 0))
    else:
        trigger = w * i if p.quantized else 0
    return MlpMoments(moments=tuple(moments), recompute_trigger=trigger)
