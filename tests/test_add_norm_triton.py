"""seqssm's Triton residual add + norm (inference on a GPU without mamba-ssm) against its torch twin.

GPU tests: RMSNorm and LayerNorm (with and without affine parameters), float32 within 1e-5 and
bfloat16 within 1e-2, with and without a residual, residual dtypes, strided half views as the RCPS
blocks pass them, prenorm on and off; `add_norm` takes it only without mamba-ssm's kernel and without
gradients. CPU: the dispatch with the GPU facts stubbed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import seqssm.layers.norm as nm
from seqssm.layers.norm import RMSNorm, add_norm
from seqssm.ops.add_norm_triton import add_norm_triton, triton_norm_available


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _norm(kind, d, device, affine=True):
    g = torch.Generator(device=device).manual_seed(3)
    norm = (RMSNorm(d) if kind == "rms" else nn.LayerNorm(d, elementwise_affine=affine)).to(device)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=g, device=device))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.1 * torch.randn(d, generator=g, device=device))
    return norm


@pytest.mark.gpu
@pytest.mark.parametrize("kind,affine", [("rms", True), ("layer", True), ("layer", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual,residual_in_fp32", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("prenorm", [True, False])
def test_triton_add_norm_equals_torch(monkeypatch, kind, affine, dtype, with_residual, residual_in_fp32, prenorm):
    if not triton_norm_available():
        pytest.skip("needs a CUDA GPU and Triton")
    monkeypatch.setattr(nm, "_norm_kernels", lambda: None)  # as without mamba-ssm
    calls = []
    real = nm.add_norm_triton
    monkeypatch.setattr(nm, "add_norm_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    norm = _norm(kind, 96, "cuda", affine)
    g = torch.Generator(device="cuda").manual_seed(5)
    full = torch.randn(3, 257, 192, generator=g, device="cuda").to(dtype)
    res_full = torch.randn(3, 257, 192, generator=g, device="cuda").to(dtype)
    x, r = full[..., 96:], (res_full[..., 96:] if with_residual else None)  # strided halves, as in RCPS
    kw = dict(residual_in_fp32=residual_in_fp32, prenorm=prenorm, fused=True)
    with torch.no_grad():
        got = add_norm(x, r, norm, **kw)
        want = add_norm(x, r, norm, backend="torch", **kw)
    assert calls == [1]
    got, want = (got, want) if prenorm else ((got, None), (want, None))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got[0].dtype == want[0].dtype and _rel(got[0], want[0]) <= tol
    if prenorm:
        assert got[1].dtype == want[1].dtype and _rel(got[1], want[1]) <= 1e-6


@pytest.mark.gpu
def test_gradients_take_the_torch_path(monkeypatch):
    if not triton_norm_available():
        pytest.skip("needs a CUDA GPU and Triton")
    monkeypatch.setattr(nm, "_norm_kernels", lambda: None)
    calls = []
    monkeypatch.setattr(nm, "add_norm_triton", lambda *a, **k: calls.append(1))
    norm = _norm("rms", 64, "cuda")
    x = torch.randn(2, 10, 64, device="cuda", requires_grad=True)
    out, _ = add_norm(x, None, norm, prenorm=True, fused=True)
    out.sum().backward()
    assert calls == [] and x.grad is not None


def test_dispatch_to_the_triton_add_norm_without_a_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(nm, "add_norm_triton", lambda *a, **k: calls.append(a) or ("out", "res"))
    norm = _norm("rms", 8, "cpu")
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    monkeypatch.setattr(nm, "_triton_suits", lambda *a: True)
    assert add_norm(x, r, norm, prenorm=True, fused=True) == ("out", "res")
    assert add_norm(x, r, norm, prenorm=False, fused=True) == "out"
    assert len(calls) == 2 and calls[0][6] == r.dtype  # the residual keeps its dtype
    add_norm(x, r, norm, prenorm=True, fused=True, backend="torch")  # an explicit backend is obeyed
    add_norm(x, r, norm, prenorm=True, fused=False)  # the unfused semantics stay in torch
    assert len(calls) == 2
    monkeypatch.setattr(nm, "_triton_suits", lambda *a: False)
    out, res = add_norm(x, r, norm, prenorm=True, fused=True)
    assert len(calls) == 2 and out.shape == x.shape and torch.allclose(res, x + r)
    with pytest.raises((RuntimeError, ValueError)):  # CPU tensors, or no Triton
        add_norm_triton(x, r, norm.weight, None, 1e-5, True, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("flip_weight", [False, True])
def test_swap_strands_equals_the_torch_twin(kind, dtype, with_residual, flip_weight):
    """swap_strands=True (the RCPS blocks' halves exchange in strand-major form) against strands_add_norm_ref."""
    from seqssm.layers.rcps import strands_add_norm_ref

    if not triton_norm_available():
        pytest.skip("needs a CUDA GPU and Triton")
    g = torch.Generator(device="cuda").manual_seed(21)
    norm = (RMSNorm(48) if kind == "rms" else nn.LayerNorm(48)).cuda()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(48, device="cuda", generator=g))
        if norm.bias is not None:
            norm.bias.add_(0.3 * torch.randn(48, device="cuda", generator=g))
    x = torch.randn(6, 77, 48, device="cuda", generator=g).to(dtype)
    r = torch.randn(6, 77, 48, device="cuda", generator=g).to(dtype) if with_residual else None
    want, want_res = strands_add_norm_ref(x, r, norm, residual_in_fp32=True, flip_weight=flip_weight)
    w, b = nm._affine(norm, flip_weight)
    got, got_res = add_norm_triton(x, r, w, b, norm.eps, kind == "rms", want_res.dtype, swap_strands=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == want.dtype and got_res.dtype == want_res.dtype
    assert _rel(got, want) <= tol and _rel(got_res, want_res) <= 1e-6
