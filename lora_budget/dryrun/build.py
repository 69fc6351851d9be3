"""Build the HF causal-LM of a ``ModelSpec`` with full / LoRA / QLoRA applied, the way HF loading + peft + the
Trainer would, without downloading anything.

- The config comes from ``spec.to_hf_config()`` (``AutoConfig.for_model``); the load dtype is ``cfg.dtype`` and the
  model is *constructed* in that dtype, as ``from_pretrained(dtype=...)`` does (rotary ``inv_freq`` buffers stay
  fp32; a later ``model.to(bf16)`` would cast them too).
- QLoRA: ``nn.Linear`` layers are replaced by ``bnb.nn.Linear4bit`` through transformers' own
  ``Bnb4BitHfQuantizer._process_model_before_weight_loading`` (same skip list: lm_head / output embeddings / tied
  weights; same quant type, double quant, compute dtype and uint8 storage), then the weights are quantized through
  bitsandbytes (on ``meta`` its fake kernels give the exact packed / absmax / state2 shapes), then
  ``peft.prepare_model_for_kbit_training``.
- LoRA / QLoRA: ``peft.get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout, target_modules,
  task_type="CAUSAL_LM"))`` (adapters in fp32: peft's ``autocast_adapter_dtype=True``).
- Gradient checkpointing as the transformers 5 Trainer enables it: ``activation_checkpointing_enable()`` on the
  final (peft) model, i.e. ``use_reentrant=False`` and ``enable_input_require_grads()``.

``device="meta"`` gives the shapes-only model for the fake dry run; ``"cpu"`` / ``"cuda"`` give real random
weights (QLoRA weights are materialised and quantized one layer at a time, so a 70B QLoRA fits a 80 GB GPU).
"""

from __future__ import annotations

import contextlib
import os
import warnings

from ..errors import ConfigError


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_class(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def attn_implementation_for(cfg, device: str, config=None) -> str:
    """The attention implementation the model is built with.

    FlashAttention-2 needs the flash_attn package and a CUDA device; elsewhere it is traced as SDPA.  A model class
    without SDPA support (Gemma-2 in transformers 5.24: soft-capping) falls back to eager, as transformers' default
    choice does.
    """
    impl = cfg.attn_implementation
    if impl == "flash_attention_2" and not str(device).startswith("cuda"):
        impl = "sdpa"
    if impl == "sdpa" and config is not None and not getattr(model_class(config), "_supports_sdpa", True):
        impl = "eager"
    return impl


def hf_config(spec, cfg, device: str = "meta"):
    """The transformers config object of ``spec`` with the load dtype and attention implementation of ``cfg``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig

    d = spec.to_hf_config()
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    d["dtype"] = cfg.dtype
    config = AutoConfig.for_model(model_type, **d)
    config._attn_implementation = attn_implementation_for(cfg, device, config)
    return config


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def bnb_config(cfg):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(cfg.bnb_4bit_compute_dtype),
    )


def _replace_with_4bit(model, cfg):
    """transformers' own 4-bit replacement (Bnb4BitHfQuantizer before weight loading) on a meta model."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    qc = bnb_config(cfg)
    quantizer = Bnb4BitHfQuantizer(qc, pre_quantized=False)
    quantizer._process_model_before_weight_loading(model, device_map=None)
    model.config.quantization_config = qc
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    quantizer._process_model_after_weight_loading(model)   # sets is_loaded_in_4bit
    return model


def _ensure_bnb_cpu_qmap():
    """bnb caches its 256-entry dynamic map on the device of the first ``quantize_blockwise`` call; if that call is on
    meta, every later real quantization fails.  Seed the cache with the CPU map it would make."""
    import bitsandbytes.functional as bf

    if "dynamic" not in bf.name2qmap or bf.name2qmap["dynamic"].is_meta:
        bf.name2qmap["dynamic"] = bf.create_dynamic_map()


def _quantize_4bit_weights(model, device: str, dtype, std: float):
    """Quantize every Linear4bit weight on ``device`` (meta: fake kernels; real: random weights one at a time)."""
    import torch
    import bitsandbytes as bnb

    _ensure_bnb_cpu_qmap()
    for mod in model.modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        old = mod.weight
        if device == "meta":
            # the checkpoint weight would arrive in the load dtype; quant_state.dtype (the dequantize dtype) follows it
            old.data = old.data.to(dtype)
            old._quantize("meta")
            continue
        w = torch.empty(tuple(old.shape), dtype=dtype, device=device)
        w.normal_(0.0, std)
        kwargs = dict(old.__dict__)
        kwargs.pop("quant_state", None)
        kwargs.pop("bnb_quantized", None)
        kwargs.pop("_is_hf_initialized", None)
        new = bnb.nn.Params4bit(w, requires_grad=False, **kwargs)
        mod.weight = new.to(device)            # Params4bit.to quantizes (Bnb4bitQuantize does the same)
        del w, new


def _materialise_rest(model, device: str):
    """Give the remaining meta params/buffers real storage on ``device`` and initialise them like HF does."""
    import torch
    import bitsandbytes as bnb

    memo = {}
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in memo:
                memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            mod._parameters[n] = memo[id(p)]
        for n, b in list(mod._buffers.items()):
            if b is None or not b.is_meta:
                continue
            if id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device=device)
            mod._buffers[n] = memo[id(b)]
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                if mod.bias is not None:
                    mod.bias.zero_()
                continue
            if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                model._init_weights(mod)


