"""Charts: every kind is written as PNG and SVG, non-empty, with the right magic, without metadata that changes
between runs, identical bytes when drawn twice.  No pixel comparisons."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from lora_budget.cli import cli  # noqa: E402
from lora_budget.errors import ConfigError  # noqa: E402
from lora_budget.finetune import make_config  # noqa: E402
from lora_budget.gpus import get_gpu  # noqa: E402
from lora_budget.models import get_model  # noqa: E402
from lora_budget.published import load_published  # noqa: E402
from lora_budget.report import charts, tables  # noqa: E402
from lora_budget.report.claims import memory_savings, trainable_shares  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _configs():
    return {"full": make_config("full"), "LoRA": make_config("lora"), "QLoRA": make_config("qlora")}


def _figures(spec, gpus):
    comps, _ = tables.compare_published(load_published())
    return {
        "breakdown": lambda: charts.breakdown_figure(tables.breakdown_bars(spec, _configs()), gpus),
        "seq-len": lambda: charts.sweep_figure(tables.sweep(spec, _configs(), "seq_len", (256, 1024, 4096)),
                                               "seq_len", gpus),
        "batch": lambda: charts.sweep_figure(tables.sweep(spec, _configs(), "batch_size", (1, 4)), "batch_size", gpus),
        "fit-matrix": lambda: charts.fit_matrix_figure(
            tables.fit_matrix([spec, get_model("llama-3.1-70b")], gpus, make_config("qlora"))),
        "parity": lambda: charts.parity_figure(comps),
        "errors": lambda: charts.errors_figure(comps),
        "claims": lambda: charts.claims_figure(trainable_shares(("llama-3.2-1b", "llama-2-7b")),
                                               memory_savings(("llama-3.2-1b",), shapes=((1, 512),))),
    }


@pytest.mark.parametrize("kind", ["breakdown", "seq-len", "batch", "fit-matrix", "parity", "errors", "claims"])
def test_chart_written_and_stable(kind, tmp_path):
    spec = get_model("llama-3.2-1b")
    gpus = [get_gpu("RTX-4090"), get_gpu("24GB")]
    make = _figures(spec, gpus)[kind]
    png = charts.save_figure(make(), tmp_path / "a.png")
    svg = charts.save_figure(make(), tmp_path / "a.svg")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text
    assert "<dc:date>" not in text and "Matplotlib v" not in text
    assert charts.save_figure(make(), tmp_path / "b.png").read_bytes() == png.read_bytes()
    assert charts.save_figure(make(), tmp_path / "b.svg").read_bytes() == svg.read_bytes()


def test_fit_matrix_states_follow_fit_and_suggestions():
    spec = get_model("llama-3.1-8b")
    gpus = [get_gpu("H200"), get_gpu("RTX-3060-12GB"), get_gpu("2GB")]
    cells = tables.fit_matrix([spec], gpus, make_config("full"))
    assert [c.gpu for c in cells] == [g.name for g in gpus]
    for c, g in zip(cells, gpus):
        from lora_budget.estimate import estimate, suggestions

        est = estimate(spec, make_config("full"), g)
        if est.fits:
            assert c.status == tables.FITS
        elif any(s.fits for s in suggestions(est)):
            assert c.status == tables.FITS_WITH_CHANGES and c.change
        else:
            assert c.status == tables.DOES_NOT_FIT
    assert cells[-1].status == tables.DOES_NOT_FIT  # 2 GB holds no 8B model however it is trained


def test_bad_suffix(tmp_path):
    with pytest.raises(ConfigError, match="png or .svg"):
        charts.save_figure(charts.parity_figure(tables.compare_published(load_published())[0]), tmp_path / "x.jpg")


@pytest.mark.parametrize("argv", [
    ["breakdown", "llama-3.2-1b", "--gpu", "RTX-4090"],
    ["seq-len", "llama-3.2-1b", "--method", "lora", "--method", "qlora", "--gpu", "24GB"],
    ["batch", "llama-3.2-1b", "--seq-len", "256"],
    ["fit-matrix", "llama-3.2-1b", "llama-3.2-3b", "--method", "qlora", "--gpu", "RTX-4090", "--gpu", "8GB"],
    ["parity"],
    ["claims", "llama-3.2-1b", "llama-2-7b"],
])
def test_cli_chart(argv, tmp_path):
    out = tmp_path / "chart.png"
    res = CliRunner().invoke(cli, ["chart", *argv, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv,message", [
    (["breakdown", "no-such-model"], "unknown model"),
    (["breakdown"], "takes one model"),
    (["breakdown", "llama-3.2-1b", "--gpu", "nope-gpu"], "unknown gpu"),
    (["parity", "--no-published"], "nothing to compare"),
])
def test_cli_chart_errors(argv, message, tmp_path):
    res = CliRunner().invoke(cli, ["chart", *argv, "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: ") and message in res.stderr.lower()
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_chart_bad_file_name(tmp_path):
    res = CliRunner().invoke(cli, ["chart", "parity", "--out", str(tmp_path / "c.pdf")])
    assert res.exit_code == 1 and "png or .svg" in res.stderr
