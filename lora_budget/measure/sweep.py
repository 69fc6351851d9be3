"""Sweeps: many configurations from one file, measured in one process or one process each, resumable.

A sweep file (JSON, or YAML with pyyaml) holds::

    name: gpu_check                  # free text, kept in every record's run.sweep
    device: cuda                     # cuda | cpu (the command line may override)
    steps: 3                         # measured steps per configuration
    warmup: 1
    models: [llama-3.2-1b]           # default model list of every grid
    memory_cap: null                 # e.g. 48GB, 24GiB or a catalog GPU name
    timeout_s: 600                   # per configuration when isolated (optional)
    base: {batch_size: 1}            # options shared by every grid
    grid:                            # one grid or a list of grids; in each, list values are crossed
      - {method: [lora, full], seq_len: [512, 2048], gradient_checkpointing: [false, true]}
      - {method: qlora, bnb_4bit_use_double_quant: [true, false]}
      - {models: [llama-65b], method: qlora, memory_cap: 48GB}

Inside a grid, ``model``/``models`` and ``memory_cap`` override the file's; every other key is a training option
(``FinetuneConfig`` names, ``method`` included) and is validated before anything runs.  Configurations are run
in file order; duplicates are dropped.

Resuming: every configuration has a stable key (``record.config_key``: model + options + device + cap); those with
a record in the output folder are skipped, so a killed sweep restarted with the same folder keeps every finished
run and measures only the rest.  Each record is written the moment its run ends.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, LoraBudgetError, MissingDependencyError
from ..units import GiB, format_gib
from .record import config_key, index_records, record_stem

TOP_KEYS = ("name", "description", "device", "steps", "warmup", "models", "memory_cap", "timeout_s", "base",
            "grid", "seed")
GRID_SPECIAL = ("model", "models", "memory_cap")
#: Exit codes of an isolated worker that mean "no record": the sweep reports them instead of recording a crash.
EXIT_BUSY, EXIT_MISSING, EXIT_CONFIG = 3, 4, 5


@dataclass(frozen=True)
class SweepItem:
    """One configuration of a sweep, resolved and validated."""

    index: int
    model: str
    options: dict            # method + the options given in the sweep (defaults are filled by make_config)
    memory_cap: str | None
    spec: object = field(repr=False, compare=False)
    cfg: object = field(repr=False, compare=False)
    memory_cap_bytes: int | None = None
    key: str = ""

    @property
    def label(self) -> str:
        c = self.cfg
        parts = [self.spec.name, c.method, f"b{c.batch_size}x{c.seq_len}"]
        if c.gradient_accumulation_steps > 1:
            parts.append(f"ga{c.gradient_accumulation_steps}")
        if c.is_lora:
            parts.append(f"r{c.lora_rank}")
        if c.method == "qlora":
            parts.append("dq" if c.bnb_4bit_use_double_quant else "no-dq")
        parts.append("gc" if c.gradient_checkpointing else "no-gc")
        parts.append(c.optim)
        if self.memory_cap_bytes is not None:
            parts.append(f"cap {self.memory_cap}")
        return " ".join(parts)


@dataclass(frozen=True)
class Sweep:
    name: str
    device: str
    steps: int
    warmup: int
    seed: int
    timeout_s: float | None
    items: tuple[SweepItem, ...]
    source: str = ""


@dataclass
class SweepSummary:
    """What a sweep run did.  ``written`` are the new record paths; ``not_run`` were left for a resume."""

    total: int = 0
    already: int = 0
    written: list = field(default_factory=list)
    statuses: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    not_run: int = 0
    stopped: str | None = None

    def as_dict(self) -> dict:
        return {"total": self.total, "already_measured": self.already, "written": [str(p) for p in self.written],
                "statuses": dict(self.statuses), "skipped_missing_dependency": list(self.missing),
                "not_run": self.not_run, "stopped": self.stopped}


# ---- reading a sweep file ----------------------------------------------------------------------------------------
def parse_cap(text) -> int | None:
    """A memory cap: None / "none" -> None; "48GB" / "24GiB" -> bytes; a catalog GPU name -> its memory."""
    if text is None or str(text).strip().lower() in ("", "none", "null"):
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    from ..gpus import get_gpu
    from ..units import is_size, parse_size

    return parse_size(text) if is_size(str(text)) else get_gpu(str(text)).memory_bytes


def read_sweep_file(path: str | os.PathLike) -> dict:
    """The sweep file as a dict (JSON, or YAML for .yaml / .yml), read like the training config files."""
    from ..configfile import read_config_file

    return read_config_file(path)


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def expand(doc: dict, where: str = "sweep") -> list[tuple[str, dict, object]]:
    """(model, options, memory_cap) of every configuration, in file order, before validation."""
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}")
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: 'base' must be an object of training options")
    grids = doc.get("grid", [{}])
    grids = [grids] if isinstance(grids, dict) else grids
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise ConfigError(f"{where}: 'grid' must be an object or a list of objects")
    out = []
    for gi, grid in enumerate(grids):
        merged = {**base, **grid}
        models = merged.pop("models", None)
        model = merged.pop("model", None)
        if models is None and model is None:
            models = doc.get("models")
        elif models is None:
            models = model
        models = _as_list(models) if models is not None else []
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where}: grid {gi + 1} has no model (give 'models' in the file or the grid)")
        caps = _as_list(merged.pop("memory_cap", doc.get("memory_cap")))
        keys = list(merged)
        values = [_as_list(merged[k]) for k in keys]
        for model_name in models:
            for cap in caps:
                for combo in itertools.product(*values):
                    out.append((model_name, dict(zip(keys, combo)), cap))
    return out


def _int(doc, key, default, where, minimum):
    v = doc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {v!r}")
    return v


def load_sweep(path_or_doc, *, device: str | None = None, memory_cap=None, steps: int | None = None,
               warmup: int | None = None) -> Sweep:
    """Read, expand and validate a sweep (a file path or an already-loaded dict).

    ``device``, ``memory_cap``, ``steps`` and ``warmup`` override the file's values when given.  Every
    configuration is resolved (model lookup, ``make_config``) here, so a bad entry fails before anything runs.
    """
    from ..finetune import make_config
    from ..models import get_model

    if isinstance(path_or_doc, dict):
        doc, where = dict(path_or_doc), "sweep"
    else:
        doc, where = read_sweep_file(path_or_doc), str(path_or_doc)
    if memory_cap is not None:
        doc["memory_cap"] = memory_cap
        grids = doc.get("grid", [{}])
        grids = [grids] if isinstance(grids, dict) else grids
        doc["grid"] = [{k: v for k, v in g.items() if k != "memory_cap"} for g in grids]
    dev = device or doc.get("device", "cuda")
    if dev not in ("cuda", "cpu"):
        raise ConfigError(f"{where}: device must be cuda or cpu, got {dev!r}")
    n_steps = steps if steps is not None else _int(doc, "steps", 3, where, 1)
    n_warm = warmup if warmup is not None else _int(doc, "warmup", 1, where, 0)
    seed = _int(doc, "seed", 0, where, 0)
    timeout = doc.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"{where}: 'timeout_s' must be a positive number of seconds")
    items: list[SweepItem] = []
    seen: set[str] = set()
    for n, (model_name, opts, cap) in enumerate(expand(doc, where), 1):
        opts = dict(opts)
        method = opts.pop("method", "lora")
        try:
            spec = get_model(model_name)
            cfg = make_config(method, **opts)
            cap_bytes = parse_cap(cap)
        except LoraBudgetError as exc:
            raise ConfigError(f"{where}: configuration {n} ({model_name}, method {method}, "
                              f"{json.dumps(opts, default=str)}): {exc}") from None
        key = config_key(spec, cfg.options(), dev, cap_bytes)
        if key in seen:
            continue
        seen.add(key)
        items.append(SweepItem(index=len(items), model=model_name, options={"method": method, **opts},
                               memory_cap=None if cap_bytes is None else str(cap), spec=spec, cfg=cfg,
                               memory_cap_bytes=cap_bytes, key=key))
    if not items:
        raise ConfigError(f"{where}: the sweep has no configuration")
    default_name = "sweep" if isinstance(path_or_doc, dict) else Path(path_or_doc).stem
    return Sweep(name=str(doc.get("name") or default_name), device=dev, steps=n_steps, warmup=n_warm, seed=seed,
                 timeout_s=timeout, items=tuple(items), source=where)


def pending(sweep: Sweep, out, retry_failed: bool = False) -> tuple[list[SweepItem], list[SweepItem]]:
    """(to run, already measured): an item is done when a record with its key is in ``out`` (with
    ``retry_failed``, only records whose status is not "failed" count)."""
    idx = index_records(out)
    todo, done = [], []
    for it in sweep.items:
        statuses = idx.get(it.key, [])
        finished = any(s != "failed" for s in statuses) if retry_failed else bool(statuses)
        (done if finished else todo).append(it)
    return todo, done


# ---- running -------------------------------------------------------------------------------------------------------
def gib(n: int) -> str:
    """GiB with 2 decimals, 4 below 1 GiB (small models)."""
    return format_gib(n, 2 if n >= GiB else 4)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _outcome(rec) -> str:
    m = rec.measured
    if rec.status == "ok":
        pred = rec.predicted.get("peak_allocated_bytes")
        text = f"ok: peak allocated {gib(m['peak_allocated_bytes'])}"
        if m.get("peak_reserved_bytes") is not None:
            text += f", reserved {gib(m['peak_reserved_bytes'])}"
        if pred:
            text += f" (predicted {gib(pred)})"
        return text + f", {m['step_time_s']:.3f} s/step"
    return f"{rec.status}: {rec.error}"


def run_sweep(sweep: Sweep, out, *, isolate: bool = False, time_budget_s: float | None = None,
              retry_failed: bool = False, allow_busy: bool = False, progress=_stderr) -> SweepSummary:
    """Measure every configuration of ``sweep`` that has no record in ``out`` yet, writing each record at once.

    Args:
        sweep: from ``load_sweep``.
        out: the output folder (created); also where finished runs are looked up.
        isolate: run each configuration in its own Python process (a crash or a leak loses nothing else).
        time_budget_s: stop starting new configurations after this many seconds (an isolated one is killed at
            the budget and left for a resume).
        retry_failed: measure again configurations whose only records have status "failed".
        allow_busy: measure even when the GPU is in use.
        progress: callable(str) for one status line per configuration (default: stderr).

    Raises:
        GpuBusyError (stops the sweep), ConfigError; the configurations' own failures are recorded instead.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    todo, done = pending(sweep, out, retry_failed)
    summary = SweepSummary(total=len(sweep.items), already=len(done))
    say = progress or (lambda msg: None)
    if done:
        say(f"{len(done)} of {len(sweep.items)} configurations already measured in {out}; {len(todo)} to run")
    width = len(str(len(sweep.items)))
    for n, it in enumerate(todo):
        elapsed = time.monotonic() - t0
        remaining = None if time_budget_s is None else time_budget_s - elapsed
        if remaining is not None and remaining <= 0:
            summary.not_run = len(todo) - n
            summary.stopped = (f"time budget of {time_budget_s:.0f} s spent; {summary.not_run} configuration(s) "
                               f"left: run the same sweep with the same --out to resume")
            say(summary.stopped)
            break
        head = f"[{it.index + 1:>{width}}/{len(sweep.items)}] {it.label}"
        say(f"{head} ...")
        t = time.monotonic()
        if isolate:
            result = _run_isolated(sweep, it, out, allow_busy, remaining)
        else:
            result = _run_here(sweep, it, out, allow_busy)
        kind, payload = result
        if kind == "record":
            path, rec = payload
            summary.written.append(path)
            summary.statuses[rec.status] = summary.statuses.get(rec.status, 0) + 1
            say(f"{head}: {_outcome(rec)} [{time.monotonic() - t:.1f} s] -> {path.name}")
        elif kind == "missing":
            summary.missing.append(f"{it.label}: {payload}")
            say(f"{head}: not measured: {payload}")
        elif kind == "budget":
            summary.not_run = len(todo) - n
            summary.stopped = (f"time budget of {time_budget_s:.0f} s spent while measuring {it.label} (stopped, "
                               f"no record); {summary.not_run} configuration(s) left: rerun to resume")
            say(summary.stopped)
            break
    return summary


