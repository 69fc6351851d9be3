"""Where a measurement was made: package versions, Python and OS, GPU / driver / CUDA, lora_budget's git commit.

Importing this module imports no torch; ``environment(device)`` imports torch only for the CUDA fields.  Nothing
here records the host name, user name or paths outside the repository.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from .. import __version__

#: Distributions whose versions change what a measurement reads (the HF stack follows their internals).
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "nvidia-ml-py", "click")
#: Environment variables that change the CUDA allocator, cuBLAS workspaces or module loading.
ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING", "CUBLAS_WORKSPACE_CONFIG",
            "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")

#: The repository holding this package (git commands run here).
REPO_DIR = Path(__file__).resolve().parents[2]


def package_versions() -> dict:
    """``{distribution: version or None}`` for ``PACKAGES`` (read from metadata; nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str, cwd: Path) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(repo_dir: str | os.PathLike | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the lora_budget source.

    ``dirty`` is True when the package sources (``lora_budget/`` and ``pyproject.toml``) differ from the commit,
    untracked files included: those are what the estimator and the harness run.  Measurement records written
    elsewhere in the repository do not make it dirty.  A copy of the tree without ``.git`` (e.g. shipped to a GPU
    machine) takes them from ``LORA_BUDGET_GIT_COMMIT`` / ``LORA_BUDGET_GIT_DIRTY`` (1/0) when set by whoever made
    the copy (``source`` says which); otherwise both are None (an installed wheel).
    """
    cwd = Path(repo_dir) if repo_dir else REPO_DIR
    if not (cwd / ".git").exists():
        commit = os.environ.get("LORA_BUDGET_GIT_COMMIT") or None
        dirty = os.environ.get("LORA_BUDGET_GIT_DIRTY")
        return {"commit": commit, "dirty": None if dirty is None else dirty.strip() not in ("0", "false", ""),
                "source": "environment" if commit else None}
    sha = _git("rev-parse", "HEAD", cwd=cwd)
    status = _git("status", "--porcelain", "--untracked-files=all", "--", "lora_budget", "pyproject.toml", cwd=cwd)
    if status is not None:
        status = "\n".join(line for line in status.splitlines() if "__pycache__" not in line)
    return {"commit": sha.strip() if sha else None, "dirty": (bool(status.strip()) if status is not None else None),
            "source": "git"}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host_environment() -> dict:
    """Python, OS, CPU model and core count, package versions, lora_budget version and git state (no torch)."""
    return {
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(),
        "lora_budget_version": __version__,
        "git": git_state(),
        "env_vars": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def nvml_driver() -> str | None:
    """The NVIDIA driver version through NVML, or None."""
    try:
        import pynvml  # type: ignore
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def cuda_environment(device_index: int = 0) -> dict:
    """The CUDA device as torch and NVML see it.  Imports torch; call only when measuring on CUDA."""
    import torch

    props = torch.cuda.get_device_properties(device_index)
    return {
        "gpu_name": props.name,
        "gpu_total_bytes": int(props.total_memory),
        "gpu_count": torch.cuda.device_count(),
        "device_index": device_index,
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": nvml_driver(),
        "torch_version": torch.__version__,
    }


def environment(device: str, device_index: int = 0) -> dict:
    """Everything a record's ``env`` holds for a run on ``device`` ("cuda" or "cpu")."""
    env = host_environment()
    if device == "cuda":
        env.update(cuda_environment(device_index))
    else:
        import torch

        env.update({"gpu_name": None, "gpu_total_bytes": None, "driver": None, "cuda_version": None,
                    "torch_version": torch.__version__, "torch_num_threads": torch.get_num_threads()})
    return env


def gpu_slug(name: str | None) -> str:
    """A folder-name-safe GPU name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"; None -> "cpu"."""
    if not name:
        return "cpu"
    s = name.lower().replace("nvidia", "").replace("geforce", "")
    s = "".join(ch if ch.isalnum() else "-" for ch in s)
    while "--" in s:
        s = s.replace("--", "-")
    return s.strip("-") or "gpu"
