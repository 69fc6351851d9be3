"""Rows behind the reports and charts: predicted vs measured, error summaries, sweeps, fit matrices, CSV output.

Pure Python over the estimator (no pandas needed; no matplotlib).  Every byte value is an ``int``; relative
errors are ``(predicted - measured) / measured`` as floats and are written with a fixed number of decimals so
that regenerated files are byte-identical.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import ConfigError, LoraBudgetError
from ..estimate import estimate, suggestions
from ..finetune import FinetuneConfig, validate
from ..models import ModelSpec
from ..published import COUNTER_QUANTITY, PublishedRow, predicted_bytes
from ..units import GB, GiB

#: Decimals of relative errors in CSV files (0.0001 = 0.01 %).
REL_DECIMALS = 4
#: Counters read from a measurement record (``measured`` keys, measurements/README.md) and compared like
#: published rows.  NVML: the process's own peak is what ``device_total_bytes`` predicts; where NVML cannot see
#: the process (containers) the device-wide peak minus the device's use before CUDA was initialised stands in.
RECORD_COUNTERS = {
    "allocated": "peak_allocated_bytes",
    "reserved": "peak_reserved_bytes",
    "nvml": "nvml_process_used_peak_bytes",
}


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def record_reading(measured: dict, counter: str) -> int | None:
    """The peak a record's ``measured`` holds for ``counter`` (None when it has none)."""
    v = measured.get(RECORD_COUNTERS[counter])
    if _count(v):
        return v
    if counter == "nvml":
        dev, before = measured.get("nvml_device_used_peak_bytes"), measured.get("nvml_used_before_init_bytes")
        if _count(dev) and isinstance(before, int) and not isinstance(before, bool) and dev > before:
            return dev - before
    return None


@dataclass(frozen=True)
class Comparison:
    """One measured peak beside the estimate of the same setup, for the counter that measured it."""

    id: str
    kind: str  # "published" or "record"
    source: str
    model: str
    method: str
    counter: str
    measured_bytes: int
    predicted_bytes: int
    measured_as_published: str
    setup: str
    differences: str = ""

    @property
    def quantity(self) -> str:
        return COUNTER_QUANTITY[self.counter]

    @property
    def rel_error(self) -> float:
        """(predicted - measured) / measured: positive when the estimator predicts more than was measured."""
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes


@dataclass(frozen=True)
class NotCompared:
    """A published row or record that has no comparison, and why."""

    id: str
    kind: str
    source: str
    method: str
    counter: str
    measured_as_published: str
    reason: str


def setup_text(cfg: FinetuneConfig) -> str:
    """A one-line description of a training setup (the options that change memory)."""
    parts = [f"batch {cfg.batch_size} x {cfg.seq_len}", cfg.dtype]
    if cfg.mixed_precision != "no":
        parts.append(f"autocast {cfg.mixed_precision}")
    parts.append(cfg.optim)
    if cfg.is_lora:
        tm = cfg.target_modules
        tm = tm if isinstance(tm, str) else (",".join(tm) if tm else "peft default")
        parts.append(f"r={cfg.lora_rank} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} on {tm}")
    if cfg.method == "qlora":
        parts.append(f"{cfg.bnb_4bit_quant_type}{' double-quant' if cfg.bnb_4bit_use_double_quant else ''}")
    parts.append("checkpointing" if cfg.gradient_checkpointing else "no checkpointing")
    parts.append(cfg.attn_implementation + (" padded" if cfg.padding else ""))
    return ", ".join(parts)


# ---- published rows ----------------------------------------------------------------------------------------------
def compare_published(rows: list[PublishedRow]) -> tuple[list[Comparison], list[NotCompared]]:
    """Estimate every published row that maps; list the others with their reason."""
    done: list[Comparison] = []
    skipped: list[NotCompared] = []
    for r in rows:
        if not r.maps:
            skipped.append(NotCompared(r.id, "published", r.source_project, r.method, r.counter, r.published,
                                       r.does_not_map))
            continue
        cfg = r.config()
        est = estimate(r.spec(), cfg)
        done.append(Comparison(id=r.id, kind="published", source=r.source_project, model=r.model,
                               method=cfg.method, counter=r.counter, measured_bytes=r.peak_bytes,
                               predicted_bytes=predicted_bytes(est, r.counter), measured_as_published=r.published,
                               setup=setup_text(cfg), differences=r.does_not_map))
    return done, skipped


