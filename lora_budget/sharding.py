"""Per-GPU memory of data-parallel training over N GPUs: DDP, FSDP (FULL_SHARD, HYBRID_SHARD, SHARD_GRAD_OP) and
DeepSpeed ZeRO-1/2/3, with optional CPU offload.  Standard library only.

Built from the single-GPU ``Estimate``: every phase of the single-GPU breakdown (forward, backward, optimizer step)
is taken component by component; the model states are divided over the shard group, moved to the CPU when
offloaded, and the communication buffers each strategy adds are added to the phase they live in.  Activations,
logits and workspaces are per GPU and unchanged (every GPU runs its own micro-batch).

What each strategy shards (model states = parameters, gradients, optimizer state):

============================  ==========  ==========  ===========  ======================================
strategy                      params      gradients   optimizer    communication buffers added
============================  ==========  ==========  ===========  ======================================
single / ddp                  -           -           -            ddp: gradient buckets, one copy of the
                                                                   trainable gradients (``gradient_as_bucket_
                                                                   view=False``, torch's and accelerate's
                                                                   default), allocated at wrap time
zero1                         -           -           /N (+fp32)   reduce bucket
zero2                         -           /N          /N (+fp32)   reduce bucket
zero3                         /N          /N          /N (+fp32)   reduce bucket; gathered params: the
                                                                   largest module + the prefetch bucket
fsdp_full_shard               /N          /N          /N           gathered params: the root unit (embedding,
                                                                   lm_head, final norm: FSDP does not reshard
                                                                   the root after forward) + 2 decoder layers
                                                                   (current + prefetched); backward: one
                                                                   layer's unsharded gradients
fsdp_hybrid_shard             /G          /G          /G           as full_shard, sharded within a node of G
                                                                   GPUs and replicated across nodes
fsdp_shard_grad_op            - (fwd/bwd) /N          /N           one layer's unsharded gradients
============================  ==========  ==========  ===========  ======================================

DeepSpeed keeps its own optimizer layout when the trainable parameters are 16-bit (bf16/fp16 engines): an fp32
master copy (4 B/param), fp32 optimizer states on that master (torch AdamW: 8 B/param instead of 2x the param
dtype) and fp32 gradient partitions at the step (4 B/param); the DeepSpeed estimators count the same 2 + 18
bytes per parameter for ZeRO-2 (peers.md section 2.4).  FSDP and DDP keep the Trainer's own optimizer on the
parameters as they are (the single-GPU estimate's states).  Bucket sizes are the HF "auto" values
(``reduce_bucket_size = h²``, ``stage3_prefetch_bucket_size = 0.9·h²`` elements).

Offload: ``optimizer`` (DeepSpeed ``offload_optimizer``, ZeRO-1/2/3) keeps the optimizer state, the fp32 master
and (ZeRO-2/3) the gradient partitions in CPU memory and runs the step there; ``params`` (ZeRO-3
``offload_param`` together with ``offload_optimizer``; FSDP ``CPUOffload(offload_params=True)``, which moves
parameters, gradients and the optimizer step) keeps all model states in CPU memory and streams the parameters in
for every pass.  What leaves the GPU is reported as ``cpu`` bytes; cost.py charges the PCIe and CPU time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .activations import precision
from .errors import ConfigError
from .estimate import Estimate
from .memory import CUDA_CONTEXT, RESERVE_FRACTION, Phase, quantized_weight_bytes
from .params import count_params, layer_linears
from .units import MiB, ceil_div

STRATEGIES = ("single", "ddp", "fsdp_full_shard", "fsdp_hybrid_shard", "fsdp_shard_grad_op", "zero1", "zero2",
              "zero3")
OFFLOADS = ("none", "optimizer", "params")
#: Offloads each strategy supports.
ALLOWED_OFFLOADS = {
    "single": ("none",), "ddp": ("none",),
    "zero1": ("none", "optimizer"), "zero2": ("none", "optimizer"), "zero3": ("none", "optimizer", "params"),
    "fsdp_full_shard": ("none", "params"), "fsdp_hybrid_shard": ("none", "params"),
    "fsdp_shard_grad_op": ("none", "params"),
}
#: GPUs per node for HYBRID_SHARD's shard group (an 8-GPU HGX/DGX node).
GPUS_PER_NODE = 8
#: NCCL communicator buffers of a multi-GPU process, allocated outside torch's caching allocator (NVML sees them,
#: torch's counters do not).  NCCL_BUFFSIZE is 4 MiB per channel and peer; the total depends on the topology and
#: channel count.  An assumption, not a measurement: check it with ``lora-budget measure`` on the cluster.
NCCL_BUFFERS = 512 * MiB
#: HF DeepSpeed "auto" bucket sizes, in elements (transformers ``integrations/deepspeed.py``:
#: reduce_bucket_size = hidden_size**2, stage3_prefetch_bucket_size = 0.9 * hidden_size**2).
REDUCE_BUCKET_FACTOR = 1.0
PREFETCH_BUCKET_FACTOR = 0.9
#: torch optimizers whose state has the parameter's dtype (DeepSpeed puts them on its fp32 master copy).
PARAM_DTYPE_STATE_OPTIMS = ("adamw_torch", "adamw_torch_fused")

_PARAM_KEYS = ("weights", "quantized_weights", "lora_adapters")
_GRAD_KEYS = ("gradients",)
_OPT_KEYS = ("optimizer_state", "optimizer_step_temporaries", "fp32_master_weights", "fp32_gradients")


@dataclass(frozen=True)
class Sharding:
    """How the data-parallel job is laid out: strategy, GPU count, CPU offload, GPUs per node."""

    strategy: str = "single"
    n_gpus: int = 1
    offload: str = "none"
    gpus_per_node: int = GPUS_PER_NODE

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown sharding strategy {self.strategy!r}; use one of: {', '.join(STRATEGIES)}")
        if isinstance(self.n_gpus, bool) or not isinstance(self.n_gpus, int) or self.n_gpus < 1:
            raise ConfigError(f"--n-gpus must be a positive integer, got {self.n_gpus!r}")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"unknown offload {self.offload!r}; use none, optimizer or params")
        if self.offload not in ALLOWED_OFFLOADS[self.strategy]:
            if self.strategy in ("single", "ddp"):
                hint = "use zero2/zero3 (DeepSpeed) or fsdp_full_shard for CPU offload"
            elif self.strategy.startswith("fsdp"):
                hint = "FSDP offloads parameters, gradients and optimizer state together: use --offload params"
            else:
                hint = "parameter offload needs zero3"
            raise ConfigError(f"--offload {self.offload} is not available with {self.strategy}: {hint}")
        if self.strategy == "single" and self.n_gpus != 1:
            raise ConfigError(f"strategy 'single' is one GPU, not {self.n_gpus}: use ddp, fsdp_* or zero*")
        if self.gpus_per_node < 1:
            raise ConfigError("--gpus-per-node must be positive")

    @property
    def shard_size(self) -> int:
        """GPUs one copy of the sharded states is spread over."""
        if self.strategy in ("single", "ddp"):
            return 1
        if self.strategy == "fsdp_hybrid_shard":
            return min(self.n_gpus, self.gpus_per_node)
        return self.n_gpus

    @property
    def deepspeed(self) -> bool:
        return self.strategy.startswith("zero")

    @property
    def shards_params(self) -> bool:
        return self.strategy in ("zero3", "fsdp_full_shard", "fsdp_hybrid_shard")

    @property
    def shards_grads(self) -> bool:
        return self.strategy in ("zero2", "zero3") or self.strategy.startswith("fsdp")

    @property
    def shards_optimizer(self) -> bool:
        return self.strategy not in ("single", "ddp")

    @property
    def label(self) -> str:
        name = self.strategy if self.n_gpus > 1 or self.strategy != "single" else "single GPU"
        return name + ("" if self.offload == "none" else f"+offload {self.offload}")

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "n_gpus": self.n_gpus, "offload": self.offload,
                "gpus_per_node": self.gpus_per_node, "shard_size": self.shard_size}


@dataclass(frozen=True)
class Units:
    """Byte sizes of the pieces that are gathered or reduced whole (one decoder layer, the root modules)."""

    layer_params: int  # one decoder layer's parameters as stored (dense + 4-bit + adapters)
    layer_grads: int  # one decoder layer's trainable gradients
    root_params: int  # embedding, lm_head (untied), position embedding, final norm
    largest_module: int  # the largest single module's parameters (ZeRO-3 gathers module by module)


def units(est: Estimate) -> Units:
    """Per-layer and root-unit sizes of ``est``'s model under its config."""
    spec, cfg = est.model, est.config
    p = precision(cfg)
    pc = count_params(spec)
    L = spec.num_hidden_layers
    root_numel = pc.embedding + pc.position_embedding + pc.lm_head + pc.final_norm
    root = root_numel * p.param
    c = est.memory.components
    layer = (c["weights"] - root) // L + c["quantized_weights"] // L + c["lora_adapters"] // L
    if cfg.method == "full":
        layer_grads = max(c["gradients"] - root, 0) // L
    else:
        layer_grads = c["gradients"] // L
    if p.quantized:
        biggest_linear = max(quantized_weight_bytes(m.in_features * m.out_features, cfg.bnb_4bit_use_double_quant)
                             for m in layer_linears(spec))
    else:
        biggest_linear = max(m.in_features * m.out_features for m in layer_linears(spec)) * p.param
    largest = max(biggest_linear, spec.vocab_size * spec.hidden_size * p.param)
    return Units(layer_params=layer, layer_grads=layer_grads, root_params=root, largest_module=largest)


