"""One training step as the HF Trainer runs it on one GPU: optimizer choice, micro-batches, autocast, loss scaling.

``make_optimizer(model, cfg)`` maps ``TrainingArguments.optim`` names to the optimizer the Trainer builds (two
param groups, decay / no-decay, as ``Trainer.create_optimizer``), with the implementation CUDA would use made
explicit.  bitsandbytes optimizers are real on CUDA; on CPU / fake tensors they are emulated by
``EmulatedBnbAdamW``, which allocates exactly the state tensors bnb 0.50 allocates.

``train_step(model, optimizer, cfg, batches, hooks)`` runs gradient_accumulation_steps micro-batches (forward with
labels under autocast when mixed precision is on, accelerate's fp32 conversion of the outputs, keep only the loss,
loss / accum, backward), then gradient clipping (max_grad_norm=1.0, the Trainer default), ``optimizer.step()`` and
``model.zero_grad(set_to_none=True)``.
"""

from __future__ import annotations

import torch

#: TrainingArguments defaults
LEARNING_RATE = 5e-5
ADAM_KWARGS = dict(betas=(0.9, 0.999), eps=1e-8)
MAX_GRAD_NORM = 1.0


def param_groups(model):
    """The Trainer's two groups: decay (weights) and no-decay (biases, norms); weight_decay 0.0 (the default)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]


def _on_cuda(model) -> bool:
    return any(p.device.type == "cuda" for p in model.parameters())


class EmulatedBnbAdamW(torch.optim.Optimizer):
    """The state bitsandbytes' ``Optimizer2State`` (AdamW, 0.50) allocates, for CPU / fake-tensor traces.

    Per parameter at the first step (``init_state``): 32-bit -> ``state1``, ``state2`` fp32 like p; 8-bit (p.numel()
    >= min_8bit_size=4096 and no 32-bit override) -> ``state1``, ``state2`` uint8 like p plus ``absmax1``,
    ``absmax2`` fp32 [ceil(n/256)], and the shared ``qmap1``/``qmap2`` (fp32[256] each, once per optimizer).
    Paged: state1/state2 of params with numel >= 1e5 come from cudaMallocManaged (``F.get_paged``), outside the
    caching allocator: they are created here like the others and reported as ``paged_states()`` so that the
    caller keeps them out of the device counts.  The update kernels work in place (no temporaries); parameters
    are not changed.
    """

    def __init__(self, params, optim_bits: int = 32, is_paged: bool = False, min_8bit_size: int = 4096,
                 lr: float = LEARNING_RATE, overrides32=()):
        super().__init__(params, dict(lr=lr, **ADAM_KWARGS, weight_decay=0.0))
        self.optim_bits = optim_bits
        self.is_paged = is_paged
        self.min_8bit_size = min_8bit_size
        self.overrides32 = {id(p) for p in overrides32}
        self.qmaps: list = []
        self._paged: list = []

    def paged_states(self) -> list:
        return list(self._paged)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
        return None

    def _buffer(self, p, dtype):
        buf = torch.zeros_like(p, dtype=dtype)
        if self.is_paged and p.numel() >= 1e5:
            self._paged.append(buf)
        return buf

    def _init_state(self, p, state):
        bits = 32 if id(p) in self.overrides32 else self.optim_bits
        dtype = torch.uint8 if bits == 8 and p.numel() >= self.min_8bit_size else torch.float32
        state["step"] = 0
        if dtype == torch.float32:
            state["state1"] = self._buffer(p, torch.float32)
            state["state2"] = self._buffer(p, torch.float32)
        else:
            if not self.qmaps:
                self.qmaps = [torch.zeros(256, dtype=torch.float32, device=p.device),
                              torch.zeros(256, dtype=torch.float32, device=p.device)]
            state["state1"] = self._buffer(p, torch.uint8)
            state["qmap1"] = self.qmaps[0]
            state["state2"] = self._buffer(p, torch.uint8)
            state["qmap2"] = self.qmaps[1]
            blocks = -(-p.numel() // 256)
            state["absmax1"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=p.device)


def _embedding_weights(model):
    """The Trainer's 8-bit override: every nn.Embedding weight gets 32-bit optimizer states."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]


