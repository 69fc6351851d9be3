"""Time and dollars of a fine-tuning run: T tokens x epochs at an explicit model FLOPs utilisation (MFU) of the
GPU's dense bf16 peak, plus QLoRA dequantisation at the GPU's memory bandwidth and CPU-offload transfers, at the
catalog's (or a given) price per GPU-hour.  Standard library only.

Time of one micro-batch on one GPU::

    t = executed FLOPs / (peak · mfu)  +  dequant bytes / (bandwidth · BANDWIDTH_UTILISATION)
        + parameter-offload bytes / PCIE_BYTES_PER_S

and, once per optimizer step, the optimizer-offload transfers (PCIe) and the CPU Adam step (host memory
bandwidth).  N data-parallel GPUs run N micro-batches at a time at ``scaling_efficiency ** log2(N)`` of ideal
(communication not hidden behind compute).  The run processes ``tokens · epochs`` tokens, packed into sequences
of ``seq_len`` (no padding waste).

Every constant here is an assumption that a measured run should replace; they are named, documented, and shown
in every answer.  ``lora-budget measure`` records real step times.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from .compute import StepFlops, step_flops
from .errors import ConfigError
from .finetune import FinetuneConfig
from .gpus import GPUSpec
from .models import ModelSpec

#: Default MFU per method: the fraction of the dense bf16 peak achieved on the FLOPs we count.  These are
#: ASSUMPTIONS, not measurements.  Context: LLaMA pre-training reports ~380 tokens/s/GPU for 65B on A100-80GB
#: (Touvron et al. 2023, section 2.4) = 6·65.2e9·380 / 312e12 ≈ 48 % MFU for a heavily tuned pre-training stack;
#: PaLM reports 46 % (Chowdhery et al. 2022, table 3).  Fine-tuning with the HF Trainer on one node runs below that:
#: full 0.40.  LoRA 0.35: the frozen base removes the weight-gradient GEMMs, so the fixed elementwise work (norms,
#: rotary, softmax, adapter dropout, casts) is a larger share of the step.  QLoRA 0.30 on top of its dequantisation,
#: which is charged separately at the memory bandwidth: fp32 residual stream and norms after
#: prepare_model_for_kbit_training and the autocast casts add elementwise work.  Rough check: Llama-2-7B LoRA vs
#: QLoRA (nf4) on one A100 at micro-batch 1 took 6,686 s vs 10,060 s (RASCHKA-01/02 in published-measurements.csv,
#: a secondary transcription), a 1.50x ratio; this model gives 1.71x / 1.53x / 1.38x at 200 / 300 / 500 tokens
#: per micro-batch on an A100-40GB (r=8 on q,v, nf4 without double quantisation, no checkpointing).  Alpaca's
#: mean length was not checked here, so this is a consistency check, not a calibration.  Under gradient checkpointing the recompute is counted as executed work (PaLM's "hardware
#: FLOPs"), so the MFU reported back (model FLOPs / time / peak) is lower than the input.
DEFAULT_MFU = {"full": 0.40, "lora": 0.35, "qlora": 0.30}
#: Data-parallel scaling efficiency per doubling of the GPU count (an assumption for one NVLink node: 8 GPUs run
#: at 0.95**3 = 86 % of 8x one GPU).  Use 1.0 for ideal scaling, lower for PCIe-only or multi-node jobs.
DEFAULT_SCALING_EFFICIENCY = 0.95
#: Fraction of the datasheet memory bandwidth a streaming elementwise kernel reaches (STREAM-like kernels reach
#: 80-90 % on recent NVIDIA GPUs; an assumption).
BANDWIDTH_UTILISATION = 0.8
#: Host<->device bandwidth of one GPU for offload: PCIe 4.0 x16 is 32 GB/s per direction on paper, ~25 GB/s with
#: pinned memory (an assumption; PCIe 5.0 doubles it).
PCIE_BYTES_PER_S = 25e9
#: Host memory bandwidth the CPU optimizer step gets on one node (a dual-socket server's STREAM figure is
#: 100-300 GB/s; we take the low end: the step shares it with the pinned-memory copies).  An assumption.
HOST_MEMORY_BYTES_PER_S = 100e9
#: Bytes the CPU AdamW step touches per parameter: fp32 gradient read (4), master, exp_avg and exp_avg_sq read
#: and written (3 x 8), 16-bit parameter written (2).
CPU_ADAM_BYTES_PER_PARAM = 4 + 3 * 8 + 2

_TOKENS_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_TOKEN_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_tokens(text) -> int:
    """Parse a token count: "100M" (1e8), "1.5B" (1.5e9), "20000", "2k", "1e9".  Suffixes are decimal: K, M, B (or
    G), T.  Raises ConfigError for anything else or a count below one token."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = Decimal(text)
    else:
        m = _TOKENS_RE.match(str(text))
        if not m:
            raise ConfigError(f"cannot read token count {text!r}: write e.g. 100M, 1.5B or 20000")
        try:
            value = Decimal(m.group(1)) * _TOKEN_SUFFIX[m.group(2).lower()]
        except InvalidOperation:
            raise ConfigError(f"cannot read token count {text!r}: write e.g. 100M, 1.5B or 20000") from None
    n = int(value.to_integral_value())
    if n < 1:
        raise ConfigError(f"token count {text!r} must be at least 1 token")
    return n


