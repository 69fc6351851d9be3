"""Exact storage accounting of a training step: a ``TorchDispatchMode`` that sees every op's outputs.

Every new ``UntypedStorage`` is counted once (keyed by its StorageImpl, ``st._cdata``) with its size rounded the
way the CUDA caching allocator rounds a block (512 B), and uncounted when it dies (``weakref.finalize`` on the
Python storage object, which torch keeps alive exactly as long as the StorageImpl).  It works the same for real,
meta and fake tensors, so the same tracker measures a real CPU step and a FakeTensor dry run.

Nothing is summed online except the running total: every allocation and free is appended to an event log, and
phase peaks and the category breakdown at each peak are computed afterwards by replaying the log.  That lets the
caller decide *after* the step that some storages live elsewhere on CUDA (AdamW's CPU ``step`` counters, paged
optimizer state) and leave them out of the device numbers without re-running anything.

Emulation hooks (set by :mod:`lora_budget.dryrun.emulate`) may change what an op allocates (``op_hooks``): an
op can be replaced by a decomposition (its pieces are then counted one by one), an output can be counted with a
different size (CUDA pads the SDPA logsumexp), and kernel-internal workspaces can be logged as transients.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA_BLOCK = 512  # c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to if to > 1 else n


class StorageTracker(TorchDispatchMode):
    """Counts live storages; logs ``(+serial)`` / ``(-serial)`` events and phase marks for later replay.

    ``register(t)`` must also be called for tensors that exist before the mode is entered (parameters, buffers,
    quant-state tensors, the batch).  ``set_phase(name)`` marks the start of a phase.  ``op_hooks`` maps an
    ``OpOverload`` to ``fn(tracker, func, args, kwargs) -> out`` that replaces the plain call.
    """

    def __init__(self, round_to: int = CUDA_BLOCK):
        super().__init__()
        self.round_to = round_to
        self.live: dict[int, int] = {}        # storage key -> serial
        self.size: dict[int, int] = {}        # serial -> rounded bytes
        self.desc: dict[int, str] = {}        # serial -> op that made it (for debugging / attribution)
        self.log: list[int] = []              # +serial = alloc, -serial = free
        self.marks: list[tuple[str, int]] = []  # (phase, log index where it starts)
        self.serial = 0
        self.cur = 0
        self.peak = 0
        self.op_hooks: dict = {}
        self.ops = 0
        self._op = "init"
        self._keep: list = []                 # phantom owners kept alive by their finalizers

    # ---- counting ----------------------------------------------------------------------------------------------
    def _new(self, nbytes: int, desc: str) -> int:
        self.serial += 1
        s = self.serial
        n = round_up(int(nbytes), self.round_to)
        self.size[s] = n
        self.desc[s] = desc
        self.log.append(s)
        self.cur += n
        if self.cur > self.peak:
            self.peak = self.cur
        return s

    def _free(self, key, s: int) -> None:
        if key is not None:
            if self.live.get(key) != s:
                return
            del self.live[key]
        self.log.append(-s)
        self.cur -= self.size[s]

    def register(self, t: torch.Tensor, nbytes: int | None = None, desc: str | None = None) -> int | None:
        """Count ``t``'s storage if it is new; ``nbytes`` overrides its size.  Returns the serial."""
        st = t.untyped_storage()
        key = st._cdata
        s = self.live.get(key)
        if s is not None:
            return s
        s = self._new(st.nbytes() if nbytes is None else nbytes, desc or self._op)
        self.live[key] = s
        weakref.finalize(st, self._free, key, s)
        return s

    def serial_of(self, t: torch.Tensor) -> int | None:
        return self.live.get(t.untyped_storage()._cdata)

    def attach(self, owner: torch.Tensor, nbytes: int, desc: str) -> int:
        """A phantom allocation that lives exactly as long as ``owner``'s storage (e.g. CUDA-only padding)."""
        s = self._new(nbytes, desc)
        weakref.finalize(owner.untyped_storage(), self._free, None, s)
        return s

    def transient(self, nbytes: int, desc: str) -> None:
        """A kernel-internal workspace: allocated and freed within the current op."""
        if nbytes <= 0:
            return
        s = self._new(nbytes, desc)
        self._free(None, s)

    def set_phase(self, name: str) -> None:
        self.marks.append((name, len(self.log)))

    # ---- dispatch ----------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        hook = self.op_hooks.get(func)
        self._op = func.__name__
        if hook is not None:
            return hook(self, func, args, kwargs)
        out = func(*args, **kwargs)
        self.register_outputs(out)
        return out

    def register_outputs(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.register(t)

    # ---- analysis ----------------------------------------------------------------------------------------------
    def analyse(self, exclude=frozenset()):
        """Replay the log.  Returns ``{phase: (peak_bytes, log_index_of_peak)}`` and the final live total.

        A phase that occurs several times (one forward per micro-batch) keeps its highest peak.  Storages whose
        serial is in ``exclude`` are left out of every number.  ``live_at(index)`` gives the storages alive at a
        peak.
        """
        marks = sorted(self.marks, key=lambda m: m[1])
        size = self.size
        peaks: dict[str, tuple[int, int]] = {}

        def close(phase, best, at):
            if phase not in peaks or best > peaks[phase][0]:
                peaks[phase] = (best, at)

        cur = 0
        mi = 0
        phase, best, best_at = "init", 0, 0
        n = len(self.log)
        for i in range(n + 1):
            while mi < len(marks) and marks[mi][1] <= i:
                close(phase, best, best_at)
                phase, best, best_at = marks[mi][0], cur, i
                mi += 1
            if i == n:
                break
            e = self.log[i]
            s = e if e > 0 else -e
            if s in exclude:
                continue
            cur += size[s] if e > 0 else -size[s]
            if cur > best:
                best, best_at = cur, i + 1
        close(phase, best, best_at)
        return peaks, cur

    def live_at(self, index: int, exclude: set[int] = frozenset()) -> set[int]:
        """Serials alive after the first ``index`` log events."""
        alive: set[int] = set()
        for e in self.log[:index]:
            if e > 0:
                if e not in exclude:
                    alive.add(e)
            else:
                alive.discard(-e)
        return alive

    def bytes_of(self, serials) -> int:
        return sum(self.size[s] for s in serials)
