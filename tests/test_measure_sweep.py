"""Sweeps: resume after a killed run loses nothing and repeats nothing, isolated workers, crash and timeout records,
the time budget, the CLI, and the GPU check script's dry invocation (--device cpu on a tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli
from lora_budget.measure import sweep as sweep_mod
from lora_budget.measure.probes import GpuBusyError
from lora_budget.measure.record import load_records, read_record, validate_record
from lora_budget.measure.sweep import load_sweep, pending, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "dtype": "float32"}
#: Seconds a killed sweep gets to write its first record (the subprocess imports torch + transformers first).
FIRST_RECORD_TIMEOUT_S = 240


def tiny_sweep(tmp_path, grid, *, name="tiny", seq_len=32, **top) -> Path:
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    doc = {"name": name, "device": "cpu", "steps": 1, "warmup": 1, "models": [str(d / "config.json")],
           "base": {"dtype": "float32", "batch_size": 2, "seq_len": seq_len}, "grid": grid, **top}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(doc))
    return p


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.glob("*.json")}


# ---- in-process (needs torch) --------------------------------------------------------------------------------------
@pytest.mark.torch
def test_sweep_runs_then_resumes_without_rerunning(tmp_path):
    pytest.importorskip("peft")
    path = tiny_sweep(tmp_path, [{"method": ["full", "lora"]}, {"method": "full", "memory_cap": "1MB"}])
    sw = load_sweep(path)
    out = tmp_path / "out"
    lines = []
    s = run_sweep(sw, out, progress=lines.append)
    assert s.statuses == {"ok": 2, "oom": 1} and len(s.written) == 3 and s.not_run == 0
    assert any(line.startswith("[3/3]") and "oom" in line for line in lines)
    recs = [r for _, r in load_records(out)]
    assert {r.key for r in recs} == {it.key for it in sw.items}
    assert all(r.run["sweep"] == "tiny" and r.run["isolated"] is False for r in recs)
    before = snapshot(out)
    again = run_sweep(sw, out, progress=None)
    assert again.written == [] and again.already == 3
    assert snapshot(out) == before


def test_time_budget_stops_before_starting(tmp_path):
    sw = load_sweep(tiny_sweep(tmp_path, {"method": ["full", "lora"]}))
    s = run_sweep(sw, tmp_path / "out", time_budget_s=0, progress=None)
    assert s.written == [] and s.not_run == 2 and "time budget" in s.stopped


# ---- isolated workers: crash, timeout, busy GPU, missing package (fake workers, no torch) --------------------------
def fake_worker(tmp_path, monkeypatch, body: str):
    """Make the sweep start ``body`` (a shell script) instead of a Python worker."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))


def test_a_worker_that_dies_becomes_a_failed_record(tmp_path, monkeypatch):
    sw = load_sweep(tiny_sweep(tmp_path, {"method": "lora"}))
    fake_worker(tmp_path, monkeypatch, "cat >/dev/null; echo 'Fatal Python error: Segmentation fault' >&2; kill -9 $$")
    s = run_sweep(sw, tmp_path / "out", isolate=True, progress=None)
    assert s.statuses == {"failed": 1}
    rec = read_record(s.written[0])
    assert rec.status == "failed" and rec.key == sw.items[0].key
    assert "died (signal 9 (SIGKILL)): Fatal Python error: Segmentation fault" in rec.error
    assert rec.measured["peak_allocated_bytes"] is None and rec.predicted["peak_allocated_bytes"] > 0
    assert pending(sw, tmp_path / "out")[0] == []                                   # a result: not rerun ...
    assert len(pending(sw, tmp_path / "out", retry_failed=True)[0]) == 1          # ... unless asked


def test_worker_timeout_is_recorded_but_the_budget_is_not(tmp_path, monkeypatch):
    fake_worker(tmp_path, monkeypatch, "cat >/dev/null; sleep 30")
    sw = load_sweep(tiny_sweep(tmp_path, {"method": "lora"}, timeout_s=1))
    t = time.monotonic()
    s = run_sweep(sw, tmp_path / "a", isolate=True, progress=None)
    assert time.monotonic() - t < 20
    assert "timed out after 1 s" in read_record(s.written[0]).error
    sw2 = load_sweep(tiny_sweep(tmp_path, {"method": ["lora", "full"]}, name="t2"))
    s2 = run_sweep(sw2, tmp_path / "b", isolate=True, time_budget_s=1, progress=None)
    assert s2.written == [] and s2.not_run == 2 and "time budget" in s2.stopped
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.json"))


