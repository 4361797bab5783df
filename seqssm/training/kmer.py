"""k-mer spectrum + L2 logistic regression (ridge for regression): the classical baseline that
fine-tuned sequence models are compared with, on the same train/validation/test split.

Features. For each k, every window of k consecutive A/C/G/T bases gets a base-4 code
(first base most significant, so columns are in lexicographic order AA..A, AA..C, ...); windows
that touch an N, a special token or a sequence end are skipped. Counts come from one
``np.bincount`` per k over all sequences at once (index = sequence * 4**k + code) and are divided
by the number of counted k-mers of that sequence, so each k block of a row sums to 1 (or is all
0 when the sequence has no valid k-mer). With ``canonical=True`` a k-mer and its reverse
complement share one column (the lexicographically smaller of the two names it).

Model. Features are standardised with the training mean and standard deviation (constant
columns are left at 0). Classification minimises

    mean_i cross_entropy(x_i W + b, y_i) + l2 / 2 * ||W||^2          (intercept not penalised)

full-batch with torch L-BFGS (strong-Wolfe line search) in float64: a single logit for binary,
a softmax over C classes for multiclass (W is [d, C], as scikit-learn's multinomial model), and an
independent logistic model per task for multilabel (the objective is a sum of per-task terms;
NaN labels are left out of their task). This is scikit-learn's LogisticRegression with
C = 1 / (l2 * n_train). Regression is ridge in closed form,

    mean_i ||y_i - x_i W - b||^2 + l2 * ||W||^2      (scikit-learn's Ridge with alpha = l2 * n_train)

solved through one eigendecomposition of the smaller Gram matrix (X^T X or X X^T).

``l2=None`` picks l2 from ``l2_grid`` by the task's primary validation metric (AUROC for binary
and multilabel, MCC for multiclass, Pearson for regression; ties keep the stronger penalty). The
validation set is the one passed to fit(); without one, a seeded (stratified) ``valid_fraction``
of the training set is held out for the choice and the model is then refitted on all of it.
The grid is walked from the strongest penalty down, each fit warm-started from the previous one,
and the walk stops after ``patience`` (default 2) consecutive penalties without a better
validation value (weak penalties are the slow fits, and past the optimum they only overfit more).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from seqssm.tokenizers.dna import A, T, encode
from seqssm.training.metrics import TASKS, compute_metrics, is_better, primary_metric

DEFAULT_K = (1, 2, 3, 4, 5, 6)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
_BINCOUNT_CELLS = 1 << 24  # bound on sequences_per_chunk * 4**k (memory of one bincount)

# ids -> 0..3 for A/C/G/T, 4 for anything else (N, specials, PAD, invalid)
_CODE_LUT = np.full(256, 4, dtype=np.uint8)
_CODE_LUT[A:T + 1] = np.arange(4, dtype=np.uint8)


# ----------------------------------------------------------------------------- features


def _ks(k) -> tuple[int, ...]:
    ks = (int(k),) if np.isscalar(k) else tuple(int(x) for x in k)
    if not ks or any(x < 1 or x > 10 for x in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"k must be distinct integers in 1..10, got {k!r}")
    return ks


def _codes(seq) -> np.ndarray:
    """One sequence (uint8 ids, or a str/bytes of bases) -> base codes 0..3 / 4."""
    if isinstance(seq, (str, bytes, bytearray, memoryview)):
        return _CODE_LUT[encode(seq)]
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().numpy()
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise ValueError(f"each sequence must be a 1-D array of token ids, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.where((arr >= 0) & (arr < 256), arr, 255).astype(np.uint8)
    return _CODE_LUT[arr]


def _canonical_columns(k: int) -> tuple[np.ndarray, int]:
    """code -> column of its canonical k-mer (min of itself and its reverse complement)."""
    codes = np.arange(4 ** k, dtype=np.int64)
    powers = 4 ** np.arange(k - 1, -1, -1, dtype=np.int64)  # first base most significant
    digits = (codes[:, None] // powers) % 4
    rc = ((3 - digits[:, ::-1]) * powers).sum(axis=1)
    canon = np.minimum(codes, rc)
    uniq, col = np.unique(canon, return_inverse=True)
    return col.astype(np.int64), len(uniq)


def _columns(k: int, canonical: bool) -> tuple[np.ndarray | None, int]:
    return _canonical_columns(k) if canonical else (None, 4 ** k)


def kmer_names(k=DEFAULT_K, *, canonical: bool = False) -> list[str]:
    """Column names of kmer_features(..., k, canonical=...), in column order."""
    names = []
    for kk in _ks(k):
        codes = np.arange(4 ** kk, dtype=np.int64)
        digits = (codes[:, None] // 4 ** np.arange(kk - 1, -1, -1, dtype=np.int64)) % 4
        all_names = ["".join("ACGT"[d] for d in row) for row in digits]
        if canonical:
            col, m = _canonical_columns(kk)
            first = np.full(m, -1)
            for c in range(4 ** kk - 1, -1, -1):  # the smallest code of each class names it
                first[col[c]] = c
            names += [all_names[c] for c in first]
        else:
            names += all_names
    return names


def kmer_features(
    seqs_ids: Sequence[np.ndarray],
    k: int | Sequence[int] = DEFAULT_K,
    *,
    canonical: bool = False,
    normalize: bool = True,
    dtype=np.float32,
) -> np.ndarray:
    """[n, sum_k 4**k] k-mer frequencies (each k block sums to 1 per sequence), or raw counts with
    normalize=False. Sequences are uint8 token ids (seqssm.tokenizers.dna) or base strings; k-mers
    containing N or any non-ACGT token are skipped. With canonical=True, the columns are the
    canonical k-mers (see kmer_names)."""
    ks = _ks(k)
    codes = [_codes(s) for s in seqs_ids]
    n = len(codes)
    layout = [_columns(kk, canonical) for kk in ks]
    offsets = np.cumsum([0] + [m for _, m in layout])
    out = np.zeros((n, int(offsets[-1])), dtype=dtype)
    if n == 0:
        return out
    lengths = np.array([len(c) for c in codes], dtype=np.int64)
    per_chunk = max(1, _BINCOUNT_CELLS // (4 ** max(ks)))
    sep = np.array([4], dtype=np.uint8)
    for lo in range(0, n, per_chunk):
        hi = min(n, lo + per_chunk)
        # one flat array, each sequence followed by a separator (code 4) so no k-mer spans two
        flat = np.concatenate([x for c in codes[lo:hi] for x in (c, sep)])
        seq_of = np.repeat(np.arange(hi - lo, dtype=np.int64), lengths[lo:hi] + 1)
        bad = np.concatenate([[0], np.cumsum(flat == 4, dtype=np.int64)])
        digits = np.where(flat == 4, 0, flat).astype(np.int64)
        for (col, m), off, kk in zip(layout, offsets[:-1], ks):
            span = len(flat) - kk + 1
            if span <= 0:
                continue
            valid = (bad[kk:kk + span] - bad[:span]) == 0
            code = np.zeros(span, dtype=np.int64)
            for j in range(kk):  # rolling base-4 code of the k-mer starting at each position
                code = code * 4 + digits[j:j + span]
            code = code[valid]
            if col is not None:
                code = col[code]
            counts = np.bincount(seq_of[:span][valid] * m + code, minlength=(hi - lo) * m).reshape(hi - lo, m)
            if normalize:
                total = counts.sum(axis=1, keepdims=True)
                out[lo:hi, off:off + m] = counts / np.maximum(total, 1)
            else:
                out[lo:hi, off:off + m] = counts
    return out


# ----------------------------------------------------------------------------- model


def expit(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow for large |z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _inverse(lam: torch.Tensor, shift: float) -> torch.Tensor:
    """1 / (lam + shift) for Gram eigenvalues, 0 on the numerical null space (a pseudo-inverse at l2=0)."""
    denom = lam.clamp(min=0) + shift
    cutoff = 1e-10 * max(float(denom.max()), 1e-300) if len(denom) else 0.0
    return torch.where(denom > cutoff, 1.0 / denom.clamp(min=1e-300), torch.zeros_like(denom))


def _split_indices(y: np.ndarray, fraction: float, seed: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(y)
    if stratify:
        hold = []
        for c in np.unique(y):
            idx = rng.permutation(np.nonzero(y == c)[0])
            hold.append(idx[: int(round(fraction * len(idx)))])
        hold = np.sort(np.concatenate(hold))
    else:
        hold = np.sort(rng.permutation(n)[: int(round(fraction * n))])
    mask = np.zeros(n, dtype=bool)
    mask[hold] = True
    return np.nonzero(~mask)[0], hold


class KmerLogistic:
    """k-mer frequencies -> standardised -> L2 logistic regression (ridge for regression).

    task: "binary" | "multiclass" | "multilabel" | "regression". See the module docstring for the
    objective; after fit(): l2_ (the penalty used), selection_ (grid rows {l2, metric, loss} when it
    was chosen on validation data), coef_ [d, outputs], intercept_ [outputs], n_iter_, converged_.
    """

    def __init__(
        self,
        task: str,
        k: int | Sequence[int] = DEFAULT_K,
        l2: float | None = None,
        max_iter: int = 1000,
        *,
        canonical: bool = False,
        l2_grid: Sequence[float] = L2_GRID,
        tol: float = 1e-7,
        num_classes: int | None = None,
        valid_fraction: float = 0.2,
        seed: int = 0,
        patience: int | None = 2,
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
        if l2 is not None and not l2 >= 0:
            raise ValueError("l2 must be >= 0")
        if l2 is None and not l2_grid:
            raise ValueError("l2_grid is empty")
        self.task = task
        self.k = _ks(k)
        self.l2 = None if l2 is None else float(l2)
        self.canonical = canonical
        self.l2_grid = tuple(sorted((float(x) for x in l2_grid), reverse=True))  # strong -> weak
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.num_classes = num_classes
        self.valid_fraction = float(valid_fraction)
        self.seed = int(seed)
        self.patience = patience
        self.metric, self.direction = primary_metric(task)
        self.l2_: float | None = None
        self.selection_: list[dict] = []

    # -- features

    def raw_features(self, ids_list) -> np.ndarray:
        return kmer_features(ids_list, self.k, canonical=self.canonical)

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """Raw k-mer frequencies -> standardised float64 features (training mean / std)."""
        return (np.asarray(feats, dtype=np.float64) - self.mean_) / self.scale_

    def features(self, ids_list) -> np.ndarray:
        """Standardised features the linear model sees, [n, d] float64."""
        return self.transform(self.raw_features(ids_list))

    # -- labels

    def _labels(self, y) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.task == "binary":
            y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
            if y.ndim != 1 or not np.isin(y, (0.0, 1.0)).all():
                raise ValueError("binary labels must be a 1-D array of 0/1")
        elif self.task == "multiclass":
            if y.ndim != 1 or not np.all(y == np.round(y)) or (len(y) and y.min() < 0):
                raise ValueError("multiclass labels must be a 1-D array of class indices 0..C-1")
        elif self.task == "multilabel":
            y = y[:, None] if y.ndim == 1 else y
            if y.ndim != 2 or not np.isin(y[~np.isnan(y)], (0.0, 1.0)).all():
                raise ValueError("multilabel labels must be [n, T] of 0/1 (NaN = missing)")
        elif y.ndim not in (1, 2):
            raise ValueError("regression targets must be [n] or [n, T]")
        return y

    # -- fitting

    def fit(self, train_ids, y_train, valid_ids=None, y_valid=None) -> "KmerLogistic":
        y_tr = self._labels(y_train)
        if len(y_tr) != len(train_ids):
            raise ValueError(f"{len(train_ids)} training sequences but {len(y_tr)} labels")
        if len(y_tr) == 0:
            raise ValueError("no training sequences")
        feats_tr = self.raw_features(train_ids)
        self._y_ndim = y_tr.ndim
        if self.task == "multiclass":
            top = int(y_tr.max()) + 1
            if y_valid is not None and len(y_valid):
                top = max(top, int(np.max(y_valid)) + 1)
            self.n_classes_ = max(top, int(self.num_classes or 0))
        if self.l2 is not None:
            self._fit_all(feats_tr, y_tr, self.l2)
            self.l2_ = self.l2
            return self

        refit = valid_ids is None
        if refit:  # hold out part of the training set to choose l2, then refit on all of it
            stratify = self.task in ("binary", "multiclass")
            tr_idx, va_idx = _split_indices(y_tr if stratify else np.zeros(len(y_tr)), self.valid_fraction,
                                            self.seed, stratify)
            if len(va_idx) == 0 or len(tr_idx) == 0:
                raise ValueError("too few training sequences to hold out a validation part; pass l2")
            f_fit, y_fit, f_va, y_va = feats_tr[tr_idx], y_tr[tr_idx], feats_tr[va_idx], y_tr[va_idx]
        else:
            y_va = self._labels(y_valid)
            if len(y_va) != len(valid_ids):
                raise ValueError(f"{len(valid_ids)} validation sequences but {len(y_va)} labels")
            f_fit, y_fit, f_va = feats_tr, y_tr, self.raw_features(valid_ids)

        self._standardise(f_fit)
        x_fit, x_va = self.transform(f_fit), self.transform(f_va)
        self.selection_ = []
        best, best_l2, best_state = None, None, None
        use_loss = False
        rows = []
        state = None
        running, worse = None, 0
        for l2 in self.l2_grid:  # strong -> weak penalty, each fit warm-started from the previous one
            state = self._solve(x_fit, y_fit, l2, warm=state)
            self._set_state(state)
            out = self._predict_x(x_va)
            metric = compute_metrics(self.task, y_va, out).get(self.metric)
            loss = self._loss(out, y_va)
            rows.append({"l2": l2, "metric": metric, "loss": loss, "state": state})
            use_loss = use_loss or metric is None
            # weaker penalties cost more L-BFGS iterations: stop once `patience` in a row failed to improve
            key = -loss if use_loss else metric
            if is_better(key, running, "max" if use_loss else self.direction):
                running, worse = key, 0
            else:
                worse += 1
                if self.patience is not None and worse >= self.patience:
                    break
        for row in rows:
            key = -row["loss"] if use_loss else row["metric"]
            if is_better(key, best, "max" if use_loss else self.direction):
                best, best_l2, best_state = key, row["l2"], row["state"]
        self.selection_ = [{"l2": r["l2"], self.metric: r["metric"], "loss": r["loss"]} for r in rows]
        self.selected_by_ = "loss" if use_loss else self.metric
        self.l2_ = best_l2
        if refit:
            self._fit_all(feats_tr, y_tr, best_l2)
        else:
            self._set_state(best_state)
        return self

    def _standardise(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, dtype=np.float64)
        self.mean_ = f.mean(axis=0)
        std = f.std(axis=0)
        self.scale_ = np.where(std > 1e-12, std, 1.0)

    def _fit_all(self, feats: np.ndarray, y: np.ndarray, l2: float) -> None:
        self._standardise(feats)
        self._set_state(self._solve(self.transform(feats), y, l2, warm=None))

    def _set_state(self, state: dict) -> None:
        self.coef_ = state["coef"]
        self.intercept_ = state["intercept"]
        self.n_iter_ = state["n_iter"]
        self.converged_ = state["converged"]

    def _solve(self, x: np.ndarray, y: np.ndarray, l2: float, warm: dict | None) -> dict:
        if self.task == "regression":
            return self._ridge(x, y, l2)
        return self._lbfgs(x, y, l2, warm)

    def _lbfgs(self, x: np.ndarray, y: np.ndarray, l2: float, warm: dict | None) -> dict:
        X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
        n, d = X.shape
        if self.task == "binary":
            outputs = 1
            Y = torch.from_numpy(y.astype(np.float64))[:, None]
        elif self.task == "multiclass":
            outputs = self.n_classes_
            Y = torch.from_numpy(y.astype(np.int64))
        else:
            outputs = y.shape[1]
            obs = torch.from_numpy(~np.isnan(y))
            Y = torch.from_numpy(np.nan_to_num(y, nan=0.0))
            per_task = obs.sum(0).clamp(min=1).double()
        if warm is not None:
            W = torch.tensor(warm["coef"], dtype=torch.float64, requires_grad=True)
            b = torch.tensor(warm["intercept"], dtype=torch.float64, requires_grad=True)
        else:
            W = torch.zeros(d, outputs, dtype=torch.float64, requires_grad=True)
            b = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)

        def objective():
            z = X @ W + b
            if self.task == "binary":
                data = torch.nn.functional.binary_cross_entropy_with_logits(z, Y)
            elif self.task == "multiclass":
                data = torch.nn.functional.cross_entropy(z, Y)
            else:
                el = torch.nn.functional.binary_cross_entropy_with_logits(z, Y, reduction="none")
                data = ((el * obs).sum(0) / per_task).sum()
            return data + 0.5 * l2 * (W * W).sum()

        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=self.max_iter, max_eval=int(self.max_iter * 1.25) + 1,
                                tolerance_grad=self.tol, tolerance_change=1e-15, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
            opt.zero_grad()
            objective().backward()
        grad = max(float(W.grad.abs().max()), float(b.grad.abs().max()))
        return {"coef": W.detach().numpy().copy(), "intercept": b.detach().numpy().copy(),
                "n_iter": int(opt.state[W].get("n_iter", 0)), "converged": grad <= 10 * self.tol}

    def _ridge(self, x: np.ndarray, y: np.ndarray, l2: float) -> dict:
        y2 = y[:, None] if y.ndim == 1 else y
        d = x.shape[1]
        coef = np.zeros((d, y2.shape[1]))
        intercept = np.zeros(y2.shape[1])
        masks = ~np.isnan(y2)
        groups = [np.arange(y2.shape[1])] if masks.all() else [np.array([t]) for t in range(y2.shape[1])]
        for cols in groups:
            rows = masks[:, cols[0]]
            xs, ys = x[rows], y2[rows][:, cols]
            if len(xs) == 0:
                continue
            xm, ym = xs.mean(axis=0), ys.mean(axis=0)
            xc, yc = xs - xm, ys - ym
            n = len(xs)
            X = torch.from_numpy(np.ascontiguousarray(xc))
            Yt = torch.from_numpy(np.ascontiguousarray(yc))
            if n >= d:  # primal: (X^T X + n l2 I) w = X^T y
                lam, Q = torch.linalg.eigh(X.T @ X)
                w = Q @ ((Q.T @ (X.T @ Yt)) * _inverse(lam, n * l2)[:, None])
            else:  # dual: w = X^T (X X^T + n l2 I)^-1 y
                lam, Q = torch.linalg.eigh(X @ X.T)
                w = X.T @ (Q @ ((Q.T @ Yt) * _inverse(lam, n * l2)[:, None]))
            w = w.numpy()
            coef[:, cols] = w
            intercept[cols] = ym - xm @ w
        return {"coef": coef, "intercept": intercept, "n_iter": 0, "converged": True}

    # -- prediction

    def _predict_x(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.coef_ + self.intercept_
        if self.task == "binary":
            return expit(z[:, 0])
        if self.task == "multiclass":
            z = z - z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        if self.task == "multilabel":
            return expit(z)
        return z[:, 0] if self._y_ndim == 1 else z

    def _loss(self, out: np.ndarray, y: np.ndarray) -> float:
        """Mean validation loss: cross-entropy (classification) or MSE (regression)."""
        eps = 1e-12
        if self.task == "regression":
            y2 = y.reshape(out.shape)
            keep = ~np.isnan(y2)
            return float(np.mean((y2[keep] - out[keep]) ** 2))
        if self.task == "binary":
            p = np.clip(out, eps, 1 - eps)
            return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        if self.task == "multiclass":
            return float(-np.mean(np.log(np.clip(out[np.arange(len(y)), y.astype(np.int64)], eps, 1))))
        keep = ~np.isnan(y)
        p = np.clip(out[keep], eps, 1 - eps)
        yy = y[keep]
        return float(-np.mean(yy * np.log(p) + (1 - yy) * np.log(1 - p)))

    def decision_function(self, ids_list) -> np.ndarray:
        """Linear scores (logits for classification), [n, outputs]."""
        self._check_fitted()
        return self.features(ids_list) @ self.coef_ + self.intercept_

    def predict(self, ids_list) -> np.ndarray:
        """P(class 1) [n] (binary), class probabilities [n, C] (multiclass), per-task probabilities
        [n, T] (multilabel), or values [n] / [n, T] (regression)."""
        self._check_fitted()
        return self._predict_x(self.features(ids_list))

    def evaluate(self, ids_list, y, label_names: Sequence[str] | None = None) -> dict:
        """compute_metrics(task, y, predict(ids_list))."""
        return compute_metrics(self.task, self._labels(y), self.predict(ids_list), label_names)

    def summary(self) -> dict:
        """JSON-safe description of the fitted baseline (for metrics.json)."""
        self._check_fitted()
        return {
            "model": "kmer-logistic" if self.task != "regression" else "kmer-ridge",
            "task": self.task, "k": list(self.k), "canonical": self.canonical,
            "features": int(self.coef_.shape[0]), "l2": self.l2_,
            "l2_selection": self.selection_, "selected_by": getattr(self, "selected_by_", None),
            "n_iter": self.n_iter_, "converged": bool(self.converged_),
        }

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise RuntimeError("KmerLogistic is not fitted: call fit() first")


def sklearn_C(l2: float, n_train: int) -> float:
    """The scikit-learn LogisticRegression C equivalent to ``l2`` with ``n_train`` training samples."""
    return math.inf if l2 == 0 else 1.0 / (l2 * n_train)
