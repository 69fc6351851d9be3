"""Benchmark: wall time of `lora-budget plan llama-3.1-70b --tokens 100M --method qlora|full` (target: under a
second each), against `python -c "import click"`, plus the planner alone in-process and the estimates it spends.

Run: python benchmarks/bench_plan.py   (prints a small table; not a test)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fit import wall  # noqa: E402  (one timing helper for the benchmarks)

REPEATS = 5
CASES = [("llama-3.1-70b", "qlora"), ("llama-3.1-70b", "full"), ("llama-3.1-70b", "lora"), ("llama-2-7b", "full")]


def in_process(model: str, method: str) -> tuple[float, int, int]:
    """Median seconds of plan() in this process (fresh caches each time), estimates spent, rows."""
    from lora_budget import compute, plan as plan_mod
    from lora_budget.models import get_model

    counted = [0]
    real = plan_mod.estimate

    def counting(*args, **kwargs):
        counted[0] += 1
        return real(*args, **kwargs)

    plan_mod.estimate = counting
    times = []
    rows = 0
    try:
        for _ in range(REPEATS):
            compute.step_flops.cache_clear()
            counted[0] = 0
            t = time.perf_counter()
            p = plan_mod.plan(get_model(model), "100M", methods=(method,))
            times.append(time.perf_counter() - t)
            rows = len(p.rows)
    finally:
        plan_mod.estimate = real
    return statistics.median(times), counted[0], rows


def main() -> None:
    base = wall([sys.executable, "-c", "import click"])
    print(f"{'python -c import click':<44} median {base * 1000:7.1f} ms")
    for model, method in CASES:
        cli = wall([sys.executable, "-m", "lora_budget", "plan", model, "--tokens", "100M", "--method", method])
        lib, n_est, rows = in_process(model, method)
        print(f"{'lora-budget plan ' + model + ' --method ' + method:<44} median {cli * 1000:7.1f} ms CLI, "
              f"{lib * 1000:6.1f} ms plan(), {n_est} estimates for {rows} rows")


if __name__ == "__main__":
    main()