def test_worker_exit_codes(tmp_path, monkeypatch):
    sw = load_sweep(tiny_sweep(tmp_path, {"method": ["lora", "full"]}))
    fake_worker(tmp_path, monkeypatch, f"cat >/dev/null; echo 'Error: measuring needs bitsandbytes' >&2; "
                                       f"exit {sweep_mod.EXIT_MISSING}")
    s = run_sweep(sw, tmp_path / "out", isolate=True, progress=None)
    assert s.written == [] and len(s.missing) == 2 and "bitsandbytes" in s.missing[0]
    fake_worker(tmp_path, monkeypatch, f"cat >/dev/null; echo 'Error: the GPU is busy: pid 7' >&2; "
                                       f"exit {sweep_mod.EXIT_BUSY}")
    with pytest.raises(GpuBusyError, match="the GPU is busy: pid 7"):
        run_sweep(sw, tmp_path / "out", isolate=True, progress=None)


# ---- real subprocesses (slow: each imports the torch stack) --------------------------------------------------------
@pytest.mark.slow
@pytest.mark.torch
def test_killed_sweep_resumes_and_loses_nothing(tmp_path):
    """Kill a sweep process after its first record; the resumed sweep measures exactly the configurations left."""
    pytest.importorskip("peft")
    path = tiny_sweep(tmp_path, {"method": ["full", "lora"], "gradient_checkpointing": [False, True]},
                      seq_len=256, steps=2)
    sw = load_sweep(path)
    total = len(sw.items)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lora_budget", "sweep", str(path), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + FIRST_RECORD_TIMEOUT_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(out.glob("*.json")):
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    first = snapshot(out)
    assert 1 <= len(first) < total, (len(first), err.decode()[-2000:])
    for name in first:
        validate_record(json.loads(first[name]))
    s = run_sweep(sw, out, progress=None)
    assert s.already == len(first) and len(s.written) == total - len(first)
    after = snapshot(out)
    assert {k: after[k] for k in first} == first                     # finished runs untouched
    keys = [r.key for _, r in load_records(out)]
    assert sorted(keys) == sorted(it.key for it in sw.items)         # each configuration exactly once
    assert not list(out.glob("*--run2.json"))


@pytest.mark.slow
@pytest.mark.torch
def test_isolated_sweep_with_real_workers(tmp_path):
    pytest.importorskip("peft")
    path = tiny_sweep(tmp_path, [{"method": "lora"}, {"method": "full", "memory_cap": "1MB"}])
    r = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "out"), "--isolate", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["statuses"] == {"ok": 1, "oom": 1} and d["not_run"] == 0
    recs = {rec.status: rec for _, rec in load_records(tmp_path / "out")}
    assert recs["ok"].run["isolated"] is True and recs["ok"].measured["peak_allocated_bytes"] > 0
    assert "memory cap" in recs["oom"].error


def test_cli_sweep_list(tmp_path):
    path = tiny_sweep(tmp_path, {"method": ["full", "lora"]})
    r = CliRunner().invoke(cli, ["sweep", str(path), "--out", str(tmp_path / "o"), "--list", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [c["measured"] for c in d["configurations"]] == [False, False]
    assert [c["options"]["method"] for c in d["configurations"]] == ["full", "lora"]
    bad = CliRunner().invoke(cli, ["sweep", str(path), "--out", "x/{nope}", "--list"])
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: --out")


@pytest.mark.slow
@pytest.mark.torch
def test_gpu_check_script_dry_invocation(tmp_path):
    """scripts/gpu_check.sh with --device cpu on a one-configuration tiny sweep: preflight, isolated run, listing."""
    pytest.importorskip("peft")
    path = tiny_sweep(tmp_path, {"method": "lora"})
    out = tmp_path / "records"
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--sweep", str(path),
                          "--out", str(out), "--budget", "300"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = load_records(out)
    assert len(recs) == 1 and recs[0][1].status == "ok" and recs[0][1].run["isolated"] is True
    assert "1 measured" in res.stdout
