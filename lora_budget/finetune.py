"""The training setup of one fine-tuning step: method, batch shape, LoRA, quantisation, precision, optimizer.

Option names follow their HF ``TrainingArguments`` / peft ``LoraConfig`` / ``BitsAndBytesConfig`` counterparts.
``make_config`` fills every option the caller left unset with the method's default and records each default it
applied in ``FinetuneConfig.assumptions`` so that outputs can show them.

Defaults follow the current HF stack (transformers 5, peft >= 0.12, bitsandbytes >= 0.44, torch 2.x):
- all methods: load dtype bfloat16 (transformers 5 ``dtype="auto"``), SDPA attention, no padding, batch 1 x 512
  tokens (lora_budget's own default shape), gradient accumulation 1;
- full: ``adamw_torch_fused`` (Trainer default on torch >= 2.8), no mixed precision (pure bf16), no checkpointing;
- lora: peft ``LoraConfig`` defaults: r=8, lora_alpha=8, lora_dropout=0.0, target_modules = peft's per-model
  default (q_proj, v_proj); ``adamw_torch_fused``; no autocast; no checkpointing;
- qlora: the QLoRA paper's recipe (artidoro/qlora ``finetune_guanaco_65b.sh``): NF4 with double quantisation,
  bf16 compute, r=64, lora_alpha=16, lora_dropout=0.05 on all linear layers, ``paged_adamw_32bit``, gradient
  checkpointing, Trainer ``bf16=True`` (autocast), batch 1 x 512 tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .errors import ConfigError
from .units import normalise_dtype

METHODS = ("full", "lora", "qlora")
#: HF ``TrainingArguments.optim`` names understood.  ``adamw_torch`` is torch AdamW with its own implementation
#: choice (foreach on CUDA); ``adamw_8bit`` and ``adamw_bnb_8bit`` are the same bnb AdamW8bit.
OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit",
          "paged_adamw_8bit", "sgd")
MIXED_PRECISION = ("no", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
QUANT_TYPES = ("nf4", "fp4")

#: Per-method defaults for every option that the caller may leave unset.
METHOD_DEFAULTS: dict[str, dict] = {
    "full": dict(lora_rank=0, lora_alpha=0, lora_dropout=0.0, target_modules=(), optim="adamw_torch_fused",
                 mixed_precision="no", gradient_checkpointing=False),
    "lora": dict(lora_rank=8, lora_alpha=8, lora_dropout=0.0, target_modules=None, optim="adamw_torch_fused",
                 mixed_precision="no", gradient_checkpointing=False),
    "qlora": dict(lora_rank=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                  optim="paged_adamw_32bit", mixed_precision="bf16", gradient_checkpointing=True),
}
COMMON_DEFAULTS = dict(batch_size=1, seq_len=512, gradient_accumulation_steps=1, dtype="bfloat16",
                       attn_implementation="sdpa", padding=False, bnb_4bit_quant_type="nf4",
                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")

#: Where each default comes from (shown with the assumption).
DEFAULT_REASONS = {
    "batch_size": "lora_budget default micro-batch",
    "seq_len": "lora_budget default sequence length",
    "gradient_accumulation_steps": "TrainingArguments default",
    "dtype": "lora_budget default: from_pretrained(dtype=torch.bfloat16); transformers 5's dtype='auto' would "
             "load the checkpoint's own dtype",
    "attn_implementation": "transformers default attention",
    "padding": "batches without padding tokens (packed or equal length)",
    "bnb_4bit_quant_type": "QLoRA paper (NormalFloat4)",
    "bnb_4bit_use_double_quant": "QLoRA paper (double quantisation)",
    "bnb_4bit_compute_dtype": "QLoRA paper (bf16 compute)",
    "lora_rank": "peft LoraConfig default r" ,
    "lora_alpha": "peft LoraConfig default lora_alpha",
    "lora_dropout": "peft LoraConfig default lora_dropout",
    "target_modules": "peft default targets for this model type",
    "optim": "transformers 5 Trainer default optim",
    "mixed_precision": "Trainer default (no autocast)",
    "gradient_checkpointing": "Trainer default",
}
QLORA_PAPER = "QLoRA paper recipe (artidoro/qlora finetune_guanaco_65b.sh)"


@dataclass(frozen=True)
class FinetuneConfig:
    """One training setup.  Sizes are per device: ``batch_size`` is the micro-batch (per_device_train_batch_size).

    ``target_modules`` is a tuple of peft module names, the string "all-linear", or None for peft's default
    targets of the model type.  ``padding`` means batches padded to ``seq_len`` with an attention mask holding
    zeros (changes the attention kernel's saved tensors).
    """

    method: str = "lora"
    batch_size: int = 1
    seq_len: int = 512
    gradient_accumulation_steps: int = 1
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    dtype: str = "bfloat16"
    mixed_precision: str = "no"
    optim: str = "adamw_torch_fused"
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    padding: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"
    assumptions: tuple[str, ...] = field(default=(), compare=False)

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch, T = batch_size * seq_len."""
        return self.batch_size * self.seq_len

    @property
    def is_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    def options(self) -> dict:
        """The options as a JSON-able dict (no assumptions)."""
        d = asdict(self)
        d.pop("assumptions")
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    def with_(self, **changes) -> "FinetuneConfig":
        cfg = replace(self, **changes)
        validate(cfg)
        return cfg


def _coerce_targets(value):
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("all-linear", "all_linear"):
            return "all-linear"
        parts = tuple(p.strip() for p in value.split(",") if p.strip())
        return parts or None
    return tuple(value)


def make_config(method: str = "lora", **options) -> FinetuneConfig:
    """Build a validated FinetuneConfig; options left out (or None) take the method's defaults.

    Raises ConfigError for an unknown option, a bad value, or a contradictory combination.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: use full, lora or qlora")
    known = {f for f in FinetuneConfig.__dataclass_fields__ if f not in ("method", "assumptions")}
    unknown = set(options) - known
    if unknown:
        raise ConfigError(f"unknown option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in options.items() if v is not None}
    if method == "full":
        for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            if k in given:
                raise ConfigError(f"--{k.replace('_', '-')} applies to QLoRA only, not to --method full")
        for k in ("lora_rank", "lora_alpha", "lora_dropout", "target_modules"):
            if k in given:
                raise ConfigError(f"--{k.replace('_', '-')} applies to LoRA/QLoRA only, not to --method full")
    if method == "lora":
        for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
            if k in given:
                raise ConfigError(f"--{k.replace('_', '-')} applies to --method qlora only")
    values: dict = {}
    assumptions: list[str] = []
    defaults = {**COMMON_DEFAULTS, **METHOD_DEFAULTS[method]}
    for key, default in defaults.items():
        if key in given:
            values[key] = given[key]
        else:
            values[key] = default
            if method == "full" and key.startswith(("lora", "target", "bnb")):
                continue
            if method == "lora" and key.startswith("bnb"):
                continue
            shown = "peft default for the model type" if key == "target_modules" and default is None else default
            reason = QLORA_PAPER if method == "qlora" and key in METHOD_DEFAULTS["qlora"] else DEFAULT_REASONS[key]
            assumptions.append(f"{key}={shown} ({reason})")
    values["target_modules"] = _coerce_targets(values["target_modules"])
    for key in ("dtype", "bnb_4bit_compute_dtype"):
        values[key] = normalise_dtype(values[key])
    cfg = FinetuneConfig(method=method, assumptions=tuple(assumptions), **values)
    validate(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    """Raise ConfigError when a value is out of range or options contradict each other."""
    for key in ("batch_size", "seq_len", "gradient_accumulation_steps"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}: use full, lora or qlora")
    if cfg.is_lora:
        if isinstance(cfg.lora_rank, bool) or not isinstance(cfg.lora_rank, int) or cfg.lora_rank <= 0:
            raise ConfigError(f"--lora-rank must be a positive integer, got {cfg.lora_rank!r}")
        if not isinstance(cfg.lora_alpha, (int, float)) or cfg.lora_alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {cfg.lora_alpha!r}")
        if not (0.0 <= float(cfg.lora_dropout) < 1.0):
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout!r}")
    if cfg.optim not in OPTIMS:
        raise ConfigError(f"unknown --optim {cfg.optim!r}; use one of: {', '.join(OPTIMS)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"unknown --mixed-precision {cfg.mixed_precision!r}; use no, bf16 or fp16")
    if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"unknown --attn-implementation {cfg.attn_implementation!r}; "
                          f"use {', '.join(ATTN_IMPLEMENTATIONS)}")
    if cfg.bnb_4bit_quant_type not in QUANT_TYPES:
        raise ConfigError(f"unknown --bnb-4bit-quant-type {cfg.bnb_4bit_quant_type!r}; use nf4 or fp4")
    if cfg.mixed_precision == "fp16" and cfg.method == "full" and cfg.dtype != "float32":
        raise ConfigError("--mixed-precision fp16 needs fp32 master weights for full fine-tuning "
                          "(GradScaler refuses fp16 gradients): add --dtype float32")
