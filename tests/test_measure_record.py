"""Measurement records, sweep files and the NVML helpers: the torch-free layer of lora_budget.measure.

The records built here are synthetic test fixtures (``synthetic_record``), written to tmp dirs only: they test the
schema and the file rules, they are not measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_budget.errors import ConfigError, LoraBudgetError
from lora_budget.estimate import estimate
from lora_budget.finetune import make_config
from lora_budget.measure.env import git_state, gpu_slug, package_versions
from lora_budget.measure.probes import BUSY_USED_BYTES, GpuBusyError, NvmlSampler, check_gpu_idle
from lora_budget.measure.record import (MEASURED_BYTES, SCHEMA_VERSION, Measurement, RecordError, config_key,
                                        index_records, load_records, model_fields, read_record, record_stem,
                                        validate_record, write_record)
from lora_budget.measure.sweep import load_sweep, parse_cap, pending
from lora_budget.models import ModelSpec
from lora_budget.units import GB, GiB

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pandas", "matplotlib")
TINY = ModelSpec(name="tiny-measure", model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256, dtype="float32")


def synthetic_record(spec=TINY, cfg=None, *, device="cpu", cap=None, status="ok", **measured) -> Measurement:
    """A schema-valid Measurement with made-up readings (a test fixture: never a measurement)."""
    cfg = cfg or make_config("lora", dtype="float32", seq_len=32, batch_size=2)
    m = {k: None for k in MEASURED_BYTES}
    if status == "ok":
        m.update(peak_allocated_bytes=1_000_000, model_allocated_bytes=500_000, step_time_s=0.5,
                 tokens_per_second=128.0, total_params=127_296, trainable_params=3_584)
    m.update(measured)
    m["notes"] = ["synthetic test fixture"]
    pred = estimate(spec, cfg).as_dict()
    pred["estimator_version"] = "test"
    return Measurement(key=config_key(spec, cfg.options(), device, cap), status=status,
                       error=None if status == "ok" else "RuntimeError: synthetic", device=device,
                       model=model_fields(spec), options=cfg.options(),
                       run={"steps": 1, "warmup": 1, "seed": 0, "memory_cap_bytes": cap}, env={"gpu_name": None},
                       measured=m, predicted=pred)


# ---- records -------------------------------------------------------------------------------------------------------
def test_record_round_trip(tmp_path):
    rec = synthetic_record()
    path = write_record(rec, tmp_path / "runs")
    assert path.name == f"{record_stem(TINY.name, rec.options, rec.key)}.json"
    back = read_record(path)
    assert back == rec
    assert back.as_dict()["schema_version"] == SCHEMA_VERSION
    assert back.spec() == TINY
    assert back.config() == make_config("lora", dtype="float32", seq_len=32, batch_size=2)


def test_write_never_overwrites(tmp_path):
    rec = synthetic_record()
    first = write_record(rec, tmp_path)
    before = first.read_bytes()
    again = synthetic_record(peak_allocated_bytes=2_000_000)
    second = write_record(again, tmp_path)
    assert second != first and second.name.endswith("--run2.json")
    assert first.read_bytes() == before
    assert read_record(second).measured["peak_allocated_bytes"] == 2_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temp file left


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("measured"), "measured"),
    (lambda d: d.update(status="done"), "status"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d.update(key="xyz"), "key"),
    (lambda d: d.update(device="tpu"), "device"),
    (lambda d: d.update(error="oops"), "error"),
    (lambda d: d["measured"].update(peak_allocated_bytes=1.5), "peak_allocated_bytes"),
    (lambda d: d["measured"].update(peak_allocated_bytes=None), "peak_allocated_bytes"),
    (lambda d: d["measured"].update(model_allocated_bytes=-1), "model_allocated_bytes"),
    (lambda d: d["measured"].update(peak_reserved_bytes=10), "peak_reserved_bytes"),
    (lambda d: d["measured"].pop("context_bytes"), "context_bytes"),
    (lambda d: d["options"].update(method="prefix"), "options.method"),
    (lambda d: d["run"].update(memory_cap_bytes=0), "memory_cap_bytes"),
    (lambda d: d["predicted"].pop("estimator_version"), "estimator_version"),
])
def test_validation_names_the_field(change, field):
    d = synthetic_record().as_dict()
    change(d)
    with pytest.raises(RecordError, match=field):
        validate_record(d, "x.json")


def test_failed_record_needs_an_error_and_no_readings():
    rec = synthetic_record(status="oom")
    validate_record(rec.as_dict())          # readings may be missing in an OOM record
    d = rec.as_dict()
    d["error"] = None
    with pytest.raises(RecordError, match="error"):
        validate_record(d)


def test_config_key_is_stable_and_tells_configurations_apart():
    cfg = make_config("lora", seq_len=32)
    k = config_key(TINY, cfg.options(), "cuda", None)
    assert k == config_key(TINY, make_config("lora", seq_len=32).options(), "cuda", None)
    others = {config_key(TINY, cfg.with_(seq_len=64).options(), "cuda", None),
              config_key(TINY, cfg.options(), "cpu", None),
              config_key(TINY, cfg.options(), "cuda", 48 * GB),
              config_key(TINY.with_(hidden_size=128), cfg.options(), "cuda", None),
              config_key(TINY.with_(name="other"), cfg.options(), "cuda", None)}
    assert k not in others and len(others) == 5


def test_record_names():
    opts = make_config("qlora").options()
    assert record_stem("llama-2-7b", opts, "0123456789abcdef") == "llama-2-7b--qlora--r64--mb1--s512--0123456789abcdef"
    assert record_stem("/data/tiny/config.json", make_config("full").options(), "k" * 16).startswith("tiny--full--r0")


def test_load_records_reads_folders_and_rejects_bad_files(tmp_path):
    a = write_record(synthetic_record(), tmp_path)
    b = write_record(synthetic_record(TINY, make_config("full", dtype="float32", seq_len=32, batch_size=2)),
                     tmp_path / "sub")
    (tmp_path / ".half-written.tmp.json").write_text("{")        # hidden files are skipped
    assert [p for p, _ in load_records(tmp_path)] == sorted([a, b])
    assert set(index_records(tmp_path)) == {read_record(a).key, read_record(b).key}
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(RecordError, match="broken.json"):
        load_records(tmp_path)
    with pytest.raises(RecordError, match="no such file"):
        load_records(tmp_path / "missing")


def test_frame_has_one_row_per_record(tmp_path):
    pytest.importorskip("pandas")
    from lora_budget.measure.frame import load_records as load_frame

    write_record(synthetic_record(), tmp_path)
    write_record(synthetic_record(status="oom", failure={"stage": "steps", "allocated_bytes": 7}), tmp_path)
    df = load_frame(tmp_path)
    assert len(df) == 2
    for col in ("status", "method", "seq_len", "measured_peak_allocated_bytes", "predicted_peak_allocated_bytes",
                "predicted_component_activations", "predicted_cuda_context_bytes", "git_commit"):
        assert col in df.columns, col
    assert str(df["measured_peak_allocated_bytes"].dtype) == "Int64"
    ok = df[df.status == "ok"].iloc[0]
    assert ok["measured_peak_allocated_bytes"] == 1_000_000
    assert df[df.status == "oom"].iloc[0]["measured_failure_allocated_bytes"] == 7


# ---- sweeps (resolution only; running is in test_measure_sweep.py) ------------------------------------------------
def test_sweep_expansion_order_and_dedup():
    doc = {"models": ["llama-2-7b"], "device": "cpu", "base": {"batch_size": 2},
           "grid": [{"method": ["lora", "full"], "seq_len": [128, 256]},
                    {"method": "lora", "seq_len": 128},                              # duplicate of the first
                    {"models": ["llama-3.2-1b"], "method": "qlora", "memory_cap": ["48GB", "a6000"]}]}
    sw = load_sweep(doc)
    labels = [(it.spec.name, it.cfg.method, it.cfg.seq_len, it.memory_cap_bytes) for it in sw.items]
    assert labels == [("llama-2-7b", "lora", 128, None), ("llama-2-7b", "lora", 256, None),
                      ("llama-2-7b", "full", 128, None), ("llama-2-7b", "full", 256, None),
                      ("llama-3.2-1b", "qlora", 512, 48 * GB),
                      ("llama-3.2-1b", "qlora", 512, parse_cap("a6000"))]
    assert all(it.cfg.batch_size == 2 for it in sw.items)
    assert len({it.key for it in sw.items}) == len(sw.items)
    over = load_sweep(doc, device="cuda", memory_cap="24GiB", steps=5, warmup=0)
    assert over.device == "cuda" and over.steps == 5 and over.warmup == 0
    assert {it.memory_cap_bytes for it in over.items} == {24 * GiB}
    assert len(over.items) == 5           # the two caps of the last grid collapse into one


@pytest.mark.parametrize("doc, message", [
    ({"models": ["llama-2-7b"], "grids": []}, "unknown key"),
    ({"models": ["llama-2-7b"], "grid": {"method": "lora", "lora_rnk": 4}}, "configuration 1"),
    ({"models": ["llama-2-7b"], "grid": {"method": "full", "lora_rank": 4}}, "LoRA/QLoRA only"),
    ({"models": ["no-such-model"]}, "unknown model"),
    ({"grid": {"method": "lora"}}, "no model"),
    ({"models": ["llama-2-7b"], "steps": 0}, "steps"),
    ({"models": ["llama-2-7b"], "device": "tpu"}, "device"),
    ({"models": ["llama-2-7b"], "memory_cap": "48"}, "unknown GPU '48'"),
])
def test_sweep_errors_are_clear(doc, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(doc)


def test_yaml_sweep(tmp_path):
    pytest.importorskip("yaml")
    p = tmp_path / "s.yaml"
    p.write_text("name: y\nmodels: [llama-2-7b]\ngrid:\n  method: [lora, qlora]\n  gradient_checkpointing: true\n")
    sw = load_sweep(p)
    assert sw.name == "y" and [it.cfg.method for it in sw.items] == ["lora", "qlora"]
    (tmp_path / "bad.yaml").write_text("models: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")


def test_gpu_check_sweep_covers_the_brief():
    sw = load_sweep(ROOT / "sweeps" / "gpu_check.json")
    assert sw.device == "cuda" and sw.timeout_s and sw.steps >= 1
    seen = {(it.spec.name, it.cfg.method, it.cfg.seq_len, it.cfg.gradient_checkpointing,
             it.cfg.bnb_4bit_use_double_quant if it.cfg.method == "qlora" else None) for it in sw.items}
    for model in ("llama-3.2-1b", "llama-2-7b"):
        for seq in (512, 2048):
            for gc in (False, True):
                for method, dq in (("lora", None), ("full", None), ("qlora", True), ("qlora", False)):
                    assert (model, method, seq, gc, dq) in seen
    last = sw.items[-1]
    assert last.spec.name == "llama-65b" and last.cfg.method == "qlora" and last.memory_cap_bytes == 48 * GB
    assert (last.cfg.lora_rank, last.cfg.lora_alpha, last.cfg.optim, last.cfg.seq_len) == (64, 16,
                                                                                           "paged_adamw_32bit", 512)
    assert last.cfg.gradient_checkpointing and last.cfg.bnb_4bit_use_double_quant
    assert all(it.memory_cap_bytes is None for it in sw.items[:-1])


def test_pending_skips_recorded_keys(tmp_path):
    doc = {"models": [str(_tiny_config(tmp_path))], "device": "cpu",
           "base": {"dtype": "float32", "seq_len": 32, "batch_size": 2}, "grid": {"method": ["full", "lora"]}}
    sw = load_sweep(doc)
    todo, done = pending(sw, tmp_path / "out")
    assert len(todo) == 2 and not done
    spec, cfg = sw.items[1].spec, sw.items[1].cfg
    write_record(synthetic_record(spec, cfg, status="failed"), tmp_path / "out")
    todo, done = pending(sw, tmp_path / "out")
    assert [it.key for it in done] == [sw.items[1].key]
    todo, done = pending(sw, tmp_path / "out", retry_failed=True)
    assert len(todo) == 2


def _tiny_config(tmp_path) -> Path:
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    return d / "config.json"


def test_memory_caps():
    assert parse_cap("48GB") == 48 * GB
    assert parse_cap("24GiB") == 24 * GiB
    assert parse_cap(None) is None and parse_cap("none") is None
    assert parse_cap("a6000") > 47 * GiB
    with pytest.raises(LoraBudgetError, match="unknown GPU"):
        parse_cap("48")


# ---- NVML helpers with a fake NVML ---------------------------------------------------------------------------------
class FakeNvml:
    """The pynvml calls the probes make, answering from fixed numbers."""

    def __init__(self, used, procs=()):
        self.used = list(used) if isinstance(used, (list, tuple)) else [used]
        self.procs = procs

    def nvmlDeviceGetMemoryInfo(self, h):
        v = self.used.pop(0) if len(self.used) > 1 else self.used[0]
        return type("Mem", (), {"used": v, "total": 80 * GiB, "free": 80 * GiB - v})()

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [type("P", (), {"pid": pid, "usedGpuMemory": used})() for pid, used in self.procs]


def test_busy_gpu_is_refused():
    assert check_gpu_idle((FakeNvml(300 * 2**20), "h"))["nvml_used_before_init_bytes"] == 300 * 2**20
    with pytest.raises(GpuBusyError, match="busy"):
        check_gpu_idle((FakeNvml(BUSY_USED_BYTES + 1), "h"))
    with pytest.raises(GpuBusyError, match="pid 4242"):
        check_gpu_idle((FakeNvml(0, [(4242, 5 * GiB)]), "h"))
    assert check_gpu_idle((FakeNvml(0, [(os.getpid(), GiB)]), "h"))["other_processes"] == 0
    assert check_gpu_idle(None)["nvml_used_before_init_bytes"] is None     # no NVML: nothing to check


def test_nvml_sampler_peaks_and_window():
    nv = (FakeNvml([1 * GiB, 5 * GiB, 2 * GiB, 3 * GiB], [(os.getpid(), 2 * GiB)]), "h")
    s = NvmlSampler(nv, interval=0.001)
    s.mark("build_start")            # 1 GiB
    s.mark("warmup_end")             # 5 GiB
    s.mark("x")                      # 2 GiB
    s.mark("steps_end")              # 3 GiB, then every later sample
    r = s.stop()
    assert r["nvml_device_used_peak_run_bytes"] == 5 * GiB
    assert r["nvml_device_used_peak_bytes"] == 5 * GiB
    assert r["nvml_process_used_peak_bytes"] == 2 * GiB
    assert set(r["nvml_marks"]) == {"build_start", "warmup_end", "x", "steps_end"}
    assert r["nvml_timeline"] and len(r["nvml_timeline"][0]) == 3
    assert NvmlSampler(None).start().stop()["nvml_device_used_peak_bytes"] is None


# ---- environment ----------------------------------------------------------------------------------------------------
def test_environment_fields(tmp_path, monkeypatch):
    assert set(package_versions()) >= {"torch", "transformers", "peft", "bitsandbytes"}
    st = git_state()
    if (ROOT / ".git").exists():
        assert len(st["commit"]) == 40 and isinstance(st["dirty"], bool)
    monkeypatch.setenv("LORA_BUDGET_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("LORA_BUDGET_GIT_DIRTY", "0")
    assert git_state(tmp_path) == {"commit": "a" * 40, "dirty": False, "source": "environment"}
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_slug(None) == "cpu"


# ---- import cost ----------------------------------------------------------------------------------------------------
def _heavy(code: str) -> str:
    probe = code + f"\nimport sys\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:")]
    assert line, out.stderr
    return line[-1][len("HEAVY:"):]


def test_measure_package_and_commands_are_light():
    assert _heavy("import lora_budget.measure, lora_budget.measure.record, lora_budget.measure.sweep, "
                  "lora_budget.measure.env, lora_budget.measure.frame, lora_budget.commands.measure") == ""
    runner = ("import runpy, sys\nsys.argv = {argv!r}\ntry:\n    runpy.run_module('lora_budget', "
              "run_name='__main__')\nexcept SystemExit:\n    pass")
    for argv in (["lora-budget", "measure", "--help"],
                 ["lora-budget", "sweep", str(ROOT / "sweeps" / "gpu_check.json"), "--out", "/nonexistent/x",
                  "--list"]):
        assert _heavy(runner.format(argv=argv)) == "", argv


def test_busy_gpu_is_waited_for_then_refused():
    from lora_budget.measure.probes import wait_gpu_idle

    freed = FakeNvml([5 * GiB, 5 * GiB, 0])            # the previous worker's memory goes away after 1 s
    assert wait_gpu_idle((freed, "h"), wait_s=5)["nvml_used_before_init_bytes"] == 0
    with pytest.raises(GpuBusyError):
        wait_gpu_idle((FakeNvml(5 * GiB), "h"), wait_s=0.6)
