"""The fused recurrent S4 step (Triton, CUDA) against the recurrences it fuses (torch)."""

from __future__ import annotations

import pytest
import torch

from seqssm.layers.s4 import S4Layer
from seqssm.ops.s4_step import can_fuse, fused_step


def _layer(mode, H, d_state, seed):
    torch.manual_seed(seed)
    layer = S4Layer(H, d_state, mode=mode, l_max=100)
    with torch.no_grad():  # away from the initialisation, like a trained layer
        for p in layer.ssm_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("mode", ["nplr", "diag"])
def test_fallback_equals_the_recurrence_and_updates_in_place(mode):
    layer = _layer(mode, 6, 16, 0)
    rec = layer.recurrence()
    state = torch.randn(3, 6, rec.state_size, dtype=torch.complex64)
    want_y, want_x = rec.step(torch.ones(3, 6), state.clone())
    assert not can_fuse(rec, state)  # CPU tensors: the twin runs
    y = fused_step(rec, torch.ones(3, 6), state)
    assert torch.equal(y, want_y) and torch.equal(state, want_x)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nplr", "diag"])
@pytest.mark.parametrize("B,H,d_state,rows", [(1, 256, 64, 8), (37, 130, 64, 8), (513, 64, 32, 4), (4, 8, 128, 1)])
def test_triton_step_matches_the_recurrence(mode, B, H, d_state, rows):
    pytest.importorskip("triton")
    layer = _layer(mode, H, d_state, B).cuda()
    rec = layer.recurrence()
    state = torch.randn(B, H, rec.state_size, dtype=torch.complex64, device="cuda")
    assert can_fuse(rec, state)
    ref = state.clone()
    for t in range(6):  # the state feeds back
        u = torch.randn(B, H, device="cuda")
        y = fused_step(rec, u, state, rows=rows)
        y_ref, ref = rec.step(u, ref)
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 1e-5
        assert float((state - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("mode", ["nplr", "diag"])
def test_half_precision_state_follows_the_complex_state(mode):
    """float16 real/imaginary pairs (the sampler's compact state) track the complex64 state."""
    layer = _layer(mode, 8, 16, 1).eval()
    x = torch.randn(20, 2, 8)
    s_c = layer.default_state(2)
    s_h = torch.view_as_real(layer.default_state(2)).to(torch.float16).contiguous()
    with torch.no_grad():
        for t in range(20):
            y_c, s_c = layer.step(x[t], s_c)
            y_h, s_h = layer.step(x[t], s_h)
            assert s_h.dtype == torch.float16
            assert float((y_h - y_c).abs().max() / y_c.abs().max()) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nplr", "diag"])
def test_triton_half_state_matches_the_fallback(mode):
    pytest.importorskip("triton")
    layer = _layer(mode, 64, 64, 7).cuda()
    rec = layer.recurrence()
    state = torch.view_as_real(torch.randn(33, 64, rec.state_size, dtype=torch.complex64, device="cuda"))
    state = state.to(torch.float16).contiguous()
    ref = state.clone()
    for t in range(6):
        u = torch.randn(33, 64, device="cuda")
        y = fused_step(rec, u, state)
        x = torch.view_as_complex(ref.float())
        y_ref, x = rec.step(u, x)
        ref.copy_(torch.view_as_real(x))
        assert float((y - y_ref).abs().max() / y_ref.abs().max()) <= 2e-3  # one fp16 rounding apart at most
        assert float((state.float() - ref.float()).abs().max() / ref.float().abs().max()) <= 1e-3
