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
    C  by row blocks        out_proj -> res += with LN2 in the same pass -> fc1 -> GELU -> fc2,
                            accumulated into res by the matmul

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

from seqssm.ops.fftconv import fft_length, fftconv_gated_, group_shape, packed_fft, use_packed
from seqssm.ops.hyena_fused import (
    accumulate_matmul_,
    add_layer_norm_,
    hyena_filter_into,
    layer_norm_to,
    short_conv_gate,
)


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

    # Never traced by torch.compile: the path is hand-fused already, manages its own buffers and
    # filter cache, and dynamo cannot analyse its Triton kernels (a helper @triton.jit called from a
    # kernel raised NameError in `seqssm pretrain --compile`'s evaluation). A compiled model gets a
    # graph break here and runs this eagerly.
    @torch.compiler.disable
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
            packed = use_packed(vbuf, n, L, self.packed)
            for i, layer in enumerate(backbone.layers):
                mixer = layer.mixer
                wts = _LayerWeights(layer, cd)
                for s0 in range(0, L, steps):
                    _stage_a(layer, wts, res, gate, vbuf, s0, min(s0 + steps, L), cd)
                filt = mixer.filter_fn
                D = filt.bias if filt.use_bias else torch.zeros_like(filt.bias)
                spectrum = self._spectrum_fn(i, filt, L, n, kbuf, packed)
                fftconv_gated_(vbuf, D, gate, spectrum, n=n, rows_per_group=rows, packed=packed)
                for b0, b1, s0, s1 in _row_blocks(B, L, self.seq_chunk):
                    _stage_c(layer, wts, res, gate, b0, b1, s0, s1, cd)
            del gate, vbuf, kbuf
            ln = backbone.ln_f
            for b0, b1, s0, s1 in _row_blocks(B, L, self.seq_chunk):
                r = res[b0:b1, s0:s1]
                layer_norm_to(r, ln.weight, ln.bias, ln.eps, wide, out=r)  # in place
        return res

    def _spectrum_fn(self, i: int, filt, L: int, n: int, kbuf: torch.Tensor, packed: bool):
        """spectrum(c0, c1) for layer i (in the packed form when `packed`): from the cache, or built a
        group at a time in kbuf (and cached whole when it fits the budget)."""
        params = [p for p in filt.implicit_filter.parameters()] + [filt.pos_emb.z, filt.pos_emb.t, filt.modulation.deltas]
        # One form per layer and length: switching forms replaces the entry rather than keeping both.
        version = (tuple((p.data_ptr(), p._version) for p in params), packed)
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
            return packed_fft(buf) if packed else torch.fft.rfft(buf)  # packed: like the input

        H = filt.d_model
        size = H * (n // 2 + (0 if packed else 1)) * 8
        used = sum(v[1].numel() * 8 for v in self._cache.values())
        if used + size > self.cache_bytes:
            return build
        step = kbuf.shape[0]
        full = torch.cat([build(c0, min(c0 + step, H)) for c0 in range(0, H, step)])
        self._cache[key] = (version, full)
        return lambda c0, c1: full[c0:c1]


class _LayerWeights:
    """A block's matrices and biases in the compute dtype, cast once per forward (not once per chunk)."""

    def __init__(self, layer, cd: torch.dtype):
        mixer, mlp = layer.mixer, layer.mlp
        cast = lambda t: None if t is None else t.to(cd)  # noqa: E731
        self.in_w, self.in_b = cast(mixer.in_proj.weight), cast(mixer.in_proj.bias)
        self.out_wt = cast(mixer.out_proj.weight).t()
        zeros = lambda lin: lin.weight.new_zeros(lin.out_features)  # noqa: E731
        self.out_b = mixer.out_proj.bias if mixer.out_proj.bias is not None else zeros(mixer.out_proj)
        self.fc1_w, self.fc1_b = cast(mlp.fc1.weight), cast(mlp.fc1.bias)
        self.fc2_wt = cast(mlp.fc2.weight).t()
        self.fc2_b = mlp.fc2.bias if mlp.fc2.bias is not None else zeros(mlp.fc2)


def _row_blocks(B: int, L: int, chunk: int):
    """(b0, b1, s0, s1) blocks of about `chunk` tokens, each a contiguous slice of a [B, L, d] tensor:
    whole rows when a row fits, else pieces of one row."""
    if L <= chunk:
        step = max(1, chunk // L)
        for b0 in range(0, B, step):
            yield b0, min(b0 + step, B), 0, L
    else:
        for b in range(B):
            for s0 in range(0, L, chunk):
                yield b, b + 1, s0, min(s0 + chunk, L)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """x [N, in] -> [N, out] (w, b already in x's dtype); on CUDA the tanh-GELU rides in the matmul's epilogue."""
    if gelu and x.is_cuda and b is not None:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    y = F.linear(x, w, b)
    return F.gelu(y, approximate="tanh") if gelu else y


def _stage_a(layer, wts: _LayerWeights, res, gate, vbuf, s0: int, s1: int, cd: torch.dtype) -> None:
    mixer = layer.mixer
    conv = mixer.short_filter
    K = conv.kernel_size[0]
    lo = max(s0 - (K - 1), 0)
    n1 = layer.norm1
    h = layer_norm_to(res[:, lo:s1], n1.weight, n1.bias, n1.eps, cd)  # [B, rows, d]
    B, rows, d = h.shape
    z = _linear(h.reshape(B * rows, d), wts.in_w, wts.in_b).view(B, rows, -1)  # [B, rows, 3d]
    short_conv_gate(z, conv.weight[:, 0, :], conv.bias, gate, vbuf, s0, s0 - lo)


def _stage_c(layer, wts: _LayerWeights, res, gate, b0: int, b1: int, s0: int, s1: int, cd: torch.dtype) -> None:
    """res[b0:b1, s0:s1] += out_proj(gate) + mlp(LN2(...)): the two residual adds ride in other passes.

    out_proj's product (no bias) goes into one fused pass that adds it and both biases to the residual
    and returns LN2 of the sum without fc2's bias; fc2's product is then accumulated into the float32
    residual by the matmul itself (beta = 1), so neither add is a pass of its own."""
    r = res[b0:b1, s0:s1]  # contiguous: whole rows, or a piece of one row
    nb, S, d = r.shape
    # The channel-major gate goes to a batched matmul as a transposed operand, without a copy.
    y = torch.bmm(gate[b0:b1, :, s0:s1].transpose(1, 2), wts.out_wt.expand(nb, -1, -1))
    n2 = layer.norm2
    h = add_layer_norm_(r, y, wts.out_b, wts.fc2_b, n2.weight, n2.bias, n2.eps, cd).view(nb * S, d)
    u = _linear(h, wts.fc1_w, wts.fc1_b, gelu=True)
    accumulate_matmul_(r.view(nb * S, d), u, wts.fc2_wt)
