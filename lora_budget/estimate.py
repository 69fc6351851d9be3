"""``estimate``: parameters + memory of one training setup, and ``fit``: does it fit a GPU, and if not, what would.

``Estimate.as_dict()`` is the stable JSON shape of ``lora-budget estimate --json`` (keys documented in README).
"""

from __future__ import annotations

from dataclasses import dataclass

from .finetune import FinetuneConfig
from .gpus import GPUSpec
from .memory import MemoryBreakdown, memory_breakdown
from .models import ModelSpec
from .params import count_params, lora_params

#: Version of the JSON shape of ``Estimate.as_dict`` (bump on an incompatible change).
ESTIMATE_SCHEMA = 1


@dataclass(frozen=True)
class Estimate:
    """The prediction for one model and setup, optionally against one GPU."""

    model: ModelSpec
    config: FinetuneConfig
    total_params: int
    trainable_params: int
    adapted_modules: int
    memory: MemoryBreakdown
    gpu: GPUSpec | None = None

    @property
    def peak_allocated_bytes(self) -> int:
        return self.memory.peak_allocated

    @property
    def peak_reserved_bytes(self) -> int:
        return self.memory.peak_reserved

    @property
    def device_total_bytes(self) -> int:
        return self.memory.device_total

    @property
    def fits(self) -> bool | None:
        """Whether the device total (what NVML would read) fits the GPU's memory; None without a GPU."""
        if self.gpu is None:
            return None
        return self.device_total_bytes <= self.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        if self.gpu is None:
            return None
        return self.gpu.memory_bytes - self.device_total_bytes

    def as_dict(self) -> dict:
        m = self.memory
        d = {
            "schema": ESTIMATE_SCHEMA,
            "source": "analytical",
            "model": self.model.name,
            "model_type": self.model.model_type,
            "method": self.config.method,
            "options": self.config.options(),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "trainable_percent": round(100.0 * self.trainable_params / self.total_params, 4),
            "adapted_modules": self.adapted_modules,
            "peak_allocated_bytes": m.peak_allocated,
            "peak_reserved_bytes": m.peak_reserved,
            "device_total_bytes": m.device_total,
            "offloaded_bytes": m.offloaded,
            "peak_phase": m.peak_phase.name,
            "components": dict(m.components),
            "overheads": {"allocator_reserve": m.reserve, "cuda_context": m.context},
            "phases": {ph.name: {"total": ph.total, "components": dict(ph.components)} for ph in m.phases},
            "assumptions": list(self.config.assumptions) + list(m.notes),
        }
        if self.gpu is not None:
            d["gpu"] = {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes}
            d["fits"] = self.fits
            d["headroom_bytes"] = self.headroom_bytes
        return d


def estimate(model: ModelSpec, config: FinetuneConfig, gpu: GPUSpec | None = None) -> Estimate:
    """Predict parameters and memory of one training step of ``model`` under ``config``."""
    pc = count_params(model)
    lp, n_mod = lora_params(model, config)
    trainable = pc.total if config.method == "full" else lp
    return Estimate(model=model, config=config, total_params=pc.total, trainable_params=trainable,
                    adapted_modules=n_mod, memory=memory_breakdown(model, config), gpu=gpu)


@dataclass(frozen=True)
class Suggestion:
    """One change to the setup and the estimate it gives."""

    change: str
    estimate: Estimate

    @property
    def fits(self) -> bool:
        return bool(self.estimate.fits)


def _candidates(cfg: FinetuneConfig) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    if cfg.batch_size > 1:
        out.append((f"--batch-size 1 --gradient-accumulation-steps {cfg.batch_size * cfg.gradient_accumulation_steps}",
                    dict(batch_size=1, gradient_accumulation_steps=cfg.batch_size * cfg.gradient_accumulation_steps)))
    if not cfg.gradient_checkpointing:
        out.append(("--gradient-checkpointing", dict(gradient_checkpointing=True)))
    if cfg.optim in ("adamw_torch", "adamw_torch_fused"):
        out.append(("--optim adamw_8bit", dict(optim="adamw_8bit")))
        out.append(("--optim paged_adamw_8bit", dict(optim="paged_adamw_8bit")))
    if cfg.method == "full":
        out.append(("--method lora", dict(method="lora", lora_rank=8, lora_alpha=8, lora_dropout=0.0,
                                          target_modules=None, optim="adamw_torch_fused", mixed_precision="no")))
    if cfg.method in ("full", "lora"):
        out.append(("--method qlora", dict(method="qlora", lora_rank=cfg.lora_rank or 8, lora_alpha=cfg.lora_alpha or 8,
                                           lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules or None)))
    if cfg.is_lora and cfg.lora_rank > 8:
        out.append((f"--lora-rank 8", dict(lora_rank=8)))
    if cfg.seq_len > 256:
        half = cfg.seq_len // 2
        out.append((f"--seq-len {half}", dict(seq_len=half)))
    if cfg.attn_implementation == "eager":
        out.append(("--attn-implementation sdpa", dict(attn_implementation="sdpa")))
    return out


def suggestions(est: Estimate, combine: bool = True) -> list[Suggestion]:
    """Changes that lower the memory, each with its new estimate; when none fits alone, cumulative ones too."""
    if est.gpu is None:
        return []
    out: list[Suggestion] = []
    cfg = est.config
    for label, change in _candidates(cfg):
        try:
            new_cfg = cfg.with_(**change)
            out.append(Suggestion(label, estimate(est.model, new_cfg, est.gpu)))
        except Exception:  # a change that is invalid for this model (e.g. rank) is skipped
            continue
    out = [s for s in out if s.estimate.device_total_bytes < est.device_total_bytes]
    if combine and not any(s.fits for s in out):
        # greedily stack the changes that help most until it fits
        cur = cfg
        labels: list[str] = []
        for _ in range(6):
            best = None
            for label, change in _candidates(cur):
                try:
                    e = estimate(est.model, cur.with_(**change), est.gpu)
                except Exception:
                    continue
                if best is None or e.device_total_bytes < best[1].device_total_bytes:
                    best = (label, e)
            if best is None or best[1].device_total_bytes >= estimate(est.model, cur, est.gpu).device_total_bytes:
                break
            labels.append(best[0])
            cur = best[1].config
            if best[1].fits:
                break
        if labels:
            out.append(Suggestion(" ".join(labels), estimate(est.model, cur, est.gpu)))
    out.sort(key=lambda s: (not s.fits, s.estimate.device_total_bytes))
    return out
