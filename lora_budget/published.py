"""Published peak-memory measurements (``measurements/published/rows.csv``) and how each maps onto ``estimate``.

Torch-free and pandas-free: the standard library and the core only.  Each row is one measured training step
from a public source (LitGPT, torchtune, PEFT, ...) with its provenance, the peak exactly as published (value and
unit) and as an ``int`` number of bytes, the counter that measured it, and, when the setup can be expressed with
lora_budget's options, the catalog model and the options that reproduce it.  Rows that cannot be expressed
(multi-GPU sharding, a model type the estimator lacks, a kernel it does not model, an unknown counter) have
``maps`` false and say why in ``does_not_map``; rows that map use the same field for the differences that
remain.  The column meanings are in ``measurements/published/README.md``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .finetune import FinetuneConfig, make_config
from .models import ModelSpec, get_model

#: The committed data file (in the source tree next to the package; not shipped inside a wheel).
PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "measurements" / "published" / "rows.csv"

#: The counters a source can report.  "active" is torch's ``active_bytes.all.peak``; "nvml" is what nvidia-smi /
#: pynvml show for the process or device; "unstated" means the source does not say.
COUNTERS = ("allocated", "reserved", "active", "nvml", "unstated")

#: The Estimate quantity each counter is compared with.  Active bytes are allocated bytes that are not yet freed
#: back to the allocator in the same stream, so their peak tracks peak allocated (memory-accounting.md section 9).
COUNTER_QUANTITY = {
    "allocated": "peak_allocated_bytes",
    "active": "peak_allocated_bytes",
    "reserved": "peak_reserved_bytes",
    "nvml": "device_total_bytes",
}

#: Units a published peak may be written in, with their size in bytes.
PEAK_UNITS = {"GB": 10**9, "GiB": 2**30, "MB": 10**6, "MiB": 2**20}

#: Columns that hold ``make_config`` options, with the type of their value.
OPTION_TYPES = {
    "dtype": str, "mixed_precision": str, "optim": str, "batch_size": int, "seq_len": int, "lora_rank": int,
    "lora_alpha": float, "lora_dropout": float, "target_modules": str, "gradient_checkpointing": bool,
    "attn_implementation": str, "padding": bool, "bnb_4bit_quant_type": str, "bnb_4bit_use_double_quant": bool,
}

COLUMNS = ("id", "source_project", "source_document", "source_commit", "published_model", "gpu", "framework",
           "counter", "peak_value", "peak_unit", "peak_bytes", "maps", "model", "method",
           *OPTION_TYPES, "assumed", "does_not_map", "note")

#: Options that make_config refuses for a method (they are ignored when a row lists them for information).
_NOT_FOR = {
    "full": ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "bnb_4bit_quant_type",
             "bnb_4bit_use_double_quant"),
    "lora": ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant"),
    "qlora": (),
}


@dataclass(frozen=True)
class PublishedRow:
    """One published measurement.  ``peak_bytes`` is the peak in bytes, from ``peak_value`` x ``peak_unit``.

    ``options`` holds the (name, value) pairs of the option columns that are filled, typed; for a row that maps
    they are the ``make_config`` options of ``method`` that reproduce the published setup.
    """

    id: str
    source_project: str
    source_document: str
    source_commit: str
    published_model: str
    gpu: str
    framework: str
    counter: str
    peak_value: str
    peak_unit: str
    peak_bytes: int
    maps: bool
    model: str
    method: str
    options: tuple[tuple[str, object], ...]
    assumed: str
    does_not_map: str
    note: str

    @property
    def published(self) -> str:
        """The peak as the source printed it, e.g. "21.30 GB" or "60.0 GiB"."""
        return f"{self.peak_value} {self.peak_unit}"

    @property
    def quantity(self) -> str | None:
        """Name of the Estimate attribute this row's counter is compared with (None for "unstated")."""
        return COUNTER_QUANTITY.get(self.counter)

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)

    def spec(self) -> ModelSpec:
        """The catalog model of a row that maps.  Raises ConfigError for a row that does not."""
        if not self.maps:
            raise ConfigError(f"published row {self.id} does not map onto the estimator: {self.does_not_map}")
        return get_model(self.model)

    def config(self) -> FinetuneConfig:
        """The FinetuneConfig that reproduces the published setup.  Raises ConfigError for a row that does not map."""
        if not self.maps:
            raise ConfigError(f"published row {self.id} does not map onto the estimator: {self.does_not_map}")
        opts = {k: v for k, v in self.options if k not in _NOT_FOR[self.method]}
        if isinstance(opts.get("lora_alpha"), float) and opts["lora_alpha"].is_integer():
            opts["lora_alpha"] = int(opts["lora_alpha"])
        try:
            return make_config(self.method, **opts)
        except ConfigError as exc:
            raise ConfigError(f"published row {self.id}: {exc}") from None


