"""The published measurements: every row parses, maps or says why not, and mapped rows rebuild their setup."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from lora_budget.errors import ConfigError
from lora_budget.estimate import estimate
from lora_budget.finetune import make_config
from lora_budget.models import get_model
from lora_budget.published import (COLUMNS, COUNTER_QUANTITY, COUNTERS, PUBLISHED_CSV, PEAK_UNITS, load_published,
                                   predicted_bytes)

#: The reference table has 113 rows; 18 are not measured training steps (inference, paper claims and estimates,
#: capacity bounds: measurements/published/README.md "Rows left out").
REFERENCE_ROWS = 113
LEFT_OUT = 18


@pytest.fixture(scope="module")
def rows():
    return load_published()


def test_row_count_and_unique_ids(rows):
    assert len(rows) == REFERENCE_ROWS - LEFT_OUT
    assert len({r.id for r in rows}) == len(rows)


def test_every_row_maps_or_says_why(rows):
    for r in rows:
        assert r.counter in COUNTERS, r.id
        assert r.peak_unit in PEAK_UNITS, r.id
        assert r.source_project and r.source_document, r.id
        if r.maps:
            assert r.model and r.counter in COUNTER_QUANTITY, r.id
        else:
            assert len(r.does_not_map) > 20, r.id


def test_peaks_kept_as_published_and_in_bytes(rows):
    by_id = {r.id: r for r in rows}
    # LitGPT prints x / 1e9 as GB; torchtune's 2024-11 table prints GiB; the HF docs print pynvml MiB as "MB".
    assert (by_id["LITGPT-11"].published, by_id["LITGPT-11"].peak_bytes) == ("21.30 GB", 21_300_000_000)
    assert (by_id["TORCHTUNE-22"].published, by_id["TORCHTUNE-22"].peak_bytes) == ("60.0 GiB", 60 * 2**30)
    assert (by_id["HFPERF-01"].published, by_id["HFPERF-01"].peak_bytes) == ("14949 MiB", 14949 * 2**20)
    for r in rows:
        assert isinstance(r.peak_bytes, int)
        assert r.peak_bytes == round(float(r.peak_value) * PEAK_UNITS[r.peak_unit])


def test_mapped_rows_build_their_setup(rows):
    mapped = [r for r in rows if r.maps]
    assert mapped
    for r in mapped:
        cfg = r.config()
        assert cfg.method == r.method
        assert cfg.batch_size == r.option("batch_size") and cfg.seq_len == r.option("seq_len")
        est = estimate(r.spec(), cfg)
        assert predicted_bytes(est, r.counter) > 0


def test_mapped_lora_counts_match_the_sources(rows):
    # LitGPT's resource table prints the trainable parameters of each run: 4,194,304 for Llama-2-7B and
    # 6,553,600 for Llama-2-13B (LoRA r=8 on query and value).
    by_id = {r.id: r for r in rows}
    for rid, trainable in (("LITGPT-11", 4_194_304), ("LITGPT-12", 4_194_304), ("LITGPT-15", 6_553_600)):
        r = by_id[rid]
        assert estimate(r.spec(), r.config()).trainable_params == trainable


def test_unmapped_row_refuses_config(rows):
    r = next(r for r in rows if not r.maps)
    with pytest.raises(ConfigError, match=r.id):
        r.config()


def test_predicted_bytes_picks_the_counter_quantity():
    est = estimate(get_model("llama-2-7b"), make_config("lora"))
    assert predicted_bytes(est, "allocated") == est.peak_allocated_bytes
    assert predicted_bytes(est, "active") == est.peak_allocated_bytes
    assert predicted_bytes(est, "reserved") == est.peak_reserved_bytes
    assert predicted_bytes(est, "nvml") == est.device_total_bytes
    with pytest.raises(ConfigError, match="unstated"):
        predicted_bytes(est, "unstated")


def _rewrite(tmp_path, change):
    with open(PUBLISHED_CSV, newline="") as f:
        data = list(csv.DictReader(f))
    change(data)
    p = tmp_path / "rows.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(data)
    return p


@pytest.mark.parametrize("change,message", [
    (lambda d: d[0].update(peak_bytes="123"), "peak_bytes"),
    (lambda d: d[0].update(counter="smi"), "unknown counter"),
    (lambda d: d[0].update(maps="false", does_not_map=""), "must say why"),
    (lambda d: d[1].update(id=d[0]["id"]), "duplicate"),
    (lambda d: d[0].update(maps="yes"), "true or false"),
])
def test_malformed_file_is_a_clear_error(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_published(_rewrite(tmp_path, change))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no published measurements"):
        load_published(tmp_path / "nope.csv")


def test_loading_stays_light():
    code = ("import sys, lora_budget.published as p, lora_budget.report, lora_budget.commands.report; "
            "p.load_published(); print(','.join(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
