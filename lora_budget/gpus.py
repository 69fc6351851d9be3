"""GPU specs, lookup by name or bare capacity, and local detection through NVML.

``get_gpu("a6000")`` gives the catalog entry; ``get_gpu("48GB")`` gives a synthetic GPU of exactly 48e9 bytes and
``get_gpu("48GiB")`` one of 48 * 2**30 bytes (see ``units.parse_size`` for how marketed sizes are read).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import UnknownGPUError
from .units import GiB, format_gb, format_gib, is_size, parse_size


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model.

    ``memory_bytes``: total device memory as the driver reports it (nvidia-smi "Total" MiB * 2**20, rocm-smi bytes).
    ``bf16_tflops``: dense (not 2:4 sparse) bf16 tensor-core peak in TFLOP/s from the vendor datasheet (fp16 for
    GPUs without bf16, noted in ``notes``).  ``bandwidth_gbps``: memory bandwidth in GB/s (10**9 B/s).
    ``price_usd_per_hour``: a typical on-demand price of one GPU, with ``price_as_of`` and ``price_source``.
    """

    name: str
    memory_bytes: int
    bf16_tflops: float
    bandwidth_gbps: float
    price_usd_per_hour: float | None
    price_as_of: str
    price_source: str
    vendor: str = "NVIDIA"
    aliases: tuple[str, ...] = ()
    memory_source: str = ""
    notes: str = ""
    synthetic: bool = False

    @property
    def label(self) -> str:
        if self.synthetic:
            return f"{self.name} ({format_gib(self.memory_bytes)})"
        return f"{self.name} ({format_gib(self.memory_bytes)} = {format_gb(self.memory_bytes)})"


def list_gpus() -> list[GPUSpec]:
    from .gpu_catalog import GPUS

    return list(GPUS)


def _key(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def _index() -> dict[str, GPUSpec]:
    idx = {}
    for g in list_gpus():
        for k in (g.name, *g.aliases):
            idx[_key(k)] = g
    return idx


def capacity_gpu(text: str) -> GPUSpec:
    """A synthetic GPU holding exactly the bytes written, e.g. "48GB" -> 48,000,000,000 B."""
    n = parse_size(text)
    return GPUSpec(name=text.strip(), memory_bytes=n, bf16_tflops=0.0, bandwidth_gbps=0.0, price_usd_per_hour=None,
                   price_as_of="", price_source="", vendor="", synthetic=True,
                   memory_source="bare capacity given on the command line")


def get_gpu(name: str) -> GPUSpec:
    """A catalog GPU by name or alias (case and punctuation ignored), or a bare capacity such as "48GB"."""
    if name is None or not str(name).strip():
        raise UnknownGPUError("empty GPU name")
    if is_size(name):
        return capacity_gpu(name)
    idx = _index()
    k = _key(name)
    if k in idx:
        return idx[k]
    close = difflib.get_close_matches(k, list(idx), n=6, cutoff=0.5)
    names = list(dict.fromkeys(idx[c].name for c in close))[:4]
    hint = f"; did you mean {', '.join(names)}?" if names else ""
    raise UnknownGPUError(f"unknown GPU {name!r}{hint} (or give a capacity such as 48GB or 24GiB; "
                          f"`lora-budget gpus` lists the catalog)")


@dataclass(frozen=True)
class DetectedGPU:
    """A GPU seen through NVML on this machine."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    driver: str

    def as_gpu_spec(self, use_free: bool = True) -> GPUSpec:
        """A GPUSpec for fit checks: the free memory (default) or the total, named after the device."""
        base = None
        k = _key(self.name.replace("NVIDIA", ""))
        idx = _index()
        if k in idx:  # exact name or alias first
            base = idx[k]
        else:  # else the longest catalog key contained in the device name ("A100SXM480GB" -> a100sxm480gb)
            hits = sorted((key for key in idx if key and key in k), key=len, reverse=True)
            base = idx[hits[0]] if hits else None
        mem = self.free_bytes if use_free else self.total_bytes
        label = f"{self.name} #{self.index} ({'free' if use_free else 'total'} memory)"
        if base is None:
            return GPUSpec(name=label, memory_bytes=mem, bf16_tflops=0.0, bandwidth_gbps=0.0, price_usd_per_hour=None,
                           price_as_of="", price_source="", synthetic=True, memory_source="NVML")
        from dataclasses import replace

        return replace(base, name=label, memory_bytes=mem, memory_source="NVML", synthetic=True)


def detect_gpus(nvml=None) -> list[DetectedGPU]:
    """The local GPUs through NVML (``pynvml`` from nvidia-ml-py); [] when NVML or a GPU is missing.

    ``nvml`` may be passed for tests (a module with the pynvml functions used below).
    """
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore
        except Exception:  # pragma: no cover - depends on the machine
            return []
    try:
        nvml.nvmlInit()
    except Exception:
        return []
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        if isinstance(driver, bytes):
            driver = driver.decode()
        out = []
        for idx in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(idx)
            name = nvml.nvmlDeviceGetName(h)
            if isinstance(name, bytes):
                name = name.decode()
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            out.append(DetectedGPU(index=idx, name=str(name), total_bytes=int(mem.total), free_bytes=int(mem.free),
                                   used_bytes=int(mem.used), driver=str(driver)))
        return out
    except Exception:
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


__all__ = ["GPUSpec", "DetectedGPU", "get_gpu", "list_gpus", "capacity_gpu", "detect_gpus", "GiB"]
