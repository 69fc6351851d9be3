"""Run one configuration for real and build its Measurement: warm-up + N training steps on random token batches.

The model comes from ``lora_budget.dryrun.build.build_model`` (random weights, never a download; QLoRA through
transformers' own bitsandbytes replacement, peft LoRA, the Trainer's gradient checkpointing) and the step from
``lora_budget.dryrun.step`` (the Trainer's optimizer, autocast, accumulation, clipping, zero_grad).

Backends:
- ``cuda``: torch allocator peaks per phase (reset at every phase start), NVML sampled by a thread, the CUDA
  context measured at initialisation, an optional memory cap through ``set_per_process_memory_fraction``.
- ``cpu``: the same steps on the CPU with every storage counted by the StorageTracker (512 B rounding); a memory
  cap makes the tracker fail the allocation that would cross it (an emulated OOM).

An out-of-memory error is a result (status "oom", with the memory at failure); any other error is status "failed"
with its one-line message.  Either way everything is freed (gc + empty_cache) so that the next run can go on.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
import warnings

from ..errors import ConfigError, LoraBudgetError, MissingDependencyError
from ..units import format_gib
from .record import Measurement, config_key, model_fields

DEVICES = ("cuda", "cpu")
#: In-process runs refuse to start when this much allocator memory is still held by an earlier run.
LEFTOVER_BYTES = 256 * 2**20


def needed_packages(cfg) -> tuple[str, ...]:
    """The packages a run of ``cfg`` imports: the HF stack, peft for LoRA, bitsandbytes for 4-bit weights and
    bnb optimizers (so that a machine without bitsandbytes still measures LoRA and full fine-tuning)."""
    out = ["torch", "transformers", "accelerate"]
    if cfg.is_lora:
        out.append("peft")
    if cfg.method == "qlora" or cfg.optim not in ("adamw_torch", "adamw_torch_fused", "sgd"):
        out.append("bitsandbytes")
    return tuple(out)


def require_dependencies(cfg) -> None:
    """Raise MissingDependencyError unless the packages a run of ``cfg`` needs import."""
    import importlib

    missing = []
    for name in needed_packages(cfg):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"measuring needs {', '.join(missing)}: pip install 'lora_budget[measure]'")


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def prediction(spec, cfg, gpu=None) -> dict:
    """``estimate(spec, cfg, gpu).as_dict()`` plus ``estimator_version`` (what the record compares against)."""
    from .. import __version__
    from ..estimate import estimate

    try:
        d = estimate(spec, cfg, gpu).as_dict()
    except LoraBudgetError as exc:
        return {"error": str(exc), "estimator_version": __version__}
    d["estimator_version"] = __version__
    return d


def _gpu_for(name: str, memory_bytes: int):
    from ..gpus import GPUSpec

    return GPUSpec(name=name, memory_bytes=int(memory_bytes), bf16_tflops=0.0, bandwidth_gbps=0.0,
                   price_usd_per_hour=None, price_as_of="", price_source="", synthetic=True,
                   memory_source="measurement")


class _Backend:
    """What differs between CUDA and the CPU: the readings, the cleanup, the state at a failure."""

    device = "cpu"

    def __init__(self, cap: int | None):
        self.cap = cap
        self.allocator_limit: int | None = None
        self.measured: dict = {}
        self.notes: list[str] = []

    def before_build(self):
        pass

    def after_build(self, model):
        pass

    def open_phase(self, name: str | None):
        """Start phase ``name`` ("s<step>.<event>"); None ends the running phase."""

    def finish(self, optimizer) -> dict:
        """``{phase: {"allocated", "reserved", "active"}}`` peaks of every phase run."""
        return {}

    def sync(self):
        pass

    def mark(self, name: str):
        pass

    def at_failure(self) -> dict:
        return {}

    def close(self) -> dict:
        return {}

    def cleanup(self):
        gc.collect()


class CudaBackend(_Backend):
    """torch allocator peaks per phase, NVML sampled throughout, the context measured at CUDA initialisation."""

    device = "cuda"

    def __init__(self, cap: int | None, pre: dict):
        super().__init__(cap)
        import torch

        from . import probes

        if not torch.cuda.is_available():
            raise ConfigError("no CUDA device is available to torch: measure with --device cpu, or check the "
                              "driver / CUDA_VISIBLE_DEVICES")
        self.torch = torch
        self.probes = probes
        self.nv = pre["nv"]
        if not pre["first"]:
            gc.collect()
            torch.cuda.empty_cache()
            left = int(torch.cuda.memory_allocated(0))
            if left > LEFTOVER_BYTES:
                raise probes.GpuBusyError(f"{format_gib(left)} of an earlier run in this process is still allocated; "
                                          f"measure each configuration in its own process (sweep --isolate)")
        ctx = probes.init_cuda(self.nv, pre["before"])
        self.total = int(torch.cuda.get_device_properties(0).total_memory)
        self.measured.update(ctx)
        self.measured["busy_check"] = pre["busy_check"]
        self.measured["nvml_available"] = self.nv is not None
        if cap is not None:
            if cap > self.total:
                raise ConfigError(f"--memory-cap {format_gib(cap)} is more than this GPU's {format_gib(self.total)}")
            context = ctx.get("context_bytes") or 0
            if ctx.get("context_bytes") is None:
                self.notes.append("the CUDA context could not be measured (no NVML reading): the allocator limit is "
                                  "the whole cap, so the context comes on top of it")
            self.allocator_limit = cap - context
            if self.allocator_limit <= 0:
                raise ConfigError(f"--memory-cap {format_gib(cap)} leaves nothing after the CUDA context "
                                  f"({format_gib(context)})")
            torch.cuda.set_per_process_memory_fraction(self.allocator_limit / self.total, 0)
            self.notes.append(f"memory cap {cap:,} B: the allocator is limited to cap - CUDA context = "
                              f"{self.allocator_limit:,} B (set_per_process_memory_fraction), so reserved + context "
                              f"stay within the cap as on a card of that size; bnb paged optimizer state (CUDA "
                              f"managed memory) is not limited by it")
        self.probe = probes.CudaProbe(0)
        self.sampler = probes.NvmlSampler(self.nv).start()

    def before_build(self):
        t = self.torch
        t.cuda.synchronize(0)
        self.measured["baseline_allocated_bytes"] = int(t.cuda.memory_allocated(0))
        self.measured["baseline_reserved_bytes"] = int(t.cuda.memory_reserved(0))
        self.measured["nvml_used_before_build_bytes"] = self.probes.nvml_used(self.nv)
        self.sampler.mark("build_start")
        t.cuda.reset_peak_memory_stats(0)

    def after_build(self, model):
        t = self.torch
        t.cuda.synchronize(0)
        self.sampler.mark("build_end")
        self.measured["model_allocated_bytes"] = (int(t.cuda.memory_allocated(0))
                                                  - self.measured["baseline_allocated_bytes"])
        self.measured["build_peak_allocated_bytes"] = int(t.cuda.max_memory_allocated(0))
        self.measured["build_peak_reserved_bytes"] = int(t.cuda.max_memory_reserved(0))

    def open_phase(self, name):
        self.probe.phase(name)

    def finish(self, optimizer):
        self.probe.phase(None)
        return self.probe.peaks

    def sync(self):
        self.torch.cuda.synchronize(0)

    def mark(self, name):
        self.sampler.mark(name)

    def at_failure(self):
        out = self.probe.at_failure()
        out["nvml_device_used_bytes"] = self.probes.nvml_used(self.nv)
        return out

    def close(self):
        return self.sampler.stop()

    def cleanup(self):
        t = self.torch
        gc.collect()
        t.cuda.empty_cache()
        if self.cap is not None:
            t.cuda.set_per_process_memory_fraction(1.0, 0)


class CpuBackend(_Backend):
    """Real CPU steps under the StorageTracker: live storages (512 B rounding) in place of allocator counters."""

    device = "cpu"

    def __init__(self, cap: int | None):
        super().__init__(cap)
        from . import probes

        self.probes = probes
        self.tracker = probes.storage_tracker(512, cap)
        self.phase_names: list[str] = []
        self.current: str | None = None
        self.measured.update({"context_bytes": None, "baseline_allocated_bytes": None,
                              "baseline_reserved_bytes": None, "tracker_round_to": 512})
        self.notes.append("CPU backend: bytes are live tensor storages counted by the StorageTracker (each rounded "
                          "up to 512 B like the CUDA caching allocator) under real CPU kernels (float dropout masks, "
                          "CPU SDPA, CPU autocast lists, bnb CPU kernels; no CUDA emulation); no reserved, active, "
                          "context or NVML readings; step times include the tracker's per-op overhead")
        if cap is not None:
            self.allocator_limit = cap
            self.notes.append(f"memory cap {cap:,} B: the tracker fails the allocation that would take the tracked "
                              f"bytes above it (an emulated OOM)")

    def after_build(self, model):
        from ..dryrun.run import quant_state_tensors, unique_params

        tr = self.tracker
        for _, p in unique_params(model):
            tr.register(p, desc="param")
        for t in quant_state_tensors(model):
            tr.register(t, desc="quant_state")
        for b in model.buffers():
            tr.register(b, desc="buffer")
        self.measured["model_allocated_bytes"] = tr.cur

    def open_phase(self, name):
        self.current = name
        if name is not None:
            self.phase_names.append(name)
        self.tracker.set_phase(name if name is not None else "between_steps")

    def finish(self, optimizer):
        import torch

        self.open_phase(None)
        tr = self.tracker
        host, paged = set(), set()
        if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)) and not any(
                g.get("fused") or g.get("capturable") for g in optimizer.param_groups):
            host = {tr.serial_of(v) for st in optimizer.state.values() for k, v in st.items()
                    if k == "step" and isinstance(v, torch.Tensor)}
            if host:
                self.notes.append("AdamW (non-fused) 'step' counters are host tensors on CUDA: left out of the peaks")
        paged = {tr.serial_of(t) for t in getattr(optimizer, "paged_states", lambda: [])()}
        if paged:
            self.notes.append("paged optimizer state (CUDA managed memory on a GPU) left out of the peaks")
        peaks, _ = tr.analyse((host | paged) - {None})
        self.measured["tracker_peak_all_bytes"] = tr.peak   # whole run, warm-up and excluded storages included
        return {n: {"allocated": peaks[n][0], "reserved": None, "active": None} for n in self.phase_names
                if n in peaks}

    def at_failure(self):
        return {"allocated_bytes": self.tracker.cur, "reserved_bytes": None,
                "peak_allocated_bytes": self.tracker.peak, "peak_reserved_bytes": None, "phase": self.current}

    def close(self):
        return {"cpu_peak_rss_bytes": self.probes.peak_rss_bytes()}


def _aggregate(phases: dict, warmup: int) -> dict:
    """Phase peaks named ``s<i>.<event>`` -> per-step peaks, ``first_step.*`` / ``steady_state.*`` and the peaks
    over the measured steps (index >= warmup)."""
    by_step: dict[int, dict] = {}
    named: dict[str, dict] = {}
    for name, r in phases.items():
        idx, event = name.split(".", 1)
        i = int(idx[1:])
        s = by_step.setdefault(i, {"allocated": None, "reserved": None, "active": None})
        label = f"{'first_step' if i == 0 else 'steady_state'}.{event}"
        n = named.setdefault(label, {"allocated": None, "reserved": None, "active": None})
        for k, v in r.items():
            if v is not None:
                s[k] = v if s[k] is None else max(s[k], v)
                n[k] = v if n[k] is None else max(n[k], v)
    measured_idx = [i for i in by_step if i >= warmup]

    def peak(k):
        vals = [by_step[i][k] for i in measured_idx if by_step[i][k] is not None]
        return max(vals) if vals else None

    return {"by_step": by_step, "phases": named, "peak_allocated_bytes": peak("allocated"),
            "peak_reserved_bytes": peak("reserved"), "peak_active_bytes": peak("active")}


def measure(spec, cfg, *, device: str = "cuda", steps: int = 3, warmup: int = 1,
            memory_cap_bytes: int | None = None, seed: int = 0, allow_busy: bool = False,
            run_info: dict | None = None, progress=None) -> Measurement:
    """Measure ``steps`` training steps (after ``warmup`` steps) of ``spec`` under ``cfg`` on ``device``.

    Args:
        spec: the ModelSpec (built with random weights; nothing is downloaded).
        cfg: the FinetuneConfig.
        device: "cuda" (torch's cuda:0) or "cpu".
        steps: measured optimizer steps (>= 1); the readings are their peaks and their median time.
        warmup: optimizer steps run first (>= 0).  The run's very first step is reported as ``first_step.*``.
        memory_cap_bytes: pretend the device has this many bytes (CUDA: allocator limited to cap - context;
            CPU: the tracker fails the allocation that crosses it).
        seed: torch seed of the weights and batches.
        allow_busy: measure even when the GPU is in use by something else (recorded in ``measured.busy_check``).
        run_info: extra fields for the record's ``run`` (sweep name, isolation).
        progress: optional callable(str) receiving status lines.

    Returns:
        The Measurement, status "ok", "oom" or "failed".  Nothing is written: see ``record.write_record``.

    Raises:
        ConfigError for bad arguments, GpuBusyError when the GPU is in use, MissingDependencyError without the
        ``measure`` extra.  Failures of the run itself become the record's status instead.
    """
    say = progress or (lambda msg: None)
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}: use cuda or cpu")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"--warmup must be a non-negative integer, got {warmup!r}")
    if memory_cap_bytes is not None and (not isinstance(memory_cap_bytes, int) or memory_cap_bytes <= 0):
        raise ConfigError(f"--memory-cap must be a positive number of bytes, got {memory_cap_bytes!r}")
    pre = None
    if device == "cuda":
        from .probes import cuda_preflight

        pre = cuda_preflight(allow_busy)      # NVML only: before torch / bitsandbytes touch CUDA
    require_dependencies(cfg)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .env import environment

    options = cfg.options()
    key = config_key(spec, options, device, memory_cap_bytes)
    backend = CudaBackend(memory_cap_bytes, pre) if device == "cuda" else CpuBackend(memory_cap_bytes)
    env = environment(device)
    if memory_cap_bytes is not None:
        gpu = _gpu_for(f"memory cap {memory_cap_bytes:,} B", memory_cap_bytes)
    elif device == "cuda":
        gpu = _gpu_for(env.get("gpu_name") or "cuda", env["gpu_total_bytes"])
    else:
        gpu = None
    predicted = prediction(spec, cfg, gpu)
    run = {"steps": steps, "warmup": warmup, "seed": seed, "memory_cap_bytes": memory_cap_bytes,
           "allocator_limit_bytes": backend.allocator_limit, "max_grad_norm": 1.0,
           "batches": "random token ids in [0, vocab_size), labels = input_ids (lora_budget.dryrun.step)"}
    run.update(run_info or {})

    status, error = "ok", None
    m = backend.measured
    m.update({"backend": "cuda" if device == "cuda" else "cpu-storage-tracker", "failure": None})
    state: dict = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _run(spec, cfg, backend, steps, warmup, seed, state, say)
    except Exception as exc:  # noqa: BLE001 - every failure of the run is a result
        if isinstance(exc, MissingDependencyError):
            raise
        from .probes import is_oom

        failure = backend.at_failure()
        failure["stage"] = state.get("stage")
        m["failure"] = failure
        status = "oom" if is_oom(exc) else "failed"
        error = _line(exc)
        say(f"{status}: {error}")
        del exc
    finally:
        for k in ("model", "optimizer_obj"):
            state.pop(k, None)
        backend.cleanup()
    m.update(backend.close())
    agg = _aggregate(state.get("phases") or {}, warmup)
    m["phases"] = agg["phases"]
    for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_active_bytes"):
        m[k] = agg[k]
    times = state.get("times", [])
    losses = state.get("losses", [])
    m["steps"] = [{"index": i, "warmup": i < warmup, "time_s": round(t, 6),
                   "loss": losses[i] if i < len(losses) else None,
                   "peak_allocated_bytes": agg["by_step"].get(i, {}).get("allocated"),
                   "peak_reserved_bytes": agg["by_step"].get(i, {}).get("reserved"),
                   "peak_active_bytes": agg["by_step"].get(i, {}).get("active")}
                  for i, t in enumerate(times)]
    measured_times = times[warmup:]
    tokens = cfg.batch_size * cfg.seq_len * cfg.gradient_accumulation_steps
    m["tokens_per_step"] = tokens
    m["step_time_s"] = round(statistics.median(measured_times), 6) if measured_times else None
    m["step_time_mean_s"] = round(statistics.fmean(measured_times), 6) if measured_times else None
    m["tokens_per_second"] = round(tokens / m["step_time_s"], 3) if m["step_time_s"] else None
    for k in ("total_params", "trainable_params", "build_time_s", "optimizer"):
        m[k] = state.get(k)
    for k in ("baseline_allocated_bytes", "baseline_reserved_bytes", "model_allocated_bytes", "context_bytes",
              "nvml_device_used_peak_bytes", "nvml_process_used_peak_bytes"):
        m.setdefault(k, None)
    if status == "ok" and (m["peak_allocated_bytes"] is None or not measured_times):
        status, error = "failed", "no measured step completed"
    m["notes"] = backend.notes
    return Measurement(key=key, status=status, error=error, device=device, model=model_fields(spec),
                       options=options, run=run, env=env, measured=m, predicted=predicted)


def _run(spec, cfg, backend, steps, warmup, seed, state, say):
    """Build, warm up, measure.  Everything it holds is referenced from ``state`` so that the caller frees it."""
    import torch

    from ..dryrun.build import build_model
    from ..dryrun.step import make_batches, make_optimizer, train_step
    from .probes import param_counts

    torch.manual_seed(seed)
    device = backend.device
    state["stage"] = "build"
    say(f"building {spec.name} ({cfg.method}) on {device}")
    backend.before_build()
    t0 = time.perf_counter()
    model = build_model(spec, cfg, device=device)
    state["model"] = model
    model.config.use_cache = False   # Trainer.__init__: model.config.use_cache = args.use_cache (False)
    backend.after_build(model)
    state["total_params"], state["trainable_params"] = param_counts(model)
    optimizer = make_optimizer(model, cfg)
    state["optimizer_obj"] = optimizer
    state["build_time_s"] = round(time.perf_counter() - t0, 3)
    state["optimizer"] = (getattr(optimizer, "lb_emulation", None)
                          or f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__}")
    state["times"], state["losses"] = [], []
    tracker = getattr(backend, "tracker", None)
    with (tracker if tracker is not None else contextlib.nullcontext()):
        for i in range(warmup + steps):
            state["stage"] = "warmup" if i < warmup else "steps"
            if i == warmup:
                backend.mark("warmup_end")
            say(f"step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}")
            batches = make_batches(cfg, spec.vocab_size, cfg.gradient_accumulation_steps, device=device)
            backend.sync()
            t = time.perf_counter()
            loss = train_step(model, optimizer, cfg, batches, lambda event, i=i: backend.open_phase(f"s{i}.{event}"))
            backend.open_phase(None)
            backend.sync()
            state["times"].append(time.perf_counter() - t)
            state["losses"].append(round(float(loss), 6) if loss is not None else None)
            del loss, batches
    backend.mark("steps_end")
    state["stage"] = "done"
    state["phases"] = backend.finish(optimizer)