# ---- measurement records ----------------------------------------------------------------------------------------
def record_files(paths) -> list[Path]:
    """Every ``*.json`` under the given files and folders (recursively, hidden ones skipped), sorted by path."""
    out: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            out.extend(q for q in sorted(p.rglob("*.json"))
                       if not any(part.startswith(".") for part in q.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    return sorted(set(out), key=lambda q: (q.name, str(q)))


def _model_from_record(d: dict) -> ModelSpec:
    m = d.get("model")
    if isinstance(m, str):
        from ..models import get_model

        return get_model(m)
    if not isinstance(m, dict):
        raise ConfigError("no 'model' object")
    names = {f.name for f in fields(ModelSpec)}
    kw = {k: v for k, v in m.items() if k in names}
    if "aliases" in kw:
        kw["aliases"] = tuple(kw["aliases"] or ())
    if "extra_config" in kw:
        kw["extra_config"] = tuple(tuple(x) for x in (kw["extra_config"] or ()))
    try:
        return ModelSpec(**kw)
    except TypeError as exc:
        raise ConfigError(f"model fields incomplete ({exc})") from None


def _config_from_record(d: dict) -> FinetuneConfig:
    opts = d.get("options") or d.get("config") or d.get("finetune")
    if not isinstance(opts, dict) or "method" not in opts:
        raise ConfigError("no 'options' object with a method")
    names = {f.name for f in fields(FinetuneConfig)} - {"assumptions"}
    kw = {k: v for k, v in opts.items() if k in names}
    if isinstance(kw.get("target_modules"), list):
        kw["target_modules"] = tuple(kw["target_modules"])
    cfg = FinetuneConfig(**kw)
    validate(cfg)
    return cfg


def compare_records(paths) -> tuple[list[Comparison], list[NotCompared]]:
    """Recompute the estimate of every measurement record and compare each counter it read.

    The reader follows ``lora_budget.measure.record`` (schema 1: ``status``, ``model`` fields, ``options``,
    ``measured``, ``env``) but tolerates missing parts: a record it cannot use is listed with the reason instead
    of stopping the report.  Records whose status is not ``ok`` (OOM, failed) have no peak to compare.
    """
    done: list[Comparison] = []
    skipped: list[NotCompared] = []
    for p in record_files(paths):
        rid = p.stem
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append(NotCompared(rid, "record", "?", "?", "", "", f"unreadable: {exc}"))
            continue
        if not isinstance(d, dict):
            skipped.append(NotCompared(rid, "record", "?", "?", "", "", "not a JSON object"))
            continue
        env = d.get("env") if isinstance(d.get("env"), dict) else {}
        device = d.get("device") or "cuda"
        source = f"measured on {env.get('gpu_name') or device}"
        method = (d.get("options") or {}).get("method", "?") if isinstance(d.get("options"), dict) else "?"
        status = d.get("status", "ok")
        if status != "ok":
            skipped.append(NotCompared(rid, "record", source, method, "", "",
                                       f"status {status}: {d.get('error') or 'no peak to compare'}"))
            continue
        try:
            spec = _model_from_record(d)
            cfg = _config_from_record(d)
            est = estimate(spec, cfg)
        except (LoraBudgetError, TypeError, ValueError, KeyError) as exc:
            skipped.append(NotCompared(rid, "record", source, method, "", "", f"cannot rebuild the estimate: {exc}"))
            continue
        measured = d.get("measured") if isinstance(d.get("measured"), dict) else {}
        found = False
        for counter in RECORD_COUNTERS:
            value = record_reading(measured, counter)
            if value is None:
                continue
            found = True
            done.append(Comparison(id=rid, kind="record", source=source, model=spec.name, method=cfg.method,
                                   counter=counter, measured_bytes=value,
                                   predicted_bytes=predicted_bytes(est, counter),
                                   measured_as_published=f"{value} B", setup=setup_text(cfg)))
        if not found:
            skipped.append(NotCompared(rid, "record", source, cfg.method, "", "", "no peak readings in 'measured'"))
    return done, skipped


def sort_comparisons(rows: list[Comparison]) -> list[Comparison]:
    order = {"published": 0, "record": 1}
    counters = {c: i for i, c in enumerate(COUNTER_QUANTITY)}
    return sorted(rows, key=lambda c: (order.get(c.kind, 9), c.id, counters.get(c.counter, 9)))


# ---- summaries ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """Error statistics of one group of comparisons (absolute relative errors; ``median_rel_error`` keeps sign)."""

    group_by: str
    group: str
    n: int
    median_abs_rel_error: float
    worst_abs_rel_error: float
    worst_id: str
    median_rel_error: float


def summarize(rows: list[Comparison]) -> list[Summary]:
    """Median and worst |relative error| over all rows, then by counter, by method and by source."""
    out: list[Summary] = []
    keys = (("all", lambda c: "all"), ("counter", lambda c: c.counter), ("method", lambda c: c.method),
            ("source", lambda c: c.source))
    for group_by, key in keys:
        groups: dict[str, list[Comparison]] = {}
        for c in rows:
            groups.setdefault(key(c), []).append(c)
        for name in sorted(groups):
            g = groups[name]
            worst = max(g, key=lambda c: (abs(c.rel_error), c.id))
            out.append(Summary(group_by, name, len(g), statistics.median(abs(c.rel_error) for c in g),
                               abs(worst.rel_error), f"{worst.id} [{worst.counter}]",
                               statistics.median(c.rel_error for c in g)))
    return out


# ---- CSV ---------------------------------------------------------------------------------------------------------
def rel(x: float) -> str:
    """A relative error with a sign and REL_DECIMALS decimals, e.g. "+0.0412"."""
    s = f"{x:+.{REL_DECIMALS}f}"
    return "+0.0000" if s == "-0.0000" else s


def pct(x: float, digits: int = 1) -> str:
    """A relative error in percent with a sign, e.g. "+4.1%"."""
    s = f"{100 * x:+.{digits}f}%"
    return s.replace("-0.0%", "+0.0%") if digits == 1 else s


def csv_text(header: list[str], rows: list[list]) -> str:
    """CSV with "\\n" line ends (byte-stable on every platform)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


COMPARISON_COLUMNS = ["id", "kind", "source", "model", "method", "counter", "compared_with", "measured_as_published",
                      "measured_bytes", "predicted_bytes", "measured_gb", "predicted_gb", "rel_error", "setup",
                      "differences"]


def comparison_csv(rows: list[Comparison]) -> str:
    return csv_text(COMPARISON_COLUMNS, [
        [c.id, c.kind, c.source, c.model, c.method, c.counter, c.quantity, c.measured_as_published,
         c.measured_bytes, c.predicted_bytes, f"{c.measured_bytes / GB:.3f}", f"{c.predicted_bytes / GB:.3f}",
         rel(c.rel_error), c.setup, c.differences] for c in sort_comparisons(rows)])


SUMMARY_COLUMNS = ["group_by", "group", "n", "median_abs_rel_error", "worst_abs_rel_error", "worst_id",
                   "median_rel_error"]


def summary_csv(rows: list[Summary]) -> str:
    return csv_text(SUMMARY_COLUMNS, [
        [s.group_by, s.group, s.n, f"{s.median_abs_rel_error:.{REL_DECIMALS}f}",
         f"{s.worst_abs_rel_error:.{REL_DECIMALS}f}", s.worst_id, rel(s.median_rel_error)] for s in rows])


NOT_COMPARED_COLUMNS = ["id", "kind", "source", "method", "counter", "measured_as_published", "reason"]


def not_compared_csv(rows: list[NotCompared]) -> str:
    return csv_text(NOT_COMPARED_COLUMNS, [[n.id, n.kind, n.source, n.method, n.counter, n.measured_as_published,
                                            n.reason] for n in sorted(rows, key=lambda n: (n.kind, n.id))])


# ---- estimator tables for charts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bar:
    """The peak of one setup split by component (bytes), plus the allocator reserve and the CUDA context."""

    label: str
    method: str
    components: dict
    reserve: int
    context: int

    @property
    def device_total(self) -> int:
        return sum(self.components.values()) + self.reserve + self.context


def breakdown_bars(spec: ModelSpec, configs: dict[str, FinetuneConfig]) -> list[Bar]:
    """One Bar per labelled setup: ``Estimate.memory.peak_phase.components`` with reserve and context."""
    bars = []
    for label, cfg in configs.items():
        m = estimate(spec, cfg).memory
        bars.append(Bar(label, cfg.method, dict(m.peak_phase.components), m.reserve, m.context))
    return bars


@dataclass(frozen=True)
class SweepPoint:
    label: str
    method: str
    x: int
    device_total: int


def sweep(spec: ModelSpec, configs: dict[str, FinetuneConfig], axis: str, values) -> list[SweepPoint]:
    """Device total (what NVML would read) of each setup as ``axis`` ("seq_len" or "batch_size") takes ``values``."""
    if axis not in ("seq_len", "batch_size"):
        raise ConfigError(f"cannot sweep {axis!r}: use seq_len or batch_size")
    pts = []
    for label, cfg in configs.items():
        for v in values:
            est = estimate(spec, cfg.with_(**{axis: int(v)}))
            pts.append(SweepPoint(label, cfg.method, int(v), est.device_total_bytes))
    return pts


#: Fit-matrix cell states.
FITS, FITS_WITH_CHANGES, DOES_NOT_FIT = "fits", "fits with changes", "does not fit"


@dataclass(frozen=True)
class FitCell:
    model: str
    gpu: str
    gpu_bytes: int
    status: str
    device_total: int
    change: str = ""  # the first suggested change that fits (for "fits with changes")
    change_total: int = 0


def fit_matrix(specs: list[ModelSpec], gpus, cfg: FinetuneConfig) -> list[FitCell]:
    """Does each model fit each GPU with ``cfg``?  If not, does one of ``suggestions`` make it fit?"""
    cells = []
    for spec in specs:
        for g in gpus:
            est = estimate(spec, cfg, g)
            if est.fits:
                cells.append(FitCell(spec.name, g.name, g.memory_bytes, FITS, est.device_total_bytes))
                continue
            fitting = [s for s in suggestions(est) if s.fits]
            if fitting:
                s = fitting[0]
                cells.append(FitCell(spec.name, g.name, g.memory_bytes, FITS_WITH_CHANGES, est.device_total_bytes,
                                     s.change, s.estimate.device_total_bytes))
            else:
                cells.append(FitCell(spec.name, g.name, g.memory_bytes, DOES_NOT_FIT, est.device_total_bytes))
    return cells


def gib(n: int) -> float:
    return n / GiB