@dataclass(frozen=True)
class ShardedEstimate:
    """Per-GPU memory of one data-parallel rank.

    ``state``: the model states of one replica, unsharded, by component (bytes).  ``per_gpu_state``: what one GPU
    holds of them; ``cpu_state``: what one rank keeps in CPU memory instead.  ``phases``: the single-GPU phases
    with the states replaced by the per-GPU shares and the strategy's buffers added.
    """

    base: Estimate
    sharding: Sharding
    phases: tuple[Phase, ...]
    state: dict
    per_gpu_state: dict
    cpu_state: dict
    buffers: dict
    reserve: int
    context: int
    paged: int
    notes: tuple[str, ...] = field(default=())

    @property
    def gpu(self):
        return self.base.gpu

    @cached_property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda ph: ph.total)

    @cached_property
    def peak_allocated_bytes(self) -> int:
        return self.peak_phase.total

    @property
    def peak_reserved_bytes(self) -> int:
        return self.peak_allocated_bytes + self.reserve

    @property
    def device_total_bytes(self) -> int:
        return self.peak_reserved_bytes + self.context

    @property
    def cpu_bytes_per_gpu(self) -> int:
        """CPU memory one rank's offloaded states take (pinned buffers and CPU-Adam scratch not included)."""
        return sum(self.cpu_state.values())

    @property
    def cpu_bytes_per_node(self) -> int:
        return self.cpu_bytes_per_gpu * min(self.sharding.n_gpus, self.sharding.gpus_per_node)

    @property
    def fits(self) -> bool | None:
        if self.base.gpu is None:
            return None
        return self.device_total_bytes <= self.base.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        if self.base.gpu is None:
            return None
        return self.base.gpu.memory_bytes - self.device_total_bytes

    def as_dict(self) -> dict:
        peak = self.peak_phase
        d = {
            "sharding": self.sharding.as_dict(),
            "per_gpu_peak_allocated_bytes": self.peak_allocated_bytes,
            "per_gpu_peak_reserved_bytes": self.peak_reserved_bytes,
            "per_gpu_device_total_bytes": self.device_total_bytes,
            "peak_phase": peak.name,
            "peak_components": dict(peak.components),
            "state_bytes": dict(self.state),
            "per_gpu_state_bytes": dict(self.per_gpu_state),
            "cpu_bytes_per_gpu": self.cpu_bytes_per_gpu,
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "paged_bytes_per_gpu": self.paged,
            "buffers": dict(self.buffers),
            "overheads": {"allocator_reserve": self.reserve, "cuda_context_and_nccl": self.context},
            "notes": list(self.notes),
        }
        if self.base.gpu is not None:
            d["gpu"] = {"name": self.base.gpu.name, "memory_bytes": self.base.gpu.memory_bytes}
            d["fits"] = self.fits
            d["headroom_bytes"] = self.headroom_bytes
        return d


