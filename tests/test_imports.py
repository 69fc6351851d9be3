"""The core stays light: importing lora_budget and running the estimator commands loads no heavy package."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "pandas", "matplotlib", "numpy")

PROBE = """
import sys, runpy
sys.argv = {argv!r}
try:
    runpy.run_module("lora_budget", run_name="__main__")
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def _heavy_after(argv):
    code = PROBE.format(argv=["lora-budget", *argv], heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY:")]
    assert line, out.stderr
    return line[-1][len("HEAVY:"):]


def test_import_is_light():
    code = f"import sys, lora_budget, lora_budget.estimate, lora_budget.cli; " \
           f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("argv", [
    ["estimate", "llama-2-7b", "--json"],
    ["fit", "llama-65b", "--method", "qlora", "--gpu", "48GB"],
    ["models"],
    ["gpus"],
    ["plan", "llama-2-7b", "--tokens", "10M", "--gpus", "a100-80gb"],
    ["cost", "llama-2-7b", "--gpu", "a100-80gb", "--tokens", "10M"],
    ["ask", "can I fit 65B on a 48GB GPU?"],
])
def test_estimator_commands_are_light(argv):
    assert _heavy_after(argv) == ""
