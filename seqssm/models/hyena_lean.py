"""Lean HyenaDNA inference: HyenaDNAModel.forward's function in bounded memory, for million-token windows.

The reference forward (models/hyena.py) materialises, in every layer, the [B, 3d, L] projection,
float32 copies of it, and 2L-padded spectra of all d channels and of the filters: about 20 GiB for
one 1,000,000-token window of the large-1m shape. Here a layer runs in three stages over three
whole-sequence buffers and a bounded scratch:

    res   float32 [B, L, d]   the residual stream, updated in place
    gate  compute [B, d, L]   x0, then overwritten with the gated long-convolution output
    vbuf  float32 [B, d, L]   v * x1, the input of the long convolution

    A  by sequence chunks   LN1 -> in_proj -> short causal conv -> x0 into gate, v * x1 into vbuf
                            (the conv's K-1 rows of left context are recomputed, not stored)
    B  by channel groups    long convolution through the FFT, + D v, times x0 (ops.fftconv_gated_)
    C  by sequence chunks   out_proj -> res += ; LN2 -> fc1 -> GELU -> fc2 -> res +=

"compute" is the autocast dtype when autocast is on (bf16 on GPU), else the weights' dtype; the
residual stream, layer norms, filters and transforms stay float32 as in the reference. Filter
spectra are cached per (layer, length) within a byte budget and rebuilt when a filter parameter
changes; at a million tokens they do not fit the budget and are rebuilt per call, a channel group
at a time. Only inference: no autograd, no dropout (the model dispatches here in eval mode under
no_grad / inference_mode; tests/test_hyena_lean.py holds the two paths to each other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqssm.ops.fftconv import fft_length, fftconv_gated_, group_shape
from seqssm.ops.hyena_fused import hyena_filter_into, layer_norm_to, short_conv_gate


class LeanHyenaInference:
    """Runs a HyenaDNAModel's forward pass through the staged, bounded-memory path.

    seq_chunk: tokens (batch x positions) per chunk in stages A and C.
    scratch_bytes: transform scratch of stage B (sets how many rows are transformed together).
    cache_bytes: budget for cached filter spectra (all layers of all cached lengths together).
    packed: the long convolution's transform form (ops.fftconv.fftconv_gated_); None = automatic.
    """

    def __init__(self, *, seq_chunk: int = 1 << 17, scratch_bytes: int = 1 << 29, cache_bytes: int = 1 << 30,
                 rows_per_group: int | None = None, packed: bool | None = None):
        self.seq_chunk = seq_chunk
        self.packed = packed
        self.scratch_bytes = scratch_bytes
        self.rows_per_group = rows_per_group
        self.cache_bytes = cache_bytes
        self._cache: dict = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def __call__(self, backbone, input_ids: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        device = input_ids.device
        d = backbone.config.d_model
        w = backbone.layers[0].mixer.in_proj.weight.dtype
        wide = torch.promote_types(w, torch.float32)  # residual, norms, filters, transforms
        cd = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else w
        n = fft_length(L)
        steps = max(1, self.seq_chunk // B)
        rows = self.rows_per_group or max(1, self.scratch_bytes // (16 * n))
        with torch.autocast(device_type=device.type, enabled=False):
            res = backbone.embeddings(input_ids).float().to(wide)  # float32 first, as the reference
            gate = torch.empty(B, d, L, device=device, dtype=cd)
            # The convolution input, zero past L: the forward transform reads it without a padded copy.
            vbuf = torch.empty(B, d, n, device=device, dtype=wide)
            vbuf[..., L:].zero_()
            # Filter rows of one channel group, zero past L likewise (reused by every layer).
            chans = min(group_shape(B, d, rows)[0], d)
            kbuf = torch.zeros(chans, n, device=device, dtype=wide)
            for i, layer in enumerate(backbone.layers):
                mixer = layer.mixer
                for s0 in range(0, L, steps):
                    _stage_a(layer, res, gate, vbuf, s0, min(s0 + steps, L), cd)
                filt = mixer.filter_fn
                D = filt.bias if filt.use_bias else torch.zeros_like(filt.bias)
                spectrum = self._spectrum_fn(i, filt, L, n, kbuf)
                fftconv_gated_(vbuf, D, gate, spectrum, n=n, rows_per_group=rows, packed=self.packed)
                for s0 in range(0, L, steps):
                    _stage_c(layer, res, gate, s0, min(s0 + steps, L), cd)
            del gate, vbuf, kbuf
            ln = backbone.ln_f
            for s0 in range(0, L, steps):
                s1 = min(s0 + steps, L)
                res[:, s0:s1] = layer_norm_to(res[:, s0:s1], ln.weight, ln.bias, ln.eps, wide)
        return res

    def _spectrum_fn(self, i: int, filt, L: int, n: int, kbuf: torch.Tensor):
        """spectrum(c0, c1) for layer i: from the cache, or built a group at a time in kbuf
        (and cached whole when it fits the budget)."""
        params = [p for p in filt.implicit_filter.parameters()] + [filt.pos_emb.z, filt.pos_emb.t, filt.modulation.deltas]
        version = tuple((p.data_ptr(), p._version) for p in params)
        key = (i, L, n, filt.bias.device)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == version:
            full = hit[1]
            return lambda c0, c1: full[c0:c1]
        self._cache.pop(key, None)
        feats = filt.features(L)
        W = filt.implicit_filter[-1].weight
        t = filt.pos_emb.t[0, :L, 0]
        deltas = filt.modulation.deltas[0, 0]

        def build(c0: int, c1: int) -> torch.Tensor:
            buf = kbuf[: c1 - c0]
            hyena_filter_into(buf, feats, W[c0:c1], t, deltas[c0:c1], filt.modulation.shift, 1.0 / n)
            return torch.fft.rfft(buf)

        H = filt.d_model
        size = H * (n // 2 + 1) * 8
        used = sum(v[1].numel() * 8 for v in self._cache.values())
        if used + size > self.cache_bytes:
            return build
        step = kbuf.shape[0]
        full = torch.cat([build(c0, min(c0 + step, H)) for c0 in range(0, H, step)])
        self._cache[key] = (version, full)
        return lambda c0, c1: full[c0:c1]


def _linear(x: torch.Tensor, lin, cd: torch.dtype, gelu: bool = False) -> torch.Tensor:
    """x [N, in] -> [N, out] in cd; on CUDA the tanh-GELU rides in the matmul's epilogue."""
    w = lin.weight.to(cd)
    b = lin.bias.to(cd) if lin.bias is not None else None
    if gelu and x.is_cuda and b is not None:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


