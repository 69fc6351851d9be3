"""Report folders: right files, right columns and rows, errors that follow from the numbers, byte-stable output,
and the committed reports equal to a fresh regeneration with the current estimator."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from lora_budget.cli import cli  # noqa: E402
from lora_budget.errors import ConfigError  # noqa: E402
from lora_budget.estimate import estimate  # noqa: E402
from lora_budget.finetune import make_config  # noqa: E402
from lora_budget.gpus import get_gpu  # noqa: E402
from lora_budget.models import get_model  # noqa: E402
from lora_budget.published import load_published  # noqa: E402
from lora_budget.report import build_claims_report, build_report  # noqa: E402
from lora_budget.report.claims import HOLDS, HOLDS_IF, FAILS, NOT_COMPUTED, all_claims  # noqa: E402
from lora_budget.report.tables import COMPARISON_COLUMNS, NOT_COMPARED_COLUMNS, SUMMARY_COLUMNS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Relative errors are written with 4 decimals: a recomputed error may differ by half a unit of the last one.
REL_ROUNDING = 0.5e-4


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def published_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "published"
    return build_report(out)


@pytest.fixture(scope="module")
def claims_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "claims"
    return build_claims_report(out)


def test_published_report_files(published_report):
    names = {p.name for p in published_report.files}
    assert names == {"index.md", "comparison.csv", "summary.csv", "not_compared.csv", "parity.png", "parity.svg",
                     "errors.png", "errors.svg"}
    for p in published_report.files:
        assert p.stat().st_size > 0
    assert (published_report.folder / "parity.png").read_bytes()[:8] == PNG_MAGIC
    index = (published_report.folder / "index.md").read_text()
    assert "![Predicted vs measured peak memory (GB)](parity.png)" in index
    assert "lora-budget report --out reports/published" in index


def test_comparison_rows_cover_every_published_row(published_report):
    rows = load_published()
    comp = _csv(published_report.folder / "comparison.csv")
    skipped = _csv(published_report.folder / "not_compared.csv")
    assert list(comp[0]) == COMPARISON_COLUMNS
    assert list(skipped[0]) == NOT_COMPARED_COLUMNS
    assert sorted(r["id"] for r in comp) == sorted(r.id for r in rows if r.maps)
    assert sorted(r["id"] for r in skipped) == sorted(r.id for r in rows if not r.maps)
    assert all(r["reason"] for r in skipped)


def test_comparison_numbers_follow_the_estimator(published_report):
    by_id = {r.id: r for r in load_published()}
    for row in _csv(published_report.folder / "comparison.csv"):
        src = by_id[row["id"]]
        est = estimate(src.spec(), src.config())
        assert int(row["measured_bytes"]) == src.peak_bytes
        assert int(row["predicted_bytes"]) == getattr(est, row["compared_with"])
        expected = (int(row["predicted_bytes"]) - src.peak_bytes) / src.peak_bytes
        assert abs(float(row["rel_error"]) - expected) <= REL_ROUNDING


def test_summary_is_the_median_and_worst_of_the_rows(published_report):
    comp = _csv(published_report.folder / "comparison.csv")
    summ = _csv(published_report.folder / "summary.csv")
    assert list(summ[0]) == SUMMARY_COLUMNS
    assert {s["group_by"] for s in summ} == {"all", "counter", "method", "source"}
    errs = {c["counter"]: [] for c in comp}
    for c in comp:
        errs[c["counter"]].append(abs(float(c["rel_error"])))
    for s in summ:
        if s["group_by"] != "counter":
            continue
        e = errs[s["group"]]
        assert int(s["n"]) == len(e)
        assert abs(float(s["median_abs_rel_error"]) - statistics.median(e)) <= 2 * REL_ROUNDING
        assert abs(float(s["worst_abs_rel_error"]) - max(e)) <= 2 * REL_ROUNDING
    overall = next(s for s in summ if s["group_by"] == "all")
    assert int(overall["n"]) == len(comp)


def test_regeneration_is_byte_stable(published_report, tmp_path):
    build_report(tmp_path / "published")
    for p in published_report.files:
        assert (tmp_path / "published" / p.name).read_bytes() == p.read_bytes(), p.name


def _compare_with_committed(fresh_folder: Path, committed: Path):
    assert committed.is_dir(), f"{committed} is missing: run the regeneration command in its index.md"
    fresh = sorted(p.name for p in fresh_folder.iterdir())
    assert fresh == sorted(p.name for p in committed.iterdir()), "file list differs: regenerate the report"
    for name in fresh:
        if name.endswith((".csv", ".md")):  # charts depend on the matplotlib build; text must match exactly
            assert (fresh_folder / name).read_text() == (committed / name).read_text(), \
                f"{committed / name} is stale: regenerate with the command in {committed / 'index.md'}"


def test_committed_published_report_is_current(published_report):
    _compare_with_committed(published_report.folder, REPO / "reports" / "published")


def test_committed_claims_report_is_current(claims_report):
    _compare_with_committed(claims_report.folder, REPO / "reports" / "claims")


# ---- measurement records ---------------------------------------------------------------------------------------
#: The measurement record layout of lora_budget.measure.record, schema 1 (written out here so that the reader is
#: tested against the documented shape, not against the writer's code).
SCHEMA_VERSION = 1


def _record(path: Path, status="ok", **measured):
    spec = get_model("llama-3.2-1b")
    cfg = make_config("lora", seq_len=256)
    base = {"baseline_allocated_bytes": 0, "baseline_reserved_bytes": 0, "model_allocated_bytes": 1,
            "peak_allocated_bytes": None, "peak_reserved_bytes": None, "peak_active_bytes": None,
            "context_bytes": None, "nvml_device_used_peak_bytes": None, "nvml_process_used_peak_bytes": None,
            "step_time_s": 0.1, "tokens_per_second": 2560.0, "total_params": 1, "trainable_params": 1}
    base.update(measured)
    d = {"schema_version": SCHEMA_VERSION, "created_at": "2026-01-01T00:00:00Z", "key": "0123456789abcdef",
         "status": status, "error": None if status == "ok" else "CUDA out of memory", "device": "cuda",
         "model": json.loads(json.dumps(asdict(spec))), "options": cfg.options(),
         "run": {"steps": 3, "warmup": 1, "seed": 0, "memory_cap_bytes": None},
         "env": {"gpu_name": "NVIDIA H200"}, "measured": base, "predicted": {}}
    path.write_text(json.dumps(d))
    return estimate(spec, cfg)


def test_records_are_compared_per_counter(tmp_path):
    recs = tmp_path / "records"
    recs.mkdir()
    est = _record(recs / "a.json", peak_allocated_bytes=4 * 10**9, peak_reserved_bytes=5 * 10**9,
                  nvml_process_used_peak_bytes=6 * 10**9)
    _record(recs / "b-oom.json", status="oom")
    (recs / "c-broken.json").write_text("{not json")
    rep = build_report(tmp_path / "mine", records=[recs], published=False)
    comp = _csv(rep.folder / "comparison.csv")
    assert [(c["id"], c["counter"]) for c in comp] == [("a", "allocated"), ("a", "reserved"), ("a", "nvml")]
    predicted = {c["counter"]: int(c["predicted_bytes"]) for c in comp}
    assert predicted == {"allocated": est.peak_allocated_bytes, "reserved": est.peak_reserved_bytes,
                         "nvml": est.device_total_bytes}
    assert {c["source"] for c in comp} == {"measured on NVIDIA H200"}
    skipped = {r["id"]: r["reason"] for r in _csv(rep.folder / "not_compared.csv")}
    assert skipped["b-oom"].startswith("status oom")
    assert "unreadable" in skipped["c-broken"]
    assert "lora-budget report a.json b-oom.json c-broken.json --no-published --out reports/mine" in \
        (rep.folder / "index.md").read_text()


def test_nvml_fallback_without_process_value(tmp_path):
    # containers hide the process from NVML: device-wide peak minus the device's use before CUDA init
    est = _record(tmp_path / "r.json", peak_allocated_bytes=4 * 10**9, nvml_device_used_peak_bytes=9 * 10**9,
                  nvml_used_before_init_bytes=2 * 10**9)
    rep = build_report(tmp_path / "out", records=[tmp_path / "r.json"], published=False)
    nvml = [c for c in _csv(rep.folder / "comparison.csv") if c["counter"] == "nvml"]
    assert [int(c["measured_bytes"]) for c in nvml] == [7 * 10**9]
    assert [int(c["predicted_bytes"]) for c in nvml] == [est.device_total_bytes]


def test_nothing_to_compare(tmp_path):
    with pytest.raises(ConfigError, match="nothing to compare"):
        build_report(tmp_path / "x", published=False)


# ---- claims ------------------------------------------------------------------------------------------------------
def test_claims_report_files_and_verdicts(claims_report):
    names = {p.name for p in claims_report.files}
    assert {"index.md", "claims.csv", "trainable_share.csv", "memory_saving.csv", "claims.png", "qlora-65b.png",
            "qlora-fit.png"} <= names
    claims = _csv(claims_report.folder / "claims.csv")
    assert {c["key"] for c in claims} >= {"trainable-share", "gpt3-memory", "qlora-65b-48gb"}
    for c in claims:
        assert c["verdict"] in (HOLDS, HOLDS_IF, FAILS, NOT_COMPUTED)
        assert c["words"] and c["source"] and c["summary"]


def test_claim_verdicts_follow_the_estimator():
    claims, shares, _ = all_claims()
    by_key = {c.key: c for c in claims}
    fits = [estimate(get_model("llama-65b"), make_config("qlora", seq_len=s), get_gpu(g)).fits
            for s in (512, 528) for g in ("48GB", "RTX-A6000", "L40S")]
    expected = HOLDS if all(fits) else (FAILS if not any(fits) else HOLDS_IF)
    assert by_key["qlora-65b-48gb"].verdict == expected
    for c in claims:
        assert c.assumptions and all(len(row) == len(c.header) for row in c.rows), c.key
    # "W_q and W_v" at r=4 mapped to GPT-2's fused c_attn: same trainable count as two separate adapters.
    gpt3 = get_model("gpt3-175b")
    separate = gpt3.num_hidden_layers * 2 * 4 * (2 * gpt3.hidden_size)
    assert f"{separate:,}" in dict(by_key["gpt3-parameters"].rows)["LoRA parameters, r=4 on c_attn (ours)"]
    share = {(s.model, s.setting): s.share for s in shares}
    assert share[("llama-2-7b", "q,v r=8")] == pytest.approx(4_194_304 / 6_738_415_616)


# ---- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_report_json(tmp_path):
    res = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "pub"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert "comparison.csv" in d["files"] and d["summary"]["comparisons"] > 0


def test_cli_report_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["report", "x.json", "--claims", "--out", str(tmp_path / "c")])
    assert res.exit_code == 1
    assert res.stderr.strip() == "Error: --claims takes no measurement records"
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
