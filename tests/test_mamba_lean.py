"""The Mamba mixer's bounded-memory inference path (Mamba._forward_grouped) against forward():
channel groups, sequence chunks that do not divide the length, in_proj/out_proj biases, reversed
channels (the RC half of Caduceus-PS), float64, a whole Caduceus-PS model, the dispatch, and on
CUDA the mamba-ssm kernels with the peak memory it saves."""

from __future__ import annotations

import pytest
import torch

from seqssm.layers.mamba import Mamba

from test_caduceus import build, dna, small_config
from test_hyena import fresh_generator, rel


def mixer(seed: int, d_model: int = 128, bias: bool = False, dtype=torch.float32) -> Mamba:
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=8, bias=bias).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
    return m


def both(m: Mamba, x: torch.Tensor, *, lean_bytes: int, chunk: int, **kw):
    with torch.no_grad():
        m.lean_bytes = None
        want = m(x, **kw)
        m.lean_bytes, m.lean_chunk_tokens = lean_bytes, chunk
        groups = m._lean_groups(x.shape[0], x.shape[1], x)
        got = m(x, **kw)
    return got, want, groups


@pytest.mark.parametrize("B,L,chunk,bias,flip", [(1, 257, 50, False, False), (3, 100, 7, True, False),
                                                   (2, 5, 2, False, True), (2, 300, 1000, True, True)])
def test_grouped_forward_equals_forward(B, L, chunk, bias, flip):
    g, seed = fresh_generator()
    m = mixer(seed % 1000, bias=bias)
    x = torch.randn(B, L, 128, generator=g)
    got, want, groups = both(m, x, lean_bytes=1, chunk=chunk, flip_channels=flip)
    assert groups == 4  # d_inner 256 in groups of at least 64 channels
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel(got, want) <= 1e-5, f"seed {seed}"


def test_grouped_forward_float64_is_exact():
    g, seed = fresh_generator()
    m = mixer(seed % 1000, dtype=torch.float64)
    x = torch.randn(2, 90, 128, generator=g, dtype=torch.float64)
    got, want, _ = both(m, x, lean_bytes=1, chunk=31)
    assert rel(got, want) <= 1e-12, f"seed {seed}"


def test_group_count_follows_the_byte_budget_and_autograd_keeps_forward():
    m = mixer(0)
    x = torch.randn(2, 64, 128)
    m.lean_bytes = 2 * 64 * 256 * 4 // 2  # half of one [B, d_inner, L] float32 activation
    with torch.no_grad():
        assert m._lean_groups(2, 64, x) == 2
    assert m._lean_groups(2, 64, x) == 1  # gradients on: the path autograd can differentiate
    m.lean_bytes = None
    with torch.no_grad():
        assert m._lean_groups(2, 64, x) == 1


def test_caduceus_ps_model_with_grouped_mixers_equals_default(lambda_genome):
    from seqssm.tokenizers.dna import encode

    model = build(small_config(d_model=128))
    ids = torch.from_numpy(encode(lambda_genome[2000:2600]).astype("int64")).view(2, 300)
    mixers = [m for m in model.modules() if isinstance(m, Mamba)]
    with torch.no_grad():
        for m in mixers:
            m.lean_bytes = None
        want = model(ids)
        for m in mixers:
            m.lean_bytes, m.lean_chunk_tokens = 1, 128
        got = model(ids)
    assert rel(got, want) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_forward_cuda_matches_fused_path_in_less_memory(dtype):
    g, seed = fresh_generator()
    m = mixer(seed % 1000, d_model=256, dtype=dtype).cuda()
    x = torch.randn(1, 1 << 18, 256, generator=g).to("cuda", dtype)
    peaks, outs = [], []
    for lean in (None, 1 << 26):
        m.lean_bytes = lean
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            outs.append(m(x).float())
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert rel(outs[1], outs[0]) <= (1e-4 if dtype is torch.float32 else 1e-2), f"seed {seed}"
    assert peaks[1] < 0.6 * peaks[0], peaks