def format_tokens(n: int) -> str:
    """1.5e9 -> "1.5B" (decimal suffixes, as parse_tokens reads them)."""
    for div, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.4g}{suffix}"
    return str(n)


def format_duration(seconds: float) -> str:
    """Seconds as "42 s", "12.5 min", "3.2 h" or "4.1 days"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def scaling_factor(n_gpus: int, efficiency_per_doubling: float = DEFAULT_SCALING_EFFICIENCY) -> float:
    """Fraction of ideal N-GPU throughput: ``efficiency ** log2(N)`` (1.0 for one GPU)."""
    if not (0 < efficiency_per_doubling <= 1):
        raise ConfigError(f"--scaling-efficiency must be in (0, 1], got {efficiency_per_doubling!r}")
    return efficiency_per_doubling ** math.log2(n_gpus) if n_gpus > 1 else 1.0


def default_mfu(method: str) -> float:
    return DEFAULT_MFU[method]


@dataclass(frozen=True)
class CostEstimate:
    """Time and money of a run.  Seconds are wall-clock of the whole job; ``gpu_hours`` = time x GPUs."""

    model: str
    method: str
    gpu: str
    n_gpus: int
    sharding: str
    tokens: int
    epochs: float
    tokens_processed: int
    seq_len: int
    micro_batch: int
    gradient_accumulation_steps: int
    global_batch: int
    optimizer_steps: int
    flops: StepFlops
    peak_tflops: float
    mfu: float
    scaling: float
    compute_s_per_microbatch: float
    dequant_s_per_microbatch: float
    offload_s_per_microbatch: float
    offload_s_per_step: float
    time_s: float
    price_usd_per_hour: float | None
    price_source: str
    assumptions: tuple[str, ...] = field(default=())

    @property
    def microbatch_s(self) -> float:
        return self.compute_s_per_microbatch + self.dequant_s_per_microbatch + self.offload_s_per_microbatch

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_processed / self.time_s

    @property
    def gpu_hours(self) -> float:
        return self.time_s * self.n_gpus / 3600

    @property
    def cost_usd(self) -> float | None:
        if self.price_usd_per_hour is None:
            return None
        return self.gpu_hours * self.price_usd_per_hour

    @property
    def total_model_flops(self) -> float:
        return self.flops.model_per_token * self.tokens_processed

    @property
    def achieved_mfu(self) -> float:
        """Model FLOPs (no recompute) per second of the whole job over the peak of all its GPUs."""
        return self.total_model_flops / (self.time_s * self.n_gpus * self.peak_tflops * 1e12)

    def as_dict(self) -> dict:
        return {
            "model": self.model, "method": self.method, "gpu": self.gpu, "n_gpus": self.n_gpus,
            "sharding": self.sharding, "tokens": self.tokens, "epochs": self.epochs,
            "tokens_processed": self.tokens_processed, "seq_len": self.seq_len, "micro_batch": self.micro_batch,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "global_batch": self.global_batch,
            "optimizer_steps": self.optimizer_steps, "flops_per_microbatch": self.flops.as_dict(),
            "model_flops_per_token": self.flops.model_per_token,
            "total_model_flops": self.total_model_flops,
            "peak_tflops": self.peak_tflops, "mfu": self.mfu, "achieved_mfu": self.achieved_mfu,
            "scaling": self.scaling,
            "seconds_per_microbatch": {"compute": self.compute_s_per_microbatch,
                                       "dequant": self.dequant_s_per_microbatch,
                                       "offload": self.offload_s_per_microbatch},
            "offload_s_per_step": self.offload_s_per_step,
            "tokens_per_s": self.tokens_per_s, "time_s": self.time_s, "gpu_hours": self.gpu_hours,
            "price_usd_per_hour": self.price_usd_per_hour, "price_source": self.price_source,
            "cost_usd": self.cost_usd, "assumptions": list(self.assumptions),
        }


def run_cost(spec: ModelSpec, cfg: FinetuneConfig, gpu: GPUSpec, tokens: int, *, epochs: float = 1.0,
             n_gpus: int = 1, sharding_label: str = "", offload=None, mfu: float | None = None,
             price_usd_per_hour: float | None = None, tflops: float | None = None,
             scaling_efficiency: float = DEFAULT_SCALING_EFFICIENCY) -> CostEstimate:
    """Time and cost of training ``spec`` under ``cfg`` on ``n_gpus`` x ``gpu`` for ``tokens`` x ``epochs``.

    Args:
        cfg: the per-GPU micro-batch (batch_size x seq_len) and gradient accumulation.
        offload: an ``sharding.OffloadTraffic`` when states are offloaded to the CPU (None: nothing offloaded).
        mfu: model FLOPs utilisation in (0, 1]; default ``DEFAULT_MFU[cfg.method]``.
        price_usd_per_hour: per GPU; default the catalog price (None there: no dollar figure).
        tflops: dense bf16 peak override (needed for a bare-capacity GPU such as "48GB").
        scaling_efficiency: per doubling of the GPU count.

    Raises:
        ConfigError: bad token count, epochs, MFU or price; a GPU without a TFLOP/s figure and no ``tflops``.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"token count must be a positive integer, got {tokens!r}")
    if not (epochs > 0):
        raise ConfigError(f"--epochs must be positive, got {epochs!r}")
    mfu = DEFAULT_MFU[cfg.method] if mfu is None else mfu
    if not (0 < mfu <= 1):
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu!r}")
    peak = tflops if tflops is not None else gpu.bf16_tflops
    if not peak or peak <= 0:
        raise ConfigError(f"GPU {gpu.name} has no TFLOP/s figure (a bare capacity): give --tflops or a catalog GPU")
    price = price_usd_per_hour if price_usd_per_hour is not None else gpu.price_usd_per_hour
    if price is not None and price < 0:
        raise ConfigError(f"--price must not be negative, got {price!r}")
    price_source = ("given on the command line" if price_usd_per_hour is not None
                    else (f"{gpu.price_source}, as of {gpu.price_as_of}" if gpu.price_usd_per_hour is not None
                          else "no price in the catalog"))
    assumptions = [f"MFU {mfu:.2f} of the dense bf16 peak {peak:g} TFLOP/s"
                   + (" (default for " + cfg.method + "; an assumption)" if mfu == DEFAULT_MFU[cfg.method] else "")]
    fl = step_flops(spec, cfg)
    compute_s = fl.executed / (peak * 1e12 * mfu)
    dequant_s = 0.0
    if fl.dequant_bytes:
        if not gpu.bandwidth_gbps:
            raise ConfigError(f"GPU {gpu.name} has no memory bandwidth figure: QLoRA dequantisation time unknown; "
                              f"use a catalog GPU")
        dequant_s = fl.dequant_bytes / (gpu.bandwidth_gbps * 1e9 * BANDWIDTH_UTILISATION)
        assumptions.append(f"QLoRA dequantises every 4-bit weight {fl.dequant_calls_per_weight}x per micro-batch "
                           f"at {BANDWIDTH_UTILISATION:.0%} of {gpu.bandwidth_gbps:g} GB/s")
    offload_mb_s = offload_step_s = 0.0
    if offload is not None and (offload.per_microbatch_bytes or offload.per_step_bytes):
        offload_mb_s = offload.per_microbatch_bytes / PCIE_BYTES_PER_S
        offload_step_s = (offload.per_step_bytes / PCIE_BYTES_PER_S
                          + offload.host_step_params * CPU_ADAM_BYTES_PER_PARAM / HOST_MEMORY_BYTES_PER_S)
        assumptions.append(f"CPU offload: PCIe {PCIE_BYTES_PER_S / 1e9:g} GB/s per GPU, CPU AdamW at "
                           f"{HOST_MEMORY_BYTES_PER_S / 1e9:g} GB/s host memory bandwidth, not overlapped")
    scale = scaling_factor(n_gpus, scaling_efficiency)
    if n_gpus > 1:
        assumptions.append(f"{n_gpus} GPUs at {scale:.0%} of ideal ({scaling_efficiency:g} per doubling)")
    processed = int(round(tokens * epochs))
    per_mb_tokens = cfg.tokens
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * n_gpus
    steps = max(1, math.ceil(processed / (global_batch * cfg.seq_len)))
    microbatches_per_gpu = processed / (per_mb_tokens * n_gpus)
    mb_s = (compute_s + dequant_s) / scale + offload_mb_s
    time_s = microbatches_per_gpu * mb_s + steps * offload_step_s
    assumptions.append(f"{processed:,} tokens packed into sequences of {cfg.seq_len} (no padding)")
    if price is not None:
        assumptions.append(f"${price:g} per GPU-hour ({price_source})")
    if "no bf16" in gpu.notes and cfg.dtype == "bfloat16":
        assumptions.append(f"{gpu.name} has no bf16 tensor cores: bf16 training runs far below the fp16 peak used")
    return CostEstimate(
        model=spec.name, method=cfg.method, gpu=gpu.name, n_gpus=n_gpus,
        sharding=sharding_label or ("single GPU" if n_gpus == 1 else "ddp"), tokens=tokens, epochs=epochs,
        tokens_processed=processed, seq_len=cfg.seq_len, micro_batch=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, global_batch=global_batch,
        optimizer_steps=steps, flops=fl, peak_tflops=peak, mfu=mfu, scaling=scale,
        compute_s_per_microbatch=compute_s, dequant_s_per_microbatch=dequant_s,
        offload_s_per_microbatch=offload_mb_s, offload_s_per_step=offload_step_s, time_s=time_s,
        price_usd_per_hour=price, price_source=price_source, assumptions=tuple(assumptions))
