"""Order-k Markov (k-mer) baseline for next-base prediction, k = 0..10.

An order-k model predicts base t from the k bases before it. Counting is vectorised numpy:
every base gets a rolling base-4 code of the (k+1)-mer that ends at it,

    code_k(t) = sum_{j=0..k} b[t-j] * 4**j        (b: A=0 C=1 G=2 T=3)

so the target is the lowest digit and the context the rest (``code // 4``); one
``np.bincount`` per order gives the [4**k, 4] table of (context, next base) counts. A
position is counted for order k only when it and its k preceding bases are all A/C/G/T and lie
in one training stretch (contexts never span a held-out region or an N).

Smoothing (both are reported):
  * ``interpolated`` (the headline number): a Dirichlet prior centred on the order k-1 model,
        p_k(x | c) = (n(c, x) + beta_k * p_{k-1}(x | c')) / (n(c) + beta_k),   p_{-1} = 1/4,
    where c' drops the oldest base of c. beta_k is chosen per order from a fixed grid by
    leave-one-out likelihood on the TRAINING counts (no held-out data is looked at).
  * ``laplace``: additive smoothing with alpha = 1, p(x | c) = (n(c, x) + 1) / (n(c) + 4).

Held-out scoring uses exactly the neural model's ``shared`` position set
(seqssm.training.data.target_masks): ACGT targets whose 10 preceding bases in the validation
window are ACGT, so every order 0..10 is scored on the same bases.
"""

from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import numpy as np

from seqssm.tokenizers.dna import A, T

MAX_ORDER = 10
BETA_GRID = tuple(float(2.0 ** e) for e in range(-2, 11))  # 0.25 .. 1024
_CHUNK = 1 << 23  # bases per counting chunk (bounds memory on chromosome-size inputs)

# ids -> 0..3 for A,C,G,T and 4 for anything else (N, PAD, specials)
CODE_LUT = np.full(256, 4, dtype=np.uint8)
CODE_LUT[A:T + 1] = np.arange(4, dtype=np.uint8)


def base_codes(ids: np.ndarray) -> np.ndarray:
    """uint8 ids -> 0..3 for A/C/G/T, 4 otherwise."""
    return CODE_LUT[np.asarray(ids, dtype=np.uint8)]


def kmer_count_tables(stretches: Iterable[np.ndarray], max_order: int = MAX_ORDER) -> list[np.ndarray]:
    """Count tables for orders 0..max_order: tables[k] is int64 [4**k, 4] (context code, next base).

    ``stretches`` are uint8 id arrays; contexts never cross from one stretch into the next.
    """
    if not 0 <= max_order <= 13:
        raise ValueError("max_order must be within 0..13")
    flat = [np.zeros(4 ** (k + 1), dtype=np.int64) for k in range(max_order + 1)]
    for ids in stretches:
        b_all = base_codes(ids)
        n = len(b_all)
        for c in range(0, n, _CHUNK):
            lo = max(0, c - max_order)  # the chunk carries max_order bases of left context
            b = b_all[lo:c + _CHUNK]
            skip = c - lo  # positions before `skip` are context only (counted by the previous chunk)
            ok = b < 4
            code = np.where(ok, b, 0).astype(np.int32)
            valid = ok.copy()
            for k in range(max_order + 1):
                if k:
                    if k >= len(b):
                        break
                    code[k:] += b[:-k].astype(np.int32) << (2 * k)
                    valid[k:] &= ok[:-k]
                    valid[:k] = False
                sel = code[skip:][valid[skip:]]
                flat[k] += np.bincount(sel, minlength=4 ** (k + 1))[: 4 ** (k + 1)]
    return [f.reshape(4 ** k, 4) for k, f in enumerate(flat)]


def kmer_codes(windows: np.ndarray, order: int) -> np.ndarray:
    """code_k(t) for every position of every window (int32 [W, L]); garbage where not all ACGT."""
    b = base_codes(windows).astype(np.int32)
    code = np.minimum(b, 3).copy()
    for j in range(1, order + 1):
        code[:, j:] += np.minimum(b[:, :-j], 3) << (2 * j)
    return code


