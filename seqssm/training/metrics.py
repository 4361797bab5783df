"""Evaluation metrics for fine-tuning: classification (binary, multiclass, multilabel) and regression.

Pure numpy (no scipy or scikit-learn at run time). Definitions follow the usual conventions, and the
test-suite checks each one against scikit-learn on random inputs:

  accuracy   binary: P(class 1) >= 0.5 is predicted positive; multiclass: argmax of the scores
  mcc        Matthews correlation; for multiclass the Gorodkin (R_K) generalisation. When it is
             undefined because the truth or the predictions are all one class it is 0.0 (the
             scikit-learn convention: such a classifier carries no information)
  macro_f1   mean F1 over the classes that occur in the truth or in the predictions
  auroc      probability that a random positive outranks a random negative, ties counting 1/2
             (Mann-Whitney); multiclass: mean one-vs-rest AUROC over the classes that occur
  auprc      average precision, step-wise: sum_n (R_n - R_{n-1}) P_n over the distinct score
             thresholds (no interpolation); multiclass: mean one-vs-rest over classes that occur
  mse, pearson, spearman   regression, per task and averaged over tasks

Anything undefined (AUROC with one class present, Pearson of a constant, an empty input) is
``None`` - never NaN - so the dicts go straight into metrics.json. Averages skip ``None`` entries;
an average over nothing is ``None``.

Missing labels: in multilabel and regression targets a NaN marks a missing value; it is
left out of that task's metrics only.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

TASKS = ("binary", "multiclass", "multilabel", "regression")
CLASSIFICATION_KEYS = ("accuracy", "mcc", "macro_f1", "auroc", "auprc")
REGRESSION_KEYS = ("mse", "pearson", "spearman")

# metric -> the direction in which it improves
_DIRECTIONS = {
    "loss": "min", "mse": "min", "rmse": "min", "mae": "min",
    "accuracy": "max", "mcc": "max", "macro_f1": "max", "auroc": "max", "auprc": "max",
    "pearson": "max", "spearman": "max", "r2": "max",
}
_PRIMARY = {"binary": "auroc", "multiclass": "mcc", "multilabel": "auroc", "regression": "pearson"}


# ----------------------------------------------------------------------------- helpers


def _num(x) -> float | None:
    """A Python float, or None for None / NaN / inf (JSON-safe)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return _num(np.mean(vals)) if vals else None


def rankdata(a) -> np.ndarray:
    """1-based ranks of a 1-D array, ties getting the average of the ranks they span (float64)."""
    a = np.asarray(a)
    n = len(a)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.r_[0, np.nonzero(sorted_a[1:] != sorted_a[:-1])[0] + 1]  # first index of each tie group
    ends = np.r_[starts[1:], n]
    avg = (starts + 1 + ends) / 2.0  # mean of the ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def metric_direction(name: str) -> str:
    """'max' or 'min': the direction in which a metric improves (any '*loss*' / '*mse*' name: 'min')."""
    base = name.split("_", 1)[1] if name.startswith(("valid_", "test_", "train_")) else name
    if base in _DIRECTIONS:
        return _DIRECTIONS[base]
    if "loss" in base or base.endswith(("mse", "mae")):
        return "min"
    if base.endswith(("accuracy", "mcc", "f1", "auroc", "auprc", "pearson", "spearman")):
        return "max"
    raise ValueError(f"unknown metric {name!r}: cannot tell whether higher or lower is better")


def primary_metric(task: str, metric: str | None = None) -> tuple[str, str]:
    """(metric name, 'max' | 'min') used for early stopping and model selection.

    binary -> auroc (max); multiclass -> mcc (max); multilabel -> auroc (max, macro over tasks);
    regression -> pearson (max). ``metric`` overrides the default (e.g. "loss" -> ("loss", "min"));
    ``primary_metric("loss")`` also gives ("loss", "min").
    """
    if metric is None and task == "loss":
        return "loss", "min"
    _check_task(task)
    name = metric or _PRIMARY[task]
    return name, metric_direction(name)


def is_better(new: float | None, best: float | None, direction: str, min_delta: float = 0.0) -> bool:
    """Whether ``new`` improves on ``best``; None counts as worse than any number."""
    if new is None or (isinstance(new, float) and not math.isfinite(new)):
        return False
    if best is None:
        return True
    return new > best + min_delta if direction == "max" else new < best - min_delta


# ----------------------------------------------------------------------------- binary building blocks


def _binary_arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 2:  # [n, 2] class probabilities -> P(class 1)
        s = s[:, 1]
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    s = s.reshape(-1) if s.ndim == 2 and s.shape[1] == 1 else s
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"binary metrics need y_true [n] and scores [n]; got {y.shape} and {s.shape}")
    yf = y.astype(np.float64)
    if not np.isin(yf, (0.0, 1.0)).all():
        raise ValueError("binary labels must be 0 or 1")
    return yf.astype(np.int64), s


