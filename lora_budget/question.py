"""Read a plain question such as "can I fit 65B on a 48GB GPU with QLoRA?" into a model, a GPU, methods and
training options.  Standard library only.

What is read (case-insensitive; hyphens, underscores and spaces are interchangeable):

- **model**: a catalog name, HF id or alias ("Llama 2 7B", "mistral-7b", "meta-llama/Llama-3.1-8B"), a bare size
  ("65B", "8x7B", "1.5b", "70 billion"; see ``lora_budget.sizes``), a family plus a size ("llama 70B", "qwen 7b":
  the usual or nearest model of that family within the catalog tolerance), or a path ending in ``.json``;
- **GPU**: a catalog name or alias ("a 4090", "an A100 80GB", "H100", "RTX A6000"), or a capacity with its unit
  ("48GB" = 48e9 B, "24 GiB" = 24 * 2^30 B, read by ``units.parse_size``);
- **method**: "qlora", "4-bit" / "nf4" / "quantized" (QLoRA), "lora", "full fine-tune" / "full-parameter" / "fft";
- **options**: sequence length ("at 4k context", "seq 2048", "2048 tokens"; k = 1024 tokens), micro-batch
  ("batch 4", "batch size 8", "bs=2"), rank ("rank 16", "r=64"), lora alpha, gradient accumulation, gradient
  checkpointing ("with/without gradient checkpointing"), optimizer ("8-bit adam", "paged adamw"), flash attention,
  padding / packing.

What is refused (``UnreadableQuestion``, one line with an example): no model; two models or two GPUs; a model
family that is not in the catalog ("falcon 7b"); an unknown GPU name; a capacity without a unit ("48 GPU");
several GPUs ("2x A100": multi-GPU sharding is not modelled); an 8-bit base model (not modelled).
Nothing is guessed silently: every reading carries the words it came from, and numbers that were not understood
are listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ConfigError, LoraBudgetError
from .gpus import GPUSpec
from .models import ModelSpec
from .units import format_gb, format_gib

#: Shown with every refusal.
EXAMPLE = 'lora-budget ask "can I fit 65B on a 48GB GPU with QLoRA?"'
#: A capacity written next to a GPU name ("A100 80GB") must agree with the catalog memory within this fraction,
#: read either as GB or as GiB (vendors print binary sizes as "GB"; drivers report a little less).
CAPACITY_AGREEMENT = 0.10

#: Model families that are not in the catalog: "falcon 7b" is refused rather than read as the bare size 7B.
UNKNOWN_FAMILIES = frozenset("""
    falcon bloom bloomz opt mpt gptj neox pythia starcoder starcoder2 codellama code deepseek yi olmo vicuna alpaca
    dolly stablelm baichuan internlm chatglm glm nemotron granite smollm tinyllama orca zephyr solar dbrx grok jamba
    command aya openchat wizardlm mamba cerebras xverse exaone minicpm persimmon fuyu t5 flan bert roberta whisper
    deepseekcoder codegemma codeqwen olmoe jetmoe arctic nous hermes openhermes
