"""Bare sizes as models: "65B", "7b", "1.5B", "8x7B", "500M" -> the catalog model a user most plausibly means, or
a Llama-shaped stand-in with that many parameters.  Standard library only (no torch, no network).

How a size is read (``resolve_size``), in this order:

1. **The usual model of that size** (``PREFERRED``): a size that names a well-known release resolves to the
   catalog model most often fine-tuned under that name, e.g. 7B -> llama-2-7b, 65B -> llama-65b (the QLoRA paper's
   model), 70B -> llama-3.1-70b, 8x7B -> mixtral-8x7b.  Marketed sizes are rounded: "2B" Gemma-2 has 2.61B
   parameters, so this step goes by the label, not the count.
2. **The nearest catalog model** within ``CATALOG_TOLERANCE`` (+-10 %) of the total parameter count, dense models
   only (MoE models are written NxM, e.g. 8x7B).  Ties (same count) go to ``PREFERRED`` models first, then to the
   newer release (later in the catalog): 6.7B -> llama-2-7b rather than llama-7b.
3. **A Llama-shaped stand-in** scaled to the size (``scaled_llama``), when no catalog model is that close.  The
   rule follows the LLaMA-1/2 family (Touvron et al. 2023, the ``params.json`` of the released checkpoints):
   - hidden_size h: interpolated log-log on the count between the catalog shapes llama-7b (4096), llama-13b (5120),
     llama-33b (6656), llama-65b (8192) and llama-3.1-405b (16384), extrapolated with the end slopes; rounded to
     a multiple of head_dim (128; 64 below h = 2048), and of 8 * head_dim under GQA;
   - heads = h / head_dim; multi-head attention below 66B (LLaMA-1 up to 65B), 8 KV heads (GQA) from 66B on
     (Llama-2-70B, Llama-3.1-405B);
   - intermediate_size: Meta's SwiGLU rule ``multiple_of * ceil(f * int(8h/3) / multiple_of)`` with f = 1,
     multiple_of = 256 for MHA (gives 11008, 13824, 17920, 22016 exactly for the LLaMA-1 shapes) and f = 1.3,
     multiple_of = 4096 for GQA (gives Llama-2-70B's 28672);
   - vocab_size 32000, untied embeddings, no biases (Llama-2);
   - num_hidden_layers: the integer that brings the exact count (``params.count_params``) nearest the size; the h
     candidates within +-4 head_dim steps are tried and the nearest-to-rule h whose count lands within
     ``SCALED_TARGET`` (1 %) is kept.  ``SCALED_TOLERANCE`` (3 %) is the worst allowed.
   Stand-ins are built between ``MIN_SIZE`` and ``MAX_SIZE`` parameters.
4. An ``NxM`` size that is not in ``PREFERRED`` (e.g. 4x7B) becomes a Mixtral-layout MoE: the dense model that
   "M" resolves to (when it is Llama/Mistral-shaped; otherwise the stand-in for M), with N experts and top-2
   routing (Mixtral's ``num_experts_per_tok``).  Its total is not N*M (experts share attention and embeddings).

Every resolution comes with a one-line explanation saying which architecture it used and why.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from .errors import UnknownModelError
from .models import ModelSpec

#: A catalog model is used for a size when its total parameters are within this fraction of the size.
#: 10 % covers marketing rounding (Mistral "7B" = 7.24B, Qwen2.5 "7B" = 7.62B) without merging neighbours
#: (13B vs 14B models are 13.0B vs 14.8B).
CATALOG_TOLERANCE = 0.10
#: A Llama-shaped stand-in aims at this relative distance from the requested size...
SCALED_TARGET = 0.01
#: ...and is refused beyond this one (an integer layer count cannot always do better for small sizes).
SCALED_TOLERANCE = 0.03
#: Range of sizes for which stand-ins are built: below 0.1B the 32000-token embeddings dominate the count and the
#: "Llama shape" means little; above 2T there is no family to scale from.
MIN_SIZE = 100_000_000
MAX_SIZE = 2_000_000_000_000
STANDIN_VOCAB = 32000
#: Stand-ins from this size on use grouped-query attention with 8 KV heads: LLaMA-65B (65.3B) is the largest
#: multi-head model, Llama-2-70B (69.0B) and Llama-3.1-405B use GQA.
GQA_FROM = 66 * 10**9

#: The usual catalog model per marketed size label, with why.  Keys are canonical labels (see ``size_label``).
PREFERRED: dict[str, tuple[str, str]] = {
    "0.5B": ("qwen2.5-0.5b", "Qwen2.5-0.5B, the common 0.5B model"),
    "1B": ("llama-3.2-1b", "Llama-3.2-1B, the common 1B model"),
    "1.5B": ("qwen2.5-1.5b", "Qwen2.5-1.5B, the common 1.5B model"),
    "2B": ("gemma-2-2b", "Gemma-2 2B, marketed as 2B (2.61B parameters)"),
    "3B": ("llama-3.2-3b", "Llama-3.2-3B, the common 3B model"),
    "3.8B": ("phi-3-mini", "Phi-3-mini, marketed as 3.8B"),
    "7B": ("llama-2-7b", "Llama-2-7B, the most published 7B fine-tuning target (QLoRA paper, PEFT and "
                         "LLaMA-Factory examples); name mistral-7b or qwen2.5-7b for those"),
    "8B": ("llama-3.1-8b", "Llama-3.1-8B, the common 8B model"),
    "9B": ("gemma-2-9b", "Gemma-2 9B, the common 9B model"),
    "13B": ("llama-2-13b", "Llama-2-13B, the common 13B model"),
    "14B": ("qwen2.5-14b", "Qwen2.5-14B, the common 14B model; name phi-3-medium for Phi-3"),
    "27B": ("gemma-2-27b", "Gemma-2 27B, the common 27B model"),
    "30B": ("llama-33b", "LLaMA-30B/33B (32.5B parameters), the model released as llama-30b"),
    "33B": ("llama-33b", "LLaMA-33B, the QLoRA paper's 33B model"),
    "32B": ("qwen2.5-32b", "Qwen2.5-32B, the common 32B model"),
    "65B": ("llama-65b", "LLaMA-65B, the QLoRA paper's 65B model"),
    "70B": ("llama-3.1-70b", "Llama-3.1-70B (same shape as Llama-3-70B and 3.3-70B), the common 70B model today; "
                             "name llama-2-70b for Llama 2"),
    "72B": ("qwen2.5-72b", "Qwen2.5-72B, the common 72B model"),
    "175B": ("gpt3-175b", "GPT-3 175B, the LoRA paper's model"),
    "405B": ("llama-3.1-405b", "Llama-3.1-405B, the only 405B model"),
    "8x7B": ("mixtral-8x7b", "Mixtral-8x7B"),
    "8x22B": ("mixtral-8x22b", "Mixtral-8x22B"),
}

_UNIT = {"m": 10**6, "million": 10**6, "b": 10**9, "bn": 10**9, "billion": 10**9, "t": 10**12, "trillion": 10**12}
_SIZE_RE = re.compile(r"^\s*(?:(\d+)\s*[x\u00d7]\s*)?(\d+(?:\.\d+)?)\s*(m|million|b|bn|billion|t|trillion)\s*$",
                      re.IGNORECASE)
#: Catalog models whose (parameters, hidden_size) anchor the hidden-size interpolation (module docstring).
_H_ANCHORS = ("llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-3.1-405b")


class SizeResolution(NamedTuple):
    """A bare size resolved to a model: ``spec``, and ``explanation`` (one line: which model and why)."""

    spec: ModelSpec
    explanation: str


def is_bare_size(text: str) -> bool:
    """True for a bare parameter count such as "65B", "7b", "1.5B", "8x7B", "500M" or "70 billion"."""
    return bool(_SIZE_RE.match(str(text)))


def parse_param_size(text: str) -> tuple[int, int]:
    """Read a bare size into (experts, parameters): "65B" -> (0, 65e9), "8x7B" -> (8, 7e9), "500M" -> (0, 5e8).

    Raises:
        UnknownModelError: the text is not a bare size.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UnknownModelError(f"cannot read {text!r} as a model size: write e.g. 7B, 1.5B, 8x7B or 500M")
    experts, number, unit = m.groups()
    n = int(round(float(number) * _UNIT[unit.lower()]))
    if n <= 0:
        raise UnknownModelError(f"model size {text!r} must be positive")
    e = int(experts) if experts else 0
    if experts is not None and e < 2:
        raise UnknownModelError(f"model size {text!r}: a mixture of experts needs at least 2 experts")
    return e, n