def _binary_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false and true positives at each distinct threshold, scores descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]  # last index of each tie group
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    return fps, tps, s_sorted[last]


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return None
    ranks = rankdata(s)  # average ranks for ties -> ties count 1/2
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return _num(u / (n_pos * n_neg))


def _auprc(y: np.ndarray, s: np.ndarray) -> float | None:
    n_pos = int(y.sum())
    if n_pos == 0 or not np.isfinite(s).all():
        return None
    fps, tps, _ = _binary_curve(y, s)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    return _num(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(tp: float, fp: float, fn: float) -> float | None:
    denom = 2 * tp + fp + fn
    return None if denom == 0 else 2 * tp / denom


def _mcc_from_confusion(cm: np.ndarray) -> float:
    """Gorodkin's R_K from a [C, C] confusion matrix (rows: truth); equals the binary MCC for C = 2."""
    cm = cm.astype(np.float64)
    t_sum = cm.sum(axis=1)
    p_sum = cm.sum(axis=0)
    n = cm.sum()
    cov_tp = np.trace(cm) * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_pp * cov_tt))


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _macro_f1_from_confusion(cm: np.ndarray) -> tuple[float | None, list[float | None]]:
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    per = [_f1(tp[c], fp[c], fn[c]) for c in range(len(tp))]
    return _mean(per), [_num(v) for v in per]


# ----------------------------------------------------------------------------- public metrics


def roc_curve(y_true, scores, *, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary ROC curve: (fpr, tpr, thresholds), thresholds descending with +inf first (the (0, 0) point).

    ``drop_intermediate`` drops points that lie on a straight segment between their neighbours
    (the plotted curve is unchanged). Raises ValueError unless both classes are present.
    """
    y, s = _binary_arrays(y_true, scores)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError("ROC curve needs both classes in y_true")
    if not np.isfinite(s).all():
        raise ValueError("ROC curve: scores contain NaN or inf")
    fps, tps, thr = _binary_curve(y, s)
    if drop_intermediate and len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    fps = np.r_[0.0, fps]
    tps = np.r_[0.0, tps]
    thr = np.r_[np.inf, thr]
    return fps / fps[-1], tps / tps[-1], thr


def precision_recall_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary precision-recall points at each distinct threshold, thresholds descending:
    (precision, recall, thresholds). Raises ValueError without positives."""
    y, s = _binary_arrays(y_true, scores)
    if int(y.sum()) == 0:
        raise ValueError("precision-recall curve needs positives in y_true")
    fps, tps, thr = _binary_curve(y, s)
    return tps / (tps + fps), tps / tps[-1], thr


def binary_metrics(y_true, scores, threshold: float = 0.5) -> dict:
    """accuracy, mcc, macro_f1 (both classes), auroc, auprc, n, positives for scores = P(class 1)."""
    y, s = _binary_arrays(y_true, scores)
    n = len(y)
    out = {"accuracy": None, "mcc": None, "macro_f1": None, "auroc": None, "auprc": None,
           "n": n, "positives": int(y.sum())}
    if n == 0:
        return out
    pred = (s >= threshold).astype(np.int64)
    cm = _confusion(y, pred, 2)
    out["accuracy"] = _num(np.trace(cm) / n)
    out["mcc"] = _num(_mcc_from_confusion(cm))
    out["macro_f1"] = _macro_f1_from_confusion(cm)[0]
    out["auroc"] = _auroc(y, s)
    out["auprc"] = _auprc(y, s)
    return out


def multiclass_metrics(y_true, scores, label_names: Sequence[str] | None = None) -> dict:
    """accuracy, mcc (R_K), macro_f1, macro one-vs-rest auroc / auprc over the classes present in
    y_true, n, and per_class {name: {f1, auroc, auprc, support}}. ``scores`` [n, C] probabilities."""
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or y.ndim != 1 or len(y) != len(s):
        raise ValueError(f"multiclass metrics need y_true [n] and scores [n, C]; got {y.shape} and {s.shape}")
    n, n_classes = s.shape
    yf = y.astype(np.float64)
    if n and (not np.all(yf == np.round(yf)) or yf.min() < 0 or yf.max() >= n_classes):
        raise ValueError(f"multiclass labels must be integers in 0..{n_classes - 1}")
    y = yf.astype(np.int64)
    names = [str(c) for c in range(n_classes)] if label_names is None else [str(x) for x in label_names]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} label names for {n_classes} classes")
    out = {"accuracy": None, "mcc": None, "macro_f1": None, "auroc": None, "auprc": None, "n": n,
           "per_class": {}}
    if n == 0:
        out["per_class"] = {nm: {"f1": None, "auroc": None, "auprc": None, "support": 0} for nm in names}
        return out
    pred = np.argmax(s, axis=1)
    cm = _confusion(y, pred, n_classes)
    out["accuracy"] = _num(np.trace(cm) / n)
    out["mcc"] = _num(_mcc_from_confusion(cm))
    out["macro_f1"], f1s = _macro_f1_from_confusion(cm)
    support = np.bincount(y, minlength=n_classes)
    aurocs, auprcs = [], []
    for c, nm in enumerate(names):
        yc = (y == c).astype(np.int64)
        auroc = _auroc(yc, s[:, c])
        auprc = _auprc(yc, s[:, c])
        aurocs.append(auroc)
        auprcs.append(auprc)
        out["per_class"][nm] = {"f1": f1s[c], "auroc": auroc, "auprc": auprc, "support": int(support[c])}
    out["auroc"] = _mean(aurocs)
    out["auprc"] = _mean(auprcs)
    return out


