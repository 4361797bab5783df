"""The CUDA-graph sampler against the reference sampling loop (GPU only)."""

from __future__ import annotations

import pytest
import torch

from seqssm.chem.sampling import ReferenceSampler, batch_generator
from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM

pytestmark = pytest.mark.gpu


def _model(kernel: str) -> S4ChemLM:
    torch.manual_seed(0)
    m = S4ChemLM(S4ChemConfig(vocab_size=24, d_model=64, n_blocks=2, d_state=16, max_len=40, kernel=kernel))
    with torch.no_grad():  # sharpen the untrained model so that sequences end at different steps
        m.lm_head.weight.mul_(8.0)
        m.lm_head.bias[m.cfg.eos_id] += 2.0
    return m.cuda().eval()


@pytest.mark.parametrize("kernel", ["nplr", "diag"])
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9)])
def test_cuda_graph_sampler_draws_what_the_reference_draws(kernel, top_k, top_p):
    from seqssm.chem.fast_sampler import FastSampler

    m = _model(kernel)
    dev = torch.device("cuda")
    ref = ReferenceSampler(m, 256, device=dev, top_k=top_k, top_p=top_p)
    fast = FastSampler(m, 256, device=dev, top_k=top_k, top_p=top_p, bf16=False)
    for b in range(3):
        a = ref(batch_generator(11, b, dev))
        f = fast(batch_generator(11, b, dev))
        assert f.steps == a.steps
        same = (a.tokens == f.tokens).all(dim=1)
        # float32 rounding may flip a near-tie of the Gumbel argmax now and then, nothing more
        assert float(same.float().mean()) >= 0.98
        assert torch.allclose(a.log_likelihood[same], f.log_likelihood[same], rtol=1e-4, atol=1e-4)
        assert torch.equal(a.ended[same], f.ended[same])


def test_bf16_graph_sampler_stays_close():
    from seqssm.chem.fast_sampler import FastSampler

    m = _model("nplr")
    dev = torch.device("cuda")
    a = ReferenceSampler(m, 512, device=dev)(batch_generator(5, 0, dev))
    f = FastSampler(m, 512, device=dev, bf16=True)(batch_generator(5, 0, dev))
    same = (a.tokens == f.tokens).all(dim=1)
    assert float(same.float().mean()) >= 0.8
    assert torch.allclose(a.log_likelihood[same], f.log_likelihood[same], rtol=1e-2, atol=5e-2)


def test_half_precision_state_sampler_stays_close():
    from seqssm.chem.fast_sampler import FastSampler

    m = _model("nplr")
    dev = torch.device("cuda")
    a = ReferenceSampler(m, 512, device=dev)(batch_generator(6, 0, dev))
    f = FastSampler(m, 512, device=dev, bf16=False, half_state=True)(batch_generator(6, 0, dev))
    same = (a.tokens == f.tokens).all(dim=1)
    assert float(same.float().mean()) >= 0.8
    assert torch.allclose(a.log_likelihood[same], f.log_likelihood[same], rtol=1e-2, atol=5e-2)
