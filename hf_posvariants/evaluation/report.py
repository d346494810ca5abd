"""Markdown tables and PNG plots for the measuring scripts (matplotlib, the `plots` extra)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) >= 1000 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def distinct_colours(count: int) -> list[tuple[float, ...]]:
    """`count` colours that stay apart: matplotlib's ten-colour cycle, its twenty-colour map beyond ten runs
    (the default cycle would give two of the War and Peace study's fourteen models the same colour)."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    log_y: bool = False,
    vertical_line: float | None = None,
    styles: dict[str, dict] | None = None,
) -> Path:
    """One line per series, each its own colour unless `styles` says otherwise; a None value (a length a model
    cannot run at) leaves a gap. `styles` gives matplotlib keyword arguments per series (e.g. one colour per
    model, one dash per mode; `label="_nolegend_"` keeps a series out of the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for (name, (xs, ys)), colour in zip(series.items(), distinct_colours(len(series))):
        points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if points:
            style = {"label": name, "color": colour, "marker": "o" if len(points) < 40 else None}
            axes.plot(*zip(*points), **style | (styles or {}).get(name, {}))
    if log_x:
        axes.set_xscale("log", base=2)
    if log_y:
        axes.set_yscale("log")
    if vertical_line is not None:
        axes.axvline(vertical_line, color="grey", linestyle=":", label="training length")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: curves stay visible
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
