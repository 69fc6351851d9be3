"""Model architecture specs, named with HF ``config.json`` fields, and how to get one.

A ``ModelSpec`` is built from the built-in offline catalog (``model_catalog.py``) or from a local ``config.json``
(file, or a folder holding one).  Nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError, UnknownModelError

#: model_type values the estimator understands, with the HF class name of the causal-LM head.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

#: GPT-2 style configs use other field names; HF maps them with ``attribute_map``.
_GPT2_FIELDS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                "n_inner": "intermediate_size", "n_positions": "max_position_embeddings"}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only LM architecture.  Field names are those of HF ``config.json``.

    ``head_dim`` is None when the config leaves it to the default ``hidden_size // num_attention_heads``.
    ``num_local_experts`` / ``num_experts_per_tok`` are 0 for dense models.  ``extra_config`` carries further
    config.json fields that change the HF model (e.g. Gemma-2's soft-capping) as sorted (key, value) pairs.
    """

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    dtype: str = "bfloat16"
    hf_id: str = ""
    source: str = ""
    aliases: tuple[str, ...] = ()
    extra_config: tuple[tuple[str, object], ...] = field(default=())

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        """Per-head dimension d (config ``head_dim``, default hidden_size // num_attention_heads)."""
        return self.head_dim if self.head_dim else self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        """h_q = num_attention_heads * head_dim (differs from hidden_size for Gemma-7B)."""
        return self.num_attention_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        """h_kv = num_key_value_heads * head_dim (smaller than q_dim under GQA)."""
        return self.num_key_value_heads * self.d_head

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    @property
    def qkv_bias(self) -> bool:
        """Qwen2 hard-codes bias=True on q/k/v; GPT-2 has biases everywhere; Llama-style uses attention_bias."""
        return self.model_type in ("qwen2", "gpt2") or self.attention_bias

    def extra(self, key: str, default=None):
        """A further config.json field carried in ``extra_config``."""
        return dict(self.extra_config).get(key, default)

    def to_hf_config(self) -> dict:
        """The config.json dict that the HF model class for this spec is built from (no weights, no hub)."""
        cfg = {
            "model_type": self.model_type,
            "architectures": [SUPPORTED_MODEL_TYPES[self.model_type]],
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "dtype": self.dtype,
        }
        if self.model_type == "gpt2":
            cfg.update(n_embd=self.hidden_size, n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                       n_inner=self.intermediate_size, n_positions=self.max_position_embeddings)
        else:
            cfg.update(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                       num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                       num_key_value_heads=self.num_key_value_heads)
            if self.head_dim:
                cfg["head_dim"] = self.head_dim
            if self.model_type in ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3"):
                if self.model_type not in ("qwen2", "phi3"):
                    cfg["attention_bias"] = self.attention_bias
                if self.model_type == "llama":
                    cfg["mlp_bias"] = self.mlp_bias
            if self.is_moe:
                cfg["num_local_experts"] = self.num_local_experts
                cfg["num_experts_per_tok"] = self.num_experts_per_tok
        if self.model_type == "phi3":
            # Phi3Config's default pad_token_id (32000) must be inside the vocabulary of small test variants
            cfg["pad_token_id"] = None
        cfg.update(dict(self.extra_config))
        return cfg

    def with_(self, **changes) -> "ModelSpec":
        """A copy with some fields changed (used for tiny test variants)."""
        return replace(self, **changes)