def multilabel_metrics(y_true, scores, label_names: Sequence[str] | None = None, threshold: float = 0.5) -> dict:
    """Binary metrics per task (per_task {name: {...}}) and their macro means over tasks.

    ``y_true`` [n, T] 0/1 (NaN = missing, skipped for that task), ``scores`` [n, T] probabilities.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim == 1:
        s = s[:, None]
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"multilabel metrics need y_true and scores of one shape [n, T]; got {y.shape} and {s.shape}")
    n_tasks = y.shape[1]
    names = [str(t) for t in range(n_tasks)] if label_names is None else [str(x) for x in label_names]
    if len(names) != n_tasks:
        raise ValueError(f"{len(names)} label names for {n_tasks} tasks")
    per_task = {}
    for t, nm in enumerate(names):
        keep = ~np.isnan(y[:, t])
        per_task[nm] = binary_metrics(y[keep, t], s[keep, t], threshold)
    out = {k: _mean(m[k] for m in per_task.values()) for k in CLASSIFICATION_KEYS}
    out["n"] = int(y.shape[0])
    out["per_task"] = per_task
    return out


def classification_metrics(y_true, scores, task: str, label_names: Sequence[str] | None = None) -> dict:
    """Dispatch to binary_metrics / multiclass_metrics / multilabel_metrics (see the module docstring)."""
    if task == "binary":
        return binary_metrics(y_true, scores)
    if task == "multiclass":
        return multiclass_metrics(y_true, scores, label_names)
    if task == "multilabel":
        return multilabel_metrics(y_true, scores, label_names)
    raise ValueError(f"classification task must be binary, multiclass or multilabel, not {task!r}")


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2:
        return None
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    if denom == 0 or not math.isfinite(denom):
        return None
    return _num(np.clip(float(a @ b) / denom, -1.0, 1.0))


def pearson(a, b) -> float | None:
    """Pearson correlation of two 1-D arrays; None when undefined (fewer than 2 values, a constant)."""
    return _pearson(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def spearman(a, b) -> float | None:
    """Spearman rank correlation (Pearson of average ranks, ties included); None when undefined."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or len(a) < 2:
        return None
    return _pearson(rankdata(a), rankdata(b))


def regression_metrics(y_true, y_pred, task_names: Sequence[str] | None = None) -> dict:
    """mse, pearson, spearman (n). For [n, T] targets: per_task {name: {mse, pearson, spearman, n}}
    and the top-level values are means over tasks. NaN in y_true marks a missing target."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if p.shape != y.shape and p.size == y.size:
        p = p.reshape(y.shape)
    if y.shape != p.shape or y.ndim not in (1, 2):
        raise ValueError(f"regression metrics need y_true and y_pred of one shape [n] or [n, T]; got {y.shape} and {p.shape}")
    multi = y.ndim == 2
    y2 = y if multi else y[:, None]
    p2 = p if multi else p[:, None]
    n_tasks = y2.shape[1]
    names = [str(t) for t in range(n_tasks)] if task_names is None else [str(x) for x in task_names]
    if len(names) != n_tasks:
        raise ValueError(f"{len(names)} task names for {n_tasks} tasks")
    per_task = {}
    for t, nm in enumerate(names):
        keep = ~np.isnan(y2[:, t])
        yt, pt = y2[keep, t], p2[keep, t]
        finite = np.isfinite(pt).all()
        per_task[nm] = {
            "mse": _num(np.mean((yt - pt) ** 2)) if len(yt) and finite else None,
            "pearson": _pearson(yt, pt) if finite else None,
            "spearman": spearman(yt, pt) if finite else None,
            "n": int(keep.sum()),
        }
    if not multi:
        return per_task[names[0]]
    out = {k: _mean(m[k] for m in per_task.values()) for k in REGRESSION_KEYS}
    out["n"] = int(y.shape[0])
    out["per_task"] = per_task
    return out


def compute_metrics(task: str, y_true, outputs, label_names: Sequence[str] | None = None) -> dict:
    """Metrics for one task: ``outputs`` are probabilities (classification) or values (regression)."""
    _check_task(task)
    if task == "regression":
        return regression_metrics(y_true, outputs, label_names)
    return classification_metrics(y_true, outputs, task, label_names)
