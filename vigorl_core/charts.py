"""The reports' charts, drawn with matplotlib and saved twice: PNG (to look at) and SVG (to zoom and copy).

    from vigorl_core.charts import bar_chart, line_panels
    bar_chart(run_dir / "plots" / "vstar", "vstar: mean with 95% interval (percent)", groups, series)
    line_panels(out_dir / "curves", "GRPO", {"grpo": step_records}, curves)     # curves.png + curves.svg

matplotlib is imported when a chart is drawn (not when vigorl_core is imported), with the Agg backend, so
charts draw on machines without a display. The SVG keeps its text as text (searchable, selectable) and
carries no date, so the same data gives the same file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in Ray workers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> tuple[Path, Path]:
    """stem.png and stem.svg; the figure is closed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    plt = _pyplot()
    fig.savefig(png, dpi=100, metadata={"Software": None})
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "vigorl"}):  # text stays text; stable ids
        fig.savefig(svg, metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return png, svg


def bar_chart(stem: str | Path, title: str, groups: Sequence[tuple[str, Sequence[tuple[float, float, float]]]],
              series: Sequence[tuple[str, str]], y_max: float = 100.0) -> tuple[Path, Path]:
    """Grouped bars with error bars, saved as stem.png and stem.svg; returns both paths.

    groups: (label, [(mean, low, high) per series]) in the units of the y axis (percent in the reports);
    series: (legend label, colour) per bar of a group."""
    plt = _pyplot()
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.25 * len(series) * len(groups) + 0.3 * len(groups)), 3.6),
                           layout="constrained")
    for s, (name, colour) in enumerate(series):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        means = [values[s][0] for _, values in groups]
        below = [max(0.0, values[s][0] - values[s][1]) for _, values in groups]
        above = [max(0.0, values[s][2] - values[s][0]) for _, values in groups]
        ax.bar(xs, means, width * 0.9, yerr=[below, above], capsize=3, color=colour, label=name)
    ax.set_xticks(range(len(groups)), [label if len(label) <= 18 else label[:17] + "…" for label, _ in groups],
                  rotation=35, ha="right")
    ax.set_ylim(0, y_max)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", color="#ddd")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, Path(stem))


def line_panels(stem: str | Path, title: str, runs: Mapping[str, Sequence[Mapping[str, Any]]],
                curves: Sequence[tuple[str, str, str]]) -> tuple[Path, Path]:
    """One panel per run with records (name -> step records, each with "step"), a line per curve
    (record key, legend label, colour) over the steps, on 0..1; saved as stem.png and stem.svg."""
    plt = _pyplot()
    names = [name for name, records in runs.items() if records]
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(7.6, 2.8 * max(1, len(names))), squeeze=False,
                             layout="constrained")
    fig.suptitle(title, fontsize=10)
    for ax, name in zip(axes[:, 0], names):
        records = runs[name]
        steps = [r["step"] for r in records]
        for key, label, colour in curves:
            ax.plot(steps, [float(r.get(key) or 0.0) for r in records], color=colour, label=label,
                    marker="o" if len(records) == 1 else None)
        ax.set_ylim(0, 1)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
        ax.set_xlabel(f"{name}: GRPO step")
        ax.grid(color="#ddd")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, Path(stem))
