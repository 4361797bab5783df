"""The CUDA-graph refill sampler against the eager refill loop (GPU only; no RDKit needed).

The eager loop (``ReferenceSampler``: the model's own ``step()``, itself checked against a
brute-force definition in tests/test_chem_sampling.py) and the graph replay run the same kernels
on the same inputs in fp32, so they must give the same molecules. One molecule that came out
differently would move every later molecule to other slots and noise (the schedule depends on
when molecules end), so the fp32 comparison is all or (nearly) nothing. bf16 matmuls and float16
states do flip near-ties: they are compared on one fixed batch (n = batch size, no refill) as
before, and on refilled calls molecule by molecule against a convolution-mode re-scoring.
"""

from __future__ import annotations

import pytest
import torch

from seqssm.chem.sampling import ReferenceSampler, batch_generator
from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM, sequence_log_likelihood

pytestmark = pytest.mark.gpu


def _model(kernel: str) -> S4ChemLM:
    torch.manual_seed(0)
    m = S4ChemLM(S4ChemConfig(vocab_size=24, d_model=64, n_blocks=2, d_state=16, max_len=40, kernel=kernel))
    with torch.no_grad():  # sharpen the untrained model so that sequences end at different steps
        m.lm_head.weight.mul_(8.0)
        m.lm_head.bias[m.cfg.eos_id] += 2.0
    return m.cuda().eval()


def _rescore(m, batch):
    """log p of each returned molecule (its tokens, eos included when it ended) by a forward pass."""
    n = batch.tokens.shape[0]
    ids = torch.cat([torch.full((n, 1), m.cfg.bos_id), batch.tokens], 1).cuda()
    with torch.no_grad():
        return sequence_log_likelihood(m, ids, (batch.lengths + 1).cuda()).double().cpu()


def _consistent(m, batch):
    n = batch.tokens.shape[0]
    assert ((batch.tokens != m.cfg.pad_id).sum(1) == batch.lengths).all()
    last = batch.tokens[torch.arange(n), batch.lengths - 1]
    assert torch.equal(batch.ended, last == m.cfg.eos_id)
    assert (batch.ended | (batch.lengths == m.cfg.max_len - 1)).all()


@pytest.mark.parametrize("kernel", ["nplr", "diag"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9)])
def test_cuda_graph_sampler_draws_what_the_reference_draws(kernel, top_k, top_p):
    from seqssm.chem.fast_sampler import FastSampler

    m = _model(kernel)
    dev = torch.device("cuda")
    ref = ReferenceSampler(m, 256, device=dev, top_k=top_k, top_p=top_p)
    fast = FastSampler(m, 256, device=dev, top_k=top_k, top_p=top_p, bf16=False, half_state=False)
    for call, n in enumerate([900, 100, 256]):  # refills; fewer molecules than slots; one batch
        a = ref(n, batch_generator(11, call, dev))
        f = fast(n, batch_generator(11, call, dev))
        assert f.tokens.shape[0] == n and f.slots == 256
        same = (a.tokens.shape == f.tokens.shape) and bool((a.tokens == f.tokens).all())
        assert same and f.steps == a.steps, (
            f"call {call}: {int((a.lengths != f.lengths).sum())} of {n} lengths differ; steps {a.steps} vs {f.steps}")
        torch.testing.assert_close(f.log_likelihood, a.log_likelihood, rtol=1e-5, atol=1e-4)
        assert torch.equal(a.ended, f.ended) and torch.equal(a.lengths, f.lengths)
        _consistent(m, f)
        torch.testing.assert_close(f.log_likelihood, _rescore(m, f), rtol=1e-4, atol=1e-3)
    assert a.utilisation < 1 and f.utilisation == a.utilisation


@pytest.mark.parametrize("variant", [dict(bf16=True, half_state=False), dict(bf16=False, half_state=True),
                                     dict(bf16=True, half_state=True)])
def test_reduced_precision_graph_sampler_stays_close(variant):
    from seqssm.chem.fast_sampler import FastSampler

    m = _model("nplr")
    dev = torch.device("cuda")
    f = FastSampler(m, 512, device=dev, **variant)
    # one fixed batch: row b is slot b in both, so a flipped near-tie stays in its row
    a = ReferenceSampler(m, 512, device=dev)(512, batch_generator(5, 0, dev))
    b = f(512, batch_generator(5, 0, dev))
    same = (a.tokens[:, :b.tokens.shape[1]] == b.tokens[:, :a.tokens.shape[1]]).all(dim=1) & (a.lengths == b.lengths)
    assert float(same.float().mean()) >= 0.8
    torch.testing.assert_close(a.log_likelihood[same], b.log_likelihood[same], rtol=1e-2, atol=5e-2)
    # refilled slots: every molecule's own bookkeeping (tokens, length, log-likelihood) holds
    r = f(2000, batch_generator(5, 1, dev))
    assert r.tokens.shape[0] == 2000
    _consistent(m, r)
    torch.testing.assert_close(r.log_likelihood, _rescore(m, r), rtol=1e-2, atol=5e-2)
