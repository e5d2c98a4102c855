"""The demo's one-page picture: did the model learn to read the images?

`write_report` draws a single PNG (matplotlib's Agg canvas, no display, no pyplot state) with three panels:

1. the learning curve: held-out mean exact match (bold) and each family's (thin) against the stage-3 step,
   with the image-free baselines (e.g. "no-image guess") as dashed lines: the curve must climb above them;
2. per-family bars, one group per family and one for the mean over families, one bar per score set
   ("before", "no-image guess", "images shuffled", "after", ...): where the gain comes from, and whether
   it survives when the images are taken away or shuffled;
3. held-out images (up to 12), each with its question, the model's answer (green when it matches the truth,
   red when not) and the truth: what the numbers mean on actual requests.

The text tables (`evaluate.table`) carry the same figures; this is the version a reader takes in at a glance.
"""
from __future__ import annotations

import math
import os
import textwrap
from typing import Mapping, Sequence

import numpy as np

from dsvl_jax import tasks

FIGSIZE = (14, 10)  # inches
DPI = 100
MAX_EXAMPLES = 12
EXAMPLE_COLS = 6
GOOD, BAD = "#1a7f37", "#cf222e"
# Fixed colours for the demo's usual score sets (grey → baseline → learned); others take the tab10 cycle.
COLUMN_COLORS = {"before": "#9e9e9e", "no-image guess": "#f0a04b", "images shuffled": "#a57fc4",
                 "after": "#2f6db5"}
ANSWER_CHARS = 28


def _families(names, order: Sequence[str] = ()) -> list[str]:
    """The families among `names`: in `order` when given, else the suite's order, then the rest as first seen."""
    seen = list(dict.fromkeys(names))
    order = list(order) or list(tasks.FAMILIES)
    return [f for f in order if f in seen] + [f for f in seen if f not in order]


def _mean(per_family: Mapping[str, float]) -> float:
    """Mean over families (each family weighs the same, as `evaluate.Scores.mean`)."""
    return float(np.mean(list(per_family.values()))) if per_family else float("nan")


def _column_colors(names) -> dict[str, str]:
    cycle = iter(["#4c9a2a", "#d1495b", "#00798c", "#edae49", "#8d6a9f", "#66a182", "#2e4057", "#c9a227"])
    return {n: COLUMN_COLORS.get(n) or next(cycle, "#555555") for n in names}


def _percent_axis(ax, top: float = 100.0) -> None:
    from matplotlib.ticker import MultipleLocator, PercentFormatter
    ax.set_ylim(0, top)
    ax.yaxis.set_major_locator(MultipleLocator(20))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _short(s: str, n: int = ANSWER_CHARS) -> str:
    """One line, at most n characters: model outputs can hold newlines and anything else."""
    s = " ".join(str(s).split()) or "(empty)"
    return s if len(s) <= n else s[:n - 1] + "…"


def _draw_curve(ax, curve: Sequence[Mapping], columns: Mapping[str, Mapping[str, float]], colors,
                order: Sequence[str]) -> None:
    ax.set_title("Learning curve (held-out split)", fontsize=12, loc="left")
    ax.set_xlabel("stage-3 step")
    ax.set_ylabel("exact match")
    _percent_axis(ax)
    points = sorted(curve, key=lambda p: p["stage3_step"])
    if not points:
        ax.text(0.5, 0.5, "no curve\n(the held-out split was not scored during stage 3)", ha="center",
                va="center", transform=ax.transAxes, fontsize=11, color="#666666")
        ax.set_xticks([])
        return
    steps = [p["stage3_step"] for p in points]
    families = _families((f for p in points for f in p.get("per_family", {})), order)
    for i, f in enumerate(families):
        xs = [p["stage3_step"] for p in points if f in p.get("per_family", {})]
        ys = [100 * p["per_family"][f] for p in points if f in p.get("per_family", {})]
        ax.plot(xs, ys, lw=1, alpha=0.75, color=f"C{i % 10}", marker=".", ms=4, label=f)
    ax.plot(steps, [100 * p["mean"] for p in points], lw=3, color="black", marker="o", ms=5, label="mean", zorder=5)
    for name, per_family in columns.items():  # the image-free baselines the curve has to beat
        if name not in ("before", "after") and per_family:
            ax.axhline(100 * _mean(per_family), ls="--", lw=1.3, color=colors[name], label=f"{name} (mean)")
    if len(steps) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.legend(fontsize=8, ncols=2, loc="best", framealpha=0.85)


