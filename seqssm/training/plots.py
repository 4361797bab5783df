"""PNG figures for fine-tuning runs: learning curves, ROC curves, regression scatter.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure`` rendered by Agg), so
nothing touches pyplot's global state or the process's backend, and every file is written
atomically: a temporary file beside the target, then ``os.replace``. A reader sees the old PNG
or the new one, never a half-written file, and a failure leaves no temporary file behind.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from seqssm.training.metrics import metric_direction, pearson, spearman

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:gray", "tab:olive", "tab:cyan")


def _figure(nrows: int = 1, ncols: int = 1, figsize=(6, 4)):
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _series(history: Sequence[Mapping], key: str) -> tuple[list, list]:
    """(epochs, values) of the rows where ``key`` holds a finite number."""
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            xs.append(row.get("epoch", i + 1))
            ys.append(v)
    return xs, ys


def plot_learning_curves(history: Sequence[Mapping], path, *, metric: str, title: str | None = None) -> None:
    """Two panels against epoch: loss (train_loss, valid_loss) and ``metric`` (valid_<metric>,
    plus train_<metric> when rows have it). Missing or None values are skipped; the best
    validation epoch is marked."""
    fig, axes = _figure(1, 2, figsize=(11, 4))
    ax_loss, ax_m = axes[0]
    for key, color, label in (("train_loss", "tab:blue", "train"), ("valid_loss", "tab:orange", "validation")):
        xs, ys = _series(history, key)
        if xs:
            ax_loss.plot(xs, ys, "o-", color=color, ms=3, label=label)
    plotted = False
    for key, color, label in ((f"train_{metric}", "tab:blue", "train"), (f"valid_{metric}", "tab:orange", "validation")):
        xs, ys = _series(history, key)
        if not xs:
            continue
        ax_m.plot(xs, ys, "o-", color=color, ms=3, label=label)
        plotted = True
        if key.startswith("valid_"):
            try:
                best = int(np.argmax(ys) if metric_direction(metric) == "max" else np.argmin(ys))
            except ValueError:
                best = None
            if best is not None:
                ax_m.axvline(xs[best], color="tab:gray", ls=":", lw=1)
                ax_m.plot([xs[best]], [ys[best]], "*", color="tab:red", ms=10,
                          label=f"best {ys[best]:.4f} (epoch {xs[best]})")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel(metric)
    ax_m.set_title(metric if plotted else f"{metric} (no values)")
    for ax in (ax_loss, ax_m):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float | None]], path, *, title: str) -> None:
    """Several ROC curves in one figure: name -> (fpr, tpr, auroc). The chance diagonal is drawn and
    the legend gives each AUROC; entries with no curve (None or empty arrays) are listed as n/a."""
    fig, axes = _figure(1, 1, figsize=(5.5, 5))
    ax = axes[0, 0]
    ax.plot([0, 1], [0, 1], ls="--", color="tab:gray", lw=1, label="chance (0.5)")
    for i, (name, curve) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        fpr, tpr, auc = curve if curve is not None else (None, None, None)
        auc_txt = "n/a" if auc is None or not math.isfinite(float(auc)) else f"{float(auc):.3f}"
        if fpr is None or tpr is None or len(fpr) == 0:
            ax.plot([], [], color=color, label=f"{name} (AUROC {auc_txt})")
            continue
        ax.plot(np.asarray(fpr), np.asarray(tpr), color=color, lw=1.6, label=f"{name} (AUROC {auc_txt})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_regression(y_true, y_pred, path, *, title: str, task_names: Sequence[str] | None = None) -> None:
    """Predicted against true values with the y = x line; Pearson and Spearman in each panel's
    title. [n, T] targets get one panel per task (at most 12); NaN targets are left out."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64).reshape(y.shape)
    y2 = y if y.ndim == 2 else y.reshape(-1, 1)
    p2 = p if p.ndim == 2 else p.reshape(-1, 1)
    n_tasks = min(y2.shape[1], 12)
    names = list(task_names) if task_names is not None else [str(t) for t in range(y2.shape[1])]
    ncols = min(n_tasks, 3)
    nrows = math.ceil(n_tasks / ncols)
    fig, axes = _figure(nrows, ncols, figsize=(4.5 * ncols, 4.2 * nrows))
    for t in range(nrows * ncols):
        ax = axes[t // ncols, t % ncols]
        if t >= n_tasks:
            ax.set_visible(False)
            continue
        keep = np.isfinite(y2[:, t]) & np.isfinite(p2[:, t])
        yt, pt = y2[keep, t], p2[keep, t]
        r = pearson(yt, pt)
        rho = spearman(yt, pt)
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        ax.scatter(yt, pt, s=6, alpha=0.4 if len(yt) > 500 else 0.7, color="tab:blue", edgecolors="none")
        if len(yt):
            lo = float(min(yt.min(), pt.min()))
            hi = float(max(yt.max(), pt.max()))
            ax.plot([lo, hi], [lo, hi], ls="--", color="tab:gray", lw=1)
        head = title if n_tasks == 1 else f"{title}: {names[t]}"
        ax.set_title(f"{head}\nPearson {fmt(r)}, Spearman {fmt(rho)} (n={len(yt)})", fontsize=9)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
