"""The measurement record: one immutable JSON file per run, its schema, and how records are written and read.

Standard library only (no torch): the report, the tests and the sweep's resume logic read records with it.

A record is written once, never edited (``write_record`` refuses to overwrite: it writes a temporary file with
``open(..., "x")`` and links it to the final name, which fails if that name exists, so a killed run leaves no
half-written record).  A second run of the same configuration adds a new file (``...--run2.json``).

Top-level keys (``SCHEMA_VERSION`` 1; measurements/README.md documents every field):

- ``schema_version``, ``created_at`` (UTC, ISO 8601), ``key`` (``config_key``: model + options + device + cap),
  ``status`` (``ok`` | ``oom`` | ``failed``), ``error`` (one line; None when ok), ``device`` (``cuda`` | ``cpu``);
- ``model``: the ModelSpec fields; ``options``: ``FinetuneConfig.options()`` verbatim;
- ``run``: steps, warm-up, seed, memory cap and how the run was started;
- ``env``: GPU, driver, CUDA, package versions, lora_budget version, git commit and dirty flag (no host name);
- ``measured``: the readings (bytes are ints, times are seconds); ``predicted``: ``Estimate.as_dict()`` made at
  measurement time plus ``estimator_version``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError

#: Version of the record layout; bump on an incompatible change (readers refuse newer versions).
SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "failed")
DEVICES = ("cuda", "cpu")
TOP_KEYS = ("schema_version", "created_at", "key", "status", "error", "device", "model", "options", "run", "env",
            "measured", "predicted")
#: Readings that every record carries (None where the backend cannot read them, e.g. reserved bytes on the CPU).
MEASURED_BYTES = ("baseline_allocated_bytes", "baseline_reserved_bytes", "model_allocated_bytes",
                  "peak_allocated_bytes", "peak_reserved_bytes", "peak_active_bytes", "context_bytes",
                  "nvml_device_used_peak_bytes", "nvml_process_used_peak_bytes")
#: Readings an ``ok`` record must have (positive).
OK_REQUIRED = ("peak_allocated_bytes", "step_time_s", "tokens_per_second", "total_params", "trainable_params")


class RecordError(ConfigError):
    """A file that is not a valid measurement record (the message names the file and the field)."""


def utc_now() -> str:
    """The current time as ``2026-01-31T12:00:00Z`` (UTC, seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def model_fields(spec) -> dict:
    """A ModelSpec as a JSON dict (tuples become lists)."""
    return _jsonable(asdict(spec))


def config_key(spec, options: dict, device: str, memory_cap_bytes: int | None) -> str:
    """Stable 16-hex-digit identity of a run: the model (name + architecture), the options, device and cap.

    Two runs with the same key measure the same thing; a sweep skips configurations whose key has a record.
    Steps, warm-up and seed are not part of the key (they do not change what is measured).
    """
    ident = {
        "model": {"name": spec.name, "architecture": spec.to_hf_config()},
        "options": _jsonable(dict(options)),
        "device": device,
        "memory_cap_bytes": memory_cap_bytes,
    }
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.")
    return s or "model"


def model_slug(name: str) -> str:
    """A file-name-safe model name: catalog names as they are; a config.json path by its folder name."""
    if os.sep in name or name.endswith(".json"):
        p = Path(name)
        name = p.parent.name if p.name == "config.json" else p.stem
    return _slug(name)


def record_stem(model_name: str, options: dict, key: str) -> str:
    """``<model>--<method>--r<rank>--mb<micro>--s<seq>--<key>``, e.g. ``llama-2-7b--qlora--r64--mb1--s512--1a2b...``."""
    return (f"{model_slug(model_name)}--{options['method']}--r{options.get('lora_rank') or 0}"
            f"--mb{options['batch_size']}--s{options['seq_len']}--{key}")


@dataclass(frozen=True)
class Measurement:
    """One run of one configuration.  ``as_dict()`` is the JSON record; ``from_dict`` validates one."""

    key: str
    status: str
    device: str
    model: dict
    options: dict
    run: dict
    env: dict
    measured: dict
    predicted: dict
    error: str | None = None
    created_at: str = field(default_factory=utc_now)
    schema_version: int = SCHEMA_VERSION

    def as_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in TOP_KEYS}

    @classmethod
    def from_dict(cls, d: dict, where: str = "record") -> "Measurement":
        validate_record(d, where)
        return cls(**{k: d[k] for k in TOP_KEYS})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def model_name(self) -> str:
        return self.model.get("name", "")

    @property
    def stem(self) -> str:
        return record_stem(self.model_name, self.options, self.key)

    def spec(self):
        """The ModelSpec that was measured (rebuilt from ``model``)."""
        return spec_from_fields(self.model)

    def config(self):
        """The FinetuneConfig that was measured (rebuilt from ``options``; no defaults are re-applied)."""
        return config_from_options(self.options)


