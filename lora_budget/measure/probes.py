"""What the harness reads: the torch CUDA allocator's peaks, NVML device/process memory (a sampling thread), the
CUDA context size, the CPU backend's storage tracker, and 4-bit-aware parameter counts.

torch and pynvml are imported inside the functions that need them.

Units: bytes (int) and seconds (float).  Sources:
- ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` and ``memory_stats()["active_bytes.all.peak"]``
  (torchtune's three peaks); ``reset_peak_memory_stats`` resets all three.
- NVML ``nvmlDeviceGetMemoryInfo(h).used`` (everything resident on the device, every process) and
  ``nvmlDeviceGetComputeRunningProcesses`` (this process's ``usedGpuMemory``: context + allocator + other
  cudaMalloc; None where the driver hides it, e.g. in a container with its own PID namespace).
- CUDA context = NVML device used after CUDA init - before - torch reserved (memory-accounting.md section 9).
"""

from __future__ import annotations

import os
import threading
import time

from ..errors import LoraBudgetError
from ..units import GiB, format_gib

#: How often the NVML thread samples (s).  One NVML query takes ~0.1-1 ms; 20 ms keeps the overhead < 5 %.
NVML_INTERVAL_S = 0.02
#: A record keeps at most this many timeline points (evenly thinned; the peaks come from every sample).
TIMELINE_POINTS = 600
#: The GPU counts as busy when NVML reports more than this in use before this process touches it.  PEFT's
#: method_comparison refuses at 500 MiB of allocator memory; the driver itself holds a few hundred MiB on some
#: GPUs (H100: ~0.5 GiB "used" when idle with NVML's v1 memory info), hence 1 GiB.
BUSY_USED_BYTES = 1 * GiB
#: How long a busy GPU is waited for before refusing (a just-finished worker's memory is freed within seconds).
BUSY_WAIT_S = 15.0


class GpuBusyError(LoraBudgetError):
    """The GPU is in use by something else, so its readings would be wrong."""


class MeasuredOOM(RuntimeError):
    """Raised by the CPU backend's capped tracker when tracked storage would exceed the memory cap."""


