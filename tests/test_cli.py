"""The CLI: every command answers, --json parses, and every bad input is one line on stderr with exit 1."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_help_for_every_command():
    for name in cli.commands:
        r = run(name, "--help")
        assert r.exit_code == 0, (name, r.output)


def test_estimate_json_keys():
    r = run("estimate", "llama-2-7b", "--method", "lora", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["total_params"] == 6_738_415_616
    assert d["peak_allocated_bytes"] <= d["peak_reserved_bytes"] <= d["device_total_bytes"]
    assert "gpu" not in d


def test_fit_headline_question():
    r = run("fit", "llama-65b", "--method", "qlora", "--gpu", "48GB")
    assert r.exit_code == 0
    assert r.output.startswith(("YES", "NO"))
    assert "QLoRA paper" in r.output
    rj = run("fit", "llama-65b", "--method", "qlora", "--gpu", "48GB", "--json")
    d = json.loads(rj.output)
    assert d["gpu"]["memory_bytes"] == 48_000_000_000
    assert isinstance(d["fits"], bool) and "headroom_bytes" in d and "suggestions" in d


def test_models_and_gpus_json():
    assert len(json.loads(run("models", "--json").output)) >= 30
    assert len(json.loads(run("gpus", "--json").output)) >= 20


@pytest.mark.parametrize("args,needle", [
    (["estimate", "llama-2-7"], "unknown model"),
    (["fit", "llama-2-7b", "--gpu", "h1000"], "unknown GPU"),
    (["fit", "llama-2-7b"], "no GPU detected"),
    (["estimate", "llama-2-7b", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["estimate", "llama-2-7b", "--seq-len", "-5"], "--seq-len must be a positive integer"),
    (["estimate", "llama-2-7b", "--lora-rank", "8192"], "larger than"),
    (["estimate", "llama-2-7b", "--method", "full", "--bnb-4bit-quant-type", "nf4"], "QLoRA only"),
    (["estimate", "llama-2-7b", "--method", "full", "--lora-rank", "8"], "LoRA/QLoRA only"),
    (["estimate", "llama-2-7b", "--dtype", "float8"], "unknown dtype"),
    (["estimate", "llama-2-7b", "--target-modules", "query"], "not found"),
    (["fit", "llama-2-7b", "--gpu", "48"], "unknown GPU"),
])
def test_bad_input_is_one_line(args, needle):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1
    err = r.stderr if hasattr(r, "stderr") else r.output
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_malformed_config_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "llama", "hidden_size": 4096}')
    r = run("estimate", str(p))
    assert r.exit_code == 1 and "missing field 'intermediate_size'" in r.stderr
    p.write_text("{not json")
    r = run("estimate", str(p))
    assert r.exit_code == 1 and "not valid JSON" in r.stderr
    p.write_text('{"model_type": "bert", "hidden_size": 768}')
    r = run("estimate", str(p))
    assert r.exit_code == 1 and "unsupported model_type" in r.stderr


def test_local_config_json_equals_catalog(tmp_path):
    from lora_budget.models import get_model

    spec = get_model("llama-2-7b")
    (tmp_path / "config.json").write_text(json.dumps(spec.to_hf_config()))
    a = json.loads(run("estimate", str(tmp_path), "--json").output)
    b = json.loads(run("estimate", "llama-2-7b", "--json").output)
    assert a["peak_allocated_bytes"] == b["peak_allocated_bytes"]


def test_python_dash_m():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lora_budget", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "lora-budget" in out.stdout
