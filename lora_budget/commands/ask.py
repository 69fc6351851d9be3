"""``lora-budget ask "can I fit 65B on a 48GB GPU with QLoRA?"``: a plain question answered like ``fit``.

Also ``default_gpu()``: this machine's GPU (free memory, through NVML) for commands given no ``--gpu``.
Standard library and click only; the question is read by ``lora_budget.question``.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from ..errors import ConfigError
from ..units import format_gb, format_gib

#: Order in which methods are answered when the question names none, and in which the "best" is chosen: the
#: first that fits, i.e. the one that approximates full fine-tuning least (full > LoRA on a bf16 base > QLoRA).
ALL_METHODS = ("full", "lora", "qlora")
#: Options that exist only for some methods (make_config refuses them elsewhere).
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules")
QLORA_ONLY = ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
NO_GPU_HINT = "give --gpu (a catalog name such as a100-80gb, or a capacity such as 48GB)"


def default_gpu(nvml=None, hint: str = NO_GPU_HINT):
    """This machine's GPU as a GPUSpec whose memory is the free memory NVML reports, with an explanation.

    With several GPUs, the one with the most free memory (lowest index on a tie) is used, and the explanation says
    so.  The free memory is compared with the estimate's device total (which includes this process's own CUDA
    context), so memory other processes hold is already taken out.

    Args:
        nvml: a pynvml-like module for tests (default: ``pynvml`` from nvidia-ml-py, if installed).
        hint: the end of the error message (what the user should give instead).

    Returns:
        (GPUSpec, explanation)

    Raises:
        ConfigError: no GPU detected (no nvidia-ml-py, no driver, or no NVIDIA GPU).
    """
    from ..gpus import detect_gpus

    found = detect_gpus(nvml)
    if not found:
        raise ConfigError(f"no GPU detected through NVML: {hint}")
    best = max(found, key=lambda d: (d.free_bytes, -d.index))
    spec = best.as_gpu_spec(use_free=True)
    why = (f"{best.name} #{best.index} detected through NVML (driver {best.driver}): "
           f"{format_gib(best.free_bytes)} free of {format_gib(best.total_bytes)} "
           f"({format_gb(best.free_bytes)} of {format_gb(best.total_bytes)}); the check uses the free memory")
    if len(found) > 1:
        why += f" of the GPU with the most free memory among the {len(found)} found"
    return spec, why


@dataclass(frozen=True)
class MethodAnswer:
    """The estimate of one method (or why there is none)."""

    method: str
    estimate: object = None
    error: str = ""


@dataclass(frozen=True)
class Answer:
    """A question answered: what was read, one estimate per method, and the method detailed (``chosen``)."""

    question: object
    gpu: object
    gpu_line: str
    answers: tuple[MethodAnswer, ...]
    chosen: MethodAnswer
    chosen_because: str
    suggestions: tuple = ()
    dropped: tuple[str, ...] = ()


def options_for(method: str, options: dict) -> tuple[dict, list[str]]:
    """The question's options that apply to ``method``, and a note for each one left out."""
    skip = (LORA_ONLY + QLORA_ONLY) if method == "full" else QLORA_ONLY if method == "lora" else ()
    kept = {k: v for k, v in options.items() if k not in skip}
    dropped = [f"{k}={v} does not apply to {method}" for k, v in options.items() if k in skip]
    return kept, dropped


def answer_question(text: str, nvml=None) -> Answer:
    """Read ``text`` and estimate it like ``fit``: per method asked (all three when none), against the GPU named
    or, when none is named, this machine's GPU.

    Raises:
        UnreadableQuestion: the question cannot be read, or names no GPU and none is detected.
        ConfigError: the one method asked cannot be estimated with the options read.
    """
    from ..estimate import estimate, suggestions
    from ..finetune import make_config
    from ..question import UnreadableQuestion, parse_question

    q = parse_question(text)
    if q.gpu is not None:
        gpu = q.gpu
        gpu_line = q.reading("gpu").line()
    else:
        try:
            gpu, why = default_gpu(nvml, hint="name a GPU in the question (a 4090, an A100 80GB, 48GB)")
        except ConfigError as exc:
            from ..question import EXAMPLE

            raise UnreadableQuestion(f"the question names no GPU and {exc}; ask e.g. {EXAMPLE}") from None
        gpu_line = f"gpu {gpu.name} (not in the question): {why}"
    methods = q.methods or ALL_METHODS
    answers = []
    dropped: list[str] = []
    for m in methods:
        opts, gone = options_for(m, q.options) if not q.methods or len(q.methods) > 1 else (q.options, [])
        dropped += gone
        try:
            est = estimate(q.model, make_config(m, **opts), gpu)
        except ConfigError as exc:
            if len(methods) == 1:
                raise
            answers.append(MethodAnswer(m, None, str(exc)))
            continue
        answers.append(MethodAnswer(m, est))
    ok = [a for a in answers if a.estimate is not None]
    if not ok:
        raise ConfigError("; ".join(f"{a.method}: {a.error}" for a in answers))
    if len(answers) == 1:
        chosen, because = answers[0], "the method asked"
    else:
        order = [m for m in ALL_METHODS if m in methods]
        fitting = [a for m in order for a in ok if a.method == m and a.estimate.fits]
        if fitting:
            chosen = fitting[0]
            because = (f"{chosen.method} is the first of {', '.join(order)} that fits "
                       f"(the least approximation of full fine-tuning)")
        else:
            chosen = min(ok, key=lambda a: a.estimate.device_total_bytes)
            because = f"none fits; {chosen.method} needs the least memory"
    sugg = () if chosen.estimate.fits else tuple(suggestions(chosen.estimate))
    return Answer(question=q, gpu=gpu, gpu_line=gpu_line, answers=tuple(answers), chosen=chosen,
                  chosen_because=because, suggestions=sugg, dropped=tuple(dict.fromkeys(dropped)))