""".split())
#: Words that may stand before a size without naming a model family.
_NUMBER_WORDS = {"one": 1, "single": 1, "two": 2, "dual": 2, "three": 3, "four": 4, "quad": 4, "five": 5, "six": 6,
                 "eight": 8, "ten": 10, "sixteen": 16}

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:\.[a-z0-9]+)*", re.IGNORECASE)
_NUM_RE = re.compile(r"^\d+(?:\.\d+)?$")
_INT_RE = re.compile(r"^\d+$")
_CAP_RE = re.compile(r"^\d+(?:\.\d+)?(?:gb|gib|mb|mib|tb|tib)$")
_PSIZE_RE = re.compile(r"^(?:\d+x)?\d+(?:\.\d+)?(?:b|bn|billion|m|million|t|trillion)$")
_SEQ_NUM_RE = re.compile(r"^(\d+(?:\.\d+)?)k$")
_GPU_LIKE_RE = re.compile(r"^[a-z]{1,3}\d{2,4}[a-z]{0,3}$")
_CAP_UNITS = {"gb", "gib", "mb", "mib", "tb", "tib"}
_PSIZE_UNITS = {"b", "bn", "billion", "m", "million", "t", "trillion"}

#: Cue words before a number, and what the number then is.
_BEFORE = {"seq": "seq_len", "sequence": "seq_len", "seqlen": "seq_len", "context": "seq_len", "ctx": "seq_len",
           "length": "seq_len", "len": "seq_len", "cutoff": "seq_len",
           "batch": "batch_size", "bs": "batch_size", "mbs": "batch_size", "microbatch": "batch_size",
           "rank": "lora_rank", "r": "lora_rank", "alpha": "lora_alpha",
           "accumulation": "gradient_accumulation_steps", "accum": "gradient_accumulation_steps",
           "ga": "gradient_accumulation_steps", "gas": "gradient_accumulation_steps"}
#: Cue words after a number.
_AFTER = {"tokens": "seq_len", "token": "seq_len", "toks": "seq_len", "context": "seq_len", "ctx": "seq_len",
          "seq": "seq_len", "sequence": "seq_len", "seqlen": "seq_len"}
#: Words skipped between a cue and its number ("batch size of 8", "sequence length = 2048").
_SKIP = {"of", "a", "an", "the", "is", "to", "at", "size", "sizes", "steps", "step", "per", "device", "train",
         "max", "maximum", "micro", "window", "lora", "with", "set"}
_CUE_PREFIX = {"max", "maximum", "micro", "lora", "gradient", "grad", "per", "device", "train"}
_NEGATIONS = {"no", "without", "not", "disable", "disabled", "off", "w/o", "non"}
_DETERMINERS = {"my", "this", "the", "a", "an", "one", "single", "our", "your", "local", "that"}


class UnreadableQuestion(ConfigError):
    """A question lora_budget cannot read without guessing."""


@dataclass(frozen=True)
class Reading:
    """One thing read from the question: ``what`` (model, gpu, method, or a FinetuneConfig option), its
    ``value``, the ``words`` of the question it came from, and a ``note`` saying how it was read."""

    what: str
    value: object
    words: str
    note: str = ""

    def line(self) -> str:
        src = f" (from {self.words!r})" if self.words else ""
        note = f": {self.note}" if self.note else ""
        value = {True: "on", False: "off"}.get(self.value, self.value) if isinstance(self.value, bool) else self.value
        return f"{self.what} {value}{src}{note}"


@dataclass(frozen=True)
class Question:
    """A parsed question.  ``gpu`` is None when the question names none (then the caller may detect one).
    ``methods`` is () when the question names no method.  ``options`` holds FinetuneConfig option names."""

    text: str
    model: ModelSpec
    gpu: GPUSpec | None
    methods: tuple[str, ...]
    options: dict = field(default_factory=dict)
    readings: tuple[Reading, ...] = ()
    not_understood: tuple[str, ...] = ()

    def reading(self, what: str) -> Reading | None:
        for r in self.readings:
            if r.what == what:
                return r
        return None


@dataclass
class _Tok:
    text: str
    start: int
    end: int
    used: str = ""


def _refuse(message: str) -> UnreadableQuestion:
    return UnreadableQuestion(f"{message}; ask e.g. {EXAMPLE}")


# ---------------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------------
def tokenize(text: str) -> list[_Tok]:
    """Lowercase word tokens with their spans, merged where one thing is written in two words ("48 GB" -> "48gb",
    "8 x 7B" -> "8x7b", "4 bit" -> "4bit", "q lora" -> "qlora", "fine tune" -> "finetune", "flash attention")."""
    text = text.replace("\u00d7", "x")
    toks = [_Tok(m.group(0).lower(), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]

    def merge(pred, join):
        out: list[_Tok] = []
        i = 0
        while i < len(toks):
            n = pred(toks, i)
            if n:
                out.append(_Tok(join(toks[i:i + n]), toks[i].start, toks[i + n - 1].end))
                i += n
            else:
                out.append(toks[i])
                i += 1
        toks[:] = out

    def nxt(t, i, k=1):
        return t[i + k].text if i + k < len(t) else ""

    concat = lambda ts: "".join(t.text for t in ts)  # noqa: E731
    merge(lambda t, i: 2 if _NUM_RE.match(t[i].text) and nxt(t, i) in _CAP_UNITS | _PSIZE_UNITS | {"k", "bit"}
          else 0, concat)
    merge(lambda t, i: 3 if _INT_RE.match(t[i].text) and nxt(t, i) == "x" and _PSIZE_RE.match(nxt(t, i, 2))
          else 0, concat)
    merge(lambda t, i: 2 if t[i].text == "q" and nxt(t, i) == "lora" else 0, concat)
    merge(lambda t, i: 2 if t[i].text == "fine" and nxt(t, i) in ("tune", "tuning", "tuned", "tunes") else 0,
          lambda ts: "finetune")
    merge(lambda t, i: 2 if t[i].text == "w" and nxt(t, i) == "o" else 0, lambda ts: "without")
    merge(lambda t, i: (3 if nxt(t, i, 2) == "2" else 2) if t[i].text == "flash" and nxt(t, i) in (
        "attention", "attn") else (1 if t[i].text in ("flashattention", "flashattn", "flash", "fa2") else 0),
        lambda ts: "flashattention")
    merge(lambda t, i: 2 if t[i].text in ("gradient", "grad", "activation", "activations") and nxt(t, i) in (
        "checkpointing", "checkpoint", "ckpt") else 0, lambda ts: "checkpointing")
    for t in toks:
        if t.text in ("finetuning", "finetuned", "finetunes", "tune", "tuning"):
            t.text = "finetune"
    return toks


def _key_tokens(key: str) -> tuple[str, ...]:
    return tuple(t.text for t in tokenize(key))


def _find(toks: list[_Tok], keys: dict[tuple[str, ...], object]) -> list[tuple[int, int, object]]:
    """Longest-first, non-overlapping matches of token sequences among unused tokens: (start, length, value)."""
    lengths = sorted({len(k) for k in keys}, reverse=True)
    found = []
    taken: set[int] = set()
    for n in lengths:
        for i in range(len(toks) - n + 1):
            span = range(i, i + n)
            if any(j in taken or toks[j].used for j in span):
                continue
            key = tuple(toks[j].text for j in span)
            if key in keys:
                found.append((i, n, keys[key]))
                taken.update(span)
    found.sort()
    return found


def _words(text: str, toks: list[_Tok], i: int, n: int = 1) -> str:
    return text[toks[i].start:toks[i + n - 1].end]


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def _model_keys() -> dict[tuple[str, ...], ModelSpec]:
    from .models import list_models

    keys: dict[tuple[str, ...], ModelSpec] = {}
    for spec in list_models():
        names = (spec.name, spec.hf_id, *spec.aliases)
        for k in names + tuple(n.split("/")[-1] for n in names if "/" in n):  # repo names without the org
            if k:
                keys.setdefault(_key_tokens(k), spec)
    return keys


def _compact(s: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", s.lower())


def _family_before(toks: list[_Tok], i: int) -> list[int]:
    """Indices of the (at most two) unused, non-filler tokens right before token i that may name a model family."""
    out = []
    j = i - 1
    while j >= 0 and len(out) < 2:
        t = toks[j]
        if t.used or t.text in _DETERMINERS or t.text in _NUMBER_WORDS:
            break
        if _NUM_RE.match(t.text) or re.match(r"^[a-z]+\d*(?:\.\d+)?$", t.text):
            out.insert(0, j)
            j -= 1
            continue
        break
    # keep only a run that starts with a word (a version number alone, "2 7b", is not a family)
    while out and _NUM_RE.match(toks[out[0]].text):
        out.pop(0)
    return out


def _take_paths(text: str, toks: list[_Tok]) -> list[str]:
    """Paths to a config.json written in the question; their words are not read as anything else."""
    paths = []
    for m in re.finditer(r"(?:^|\s)(\S+\.json)\b", text):
        paths.append(m.group(1))
        for t in toks:
            if m.start(1) <= t.start and t.end <= m.end(1):
                t.used = "model"
    return paths


def _read_model(text: str, toks: list[_Tok], paths: list[str]) -> tuple[ModelSpec, Reading]:
    from .models import get_model, list_models
    from .sizes import PREFERRED, nearest_catalog, parse_param_size, resolve_size, size_label

    named = _find(toks, _model_keys())
    sizes = [i for i, t in enumerate(toks) if not t.used and _PSIZE_RE.match(t.text)
             and not any(s <= i < s + n for s, n, _ in named)]
    # a known family word right before a size joins the two ("llama 70B"); an unknown family refuses
    choices: list[tuple[ModelSpec, Reading, list[int]]] = []
    for p in paths:
        spec = get_model(p)
        choices.append((spec, Reading("model", spec.name, p, f"config.json at {p}"), []))
    for s, n, spec in named:
        words = _words(text, toks, s, n)
        choices.append((spec, Reading("model", spec.name, words, f"catalog model {spec.hf_id or spec.source}"),
                        list(range(s, s + n))))
    catalog = list_models()
    for i in sizes:
        fam_idx = _family_before(toks, i)
        fam_words = [toks[j].text for j in fam_idx]
        if any(w in UNKNOWN_FAMILIES or (w == "gpt" and k + 1 < len(fam_words)) for k, w in enumerate(fam_words)) \
                or (fam_words and fam_words[-1] in ("j", "neo", "neox")):
            words = _words(text, toks, fam_idx[0], i - fam_idx[0] + 1)
            raise _refuse(f"lora_budget has no model {words!r} in its catalog (`lora-budget models` lists it); give "
                          f"its config.json path or a bare size such as {toks[i].text.upper()}")
        family, members = "", []
        for k in range(len(fam_idx)):  # "finetune qwen 7b": the family is the longest known suffix
            family = _compact("".join(fam_words[k:]))
            members = [m for m in catalog if _compact(m.name).startswith(family)]
            if members:
                fam_idx, fam_words = fam_idx[k:], fam_words[k:]
                break
        if not members:
            fam_idx, family = [], ""  # ordinary words before the size ("squeeze 65B")
        words = _words(text, toks, fam_idx[0] if fam_idx else i, (i - fam_idx[0] + 1) if fam_idx else 1)
        if family:
            experts, n = parse_param_size(toks[i].text)
            label = size_label(experts, n)
            pref = PREFERRED.get(label, ("", ""))[0]
            spec = next((m for m in members if m.name == pref), None) or (
                None if experts else nearest_catalog(n, candidates=members))
            if spec is None:
                raise _refuse(f"no {' '.join(fam_words)} model near {label} in the catalog (it has "
                              f"{', '.join(m.name for m in members)})")
            note = (f"the usual {label} model of that family" if spec.name == pref else
                    f"the {' '.join(fam_words)} model nearest {label} within the catalog tolerance")
            choices.append((spec, Reading("model", spec.name, words, note), fam_idx + [i]))
        else:
            res = resolve_size(words)
            choices.append((res.spec, Reading("model", res.spec.name, words, res.explanation), [i]))
    distinct = list(dict.fromkeys(c[0].name for c in choices))
    if not choices:
        raise _refuse(f"cannot find a model or a size in {text.strip()!r} (write a catalog name such as "
                      f"llama-2-7b, or a size such as 7B or 8x7B)")
    if len(distinct) > 1:
        raise _refuse(f"the question names {len(distinct)} models ({', '.join(distinct)}): ask about one")
    for _, _, idx in choices:
        for j in idx:
            toks[j].used = "model"
    return choices[0][0], choices[0][1]


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
def _gpu_keys() -> dict[tuple[str, ...], GPUSpec]:
    from .gpus import list_gpus

    keys: dict[tuple[str, ...], GPUSpec] = {}
    for g in list_gpus():
        for k in (g.name, *g.aliases):
            kt = _key_tokens(k)
            keys.setdefault(kt, g)
            keys.setdefault(kt[:-1] + (kt[-1] + "s",), g)  # plural: "two 4090s"
    return keys


def _capacity_agrees(gpu: GPUSpec, cap_text: str) -> bool:
    from .units import GB, GiB, parse_size

    n = parse_size(cap_text)
    as_gib = n / GB * GiB if cap_text.lower().endswith("gb") else n
    return any(abs(gpu.memory_bytes - x) <= CAPACITY_AGREEMENT * x for x in (n, as_gib))


def _count_before(toks: list[_Tok], i: int) -> int:
    """How many GPUs the words before token i ask for ("2x", "2 x", "two", "8"): 1 when none is written."""
    if i >= 1:
        t = toks[i - 1].text
        if t in _NUMBER_WORDS:
            return _NUMBER_WORDS[t]
        m = re.match(r"^(\d+)x$", t)
        if m:
            return int(m.group(1))
        if _INT_RE.match(t) and not toks[i - 1].used and int(t) <= 16 and (
                i < 2 or toks[i - 2].text not in _BEFORE):
            return int(t)
        if t == "x" and i >= 2 and _INT_RE.match(toks[i - 2].text):
            return int(toks[i - 2].text)
    return 1


def _read_gpu(text: str, toks: list[_Tok]) -> tuple[GPUSpec | None, Reading | None]:
    from .gpus import capacity_gpu

    keys = _gpu_keys()
    named = _find(toks, keys)
    # "2xA100" in one token
    for i, t in enumerate(toks):
        m = re.match(r"^(\d+)x([a-z0-9.]+)$", t.text)
        if m and not t.used and (m.group(2),) in keys:
            raise _refuse(f"{_words(text, toks, i)!r} asks about {m.group(1)} GPUs: lora_budget answers for one GPU "
                          f"(multi-GPU sharding is not modelled)")
    caps = [i for i, t in enumerate(toks) if not t.used and _CAP_RE.match(t.text)
            and not any(s <= i < s + n for s, n, _ in named)]
    picked: list[tuple[GPUSpec, Reading, list[int]]] = []
    for s, n, gpu in named:
        idx = list(range(s, s + n))
        count = _count_before(toks, s)
        if count > 1:
            raise _refuse(f"{_words(text, toks, max(0, s - 2), n + min(2, s))!r} asks about {count} GPUs: "
                          f"lora_budget answers for one GPU (multi-GPU sharding is not modelled)")
        adjacent = [c for c in caps if c in (s - 1, s + n)]
        note = f"catalog GPU, {format_gib(gpu.memory_bytes)} = {format_gb(gpu.memory_bytes)} as the driver reports it"
        for c in adjacent:
            cap = toks[c].text
            if not _capacity_agrees(gpu, cap):
                prefix = tuple(toks[j].text for j in idx)
                alt = [g for g in dict.fromkeys(
                    g for k, g in keys.items() if k[:len(prefix)] == prefix or k[-len(prefix):] == prefix)
                    if _capacity_agrees(g, cap)]
                if len(alt) != 1:
                    raise _refuse(f"{_words(text, toks, min(s, c), n + 1)!r}: the catalog {gpu.name} has "
                                  f"{format_gib(gpu.memory_bytes)}, not {cap.upper()}; give the GPU name or the "
                                  f"capacity alone")
                gpu = alt[0]
                note = (f"catalog GPU, {format_gib(gpu.memory_bytes)} = {format_gb(gpu.memory_bytes)} as the driver "
                        f"reports it")
            idx.append(c)
        lo, hi = min(idx), max(idx)
        picked.append((gpu, Reading("gpu", gpu.name, _words(text, toks, lo, hi - lo + 1), note), idx))
    used_caps = {j for _, _, idx in picked for j in idx}
    for c in caps:
        if c in used_caps:
            continue
        count = _count_before(toks, c)
        if count > 1:
            raise _refuse(f"{_words(text, toks, c - 1, 2)!r} asks about {count} GPUs: lora_budget answers for one "
                          f"GPU (multi-GPU sharding is not modelled)")
        cap = toks[c].text
        gpu = capacity_gpu(_words(text, toks, c).replace(" ", ""))
        note = (f"{gpu.memory_bytes:,} bytes ({format_gib(gpu.memory_bytes)}): a bare capacity is taken exactly as "
                f"written (GB = 10^9 B, GiB = 2^30 B); name the card (e.g. a6000) for its driver-reported memory")
        picked.append((gpu, Reading("gpu", cap.upper().replace("GIB", "GiB").replace("MIB", "MiB")
                                    .replace("TIB", "TiB"), _words(text, toks, c), note), [c]))
    distinct = list(dict.fromkeys((g.name, g.memory_bytes) for g, _, _ in picked))
    if len(distinct) > 1:
        raise _refuse(f"the question names {len(distinct)} GPUs ({', '.join(r.words for _, r, _ in picked)}): "
                      f"ask about one")
    if picked:
        for _, _, idx in picked:
            for j in idx:
                toks[j].used = "gpu"
        return picked[0][0], picked[0][1]
    return None, None


def _check_unknown_gpu(text: str, toks: list[_Tok]) -> None:
    """Refuse words that look like a GPU the catalog lacks, or a capacity without a unit."""
    from .errors import UnknownGPUError
    from .gpus import get_gpu

    for i, t in enumerate(toks):
        if t.used:
            continue
        before = toks[i - 1].text if i else ""
        after = toks[i + 1].text if i + 1 < len(toks) else ""
        if after in ("gpu", "gpus", "card", "cards", "vram") and _NUM_RE.match(t.text):
            if after in ("gpus", "cards") and _INT_RE.match(t.text) and int(t.text) <= 16:
                if int(t.text) > 1:
                    raise _refuse(f"{_words(text, toks, i, 2)!r} asks about {t.text} GPUs: lora_budget answers for "
                                  f"one GPU (multi-GPU sharding is not modelled)")
                continue
            raise _refuse(f"{_words(text, toks, i, 2)!r} has no unit: write {t.text}GB (10^9 B) or {t.text}GiB "
                          f"(2^30 B)")
        vendor_word = t.text in ("rtx", "gtx", "tesla", "quadro", "radeon", "instinct")
        looks_gpu = vendor_word or (after in ("gpu", "gpus", "card", "cards") and t.text not in _DETERMINERS
                                    and t.text not in ("nvidia", "amd", "consumer", "big", "small", "same")) or (
            before in ("on", "a", "an", "one", "single") and _GPU_LIKE_RE.match(t.text)
            and not re.match(r"^(fp|bf|int|nf|r)\d+$", t.text))
        if not looks_gpu:
            continue
        n = 2 if vendor_word and after else 1
        words = _words(text, toks, i, n)
        try:
            get_gpu(words)
        except UnknownGPUError as exc:
            raise _refuse(str(exc)) from None
        raise _refuse(f"cannot read the GPU in {words!r}: write it as in `lora-budget gpus`, e.g. rtx-4090")


# ---------------------------------------------------------------------------------------------------------------
# Method and options
# ---------------------------------------------------------------------------------------------------------------
def _near(toks: list[_Tok], i: int, words: set[str], before: int = 2, after: int = 2) -> bool:
    lo, hi = max(0, i - before), min(len(toks), i + after + 1)
    return any(toks[j].text in words for j in range(lo, hi) if j != i)


def _read_optim(text: str, toks: list[_Tok]) -> Reading | None:
    anchors = [i for i, t in enumerate(toks) if not t.used and (t.text in ("adam", "adamw", "adamw8bit", "sgd") or (
        t.text in ("optimizer", "optimiser", "optim") and _near(toks, i, {"8bit", "paged"})))]
    if not anchors:
        return None
    i = anchors[0]
    if toks[i].text == "sgd":
        toks[i].used = "optim"
        return Reading("optim", "sgd", _words(text, toks, i))
    lo, hi = max(0, i - 2), min(len(toks), i + 3)
    window = {toks[j].text for j in range(lo, hi)}
    eight = "8bit" in window or toks[i].text == "adamw8bit"
    paged = "paged" in window
    if eight:
        name = "paged_adamw_8bit" if paged else "adamw_8bit"
    elif paged:
        name = "paged_adamw_32bit"
    elif "torch" in window and "fused" not in window:
        name = "adamw_torch"
    else:
        name = "adamw_torch_fused"
    span = [j for j in range(lo, hi) if toks[j].text in ("adam", "adamw", "adamw8bit", "8bit", "32bit", "paged",
                                                          "torch", "fused", "bnb", "optimizer", "optimiser", "optim")]
    for j in span:
        toks[j].used = "optim"
    note = "HF optim name" + ("" if eight or paged or "torch" in window else
                              " (plain AdamW read as the Trainer default, fused torch AdamW)")
    return Reading("optim", name, _words(text, toks, min(span), max(span) - min(span) + 1), note)


def _read_methods(text: str, toks: list[_Tok]) -> list[Reading]:
    out: list[Reading] = []
    weak: list[int] = []
    four_bit = {"4bit", "nf4", "int4", "fp4", "quantized", "quantised", "quantization", "quantisation", "bnb4",
                "qlora"}
    for i, t in enumerate(toks):
        if t.used:
            continue
        w = t.text
        if w in ("8bit", "int8") and not _near(toks, i, {"adam", "adamw", "optimizer", "optimiser", "optim"}):
            raise _refuse(f"{_words(text, toks, i)!r}: an 8-bit base model (load_in_8bit) is not modelled; ask about "
                          f"QLoRA (4-bit), LoRA or full fine-tuning")
        if w in four_bit:
            j = i + 1 if i + 1 < len(toks) and toks[i + 1].text == "lora" and not toks[i + 1].used else i
            note = {"qlora": "", "fp4": "4-bit FP4 quantisation (bnb_4bit_quant_type fp4)"}.get(
                w, "4-bit base model with LoRA adapters = QLoRA")
            if w in ("quantized", "quantised", "quantization", "quantisation"):
                note = "quantised read as 4-bit (QLoRA); 8-bit bases are not modelled"
            out.append(Reading("method", "qlora", _words(text, toks, i, j - i + 1), note))
            for k in range(i, j + 1):
                toks[k].used = "method"
            if w == "fp4":
                out.append(Reading("bnb_4bit_quant_type", "fp4", _words(text, toks, i)))
            elif w == "nf4":
                out.append(Reading("bnb_4bit_quant_type", "nf4", _words(text, toks, i)))
        elif w == "lora":
            nxt = toks[i + 1].text if i + 1 < len(toks) else ""
            if nxt in ("r", "rank", "alpha", "dropout", "target", "targets", "modules"):
                weak.append(i)  # "lora rank 16": the method only when no other is named
                continue
            t.used = "method"
            out.append(Reading("method", "lora", _words(text, toks, i)))
        elif w in ("full", "fully") and i + 1 < len(toks) and toks[i + 1].text in (
                "finetune", "ft", "parameter", "parameters", "params", "training", "train", "weights", "weight"):
            t.used = toks[i + 1].used = "method"
            out.append(Reading("method", "full", _words(text, toks, i, 2)))
        elif w == "fft":
            t.used = "method"
            out.append(Reading("method", "full", _words(text, toks, i)))
    if weak and not any(r.what == "method" for r in out):
        out.append(Reading("method", "lora", _words(text, toks, weak[0])))
    return out


def _seq_value(s: str) -> int | None:
    m = _SEQ_NUM_RE.match(s)
    if m:
        return int(round(float(m.group(1)) * 1024))
    return int(s) if _INT_RE.match(s) else None


def _read_numbers(text: str, toks: list[_Tok]) -> tuple[list[Reading], list[str]]:
    out: list[Reading] = []
    unread: list[str] = []
    for i, t in enumerate(toks):
        if t.used:
            continue
        m = re.match(r"^r(\d+)$", t.text)
        if m:
            t.used = "lora_rank"
            out.append(Reading("lora_rank", int(m.group(1)), _words(text, toks, i)))
            continue
        if not (_NUM_RE.match(t.text) or _SEQ_NUM_RE.match(t.text)):
            continue
        what, cue = None, None
        j = i - 1
        while j >= 0 and i - j <= 4 and not toks[j].used and toks[j].text in _SKIP and toks[j].text not in _BEFORE:
            j -= 1
        if j >= 0 and toks[j].text in _BEFORE and toks[j].used in ("", "cue"):
            what, cue = _BEFORE[toks[j].text], j
        elif i + 1 < len(toks) and toks[i + 1].text in _AFTER and not toks[i + 1].used:
            what, cue = _AFTER[toks[i + 1].text], i + 1
        elif _SEQ_NUM_RE.match(t.text):
            what = "seq_len"
        if what is None:
            unread.append(_words(text, toks, i))
            continue
        if what == "seq_len":
            value = _seq_value(t.text)
            note = "k = 1024 tokens" if t.text.endswith("k") else ""
        elif what == "lora_alpha":
            value = float(t.text)
            value = int(value) if value.is_integer() else value
            note = ""
        else:
            value = int(t.text) if _INT_RE.match(t.text) else None
            note = ""
        if value is None:
            raise _refuse(f"{_words(text, toks, min(i, cue if cue is not None else i), abs(i - (cue or i)) + 1)!r}: "
                          f"{what} must be a whole number")
        t.used = what
        if cue is not None:
            toks[cue].used = "cue"
        lo = min(i, cue) if cue is not None else i
        hi = max(i, cue) if cue is not None else i
        while lo > 0 and not toks[lo - 1].used and toks[lo - 1].text in _CUE_PREFIX | {
                k for k, v in _BEFORE.items() if v == what}:
            lo -= 1  # "seq_len=1024", "grad accum 8": quote the whole cue
        out.append(Reading(what, value, _words(text, toks, lo, hi - lo + 1), note))
    return out, unread


def _read_flags(text: str, toks: list[_Tok]) -> list[Reading]:
    out: list[Reading] = []
    for i, t in enumerate(toks):
        if t.used:
            continue
        w = t.text
        prev = {toks[j].text for j in range(max(0, i - 2), i)}
        nxt = toks[i + 1].text if i + 1 < len(toks) else ""
        negated = bool(prev & _NEGATIONS) or nxt in ("off", "disabled")
        if w in ("checkpointing", "gc", "recompute", "recomputation") or (
                w in ("checkpoint", "ckpt") and prev & {"gradient", "grad", "activation"}):
            t.used = "gradient_checkpointing"
            lo = next((j for j in range(max(0, i - 2), i) if toks[j].text in _NEGATIONS), i)
            out.append(Reading("gradient_checkpointing", not negated, _words(text, toks, lo, i - lo + 1)))
        elif w == "flashattention":
            t.used = "attn_implementation"
            out.append(Reading("attn_implementation", "flash_attention_2", _words(text, toks, i)))
        elif w in ("eager", "sdpa") and nxt in ("attention", "attn", "") or w == "sdpa":
            t.used = "attn_implementation"
            out.append(Reading("attn_implementation", w, _words(text, toks, i)))
        elif w in ("padding", "padded", "pad"):
            t.used = "padding"
            out.append(Reading("padding", not negated, _words(text, toks, i),
                               "batches padded to seq_len with an attention mask" if not negated else ""))
        elif w in ("packed", "packing"):
            t.used = "padding"
            out.append(Reading("padding", False, _words(text, toks, i), "packed batches, no padding"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------------------
def parse_question(text: str) -> Question:
    """Read a plain-English fine-tuning question.

    Args:
        text: e.g. "can I fit 65B on a 48GB GPU with QLoRA at 4k context?"

    Returns:
        Question: the model, the GPU (None when not named), the methods asked (() when none), FinetuneConfig
        options, the readings (each with the words it came from) and the numbers not understood.

    Raises:
        UnreadableQuestion: no model, two models or GPUs, an unknown model family or GPU, several GPUs, a capacity
            without a unit, an 8-bit base, or two values for one option.  The message is one line with an example.
    """
    if not text or not str(text).strip():
        raise _refuse("empty question")
    text = str(text)
    toks = tokenize(text)
    try:
        paths = _take_paths(text, toks)
        gpu, gpu_reading = _read_gpu(text, toks)
        model, model_reading = _read_model(text, toks, paths)
        if gpu is None:
            _check_unknown_gpu(text, toks)
    except UnreadableQuestion:
        raise
    except LoraBudgetError as exc:
        raise _refuse(str(exc)) from None
    readings: list[Reading] = [model_reading]
    if gpu_reading is not None:
        readings.append(gpu_reading)
    optim = _read_optim(text, toks)
    method_readings = _read_methods(text, toks)
    flags = _read_flags(text, toks)
    numbers, unread = _read_numbers(text, toks)
    readings += method_readings + ([optim] if optim else []) + numbers + flags
    methods = tuple(dict.fromkeys(r.value for r in method_readings if r.what == "method"))
    options: dict = {}
    for r in readings:
        if r.what in ("model", "gpu", "method"):
            continue
        if r.what in options and options[r.what] != r.value:
            raise _refuse(f"the question gives two values for {r.what} ({options[r.what]} and {r.value})")
        options[r.what] = r.value
    return Question(text=text, model=model, gpu=gpu, methods=methods, options=options, readings=tuple(readings),
                    not_understood=tuple(unread))


__all__ = ["parse_question", "Question", "Reading", "UnreadableQuestion", "tokenize", "EXAMPLE"]
