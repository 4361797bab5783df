"""The order-k Markov (k-mer) baseline: exact counts, smoothing, and its scores on real DNA."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from seqssm.tokenizers.dna import encode
from seqssm.training import markov
from seqssm.training.data import load_split, target_masks, validation_windows
from seqssm.training.markov import (
    choose_betas,
    interpolated_tables,
    kmer_count_tables,
    markov_baseline,
    score_positions,
)

LAMBDA = Path(__file__).resolve().parents[1] / "resources" / "data" / "lambda_virus.fa.gz"
BASE = {"A": 0, "C": 1, "G": 2, "T": 3}


def ctx_code(ctx: str) -> int:
    """Row of a count table: the base just before the target is the lowest digit."""
    return sum(BASE[b] * 4 ** j for j, b in enumerate(reversed(ctx)))


def brute_counts(seqs: list[str], k: int) -> np.ndarray:
    tab = np.zeros((4 ** k, 4), dtype=np.int64)
    for s in seqs:
        for t in range(k, len(s)):
            mer = s[t - k:t + 1]
            if all(c in BASE for c in mer):
                tab[ctx_code(mer[:-1]), BASE[mer[-1]]] += 1
    return tab


def test_counts_by_hand():
    tabs = kmer_count_tables([encode("ACGTNAAC")], 2)
    # order 0: A x3, C x2, G x1, T x1 (N is not a base)
    assert tabs[0].tolist() == [[3, 2, 1, 1]]
    # order 1: AC, CG, GT, AA, AC (nothing across the N)
    t1 = tabs[1]
    assert t1[ctx_code("A")].tolist() == [1, 2, 0, 0]
    assert t1[ctx_code("C")].tolist() == [0, 0, 1, 0]
    assert t1[ctx_code("G")].tolist() == [0, 0, 0, 1]
    assert t1[ctx_code("T")].tolist() == [0, 0, 0, 0]
    assert t1.sum() == 5
    # order 2: ACG, CGT, AAC
    t2 = tabs[2]
    assert t2.sum() == 3
    assert t2[ctx_code("AC"), BASE["G"]] == 1
    assert t2[ctx_code("CG"), BASE["T"]] == 1
    assert t2[ctx_code("AA"), BASE["C"]] == 1


def test_counts_match_brute_force_and_never_cross_stretches(monkeypatch):
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACGTN"), p=[0.24, 0.24, 0.24, 0.24, 0.04], size=n)) for n in (300, 57, 5, 1)]
    fast = kmer_count_tables([encode(s) for s in seqs], 4)
    for k in range(5):
        assert np.array_equal(fast[k], brute_counts(seqs, k)), k
    # tiny chunks: the chunk boundaries must not change a single count
    monkeypatch.setattr(markov, "_CHUNK", 7)
    chunked = kmer_count_tables([encode(s) for s in seqs], 4)
    for a, b in zip(fast, chunked):
        assert np.array_equal(a, b)


def test_order0_on_balanced_data_is_perplexity_4():
    seq = encode("ACGT" * 500)
    windows = np.stack([encode("ACGT" * 64), encode("TGCA" * 64)])
    _, shared = target_masks(windows)
    res = markov_baseline([seq], windows, shared, max_order=2)
    k0 = res["orders"][0]
    assert k0["ppl"] == pytest.approx(4.0, abs=1e-12)
    assert k0["ppl_laplace"] == pytest.approx(4.0, abs=1e-12)
    assert res["positions"] == int(shared.sum())


def test_laplace_score_matches_formula():
    train = ["ACGTTGCAAC", "GGGTTT"]
    tabs = kmer_count_tables([encode(s) for s in train], 2)
    window = "ACGTACGTACGTAC"
    windows = encode(window)[None]
    mask = np.zeros((1, len(window) - 1), dtype=bool)
    mask[0, 11] = True  # target t = 12 ('A'), context 'CG' for order 2
    res = score_positions(tabs, windows, mask, betas=[1.0, 1.0, 1.0], alpha=1.0)
    t = 12
    for k in range(3):
        ctx, x = window[t - k:t], window[t]
        row = brute_counts(train, k)[ctx_code(ctx)] if k else brute_counts(train, 0)[0]
        p = (row[BASE[x]] + 1) / (row.sum() + 4)
        assert res[k]["nll_laplace"] == pytest.approx(-math.log(p))


def test_interpolated_tables_are_distributions():
    rng = np.random.default_rng(0)
    seq = encode("".join(rng.choice(list("ACGT"), size=2000)))
    tabs = kmer_count_tables([seq], 3)
    betas = choose_betas(tabs)
    assert all(b > 0 for b in betas)
    for k, p in enumerate(interpolated_tables(tabs, betas)):
        rows = p.reshape(4 ** k, 4)
        assert np.allclose(rows.sum(axis=1), 1.0)
        assert (rows > 0).all()


def test_lambda_perplexity_falls_from_order_0_to_2():
    split = load_split([LAMBDA], seq_len=256)
    windows = validation_windows(split.valid, 256)
    _, shared = target_masks(windows)
    res = markov_baseline([s.ids for s in split.train], windows, shared)
    ppl = [o["ppl"] for o in res["orders"]]
    lap = [o["ppl_laplace"] for o in res["orders"]]
    assert len(ppl) == 11
    assert ppl[0] > ppl[1] > ppl[2]
    assert lap[0] > lap[1] > lap[2]
    assert 3.8 < ppl[0] < 4.1  # lambda's base composition is near uniform
    assert res["best"]["ppl"] == min(ppl)
    assert all(o["positions"] == int(shared.sum()) for o in res["orders"])
    # the training counts of every order come only from training bases
    assert res["train_positions_order0"] <= split.train_bases


@pytest.mark.parametrize("k", [0, 1, 3])
def test_codes_agree_between_training_and_scoring(k):
    """A window that is also the whole training set: order-k Laplace scores follow the counts."""
    s = "".join(itertools.islice(itertools.cycle("AACGTTGCA"), 60))
    tabs = kmer_count_tables([encode(s)], 3)
    windows = encode(s)[None]
    _, shared = target_masks(windows, context=3)
    res = score_positions(tabs, windows, shared, betas=[1.0] * 4)
    brute = 0.0
    n = 0
    for t in range(1, len(s)):
        if not shared[0, t - 1]:
            continue
        row = brute_counts([s], k)[ctx_code(s[t - k:t])] if k else brute_counts([s], 0)[0]
        brute += -math.log((row[BASE[s[t]]] + 1) / (row.sum() + 4))
        n += 1
    assert res[k]["nll_laplace"] == pytest.approx(brute / n)