def _draw_bars(ax, columns: Mapping[str, Mapping[str, float]], colors, order: Sequence[str]) -> None:
    ax.set_title("Exact match per family", fontsize=12, loc="left")
    ax.set_ylabel("exact match")
    _percent_axis(ax, 108)
    names = list(columns)
    families = _families((f for per_family in columns.values() for f in per_family), order)
    if not names or not families:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes, fontsize=11,
                color="#666666")
        ax.set_xticks([])
        return
    groups = families + ["mean"]
    width = 0.8 / len(names)
    x = np.arange(len(groups), dtype=float)
    x[-1] += 0.4  # the mean stands a little apart
    for k, name in enumerate(names):
        per_family = columns[name]
        values = [100 * per_family.get(f, np.nan) for f in families] + [100 * _mean(per_family)]
        offsets = x - 0.4 + (k + 0.5) * width
        bars = ax.bar(offsets, np.nan_to_num(values, nan=0.0), width * 0.92, color=colors[name], label=name)
        mean_bar = bars[-1]
        if not math.isnan(values[-1]):
            ax.text(mean_bar.get_x() + mean_bar.get_width() / 2, values[-1] + 1, f"{values[-1]:.0f}",
                    ha="center", va="bottom", fontsize=7)
    ax.axvline((x[-2] + x[-1]) / 2, color="#999999", lw=0.8, ls=":")
    ax.set_xticks(x, groups)
    ax.get_xticklabels()[-1].set_fontweight("bold")
    ax.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    # Below the family names: tall bars and the panel title stay visible.
    ax.legend(fontsize=8, ncols=min(5, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False,
              borderaxespad=0.2)


def _draw_examples(fig, spec, examples: Sequence) -> None:
    examples = list(examples)[:MAX_EXAMPLES]
    if not examples:
        ax = fig.add_subplot(spec)
        ax.axis("off")
        ax.text(0.5, 0.5, "no examples", ha="center", va="center", transform=ax.transAxes, fontsize=11,
                color="#666666")
        return
    rows = math.ceil(len(examples) / EXAMPLE_COLS)
    grid = spec.subgridspec(max(2, rows), EXAMPLE_COLS)  # ≥ 2 rows: a lone row keeps the size of a full grid
    for i, (image, question, prediction, truth, correct) in enumerate(examples):
        ax = fig.add_subplot(grid[i // EXAMPLE_COLS, i % EXAMPLE_COLS])
        ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_edgecolor(GOOD if correct else BAD)
            side.set_linewidth(2)
        ax.set_title(textwrap.fill(" ".join(str(question).split()), 30, max_lines=2, placeholder=" …"),
                     fontsize=8, parse_math=False)
        mark = "✓" if correct else "✗"
        ax.text(0.5, -0.04, f"{mark} model: {_short(prediction)}", transform=ax.transAxes, ha="center", va="top",
                fontsize=8.5, fontweight="bold", color=GOOD if correct else BAD, parse_math=False)
        ax.text(0.5, -0.17, f"truth: {_short(truth)}", transform=ax.transAxes, ha="center", va="top",
                fontsize=8, color="#333333", parse_math=False)


def write_report(path, *, curve: Sequence[Mapping], families: Sequence[str] = (),
                 columns: Mapping[str, Mapping[str, float]], examples: Sequence, title: str = "") -> str:
    """Draw the three panels into the PNG `path` (14×10 inches at 100 dpi) and return the path.

    curve: [{"stage3_step": int, "mean": float in [0, 1], "per_family": {family: float}}, ...] (may be empty);
    families: the families to show, in this order; empty: every family found, in the suite's order;
    columns: ordered {name: {family: accuracy in [0, 1]}}, e.g. before / no-image guess / images shuffled / after;
    examples: [(PIL image, question, prediction, truth, correct), ...], the first 12 are drawn.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if families:
        keep = set(families)
        curve = [dict(p, per_family={f: v for f, v in p.get("per_family", {}).items() if f in keep}) for p in curve]
        columns = {n: {f: v for f, v in pf.items() if f in keep} for n, pf in columns.items()}
    colors = _column_colors(columns)
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title or "DeepSeek-VL demo: held-out exact match", fontsize=15, fontweight="bold")
    outer = fig.add_gridspec(2, 1, height_ratios=[1, 1.15])
    top = outer[0].subgridspec(1, 2, width_ratios=[1, 1.25])
    _draw_curve(fig.add_subplot(top[0]), curve, columns, colors, families)
    _draw_bars(fig.add_subplot(top[1]), columns, colors, families)
    _draw_examples(fig, outer[1], examples)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
