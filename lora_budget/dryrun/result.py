"""The result of a dry run (torch-free, so that results can be built, compared and printed without the extra)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Phase keys of ``DryRunResult.phases`` / ``phase_breakdown``, in execution order.
PHASES = ("first_step.forward", "first_step.backward", "first_step.optimizer_step",
          "steady_state.forward", "steady_state.backward", "steady_state.optimizer_step")
#: Category keys of ``phase_breakdown[phase]`` and of ``as_dict()["components"]``.
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations")


@dataclass(frozen=True)
class DryRunResult:
    """Byte counts of a traced training step.  Every storage is rounded up to the CUDA caching allocator's 512 B.

    - ``total_params`` / ``trainable_params``: element counts; 4-bit weights count their real (unpacked) elements.
    - ``weights_bytes``: all parameter storages: dense weights, 4-bit packed data, the quant-state tensors (absmax,
      code, offset, state2) and LoRA adapters.  ``quant_state_bytes`` and ``adapter_bytes`` are parts of it.
    - ``gradients_bytes``: every ``.grad`` at the end of the (last) backward.
    - ``optimizer_state_bytes``: optimizer state on the device after the optimizer step (paged bnb state is in
      ``offloaded_bytes`` instead; AdamW's non-fused ``step`` counters live on the host on CUDA and are not counted).
    - ``activations_bytes``: live bytes right after forward + loss of the last micro-batch of the last step (logits
      dropped, only the loss kept), minus parameters, gradients, optimizer state, buffers and the input batch: the
      tensors saved for backward plus the loss.
    - ``peak_allocated_bytes``: the highest live total over all phases (what ``torch.cuda.max_memory_allocated``
      would report for these tensors, without CUDA context, cuBLAS workspaces and kernel-internal scratch).
    - ``phases``: the peak of each phase; ``phase_breakdown``: category -> bytes at that peak, where "activations"
      is everything that is not a parameter, gradient or optimizer state (saved tensors, temporaries, buffers,
      the batch, autocast copies, optimizer-step temporaries).
    - ``buffers_bytes`` / ``batch_bytes``: module buffers (rotary tables) and one micro-batch of inputs.
    """

    total_params: int
    trainable_params: int
    weights_bytes: int
    quant_state_bytes: int
    adapter_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    offloaded_bytes: int
    activations_bytes: int
    peak_allocated_bytes: int
    phases: dict[str, int]
    phase_breakdown: dict[str, dict[str, int]]
    emulations: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    buffers_bytes: int = 0
    batch_bytes: int = 0

    @property
    def peak_phase(self) -> str:
        """The phase where ``peak_allocated_bytes`` is reached."""
        return max(self.phases, key=lambda k: self.phases[k]) if self.phases else ""

    def components(self) -> dict[str, int]:
        return {"weights": self.weights_bytes, "gradients": self.gradients_bytes,
                "optimizer_state": self.optimizer_state_bytes, "activations": self.activations_bytes}

    def as_dict(self) -> dict:
        """A JSON-able dict (``source: "dry-run"``)."""
        return {
            "source": "dry-run",
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "offloaded_bytes": self.offloaded_bytes,
            "components": self.components(),
            "quant_state_bytes": self.quant_state_bytes,
            "adapter_bytes": self.adapter_bytes,
            "buffers_bytes": self.buffers_bytes,
            "batch_bytes": self.batch_bytes,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "phase_breakdown": {k: dict(v) for k, v in self.phase_breakdown.items()},
            "emulations": list(self.emulations),
            "timings": dict(self.timings),
            "versions": dict(self.versions),
        }
