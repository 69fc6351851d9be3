"""Dry run: the real HF transformers + peft (+ bitsandbytes) training step on FakeTensors, every storage counted.

The model is built on the meta device from the ``ModelSpec`` (nothing is downloaded), LoRA / QLoRA is applied the
way transformers + peft + the Trainer would, parameters become FakeTensors that claim device "cpu", and
``steps`` (>= 2) real training steps run under a storage tracker that rounds every storage to the CUDA caching
allocator's 512 B.  CUDA behaviours that a CPU trace does not show (bool dropout masks, foreach/fused optimizer
implementations, mem-efficient SDPA logsumexp padding, CUDA's autocast lists, bnb's dequant fallback, bnb
optimizer state) are emulated; ``DryRunResult.emulations`` lists them.

Importing this package does not import torch; ``dry_run`` does (5-15 s of imports).
"""

from __future__ import annotations

from ..errors import MissingDependencyError
from .result import CATEGORIES, PHASES, DryRunResult

_NEEDED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


def require_dependencies() -> None:
    """Raise MissingDependencyError unless torch, transformers, peft, accelerate and bitsandbytes are installed.

    Looks the packages up without importing them (``importlib.util.find_spec``; a module set to None in
    ``sys.modules`` counts as missing).
    """
    import importlib.util

    missing = []
    for name in _NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"the dry run needs {', '.join(missing)}: pip install 'lora_budget[dryrun]'")


def dry_run(model, cfg, *, steps: int = 2, progress=None) -> DryRunResult:
    """Trace ``steps`` training steps of ``model`` (a ModelSpec) with ``cfg`` (a FinetuneConfig) on fake tensors.

    ``progress`` is an optional ``callable(str)`` that receives short status messages.  Raises
    MissingDependencyError when the ``dryrun`` extra is not installed.
    """
    import os

    require_dependencies()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .run import dry_run as _dry_run

    return _dry_run(model, cfg, steps=steps, progress=progress)


__all__ = ["dry_run", "DryRunResult", "PHASES", "CATEGORIES", "require_dependencies"]