def predicted_bytes(est, counter: str) -> int:
    """The quantity of Estimate ``est`` that a measurement taken with ``counter`` is compared with.

    Raises ConfigError for a counter that has no matching quantity ("unstated" or unknown).
    """
    if counter not in COUNTER_QUANTITY:
        raise ConfigError(f"counter {counter!r} has no matching estimate quantity; use one of "
                          f"{', '.join(COUNTER_QUANTITY)}")
    return int(getattr(est, COUNTER_QUANTITY[counter]))


def _parse(value: str, kind, where: str):
    if kind is bool:
        if value not in ("true", "false"):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value == "true"
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def _row(raw: dict, line: int, path: Path) -> PublishedRow:
    rid = raw.get("id") or f"line {line}"
    where = f"{path.name} row {rid}"
    counter = raw["counter"]
    if counter not in COUNTERS:
        raise ConfigError(f"{where}: unknown counter {counter!r}; use one of {', '.join(COUNTERS)}")
    unit = raw["peak_unit"]
    if unit not in PEAK_UNITS:
        raise ConfigError(f"{where}: unknown peak_unit {unit!r}; use one of {', '.join(PEAK_UNITS)}")
    peak_bytes = _parse(raw["peak_bytes"], int, f"{where} peak_bytes")
    value = _parse(raw["peak_value"], float, f"{where} peak_value")
    if peak_bytes != round(value * PEAK_UNITS[unit]):
        raise ConfigError(f"{where}: peak_bytes {peak_bytes} is not {raw['peak_value']} {unit}")
    maps = _parse(raw["maps"], bool, f"{where} maps")
    options = tuple((k, _parse(raw[k], kind, f"{where} {k}")) for k, kind in OPTION_TYPES.items() if raw[k] != "")
    row = PublishedRow(
        id=rid, source_project=raw["source_project"], source_document=raw["source_document"],
        source_commit=raw["source_commit"], published_model=raw["published_model"], gpu=raw["gpu"],
        framework=raw["framework"], counter=counter, peak_value=raw["peak_value"], peak_unit=unit,
        peak_bytes=peak_bytes, maps=maps, model=raw["model"], method=raw["method"], options=options,
        assumed=raw["assumed"], does_not_map=raw["does_not_map"], note=raw["note"])
    if maps:
        if not row.model or counter not in COUNTER_QUANTITY:
            raise ConfigError(f"{where}: a row that maps needs a catalog model and a counter with an estimate "
                              f"quantity ({', '.join(COUNTER_QUANTITY)})")
        if row.method not in ("full", "lora", "qlora"):
            raise ConfigError(f"{where}: a row that maps needs method full, lora or qlora, got {row.method!r}")
    elif not row.does_not_map:
        raise ConfigError(f"{where}: a row that does not map must say why in does_not_map")
    return row


def load_published(path: str | Path | None = None) -> list[PublishedRow]:
    """Read the published rows (default ``measurements/published/rows.csv``), in file order.

    Raises ConfigError when the file is missing, a column is missing, or a row is malformed (unknown counter or
    unit, bytes that disagree with the published value, a mapped row without model, an unmapped row without a
    reason).  Rows that map are not built into estimates here; ``PublishedRow.config`` does that.
    """
    p = Path(path) if path is not None else PUBLISHED_CSV
    if not p.is_file():
        raise ConfigError(f"no published measurements at {p} (the file ships with the source tree)")
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ConfigError(f"{p.name}: missing column(s) {', '.join(missing)}")
        rows = [_row(raw, n, p) for n, raw in enumerate(reader, start=2)]
    ids = [r.id for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ConfigError(f"{p.name}: duplicate id(s) {', '.join(dup)}")
    return rows
