"""mamba-ssm / causal-conv1d CUDA kernels against seqssm's torch path (GPU with the `gpu` extra only)."""

from __future__ import annotations

import pytest
import torch

from seqssm.ops.causal_conv import causal_conv1d, causal_conv1d_ref
from seqssm.ops.selective_scan import (
    cuda_kernels_available,
    selective_scan,
    selective_state_update,
    selective_state_update_ref,
)

pytestmark = pytest.mark.gpu


def _need_kernels():
    if not cuda_kernels_available():
        pytest.skip("mamba-ssm CUDA kernels not installed")


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def _scan_inputs(dtype, Bsz=2, D=64, N=16, L=777, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    u = r(Bsz, D, L).to(dtype)
    delta = (0.5 * r(Bsz, D, L)).to(dtype)
    A = -torch.rand(D, N, generator=g, device="cuda") * 2 - 0.1
    Bm = r(Bsz, N, L).to(dtype)
    Cm = r(Bsz, N, L).to(dtype)
    Dv = r(D)
    z = r(Bsz, D, L).to(dtype)
    bias = 0.1 * r(D)
    return u, delta, A, Bm, Cm, Dv, z, bias


@pytest.mark.parametrize("dtype,tol,gtol", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 1e-2, 3e-2)])
def test_selective_scan_cuda_matches_torch_forward_and_backward(dtype, tol, gtol):
    _need_kernels()
    ins = _scan_inputs(dtype)
    outs, grads = [], []
    for backend in ("torch", "cuda"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in ins]
        u, delta, A, Bm, Cm, Dv, z, bias = leaves
        y, last = selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, True, True, backend=backend)
        w = torch.randn(y.shape, generator=torch.Generator(device="cuda").manual_seed(9), device="cuda")
        (y.float() * w).sum().backward()
        outs.append((y, last))
        grads.append([t.grad for t in leaves])
    assert _rel(outs[1][0], outs[0][0]) <= tol
    assert _rel(outs[1][1], outs[0][1]) <= tol
    for g_cuda, g_ref in zip(grads[1], grads[0]):
        assert _rel(g_cuda, g_ref) <= gtol


def test_selective_scan_cuda_with_initial_state():
    _need_kernels()
    u, delta, A, Bm, Cm, Dv, z, bias = _scan_inputs(torch.float32, L=300)
    h0 = torch.randn(2, 64, 16, device="cuda")
    a = selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, True, True, initial_state=h0, backend="torch")
    b = selective_scan(u, delta, A, Bm, Cm, Dv, z, bias, True, True, initial_state=h0, backend="cuda")
    assert _rel(b[0], a[0]) <= 1e-4 and _rel(b[1], a[1]) <= 1e-4


def test_state_update_cuda_matches_reference():
    _need_kernels()
    g = torch.Generator(device="cuda").manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    state = r(3, 64, 16)
    ref = state.clone()
    A = -torch.rand(64, 16, generator=g, device="cuda")
    for _ in range(4):
        x, dt, Bm, Cm, z = r(3, 64), r(3, 64), r(3, 16), r(3, 16), r(3, 64)
        D, bias = r(64), r(64)
        y = selective_state_update(state, x, dt, A, Bm, Cm, D, z, bias, True, backend="cuda")
        y_ref = selective_state_update_ref(ref, x, dt, A, Bm, Cm, D, z, bias, True)
        assert _rel(y, y_ref) <= 1e-4 and _rel(state, ref) <= 1e-4


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv_cuda_matches_reference(activation):
    _need_kernels()
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 64, 513, generator=g, device="cuda")
    w = torch.randn(64, 4, generator=g, device="cuda")
    b = torch.randn(64, generator=g, device="cuda")
    init = torch.randn(2, 64, 3, generator=g, device="cuda")
    a = causal_conv1d_ref(x, w, b, init, True, activation)
    c = causal_conv1d(x, w, b, init, True, activation, backend="cuda")
    assert _rel(c[0], a[0]) <= 1e-5 and _rel(c[1], a[1]) <= 1e-6


def test_mamba_block_cuda_step_and_windows():
    _need_kernels()
    from seqssm.layers.mamba import Mamba

    torch.manual_seed(0)
    m = Mamba(64).cuda().eval()
    x = torch.randn(2, 96, 64, device="cuda")
    with torch.no_grad():
        full = m(x)
        conv_state, ssm_state = m.allocate_state(2, device="cuda")
        ys = [m.step(x[:, t:t + 1], conv_state, ssm_state)[0] for t in range(96)]
        stepped = torch.cat(ys, dim=1)
        y1, s1 = m(x[:, :50], return_state=True)
        y2 = m(x[:, 50:], state=s1)
    assert _rel(stepped, full) <= 1e-4
    assert _rel(torch.cat([y1, y2], dim=1), full) <= 1e-4


@pytest.mark.parametrize("norm_kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual,residual_in_fp32", [(False, False), (False, True), (True, False)])
def test_fused_add_norm_kernel_matches_torch(norm_kind, dtype, with_residual, residual_in_fp32):
    """add_norm(fused=True) on CUDA (mamba-ssm's Triton kernel) against its torch twin, on strided
    half views as the RCPS blocks pass them; forward, residual dtype and (float32) gradients."""
    import torch.nn as nn

    from seqssm.layers.norm import RMSNorm, _norm_kernels, add_norm

    if _norm_kernels() is None:
        pytest.skip("mamba-ssm Triton layer norm not installed")
    g = torch.Generator(device="cuda").manual_seed(3)
    norm = (RMSNorm(96) if norm_kind == "rms" else nn.LayerNorm(96)).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=g, device="cuda"))
        if norm.bias is not None:
            norm.bias.copy_(0.1 * torch.randn(96, generator=g, device="cuda"))
    full = torch.randn(3, 257, 192, generator=g, device="cuda").to(dtype)
    res_full = torch.randn(3, 257, 192, generator=g, device="cuda").to(dtype)
    outs = {}
    for backend in ("torch", "cuda"):
        x = full.clone().requires_grad_(dtype == torch.float32)
        r = res_full.clone().requires_grad_(dtype == torch.float32)
        xh = x[..., 96:]  # a strided half, as rcps_fused_add_norm passes it
        rh = r[..., 96:] if with_residual else None
        out, res = add_norm(xh, rh, norm, residual_in_fp32=residual_in_fp32, prenorm=True, fused=True,
                            backend=backend)
        grads = None
        if dtype == torch.float32:
            w = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(5), device="cuda")
            (out * w).sum().backward(retain_graph=True)
            grads = (x.grad.clone(), norm.weight.grad.clone())
            norm.weight.grad = None
            if norm.bias is not None:
                norm.bias.grad = None
        outs[backend] = (out.detach(), res.detach(), grads)
    (o_t, r_t, g_t), (o_c, r_c, g_c) = outs["torch"], outs["cuda"]
    assert o_c.dtype == o_t.dtype == dtype and r_c.dtype == r_t.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(o_c, o_t) <= tol and _rel(r_c, r_t) <= 1e-6
    if g_t is not None:
        assert _rel(g_c[0], g_t[0]) <= 1e-4 and _rel(g_c[1], g_t[1]) <= 1e-4
