"""lora_budget: GPU memory, time and cost of fine-tuning LLMs with full fine-tuning, LoRA and QLoRA.

The core (this package's top level) is standard-library only: importing it never imports torch, transformers,
pandas or matplotlib.  The optional parts live in ``lora_budget.dryrun`` (torch stack), ``lora_budget.measure``
(torch stack + NVML) and ``lora_budget.report`` (pandas, matplotlib) and import their dependencies when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (ConfigError, InfeasibleError, LoraBudgetError, MissingDependencyError, UnknownGPUError,
                     UnknownModelError)
from .finetune import FinetuneConfig, make_config
from .models import ModelSpec, from_hf_config, get_model, list_models, load_config_json

__all__ = [
    "__version__", "ConfigError", "InfeasibleError", "LoraBudgetError", "MissingDependencyError",
    "UnknownGPUError", "UnknownModelError", "FinetuneConfig", "make_config", "ModelSpec", "from_hf_config",
    "get_model", "list_models", "load_config_json",
]
