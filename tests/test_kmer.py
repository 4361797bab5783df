"""k-mer features (exact counts) and the KmerLogistic baseline (against scikit-learn, and on real data)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from seqssm.tokenizers.dna import encode
from seqssm.training.kmer import KmerLogistic, kmer_features, kmer_names, sklearn_C
from seqssm.training.metrics import compute_metrics

PROMOTERS = Path("/work/shared/data/ecoli_promoters_81bp.csv")
ENHANCERS = Path("/work/shared/data/ienhancer_200bp.csv")


def _col(k_list, kmer):
    """Column of `kmer` in the non-canonical layout for k_list."""
    off = sum(4 ** k for k in k_list if k < len(kmer))
    return off + int("".join("0123"["ACGT".index(c)] for c in kmer), 4)


# ----------------------------------------------------------------------------- features


def test_kmer_counts_by_hand():
    ks = (1, 2, 3)
    f = kmer_features([encode("ACGTNAC")], ks, normalize=False)
    assert f.shape == (1, 4 + 16 + 64)
    expect = np.zeros(84)
    # k=1: A C G T A C (N skipped)
    for kmer, c in {"A": 2, "C": 2, "G": 1, "T": 1,
                    # k=2: AC CG GT | AC   (GN and NA contain N)
                    "AC": 2, "CG": 1, "GT": 1,
                    # k=3: ACG CGT         (GTN TNA NAC skipped)
                    "ACG": 1, "CGT": 1}.items():
        expect[_col(ks, kmer)] = c
    np.testing.assert_array_equal(f[0], expect)
    freq = kmer_features([encode("ACGTNAC")], ks)
    np.testing.assert_allclose(freq[0, :4], [2 / 6, 2 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(freq[0, _col(ks, "AC")], 2 / 4)
    np.testing.assert_allclose(freq[0, _col(ks, "ACG")], 1 / 2)
    names = kmer_names(ks)
    assert names[:5] == ["A", "C", "G", "T", "AA"] and names[_col(ks, "CGT")] == "CGT" and len(names) == 84


def test_kmer_no_kmer_spans_two_sequences_and_short_sequences():
    f = kmer_features([encode("AC"), encode("GT"), encode("A"), encode(""), encode("NNNN")], (1, 2), normalize=False)
    assert f[0, _col((1, 2), "AC")] == 1 and f[1, _col((1, 2), "GT")] == 1
    assert f[:, _col((1, 2), "CG")].sum() == 0  # would only appear across the AC|GT boundary
    assert f[2].sum() == 1 and f[3].sum() == 0 and f[4].sum() == 0
    freq = kmer_features([encode("A"), encode("")], (1, 2))
    np.testing.assert_array_equal(freq[1], 0)  # no valid k-mer: zeros, not NaN
    assert freq[0, 4:].sum() == 0 and freq[0, :4].sum() == 1


def _brute(seq: str, ks, canonical):
    """Reference counts with a Python loop over every window (test only)."""
    comp = str.maketrans("ACGT", "TGCA")
    rows = []
    for k in ks:
        kmers = ["".join(p) for p in itertools.product("ACGT", repeat=k)]
        if canonical:
            kmers = sorted({min(x, x.translate(comp)[::-1]) for x in kmers})
        idx = {x: i for i, x in enumerate(kmers)}
        row = np.zeros(len(kmers))
        for i in range(len(seq) - k + 1):
            w = seq[i:i + k]
            if set(w) <= set("ACGT"):
                if canonical:
                    w = min(w, w.translate(comp)[::-1])
                row[idx[w]] += 1
        rows.append(row)
    return np.concatenate(rows)


@pytest.mark.parametrize("canonical", [False, True])
def test_kmer_features_match_brute_force(canonical):
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGTN"), p=[0.24, 0.24, 0.24, 0.24, 0.04], size=int(rng.integers(0, 60))))
            for _ in range(40)]
    ks = (1, 2, 3, 4)
    ours = kmer_features([encode(s) for s in seqs], ks, canonical=canonical, normalize=False)
    ref = np.stack([_brute(s, ks, canonical) for s in seqs])
    np.testing.assert_array_equal(ours, ref)
    assert len(kmer_names(ks, canonical=canonical)) == ours.shape[1]
    if canonical:
        assert [sum(1 for n in kmer_names(k, canonical=True)) for k in (1, 2, 3)] == [2, 10, 32]
        assert kmer_names(2, canonical=True)[:4] == ["AA", "AC", "AG", "AT"]
    # strings, lowercase, and ids with special tokens (PAD=4 counts like N)
    lower = kmer_features([s.lower() for s in seqs], ks, canonical=canonical, normalize=False)
    np.testing.assert_array_equal(lower, ours)


def test_kmer_features_special_tokens_and_reverse_complement():
    ids = np.array([7, 8, 4, 9, 10, 11, 7], dtype=np.uint8)  # A C [PAD] G T N A
    f = kmer_features([ids], 2, normalize=False)
    assert f.sum() == 2 and f[0, _col((2,), "AC")] == 1 and f[0, _col((2,), "GT")] == 1
    rng = np.random.default_rng(1)
    s = "".join(rng.choice(list("ACGT"), 200))
    rc = s.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    a, b = kmer_features([s, rc], (1, 2, 3, 4, 5, 6), canonical=True)
    np.testing.assert_allclose(a, b)  # canonical counts do not depend on the strand


def test_kmer_features_chunking(monkeypatch):
    import seqssm.training.kmer as K

    rng = np.random.default_rng(2)
    seqs = [encode("".join(rng.choice(list("ACGTN"), 30))) for _ in range(25)]
    full = kmer_features(seqs, (1, 3))
    monkeypatch.setattr(K, "_BINCOUNT_CELLS", 64 * 4)  # 4 sequences per chunk
    np.testing.assert_array_equal(kmer_features(seqs, (1, 3)), full)


# ----------------------------------------------------------------------------- model vs scikit-learn


def _planted(n, n_classes, seed, length=60):
    """Random sequences; class c carries motif c a few times (a learnable synthetic task)."""
    rng = np.random.default_rng(seed)
    motifs = ["TATAAT", "GGCGCC", "CAATTG", "AGGAGG"][:n_classes]
    y = rng.integers(0, n_classes, n)
    seqs = []
    for c in y:
        s = list(rng.choice(list("ACGT"), length))
        for _ in range(int(rng.integers(0, 3))):
            p = int(rng.integers(0, length - 6))
            s[p:p + 6] = motifs[c]
        seqs.append(encode("".join(s)))
    return seqs, y


def test_multiclass_lbfgs_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    seqs, y = _planted(600, 3, 0)
    l2 = 1e-2
    m = KmerLogistic("multiclass", k=(1, 2, 3), l2=l2).fit(seqs[:480], y[:480])
    X = m.features(seqs)
    ref = LogisticRegression(C=sklearn_C(l2, 480), tol=1e-10, max_iter=10000).fit(X[:480], y[:480])
    p = m.predict(seqs[480:])
    assert p.shape == (120, 3)
    np.testing.assert_allclose(p, ref.predict_proba(X[480:]), atol=1e-4)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert m.converged_


def test_multilabel_is_independent_logistic_per_task():
    from sklearn.linear_model import LogisticRegression

    seqs, c = _planted(400, 3, 1)
    rng = np.random.default_rng(1)
    Y = np.stack([(c == 0), (c != 1), rng.random(len(c)) < 0.5], axis=1).astype(float)
    Y[rng.random(Y.shape) < 0.1] = np.nan  # missing labels are left out of their task
    l2 = 3e-2
    m = KmerLogistic("multilabel", k=(1, 2, 3), l2=l2).fit(seqs[:320], Y[:320])
    X = m.features(seqs)
    p = m.predict(seqs[320:])
    assert p.shape == (80, 3)
    for t in range(3):
        keep = ~np.isnan(Y[:320, t])
        ref = LogisticRegression(C=sklearn_C(l2, int(keep.sum())), tol=1e-10, max_iter=10000)
        ref.fit(X[:320][keep], Y[:320][keep, t])
        np.testing.assert_allclose(p[:, t], ref.predict_proba(X[320:])[:, 1], atol=1e-4)


@pytest.mark.parametrize("n_train", [400, 60])  # primal (n >= d) and dual (n < d) ridge
def test_regression_ridge_matches_sklearn(n_train):
    from sklearn.linear_model import Ridge

    seqs, c = _planted(n_train + 50, 2, 2)
    rng = np.random.default_rng(3)
    feats = kmer_features(seqs, (1, 2, 3))
    y = np.stack([feats[:, 5] * 10 + c + rng.normal(0, 0.1, len(c)), c * 2.0 - feats[:, 0]], axis=1)
    l2 = 1e-2
    m = KmerLogistic("regression", k=(1, 2, 3), l2=l2).fit(seqs[:n_train], y[:n_train])
    X = m.features(seqs)
    ref = Ridge(alpha=l2 * n_train, solver="svd").fit(X[:n_train], y[:n_train])
    np.testing.assert_allclose(m.predict(seqs[n_train:]), ref.predict(X[n_train:]), atol=1e-6)
    m1 = KmerLogistic("regression", k=(1, 2, 3), l2=l2).fit(seqs[:n_train], y[:n_train, 0])
    assert m1.predict(seqs[n_train:]).shape == (50,)
    np.testing.assert_allclose(m1.predict(seqs[n_train:]), ref.predict(X[n_train:])[:, 0], atol=1e-6)


def test_l2_selection_on_validation_and_internal_split():
    seqs, y = _planted(500, 2, 4)
    grid = (1e-3, 1e-1, 10.0)
    m = KmerLogistic("binary", k=(1, 2, 3), l2_grid=grid).fit(seqs[:300], y[:300], seqs[300:400], y[300:400])
    assert m.l2_ in grid and len(m.selection_) == 3 and m.selected_by_ == "auroc"
    best = max(m.selection_, key=lambda r: r["auroc"])["auroc"]
    assert m.selection_[[r["l2"] for r in m.selection_].index(m.l2_)]["auroc"] == best
    # with the same validation set, the chosen model's validation AUROC is the best on the grid
    assert compute_metrics("binary", y[300:400], m.predict(seqs[300:400]))["auroc"] == pytest.approx(best)
    inner = KmerLogistic("binary", k=(1, 2, 3), l2_grid=grid, seed=1).fit(seqs[:400], y[:400])
    assert inner.l2_ in grid
    assert inner.evaluate(seqs[400:], y[400:])["auroc"] > 0.7
    s = inner.summary()
    assert s["features"] == 84 and s["l2"] == inner.l2_


def test_expit_is_stable():
    from scipy.special import expit as ref

    from seqssm.training.kmer import expit

    z = np.array([-1000.0, -30.0, -1.0, 0.0, 2.5, 40.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(expit(z), ref(z), rtol=1e-15)


def test_bad_input_raises():
    seqs, y = _planted(20, 2, 5)
    with pytest.raises(ValueError):
        KmerLogistic("ranking")
    with pytest.raises(ValueError):
        KmerLogistic("binary", l2=1.0).fit(seqs, y + 1)
    with pytest.raises(ValueError):
        KmerLogistic("binary", l2=1.0).fit(seqs, y[:-1])
    with pytest.raises(RuntimeError):
        KmerLogistic("binary").predict(seqs)
    with pytest.raises(ValueError):
        kmer_features(seqs, (0, 2))


# ----------------------------------------------------------------------------- real data


def _load(path: Path, seq_col: str, label_col: str):
    if not path.is_file():
        pytest.skip(f"{path} not present")
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(path)
    ids = [encode(s) for s in df[seq_col]]
    y = df[label_col].to_numpy().astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return [ids[i] for i in tr], y[tr], [ids[i] for i in te], y[te]


def test_promoters_lbfgs_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    tr, ytr, te, yte = _load(PROMOTERS, "seqs", "labels")
    for k, l2 in (((1, 2, 3, 4), 1e-2), ((1, 2, 3, 4, 5, 6), 1.0)):
        m = KmerLogistic("binary", k=k, l2=l2).fit(tr, ytr)
        ref = LogisticRegression(C=sklearn_C(l2, len(ytr)), tol=1e-10, max_iter=10000).fit(m.features(tr), ytr)
        p = m.predict(te)
        np.testing.assert_allclose(p, ref.predict_proba(m.features(te))[:, 1], atol=1e-4)
        np.testing.assert_allclose(m.coef_[:, 0], ref.coef_[0], atol=1e-3)


@pytest.mark.slow
def test_promoters_baseline_above_chance():
    # 80/20 split, seed 0; l2 chosen on a held-out 20% of the training part.
    # Seen: accuracy 0.810, MCC 0.624, AUROC 0.877, AUPRC 0.885 (l2 = 1.0).
    tr, ytr, te, yte = _load(PROMOTERS, "seqs", "labels")
    m = KmerLogistic("binary").fit(tr, ytr)
    r = m.evaluate(te, yte)
    assert r["auroc"] > 0.82 and r["accuracy"] > 0.75 and r["mcc"] > 0.5, r


@pytest.mark.slow
def test_enhancers_baseline_above_chance():
    # Seen: accuracy 0.761, MCC 0.522, AUROC 0.845, AUPRC 0.837 (l2 = 10).
    tr, ytr, te, yte = _load(ENHANCERS, "sequence", "label")
    r = KmerLogistic("binary").fit(tr, ytr).evaluate(te, yte)
    assert r["auroc"] > 0.78 and r["accuracy"] > 0.7 and r["mcc"] > 0.4, r