def _run_here(sweep: Sweep, it: SweepItem, out: Path, allow_busy: bool):
    from .harness import measure
    from .record import write_record

    try:
        rec = measure(it.spec, it.cfg, device=sweep.device, steps=sweep.steps, warmup=sweep.warmup,
                      memory_cap_bytes=it.memory_cap_bytes, seed=sweep.seed, allow_busy=allow_busy,
                      run_info={"sweep": sweep.name, "isolated": False, "model_arg": it.model})
    except MissingDependencyError as exc:
        return "missing", str(exc)
    return "record", (write_record(rec, out), rec)


# ---- isolated runs -------------------------------------------------------------------------------------------------
def _set_pdeathsig():  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGKILL when the sweep process dies, so a killed sweep leaves no orphan on the GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _worker_payload(sweep: Sweep, it: SweepItem, out: Path, allow_busy: bool) -> dict:
    return {"model": it.model, "options": it.options, "memory_cap_bytes": it.memory_cap_bytes,
            "device": sweep.device, "steps": sweep.steps, "warmup": sweep.warmup, "seed": sweep.seed,
            "allow_busy": allow_busy, "out": str(out), "key": it.key,
            "run_info": {"sweep": sweep.name, "isolated": True, "model_arg": it.model}}


def _run_isolated(sweep: Sweep, it: SweepItem, out: Path, allow_busy: bool, remaining: float | None):
    from .record import read_record

    payload = json.dumps(_worker_payload(sweep, it, out, allow_busy))
    cmd = [sys.executable, "-c", "from lora_budget.measure.sweep import worker_main; worker_main()"]
    limits = [x for x in (sweep.timeout_s, remaining) if x is not None]
    limit = min(limits) if limits else None
    by_budget = remaining is not None and (sweep.timeout_s is None or remaining < sweep.timeout_s)
    kw = {"preexec_fn": _set_pdeathsig} if sys.platform.startswith("linux") else {}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        stdout, stderr = proc.communicate(payload, timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        if by_budget:
            return "budget", None
        return "record", _crash_record(sweep, it, out, f"timed out after {limit:.0f} s (timeout_s of the sweep); "
                                                       f"the worker was killed")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    rc = proc.returncode
    tail = [ln for ln in (stderr or "").splitlines() if ln.strip()]
    last = tail[-1].strip() if tail else ""
    if rc == 0:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        path = Path(json.loads(lines[-1])["record"])
        return "record", (path, read_record(path))
    if rc == EXIT_BUSY:
        from .probes import GpuBusyError

        raise GpuBusyError(last.removeprefix("Error: "))
    if rc == EXIT_MISSING:
        return "missing", last.removeprefix("Error: ")
    if rc == EXIT_CONFIG:
        raise ConfigError(last.removeprefix("Error: "))
    how = f"signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit code {rc}"
    return "record", _crash_record(sweep, it, out, f"the measuring process died ({how}): {last or 'no message'}")


def _crash_record(sweep: Sweep, it: SweepItem, out: Path, error: str):
    """A "failed" record for a configuration whose worker process died: what was asked, what happened, no readings.

    Written by the (torch-free) sweep process: env comes from the host and NVML, the prediction from the estimator.
    """
    from ..gpus import detect_gpus
    from .env import host_environment
    from .harness import _gpu_for, prediction
    from .record import MEASURED_BYTES, Measurement, model_fields, write_record

    env = host_environment()
    gpus = detect_gpus() if sweep.device == "cuda" else []
    env.update({"gpu_name": gpus[0].name if gpus else None, "gpu_total_bytes": gpus[0].total_bytes if gpus else None,
                "driver": gpus[0].driver if gpus else None})
    cap = it.memory_cap_bytes
    gpu = _gpu_for(f"memory cap {cap:,} B", cap) if cap else (
        _gpu_for(env["gpu_name"], env["gpu_total_bytes"]) if env.get("gpu_total_bytes") else None)
    measured = {k: None for k in MEASURED_BYTES}
    measured.update({"backend": "cuda" if sweep.device == "cuda" else "cpu-storage-tracker", "failure":
                     {"stage": "worker process"}, "notes": ["recorded by the sweep: the worker process left no "
                                                            "record"]})
    rec = Measurement(key=it.key, status="failed", error=error, device=sweep.device, model=model_fields(it.spec),
                      options=it.cfg.options(),
                      run={"steps": sweep.steps, "warmup": sweep.warmup, "seed": sweep.seed, "memory_cap_bytes": cap,
                           "sweep": sweep.name, "isolated": True, "model_arg": it.model},
                      env=env, measured=measured, predicted=prediction(it.spec, it.cfg, gpu))
    return write_record(rec, out), rec


def worker_main() -> None:  # pragma: no cover - exercised through subprocesses
    """Entry point of an isolated worker: one configuration from stdin (JSON), one record, its path on stdout."""
    from ..finetune import make_config
    from ..models import get_model
    from .harness import measure
    from .probes import GpuBusyError
    from .record import write_record

    job = json.loads(sys.stdin.read())
    try:
        opts = dict(job["options"])
        spec = get_model(job["model"])
        cfg = make_config(opts.pop("method"), **opts)
        if config_key(spec, cfg.options(), job["device"], job["memory_cap_bytes"]) != job["key"]:
            raise ConfigError("the worker resolved a different configuration than the sweep (lora_budget changed "
                              "while the sweep ran?)")
        rec = measure(spec, cfg, device=job["device"], steps=job["steps"], warmup=job["warmup"],
                      memory_cap_bytes=job["memory_cap_bytes"], seed=job["seed"], allow_busy=job["allow_busy"],
                      run_info=job["run_info"])
        path = write_record(rec, job["out"])
    except GpuBusyError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(EXIT_BUSY)
    except MissingDependencyError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(EXIT_MISSING)
    except LoraBudgetError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    print(json.dumps({"record": str(path), "status": rec.status}), flush=True)


def status_rows(sweep: Sweep, out) -> list[dict]:
    """One row per configuration: its key, label and, when measured, the outcome of its latest record."""
    from .record import load_records

    latest: dict[str, object] = {}
    folder = Path(out)
    if folder.is_dir():
        for _, rec in load_records(folder):
            if rec.key not in latest or rec.created_at >= latest[rec.key].created_at:
                latest[rec.key] = rec
    rows = []
    for it in sweep.items:
        rec = latest.get(it.key)
        row = {"index": it.index + 1, "key": it.key, "model": it.spec.name, "label": it.label,
               "options": it.cfg.options(), "memory_cap_bytes": it.memory_cap_bytes, "measured": rec is not None,
               "status": rec.status if rec else None, "outcome": _outcome(rec) if rec else None}
        if rec is not None:
            row["peak_allocated_bytes"] = rec.measured.get("peak_allocated_bytes")
            row["peak_reserved_bytes"] = rec.measured.get("peak_reserved_bytes")
            row["predicted_peak_allocated_bytes"] = rec.predicted.get("peak_allocated_bytes")
        rows.append(row)
    return rows


def main(argv=None) -> int:  # pragma: no cover - the click command is the tested front end
    """``python -m lora_budget.measure.sweep FILE ...``: the sweep without click (for machines that lack it)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lora_budget.measure.sweep", description=main.__doc__)
    ap.add_argument("sweep_file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", choices=("cuda", "cpu"))
    ap.add_argument("--memory-cap")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--isolate", action="store_true")
    ap.add_argument("--time-budget", type=float)
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--allow-busy", action="store_true")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    try:
        sw = load_sweep(a.sweep_file, device=a.device, memory_cap=a.memory_cap, steps=a.steps, warmup=a.warmup)
        if a.list:
            for r in status_rows(sw, a.out):
                print(f"{r['index']:>3} {r['key']}  {r['label']}: {r['outcome'] or 'pending'}")
            return 0
        summary = run_sweep(sw, a.out, isolate=a.isolate, time_budget_s=a.time_budget,
                            retry_failed=a.retry_failed, allow_busy=a.allow_busy)
    except LoraBudgetError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


__all__ = ["Sweep", "SweepItem", "SweepSummary", "load_sweep", "expand", "pending", "run_sweep", "parse_cap",
           "read_sweep_file", "status_rows", "record_stem"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
