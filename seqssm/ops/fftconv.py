"""Long causal convolution through the FFT, next to the direct convolution it must equal.

    y[..., c, t] = sum_{s=0..t} k[c, s] * u[..., c, t - s]  +  D[c] * u[..., c, t]

`fftconv` is what the models call: O(L log L), zero-padded to 2L so that the circular
convolution of the FFT equals the linear (causal) one on the first L outputs.
`fftconv_ref` is the same sum written as a plain depthwise conv1d, O(L^2), for tests.

Precision: the transform always runs in float32 or wider, with autocast switched off around it.
cuFFT has no bfloat16 transforms (and half precision only for power-of-two sizes), and a long
convolution summed in 8 mantissa bits would lose the far end of the filter anyway. The result is
cast back to the dtype of `u`, so under autocast the surrounding layers still see bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> int:
    if u.dim() < 2:
        raise ValueError(f"fftconv: u must be [..., channels, length], got shape {tuple(u.shape)}")
    H, L = u.shape[-2], u.shape[-1]
    if k.dim() != 2 or k.shape[0] != H:
        raise ValueError(f"fftconv: k must be [channels={H}, length], got shape {tuple(k.shape)}")
    if D.shape != (H,):
        raise ValueError(f"fftconv: D must be [channels={H}], got shape {tuple(D.shape)}")
    if L == 0:
        raise ValueError("fftconv: empty sequence (length 0)")
    return L


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Causal convolution of u [..., H, L] with per-channel filters k [H, >=L], plus skip D [H].

    Only the first L taps of k matter (a causal filter cannot reach further back than the input).
    Returns a tensor shaped like u, in u's dtype.
    """
    L = _check(u, k, D)
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u32 = u.to(compute)
        k32 = k[..., :L].to(compute)
        n = 2 * L
        # The 1/n of the inverse transform is folded into the filter's spectrum (and the inverse
        # left unscaled), the same placement as the HyenaDNA code, so results agree to rounding.
        k_f = torch.fft.rfft(k32, n=n) / n
        u_f = torch.fft.rfft(u32, n=n)
        y = torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :L]
        y = y + u32 * D.to(compute).unsqueeze(-1)
    return y.to(u.dtype)


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The same causal convolution computed directly (depthwise conv1d over a left-padded input).

    conv1d computes a cross-correlation, out[t] = sum_j w[j] x[t + j]; with the input padded by
    L-1 zeros on the left and the filter reversed (w[j] = k[L-1-j]) that is sum_s k[s] u[t-s].
    Runs in u's dtype (pass float64 for a high-precision reference).
    """
    L = _check(u, k, D)
    H = u.shape[-2]
    lead = u.shape[:-2]
    x = u.reshape(-1, H, L)
    w = k[..., :L].to(u.dtype).flip(-1).unsqueeze(1)  # [H, 1, L]
    y = F.conv1d(F.pad(x, (L - 1, 0)), w, groups=H)
    y = y + x * D.to(u.dtype).unsqueeze(-1)
    return y.reshape(*lead, H, L)