def _stage_a(layer, res, gate, vbuf, s0: int, s1: int, cd: torch.dtype) -> None:
    mixer = layer.mixer
    conv = mixer.short_filter
    K = conv.kernel_size[0]
    lo = max(s0 - (K - 1), 0)
    n1 = layer.norm1
    h = layer_norm_to(res[:, lo:s1], n1.weight, n1.bias, n1.eps, cd)  # [B, rows, d]
    B, rows, d = h.shape
    z = _linear(h.reshape(B * rows, d), mixer.in_proj, cd).view(B, rows, -1)  # [B, rows, 3d]
    short_conv_gate(z, conv.weight[:, 0, :], conv.bias, gate, vbuf, s0, s0 - lo)


def _stage_c(layer, res, gate, s0: int, s1: int, cd: torch.dtype) -> None:
    mixer, mlp = layer.mixer, layer.mlp
    B = res.shape[0]
    S = s1 - s0
    # The channel-major gate goes to a batched matmul as a transposed operand, without a copy.
    w = mixer.out_proj.weight.to(cd)
    y = torch.baddbmm(mixer.out_proj.bias.to(cd).expand(B, S, -1), gate[:, :, s0:s1].transpose(1, 2),
                      w.t().expand(B, -1, -1))
    res[:, s0:s1].add_(y)  # mixed-dtype add: one pass
    n2 = layer.norm2
    h = layer_norm_to(res[:, s0:s1], n2.weight, n2.bias, n2.eps, cd).view(B * S, -1)
    h = _linear(_linear(h, mlp.fc1, cd, gelu=True), mlp.fc2, cd)
    res[:, s0:s1].add_(h.view(B, S, -1))
