"""Recurrent mode of a causal Caduceus (a Mamba stack): windows with a carried state equal one pass.

Real DNA (phage lambda) through small random causal models, cut into windows of several sizes
(shorter than the conv width, not multiples of the scan's chunk, longer than a chunk); the
embeddings of every window must equal those of a single pass over the whole sequence.
"""

import copy

import numpy as np
import pytest
import torch

import seqssm.ops.selective_scan as ss
from seqssm.errors import SeqssmError
from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM
from seqssm.tokenizers.dna import encode

from test_caduceus import build, small_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def causal_model(seed=0, **over) -> CaduceusForMaskedLM:
    """A causal Caduceus (bidirectional=False, rcps=False) with every parameter moved off its init."""
    return build(small_config(bidirectional=False, rcps=False, **over), seed)


def lambda_ids(genome: str, starts, length) -> torch.Tensor:
    return torch.from_numpy(np.stack([encode(genome[s:s + length]) for s in starts]).astype(np.int64))


def run_windows(model, ids, sizes):
    """Embeddings of ids cut into consecutive windows of the given sizes (cycled), state carried."""
    outs, state, s, k = [], None, 0, 0
    while s < ids.shape[1]:
        e = min(s + sizes[k % len(sizes)], ids.shape[1])
        emb, state = model.embed_stream(ids[:, s:e], state)
        outs.append(emb)
        s, k = e, k + 1
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("over", [dict(), dict(fused_add_norm=False, rms_norm=False, residual_in_fp32=True)])
@pytest.mark.parametrize("sizes", [[1], [2, 3], [31, 33], [64], [100, 7, 257]])
def test_windows_equal_one_pass_across_scan_chunks(lambda_genome, monkeypatch, over, sizes):
    # chunks of 32 positions in the torch scan, so windows fall on, across and inside chunk edges
    monkeypatch.setattr(ss, "_CHUNK_ELEMENTS", 1)
    model = causal_model(seed=len(sizes), **over)
    ids = lambda_ids(lambda_genome, [1000, 30000], 300)
    with torch.no_grad():
        whole = model.embed(ids)
        got, state = run_windows(model, ids, sizes)
        logits_whole = model(ids)
        logits_win, _ = model.forward_stream(ids[:, :150])
        logits_win2, _ = model.forward_stream(ids[:, 150:], model.embed_stream(ids[:, :150])[1])
    assert got.shape == whole.shape == (2, 300, 32)
    assert rel(got, whole) <= 1e-5
    assert rel(torch.cat([logits_win, logits_win2], 1), logits_whole) <= 1e-5
    assert state.position == 300
    conv, h = state.layers[0]
    assert conv.shape == (2, 64, 4) and h.shape == (2, 64, 8) and h.dtype == torch.float32


def test_long_windows_in_default_chunks(lambda_genome):
    """Windows longer than the default scan chunk (1024 positions here), not multiples of it."""
    model = causal_model(seed=7)
    ids = lambda_ids(lambda_genome, [5000], 3100)
    with torch.no_grad():
        whole = model.embed(ids)
        got, _ = run_windows(model, ids, [1537, 1100])
    assert rel(got, whole) <= 1e-5


def test_window_result_depends_on_the_left_context(lambda_genome):
    """The carried state matters: the same window without it gives different embeddings."""
    model = causal_model(seed=8)
    ids = lambda_ids(lambda_genome, [200], 400)
    with torch.no_grad():
        _, state = model.embed_stream(ids[:, :200])
        with_ctx, _ = model.embed_stream(ids[:, 200:], state)
        without, _ = model.embed_stream(ids[:, 200:])
        # and the state is not modified by being used
        again, _ = model.embed_stream(ids[:, 200:], state)
    assert not torch.allclose(with_ctx, without, atol=1e-3)
    assert torch.equal(with_ctx, again)


@pytest.mark.parametrize("over", [dict(), dict(rcps=False), dict(bidirectional=False)])
def test_bidirectional_models_refuse_to_stream(over):
    cfg = small_config(**over)
    model = CaduceusForMaskedLM(CaduceusConfig.from_dict(copy.deepcopy(cfg))).eval()
    assert not model.is_causal
    with pytest.raises(SeqssmError, match="overlapping windows"):
        model.embed_stream(torch.full((1, 10), 7))


def test_bad_stream_state_is_refused(lambda_genome):
    model = causal_model(seed=9)
    assert model.is_causal
    ids = lambda_ids(lambda_genome, [0, 10], 20)
    with torch.no_grad():
        _, state = model.embed_stream(ids)
        with pytest.raises(ValueError, match="batch"):
            model.embed_stream(ids[:1], state)


@pytest.mark.gpu
def test_stream_on_cuda_with_kernel_aligned_lengths(lambda_genome):
    """Windows whose length lets mamba-ssm's scan use 16-byte loads: the stream path hands it the
    convolution output minus its warm-up positions, a view that starts mid-row (once a crash)."""
    model = causal_model(seed=3, d_model=64).cuda()
    reps = -(-3 * 8192 // len(lambda_genome)) + 1
    ids = lambda_ids(lambda_genome * reps, [0], 3 * 8192).cuda()
    with torch.no_grad():
        whole = model.embed(ids)
        got, _ = run_windows(model, ids, [8192])
    torch.cuda.synchronize()
    assert rel(got, whole) <= 1e-4
