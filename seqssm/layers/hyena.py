"""The order-2 Hyena operator (Poli et al. 2023) as used by HyenaDNA (Nguyen et al. 2023).

    u [B, L, d] --in_proj--> [B, 3d, L] --short causal depthwise conv--> x0, x1, v
    v <- v * x1                          (gate)
    v <- causal_conv(v, h) + D * v       (implicit long filter h, one per channel, through the FFT)
    y <- out_proj(v * x0)                (gate)

The long filter h[c, t] is not stored: a small MLP maps positional features of t to d values,
and an exponential window makes each channel decay at its own rate:

    z(t)   = [t/(Lmax-1), cos(2 pi f_b i / Lmax), -sin(2 pi f_b i / Lmax)]   (emb_dim features)
    h(t)   = W_out . sin(freq * (W_2 . sin(freq * (W_1 . sin(freq * (W_0 z + b_0)) + b_1)) + b_2))
    h(t)  *= exp(-t |delta_c|) + shift

Parameter and buffer names are those of the HuggingFace HyenaDNA checkpoints
(LongSafari/hyenadna-*-hf), so their state dicts load without renaming. Quirks reproduced:
one `Sin` module (one `freq` Parameter) is reused after every linear layer of the filter MLP,
so a state dict lists it under implicit_filter.1.freq, .3.freq, .5.freq; the positional
features `z` are a persistent buffer (checkpoints carry them, possibly fine-tuned).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.ops.fftconv import fftconv


class Sin(nn.Module):
    """sin(freq * x) with a per-feature frequency; learnable when train_freq."""

    def __init__(self, dim: int, w: float = 10.0, train_freq: bool = True):
        super().__init__()
        freq = w * torch.ones(1, dim)
        if train_freq:
            self.freq = nn.Parameter(freq)
        else:  # follows .to(device) but is not part of the state dict (as in the reference)
            self.register_buffer("freq", freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """Features of the position fed to the filter MLP: normalized time plus complex exponentials.

    z[0, i] = [t_i, cos(-f_1 w_i) .. cos(-f_B w_i), sin(-f_1 w_i) .. sin(-f_B w_i)] with
    t_i = i / (Lmax - 1), w_i = 2 pi i / Lmax, B = (emb_dim - 1) // 2 bands, f = linspace(1e-4, B-1, B).
    Filters for a shorter input are the first L positions of the Lmax-long ones.
    """

    def __init__(self, emb_dim: int, max_seq_len: int):
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and >= 3 (time, cosine, sine), got {emb_dim}")
        self.max_seq_len = max_seq_len
        bands = (emb_dim - 1) // 2
        t = torch.linspace(0, 1, max_seq_len)[None, :, None]  # [1, Lmax, 1]
        i = torch.linspace(0, max_seq_len - 1, max_seq_len)[None, :, None]
        w = 2 * math.pi * i / max_seq_len
        f = torch.linspace(1e-4, bands - 1, bands)[None, None]  # [1, 1, B]
        z = torch.cat([t, torch.cos(-f * w), torch.sin(-f * w)], dim=-1)  # [1, Lmax, emb_dim]
        self.register_buffer("z", z)
        self.register_buffer("t", t)

    def forward(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :L], self.t[:, :L]


class ExponentialModulation(nn.Module):
    """Window h(t) * (exp(-t |delta_c|) + shift); decay rates spread linearly over the channels.

    The fastest channel falls to `target` at t = fast_decay_pct of the maximum length,
    the slowest at slow_decay_pct (beyond the end: that channel keeps a long memory).
    """

    def __init__(
        self,
        d_model: int,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        target: float = 1e-2,
        shift: float = 0.05,
    ):
        super().__init__()
        self.shift = shift
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model)[None, None])

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * (torch.exp(-t * self.deltas.abs()) + self.shift)


class HyenaFilter(nn.Module):
    """Implicit long filter: positions -> MLP with sine activations -> exponential window.

    `bias` is the skip term D of the long convolution (one per channel).
    """

    def __init__(
        self,
        d_model: int,
        max_seq_len: int,
        *,
        emb_dim: int = 3,
        filter_order: int = 64,
        num_inner_mlps: int = 2,
        activation_freq: float = 1.0,
        train_freq: bool = True,
        use_bias: bool = True,
        modulation_shift: float = 0.05,
    ):
        super().__init__()
        self.d_model = d_model
        self.use_bias = use_bias
        self.bias = nn.Parameter(torch.randn(d_model))
        self.pos_emb = PositionalEmbedding(emb_dim, max_seq_len)
        act = Sin(filter_order, w=activation_freq, train_freq=train_freq)  # one module, reused
        layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order), act]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(filter_order, filter_order), act]
        layers.append(nn.Linear(filter_order, d_model, bias=False))
        self.implicit_filter = nn.Sequential(*layers)
        self.modulation = ExponentialModulation(d_model, shift=modulation_shift)

    def filter(self, L: int) -> torch.Tensor:
        """The filters for the first L positions, [d_model, L].

        Autocast is off here: with float32 weights the filter is computed in float32 even inside
        a bf16 autocast region (the MLP is only L x filter_order, and the FFT wants float32 anyway).
        """
        z, t = self.pos_emb(L)
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self.implicit_filter(z.to(self.implicit_filter[0].weight.dtype))  # [1, L, d]
            h = self.modulation(t, h)
        return h[0].transpose(0, 1)

    def features(self, L: int) -> torch.Tensor:
        """The filter MLP up to its last (bias-free) linear layer: [L, filter_order], float32 or wider."""
        z, _ = self.pos_emb(L)
        dtype = torch.promote_types(self.implicit_filter[0].weight.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.implicit_filter[:-1](z[0].to(dtype))

    def filter_rows(self, features: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """Filters of channels c0..c1 from `features`: [c1 - c0, L] in its dtype, = filter(L)[c0:c1]."""
        L = features.shape[0]
        with torch.autocast(device_type=features.device.type, enabled=False):
            w = self.implicit_filter[-1].weight[c0:c1].to(features.dtype)  # [c, filter_order]
            k = w @ features.T  # [c, L]
            t = self.pos_emb.t[0, :L, 0].to(features.dtype)
            window = torch.exp(-t[None, :] * self.modulation.deltas[0, 0, c0:c1, None].abs()) + self.modulation.shift
            return k * window

    def forward(self, v: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """Long convolution of v [B, d, L] with the filters (computed here unless given)."""
        L = v.shape[-1]
        if k is None:
            k = self.filter(L)
        D = self.bias if self.use_bias else torch.zeros_like(self.bias)
        return fftconv(v, k, D)


class HyenaOperator(nn.Module):
    """Order-2 Hyena mixer: [B, L, d] -> [B, L, d], causal."""

    def __init__(
        self,
        d_model: int,
        max_seq_len: int,
        *,
        order: int = 2,
        filter_order: int = 64,
        emb_dim: int = 3,
        short_filter_order: int = 3,
        num_inner_mlps: int = 2,
        activation_freq: float = 1.0,
        train_freq: bool = True,
        use_bias: bool = True,
        dropout: float = 0.0,
        modulation_shift: float = 0.05,
    ):
        super().__init__()
        if order != 2:
            raise ValueError(f"only order-2 Hyena is implemented (as in every HyenaDNA checkpoint), got {order}")
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        self.order = order
        width = d_model * (order + 1)
        self.in_proj = nn.Linear(d_model, width)
        self.out_proj = nn.Linear(d_model, d_model)
        # Depthwise and causal: the input is padded on the left only (see forward).
        self.short_filter = nn.Conv1d(width, width, short_filter_order, groups=width)
        self.filter_fn = HyenaFilter(
            d_model * (order - 1),
            max_seq_len,
            emb_dim=emb_dim,
            filter_order=filter_order,
            num_inner_mlps=num_inner_mlps,
            activation_freq=activation_freq,
            train_freq=train_freq,
            use_bias=use_bias,
            modulation_shift=modulation_shift,
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        L = u.shape[-2]
        if L > self.max_seq_len:
            raise ValueError(f"sequence length {L} exceeds the filters' maximum length {self.max_seq_len}")
        z = self.in_proj(u).transpose(1, 2)  # [B, 3d, L]
        pad = self.short_filter.kernel_size[0] - 1
        z = self.short_filter(F.pad(z, (pad, 0)))  # [B, 3d, L], output t sees inputs t-pad..t
        x0, x1, v = z.split(self.d_model, dim=1)
        v = self.dropout(v * x1)
        v = self.filter_fn(v)
        y = (v * x0).transpose(1, 2)
        return self.out_proj(y)
