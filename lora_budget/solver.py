"""The fit solver: the largest micro-batch and the longest sequence that fit a GPU, and the gradient accumulation
that keeps a global batch.  Standard library only.

Memory is monotone (non-decreasing) in the micro-batch and in the sequence length for every setup, so the search
is exact: an exponential probe for an upper bracket, then bisection.  The answer is the largest value that fits,
and the solver keeps the estimate one step above it, which does not fit, as the proof.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError, InfeasibleError
from .estimate import estimate
from .finetune import FinetuneConfig
from .gpus import GPUSpec
from .models import ModelSpec
from .units import ceil_div, format_gib

#: Upper bound of the micro-batch search (no setup trains a useful micro-batch of more sequences on one GPU).
MAX_BATCH_SIZE = 4096


def largest_fitting(fits: Callable[[int], bool], lo: int = 1, hi: int | None = None) -> int:
    """The largest n in [lo, hi] with ``fits(n)``, for a monotone ``fits`` (true up to some n, false after).

    Returns ``lo - 1`` when ``fits(lo)`` is false.  With ``hi`` None the bracket is found by doubling (then
    ``fits`` must turn false eventually).  Calls ``fits`` O(log n) times.
    """
    if (hi is not None and hi < lo) or not fits(lo):
        return lo - 1
    good = lo
    step = 1
    bad = None
    # exponential probe: lo+1, lo+2, lo+4, ... up to hi
    while bad is None:
        probe = good + step
        if hi is not None and probe > hi:
            if good == hi or fits(hi):
                return hi
            bad = hi
            break
        if fits(probe):
            good = probe
            step *= 2
        else:
            bad = probe
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


@dataclass(frozen=True)
class Solution:
    """The largest value of ``option`` that fits, its estimate, and the one-larger estimate that does not fit.

    ``capped`` is true when the search stopped at ``limit`` while still fitting (``next_estimate`` is then None).
    The estimates are ``Estimate`` or ``sharding.ShardedEstimate`` objects (anything with ``device_total_bytes``).
    """

    option: str
    value: int
    limit: int
    capped: bool
    estimate: object
    next_estimate: object | None

    def as_dict(self) -> dict:
        d = {"option": self.option, "value": self.value, "limit": self.limit, "capped": self.capped,
             "device_total_bytes": self.estimate.device_total_bytes,
             "next_device_total_bytes": None if self.next_estimate is None else self.next_estimate.device_total_bytes}
        return d


MemoryFn = Callable[[FinetuneConfig], object]


def _single_gpu(spec: ModelSpec, gpu: GPUSpec) -> MemoryFn:
    return lambda cfg: estimate(spec, cfg, gpu)


def _solve(option: str, spec: ModelSpec, cfg: FinetuneConfig, gpu: GPUSpec, limit: int,
           memory: MemoryFn | None, step: int = 1) -> Solution:
    mem = memory or _single_gpu(spec, gpu)
    cache: dict[int, object] = {}

    def at(n: int):
        if n not in cache:
            cache[n] = mem(cfg.with_(**{option: n * step}))
        return cache[n]

    def fits(n: int) -> bool:
        return at(n).device_total_bytes <= gpu.memory_bytes

    hi = limit // step
    best = largest_fitting(fits, 1, hi)
    if best < 1:
        e = at(1)
        raise InfeasibleError(
            f"{spec.name} with {cfg.method} does not fit {gpu.name} even at {option.replace('_', '-')} {step}: "
            f"needs {format_gib(e.device_total_bytes)} of {format_gib(gpu.memory_bytes)}")
    capped = best == hi
    return Solution(option=option, value=best * step, limit=limit, capped=capped, estimate=at(best),
                    next_estimate=None if capped else at(best + 1))


def max_batch_size(spec: ModelSpec, cfg: FinetuneConfig, gpu: GPUSpec, *, limit: int = MAX_BATCH_SIZE,
                   memory: MemoryFn | None = None) -> Solution:
    """The largest micro-batch (sequences of ``cfg.seq_len``) that fits ``gpu``.

    ``memory(cfg)`` gives the estimate to check (default: the single-GPU ``estimate``; pass a sharded one for a
    multi-GPU rank).  Raises InfeasibleError when a micro-batch of one does not fit.
    """
    return _solve("batch_size", spec, cfg, gpu, limit, memory)


def max_seq_len(spec: ModelSpec, cfg: FinetuneConfig, gpu: GPUSpec, *, limit: int | None = None,
                multiple_of: int = 1, memory: MemoryFn | None = None) -> Solution:
    """The longest sequence (a multiple of ``multiple_of``) at ``cfg.batch_size`` that fits ``gpu``.

    ``limit`` defaults to the model's ``max_position_embeddings``.  Raises InfeasibleError when even
    ``multiple_of`` tokens do not fit.
    """
    limit = limit or spec.max_position_embeddings
    return _solve("seq_len", spec, cfg, gpu, limit, memory, step=max(1, multiple_of))


def accumulation_steps(global_batch: int, micro_batch: int, n_gpus: int = 1) -> int:
    """Gradient accumulation steps that reach at least ``global_batch`` sequences per optimizer step."""
    for name, v in (("global batch", global_batch), ("micro-batch", micro_batch), ("GPU count", n_gpus)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return max(1, ceil_div(global_batch, micro_batch * n_gpus))


def micro_batch_for(global_batch: int, max_fit: int, n_gpus: int = 1) -> tuple[int, int]:
    """(micro-batch, accumulation) that keep a global batch: the largest micro-batch up to ``max_fit`` that
    divides the per-GPU share ``ceil(global_batch / n_gpus)``, so that micro-batch x accumulation x GPUs is the
    global batch exactly (16 sequences on 1 GPU with room for 5: 4 x 4; with room for 3: 2 x 8).  The share
    rounds up when the GPU count does not divide the global batch.
    """
    per_gpu = ceil_div(global_batch, n_gpus)
    micro = max(b for b in range(1, min(max_fit, per_gpu) + 1) if per_gpu % b == 0)
    return micro, per_gpu // micro


__all__ = ["Solution", "largest_fitting", "max_batch_size", "max_seq_len", "accumulation_steps", "micro_batch_for",
           "MAX_BATCH_SIZE"]
