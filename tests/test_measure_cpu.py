"""The measurement harness end to end on the CPU backend: real training steps of tiny models under the storage
tracker, records written to tmp dirs, OOM and failures as results, and the CLI command."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from lora_budget.cli import cli  # noqa: E402
from lora_budget.finetune import make_config  # noqa: E402
from lora_budget.measure.harness import measure  # noqa: E402
from lora_budget.measure.record import read_record, validate_record, write_record  # noqa: E402
from lora_budget.models import ModelSpec  # noqa: E402
from lora_budget.params import count_params, lora_params  # noqa: E402

pytestmark = pytest.mark.torch

#: hidden 64, 2 layers, vocab 256, fp32 (bf16 CPU matmuls are slow): ~0.1-1 s per step
TINY = ModelSpec(name="tiny-measure", model_type="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256, dtype="float32")
PHASES = {f"{s}.{e}" for s in ("first_step", "steady_state") for e in ("forward", "backward", "optimizer_step")}
SHAPE = dict(dtype="float32", seq_len=64, batch_size=2)
QLORA_CPU = dict(lora_rank=8, bnb_4bit_compute_dtype="float32", mixed_precision="no")


def cfg_of(method, **kw):
    extra = QLORA_CPU if method == "qlora" else {}
    return make_config(method, **{**SHAPE, **extra, **kw})


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_cpu_run_writes_a_valid_record(method, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = cfg_of(method)
    rec = measure(TINY, cfg, device="cpu", steps=2, warmup=1)
    assert rec.status == "ok", rec.error
    validate_record(rec.as_dict())
    m = rec.measured
    assert m["backend"] == "cpu-storage-tracker"
    assert set(m["phases"]) == PHASES
    assert m["peak_allocated_bytes"] == max(m["phases"][p]["allocated"] for p in PHASES if p.startswith("steady"))
    assert m["peak_allocated_bytes"] > m["model_allocated_bytes"] > 0
    assert m["peak_allocated_bytes"] % 512 == 0          # storages rounded like the CUDA caching allocator
    assert m["peak_reserved_bytes"] is None and m["context_bytes"] is None
    assert [s["warmup"] for s in m["steps"]] == [True, False, False]
    assert all(s["time_s"] > 0 and s["loss"] > 0 for s in m["steps"])
    assert m["tokens_per_second"] == pytest.approx(cfg.tokens / m["step_time_s"], rel=1e-3)
    # parameters: exact, 4-bit weights counted at their real size, equal to the core's arithmetic
    trainable, _ = lora_params(TINY, cfg)
    base = count_params(TINY).total
    assert m["total_params"] == (base if method == "full" else base + trainable)
    assert m["trainable_params"] == (base if method == "full" else trainable)
    assert rec.predicted["peak_allocated_bytes"] > 0 and rec.predicted["options"] == cfg.options()
    path = write_record(rec, tmp_path)
    assert read_record(path) == rec


@pytest.mark.parametrize("method, kw", [("lora", {}), ("lora", dict(gradient_checkpointing=True)),
                                        ("qlora", {})])
def test_cpu_backend_equals_the_dry_run_trace(method, kw):
    """A real CPU step measured by the harness and the fake-tensor trace of lora_budget.dryrun (without its CUDA
    emulations) count the same storages: every phase peak is equal to the byte."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from lora_budget.dryrun.run import dry_run

    cfg = cfg_of(method, **kw)
    rec = measure(TINY, cfg, device="cpu", steps=1, warmup=1)
    traced = dry_run(TINY, cfg, steps=2, cuda_emulation=False)
    assert {k: v["allocated"] for k, v in rec.measured["phases"].items()} == traced.phases
    assert (rec.measured["total_params"], rec.measured["trainable_params"]) == (traced.total_params,
                                                                                traced.trainable_params)


def test_memory_cap_gives_an_oom_record_and_the_next_run_works():
    cfg = cfg_of("full")
    rec = measure(TINY, cfg, device="cpu", steps=1, warmup=1, memory_cap_bytes=1_000_000)
    assert rec.status == "oom"
    assert "memory cap of 1,000,000 B" in rec.error
    validate_record(rec.as_dict())
    f = rec.measured["failure"]
    assert f["stage"] in ("warmup", "steps") and f["allocated_bytes"] <= 1_000_000
    assert rec.run["memory_cap_bytes"] == 1_000_000
    assert rec.predicted["fits"] is False               # predicted against a 1 MB device as well
    ok = measure(TINY, cfg, device="cpu", steps=1, warmup=1)
    assert ok.status == "ok" and ok.measured["peak_allocated_bytes"] > 1_000_000


@pytest.mark.parametrize("exc, status", [
    (RuntimeError("boom"), "failed"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
])
def test_injected_failures_are_results(monkeypatch, exc, status):
    import lora_budget.dryrun.step as step

    real = step.train_step
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "train_step", flaky)
    rec = measure(TINY, cfg_of("lora"), device="cpu", steps=2, warmup=1)
    assert rec.status == status
    assert rec.error.startswith(type(exc).__name__) and str(exc).split(".")[0] in rec.error
    assert rec.measured["failure"]["stage"] == "steps"
    assert len(rec.measured["steps"]) == 1                # the warm-up step finished, its time is kept
    validate_record(rec.as_dict())


def test_bad_arguments_are_refused_before_running():
    from lora_budget.errors import ConfigError

    for kw, msg in ((dict(steps=0), "--steps"), (dict(warmup=-1), "--warmup"), (dict(device="tpu"), "device"),
                    (dict(memory_cap_bytes=0), "--memory-cap")):
        with pytest.raises(ConfigError, match=msg):
            measure(TINY, cfg_of("lora"), **{"device": "cpu", **kw})


def _tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    return d


def test_cli_measure_on_cpu(tmp_path):
    out = tmp_path / "runs"
    args = ["measure", str(_tiny_dir(tmp_path) / "config.json"), "--device", "cpu", "--dtype", "float32",
            "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--out", str(out)]
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["status"] == "ok" and read_record(d["path"]).key == d["key"]
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0, text.output
    assert "peak allocated" in text.stdout and "--run2.json" in text.stdout   # a second run adds a file
    assert len(list(out.glob("*.json"))) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cli_measure_cuda_without_a_gpu_is_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["measure", "llama-2-7b", "--out", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: no CUDA device") and r.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())
