"""Long causal convolution through the FFT, next to the direct convolution it must equal.

    y[..., c, t] = sum_{s=0..t} k[c, s] * u[..., c, t - s]  +  D[c] * u[..., c, t]

`fftconv` is what the models call: O(L log L), zero-padded to 2L so that the circular
convolution of the FFT equals the linear (causal) one on the first L outputs.
`fftconv_ref` is the same sum written as a plain depthwise conv1d, O(L^2), for tests.
`fftconv_gated_` is the inference form used by the lean HyenaDNA path: rows of a [R, L] buffer are
transformed a group at a time (bounded scratch at a million tokens), the transform length is the
next size cuFFT handles fastest rather than exactly 2L, and the output gate is applied on the way out.

Precision: the transform always runs in float32 or wider, with autocast switched off around it.
cuFFT has no bfloat16 transforms (and half precision only for power-of-two sizes), and a long
convolution summed in 8 mantissa bits would lose the far end of the filter anyway. The result is
cast back to the dtype of `u`, so under autocast the surrounding layers still see bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqssm.ops.hyena_fused import fft_epilogue, packed_spectral_product_, use_triton


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


def fft_length(L: int) -> int:
    """Smallest n >= 2L - 1 of the form 2^a * 3^b (b <= 1): linear, not circular, convolution.

    Pure powers of two and 3 * 2^k are cuFFT's fastest sizes; 2L itself (e.g. 2,000,000 = 2^7 5^6)
    can be markedly slower, and n >= 2L - 1 is all the zero padding a causal convolution needs.
    """
    need = max(2 * L - 1, 1)
    two = 1 << (need - 1).bit_length()  # the smallest 2^a >= need
    three = 3 << ((need - 1) // 3).bit_length()  # the smallest 3 * 2^a >= need
    return min(two, three)


def group_shape(B: int, H: int, rows_per_group: int) -> tuple[int, int]:
    """(channels, batch rows) per transform group of fftconv_gated_.

    Whole channel ranges of a few batch rows when a group holds all H channels: the group is then a
    contiguous slice of the [B, H, n] buffer, so the transform reads it in place (no gathering copy).
    Otherwise one batch row and `rows_per_group` channels (long inputs, where one row is megabytes).
    """
    if rows_per_group >= H:
        return H, max(1, min(B, rows_per_group // H))
    return max(1, rows_per_group), 1


def packed_fft(x: torch.Tensor) -> torch.Tensor:
    """fft(x[..., 0::2] + i x[..., 1::2]): a real row of even length n as n/2 complex pairs, transformed
    (a view, no copy, when the last axis is contiguous)."""
    return torch.fft.fft(torch.view_as_complex(x.unflatten(-1, (x.shape[-1] // 2, 2))))


def _packed_convolve(x: torch.Tensor, k_f: torch.Tensor, n: int, padded: bool, L: int) -> torch.Tensor:
    """irfft(rfft(x, n) K, n, norm="forward") through half-length complex FFTs (see packed_spectral_product_)."""
    Z = packed_fft(x if padded else F.pad(x, (0, n - L)))
    packed_spectral_product_(Z, k_f, n)
    return torch.view_as_real(torch.fft.ifft(Z, norm="forward")).flatten(-2)


def _real_convolve(x: torch.Tensor, k_f: torch.Tensor, n: int, padded: bool) -> torch.Tensor:
    """irfft(rfft(x, n) K, n, norm="forward") through cuFFT's real transforms."""
    X = torch.fft.rfft(x) if padded else torch.fft.rfft(x, n=n)
    for Xb in X:  # same-shape products: the vectorised kernel, not a broadcasting one
        Xb *= k_f
    return torch.fft.irfft(X, n=n, norm="forward")


def use_packed(v: torch.Tensor, n: int, L: int, packed: bool | None = None) -> bool:
    """Whether fftconv_gated_ takes the packed form for this input (see there); None = automatic."""
    if packed is None:
        packed = v.shape[-1] == n and n != L and v.dtype == torch.float32 and use_triton(v)
    return bool(packed) and n % 2 == 0


def fftconv_gated_(
    v: torch.Tensor,
    D: torch.Tensor,
    gate: torch.Tensor,
    spectrum,
    *,
    n: int,
    rows_per_group: int,
    packed: bool | None = None,
) -> torch.Tensor:
    """gate[b, c] <- (causal_conv(v[b, c], k[c]) + D[c] v[b, c]) * gate[b, c], in place, by groups.

    gate: [B, H, L] in any float dtype, overwritten with the result.
    v: float32 (or float64) [B, H, L], or [B, H, n] already zero past L (then no padded copy is made).
    spectrum(c0, c1) -> complex [c1 - c0, n // 2 + 1]: rfft(k[c0:c1], n) / n, or with packed=True
    also [c1 - c0, n // 2]: fft of the pairs of k[c0:c1] / n (the packed form). It is called once
    per channel group (all batch rows of a group share it), so an uncached filter is transformed
    once per call, not once per batch row. Groups: see group_shape; scratch is about 16 n bytes
    per row of a group.
    packed: transform each real row as a complex row of half the length (its pairs of values) and do
    the real-spectrum bookkeeping in one fused pass with the product (ops.hyena_fused.
    packed_spectral_product_). It saves cuFFT's real-to-complex and complex-to-real passes and torch's
    copy of every complex-to-real input. Default: on CUDA in float32 with Triton, for even n.
    """
    B, H, L = gate.shape
    if n < 2 * L - 1:
        raise ValueError(f"fftconv_gated_: transform length {n} < 2L - 1 = {2 * L - 1}")
    if D.shape != (H,) or v.shape[:2] != (B, H) or v.shape[-1] not in (L, n):
        raise ValueError(f"fftconv_gated_: shapes v {tuple(v.shape)}, gate {tuple(gate.shape)}, D {tuple(D.shape)}")
    padded = v.shape[-1] == n and n != L
    packed = use_packed(v, n, L, packed)
    chans, bstep = group_shape(B, H, rows_per_group)
    with torch.autocast(device_type=v.device.type, enabled=False):
        for c0 in range(0, H, chans):
            c1 = min(c0 + chans, H)
            k_f = spectrum(c0, c1)
            for b0 in range(0, B, bstep):
                b1 = min(b0 + bstep, B)
                x = v[b0:b1, c0:c1]
                y = _packed_convolve(x, k_f, n, padded, L) if packed else _real_convolve(x, k_f, n, padded)
                fft_epilogue(y, x[..., :L], gate[b0:b1, c0:c1], D[c0:c1])
                del y
    return gate
