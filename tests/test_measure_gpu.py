"""The CUDA backend on a real GPU: a tiny LoRA and QLoRA run give valid records with consistent readings, and a
memory cap turns a too-large run into an OOM record.  Skipped without CUDA (run them on a GPU machine with
``pytest -m gpu tests/test_measure_gpu.py``)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lora_budget.finetune import make_config  # noqa: E402
from lora_budget.measure.harness import measure  # noqa: E402
from lora_budget.measure.record import read_record, validate_record, write_record  # noqa: E402
from lora_budget.models import ModelSpec  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: Small enough to run anywhere, large enough (~60 MB of weights) for the allocator to show.
SMALL = ModelSpec(name="small-llama", model_type="llama", hidden_size=512, intermediate_size=1376,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
#: The CUDA context of current drivers is 250-700 MiB (memory-accounting.md section 9): well above this floor.
MIN_CONTEXT_BYTES = 50 * 2**20


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cuda_run_gives_a_consistent_record(method, tmp_path):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    cfg = make_config(method, seq_len=256, batch_size=2)
    rec = measure(SMALL, cfg, device="cuda", steps=2, warmup=1, allow_busy=True)
    assert rec.status == "ok", rec.error
    validate_record(rec.as_dict())
    m = rec.measured
    assert m["peak_reserved_bytes"] >= m["peak_allocated_bytes"] >= m["model_allocated_bytes"] > 0
    assert 0 < m["peak_active_bytes"] <= m["peak_reserved_bytes"]
    if m["context_measured_here"] and m["context_bytes"] is not None:
        assert m["context_bytes"] > MIN_CONTEXT_BYTES
    if m["nvml_device_used_peak_bytes"] is not None:
        assert m["nvml_device_used_peak_bytes"] >= m["peak_reserved_bytes"]
    assert rec.env["gpu_name"] and rec.env["gpu_total_bytes"] > 0 and rec.env["cuda_version"]
    assert read_record(write_record(rec, tmp_path)) == rec


def test_memory_cap_on_cuda_gives_oom():
    cfg = make_config("full", seq_len=512, batch_size=4)
    cap = 2 * 2**30   # the context (~0.5 GiB) + ~1.5 GiB for a model whose full fine-tuning needs more
    big = SMALL.with_(num_hidden_layers=24, hidden_size=1024, intermediate_size=2752)
    rec = measure(big, cfg, device="cuda", steps=1, warmup=1, memory_cap_bytes=cap, allow_busy=True)
    assert rec.status == "oom", rec.error
    assert rec.run["allocator_limit_bytes"] < cap
    assert rec.measured["failure"]["reserved_bytes"] <= rec.run["allocator_limit_bytes"]
    after = measure(SMALL, make_config("lora", seq_len=128), device="cuda", steps=1, warmup=0, allow_busy=True)
    assert after.status == "ok"
