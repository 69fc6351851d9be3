"""Parameter counts: total, per module, trainable under LoRA (peft's rules), and quantised under bnb 4-bit.

All counts are exact integers derived from the architecture fields, following the HF modelling code of
transformers 5.x (``modeling_llama.py`` and siblings) and peft 0.21 (``tuners/lora/layer.py``,
``tuners/tuners_utils.py: _maybe_include_all_linear_layers``).  References: memory-accounting.md sections 1.1-1.4.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .finetune import FinetuneConfig
from .models import ModelSpec

#: peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` for the supported model types (peft 0.21
#: ``utils/constants.py``).  phi3 has no entry: peft then requires explicit target_modules.
PEFT_DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
}


@dataclass(frozen=True)
class LinearModule:
    """One ``nn.Linear`` (or GPT-2 ``Conv1D``) per decoder layer, named as peft matches it (last name part).

    ``group`` is the module's parent inside the layer ("self_attn", "mlp", "attn") and ``input`` names the
    tensor it reads, which tells which modules share an input (q/k/v read the same norm output).
    """

    name: str
    in_features: int
    out_features: int
    bias: bool
    group: str
    input: str

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


def layer_linears(spec: ModelSpec) -> tuple[LinearModule, ...]:
    """The Linear modules of one decoder layer, in forward order (experts of MoE models excluded)."""
    h, i, hq, hkv = spec.hidden_size, spec.intermediate_size, spec.q_dim, spec.kv_dim
    t = spec.model_type
    if t == "gpt2":
        return (
            LinearModule("c_attn", h, 3 * h, True, "attn", "ln_1"),
            LinearModule("c_proj", h, h, True, "attn", "attn_out"),
            LinearModule("c_fc", h, i, True, "mlp", "ln_2"),
            LinearModule("c_proj", i, h, True, "mlp", "act"),
        )
    if t == "phi3":
        return (
            LinearModule("qkv_proj", h, hq + 2 * hkv, False, "self_attn", "norm1"),
            LinearModule("o_proj", hq, h, False, "self_attn", "attn_out"),
            LinearModule("gate_up_proj", h, 2 * i, False, "mlp", "norm2"),
            LinearModule("down_proj", i, h, False, "mlp", "act"),
        )
    qkv_bias = spec.qkv_bias
    o_bias = spec.attention_bias
    attn = (
        LinearModule("q_proj", h, hq, qkv_bias, "self_attn", "norm1"),
        LinearModule("k_proj", h, hkv, qkv_bias, "self_attn", "norm1"),
        LinearModule("v_proj", h, hkv, qkv_bias, "self_attn", "norm1"),
        LinearModule("o_proj", hq, h, o_bias, "self_attn", "attn_out"),
    )
    if spec.is_moe:
        return attn
    mb = spec.mlp_bias
    return attn + (
        LinearModule("gate_proj", h, i, mb, "mlp", "norm2"),
        LinearModule("up_proj", h, i, mb, "mlp", "norm2"),
        LinearModule("down_proj", i, h, mb, "mlp", "act"),
    )


def norms_per_layer(spec: ModelSpec) -> int:
    """Number of norm modules per decoder layer (Gemma-2 has four: pre/post attention and feed-forward)."""
    return 4 if spec.model_type == "gemma2" else 2


def norm_params(spec: ModelSpec) -> int:
    """Parameters of one norm: RMSNorm has a weight of size h; GPT-2's LayerNorm a weight and a bias."""
    return 2 * spec.hidden_size if spec.model_type == "gpt2" else spec.hidden_size


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of a model (and of the LoRA adapters of a training setup).

    ``quantized`` is the number of weights stored in bnb ``Linear4bit`` under QLoRA (Linear weights of the decoder
    layers; biases, norms, embeddings, lm_head and MoE experts/router stay unquantised).
    """

    embedding: int
    position_embedding: int
    lm_head: int
    per_layer_linear_weights: int
    per_layer_linear_biases: int
    per_layer_norms: int
    per_layer_moe: int
    final_norm: int
    num_layers: int
    lora: int = 0
    adapted_modules: int = 0

    @property
    def per_layer(self) -> int:
        return self.per_layer_linear_weights + self.per_layer_linear_biases + self.per_layer_norms + self.per_layer_moe

    @property
    def total(self) -> int:
        """All base-model parameters (tied embeddings counted once), adapters excluded."""
        return (self.embedding + self.position_embedding + self.lm_head + self.final_norm
                + self.num_layers * self.per_layer)

    @property
    def quantized(self) -> int:
        return self.num_layers * self.per_layer_linear_weights

    @property
    def not_quantized(self) -> int:
        return self.total - self.quantized


def count_params(spec: ModelSpec) -> ParamCounts:
    """Exact base-model parameter counts, as ``sum(p.numel() for p in model.parameters())`` of the HF class."""
    h, V = spec.hidden_size, spec.vocab_size
    linears = layer_linears(spec)
    moe = 0
    if spec.is_moe:
        E, i = spec.num_local_experts, spec.intermediate_size
        moe = E * 3 * h * i + E * h  # experts gate_up [E,2i,h] + down [E,h,i], router weight [E,h]
    return ParamCounts(
        embedding=V * h,
        position_embedding=spec.max_position_embeddings * h if spec.model_type == "gpt2" else 0,
        lm_head=0 if spec.tie_word_embeddings else V * h,
        per_layer_linear_weights=sum(m.in_features * m.out_features for m in linears),
        per_layer_linear_biases=sum(m.out_features for m in linears if m.bias),
        per_layer_norms=norms_per_layer(spec) * norm_params(spec),
        per_layer_moe=moe,
        final_norm=norm_params(spec),
        num_layers=spec.num_hidden_layers,
    )


def resolve_targets(spec: ModelSpec, target_modules) -> tuple[LinearModule, ...]:
    """The per-layer modules peft adapts for ``target_modules`` (tuple of names, "all-linear" or None).

    Matching follows peft: a name matches a module whose full name equals it or ends with ".name".  "all-linear"
    takes every nn.Linear/Conv1D except the output embedding (lm_head).  Raises ConfigError when a requested name
    matches nothing, like peft's "Target modules ... not found in the base model".
    """
    linears = layer_linears(spec)
    if target_modules == "all-linear":
        return linears
    if target_modules is None:
        if spec.model_type == "mixtral":
            raise ConfigError("peft 0.21 finds no default target_modules in a transformers 5 Mixtral "
                              "(NoMatchingPeftModuleError): pass --target-modules, e.g. q_proj,v_proj or all-linear")
        if spec.model_type not in PEFT_DEFAULT_TARGETS:
            raise ConfigError(f"peft has no default target_modules for model_type {spec.model_type!r}: pass "
                              f"--target-modules (e.g. {','.join(m.name for m in linears)} or all-linear)")
        target_modules = PEFT_DEFAULT_TARGETS[spec.model_type]
    chosen = []
    missing = []
    for name in target_modules:
        key = name.split(".")[-1]
        group = name.split(".")[-2] if "." in name else None
        hits = [m for m in linears if m.name == key and (group is None or m.group == group)]
        if not hits:
            missing.append(name)
        for m in hits:
            if m not in chosen:
                chosen.append(m)
    if missing:
        raise ConfigError(f"target module(s) {', '.join(missing)} not found in {spec.name}; its Linear modules are "
                          f"{', '.join(dict.fromkeys(m.name for m in linears))}")
    return tuple(m for m in linears if m in chosen)


@dataclass(frozen=True)
class Adapter:
    """The LoRA weights peft adds to one module of a layer: lora_A and lora_B element counts."""

    name: str
    a_numel: int
    b_numel: int


def layer_adapters(spec: ModelSpec, cfg: FinetuneConfig) -> tuple[Adapter, ...]:
    """The LoRA adapters of one decoder layer (peft 0.21).

    Per adapted Linear: lora_A [r, in] and lora_B [out, r], no bias.  For Mixtral under "all-linear", peft 0.21
    also adapts the router (lora_A [r, h], lora_B [E, r]) and the 3-D experts through its parameter wrapper
    (gate_up_proj: lora_A [2rE, h], lora_B [2i, 2rE]; down_proj: lora_A [rE, i], lora_B [h, rE]) - as counted
    on the real peft + transformers 5 classes.  Raises ConfigError when the rank exceeds a targeted Linear's
    smaller dimension.
    """
    if not cfg.is_lora:
        return ()
    targets = resolve_targets(spec, cfg.target_modules)
    r = cfg.lora_rank
    for m in targets:
        if r > min(m.in_features, m.out_features):
            raise ConfigError(f"--lora-rank {r} is larger than {m.name}'s smaller dimension "
                              f"({min(m.in_features, m.out_features)}); a rank above that cannot add capacity")
    out = [Adapter(m.name, r * m.in_features, r * m.out_features) for m in targets]
    if spec.is_moe and cfg.target_modules == "all-linear":
        E, h, i = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
        out += [Adapter("gate", r * h, E * r), Adapter("experts.gate_up_proj", 2 * r * E * h, 2 * i * 2 * r * E),
                Adapter("experts.down_proj", r * E * i, h * r * E)]
    return tuple(out)


def lora_params(spec: ModelSpec, cfg: FinetuneConfig) -> tuple[int, int]:
    """(trainable LoRA parameters, number of adapted modules) for a LoRA/QLoRA setup; (0, 0) for full."""
    adapters = layer_adapters(spec, cfg)
    per_layer = sum(a.a_numel + a.b_numel for a in adapters)
    return per_layer * spec.num_hidden_layers, len(adapters) * spec.num_hidden_layers


def trainable_params(spec: ModelSpec, cfg: FinetuneConfig) -> int:
    """Parameters with requires_grad: all of them for full fine-tuning, the LoRA adapters otherwise."""
    if cfg.method == "full":
        return count_params(spec).total
    return lora_params(spec, cfg)[0]
