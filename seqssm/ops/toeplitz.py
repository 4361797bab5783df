"""Short causal convolution as a matrix product, for sequences of up to a few hundred tokens.

    y[b, t, c] = sum_{s<=t} u[b, s, c] k[c, t - s]  +  D[c] u[b, t, c]

For SMILES-length inputs (L <= ~256) the FFT route is bound by memory traffic (complex spectra of
every batch row and channel); building each channel's L x L lower-triangular Toeplitz matrix once
and running one batched GEMM per layer moves far fewer bytes and uses the GPU's matrix units.
The product runs in float32 with autocast off (TF32 only if the user enabled it globally), so it
agrees with ``seqssm.ops.fftconv.fftconv_ref`` to float32 rounding. Layout is [B, L, C] (the S4
layer's), so no transposes are needed around it.
"""

from __future__ import annotations

import functools

import torch

TOEPLITZ_MAX_LEN = 256


@functools.lru_cache(maxsize=16)
def _lag_index(L: int, device_type: str, device_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.arange(L)
    lag = s[None, :] - s[:, None]  # [s, t] -> t - s
    dev = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    return lag.clamp(min=0).to(dev), (lag >= 0).to(dev)


def toeplitz(k: torch.Tensor, L: int) -> torch.Tensor:
    """T [C, L, L] with T[c, s, t] = k[c, t - s] for t >= s, else 0 (differentiable in k)."""
    idx, mask = _lag_index(L, k.device.type, k.device.index)
    return k[:, :L][:, idx] * mask


def toeplitz_conv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution of u [..., L, C] with k [C, >=L], plus skip D [C]; u's dtype out."""
    if u.dim() < 2 or k.dim() != 2 or k.shape[0] != u.shape[-1] or D.shape != (u.shape[-1],):
        raise ValueError(f"toeplitz_conv: need u [..., L, C], k [C, >=L], D [C]; got {tuple(u.shape)}, "
                         f"{tuple(k.shape)}, {tuple(D.shape)}")
    L, C = u.shape[-2], u.shape[-1]
    if k.shape[1] < L:
        raise ValueError(f"toeplitz_conv: filter of {k.shape[1]} taps for a sequence of {L}")
    lead = u.shape[:-2]
    with torch.autocast(device_type=u.device.type, enabled=False):
        u32 = u.float().reshape(-1, L, C)
        T = toeplitz(k.float(), L)  # [C, L, L]
        y = torch.bmm(u32.permute(2, 0, 1), T).permute(1, 2, 0)  # [C, N, L] @ [C, L, L] -> [N, L, C]
        y = y + u32 * D.float()
    return y.reshape(*lead, L, C).to(u.dtype)
