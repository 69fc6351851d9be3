"""Measurements: run real fine-tuning steps (CUDA, or the CPU backend) and record what the device really used.

Importing this package imports no torch, transformers or pandas: the record layer (``record``) is standard library
only; ``measure()`` imports the harness (torch stack) when called and ``load_frame()`` imports pandas.

- ``measure(spec, cfg, device=..., steps=..., warmup=..., memory_cap_bytes=...) -> Measurement``
- ``write_record(measurement, folder) -> Path`` (never overwrites), ``read_record(path)``, ``load_records(paths)``
- ``run_sweep(sweep, out, ...)``: many configurations, resumable, optionally one process each
- ``load_frame(paths_or_dirs) -> pandas.DataFrame``: one row per record
"""

from __future__ import annotations

from .record import (SCHEMA_VERSION, Measurement, RecordError, config_key, load_records, read_record,
                     validate_record, write_record)


def measure(spec, cfg, **kwargs):
    """Run one configuration; see ``lora_budget.measure.harness.measure`` (imports torch)."""
    from .harness import measure as _measure

    return _measure(spec, cfg, **kwargs)


def run_sweep(sweep, out, **kwargs):
    """Run a sweep; see ``lora_budget.measure.sweep.run_sweep``."""
    from .sweep import run_sweep as _run_sweep

    return _run_sweep(sweep, out, **kwargs)


def load_frame(paths_or_dirs):
    """Records as a pandas DataFrame; see ``lora_budget.measure.frame.load_records`` (imports pandas)."""
    from .frame import load_records as _load

    return _load(paths_or_dirs)


__all__ = ["SCHEMA_VERSION", "Measurement", "RecordError", "config_key", "load_records", "read_record",
           "validate_record", "write_record", "measure", "run_sweep", "load_frame"]