def is_oom(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError and the CUDA / cuBLAS allocation failures raised as RuntimeError."""
    if isinstance(exc, MeasuredOOM):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:  # pragma: no cover - torch missing
        pass
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text
                                              or "cudaErrorMemoryAllocation" in text)


# ---- parameters ------------------------------------------------------------------------------------------------
# parameter counts (4-bit aware) are the dry run's: one implementation for both paths
from ..dryrun.build import count_params as param_counts  # noqa: E402
from ..dryrun.build import real_numel  # noqa: E402,F401


# ---- NVML ------------------------------------------------------------------------------------------------------
def nvml_device(index: int = 0):
    """(pynvml module, device handle) or None when NVML, its library or the device is missing."""
    try:
        import pynvml  # type: ignore
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def nvml_used(nv) -> int | None:
    """NVML device memory in use (bytes, all processes)."""
    if nv is None:
        return None
    lib, h = nv
    try:
        return int(lib.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None


def nvml_processes(nv) -> list[tuple[int, int | None]] | None:
    """[(pid, used bytes or None)] of the compute processes on the device, or None when NVML cannot tell."""
    if nv is None:
        return None
    lib, h = nv
    try:
        procs = lib.nvmlDeviceGetComputeRunningProcesses(h)
    except Exception:
        return None
    out = []
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        out.append((int(p.pid), int(used) if isinstance(used, int) and used >= 0 else None))
    return out


def nvml_process_used(nv, pid: int | None = None) -> int | None:
    """This process's device memory as NVML reports it, or None (not listed, e.g. another PID namespace)."""
    procs = nvml_processes(nv)
    if not procs:
        return None
    pid = os.getpid() if pid is None else pid
    for p, used in procs:
        if p == pid:
            return used
    return None


def check_gpu_idle(nv, threshold: int = BUSY_USED_BYTES) -> dict:
    """Refuse (GpuBusyError) when another process computes on the GPU or NVML reports > ``threshold`` in use.

    Call before this process initialises CUDA.  Returns what was read (kept in the record).
    """
    used = nvml_used(nv)
    procs = nvml_processes(nv) or []
    others = [(p, u) for p, u in procs if p != os.getpid()]
    reading = {"nvml_used_before_init_bytes": used, "other_processes": len(others)}
    if others:
        shown = ", ".join(f"pid {p}" + (f" ({format_gib(u)})" if u else "") for p, u in others[:4])
        raise GpuBusyError(f"the GPU is busy: other processes use it ({shown}); measurements would be wrong. "
                           f"Stop them or pass --allow-busy to measure anyway")
    if used is not None and used > threshold:
        raise GpuBusyError(f"the GPU is busy: NVML reports {format_gib(used)} in use before this process started "
                           f"(limit {format_gib(threshold)}); stop what uses it or pass --allow-busy")
    return reading


class NvmlSampler:
    """A background thread that reads NVML device-used and this process's used memory every ``interval`` s.

    ``mark(name)`` timestamps a moment (build start, warm-up end, ...); ``stop()`` returns the readings: the
    peaks over the whole run and over the measured window (between the marks ``measure_from`` and
    ``measure_to``), and a thinned timeline ``[[t_s, device_used, process_used], ...]``.
    """

    def __init__(self, nv, interval: float = NVML_INTERVAL_S):
        self.nv = nv
        self.interval = interval
        self.samples: list[tuple[float, int | None, int | None]] = []
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lora-budget-nvml", daemon=True)
        self._t0 = time.perf_counter()
        self._pid = os.getpid()

    def _read(self):
        return (time.perf_counter() - self._t0, nvml_used(self.nv), nvml_process_used(self.nv, self._pid))

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self._read())
            self._stop.wait(self.interval)

    def start(self) -> "NvmlSampler":
        if self.nv is not None:
            self._thread.start()
        return self

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self._t0
        if self.nv is not None:
            self.samples.append(self._read())   # a sample exactly at each mark

    def stop(self, measure_from: str = "warmup_end", measure_to: str = "steps_end") -> dict:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=5)
        samples = sorted(self.samples)

        def peak(idx, lo=None, hi=None):
            vals = [s[idx] for s in samples if s[idx] is not None
                    and (lo is None or s[0] >= lo) and (hi is None or s[0] <= hi)]
            return max(vals) if vals else None

        lo, hi = self.marks.get(measure_from), self.marks.get(measure_to)
        step = max(1, -(-len(samples) // TIMELINE_POINTS))
        timeline = [[round(t, 4), d, p] for t, d, p in samples[::step]]
        return {
            "nvml_device_used_peak_bytes": peak(1, lo, hi) if lo is not None else None,
            "nvml_process_used_peak_bytes": peak(2, lo, hi) if lo is not None else None,
            "nvml_device_used_peak_run_bytes": peak(1),
            "nvml_process_used_peak_run_bytes": peak(2),
            "nvml_samples": len(samples),
            "nvml_interval_s": self.interval,
            "nvml_timeline": timeline,
            "nvml_marks": {k: round(v, 4) for k, v in self.marks.items()},
        }


# ---- CUDA ------------------------------------------------------------------------------------------------------
def nvml_device_of_cuda0():
    """(pynvml, handle) of the device torch calls cuda:0: NVML numbers physical devices and ignores
    CUDA_VISIBLE_DEVICES, so its first entry (an index or a GPU-UUID) is resolved here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.isdigit() or not visible:
        return nvml_device(int(visible) if visible else 0)
    nv = nvml_device(0)
    if nv is None:
        return None
    lib = nv[0]
    try:
        return lib, lib.nvmlDeviceGetHandleByUUID(visible)
    except Exception:
        return None


_CONTEXT: dict | None = None   # measured once per process: CUDA is initialised once


def cuda_preflight(allow_busy: bool = False) -> dict:
    """Before anything touches CUDA in this process: refuse a busy GPU and read NVML's device used memory.

    Returns ``{"nv": (pynvml, handle) or None, "first": bool, "busy_check": {...}, "before": bytes or None}``;
    ``first`` is False when an earlier run of this process already initialised CUDA.
    """
    nv = nvml_device_of_cuda0()
    if _CONTEXT is not None:
        return {"nv": nv, "first": False, "busy_check": {"checked": False, "reason": "CUDA already initialised by an "
                                                         "earlier run of this process"}, "before": None}
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # someone else created the context already: its size cannot be told apart any more
        return {"nv": nv, "first": True, "busy_check": {"checked": False, "reason": "CUDA was initialised before "
                                                        "the harness ran"}, "before": None}
    busy = {"checked": not allow_busy}
    if not allow_busy:
        busy.update(wait_gpu_idle(nv))
    return {"nv": nv, "first": True, "busy_check": busy, "before": nvml_used(nv)}


def wait_gpu_idle(nv, wait_s: float = BUSY_WAIT_S, threshold: int = BUSY_USED_BYTES) -> dict:
    """``check_gpu_idle``, retried for up to ``wait_s`` seconds: the driver may still be tearing down the process
    of the previous configuration (an isolated sweep starts the next one right after)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_gpu_idle(nv, threshold)
        except GpuBusyError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def init_cuda(nv, before: int | None) -> dict:
    """Initialise CUDA (device 0) and measure the context it created, once per process.

    ``before`` is NVML's device used memory read before this process touched CUDA (``cuda_preflight``).
    context = used after creating the primary context - before - torch reserved.  Returns ``{"context_bytes",
    "nvml_used_before_init_bytes", "nvml_used_after_init_bytes", "context_measured_here"}``; later runs of the same
    process get the first run's reading with ``context_measured_here`` False.
    """
    global _CONTEXT
    import torch

    if _CONTEXT is not None:
        return dict(_CONTEXT, context_measured_here=False)
    torch.cuda.set_device(0)
    x = torch.zeros(1, device="cuda:0")  # creates the primary context (and one 2 MiB allocator segment)
    torch.cuda.synchronize(0)
    after = nvml_used(nv)
    reserved = int(torch.cuda.memory_reserved(0))
    del x
    ctx = after - before - reserved if (before is not None and after is not None) else None
    _CONTEXT = {"context_bytes": ctx, "nvml_used_before_init_bytes": before, "nvml_used_after_init_bytes": after}
    return dict(_CONTEXT, context_measured_here=True)


def cuda_peaks(device_index: int = 0) -> dict:
    """Peak allocated / reserved / active bytes since the last reset, and the current allocated / reserved."""
    import torch

    stats = torch.cuda.memory_stats(device_index)
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device_index)),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device_index)),
        "peak_active_bytes": int(stats.get("active_bytes.all.peak", 0)),
        "allocated_bytes": int(torch.cuda.memory_allocated(device_index)),
        "reserved_bytes": int(torch.cuda.memory_reserved(device_index)),
    }


