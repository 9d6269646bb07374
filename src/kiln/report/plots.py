"""Quality-versus-cost scatter plots as inline SVG, with the Pareto front marked (matplotlib)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool, lower_y_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes."""
    def better(a: float, b: float, lower: bool) -> bool:
        return a <= b if lower else a >= b

    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            j != i and better(px, x, lower_x_better) and better(py, y, lower_y_better) and (px, py) != (x, y)
            for j, (px, py) in enumerate(points)
        )
        if not dominated:
            front.append(i)
    return front


def scatter_svg(points: Sequence[tuple[float, float]], labels: Sequence[str], xlabel: str, ylabel: str,
                lower_x_better: bool, lower_y_better: bool, title: str) -> str:
    """An SVG scatter of labelled points; the Pareto front is joined and drawn in a second colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    front = set(pareto_front(points, lower_x_better, lower_y_better))
    for i, ((x, y), label) in enumerate(zip(points, labels, strict=True)):
        ax.scatter([x], [y], s=60, color="#d9480f" if i in front else "#868e96", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if len(front) > 1:
        ordered = sorted(points[i] for i in front)
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], color="#d9480f", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prologue so the SVG can sit inside HTML


def line_svg(series: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for name, values in series.items():
        ax.plot([v[0] for v in values], [v[1] for v in values], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]