def _cast_4bit_biases(model, compute_dtype):
    """``Linear4bit.forward`` replaces its bias by a compute-dtype copy at the first call (``bias.data =
    bias.data.to(x.dtype)``), after prepare_model_for_kbit_training made it fp32.  Apply that cast up front so the
    bias stays a parameter storage (and meta/fake and real runs agree)."""
    import bitsandbytes as bnb

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit) and mod.bias is not None and mod.bias.dtype != compute_dtype:
            mod.bias.data = mod.bias.data.to(compute_dtype)


def lora_config(spec, cfg):
    from peft import LoraConfig

    targets = cfg.target_modules
    if isinstance(targets, tuple):
        targets = list(targets)
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=float(cfg.lora_dropout),
                      target_modules=targets, task_type="CAUSAL_LM")


def build_model(spec, cfg, *, device: str = "meta"):
    """The HF causal LM for ``spec`` with ``cfg``'s method applied, in train mode, on ``device``.

    No download: built from ``spec.to_hf_config()``.  Real devices get random weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = str(device)
    dtype = torch_dtype(cfg.dtype)
    config = hf_config(spec, cfg, device)
    std = getattr(config, "initializer_range", 0.02) or 0.02
    with _quiet():
        if cfg.method == "qlora":
            with torch.device("meta"), _default_dtype(dtype):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _replace_with_4bit(model, cfg)
            _quantize_4bit_weights(model, device, dtype, std)
            if device != "meta":
                _materialise_rest(model, device)
        else:
            with torch.device(device), _default_dtype(dtype):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.train()

        if cfg.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            from peft import get_peft_model, prepare_model_for_kbit_training

            if cfg.method == "qlora":
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
                _cast_4bit_biases(model, torch_dtype(cfg.bnb_4bit_compute_dtype))
            try:
                lcfg = lora_config(spec, cfg)
                ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
                with ctx:
                    model = get_peft_model(model, lcfg)
            except ValueError as exc:
                raise ConfigError(f"peft cannot apply LoRA to {spec.model_type}: {exc}") from None
        if cfg.gradient_checkpointing:
            # transformers 5 Trainer(gradient_checkpointing=True): use_reentrant=False + enable_input_require_grads
            model.activation_checkpointing_enable()
        model.train()
    model.lb_attn_implementation = config._attn_implementation
    return model


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; 4-bit weights count their real (unpacked) elements."""
    total = trainable = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = real_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def real_numel(p) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        n = 1
        for d in qs.shape:
            n *= int(d)
        return n
    return p.numel()