def spec_from_fields(fields_: dict):
    """A ModelSpec from a record's ``model`` dict (lists back to tuples)."""
    from ..models import ModelSpec

    d = dict(fields_)
    d["aliases"] = tuple(d.get("aliases") or ())
    d["extra_config"] = tuple(tuple(kv) for kv in (d.get("extra_config") or ()))
    return ModelSpec(**d)


def config_from_options(options: dict):
    """A validated FinetuneConfig from ``FinetuneConfig.options()`` output (e.g. a record's ``options``)."""
    from ..finetune import FinetuneConfig, validate

    d = dict(options)
    if isinstance(d.get("target_modules"), list):
        d["target_modules"] = tuple(d["target_modules"])
    try:
        cfg = FinetuneConfig(**d)
    except TypeError as exc:
        raise RecordError(f"options do not match this lora_budget's FinetuneConfig: {exc}") from None
    validate(cfg)
    return cfg


def _fail(where: str, msg: str):
    raise RecordError(f"{where}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_record(d, where: str = "record") -> None:
    """Raise RecordError naming the field when ``d`` does not follow the current schema."""
    if not isinstance(d, dict):
        _fail(where, "expected a JSON object")
    missing = [k for k in TOP_KEYS if k not in d]
    if missing:
        _fail(where, f"missing field(s) {', '.join(missing)}")
    if d["schema_version"] != SCHEMA_VERSION:
        _fail(where, f"schema_version {d['schema_version']!r} is not {SCHEMA_VERSION} (this lora_budget reads "
                     f"version {SCHEMA_VERSION} only)")
    for k in ("created_at", "key"):
        if not isinstance(d[k], str) or not d[k]:
            _fail(where, f"field {k!r} must be a non-empty string")
    if not re.fullmatch(r"[0-9a-f]{16}", d["key"]):
        _fail(where, f"field 'key' must be 16 hex digits, got {d['key']!r}")
    if d["status"] not in STATUSES:
        _fail(where, f"field 'status' must be one of {', '.join(STATUSES)}, got {d['status']!r}")
    if d["status"] == "ok":
        if d["error"] is not None:
            _fail(where, "field 'error' must be null when status is ok")
    elif not isinstance(d["error"], str) or not d["error"]:
        _fail(where, f"field 'error' must say what happened when status is {d['status']}")
    if d["device"] not in DEVICES:
        _fail(where, f"field 'device' must be one of {', '.join(DEVICES)}, got {d['device']!r}")
    for k in ("model", "options", "run", "env", "measured", "predicted"):
        if not isinstance(d[k], dict):
            _fail(where, f"field {k!r} must be an object")
    for k in ("name", "model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if k not in d["model"]:
            _fail(where, f"field 'model.{k}' is missing")
    opts = d["options"]
    for k in ("method", "batch_size", "seq_len", "gradient_accumulation_steps"):
        if k not in opts:
            _fail(where, f"field 'options.{k}' is missing")
    if opts["method"] not in ("full", "lora", "qlora"):
        _fail(where, f"field 'options.method' must be full, lora or qlora, got {opts['method']!r}")
    run = d["run"]
    for k in ("steps", "warmup"):
        if not _is_int(run.get(k)) or run[k] < 0:
            _fail(where, f"field 'run.{k}' must be a non-negative integer")
    cap = run.get("memory_cap_bytes")
    if cap is not None and (not _is_int(cap) or cap <= 0):
        _fail(where, "field 'run.memory_cap_bytes' must be a positive integer or null")
    m = d["measured"]
    for k in MEASURED_BYTES:
        if k not in m:
            _fail(where, f"field 'measured.{k}' is missing (null when not readable)")
        v = m[k]
        if v is not None and not _is_int(v):
            _fail(where, f"field 'measured.{k}' must be an integer number of bytes or null, got {v!r}")
    for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_active_bytes", "model_allocated_bytes",
              "baseline_allocated_bytes", "baseline_reserved_bytes", "nvml_device_used_peak_bytes",
              "nvml_process_used_peak_bytes"):
        if m.get(k) is not None and m[k] < 0:
            _fail(where, f"field 'measured.{k}' must not be negative")
    if d["status"] == "ok":
        for k in OK_REQUIRED:
            v = m.get(k)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                _fail(where, f"field 'measured.{k}' must be positive in an ok record, got {v!r}")
        if m.get("peak_reserved_bytes") is not None and m["peak_reserved_bytes"] < m["peak_allocated_bytes"]:
            _fail(where, "field 'measured.peak_reserved_bytes' is below peak_allocated_bytes")
    p = d["predicted"]
    if "estimator_version" not in p:
        _fail(where, "field 'predicted.estimator_version' is missing")
    if "error" not in p:
        for k in ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes"):
            if not _is_int(p.get(k)):
                _fail(where, f"field 'predicted.{k}' must be an integer number of bytes (or predicted.error set)")


# ---- files -----------------------------------------------------------------------------------------------------
def write_record(record: Measurement | dict, folder: str | os.PathLike) -> Path:
    """Write ``record`` as a new file in ``folder`` and return its path.  Never overwrites anything.

    The name is ``record_stem(...) + ".json"``; when that exists (the same configuration measured again) the run
    gets ``--run2``, ``--run3``, ...  The file is written under a temporary name and hard-linked to its final name,
    which fails if the name exists, so a record is either complete or absent.
    """
    d = record.as_dict() if isinstance(record, Measurement) else dict(record)
    validate_record(d, "record to write")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = record_stem(d["model"]["name"], d["options"], d["key"])
    text = json.dumps(d, indent=2) + "\n"
    tmp = folder / f".{stem}.{os.getpid()}.tmp"
    with open(tmp, "x", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        for n in range(1, 1000):
            final = folder / (f"{stem}.json" if n == 1 else f"{stem}--run{n}.json")
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            return final
        raise ConfigError(f"too many runs of {stem} in {folder}")
    finally:
        tmp.unlink()


def read_record(path: str | os.PathLike) -> Measurement:
    """Read and validate one record file."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecordError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{p}: not valid JSON ({exc})") from None
    return Measurement.from_dict(d, str(p))


def record_paths(paths_or_dirs) -> list[Path]:
    """Every ``*.json`` record under the given files and folders (recursively), sorted, hidden files skipped."""
    if isinstance(paths_or_dirs, (str, os.PathLike)):
        paths_or_dirs = [paths_or_dirs]
    out: list[Path] = []
    for item in paths_or_dirs:
        p = Path(item)
        if p.is_dir():
            out.extend(q for q in sorted(p.rglob("*.json")) if not any(part.startswith(".") for part in
                                                                       q.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise RecordError(f"{p}: no such file or folder")
    return out


def load_records(paths_or_dirs) -> list[tuple[Path, Measurement]]:
    """(path, Measurement) of every record under the given files/folders; an invalid file raises RecordError."""
    return [(p, read_record(p)) for p in record_paths(paths_or_dirs)]


def index_records(folder: str | os.PathLike) -> dict[str, list[str]]:
    """``{key: [status, ...]}`` of the records in ``folder`` (what a resumed sweep skips).  Missing folder: {}."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    idx: dict[str, list[str]] = {}
    for p, rec in load_records(folder):
        idx.setdefault(rec.key, []).append(rec.status)
    return idx
