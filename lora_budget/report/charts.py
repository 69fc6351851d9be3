"""Charts as ``matplotlib.figure.Figure`` objects (no pyplot global state), and a byte-stable writer.

Each ``*_figure`` function draws data prepared by ``report.tables`` or ``report.claims`` and returns the Figure;
``save_figure`` writes PNG or SVG with fixed metadata and a fixed SVG hash salt, so the same inputs give the same
bytes with the same matplotlib.  Memory axes of estimator charts are in GiB (GPU capacities are binary); the
predicted-vs-measured chart is in GB because published peaks are decimal.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, MissingDependencyError
from ..units import GB, GiB
from .tables import DOES_NOT_FIT, FITS, FITS_WITH_CHANGES

#: One colour per method, used by every chart.
METHOD_COLORS = {"full": "#4C72B0", "lora": "#DD8452", "qlora": "#55A868"}
METHOD_NAMES = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
#: Marker per source of a comparison (published projects, then measurement records).
SOURCE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
FIT_COLORS = {FITS: "#55A868", FITS_WITH_CHANGES: "#F2C14E", DOES_NOT_FIT: "#C44E52"}
#: Band drawn around the parity line: +-10 % is the spread between repeated measurements of one configuration
#: in the published data (torchtune 15.57 vs 17.18 GB; 20.2 vs 22.3 GB).
PARITY_BAND = 0.10
#: Component colours, in the order the memory model lists its components.
COMPONENT_COLORS = ("#4C72B0", "#8172B3", "#DA8BC3", "#937860", "#C44E52", "#DD8452", "#F2C14E", "#55A868",
                    "#64B5CD", "#8C8C8C", "#CCB974", "#A1C9F4", "#FFB482")
#: matplotlib settings that make output independent of time and of random ids.
STABLE_RC = {"svg.hashsalt": "lora-budget", "svg.fonttype": "path", "font.family": "DejaVu Sans",
             "font.size": 9, "axes.titlesize": 10, "figure.dpi": 100}
PNG_DPI = 110
#: The memory saving the LoRA paper claims (drawn on the claims chart).
SAVING_LINE = 3.0


def _figure(width: float, height: float, ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("charts need matplotlib: pip install 'lora_budget[report]'") from None
    import matplotlib

    with matplotlib.rc_context(STABLE_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, ncols) if ncols > 1 else fig.subplots()
    return fig, axes


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG or SVG (by the file suffix), without timestamps or version strings."""
    import matplotlib

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise ConfigError(f"cannot write a chart as {p.name}: use a .png or .svg file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STABLE_RC):
        if suffix == ".png":
            fig.savefig(p, format="png", dpi=PNG_DPI, metadata={"Software": None})
        else:
            fig.savefig(p, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    return p


def _gpu_lines(ax, gpus, scale: float = GiB, unit: str = "GiB") -> None:
    """Horizontal capacity lines, one dash pattern per GPU, labelled in the legend (labels never overlap)."""
    dashes = ((0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)), (0, (3, 3)), (0, (8, 2, 1, 2, 1, 2)))
    for i, g in enumerate(gpus):
        y = g.memory_bytes / scale
        ax.axhline(y, color="#222222", lw=1.0, ls=dashes[i % len(dashes)], zorder=4,
                   label=f"{g.name}: {y:.2f} {unit}")


def _nice_log_ticks(ax, lo: float, hi: float) -> None:
    """Plain-number ticks (1, 2, 5, 10, 20, 50, ...) on both log axes instead of 10^x notation."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = [m * 10**e for e in range(-3, 6) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(lambda v, _pos: f"{v:g}")
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())


# ---- memory breakdown --------------------------------------------------------------------------------------------
def breakdown_figure(bars, gpus=(), title: str = ""):
    """Stacked bars: one per setup, one segment per memory component at the peak, in GiB.

    The allocator reserve and the CUDA context are drawn hatched on top, so a bar's top is the device total that
    must fit under the GPU capacity lines.
    """
    names: list[str] = []
    for b in bars:
        for k, v in b.components.items():
            if v and k not in names:
                names.append(k)
    fig, ax = _figure(7.2, 4.6)
    x = list(range(len(bars)))
    bottom = [0.0] * len(bars)
    for i, name in enumerate(names):
        h = [b.components.get(name, 0) / GiB for b in bars]
        ax.bar(x, h, bottom=bottom, width=0.6, color=COMPONENT_COLORS[i % len(COMPONENT_COLORS)],
               label=name.replace("_", " "), zorder=2)
        bottom = [a + c for a, c in zip(bottom, h)]
    for name, attr, hatch in (("allocator reserve", "reserve", "//"), ("CUDA context", "context", "xx")):
        h = [getattr(b, attr) / GiB for b in bars]
        ax.bar(x, h, bottom=bottom, width=0.6, color="white", edgecolor="#777777", hatch=hatch, label=name,
               zorder=2)
        bottom = [a + c for a, c in zip(bottom, h)]
    for xi, b in zip(x, bars):
        ax.annotate(f"{b.device_total / GiB:.1f} GiB", xy=(xi, b.device_total / GiB), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8, zorder=5,
                    bbox=dict(boxstyle="square,pad=0.15", fc="white", ec="none"))
    _gpu_lines(ax, gpus)
    ax.set_xticks(x, [b.label for b in bars])
    ax.set_ylabel("memory at the peak (GiB)")
    top = max([b.device_total for b in bars] + [g.memory_bytes for g in gpus]) / GiB
    ax.set_ylim(0, top * 1.12)
    ax.set_title(title or "Memory at the peak by component (GiB)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", color="#dddddd", lw=0.6, zorder=0)
    return fig


# ---- sweeps ------------------------------------------------------------------------------------------------------
def sweep_figure(points, axis: str, gpus=(), title: str = ""):
    """Device total (GiB) against sequence length or micro-batch, one line per setup, log2 x axis."""
    fig, ax = _figure(7.2, 4.4)
    labels: list[str] = []
    for p in points:
        if p.label not in labels:
            labels.append(p.label)
    for label in labels:
        pts = [p for p in points if p.label == label]
        ax.plot([p.x for p in pts], [p.device_total / GiB for p in pts], marker="o", ms=3.5, lw=1.6,
                color=METHOD_COLORS.get(pts[0].method, "#333333"), label=label, zorder=3)
    _gpu_lines(ax, gpus)
    ax.set_xscale("log", base=2)
    xs = sorted({p.x for p in points})
    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.minorticks_off()
    name = {"seq_len": "sequence length (tokens)", "batch_size": "micro-batch (sequences)"}[axis]
    ax.set_xlabel(name)
    ax.set_ylabel("device total, NVML view (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"Peak memory vs {name} (GiB)")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(color="#dddddd", lw=0.6, zorder=0)
    return fig


# ---- fit matrix --------------------------------------------------------------------------------------------------
def _short_change(change: str) -> str:
    return change.replace("--gradient-accumulation-steps", "GA").replace("--gradient-checkpointing", "ckpt") \
        .replace("--", "").replace("  ", " ")


def fit_matrix_figure(cells, title: str = ""):
    """Models (rows) x GPUs (columns): green fits, amber fits with the first suggested change, red does not."""
    from matplotlib.patches import Patch, Rectangle

    models = list(dict.fromkeys(c.model for c in cells))
    gpus = list(dict.fromkeys(c.gpu for c in cells))
    fig, ax = _figure(1.6 + 1.25 * len(gpus), 1.3 + 0.52 * len(models))
    for c in cells:
        x, y = gpus.index(c.gpu), models.index(c.model)
        ax.add_patch(Rectangle((x, y), 1, 1, facecolor=FIT_COLORS[c.status], edgecolor="white", lw=1.5))
        text = f"{c.device_total / GiB:.1f} GiB"
        if c.status == FITS_WITH_CHANGES:
            text += "\n" + _short_change(c.change)
        ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=6.5 if "\n" in text else 7.5,
                color="black", wrap=True)
    ax.set_xlim(0, len(gpus))
    ax.set_ylim(len(models), 0)
    gpu_bytes = {c.gpu: c.gpu_bytes for c in cells}
    ax.set_xticks([i + 0.5 for i in range(len(gpus))], [f"{g}\n{gpu_bytes[g] / GiB:.1f} GiB" for g in gpus],
                  fontsize=7.5)
    ax.set_yticks([i + 0.5 for i in range(len(models))], models, fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.legend(handles=[Patch(color=FIT_COLORS[k], label=k) for k in (FITS, FITS_WITH_CHANGES, DOES_NOT_FIT)],
              loc="upper center", bbox_to_anchor=(0.5, -0.04 - 0.3 / max(1, len(models))), ncol=3, fontsize=7.5,
              frameon=False)
    ax.set_title(title or "Does it fit? Device total (GiB) per model and GPU")
    return fig


# ---- predicted vs measured ---------------------------------------------------------------------------------------
def parity_figure(comparisons, title: str = ""):
    """Predicted against measured peak (GB, log-log), coloured by method, marker by source, +-10 % band."""
    from matplotlib.lines import Line2D

    fig, ax = _figure(6.4, 5.6)
    sources = sorted({c.source for c in comparisons})
    marker = {s: SOURCE_MARKERS[i % len(SOURCE_MARKERS)] for i, s in enumerate(sources)}
    vals = [v for c in comparisons for v in (c.measured_bytes / GB, c.predicted_bytes / GB)]
    lo, hi = min(vals) / 1.3, max(vals) * 1.3
    ax.fill_between([lo, hi], [lo * (1 - PARITY_BAND), hi * (1 - PARITY_BAND)],
                    [lo * (1 + PARITY_BAND), hi * (1 + PARITY_BAND)], color="#e8e8e8", lw=0, zorder=0)
    ax.plot([lo, hi], [lo, hi], color="#555555", lw=0.9, zorder=1)
    for c in sorted(comparisons, key=lambda c: (c.source, c.method, c.id, c.counter)):
        ax.scatter(c.measured_bytes / GB, c.predicted_bytes / GB, s=34, marker=marker[c.source],
                   color=METHOD_COLORS.get(c.method, "#333333"), edgecolors="black", linewidths=0.4, zorder=3)
    far = sorted((c for c in comparisons if abs(c.rel_error) > 2 * PARITY_BAND),
                 key=lambda c: (-abs(c.rel_error), c.id))
    for c in far[:3]:
        ax.annotate(f"{c.id} {100 * c.rel_error:+.0f}%", xy=(c.measured_bytes / GB, c.predicted_bytes / GB),
                    xytext=(5, -9), textcoords="offset points", fontsize=6.5, color="#333333")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _nice_log_ticks(ax, lo, hi)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("measured peak (GB)")
    ax.set_ylabel("predicted peak for the same counter (GB)")
    ax.set_title(title or "Predicted vs measured peak memory (GB)")
    methods = [m for m in ("full", "lora", "qlora") if any(c.method == m for c in comparisons)]
    h1 = [Line2D([], [], ls="", marker="o", color=METHOD_COLORS[m], mec="black", mew=0.4, label=METHOD_NAMES[m])
          for m in methods]
    h1.append(_band_handle(PARITY_BAND))
    leg = ax.legend(handles=h1, title="method", loc="upper left", fontsize=7.5, title_fontsize=8, frameon=False)
    ax.add_artist(leg)
    h2 = [Line2D([], [], ls="", marker=marker[s], color="#bbbbbb", mec="black", mew=0.4, label=s) for s in sources]
    ax.legend(handles=h2, title="source", loc="lower right", fontsize=7.5, title_fontsize=8, frameon=False)
    ax.grid(which="both", color="#eeeeee", lw=0.5, zorder=0)
    return fig


def _band_handle(band: float):
    from matplotlib.patches import Patch

    return Patch(color="#e8e8e8", label=f"within +-{100 * band:.0f}%")


def errors_figure(comparisons, title: str = ""):
    """Relative error per comparison (horizontal bars), sorted by error, coloured by method, +-10 % band."""
    rows = sorted(comparisons, key=lambda c: (c.rel_error, c.id, c.counter))
    fig, ax = _figure(7.0, 1.2 + 0.22 * len(rows))
    y = list(range(len(rows)))
    ax.axvspan(-100 * PARITY_BAND, 100 * PARITY_BAND, color="#e8e8e8", lw=0, zorder=0)
    ax.barh(y, [100 * c.rel_error for c in rows], color=[METHOD_COLORS.get(c.method, "#333333") for c in rows],
            height=0.7, zorder=2)
    ax.axvline(0, color="#555555", lw=0.8, zorder=1)
    ax.set_yticks(y, [f"{c.id} ({c.counter})" for c in rows], fontsize=7)
    ax.set_xlabel("relative error of the prediction (%), (predicted - measured) / measured")
    ax.set_title(title or "Prediction error per measurement (%)")
    from matplotlib.patches import Patch

    methods = [m for m in ("full", "lora", "qlora") if any(c.method == m for c in rows)]
    ax.legend(handles=[Patch(color=METHOD_COLORS[m], label=METHOD_NAMES[m]) for m in methods]
              + [_band_handle(PARITY_BAND)], fontsize=7.5, loc="lower right", frameon=False)
    ax.grid(axis="x", color="#dddddd", lw=0.6, zorder=0)
    return fig


# ---- LoRA claims -------------------------------------------------------------------------------------------------
def claims_figure(shares, savings, title: str = ""):
    """Left: trainable share (%) per model and LoRA setting, log scale, the 0.1-1 % band shaded.
    Right: memory saving (full / LoRA and full / QLoRA device totals) per model, the 3x line drawn.

    ``shares``: rows with .model, .setting, .share (fraction); ``savings``: rows with .model, .method and .ratio.
    """
    fig, (a1, a2) = _figure(12.0, 4.8, ncols=2)
    models = list(dict.fromkeys(s.model for s in shares))
    settings = list(dict.fromkeys(s.setting for s in shares))
    width = 0.8 / len(settings)
    palette = ("#DD8452", "#C44E52", "#8172B3", "#937860", "#55A868", "#64B5CD", "#CCB974")
    a1.axhspan(0.1, 1.0, color="#e8e8e8", lw=0, zorder=0, label="0.1-1% (the claim)")
    for j, st in enumerate(settings):
        xs, ys = [], []
        for i, m in enumerate(models):
            v = next((s.share for s in shares if s.model == m and s.setting == st), None)
            if v:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(100 * v)
        a1.bar(xs, ys, width=width * 0.95, color=palette[j % len(palette)], label=st, zorder=2)
    a1.set_yscale("log")
    top = max(100 * s.share for s in shares)
    a1.set_ylim(top=top * 12)
    from matplotlib.ticker import FixedLocator

    a1.yaxis.set_major_locator(FixedLocator([0.001, 0.01, 0.1, 1.0, 10.0, 100.0]))
    a1.yaxis.set_major_formatter(lambda v, _pos: f"{v:g}%")
    a1.set_xticks(range(len(models)), models, rotation=35, ha="right", fontsize=7.5)
    a1.set_ylabel("trainable parameters (% of the model)")
    a1.set_title("LoRA trainable share (%)")
    a1.legend(fontsize=7, loc="upper center", frameon=False, ncol=3)
    a1.grid(axis="y", which="both", color="#eeeeee", lw=0.5, zorder=0)

    smodels = list(dict.fromkeys(s.model for s in savings))
    methods = [m for m in ("lora", "qlora") if any(s.method == m for s in savings)]
    w = 0.8 / max(1, len(methods))
    for j, meth in enumerate(methods):
        xs, ys = [], []
        for i, m in enumerate(smodels):
            v = next((s.ratio for s in savings if s.model == m and s.method == meth), None)
            if v:
                xs.append(i - 0.4 + w * (j + 0.5))
                ys.append(v)
        a2.bar(xs, ys, width=w * 0.95, color=METHOD_COLORS[meth], label=f"full / {METHOD_NAMES[meth]}", zorder=2)
        for x, v in zip(xs, ys):
            a2.annotate(f"{v:.1f}", xy=(x, v), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=6)
    a2.axhline(SAVING_LINE, color="#333333", lw=0.9, ls="--", zorder=1)
    a2.annotate("3x (the claim)", xy=(0.0, SAVING_LINE), xycoords=("axes fraction", "data"), xytext=(3, 2),
                textcoords="offset points", ha="left", fontsize=7.5)
    a2.set_xticks(range(len(smodels)), smodels, rotation=35, ha="right", fontsize=7.5)
    a2.set_ylabel("full fine-tuning device total / method device total (x)")
    a2.set_title("Memory saving vs full fine-tuning (x)")
    a2.set_ylim(0, max([s.ratio for s in savings] + [SAVING_LINE]) * 1.18)
    a2.legend(fontsize=7.5, loc="upper left", frameon=False)
    a2.grid(axis="y", color="#eeeeee", lw=0.5, zorder=0)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