def read_as_lines(ans: Answer) -> list[str]:
    """The "Read as:" block: every reading with the words it came from."""
    q = ans.question
    lines = ["Read as:", "  " + q.reading("model").line(), "  " + ans.gpu_line]
    if not q.methods:
        lines.append(f"  method not given: answering for {', '.join(ALL_METHODS)}")
    for r in q.readings:
        if r.what not in ("model", "gpu"):
            lines.append("  " + r.line())
    for d in ans.dropped:
        lines.append(f"  note: {d}")
    if q.not_understood:
        lines.append("  not understood (ignored): " + ", ".join(repr(w) for w in q.not_understood))
    lines.append("  every other option: its default, listed under Assumptions")
    return lines


def fit_lines(est, sugg) -> list[str]:
    """The text of ``lora-budget fit`` for one estimate (verdict, breakdown, suggestions)."""
    from ..cli import render_estimate

    cfg, g = est.config, est.gpu
    lines = [f"{'YES' if est.fits else 'NO'}: {est.model.name} with {cfg.method} "
             f"{'fits' if est.fits else 'does not fit'} on {g.label}: needs {format_gib(est.device_total_bytes)} "
             f"({format_gb(est.device_total_bytes)}) with the CUDA context, "
             f"headroom {format_gib(est.headroom_bytes)}.", "", render_estimate(est)]
    if sugg:
        lines += ["", "Changes that lower the peak (device total each):"]
        for s in sugg:
            mark = "fits" if s.fits else "still too big"
            lines.append(f"  {s.change:<60} {format_gib(s.estimate.device_total_bytes):>12}  {mark}")
    return lines


def fit_dict(est, sugg) -> dict:
    """The JSON of ``lora-budget fit --json`` for one estimate."""
    d = est.as_dict()
    d["suggestions"] = [{"change": s.change, "device_total_bytes": s.estimate.device_total_bytes,
                         "peak_allocated_bytes": s.estimate.peak_allocated_bytes, "fits": s.fits} for s in sugg]
    return d


def answer_dict(ans: Answer) -> dict:
    """The JSON of ``lora-budget ask --json``."""
    q = ans.question
    return {
        "question": q.text,
        "read_as": {
            "readings": [{"what": r.what, "value": r.value, "words": r.words, "note": r.note} for r in q.readings],
            "gpu": {"name": ans.gpu.name, "memory_bytes": ans.gpu.memory_bytes, "line": ans.gpu_line},
            "methods_asked": list(q.methods),
            "options": dict(q.options),
            "not_understood": list(q.not_understood),
            "notes": list(ans.dropped),
        },
        "answers": [{"method": a.method, "fits": a.estimate.fits if a.estimate else None,
                     "device_total_bytes": a.estimate.device_total_bytes if a.estimate else None,
                     "headroom_bytes": a.estimate.headroom_bytes if a.estimate else None,
                     "error": a.error or None} for a in ans.answers],
        "chosen_method": ans.chosen.method,
        "chosen_because": ans.chosen_because,
        "fit": fit_dict(ans.chosen.estimate, ans.suggestions),
    }


def answer_lines(ans: Answer) -> list[str]:
    """The text of ``lora-budget ask``."""
    lines = read_as_lines(ans) + [""]
    if len(ans.answers) > 1:
        lines.append(f"Per method on {ans.gpu.label}:")
        for a in ans.answers:
            if a.estimate is None:
                lines.append(f"  {a.method:<6} cannot estimate: {a.error}")
                continue
            e = a.estimate
            lines.append(f"  {a.method:<6} {'fits' if e.fits else 'does not fit':<13} needs "
                         f"{format_gib(e.device_total_bytes):>13} ({format_gb(e.device_total_bytes)}), "
                         f"headroom {format_gib(e.headroom_bytes)}")
        lines += [f"Details for {ans.chosen.method}: {ans.chosen_because}.", ""]
    return lines + fit_lines(ans.chosen.estimate, ans.suggestions)


def register(cli) -> None:
    from ..cli import emit_json, handle_errors

    @cli.command()
    @click.argument("question", nargs=-1, required=True)
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @handle_errors
    def ask(question, as_json):
        """Answer a plain question like fit does, e.g. ask "can I fit 65B on a 48GB GPU with QLoRA?".

        \b
        It reads a model name or a size (65B, 8x7B), a GPU name or a capacity (a 4090, 48GB), a method (qlora,
        4-bit, lora, full fine-tune), and optionally the context length, batch, rank and gradient checkpointing.
        It first says how it read the question; when no method is named it answers for full, lora and qlora.
        With no GPU in the question it uses this machine's GPU (free memory, through NVML).
        """
        ans = answer_question(" ".join(question))
        if as_json:
            emit_json(answer_dict(ans))
        else:
            click.echo("\n".join(answer_lines(ans)))
