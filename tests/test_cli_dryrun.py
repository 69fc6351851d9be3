"""`estimate --dry-run` and `compare` on a tiny local config.json; the missing-extra error."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli
from lora_budget.errors import MissingDependencyError

TINY = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}


@pytest.fixture
def tiny_config(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(TINY))
    return str(p)


def test_estimate_dry_run_has_the_estimate_keys(tiny_config):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    est = json.loads(CliRunner().invoke(cli, ["estimate", tiny_config, "--json"]).output)
    r = CliRunner().invoke(cli, ["estimate", tiny_config, "--dry-run", "--json", "--gpu", "24GiB"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("total_params", "trainable_params", "peak_allocated_bytes", "peak_reserved_bytes",
                "device_total_bytes", "offloaded_bytes", "components", "phases", "assumptions", "fits",
                "headroom_bytes", "emulations"):
        assert key in d
    assert d["total_params"] == est["total_params"]
    assert d["trainable_params"] == est["trainable_params"]
    assert d["peak_allocated_bytes"] <= d["peak_reserved_bytes"] <= d["device_total_bytes"]


def test_compare_json(tiny_config):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    r = CliRunner().invoke(cli, ["compare", tiny_config, "--method", "lora", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["components"]["weights"]["estimate"] == d["components"]["weights"]["dry_run"]
    assert set(d["phases"]) >= {"first_step.forward", "steady_state.backward", "steady_state.optimizer_step"}


def test_missing_extra_is_one_line(tiny_config, monkeypatch):
    import lora_budget.dryrun as dr

    def missing():
        raise MissingDependencyError("the dry run needs torch: pip install 'lora_budget[dryrun]'")

    monkeypatch.setattr(dr, "require_dependencies", missing)
    r = CliRunner().invoke(cli, ["estimate", tiny_config, "--dry-run"])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1].startswith("Error: the dry run needs torch")
    assert "Traceback" not in r.output
