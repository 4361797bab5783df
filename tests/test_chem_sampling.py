"""The refill (continuous batching) sampler against a brute-force definition, on CPU.

The brute force keeps one Python record per slot, recomputes every decision from a full
convolution-mode forward pass over the molecule's prefix (not the recurrent step), picks the token
with its own top-k / nucleus / Gumbel-max code, and schedules slots as the definition says:
between chunks, the molecules that ended leave their slots and the next ids take the free slots,
lowest first, until n have started. The samplers must give the same molecules, ids, lengths,
log-likelihoods and step count.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from seqssm.chem.sampling import ReferenceSampler, batch_generator, sample_refill_reference
from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM, sequence_log_likelihood

REPO = Path(__file__).resolve().parents[1]


def _model(kernel: str = "nplr", max_len: int = 24, eos_bias: float = 2.0) -> S4ChemLM:
    torch.manual_seed(0)
    m = S4ChemLM(S4ChemConfig(vocab_size=24, d_model=32, n_blocks=2, d_state=16, max_len=max_len, kernel=kernel,
                              dropout=0.0))
    with torch.no_grad():  # sharpen the untrained model so that molecules end at different steps
        m.lm_head.weight.mul_(8.0)
        m.lm_head.bias[m.cfg.eos_id] += eos_bias
    return m.eval()


def _pick(logits: list[float], u: list[float], *, temperature, top_k, top_p, banned) -> int:
    """Gumbel-max over the top-k / nucleus set, written out in plain Python."""
    x = [(-math.inf if i in banned else v / temperature) for i, v in enumerate(logits)]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order)
    if 0 < top_k < len(x):
        kth = x[order[top_k - 1]]
        keep = {i for i in keep if x[i] >= kth}
    if top_p < 1.0:
        z = sum(math.exp(x[i] - x[order[0]]) for i in order if x[i] > -math.inf)
        before, nucleus = 0.0, set()
        for i in order:
            if before >= top_p:
                break
            nucleus.add(i)
            before += math.exp(x[i] - x[order[0]]) / z if x[i] > -math.inf else 0.0
        keep &= nucleus
    best, arg = -math.inf, None
    for i in sorted(keep):
        if x[i] == -math.inf:
            continue
        ui = min(max(u[i], 1e-20), 1.0 - 1e-7)
        g = x[i] - math.log(-math.log(ui))
        if g > best:
            best, arg = g, i
    return arg


@torch.no_grad()
def brute_force(model, n, B, *, chunk, seed, temperature=1.0, top_k=0, top_p=1.0):
    cfg = model.cfg
    T, V = cfg.max_len - 1, cfg.vocab_size
    g = batch_generator(seed, 0, torch.device("cpu"))
    slots: list[dict | None] = [None] * B
    done: dict[int, dict] = {}
    next_id = steps = 0
    while True:
        for b in range(B):  # boundary: harvest, then refill in slot order
            if slots[b] is not None and slots[b]["end"]:
                done[slots[b]["id"]] = slots[b]
                slots[b] = None
        for b in range(B):
            if slots[b] is None and next_id < n:
                slots[b] = {"id": next_id, "toks": [], "ll": 0.0, "end": False, "eos": False}
                next_id += 1
        if all(s is None for s in slots):
            break
        noise = torch.rand(chunk, B, V, generator=g)
        for j in range(chunk):
            for b, s in enumerate(slots):
                if s is None or s["end"]:
                    continue  # idle until the boundary
                logits = model(torch.tensor([[cfg.bos_id] + s["toks"]]))[0, -1]
                logp = torch.log_softmax(logits.double(), -1)
                tok = _pick(logits.tolist(), noise[j, b].tolist(), temperature=temperature, top_k=top_k,
                            top_p=top_p, banned={cfg.pad_id, cfg.bos_id})
                s["toks"].append(tok)
                s["ll"] += float(logp[tok])
                s["eos"] = tok == cfg.eos_id
                s["end"] = s["eos"] or len(s["toks"]) == T
        steps += chunk
    return [done[i] for i in range(n)], steps


def _assert_matches(batch, expected, steps, B):
    assert batch.steps == steps and batch.slots == B
    assert batch.tokens.shape[0] == len(expected)
    for i, e in enumerate(expected):
        k = len(e["toks"])
        assert int(batch.lengths[i]) == k, i
        assert batch.tokens[i, :k].tolist() == e["toks"], i
        assert (batch.tokens[i, k:] == 0).all(), i  # nothing after the end (pad_id 0)
        assert bool(batch.ended[i]) == e["eos"], i
        assert abs(float(batch.log_likelihood[i]) - e["ll"]) <= 1e-4 * max(1.0, abs(e["ll"])), i
    assert batch.utilisation == pytest.approx(sum(len(e["toks"]) for e in expected) / (steps * B))


@pytest.mark.parametrize("state_mode", ["recurrent", "history"])
@pytest.mark.parametrize("n,B,chunk", [(40, 6, 8), (25, 8, 3), (5, 9, 8)])
def test_refill_sampler_equals_brute_force(state_mode, n, B, chunk):
    m = _model()
    expected, steps = brute_force(m, n, B, chunk=chunk, seed=7)
    lengths = [len(e["toks"]) for e in expected]
    assert len(set(lengths)) > 3 and any(e["eos"] for e in expected)
    b = sample_refill_reference(m, n, B, generator=batch_generator(7, 0, torch.device("cpu")), device="cpu",
                                chunk=chunk, state_mode=state_mode)
    _assert_matches(b, expected, steps, B)


@pytest.mark.parametrize("top_k,top_p,temperature", [(5, 1.0, 1.0), (0, 0.7, 1.0), (0, 1.0, 1.7)])
def test_refill_sampler_filters_equal_brute_force(top_k, top_p, temperature):
    m = _model("diag")
    kw = dict(top_k=top_k, top_p=top_p, temperature=temperature)
    expected, steps = brute_force(m, 30, 7, chunk=4, seed=3, **kw)
    b = sample_refill_reference(m, 30, 7, generator=batch_generator(3, 0, torch.device("cpu")), device="cpu",
                                chunk=4, state_mode="recurrent", **kw)
    _assert_matches(b, expected, steps, 7)


def test_truncated_molecules_and_their_log_likelihood():
    """A model that never ends: every molecule stops at max_len - 1 tokens, not ended, and its
    log-likelihood is that of its max_len - 1 tokens (no eos) under a forward pass."""
    m = _model(max_len=12, eos_bias=-1e4)
    b = sample_refill_reference(m, 9, 4, generator=batch_generator(1, 0, torch.device("cpu")), device="cpu",
                                state_mode="history", chunk=2)
    assert b.lengths.tolist() == [11] * 9 and not b.ended.any()
    assert b.tokens.shape == (9, 11) and (b.tokens > 2).all()  # no pad, bos or eos anywhere
    ids = torch.cat([torch.full((9, 1), m.cfg.bos_id), b.tokens], 1)
    ll = sequence_log_likelihood(m, ids, torch.full((9,), 12))
    torch.testing.assert_close(b.log_likelihood, ll.double(), rtol=1e-5, atol=1e-4)
    # 9 molecules of 11 steps in 4 slots: 3 rounds of 6 chunks of 2 (12 steps), the last with one slot busy
    assert b.steps == 36


def test_refill_is_reproducible_and_seed_dependent():
    m = _model()
    s = ReferenceSampler(m, 8, device="cpu")
    cpu = torch.device("cpu")
    a, b, c = s(50, batch_generator(2, 0, cpu)), s(50, batch_generator(2, 0, cpu)), s(50, batch_generator(3, 0, cpu))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_likelihood, b.log_likelihood)
    assert not torch.equal(a.tokens, c.tokens)
    assert s(0, batch_generator(2, 0, cpu)).tokens.shape[0] == 0


def test_history_state_restarts_rows_like_fresh_sequences():
    """Rows restarted at different clocks of one convolution-history state give the outputs of
    their own sequences run alone from the start (forward() on each), across many ring wraps."""
    m = _model(max_len=20)
    torch.manual_seed(1)
    B, steps = 3, 90
    starts = {0: [0, 15, 33, 50, 70], 1: [0, 5, 24, 43, 62, 81], 2: [0, 19, 38, 57, 76]}  # each run < 19 steps
    toks = torch.randint(3, 24, (B, steps))
    state = m.default_state(B, mode="history")
    with torch.no_grad():
        for t in range(steps):
            rows = [b for b in range(B) if t in starts[b] and t > 0]
            if rows:
                from seqssm.chem.sampling import _zero_state_rows

                _zero_state_rows(state, torch.tensor(rows))
            logits, state = m.step(toks[:, t], state)
            for b in range(B):
                s0 = max(x for x in starts[b] if x <= t)
                full = m(toks[b:b + 1, s0:t + 1])[0, -1]
                assert float((logits[b] - full).abs().max() / full.abs().max()) <= 1e-5, (t, b)


def test_bundled_model_refill_samples_real_molecules():
    """The bundled MOSES model through refilled slots: every ended sample re-scores to its
    sampled log-likelihood with score_smiles, and nearly all are valid molecules."""
    rdkit = pytest.importorskip("rdkit")  # noqa: F841
    from seqssm.chem.data import canonical
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.chem.sampling import score_smiles

    loaded = load_chem_model("s4-chem-moses", device=torch.device("cpu"))
    s = ReferenceSampler(loaded.model, 16, device="cpu")
    b = s(48, batch_generator(0, 0, torch.device("cpu")))
    assert b.steps < 3 * 56 and b.utilisation > 0.6  # refills, not three fixed batches
    smiles = loaded.tokenizer.decode_batch(b.tokens)
    assert b.ended.all()
    assert sum(canonical(x) is not None for x in smiles) >= 44
    scored = score_smiles(loaded.model, loaded.tokenizer, smiles, device=torch.device("cpu"))
    torch.testing.assert_close(b.log_likelihood, torch.from_numpy(scored), rtol=1e-4, atol=1e-3)


def test_bench_chem_sample_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("_bench_chem", REPO / "benchmarks" / "bench_chem.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["sample", "--device", "cpu", "--batch", "4", "8", "--n", "12", "--repeats", "1", "--d-model", "16",
              "--n-blocks", "1", "--max-len", "20"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {(x["sampler"], x["batch"], x["n"]) for x in lines} >= {("reference", 4, 12), ("reference", 8, 12),
                                                                    ("reference", 4, 4)}
    for x in lines:
        assert x["molecules_per_s"] > 0 and 0 < x["utilisation"] <= 1