def size_label(experts: int, n: int) -> str:
    """Canonical label of a size: (0, 65e9) -> "65B", (0, 5e8) -> "0.5B", (8, 7e9) -> "8x7B"."""
    label = f"{n / 1e9:g}B"
    return f"{experts}x{label}" if experts else label


def _catalog() -> list[ModelSpec]:
    from .models import list_models

    return list_models()


def _total(spec: ModelSpec) -> int:
    from .params import count_params

    return count_params(spec).total


def _preference_key(spec: ModelSpec, catalog: list[ModelSpec]) -> tuple[int, int]:
    preferred = [name for name, _ in PREFERRED.values()]
    rank = preferred.index(spec.name) if spec.name in preferred else len(preferred)
    return rank, -catalog.index(spec)


def nearest_catalog(n: int, tolerance: float = CATALOG_TOLERANCE,
                    candidates: list[ModelSpec] | None = None) -> ModelSpec | None:
    """The dense catalog model whose total parameters are nearest ``n``, if within ``tolerance``; else None.

    Ties go to ``PREFERRED`` models, then to the newer release (later in the catalog).  ``candidates`` restricts
    the search (e.g. to one model family).
    """
    catalog = _catalog()
    pool = [s for s in (candidates if candidates is not None else catalog) if not s.is_moe]
    best = None
    for spec in pool:
        rel = abs(_total(spec) - n) / n
        if rel > tolerance:
            continue
        key = (rel, *_preference_key(spec, catalog))
        if best is None or key < best[0]:
            best = (key, spec)
    return best[1] if best else None


