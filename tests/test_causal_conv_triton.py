"""seqssm's Triton causal convolution (inference on a GPU without causal-conv1d) against the reference.

GPU tests: fresh random inputs, float32 within 1e-5 and bfloat16 within 1e-2 (relative to the
output's norm), widths 2 to 4, with and without bias, initial states and SiLU, inputs shorter than
the window, x as a strided view (the x half of Mamba's in_proj output); `causal_conv1d` takes it
only without causal-conv1d and without gradients. CPU: the final states without copying the input,
and the dispatch with the GPU facts stubbed.
"""

from __future__ import annotations

import pytest
import torch

import seqssm.ops.causal_conv as cc
from seqssm.ops.causal_conv import _final_states, _padded, _tail_states, causal_conv1d, causal_conv1d_ref
from seqssm.ops.causal_conv_triton import causal_conv1d_triton, triton_conv_available


def _need_gpu():
    if not triton_conv_available():
        pytest.skip("needs a CUDA GPU and Triton")


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _inputs(batch, dim, L, W, seed, dtype=torch.float32, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    xz = torch.randn(batch, 2 * dim, L, generator=g, device=device).to(dtype)
    return (xz[:, :dim], torch.randn(dim, W, generator=g, device=device).to(dtype),
            torch.randn(dim, generator=g, device=device).to(dtype),
            torch.randn(batch, dim, W - 1, generator=g, device=device).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 777, 1500])
@pytest.mark.parametrize("with_bias,with_init,activation", [(True, True, "silu"), (False, False, None),
                                                              (True, False, "silu"), (False, True, None)])
def test_triton_conv_equals_the_reference_fp32(W, L, with_bias, with_init, activation):
    _need_gpu()
    x, w, b, h0 = _inputs(2, 37, L, W, seed=W * 100 + L)
    b, h0 = (b if with_bias else None), (h0 if with_init else None)
    got = causal_conv1d_triton(x, w, b, h0, activation)
    want = causal_conv1d_ref(x, w, b, h0, activation=activation)
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    assert _rel(got, want) <= 1e-5


@pytest.mark.gpu
def test_triton_conv_bf16_within_1e_2_of_float32():
    _need_gpu()
    x, w, b, h0 = _inputs(2, 64, 3000, 4, seed=5, dtype=torch.bfloat16)
    got = causal_conv1d_triton(x, w, b, h0, "silu")
    want = causal_conv1d_ref(x.float(), w.float(), b.float(), h0.float(), activation="silu")
    assert got.dtype == torch.bfloat16 and _rel(got, want) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("installed", [False, True])
