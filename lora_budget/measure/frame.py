"""Measurement records as a pandas DataFrame: one row per record, readings and predictions side by side.

pandas is imported inside ``load_records`` only.  Columns (every byte column is an integer or missing):

- identity: ``path``, ``key``, ``created_at``, ``status``, ``error``, ``device``, ``model``, ``model_type``, ``sweep``,
  ``steps``, ``warmup``, ``memory_cap_bytes``;
- every training option by its ``FinetuneConfig`` name (``method``, ``batch_size``, ``seq_len``, ...; a tuple of
  target modules becomes a comma list);
- ``measured_<name>`` for every scalar reading (``measured_peak_allocated_bytes``, ``measured_step_time_s``,
  ``measured_context_bytes``, ...) and ``measured_phase_<phase>_<allocated|reserved|active>`` per phase;
- ``predicted_<name>`` for every scalar of the prediction (``predicted_peak_allocated_bytes``,
  ``predicted_device_total_bytes``, ``predicted_estimator_version``, ...) and ``predicted_component_<name>``;
- environment: ``gpu_name``, ``gpu_total_bytes``, ``driver``, ``cuda_version``, ``torch``, ``transformers``,
  ``peft``, ``bitsandbytes``, ``lora_budget_version``, ``git_commit``, ``git_dirty``.
"""

from __future__ import annotations

from ..errors import MissingDependencyError
from .record import load_records as _read_all

ENV_COLUMNS = ("gpu_name", "gpu_total_bytes", "driver", "cuda_version", "compute_capability")
PACKAGE_COLUMNS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes")


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def record_row(path, rec) -> dict:
    """The flat dict of one record (what becomes a DataFrame row)."""
    row = {"path": str(path), "key": rec.key, "created_at": rec.created_at, "status": rec.status,
           "error": rec.error, "device": rec.device, "model": rec.model.get("name"),
           "model_type": rec.model.get("model_type"), "sweep": rec.run.get("sweep"), "steps": rec.run.get("steps"),
           "warmup": rec.run.get("warmup"), "memory_cap_bytes": rec.run.get("memory_cap_bytes")}
    for k, v in rec.options.items():
        row[k] = ",".join(v) if isinstance(v, list) else v
    for k, v in rec.measured.items():
        if k == "phases" and isinstance(v, dict):
            for ph, r in v.items():
                for kind, n in (r or {}).items():
                    row[f"measured_phase_{ph}_{kind}"] = n
        elif isinstance(v, dict):       # failure, busy_check: one level flattened
            for sub, n in v.items():
                if _scalar(n):
                    row[f"measured_{k}_{sub}"] = n
        elif _scalar(v):
            row[f"measured_{k}"] = v
    for k, v in rec.predicted.items():
        if k == "components" and isinstance(v, dict):
            for c, n in v.items():
                row[f"predicted_component_{c}"] = n
        elif k == "overheads" and isinstance(v, dict):
            for c, n in v.items():
                row[f"predicted_{c}_bytes"] = n
        elif _scalar(v):
            row[f"predicted_{k}"] = v
    env = rec.env
    for k in ENV_COLUMNS:
        row[k] = env.get(k)
    pk = env.get("packages") or {}
    for k in PACKAGE_COLUMNS:
        row[k] = pk.get(k)
    row["lora_budget_version"] = env.get("lora_budget_version")
    git = env.get("git") or {}
    row["git_commit"] = git.get("commit")
    row["git_dirty"] = git.get("dirty")
    return row


def load_records(paths_or_dirs):
    """Every record under the given files / folders as a pandas DataFrame (one row per record, sorted by path).

    Byte columns use pandas' nullable ``Int64`` so that missing readings (None on the CPU backend, or in an OOM
    record) stay integers.  Raises RecordError for an invalid file, MissingDependencyError without pandas.
    """
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError("loading records into a DataFrame needs pandas: pip install "
                                     "'lora_budget[report]'") from None
    rows = [record_row(p, rec) for p, rec in _read_all(paths_or_dirs)]
    df = pd.DataFrame(rows)
    for col in df.columns:
        if col.endswith("_bytes") or col.endswith("_allocated") or col.endswith("_reserved") \
                or col.endswith("_active") or col.endswith("_params") or col.startswith("predicted_component_"):
            values = df[col]
            if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer())
                   or v != v for v in values):
                df[col] = values.astype("Int64")
    return df