def _trainable_width(est: Estimate) -> int:
    p = precision(est.config)
    return p.param if est.config.method == "full" else p.adapter


def shard(est: Estimate, sharding: Sharding) -> ShardedEstimate:
    """Per-GPU memory of ``est``'s setup run data-parallel under ``sharding``.

    Raises ConfigError for a combination the frameworks refuse (paged bnb optimizers under DeepSpeed).
    """
    cfg = est.config
    s = sharding
    N = s.shard_size
    c = est.memory.components
    notes: list[str] = []
    if s.deepspeed and cfg.optim.startswith("paged"):
        raise ConfigError(f"DeepSpeed ZeRO does not page bnb optimizer state (--optim {cfg.optim}): use adamw_torch "
                          f"or adamw_8bit with {s.strategy}")
    P_t = est.trainable_params
    w_t = _trainable_width(est)
    h = est.model.hidden_size
    u = units(est)

    # DeepSpeed's own layout for 16-bit trainable params: fp32 master, fp32 states, fp32 grad partitions.
    ds_master = ds_grads32 = 0
    opt_factor = 1.0
    if s.deepspeed and w_t < 4:
        ds_master = 4 * P_t
        ds_grads32 = 4 * P_t
        if cfg.optim in PARAM_DTYPE_STATE_OPTIMS:
            opt_factor = 4 / w_t
        notes.append("DeepSpeed bf16/fp16 engine: fp32 master weights, fp32 optimizer states and fp32 gradient "
                     "partitions (2 + 18 B per trainable parameter for ZeRO-2, as DeepSpeed's estimators)")

    def sharded(key: str) -> bool:
        if key in _PARAM_KEYS:
            return s.shards_params
        if key in _GRAD_KEYS:
            return s.shards_grads
        if key in _OPT_KEYS:
            return s.shards_optimizer
        return False

    def offloaded(key: str) -> bool:
        if s.offload == "none":
            return False
        if key in _OPT_KEYS:
            return True
        if key in _GRAD_KEYS:
            return s.offload == "params" or s.strategy in ("zero2", "zero3")
        if key in _PARAM_KEYS:
            return s.offload == "params"
        return False

    # unsharded model states of one replica (at their largest, i.e. steady state)
    state = {k: c[k] for k in _PARAM_KEYS + _GRAD_KEYS}
    state["optimizer_state"] = int(c["optimizer_state"] * opt_factor)
    state["optimizer_step_temporaries"] = int(c["optimizer_step_temporaries"] * opt_factor)
    state["fp32_master_weights"] = ds_master
    state["fp32_gradients"] = ds_grads32
    per_gpu = {}
    cpu = {}
    for k, v in state.items():
        share = ceil_div(v, N) if sharded(k) else v
        if offloaded(k):
            per_gpu[k], cpu[k] = 0, share
        else:
            per_gpu[k], cpu[k] = share, 0

    def local(key: str, value: int) -> int:
        """One GPU's bytes of a component whose single-GPU value in a phase is ``value``."""
        if key in ("optimizer_state", "optimizer_step_temporaries"):
            value = int(value * opt_factor)
        if offloaded(key):
            return 0
        return ceil_div(value, N) if sharded(key) else value

    # buffers ---------------------------------------------------------------------------------------------------
    grad_w = 2 if w_t < 4 else 4
    reduce_bucket = min(int(REDUCE_BUCKET_FACTOR * h * h), P_t) * grad_w
    buffers = {}
    fwd_extra: dict = {}
    bwd_extra: dict = {}
    all_extra: dict = {}
    opt_extra: dict = {}
    if s.strategy == "ddp" and s.n_gpus > 1:
        buffers["ddp_gradient_buckets"] = c["gradients"]
        all_extra["ddp_gradient_buckets"] = c["gradients"]
    if s.deepspeed:
        buffers["reduce_bucket"] = reduce_bucket
        bwd_extra["reduce_bucket"] = reduce_bucket
        if ds_master:
            all_extra["fp32_master_weights"] = per_gpu["fp32_master_weights"]
            opt_extra["fp32_gradients"] = per_gpu["fp32_gradients"]
    if s.strategy == "zero3":
        gathered = u.largest_module + int(PREFETCH_BUCKET_FACTOR * h * h) * precision(cfg).param
        buffers["gathered_params"] = gathered
        fwd_extra["gathered_params"] = gathered
        bwd_extra["gathered_params"] = gathered
    if s.strategy in ("fsdp_full_shard", "fsdp_hybrid_shard"):
        gathered = u.root_params + 2 * u.layer_params
        buffers["gathered_params"] = gathered
        fwd_extra["gathered_params"] = gathered
        bwd_extra["gathered_params"] = gathered
    if s.strategy.startswith("fsdp"):
        buffers["unsharded_layer_gradients"] = u.layer_grads
        bwd_extra["unsharded_layer_gradients"] = u.layer_grads

    phases = []
    for ph in est.memory.phases:
        comps = {k: local(k, v) for k, v in ph.components.items()}
        if s.strategy == "fsdp_shard_grad_op" and not ph.name.endswith("optimizer_step") and s.offload == "none":
            for k in _PARAM_KEYS:  # parameters stay gathered from forward until the end of backward
                comps[k] = ph.components.get(k, 0)
        comps.update(all_extra)
        if ph.name.endswith("forward"):
            comps.update(fwd_extra)
        elif ph.name.endswith("backward"):
            comps.update(bwd_extra)
        else:
            comps.update(opt_extra)
        phases.append(Phase(ph.name, comps))
    peak = max(ph.total for ph in phases)
    reserve = int(peak * RESERVE_FRACTION)
    context = CUDA_CONTEXT + (NCCL_BUFFERS if s.n_gpus > 1 else 0)
    if s.n_gpus > 1:
        notes.append(f"NCCL buffers outside the allocator: {NCCL_BUFFERS // MiB} MiB per GPU (assumption)")
    paged = 0 if s.offload != "none" else ceil_div(est.memory.offloaded, N if s.shards_optimizer else 1)
    return ShardedEstimate(base=est, sharding=s, phases=tuple(phases), state=state, per_gpu_state=per_gpu,
                           cpu_state=cpu, buffers=buffers, reserve=reserve, context=context, paged=paged,
                           notes=tuple(notes))


