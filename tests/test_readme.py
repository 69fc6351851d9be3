"""The README's commands work: the set-up commands name the real test command, and every `lora-budget ...` line
of the worked example runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_budget.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _example_commands():
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("lora-budget "):
                cmds.append(line)
    return cmds


def test_setup_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    first = blocks[0]
    assert "lora-budget fit llama-65b --method qlora --gpu 48GB" in first
    assert "python -m pytest -q" in first
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci


@pytest.mark.parametrize("line", _example_commands())
def test_example_command_runs(line, tmp_path, monkeypatch):
    args = shlex.split(line)[1:]
    if any(a.endswith("config.json") for a in args):
        from lora_budget.models import get_model
        import json

        d = tmp_path / "my-model"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(get_model("llama-2-7b").to_hf_config()))
        monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
