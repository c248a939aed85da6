"""Pictures: a run's training curves, one user's attention weights, and line charts of benchmark tables.

matplotlib is an optional extra (``pip install "din_ext[plots]"``), imported only when a picture is drawn, with the
non-interactive Agg backend (no display needed). ``available()`` says whether it is installed; without it every
drawing function raises ImportError with the install command.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

INSTALL = 'pip install "din_ext[plots]"'


def available() -> bool:
    """Whether matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"drawing pictures needs matplotlib: {INSTALL}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)  # pyplot keeps every figure alive until closed
    return path


def training_curves(history: Sequence[Mapping[str, float]], path: str, title: str = "") -> str:
    """curves.png of a run: train loss (left) and test AUC and GAUC (right) per epoch; ``history``: fit's per-epoch
    results (metrics.json's "history"). An undefined GAUC (NaN) leaves a gap. Returns ``path``."""
    plt = _pyplot()
    epochs = [int(h["epoch"]) for h in history]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", color="tab:red")
    loss_ax.set(xlabel="epoch", ylabel="train loss (binary cross-entropy)", title="train loss")
    for key, color in (("auc", "tab:blue"), ("gauc", "tab:green")):
        auc_ax.plot(epochs, [h[key] for h in history], marker="o", color=color, label=f"test {key.upper()}")
    auc_ax.set(xlabel="epoch", ylabel="test metric", title="test AUC and GAUC")
    auc_ax.legend()
    for ax in (loss_ax, auc_ax):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def attention_bars(labels: Sequence[str], weights: Sequence[float], path: str, title: str = "",
                   highlight: Optional[Sequence[bool]] = None, highlight_label: str = "",
                   xlabel: str = "attention weight", ylabel: str = "") -> str:
    """Horizontal bars of ``weights``, the first on top (callers pass them top first); bars where ``highlight`` is
    true get a second colour, named ``highlight_label`` in the legend. Returns ``path``."""
    plt = _pyplot()
    count = len(weights)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.32 * count + 1.2)))
    marked = list(highlight) if highlight is not None else [False] * count
    colors = ["tab:orange" if m else "tab:blue" for m in marked]
    ax.barh(range(count), weights, color=colors)
    ax.set_yticks(range(count), labels)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    if highlight_label and any(marked):
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:orange", label=highlight_label), Patch(color="tab:blue", label="other")],
                  loc="lower right")
    return _save(fig, path)


def line_panels(panels: Mapping[str, Mapping[str, Sequence[Tuple[float, float]]]], path: str, xlabel: str,
                ylabel: str, title: str = "", logx: bool = False, logy: bool = False) -> str:
    """One chart per panel (panel title -> series name -> (x, y) points), side by side in rows of at most three,
    one line per series with the same colour for a series name in every panel. Returns ``path``."""
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    names = list(panels)
    if not names:
        raise ValueError("line_panels: no panel to draw")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    series = sorted({s for panel in panels.values() for s in panel})
    colors: Dict[str, str] = {s: f"C{i % 10}" for i, s in enumerate(series)}
    for ax, name in zip(axes.flat, names):
        for label, points in panels[name].items():
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
        if logx:  # ticks at the measured x values, not only at the powers of ten
            ax.set_xscale("log")
            xs = sorted({p[0] for points in panels[name].values() for p in points})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
