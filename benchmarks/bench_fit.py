"""Benchmark: wall time of `lora-budget fit` against `python -c "import click"`, and estimates per second.

Run: python benchmarks/bench_fit.py   (prints a small table; not a test)
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

REPEATS = 7


def wall(cmd: list[str]) -> float:
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    base = wall([sys.executable, "-c", "import click"])
    fit = wall([sys.executable, "-m", "lora_budget", "fit", "llama-65b", "--method", "qlora", "--gpu", "48GB"])
    from lora_budget.estimate import estimate
    from lora_budget.finetune import make_config
    from lora_budget.models import get_model

    spec, cfg = get_model("llama-2-7b"), make_config("lora")
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < 2.0:
        estimate(spec, cfg)
        n += 1
    rate = n / (time.perf_counter() - t)
    print(f"python -c 'import click'            median {base * 1000:7.1f} ms")
    print(f"lora-budget fit llama-65b qlora 48GB median {fit * 1000:7.1f} ms (+{(fit - base) * 1000:.1f} ms)")
    print(f"estimate() llama-2-7b lora           {rate:,.0f} estimates/s")


if __name__ == "__main__":
    main()
