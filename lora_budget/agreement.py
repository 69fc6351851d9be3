"""Compare an analytical Estimate with a dry-run trace of the same setup (torch-free).

Both sides are reduced to what the CPU trace can see: CUDA-only items (cuBLAS workspaces) are taken out of the
estimate.  Components compared: weights (parameters incl. 4-bit storage and adapters), gradients, optimizer
state on the device, offloaded (paged) state, activations at the end of forward (saved tensors + loss).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Items of the estimate that exist only on CUDA and that the CPU dry run cannot see.
CUDA_ONLY = ("cuda_workspace",)


def _err(est: int, ref: int) -> float:
    if ref == 0:
        return 0.0 if est == 0 else float("inf")
    return est / ref - 1.0


@dataclass(frozen=True)
class Comparison:
    peak_estimate: int
    peak_dry: int
    components: dict  # name -> (estimate, dry)
    phases: dict  # name -> (estimate, dry)

    @property
    def peak_error(self) -> float:
        return _err(self.peak_estimate, self.peak_dry)

    def component_errors(self) -> dict:
        return {k: _err(e, d) for k, (e, d) in self.components.items()}

    def row(self) -> dict:
        out = {"peak_estimate": self.peak_estimate, "peak_dry": self.peak_dry,
               "peak_error": f"{self.peak_error:.6f}"}
        for k, (e, d) in self.components.items():
            out[f"{k}_error"] = f"{_err(e, d):.6f}"
        return out


def estimate_components(est) -> dict:
    """The estimate's components in the dry run's categories (bytes)."""
    c = est.memory.components
    from .memory import loss_memory

    loss_saved = loss_memory(est.model, est.config).saved
    return {
        "weights": c["weights"] + c["quantized_weights"] + c["lora_adapters"],
        "gradients": c["gradients"],
        "optimizer_state": c["optimizer_state"],
        "offloaded": est.memory.offloaded,
        # autocast weight casts are saved tensors at the end of forward, unless checkpointing recomputes them
        "activations": c["activations"] + loss_saved
        + (0 if est.config.gradient_checkpointing else c["autocast_cache"]),
    }


def compare(est, dry) -> Comparison:
    """Estimate vs DryRunResult for the same model and config."""
    phases = {}
    for ph in est.memory.phases:
        e = ph.total - sum(ph.components.get(k, 0) for k in CUDA_ONLY)
        phases[ph.name] = (e, dry.phases.get(ph.name, 0))
    ec = estimate_components(est)
    dc = {"weights": dry.weights_bytes, "gradients": dry.gradients_bytes,
          "optimizer_state": dry.optimizer_state_bytes, "offloaded": dry.offloaded_bytes,
          "activations": dry.activations_bytes}
    return Comparison(peak_estimate=max(e for e, _ in phases.values()), peak_dry=dry.peak_allocated_bytes,
                      components={k: (ec[k], dc[k]) for k in ec}, phases=phases)