def make_optimizer(model, cfg):
    """The optimizer the HF Trainer builds for ``cfg.optim`` (implementation made explicit as on CUDA).

    The returned optimizer carries ``lb_emulation``: one line describing what was built.
    """
    groups = param_groups(model)
    name = cfg.optim
    if name == "adamw_torch":
        opt = torch.optim.AdamW(groups, lr=LEARNING_RATE, **ADAM_KWARGS, foreach=True)
        opt.lb_emulation = ("optimizer: torch AdamW foreach=True (adamw_torch = torch's default implementation on "
                            "CUDA; foreach temporaries counted)")
    elif name == "adamw_torch_fused":
        opt = torch.optim.AdamW(groups, lr=LEARNING_RATE, **ADAM_KWARGS, fused=True)
        opt.lb_emulation = "optimizer: torch AdamW fused=True (adamw_torch_fused)"
    elif name == "sgd":
        opt = torch.optim.SGD(groups, lr=LEARNING_RATE, foreach=True)
        opt.lb_emulation = "optimizer: torch SGD foreach=True (no momentum: no state)"
    else:
        bits = 8 if "8bit" in name else 32
        paged = name.startswith("paged")
        overrides = _embedding_weights(model) if bits == 8 else []
        if _on_cuda(model):
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW(groups, lr=LEARNING_RATE, **ADAM_KWARGS, optim_bits=bits, is_paged=paged)
            if bits == 8:
                manager = bnb.optim.GlobalOptimManager.get_instance()
                for m in model.modules():
                    if isinstance(m, torch.nn.Embedding):
                        manager.register_module_override(m, "weight", {"optim_bits": 32})
            opt.lb_emulation = f"optimizer: bitsandbytes AdamW optim_bits={bits} is_paged={paged} (real)"
        else:
            opt = EmulatedBnbAdamW(groups, optim_bits=bits, is_paged=paged,
                                   overrides32=[p for p in overrides if p.requires_grad])
            opt.lb_emulation = (f"optimizer: bitsandbytes AdamW optim_bits={bits} is_paged={paged} emulated (state "
                                "tensors as bnb 0.50 Optimizer2State.init_state: 8-bit = uint8 state1/state2 + "
                                "fp32 absmax per 256 elements, fp32 states below 4096 elements, nn.Embedding "
                                "weights 32-bit (Trainer override); paged state of params >= 1e5 elements "
                                "counted as offloaded)")
    return opt


def autocast_dtype(cfg):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)


def make_batch(cfg, vocab_size: int, device="cpu") -> dict:
    """One micro-batch: input_ids random in [0, vocab); labels = a copy (the LM collators clone them); with
    ``cfg.padding`` an int64 attention_mask whose first row is padded on the right by a quarter of the sequence
    (labels -100 there).  Without padding no attention_mask is passed (HF drops an all-ones mask on real tensors but
    cannot see that it is all ones on fake ones)."""
    b, s = cfg.batch_size, cfg.seq_len
    ids = torch.randint(0, vocab_size, (b, s), device=device)
    labels = ids.clone()
    batch = {"input_ids": ids, "labels": labels}
    if cfg.padding:
        mask = torch.ones((b, s), dtype=torch.long, device=device)
        pad = max(1, s // 4)
        mask[0, s - pad:] = 0
        labels[0, s - pad:] = -100
        batch["attention_mask"] = mask
    return batch


def make_batches(cfg, vocab_size: int, n: int, device="cpu", on_batch=None):
    """``n`` micro-batches made lazily, one at a time, like the Trainer moving each micro-batch to the device in
    ``training_step`` and dropping it (``del inputs``) before backward.  The generator keeps no reference to a batch
    it has handed out.  ``on_batch(batch)`` is called on each (e.g. to note its storages)."""
    for _ in range(n):
        yield _noted(make_batch(cfg, vocab_size, device), on_batch)


def _noted(batch, on_batch):
    if on_batch is not None:
        on_batch(batch)
    return batch


def _to_fp32(out):
    """accelerate ``ConvertOutputsToFp32``: fp16/bf16 output tensors come back as ``.float()`` copies."""
    from collections.abc import Mapping

    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if isinstance(out, Mapping):
        for k in list(out.keys()):
            v = out[k]
            if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16):
                out[k] = v.float()
        return out
    return out


def train_step(model, optimizer, cfg, batches, hooks=None, *, max_grad_norm: float = MAX_GRAD_NORM,
               autocast_device: str | None = None):
    """One optimizer step over ``cfg.gradient_accumulation_steps`` micro-batches from the iterable ``batches``.

    ``hooks(event)`` is called with "forward" before each micro-batch's forward, "backward" right before its
    backward (only the scaled loss is alive then: logits and outputs are gone), and "optimizer_step" before the
    clipping + optimizer step.  Returns the detached loss of the last micro-batch.
    """
    hooks = hooks or (lambda event: None)
    accum = cfg.gradient_accumulation_steps
    dtype = autocast_dtype(cfg)
    if autocast_device is None:
        autocast_device = next(model.parameters()).device.type
        if autocast_device == "meta":
            autocast_device = "cpu"
    it = iter(batches)
    last = None
    model.train()
    for _ in range(accum):
        batch = next(it)
        hooks("forward")
        if dtype is not None:
            with torch.autocast(device_type=autocast_device, dtype=dtype):
                outputs = model(**batch)
            outputs = _to_fp32(outputs)
        else:
            outputs = model(**batch)
        loss = outputs["loss"]
        del outputs, batch
        loss = loss / accum                       # Trainer: loss / current_gradient_accumulation_steps
        hooks("backward")
        loss.backward()
        last = loss.detach()
        del loss
    hooks("optimizer_step")
    if max_grad_norm and max_grad_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return last
