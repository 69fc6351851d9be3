"""The dry run: build on meta, convert to FakeTensors on "cpu", trace real training steps with every storage counted.

``trace()`` is shared by the fake dry run and by real CPU runs (tests compare the two byte for byte).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings

import torch

from ..errors import ConfigError


@contextlib.contextmanager
def quiet_libraries():
    """Silence library chatter during a trace (bnb's "kernels" notice, transformers' use_cache warning, ...)."""
    names = ("bitsandbytes", "transformers", "peft", "accelerate")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import transformers.utils.logging as tlog

        tv = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        tlog = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if tlog is not None:
            tlog.set_verbosity(tv)
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)

with quiet_libraries():
    import bitsandbytes  # noqa: F401  (imported here, quietly, before peft imports it)

from .build import build_model, count_params  # noqa: E402
from .emulate import NOT_EMULATED, CudaEmulation  # noqa: E402
from .result import CATEGORIES, PHASES, DryRunResult  # noqa: E402
from .step import autocast_dtype, make_batches, make_optimizer, train_step  # noqa: E402
from .tracker import StorageTracker  # noqa: E402


def versions() -> dict[str, str]:
    import accelerate
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "bitsandbytes": bitsandbytes.__version__}


# ---- meta -> fake ----------------------------------------------------------------------------------------------------
def fakeify(model, fm, device: str = "cpu") -> list:
    """Replace every meta parameter / buffer / 4-bit quant-state tensor by a FakeTensor on ``device``, in place.

    Tied weights stay tied (memo on ``id(param)``; the originals are kept alive so ids are not reused).  A 4-bit
    ``Params4bit`` (which cannot wrap a FakeTensor) becomes a plain uint8 Parameter carrying a fake ``quant_state``;
    ``Linear4bit.forward`` only needs that.  Returns the list of originals to keep alive.
    """
    conv = fm.fake_tensor_converter
    dev = torch.device(device)
    memo: dict[int, object] = {}
    keep: list = []

    def fake(t):
        if id(t) not in memo:
            keep.append(t)
            memo[id(t)] = conv.from_meta_and_device(fm, t, dev)
        return memo[id(t)]

    def fake_qs(qs):
        new = copy.copy(qs)
        for attr in ("absmax", "code", "offset"):
            v = getattr(qs, attr, None)
            if isinstance(v, torch.Tensor):
                setattr(new, attr, fake(v))
        if getattr(qs, "state2", None) is not None:
            new.state2 = fake_qs(qs.state2)
        return new

    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                keep.append(p)
                new = torch.nn.Parameter(conv.from_meta_and_device(fm, p.data, dev), requires_grad=p.requires_grad)
                qs = getattr(p, "quant_state", None)
                if qs is not None:
                    new.quant_state = fake_qs(qs)
                memo[id(p)] = new
            mod._parameters[name] = memo[id(p)]
            if getattr(memo[id(p)], "quant_state", None) is not None and hasattr(mod, "quant_state"):
                mod.quant_state = memo[id(p)].quant_state
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = fake(b)
    return keep


def quant_state_tensors(model) -> list:
    """absmax / code / offset / state2 tensors of every 4-bit weight (not parameters or buffers)."""
    out = []
    seen = set()
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        stack = [qs]
        while stack:
            q = stack.pop()
            if q is None:
                continue
            for attr in ("absmax", "code", "offset"):
                v = getattr(q, attr, None)
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    out.append(v)
            stack.append(getattr(q, "state2", None))
    return out


def unique_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    seen = set()
    out = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


# ---- the trace -----------------------------------------------------------------------------------------------------
def trace(model, optimizer, cfg, *, vocab_size: int, steps: int = 2, mode=None, cuda_emulation: bool = True,
          progress=None, device: str = "cpu"):
    """Run ``steps`` training steps under a StorageTracker (inside ``mode``, e.g. a FakeTensorMode).

    Returns a dict with the tracker, the result fields and the emulation lines.
    """
    say = progress or (lambda msg: None)
    tr = StorageTracker(round_to=512)
    emu = CudaEmulation(cfg, cuda=cuda_emulation, mixed_dtype=autocast_dtype(cfg))
    tr.op_hooks.update(emu.op_hooks())

    named = unique_params(model)
    param_serials = {tr.register(p, desc="param") for _, p in named}
    adapter_serials = {tr.serial_of(p) for n, p in named if "lora_" in n}
    quant_serials = {tr.register(t, desc="quant_state") for t in quant_state_tensors(model)}
    buffer_serials = {tr.register(b, desc="buffer") for b in model.buffers()}
    batch_serials: set[int] = set()
    grad_serials: set[int] = set()
    last_grads: set[int] = set()
    marks: dict[str, int] = {}
    mode = mode if mode is not None else contextlib.nullcontext()

    def note_batch(b):
        for t in b.values():
            batch_serials.add(tr.serial_of(t))

    def batches():
        return make_batches(cfg, vocab_size, cfg.gradient_accumulation_steps, device=device, on_batch=note_batch)

    with quiet_libraries():
        with mode, emu, tr:
            for step in range(steps):
                prefix = "first_step" if step == 0 else "steady_state"
                say(f"tracing step {step + 1}/{steps}")

                def hook(event, prefix=prefix):
                    if event == "optimizer_step":
                        last_grads.clear()
                        for _, p in named:
                            if p.grad is not None:
                                last_grads.add(tr.serial_of(p.grad))
                        grad_serials.update(last_grads)
                    tr.set_phase(f"{prefix}.{event}")
                    marks[event] = len(tr.log)

                train_step(model, optimizer, cfg, batches(), hook)
            tr.set_phase("end")

    # what lives where on CUDA
    state_tensors = []
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                state_tensors.append((k, v))
    host = set()
    fused = any(g.get("fused") for g in optimizer.param_groups)
    capturable = any(g.get("capturable") for g in optimizer.param_groups)
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)) and not (fused or capturable):
        host = {tr.serial_of(v) for k, v in state_tensors if k == "step"}
    paged = {tr.serial_of(t) for t in getattr(optimizer, "paged_states", lambda: [])()}
    paged_raw = sum(t.untyped_storage().nbytes() for t in getattr(optimizer, "paged_states", lambda: [])())
    opt_serials = {tr.serial_of(v) for _, v in state_tensors} - host - paged - {None}
    exclude = (host | paged) - {None}

    peaks, _ = tr.analyse(exclude)
    cats = {
        "weights": param_serials | quant_serials,
        "gradients": grad_serials,
        "optimizer_state": opt_serials,
    }

    def breakdown(index):
        live = tr.live_at(index, exclude)
        out = {}
        rest = set(live)
        for c in ("weights", "gradients", "optimizer_state"):
            s = live & cats[c]
            out[c] = tr.bytes_of(s)
            rest -= s
        out["activations"] = tr.bytes_of(rest)
        return out

    phases, phase_breakdown = {}, {}
    for ph in PHASES:
        if ph in peaks:
            phases[ph] = peaks[ph][0]
            phase_breakdown[ph] = breakdown(peaks[ph][1])
    live_bwd = tr.live_at(marks["backward"], exclude)
    not_acts = param_serials | quant_serials | grad_serials | opt_serials | buffer_serials | batch_serials
    fields = dict(
        weights_bytes=tr.bytes_of(param_serials | quant_serials),
        quant_state_bytes=tr.bytes_of(quant_serials),
        adapter_bytes=tr.bytes_of(adapter_serials),
        gradients_bytes=tr.bytes_of(last_grads),
        optimizer_state_bytes=tr.bytes_of(opt_serials),
        offloaded_bytes=int(paged_raw),
        activations_bytes=tr.bytes_of(live_bwd - not_acts),
        peak_allocated_bytes=max(phases.values()) if phases else tr.peak,
        phases=phases,
        phase_breakdown=phase_breakdown,
        buffers_bytes=tr.bytes_of(buffer_serials),
        batch_bytes=tr.bytes_of({s for s in batch_serials if s is not None}) // max(1, steps * cfg.gradient_accumulation_steps),
    )
    lines = list(emu.lines)
    if getattr(optimizer, "lb_emulation", None):
        lines.append(optimizer.lb_emulation)
    if host:
        lines.append("AdamW (non-fused) 'step' counters are host tensors on CUDA: left out of the device counts")
    if cfg.mixed_precision == "fp16":
        lines.append("not emulated: the fp16 GradScaler (scale / growth-tracker / found-inf scalars and the scaled "
                     "loss: a few 512 B blocks)")
    if cfg.mixed_precision != "no":
        lines.append("accelerate ConvertOutputsToFp32: fp16/bf16 outputs (logits) copied to fp32 after the "
                     "autocast forward, dropped with the outputs before backward")
    lines.append("Trainer step: micro-batches of input_ids + cloned labels on the device one at a time, loss / "
                 "gradient_accumulation_steps, clip_grad_norm_(max_norm=1.0) (foreach), optimizer.step(), "
                 "model.zero_grad(set_to_none=True)")
    return {"tracker": tr, "fields": fields, "emulations": lines}


def dry_run(spec, cfg, *, steps: int = 2, progress=None, cuda_emulation: bool = True) -> DryRunResult:
    """Fake-tensor dry run of ``steps`` training steps of ``spec`` with ``cfg`` (see ``lora_budget.dryrun``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    say = progress or (lambda msg: None)
    if not isinstance(steps, int) or steps < 2:
        raise ConfigError(f"a dry run needs steps >= 2 (first step + steady state), got {steps!r}")
    t0 = time.perf_counter()
    say("building the model on the meta device")
    with quiet_libraries():
        model = build_model(spec, cfg, device="meta")
    total, trainable = count_params(model)
    fm = FakeTensorMode()
    keep = fakeify(model, fm, "cpu")
    with fm:
        optimizer = make_optimizer(model, cfg)
    t1 = time.perf_counter()
    out = trace(model, optimizer, cfg, vocab_size=spec.vocab_size, steps=steps, mode=fm,
                cuda_emulation=cuda_emulation, progress=say, device="cpu")
    t2 = time.perf_counter()
    del keep
    lines = list(out["emulations"])
    eff = getattr(model, "lb_attn_implementation", cfg.attn_implementation)
    if eff == "eager" and cfg.attn_implementation != "eager":
        lines.insert(0, f"attention: {spec.model_type} has no SDPA support in this transformers version; traced with "
                        "eager attention (transformers' own fallback)")
    elif cfg.attn_implementation == "flash_attention_2":
        lines.insert(0, "attention: flash_attention_2 traced as SDPA (same saved tensors without padding: q, k, v, "
                        "out, fp32 softmax_lse; FA2's unpadding of padded batches is not emulated)")
    lines.extend(NOT_EMULATED)
    return DryRunResult(total_params=total, trainable_params=trainable, emulations=tuple(lines),
                        timings={"build": round(t1 - t0, 3), "trace": round(t2 - t1, 3)},
                        versions=versions(), **out["fields"])


__all__ = ["dry_run", "trace", "fakeify", "CATEGORIES"]