class CudaProbe:
    """Peaks per phase of the training step on CUDA.

    ``phase(name)`` closes the running phase (its peaks are the allocator peaks since the last reset) and resets
    the peaks for the next one (``None``: no phase running).  Allocator counters are updated on the host when an
    allocation is requested, so no synchronisation is needed.  ``peaks`` holds ``{phase: {"allocated",
    "reserved", "active"}}``, the highest over repeats (micro-batches).
    """

    def __init__(self, device_index: int = 0):
        self.index = device_index
        self.current: str | None = None
        self.peaks: dict[str, dict] = {}

    def phase(self, name: str | None) -> None:
        import torch

        if self.current is not None:
            r = cuda_peaks(self.index)
            got = {"allocated": r["peak_allocated_bytes"], "reserved": r["peak_reserved_bytes"],
                   "active": r["peak_active_bytes"]}
            old = self.peaks.get(self.current)
            self.peaks[self.current] = got if old is None else {k: max(old[k], got[k]) for k in got}
        torch.cuda.reset_peak_memory_stats(self.index)
        self.current = name

    def at_failure(self) -> dict:
        r = cuda_peaks(self.index)
        return {"allocated_bytes": r["allocated_bytes"], "reserved_bytes": r["reserved_bytes"],
                "peak_allocated_bytes": r["peak_allocated_bytes"], "peak_reserved_bytes": r["peak_reserved_bytes"],
                "phase": self.current}


# ---- CPU backend -----------------------------------------------------------------------------------------------
def storage_tracker(round_to: int = 512, cap_bytes: int | None = None):
    """A ``lora_budget.dryrun.tracker.StorageTracker`` that raises MeasuredOOM when the live tracked bytes would
    exceed ``cap_bytes`` (the CPU backend's emulation of a GPU of that size; the op that allocates fails)."""
    from ..dryrun.tracker import StorageTracker, round_up

    class CappedStorageTracker(StorageTracker):
        cap = cap_bytes

        def _new(self, nbytes, desc):
            if self.cap is not None and self.cur + round_up(int(nbytes), self.round_to) > self.cap:
                raise MeasuredOOM(f"CPU backend: tracked tensors would exceed the memory cap of {self.cap:,} B "
                                  f"({self.cur:,} B live, {desc} asks for {int(nbytes):,} B more)")
            return super()._new(nbytes, desc)

    return CappedStorageTracker(round_to=round_to)


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (Linux ``ru_maxrss`` is in KiB), or None."""
    try:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r) if sys.platform == "darwin" else int(r) * 1024
    except Exception:
        return None