def interpolated_tables(tables: Sequence[np.ndarray], betas: Sequence[float]) -> list[np.ndarray]:
    """Full probability tables p_k (flat, length 4**(k+1), indexed by code_k) for the given betas."""
    out = []
    prior = np.full(4, 0.25)
    for k, (tab, beta) in enumerate(zip(tables, betas)):
        n_cx = tab.astype(np.float64)
        n_c = n_cx.sum(axis=1, keepdims=True)
        # the order k-1 probability of (c', x) sits at code_k % 4**k: tile the k-1 table 4 times
        pri = np.tile(prior, 4 ** (k + 1) // prior.size).reshape(n_cx.shape) if k else prior.reshape(1, 4)
        p = (n_cx + beta * pri) / (n_c + beta)
        out.append(p.reshape(-1))
        prior = out[-1]
    return out


def choose_betas(tables: Sequence[np.ndarray], grid: Sequence[float] = BETA_GRID) -> list[float]:
    """Per-order prior strength by leave-one-out likelihood on the training counts.

    Leaving one occurrence of (c, x) out gives it the probability
    (n(c, x) - 1 + beta * p_{k-1}(x | c')) / (n(c) - 1 + beta); the training NLL under that rule,
    summed over every training token, is minimised over ``grid``. (The lower-order prior keeps
    the token: a small, standard simplification.)
    """
    betas: list[float] = []
    prior_flat = np.full(4, 0.25)
    for k, tab in enumerate(tables):
        n_cx = tab.astype(np.float64)
        n_c = n_cx.sum(axis=1, keepdims=True)
        pri = np.tile(prior_flat, 4 ** (k + 1) // prior_flat.size).reshape(n_cx.shape) if k else prior_flat.reshape(1, 4)
        pri = np.broadcast_to(pri, n_cx.shape)
        m = n_cx > 0
        if not m.any():
            beta = 1.0
        else:
            n, nc, pr = n_cx[m], np.broadcast_to(n_c, n_cx.shape)[m], pri[m]
            beta = min(grid, key=lambda bt: float(-(n * np.log((n - 1 + bt * pr) / (nc - 1 + bt))).sum()))
        betas.append(float(beta))
        prior_flat = ((n_cx + beta * pri) / (n_c + beta)).reshape(-1)
    return betas


def score_positions(
    tables: Sequence[np.ndarray],
    windows: np.ndarray,
    mask: np.ndarray,
    *,
    betas: Sequence[float] | None = None,
    alpha: float = 1.0,
) -> list[dict]:
    """Held-out NLL per order on the masked targets (mask [W, L-1] over windows[:, 1:]).

    Each masked target must have at least len(tables)-1 ACGT bases before it in its window
    (as the ``shared`` mask guarantees).
    """
    windows = np.asarray(windows)
    max_order = len(tables) - 1
    # mask over targets t=1..L-1 -> positions (w, t) in the window
    full = np.zeros(windows.shape, dtype=bool)
    full[:, 1:] = mask
    n_pos = int(full.sum())
    if betas is None:
        betas = choose_betas(tables)
    interp = interpolated_tables(tables, betas)
    b = base_codes(windows).astype(np.int32)
    code = np.minimum(b, 3)
    results = []
    for k in range(max_order + 1):
        if k:
            code = code.copy()
            code[:, k:] += np.minimum(b[:, :-k], 3) << (2 * k)
        c = code[full]
        tab = tables[k].reshape(-1)
        n_cx = tab[c].astype(np.float64)
        n_c = tables[k].sum(axis=1)[c >> 2].astype(np.float64)
        nll_lap = -np.log((n_cx + alpha) / (n_c + 4 * alpha)).sum()
        nll_int = -np.log(interp[k][c]).sum()
        seen = int((n_c > 0).sum())
        results.append({
            "k": k,
            "positions": n_pos,
            "nll": float(nll_int / max(n_pos, 1)),
            "ppl": float(math.exp(nll_int / max(n_pos, 1))) if n_pos else float("nan"),
            "beta": float(betas[k]),
            "nll_laplace": float(nll_lap / max(n_pos, 1)),
            "ppl_laplace": float(math.exp(nll_lap / max(n_pos, 1))) if n_pos else float("nan"),
            "contexts_seen_fraction": seen / max(n_pos, 1),
            "train_positions": int(tables[k].sum()),
        })
    return results


def markov_baseline(
    train_stretches: Iterable[np.ndarray],
    windows: np.ndarray,
    shared_mask: np.ndarray,
    *,
    max_order: int = MAX_ORDER,
    alpha: float = 1.0,
) -> dict:
    """Fit orders 0..max_order on the training stretches, score the shared held-out positions.

    Returns a JSON-able dict: per-order results (``ppl`` interpolated, ``ppl_laplace``), the
    best order (by ``ppl``), and the definitions used.
    """
    t0 = time.perf_counter()
    tables = kmer_count_tables(train_stretches, max_order)
    t_count = time.perf_counter() - t0
    betas = choose_betas(tables)
    orders = score_positions(tables, windows, shared_mask, betas=betas, alpha=alpha)
    best = min(orders, key=lambda r: r["ppl"])
    best_lap = min(orders, key=lambda r: r["ppl_laplace"])
    return {
        "max_order": max_order,
        "positions": orders[0]["positions"] if orders else 0,
        "position_set": "shared: ACGT targets whose 10 preceding bases in the validation window are ACGT",
        "smoothing": ("ppl: Dirichlet interpolation with the order k-1 model, beta_k chosen by leave-one-out "
                      f"likelihood on the training counts; ppl_laplace: additive alpha={alpha:g}"),
        "orders": orders,
        "best": {"k": best["k"], "ppl": best["ppl"], "nll": best["nll"]},
        "best_laplace": {"k": best_lap["k"], "ppl": best_lap["ppl_laplace"], "nll": best_lap["nll_laplace"]},
        "train_positions_order0": int(tables[0].sum()),
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_counting": round(t_count, 2),
    }