@dataclass(frozen=True)
class OffloadTraffic:
    """Data one rank moves between CPU and GPU, and the CPU optimizer's work, for cost.py.

    ``per_step_bytes``: gradients down and updated parameters up once per optimizer step (optimizer offload).
    ``per_microbatch_bytes``: parameters streamed up for every forward, recompute and backward pass, and gradient
    shards down, when the parameters live on the CPU.  ``host_step_params``: trainable parameters the node's CPU
    updates per optimizer step.
    """

    per_step_bytes: int
    per_microbatch_bytes: int
    host_step_params: int


def offload_traffic(sh: ShardedEstimate) -> OffloadTraffic:
    """What offload costs per optimizer step and per micro-batch (zero when nothing is offloaded)."""
    s = sh.sharding
    if s.offload == "none":
        return OffloadTraffic(0, 0, 0)
    est = sh.base
    N = s.shard_size
    w_t = _trainable_width(est)
    P_shard = ceil_div(est.trainable_params, N)
    per_step = 2 * w_t * P_shard  # 16-bit (or fp32) gradients down, updated parameters up
    per_mb = 0
    if s.offload == "params":
        params = sum(sh.state[k] for k in _PARAM_KEYS)
        passes = 2 + (1 if est.config.gradient_checkpointing else 0)
        # each rank brings its own shard up and the all-gather runs over NVLink; the rank's PCIe link carries the
        # shard once per pass, plus the gradient shard down after backward
        per_mb = passes * ceil_div(params, N) + ceil_div(sh.state["gradients"], N)
        per_step = 0  # gradients and parameters are already on the CPU side
    node_share = min(s.n_gpus, s.gpus_per_node)
    return OffloadTraffic(per_step_bytes=per_step, per_microbatch_bytes=per_mb,
                          host_step_params=P_shard * node_share)