def _require(cfg: dict, key: str, where: str, kind=int):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: missing field {key!r}")
    value = cfg[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    return value


def from_hf_config(cfg: dict, name: str = "", source: str = "") -> ModelSpec:
    """Build a ModelSpec from a config.json dict.  Raises ConfigError naming the field at fault."""
    where = f"config {name or '(dict)'}"
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    model_type = cfg.get("model_type")
    if not model_type:
        raise ConfigError(f"{where}: missing field 'model_type'")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: unsupported model_type {model_type!r}; supported: "
                          + ", ".join(sorted(SUPPORTED_MODEL_TYPES)))
    cfg = dict(cfg)
    if model_type == "gpt2":
        for old, new in _GPT2_FIELDS.items():
            if old in cfg and new not in cfg:
                cfg[new] = cfg[old]
        if cfg.get("intermediate_size") is None:
            cfg["intermediate_size"] = 4 * _require(cfg, "hidden_size", where)
        cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
        cfg.setdefault("tie_word_embeddings", True)
        cfg.setdefault("max_position_embeddings", 1024)
    h = _require(cfg, "hidden_size", where)
    i = _require(cfg, "intermediate_size", where)
    L = _require(cfg, "num_hidden_layers", where)
    n_h = _require(cfg, "num_attention_heads", where)
    V = _require(cfg, "vocab_size", where)
    n_kv = cfg.get("num_key_value_heads") or n_h
    if isinstance(n_kv, bool) or not isinstance(n_kv, int) or n_kv <= 0:
        raise ConfigError(f"{where}: field 'num_key_value_heads' must be a positive integer, got {n_kv!r}")
    if n_h % n_kv:
        raise ConfigError(f"{where}: field 'num_key_value_heads' ({n_kv}) must divide num_attention_heads ({n_h})")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0):
        raise ConfigError(f"{where}: field 'head_dim' must be a positive integer, got {head_dim!r}")
    if head_dim is None and h % n_h:
        raise ConfigError(f"{where}: field 'hidden_size' ({h}) is not divisible by num_attention_heads ({n_h})")
    defaults_tied = model_type in ("gemma", "gemma2", "gpt2")
    tie = cfg.get("tie_word_embeddings", defaults_tied)
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    experts = 0
    top_k = 0
    if model_type == "mixtral":
        experts = _require(cfg, "num_local_experts", where)
        top_k = _require(cfg, "num_experts_per_tok", where)
        if top_k > experts:
            raise ConfigError(f"{where}: field 'num_experts_per_tok' ({top_k}) exceeds num_local_experts ({experts})")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    extra_keys = ("query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping", "sliding_window",
                  "resid_pdrop", "embd_pdrop", "attention_dropout", "attn_pdrop")
    extra = tuple(sorted((k, cfg[k]) for k in extra_keys if k in cfg and k != "sliding_window"
                         and model_type in ("gemma2", "phi3", "gpt2", "llama", "mistral", "qwen2")))
    return ModelSpec(
        name=name or cfg.get("_name_or_path", "") or model_type,
        model_type=model_type,
        hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=n_h,
        num_key_value_heads=n_kv, vocab_size=V, head_dim=head_dim,
        tie_word_embeddings=tie,
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        num_local_experts=experts, num_experts_per_tok=top_k,
        dtype=str(dtype).replace("torch.", ""),
        hf_id=cfg.get("_name_or_path", "") or "",
        source=source,
        extra_config=extra,
    )


def load_config_json(path: str | os.PathLike) -> ModelSpec:
    """Read a local config.json (or a folder that holds one) into a ModelSpec."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UnknownModelError(f"no config.json at {path}")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {p}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    return from_hf_config(cfg, name=str(path), source=f"local file {p}")


def _normal(name: str) -> str:
    return name.strip().lower()


def _index() -> dict[str, ModelSpec]:
    from .model_catalog import MODELS

    idx: dict[str, ModelSpec] = {}
    for spec in MODELS:
        for key in (spec.name, spec.hf_id, *spec.aliases):
            if key:
                idx[_normal(key)] = spec
    return idx


def list_models() -> list[ModelSpec]:
    """Every catalog model, in catalog order."""
    from .model_catalog import MODELS

    return list(MODELS)


def get_model(name: str) -> ModelSpec:
    """A catalog model by short name, HF id or alias (case-insensitive), or a local config.json path.

    Unknown names raise UnknownModelError with the closest catalog names.
    """
    if not name or not str(name).strip():
        raise UnknownModelError("empty model name")
    key = _normal(str(name))
    idx = _index()
    if key in idx:
        return idx[key]
    p = Path(name)
    if p.suffix == ".json" or p.is_dir() or os.sep in str(name) and p.exists():
        return load_config_json(p)
    if p.exists():
        return load_config_json(p)
    close = difflib.get_close_matches(key, list(idx), n=4, cutoff=0.5)
    shown = []
    for c in close:
        n = idx[c].name
        if n not in shown:
            shown.append(n)
    hint = f"; did you mean {', '.join(shown)}?" if shown else "; run `lora-budget models` for the list"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def spec_fields() -> list[str]:
    """Names of the ModelSpec fields (for JSON output)."""
    return [f.name for f in fields(ModelSpec)]