def test_auto_takes_triton_without_gradients(monkeypatch, installed):
    """auto, no gradient: the Triton kernel, with causal-conv1d installed or not (stubbed as absent or
    as a kernel that must not be called)."""
    _need_gpu()
    fail = lambda *a, **k: pytest.fail("causal-conv1d called")  # noqa: E731
    monkeypatch.setattr(cc, "_kernels", lambda: (fail, fail) if installed else None)
    calls = []
    real = cc.causal_conv1d_triton
    monkeypatch.setattr(cc, "causal_conv1d_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b, h0 = _inputs(2, 16, 300, 4, seed=9)
    with torch.no_grad():
        out, final = causal_conv1d(x, w, b, h0, return_final_states=True, activation="silu")
    want, want_final = causal_conv1d_ref(x, w, b, h0, return_final_states=True, activation="silu")
    assert calls == [1] and _rel(out, want) <= 1e-5 and torch.equal(final, want_final)
    if not installed:  # a gradient is needed: the torch path (causal-conv1d's where installed), and it flows
        w.requires_grad_()
        causal_conv1d(x, w, b, h0, activation="silu").sum().backward()
        assert calls == [1] and w.grad is not None and torch.isfinite(w.grad).all()
    with torch.no_grad():  # an explicit backend is obeyed
        causal_conv1d(x, w, b, h0, activation="silu", backend="torch")
    assert calls == [1]


@pytest.mark.parametrize("L", [1, 2, 3, 4, 50])
def test_final_states_without_copying_the_input(L):
    g = torch.Generator().manual_seed(L)
    x = torch.randn(2, 5, L, generator=g)
    h0 = torch.randn(2, 5, 3, generator=g)
    for init in (None, h0):
        assert torch.equal(_tail_states(x, init, 4), _final_states(_padded(x, init, 4), 4))
    if L >= 3:  # a view of the input's tail
        assert _tail_states(x, h0, 4).data_ptr() == x[..., L - 3:].data_ptr()


def test_dispatch_to_the_triton_conv_without_a_gpu(monkeypatch):
    """Which backend causal_conv1d takes, with the GPU facts stubbed (the kernel itself: GPU tests above)."""
    calls = []
    monkeypatch.setattr(cc, "_kernels", lambda: None)
    monkeypatch.setattr(cc, "causal_conv1d_triton", lambda *a, **k: calls.append(1) or "triton")
    x, w, b, h0 = _inputs(1, 4, 9, 4, seed=0, device="cpu")
    monkeypatch.setattr(cc, "_triton_suits", lambda *a: True)
    assert causal_conv1d(x, w, b, h0) == "triton"
    assert torch.allclose(causal_conv1d(x, w, b, h0, backend="torch"), causal_conv1d_ref(x, w, b, h0), atol=1e-6)
    assert len(calls) == 1  # an explicit torch backend is obeyed
    monkeypatch.setattr(cc, "_triton_suits", lambda *a: False)
    assert torch.allclose(causal_conv1d(x, w, b, h0), causal_conv1d_ref(x, w, b, h0), atol=1e-6) and len(calls) == 1
    with pytest.raises((RuntimeError, ValueError)):  # CPU tensors, or no Triton
        causal_conv1d_triton(x, w, b, h0)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("L", [1, 3, 777])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_reverse_conv_equals_the_flipped_reference(W, L, dtype):
    """reverse=True: the anti-causal convolution, flip(conv(flip(x))), read from the strided view in place."""
    _need_gpu()
    x, w, b, _ = _inputs(2, 37, L, W, seed=W * 7 + L, dtype=dtype)
    got = causal_conv1d_triton(x, w, b, None, "silu", reverse=True)
    want = causal_conv1d_ref(x.float().flip(-1), w.float(), b.float(), activation="silu").flip(-1)
    assert got.dtype == dtype and _rel(got, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
    assert _rel(causal_conv1d(x, w, b, activation="silu", reverse=True), want) <= (1e-5 if dtype == torch.float32
                                                                                    else 1e-2)


def test_reverse_conv_dispatch(monkeypatch):
    """reverse=True goes to the Triton kernel where it suits (even with causal-conv1d: the flips cost
    more than the kernels differ), else through flips; it takes no states (GPU facts stubbed)."""
    x, w, b, h0 = _inputs(1, 4, 9, 4, seed=1, device="cpu")
    want = causal_conv1d_ref(x.flip(-1), w, b, activation="silu").flip(-1)
    assert torch.allclose(causal_conv1d(x, w, b, activation="silu", reverse=True), want, atol=1e-6)
    with pytest.raises(ValueError, match="reverse=True"):
        causal_conv1d(x, w, b, h0, reverse=True)
    with pytest.raises(ValueError, match="reverse=True"):
        causal_conv1d(x, w, b, return_final_states=True, reverse=True)
    calls = []
    monkeypatch.setattr(cc, "_resolve", lambda backend, *a: "cuda" if backend == "auto" else backend)
    monkeypatch.setattr(cc, "_triton_suits", lambda *a: True)
    monkeypatch.setattr(cc, "causal_conv1d_triton", lambda *a, **k: calls.append(k) or "triton")
    assert causal_conv1d(x, w, b, activation="silu", reverse=True) == "triton" and calls == [{"reverse": True}]
    assert torch.allclose(causal_conv1d(x, w, b, activation="silu", reverse=True, backend="torch"), want, atol=1e-6)
