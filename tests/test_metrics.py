"""seqssm.training.metrics against scikit-learn / scipy, and seqssm.training.plots output files."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from seqssm.training import metrics as M
from seqssm.training import plots

sk = pytest.importorskip("sklearn.metrics")
from sklearn.preprocessing import label_binarize  # noqa: E402
from scipy import stats  # noqa: E402

SEEDS = range(6)


def _close(ours, ref, tol=1e-10):
    assert ours is not None, f"got None, expected {ref}"
    assert math.isclose(ours, float(ref), rel_tol=tol, abs_tol=tol), (ours, ref)


def _json_safe(d):
    json.dumps(d, allow_nan=False)  # raises on NaN / inf


def _binary_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    s = np.clip(0.3 * y + rng.random(n) * 0.8, 0, 1)
    if seed % 2 == 0:
        s = np.round(s, 1)  # many ties, including ties across classes and at the 0.5 threshold
    return y, s


# ----------------------------------------------------------------------------- binary


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_matches_sklearn(seed):
    y, s = _binary_inputs(seed)
    m = M.classification_metrics(y, s, "binary")
    pred = (s >= 0.5).astype(int)
    _close(m["accuracy"], sk.accuracy_score(y, pred))
    _close(m["mcc"], sk.matthews_corrcoef(y, pred))
    _close(m["macro_f1"], sk.f1_score(y, pred, average="macro", zero_division=0))
    _close(m["auroc"], sk.roc_auc_score(y, s))
    _close(m["auprc"], sk.average_precision_score(y, s))
    assert m["n"] == len(y) and m["positives"] == int(y.sum())
    _json_safe(m)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(seed, drop):
    y, s = _binary_inputs(seed)
    fpr, tpr, thr = M.roc_curve(y, s, drop_intermediate=drop)
    rf, rt, rthr = sk.roc_curve(y, s, drop_intermediate=drop)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    np.testing.assert_allclose(thr, rthr)
    # the trapezoid area under our curve is the AUROC
    _close(float(np.trapezoid(tpr, fpr)), M.binary_metrics(y, s)["auroc"], tol=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_precision_recall_curve_matches_sklearn(seed):
    y, s = _binary_inputs(seed)
    p, r, thr = M.precision_recall_curve(y, s)
    rp, rr, rthr = sk.precision_recall_curve(y, s, drop_intermediate=False)
    # sklearn lists thresholds ascending and appends the (precision 1, recall 0) end point
    np.testing.assert_allclose(p, rp[:-1][::-1])
    np.testing.assert_allclose(r, rr[:-1][::-1])
    np.testing.assert_allclose(thr, rthr[::-1])


def test_binary_one_class_edge_cases():
    s = np.array([0.1, 0.7, 0.7, 0.3, 0.9])
    neg = M.binary_metrics(np.zeros(5, int), s)
    assert neg["auroc"] is None and neg["auprc"] is None
    _close(neg["accuracy"], sk.accuracy_score(np.zeros(5), s >= 0.5))
    _close(neg["mcc"], 0.0)  # undefined MCC is 0.0, as in sklearn
    pos = M.binary_metrics(np.ones(5, int), s)
    assert pos["auroc"] is None
    _close(pos["auprc"], 1.0)  # every threshold has precision 1: defined, as in sklearn
    _close(pos["auprc"], sk.average_precision_score(np.ones(5), s))
    # constant predictions (all negative): MCC 0, macro-F1 over the classes that occur
    y = np.array([0, 1, 0, 1, 1])
    low = M.binary_metrics(y, np.full(5, 0.2))
    _close(low["mcc"], sk.matthews_corrcoef(y, np.zeros(5, int)))
    _close(low["macro_f1"], sk.f1_score(y, np.zeros(5, int), average="macro", zero_division=0))
    _close(low["auroc"], 0.5)
    for m in (neg, pos, low):
        _json_safe(m)


def test_binary_empty_and_nan_are_none():
    m = M.binary_metrics(np.zeros(0), np.zeros(0))
    assert all(m[k] is None for k in M.CLASSIFICATION_KEYS) and m["n"] == 0
    bad = M.binary_metrics(np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.3, 0.8]))
    assert bad["auroc"] is None and bad["auprc"] is None
    _json_safe(m)
    _json_safe(bad)


def test_binary_accepts_two_column_probabilities_and_rejects_bad_labels():
    y, s = _binary_inputs(3)
    two = np.stack([1 - s, s], axis=1)
    assert M.binary_metrics(y, two) == M.binary_metrics(y, s)
    with pytest.raises(ValueError):
        M.binary_metrics(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        M.binary_metrics(np.array([0, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        M.roc_curve(np.zeros(4), np.arange(4.0))


# ----------------------------------------------------------------------------- multiclass


def _multiclass_inputs(seed, n_classes=4, drop_class=None):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(40, 300))
    y = rng.integers(0, n_classes, n)
    if drop_class is not None:
        y[y == drop_class] = (drop_class + 1) % n_classes
    logits = rng.normal(size=(n, n_classes)) + 1.2 * np.eye(n_classes)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if seed % 2 == 0:
        p = np.round(p, 1)  # ties within columns (and occasionally within rows)
    return y, p


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_matches_sklearn(seed):
    y, p = _multiclass_inputs(seed)
    names = ["a", "b", "c", "d"]
    m = M.classification_metrics(y, p, "multiclass", names)
    pred = np.argmax(p, axis=1)
    _close(m["accuracy"], sk.accuracy_score(y, pred))
    _close(m["mcc"], sk.matthews_corrcoef(y, pred))
    _close(m["macro_f1"], sk.f1_score(y, pred, average="macro", zero_division=0))
    if seed % 2:  # rows sum to one (unrounded): sklearn's multiclass OvR path accepts them
        _close(m["auroc"], sk.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    yb = label_binarize(y, classes=range(4))
    _close(m["auroc"], sk.roc_auc_score(yb, p, average="macro"))
    _close(m["auprc"], sk.average_precision_score(yb, p, average="macro"))
    f1s = sk.f1_score(y, pred, average=None, labels=range(4), zero_division=0)
    for c, nm in enumerate(names):
        pc = m["per_class"][nm]
        _close(pc["auroc"], sk.roc_auc_score(yb[:, c], p[:, c]))
        _close(pc["auprc"], sk.average_precision_score(yb[:, c], p[:, c]))
        _close(pc["f1"], f1s[c])
        assert pc["support"] == int((y == c).sum())
    _json_safe(m)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_absent_class(seed):
    y, p = _multiclass_inputs(seed, drop_class=2)
    m = M.multiclass_metrics(y, p)
    assert m["per_class"]["2"]["auroc"] is None and m["per_class"]["2"]["auprc"] is None
    assert m["per_class"]["2"]["support"] == 0
    present = [c for c in range(4) if c != 2]
    _close(m["auroc"], np.mean([sk.roc_auc_score(y == c, p[:, c]) for c in present]))
    _close(m["auprc"], np.mean([sk.average_precision_score(y == c, p[:, c]) for c in present]))
    pred = np.argmax(p, axis=1)
    _close(m["mcc"], sk.matthews_corrcoef(y, pred))
    _close(m["macro_f1"], sk.f1_score(y, pred, average="macro", zero_division=0))
    _json_safe(m)


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_multiclass_single_class_and_constant_prediction():
    y = np.full(6, 1)
    p = np.tile([0.2, 0.5, 0.3], (6, 1))
    m = M.multiclass_metrics(y, p)
    assert m["auroc"] is None
    assert m["per_class"]["0"]["auprc"] is None and m["per_class"]["2"]["auprc"] is None  # no positives
    _close(m["auprc"], 1.0)  # class 1: all positive, precision 1 at every threshold
    _close(m["accuracy"], 1.0)
    _close(m["mcc"], sk.matthews_corrcoef(y, np.argmax(p, 1)))
    _json_safe(m)
    with pytest.raises(ValueError):
        M.multiclass_metrics(np.array([0, 3]), np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError):
        M.multiclass_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), ["x", "y"])


# ----------------------------------------------------------------------------- multilabel


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_matches_sklearn(seed):
    rng = np.random.default_rng(200 + seed)
    n, t = int(rng.integers(30, 200)), 5
    Y = (rng.random((n, t)) < 0.4).astype(int)
    S = np.clip(0.35 * Y + rng.random((n, t)) * 0.7, 0, 1)
    if seed % 2 == 0:
        S = np.round(S, 1)
    m = M.classification_metrics(Y, S, "multilabel", [f"t{i}" for i in range(t)])
    _close(m["auroc"], sk.roc_auc_score(Y, S, average="macro"))
    _close(m["auprc"], sk.average_precision_score(Y, S, average="macro"))
    P = (S >= 0.5).astype(int)
    _close(m["accuracy"], np.mean([sk.accuracy_score(Y[:, i], P[:, i]) for i in range(t)]))
    _close(m["mcc"], np.mean([sk.matthews_corrcoef(Y[:, i], P[:, i]) for i in range(t)]))
    _close(m["macro_f1"], np.mean([sk.f1_score(Y[:, i], P[:, i], average="macro", zero_division=0)
                                   for i in range(t)]))
    for i in range(t):
        _close(m["per_task"][f"t{i}"]["auroc"], sk.roc_auc_score(Y[:, i], S[:, i]))
    _json_safe(m)


def test_multilabel_missing_labels_and_one_class_task():
    rng = np.random.default_rng(7)
    Y = (rng.random((80, 3)) < 0.5).astype(float)
    S = rng.random((80, 3))
    Y[:, 2] = 0.0  # a task with one class only: its AUROC is None and is left out of the mean
    Y[::4, 0] = np.nan  # missing labels
    m = M.multilabel_metrics(Y, S)
    keep = ~np.isnan(Y[:, 0])
    a0 = sk.roc_auc_score(Y[keep, 0], S[keep, 0])
    a1 = sk.roc_auc_score(Y[:, 1], S[:, 1])
    assert m["per_task"]["2"]["auroc"] is None and m["per_task"]["2"]["auprc"] is None
    assert m["per_task"]["0"]["n"] == int(keep.sum())
    _close(m["per_task"]["0"]["auroc"], a0)
    _close(m["auroc"], (a0 + a1) / 2)
    _json_safe(m)
    all_none = M.multilabel_metrics(np.zeros((5, 2)), rng.random((5, 2)))
    assert all_none["auroc"] is None and all_none["auprc"] is None
    _json_safe(all_none)


# ----------------------------------------------------------------------------- regression


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_matches_scipy(seed):
    rng = np.random.default_rng(300 + seed)
    n = int(rng.integers(10, 300))
    y = rng.normal(size=n)
    p = 0.6 * y + rng.normal(size=n)
    if seed % 2 == 0:
        y, p = np.round(y), np.round(p)  # ties for Spearman
    m = M.regression_metrics(y, p)
    _close(m["mse"], sk.mean_squared_error(y, p))
    _close(m["pearson"], stats.pearsonr(y, p)[0], tol=1e-9)
    _close(m["spearman"], stats.spearmanr(y, p)[0], tol=1e-9)
    assert m["n"] == n
    _json_safe(m)


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_multitask_mean_and_missing(seed):
    rng = np.random.default_rng(400 + seed)
    n, t = 120, 3
    Y = rng.normal(size=(n, t))
    P = 0.5 * Y + rng.normal(size=(n, t))
    Y[rng.random((n, t)) < 0.1] = np.nan
    m = M.compute_metrics("regression", Y, P, ["x", "y", "z"])
    per = []
    for i, nm in enumerate("xyz"):
        keep = ~np.isnan(Y[:, i])
        ref = (sk.mean_squared_error(Y[keep, i], P[keep, i]), stats.pearsonr(Y[keep, i], P[keep, i])[0],
               stats.spearmanr(Y[keep, i], P[keep, i])[0])
        per.append(ref)
        for key, r in zip(M.REGRESSION_KEYS, ref):
            _close(m["per_task"][nm][key], r, tol=1e-9)
    for j, key in enumerate(M.REGRESSION_KEYS):
        _close(m[key], np.mean([r[j] for r in per]), tol=1e-9)
    _json_safe(m)


def test_regression_undefined_correlations_are_none():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    m = M.regression_metrics(y, np.full(4, 2.0))
    assert m["pearson"] is None and m["spearman"] is None
    _close(m["mse"], sk.mean_squared_error(y, np.full(4, 2.0)))
    one = M.regression_metrics(np.array([1.0]), np.array([2.0]))
    assert one["pearson"] is None and one["spearman"] is None
    diverged = M.regression_metrics(y, np.array([1.0, np.nan, 2.0, 3.0]))
    assert diverged["mse"] is None and diverged["pearson"] is None
    for d in (m, one, diverged):
        _json_safe(d)


@pytest.mark.parametrize("seed", SEEDS)
def test_rankdata_matches_scipy(seed):
    rng = np.random.default_rng(500 + seed)
    a = rng.integers(0, 8, int(rng.integers(1, 60))).astype(float)  # heavy ties
    np.testing.assert_array_equal(M.rankdata(a), stats.rankdata(a))
    b = rng.normal(size=50)
    np.testing.assert_array_equal(M.rankdata(b), stats.rankdata(b))
    assert M.rankdata(np.array([])).shape == (0,)


# ----------------------------------------------------------------------------- dispatch / selection


def test_primary_metric_and_directions():
    assert M.primary_metric("binary") == ("auroc", "max")
    assert M.primary_metric("multiclass") == ("mcc", "max")
    assert M.primary_metric("multilabel") == ("auroc", "max")
    assert M.primary_metric("regression") == ("pearson", "max")
    assert M.primary_metric("loss") == ("loss", "min")
    assert M.primary_metric("binary", "loss") == ("loss", "min")
    assert M.primary_metric("regression", "mse") == ("mse", "min")
    assert M.metric_direction("valid_auprc") == "max"
    assert M.metric_direction("valid_loss") == "min"
    with pytest.raises(ValueError):
        M.primary_metric("ranking")
    with pytest.raises(ValueError):
        M.metric_direction("mystery")
    assert M.is_better(0.8, None, "max") and not M.is_better(None, 0.5, "max")
    assert M.is_better(0.2, 0.3, "min") and not M.is_better(0.3, 0.3, "max")
    assert not M.is_better(float("nan"), 0.3, "max")


def test_compute_metrics_dispatch():
    y, s = _binary_inputs(1)
    assert M.compute_metrics("binary", y, s) == M.binary_metrics(y, s)
    with pytest.raises(ValueError):
        M.compute_metrics("bogus", y, s)
    with pytest.raises(ValueError):
        M.classification_metrics(y, s, "regression")


# ----------------------------------------------------------------------------- plots


def _assert_png(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _only(dirpath, names):
    assert sorted(os.listdir(dirpath)) == sorted(names), os.listdir(dirpath)  # no temp files left


def test_plot_learning_curves(tmp_path):
    hist = [{"epoch": e, "train_loss": 1.0 / e, "valid_loss": 1.1 / e + 0.01 * e,
             "valid_auroc": 0.6 + 0.05 * e if e != 3 else None, "train_auroc": 0.7 + 0.04 * e}
            for e in range(1, 7)]
    out = tmp_path / "curves.png"
    plots.plot_learning_curves(hist, out, metric="auroc")
    _assert_png(out)
    plots.plot_learning_curves(hist[:1], out, metric="mcc", title="one epoch, no metric")  # overwrite
    _assert_png(out)
    plots.plot_learning_curves([], tmp_path / "sub" / "empty.png", metric="loss")
    _assert_png(tmp_path / "sub" / "empty.png")
    _only(tmp_path, ["curves.png", "sub"])
    _only(tmp_path / "sub", ["empty.png"])


def test_plot_roc_several_curves(tmp_path):
    curves = {}
    for i, name in enumerate(["pretrained", "scratch", "k-mer"]):
        y, s = _binary_inputs(i + 1)
        fpr, tpr, _ = M.roc_curve(y, s)
        curves[name] = (fpr, tpr, M.binary_metrics(y, s)["auroc"])
    curves["undefined"] = (None, None, None)
    out = tmp_path / "roc.png"
    plots.plot_roc(curves, out, title="test split")
    _assert_png(out)
    _only(tmp_path, ["roc.png"])


def test_plot_regression(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    plots.plot_regression(y, y + rng.normal(size=200), tmp_path / "one.png", title="test")
    Y = rng.normal(size=(50, 4))
    Y[0, 1] = np.nan
    plots.plot_regression(Y, Y * 0.5, tmp_path / "multi.png", title="tasks", task_names=list("abcd"))
    plots.plot_regression(np.ones(5), np.ones(5), tmp_path / "const.png", title="constant")
    for name in ("one.png", "multi.png", "const.png"):
        _assert_png(tmp_path / name)
    _only(tmp_path, ["const.png", "multi.png", "one.png"])


def test_plot_write_is_atomic_on_failure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "roc.png"
    out.write_bytes(b"old")

    def broken(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError):
        plots.plot_roc({"m": (np.array([0, 1.0]), np.array([0, 1.0]), 0.5)}, out, title="t")
    assert out.read_bytes() == b"old"
    _only(tmp_path, ["roc.png"])
