"""The Toeplitz (matrix-product) causal convolution against the direct one and the FFT one."""

from __future__ import annotations

import pytest
import torch

from seqssm.ops.fftconv import fftconv, fftconv_ref
from seqssm.ops.toeplitz import toeplitz, toeplitz_conv


def test_toeplitz_matrix_layout():
    k = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.equal(toeplitz(k, 3)[0], torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("B,L,C", [(3, 1, 4), (2, 17, 5), (4, 100, 8), (1, 256, 3)])
def test_matches_direct_convolution(B, L, C):
    g = torch.Generator().manual_seed(L)
    u = torch.randn(B, L, C, generator=g)
    k = torch.randn(C, L + 3, generator=g)
    D = torch.randn(C, generator=g)
    want = fftconv_ref(u.double().transpose(1, 2), k.double(), D.double()).transpose(1, 2)
    got = toeplitz_conv(u, k, D)
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max() / want.abs().max()) <= 1e-5
    via_fft = fftconv(u.transpose(1, 2), k, D).transpose(1, 2)
    assert float((got - via_fft).abs().max() / via_fft.abs().max()) <= 1e-5


def test_gradients_match_direct_convolution():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    k = torch.randn(4, 30, generator=g, dtype=torch.float64)
    D = torch.randn(4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b, c: toeplitz_conv(a.float(), b.float(), c.float()).double(),
               lambda a, b, c: fftconv_ref(a.transpose(1, 2), b, c).transpose(1, 2)):
        a, b, c = (t.clone().requires_grad_() for t in (u, k, D))
        (fn(a, b, c) * w).sum().backward()
        grads.append([a.grad, b.grad, c.grad])
    for x, y in zip(*grads):
        assert float((x - y).abs().max() / y.abs().max()) <= 1e-5


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="taps"):
        toeplitz_conv(torch.zeros(1, 10, 2), torch.zeros(2, 5), torch.zeros(2))