def _interp_hidden(n: int) -> float:
    """The hidden size of the LLaMA family at ``n`` parameters (log-log, piecewise linear, end slopes outside)."""
    by_name = {s.name: s for s in _catalog()}
    pts = sorted((math.log(_total(by_name[a])), math.log(by_name[a].hidden_size)) for a in _H_ANCHORS)
    x = math.log(n)
    seg = 0
    while seg < len(pts) - 2 and x > pts[seg + 1][0]:
        seg += 1
    (x0, y0), (x1, y1) = pts[seg], pts[seg + 1]
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _ffn(h: int, gqa: bool) -> int:
    """Meta's SwiGLU width: multiple_of * ceil(f * int(8h/3) / multiple_of) (LLaMA ``model.py``)."""
    f, multiple_of = (1.3, 4096) if gqa else (1.0, 256)
    hidden = int(f * int(2 * (4 * h) / 3))
    return multiple_of * -(-hidden // multiple_of)


def _shape(h: int, n: int, name: str, source: str) -> ModelSpec | None:
    head_dim = 128 if h >= 2048 else 64
    heads = h // head_dim
    gqa = n >= GQA_FROM
    kv = 8 if gqa else heads
    base = ModelSpec(name=name, model_type="llama", hidden_size=h, intermediate_size=_ffn(h, gqa),
                     num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv,
                     vocab_size=STANDIN_VOCAB, max_position_embeddings=4096, dtype="bfloat16", source=source)
    one = _total(base)
    per_layer = _total(base.with_(num_hidden_layers=2)) - one
    layers = max(1, round((n - (one - per_layer)) / per_layer))
    return base.with_(num_hidden_layers=layers)


def scaled_llama(n: int, name: str | None = None) -> SizeResolution:
    """A Llama-shaped ModelSpec with about ``n`` parameters (rule in the module docstring), and its explanation.

    Raises:
        UnknownModelError: ``n`` outside [MIN_SIZE, MAX_SIZE], or no shape within SCALED_TOLERANCE.
    """
    label = size_label(0, n)
    if not MIN_SIZE <= n <= MAX_SIZE:
        raise UnknownModelError(f"no catalog model near {label} parameters, and lora_budget builds Llama-shaped "
                                f"stand-ins only between {size_label(0, MIN_SIZE)} and {size_label(0, MAX_SIZE)}: "
                                f"give a catalog name or a config.json path")
    name = name or f"llama-shaped-{label.lower()}"
    source = "lora_budget.sizes: Llama-shaped stand-in for a bare size (rule in the lora_budget/sizes.py docstring)"
    target_h = _interp_hidden(n)
    gqa = n >= GQA_FROM
    # h is a multiple of head_dim (128, or 64 below 2048), and of 8 heads under GQA so that 8 KV heads divide them
    step = (128 if target_h >= 2048 - 64 else 64) * (8 if gqa else 1)
    centre = max(step, int(round(target_h / step)) * step)
    options = []
    for k in range(-2, 3) if gqa else range(-4, 5):
        h = centre + k * step
        if h < 64 or h % (128 if h >= 2048 else 64):
            continue
        spec = _shape(h, n, name, source)
        rel = (_total(spec) - n) / n
        options.append((abs(rel) > SCALED_TARGET, abs(h - target_h), abs(rel), spec, rel))
    options.sort(key=lambda o: o[:3])
    _, _, err, spec, rel = options[0]
    if err > SCALED_TOLERANCE:
        raise UnknownModelError(f"cannot build a Llama-shaped model within {SCALED_TOLERANCE:.0%} of {label} "
                                f"parameters: give a catalog name or a config.json path")
    attn = "MHA" if spec.num_key_value_heads == spec.num_attention_heads else \
        f"GQA with {spec.num_key_value_heads} KV heads"
    total = _total(spec)
    why = (f"hidden_size {spec.hidden_size}, {spec.num_hidden_layers} layers, {spec.num_attention_heads} heads "
           f"(head_dim {spec.d_head}, {attn}), intermediate_size {spec.intermediate_size}, vocab {spec.vocab_size} "
           f"-> {total:,} parameters ({rel:+.1%} of {label})")
    return SizeResolution(spec, why)


def resolve_size(text: str) -> SizeResolution:
    """The model a bare size most plausibly means: the usual model of that size, the nearest catalog model within
    CATALOG_TOLERANCE, or a Llama-shaped stand-in (rules in the module docstring).

    Args:
        text: "65B", "7b", "1.5B", "8x7B", "500M", "70 billion".

    Returns:
        SizeResolution(spec, explanation); the explanation is one line starting with the size as written.

    Raises:
        UnknownModelError: not a bare size, or a size no rule can serve.
    """
    experts, n = parse_param_size(text)
    label = size_label(experts, n)
    written = str(text).strip()
    by_name = {s.name: s for s in _catalog()}
    if label in PREFERRED:
        name, reason = PREFERRED[label]
        spec = by_name[name]
        return SizeResolution(spec, f"{written!r} read as {spec.name} ({_total(spec):,} parameters): {reason}")
    if experts:
        dense = resolve_size(size_label(0, n))
        base = dense.spec
        how = f"the shape of {base.name}"
        if base.model_type not in ("llama", "mistral"):
            base = scaled_llama(n).spec
            how = "the Llama-shaped stand-in for " + size_label(0, n)
        top_k = min(2, experts)
        spec = base.with_(name=f"moe-{label.lower()}", model_type="mixtral", num_local_experts=experts,
                          num_experts_per_tok=top_k, hf_id="", aliases=(), attention_bias=False, mlp_bias=False,
                          source=f"lora_budget.sizes: Mixtral-layout stand-in for {label} ({how})")
        return SizeResolution(spec, f"{written!r}: no catalog model is {label}, so a Mixtral-layout model was built "
                                    f"from {how} with {experts} experts, top-{top_k} routing "
                                    f"({_total(spec):,} parameters in all)")
    near = nearest_catalog(n)
    if near is not None:
        total = _total(near)
        return SizeResolution(near, f"{written!r} read as {near.name} ({total:,} parameters, {(total - n) / n:+.1%}): "
                                    f"the catalog model nearest {label}, within the "
                                    f"+-{CATALOG_TOLERANCE:.0%} tolerance")
    scaled = scaled_llama(n)
    return SizeResolution(scaled.spec, f"{written!r}: no catalog model within +-{CATALOG_TOLERANCE:.0%} of {label}, "
                                       f"so a Llama-shaped stand-in {scaled.spec.name} was built: "
                                       f"{scaled.explanation}")


__all__ = ["SizeResolution", "is_bare_size", "parse_param_size", "size_label", "nearest_catalog", "scaled_llama",
           "resolve_size", "PREFERRED", "CATALOG_TOLERANCE", "SCALED_TOLERANCE"]
