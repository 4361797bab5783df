"""Fused elementwise passes of the lean HyenaDNA forward (models/hyena_lean.py), each beside its twin.

At a million tokens the lean forward is bound by memory traffic; in plain PyTorch each of these
steps is three to six passes over a [tokens, channels] tensor, several of them through strided
(transposing) kernels. On CUDA each is one Triton kernel that reads its inputs once and writes its
outputs once; elsewhere, and whenever Triton is missing, the torch twin runs.

    short_conv_gate   z [B, S+K-1, 3d] -> depthwise causal conv (K taps) -> x0 | x1 | v;
                      gate[:, :, s0:s0+S] = x0 and vbuf[:, :, s0:s0+S] = v * x1 (channel-major)
    fft_epilogue      gate = (y[..., :L] + D * x) * gate   (after the inverse transform)
    layer_norm_to     LayerNorm of float32 rows, written in the compute dtype
    add_layer_norm_   r <- r + y + b_in, h = LayerNorm(r) in the compute dtype, r <- r + b_out
                      (a residual add, the next norm, and the next residual branch's bias in one pass)
    accumulate_matmul_  out += a @ b in out's (float32) precision, inside the matmul (no add pass)
    hyena_filter_into rows of the implicit long filter, k[c, t] = (W[c] . f[t]) (exp(-t |a_c|) + shift),
                      written straight into a zero-padded transform buffer
    packed_spectral_product_
                      the middle of a real FFT convolution done with half-length complex FFTs:
                      spectrum of x from the FFT of its packed pairs, times the filter's spectrum,
                      packed again for the inverse (see its docstring), in place
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def use_triton(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors) and _kernels() is not None


# ------------------------------------------------------------------------------------------------
# torch twins (the definitions)


def short_conv_gate_ref(z, w, bias, gate, vbuf, s0: int, ctx: int) -> None:
    """z holds rows for times s0-ctx .. s0+S-1 (ctx <= K-1 rows of left context; fewer only at the
    sequence start, where the missing inputs are zeros). w [3d, K], bias [3d] or None."""
    B, rows, three_d = z.shape
    d = three_d // 3
    K = w.shape[1]
    S = rows - ctx
    wide = vbuf.dtype
    zz = z.to(wide)
    if ctx < K - 1:
        zz = F.pad(zz, (0, 0, K - 1 - ctx, 0))
    ww = w.to(wide)
    zc = zz[:, 0:S] * ww[:, 0]
    for j in range(1, K):
        zc = zc + zz[:, j : j + S] * ww[:, j]
    if bias is not None:
        zc = zc + bias.to(wide)
    x0, x1, v = zc.split(d, dim=-1)
    gate[:, :, s0 : s0 + S] = x0.transpose(1, 2)
    vbuf[:, :, s0 : s0 + S] = (v * x1).transpose(1, 2)


def fft_epilogue_ref(y, x, gate, D) -> None:
    """y [B, C, >=L] (inverse transform), x [B, C, L] (its input), gate [B, C, L] (overwritten)."""
    L = gate.shape[-1]
    out = (y[..., :L] + x * D[:, None].to(x.dtype)) * gate.to(x.dtype)
    gate.copy_(out)


def hyena_filter_into_ref(out, feats, w, t, deltas, shift: float, scale: float = 1.0) -> None:
    """out[:, :L] = scale (w @ feats.T) (exp(-t |deltas|) + shift); feats [L, F], w [c, F], t [L], deltas [c]."""
    L = feats.shape[0]
    k = w.to(feats.dtype) @ feats.T
    out[:, :L] = k * (torch.exp(-t[None, :].to(feats.dtype) * deltas[:, None].abs().to(feats.dtype)) + shift) * scale


def layer_norm_to_ref(x, weight, bias, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps).to(dtype)


def add_layer_norm_ref(r, y, b_in, b_out, weight, bias, eps: float, dtype: torch.dtype) -> torch.Tensor:
    s = r + y.to(r.dtype) + b_in.to(r.dtype)
    h = F.layer_norm(s, s.shape[-1:], weight.to(r.dtype), bias.to(r.dtype), eps).to(dtype)
    r.copy_(s + b_out.to(r.dtype))
    return h


@functools.lru_cache(maxsize=16)
def _twiddles(n: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """exp(-2 pi i k / n) for k < count, computed in float64."""
    k = torch.arange(count, dtype=torch.float64)
    return torch.polar(torch.ones_like(k), -2 * torch.pi * k / n).to(device=device, dtype=dtype)


def real_spectrum_from_packed(Z: torch.Tensor, n: int) -> torch.Tensor:
    """rfft(x, n) [..., n/2 + 1] from Z = fft(x[..., 0::2] + i x[..., 1::2]) [..., n/2] (x real, length n).

    X[k] = E[k] + w^k O[k] (k = 0..M, M = n/2), where E = (Z[k] + conj Z[M-k]) / 2 and
    O = (Z[k] - conj Z[M-k]) / 2i are the transforms of the even and odd samples, w = exp(-2 pi i / n),
    indices mod M."""
    M = n // 2
    k = torch.arange(M, device=Z.device)
    w = _twiddles(n, M, Z.dtype, Z.device)
    Zm = Z[..., (-k) % M].conj()
    E, O = (Z + Zm) / 2, (Z - Zm) / 2j
    return torch.cat([E + w * O, E[..., :1] - O[..., :1]], dim=-1)


def packed_spectral_product_ref(Z: torch.Tensor, K: torch.Tensor, n: int) -> torch.Tensor:
    """One real FFT convolution's spectral step, in the packed form of two half-length complex FFTs.

    Z = fft(x[..., 0::2] + i x[..., 1::2]) [..., C, M] (M = n / 2) for real rows x of length n; the
    filter's spectrum K is either rfft(filter, n) / n [C, M+1] or, in the same packed form as Z, the
    FFT of the scaled filter's pairs [C, M]. With X = real_spectrum_from_packed(Z) and Y = X K, the
    result Z' [..., C, M] = (Y[k] + conj Y[M-k]) + i w^-k (Y[k] - conj Y[M-k]) satisfies
    ifft(Z', norm="forward") = y[2m] + i y[2m+1] for y = irfft(Y, n, norm="forward"): the real
    convolution without cuFFT's real-to-complex pre- and post-processing passes, and without the copy
    torch makes of every complex-to-real input.
    """
    M = n // 2
    if K.shape[-1] == M:
        K = real_spectrum_from_packed(K, n)
    k = torch.arange(M, device=Z.device)
    w = _twiddles(n, M, Z.dtype, Z.device)
    Y = real_spectrum_from_packed(Z, n) * K
    Ym = Y[..., M - k].conj()
    return (Y[..., :M] + Ym) + 1j * w.conj() * (Y[..., :M] - Ym)


# ------------------------------------------------------------------------------------------------
# dispatch


def short_conv_gate(z, w, bias, gate, vbuf, s0: int, ctx: int) -> None:
    if not use_triton(z, gate, vbuf) or vbuf.dtype != torch.float32:
        return short_conv_gate_ref(z, w, bias, gate, vbuf, s0, ctx)
    k = _kernels()
    B, rows, three_d = z.shape
    d = three_d // 3
    K = w.shape[1]
    S = rows - ctx
    z = z.contiguous()
    w = w.float().contiguous()
    b = (bias if bias is not None else torch.zeros(three_d, device=z.device)).float().contiguous()
    BT, BC = 64, 64
    grid = (triton_cdiv(S, BT), triton_cdiv(d, BC), B)
    k.short_conv_gate_kernel[grid](
        z, w, b, gate, vbuf, S, d, ctx, s0,
        z.stride(0), z.stride(1), gate.stride(0), gate.stride(1), vbuf.stride(0), vbuf.stride(1),
        K=K, BT=BT, BC=BC, num_warps=4,
    )


def fft_epilogue(y, x, gate, D) -> None:
    if not use_triton(y, x, gate) or y.stride(-1) != 1 or x.stride(-1) != 1 or gate.stride(-1) != 1:
        return fft_epilogue_ref(y, x, gate, D)
    k = _kernels()
    B, C, L = gate.shape
    BLK = 1024
    grid = (triton_cdiv(L, BLK), C, B)
    k.fft_epilogue_kernel[grid](
        y, x, gate, D.float().contiguous(), L,
        y.stride(0), y.stride(1), x.stride(0), x.stride(1), gate.stride(0), gate.stride(1),
        BLK=BLK, num_warps=4,
    )


def layer_norm_to(x, weight, bias, eps: float, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of a float32 [B, S, d] tensor (any strides with unit last).
    out: where to write (shaped like x, unit last stride; may be x itself: each row is read before written)."""
    if (not use_triton(x) or x.dtype != torch.float32 or x.stride(-1) != 1 or x.dim() != 3
            or (out is not None and out.stride(-1) != 1)):
        y = layer_norm_to_ref(x, weight, bias, eps, dtype)
        return y if out is None else out.copy_(y)
    k = _kernels()
    B, S, d = x.shape
    if out is None:
        out = torch.empty(B, S, d, device=x.device, dtype=dtype)
    BD = 1 << (d - 1).bit_length()
    ROWS = 8
    grid = (triton_cdiv(S, ROWS), B)
    k.layer_norm_kernel[grid](
        x, weight.float().contiguous(), bias.float().contiguous(), out, S, d, eps,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BD=BD, ROWS=ROWS, num_warps=4,
    )
    return out


def add_layer_norm_(r, y, b_in, b_out, weight, bias, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """r [..., d] float32 updated in place; y [..., d] any float dtype; returns LayerNorm(r + y + b_in) in dtype."""
    if (not use_triton(r, y) or r.dtype != torch.float32 or not r.is_contiguous() or not y.is_contiguous()
            or y.shape != r.shape):
        return add_layer_norm_ref(r, y, b_in, b_out, weight, bias, eps, dtype)
    k = _kernels()
    d = r.shape[-1]
    N = r.numel() // d
    out = torch.empty(r.shape, device=r.device, dtype=dtype)
    BD = 1 << (d - 1).bit_length()
    ROWS = 8
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    k.add_layer_norm_kernel[(triton_cdiv(N, ROWS),)](
        r, y, f32(b_in), f32(b_out), f32(weight), f32(bias), out, N, d, eps, BD=BD, ROWS=ROWS, num_warps=4,
    )
    return out


_ADDMM_OUT_DTYPE = [True]  # torch.addmm(..., out_dtype=) works here (a CUDA-only overload of recent torch)


def accumulate_matmul_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out [N, n] += a [N, k] @ b [k, n], accumulated at out's precision; a and b may be narrower (bf16)."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b)
    if out.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # no mixed-precision addmm in this torch: one add pass instead
            _ADDMM_OUT_DTYPE[0] = False
    return out.add_(a @ b)


def hyena_filter_into(out, feats, w, t, deltas, shift: float, scale: float = 1.0) -> None:
    """Float32 only; the dot is split into three TF32 products (float32 accuracy, tensor-core speed)."""
    if not use_triton(out, feats) or feats.dtype != torch.float32 or out.stride(-1) != 1:
        return hyena_filter_into_ref(out, feats, w, t, deltas, shift, scale)
    k = _kernels()
    L, Fo = feats.shape
    C = w.shape[0]
    BF = max(16, 1 << (Fo - 1).bit_length())
    BT, BC = 128, max(16, min(64, 1 << (C - 1).bit_length()))  # one channel block per group when it fits
    grid = (triton_cdiv(L, BT), triton_cdiv(C, BC))
    k.filter_kernel[grid](
        out, feats.contiguous(), w.float().contiguous(), t.float().contiguous(), deltas.float().contiguous(),
        float(shift), float(scale), L, C, Fo, out.stride(0), BF=BF, BT=BT, BC=BC, num_warps=4,
    )


def packed_spectral_product_(Z: torch.Tensor, K: torch.Tensor, n: int, *, block: int = 1024,
                             warps: int = 4) -> torch.Tensor:
    """Z <- packed_spectral_product_ref(Z, K, n), in place. Z: contiguous complex64 [..., C, M];
    K: complex64 [C, M+1] (rfft form) or [C, M] (packed form), unit last stride.
    block, warps: the Triton launch (frequencies and warps per program)."""
    M = n // 2
    C = K.shape[0]
    ok = (Z.dtype == torch.complex64 and K.dtype == torch.complex64 and Z.is_contiguous() and K.stride(-1) == 1
          and Z.shape[-1] == M and Z.shape[-2] == C and K.shape[-1] in (M, M + 1))
    if not ok or not use_triton(Z, K):
        return Z.copy_(packed_spectral_product_ref(Z, K, n))
    k = _kernels()
    half = M // 2
    R = Z.numel() // M
    w = torch.view_as_real(_twiddles(n, half + 1, Z.dtype, Z.device))
    grid = (R, triton_cdiv(half + 1, block))
    k.packed_product_kernel[grid](torch.view_as_real(Z), torch.view_as_real(K), w, M, half, C, 2 * K.stride(0),
                                  BLK=block, KPACKED=K.shape[-1] == M, num_warps=warps)
    return Z


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except Exception:  # no triton here: the torch twins run
        return None

    @triton.jit
    def short_conv_gate_kernel(z_ptr, w_ptr, b_ptr, g_ptr, v_ptr, S, d, ctx, s0,
                               szb, szt, sgb, sgc, svb, svc,
                               K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        t = pid_t * BT + tl.arange(0, BT)
        c = pid_c * BC + tl.arange(0, BC)
        tm = t < S
        cm = c < d
        m = tm[:, None] & cm[None, :]
        zb = z_ptr + b * szb
        acc0 = tl.zeros((BT, BC), dtype=tl.float32) + tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
        acc1 = tl.zeros((BT, BC), dtype=tl.float32) + tl.load(b_ptr + d + c, mask=cm, other=0.0)[None, :]
        acc2 = tl.zeros((BT, BC), dtype=tl.float32) + tl.load(b_ptr + 2 * d + c, mask=cm, other=0.0)[None, :]
        for j in tl.static_range(K):
            row = t - (K - 1) + j + ctx  # row of z holding input time t - (K-1) + j
            rm = m & (row >= 0)[:, None]
            off = row.to(tl.int64)[:, None] * szt + c[None, :]
            z0 = tl.load(zb + off, mask=rm, other=0.0).to(tl.float32)
            z1 = tl.load(zb + off + d, mask=rm, other=0.0).to(tl.float32)
            z2 = tl.load(zb + off + 2 * d, mask=rm, other=0.0).to(tl.float32)
            acc0 += z0 * tl.load(w_ptr + c * K + j, mask=cm, other=0.0)[None, :]
            acc1 += z1 * tl.load(w_ptr + (d + c) * K + j, mask=cm, other=0.0)[None, :]
            acc2 += z2 * tl.load(w_ptr + (2 * d + c) * K + j, mask=cm, other=0.0)[None, :]
        tt = (s0 + t).to(tl.int64)[:, None]
        cc = c.to(tl.int64)[None, :]
        tl.store(g_ptr + b * sgb + cc * sgc + tt, acc0.to(g_ptr.dtype.element_ty), mask=m)
        tl.store(v_ptr + b * svb + cc * svc + tt, acc2 * acc1, mask=m)

    @triton.jit
    def fft_epilogue_kernel(y_ptr, x_ptr, g_ptr, d_ptr, L, syb, syc, sxb, sxc, sgb, sgc, BLK: tl.constexpr):
        pid = tl.program_id(0)
        c = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        t = pid * BLK + tl.arange(0, BLK)
        m = t < L
        y = tl.load(y_ptr + b * syb + c * syc + t, mask=m, other=0.0)
        x = tl.load(x_ptr + b * sxb + c * sxc + t, mask=m, other=0.0)
        gp = g_ptr + b * sgb + c * sgc + t
        g = tl.load(gp, mask=m, other=0.0).to(tl.float32)
        dd = tl.load(d_ptr + c)
        tl.store(gp, ((y + dd * x) * g).to(g_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def layer_norm_kernel(x_ptr, w_ptr, b_ptr, o_ptr, S, d, eps, sxb, sxs, sob, sos,
                          BD: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        r = pid * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BD)
        rm = r < S
        cm = c < d
        m = rm[:, None] & cm[None, :]
        x = tl.load(x_ptr + b * sxb + r.to(tl.int64)[:, None] * sxs + c[None, :], mask=m, other=0.0)
        mean = tl.sum(x, axis=1) / d
        xc = tl.where(m, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / d
        inv = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + c, mask=cm, other=0.0)
        bb = tl.load(b_ptr + c, mask=cm, other=0.0)
        y = xc * inv[:, None] * w[None, :] + bb[None, :]
        tl.store(o_ptr + b * sob + r.to(tl.int64)[:, None] * sos + c[None, :], y.to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def add_layer_norm_kernel(r_ptr, y_ptr, bi_ptr, bo_ptr, w_ptr, b_ptr, o_ptr, N, d, eps,
                              BD: tl.constexpr, ROWS: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BD)
        cm = c < d
        m = (r < N)[:, None] & cm[None, :]
        off = r.to(tl.int64)[:, None] * d + c[None, :]
        s = tl.load(r_ptr + off, mask=m, other=0.0) + tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
        s += tl.load(bi_ptr + c, mask=cm, other=0.0)[None, :]
        s = tl.where(m, s, 0.0)
        mean = tl.sum(s, axis=1) / d
        sc = tl.where(m, s - mean[:, None], 0.0)
        inv = 1.0 / tl.sqrt(tl.sum(sc * sc, axis=1) / d + eps)
        h = sc * inv[:, None] * tl.load(w_ptr + c, mask=cm, other=0.0)[None, :] + tl.load(b_ptr + c, mask=cm, other=0.0)[None, :]
        tl.store(o_ptr + off, h.to(o_ptr.dtype.element_ty), mask=m)
        tl.store(r_ptr + off, s + tl.load(bo_ptr + c, mask=cm, other=0.0)[None, :], mask=m)

    @triton.jit
    def filter_kernel(o_ptr, f_ptr, w_ptr, t_ptr, a_ptr, shift, scale, L, C, Fo, so,
                      BF: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        t = pid_t * BT + tl.arange(0, BT)
        c = pid_c * BC + tl.arange(0, BC)
        j = tl.arange(0, BF)
        tm = t < L
        cm = c < C
        jm = j < Fo
        f = tl.load(f_ptr + t.to(tl.int64)[:, None] * Fo + j[None, :], mask=tm[:, None] & jm[None, :], other=0.0)
        w = tl.load(w_ptr + c[:, None] * Fo + j[None, :], mask=cm[:, None] & jm[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(f), input_precision="tf32x3")  # [BC, BT]; float32-accurate
        tt = tl.load(t_ptr + t, mask=tm, other=0.0)
        a = tl.abs(tl.load(a_ptr + c, mask=cm, other=0.0))
        win = (tl.exp(-tt[None, :] * a[:, None]) + shift) * scale
        tl.store(o_ptr + c.to(tl.int64)[:, None] * so + t[None, :], acc * win, mask=cm[:, None] & tm[None, :])

    @triton.jit
    def unpack_pair(a_re, a_im, b_re, b_im, w_re, w_im):
        # From a packed transform's Z[j] = a and Z[M-j] = b: X[j] = E + w^j O and X[M-j] = conj(E - w^j O),
        # with E = (a + conj b) / 2 and O = (a - conj b) / 2i (real_spectrum_from_packed, pairwise).
        e_re = (a_re + b_re) * 0.5
        e_im = (a_im - b_im) * 0.5
        o_re = (a_im + b_im) * 0.5
        o_im = (b_re - a_re) * 0.5
        wo_re = w_re * o_re - w_im * o_im
        wo_im = w_re * o_im + w_im * o_re
        return e_re + wo_re, e_im + wo_im, e_re - wo_re, wo_im - e_im

    @triton.jit
    def packed_product_kernel(z_ptr, k_ptr, w_ptr, M, half, C, skc, BLK: tl.constexpr, KPACKED: tl.constexpr):
        # One row r, frequencies j = 0..half and their mirrors M - j: each program reads and writes
        # only its own pairs, so the update is in place. Complex numbers are (re, im) float pairs,
        # loaded and stored as [BLK, 2] tiles (one 8-byte access each) and split into parts.
        r = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1) * BLK + tl.arange(0, BLK)
        m = j <= half
        m2 = m[:, None]
        ri = tl.arange(0, 2)[None, :]
        zr = z_ptr + r * 2 * M
        kr = k_ptr + (r % C) * skc
        jz = tl.where(j == 0, 0, M - j)  # Z's mirror index (mod M)
        jk = M - j  # K's mirror index (K has M + 1 entries)
        a_re, a_im = tl.split(tl.load(zr + 2 * j[:, None] + ri, mask=m2, other=0.0))
        b_re, b_im = tl.split(tl.load(zr + 2 * jz[:, None] + ri, mask=m2, other=0.0))
        w_re, w_im = tl.split(tl.load(w_ptr + 2 * j[:, None] + ri, mask=m2, other=0.0))
        if KPACKED:  # the filter's spectrum from its packed transform, exactly as X from Z
            p_re, p_im = tl.split(tl.load(kr + 2 * j[:, None] + ri, mask=m2, other=0.0))
            q_re, q_im = tl.split(tl.load(kr + 2 * jz[:, None] + ri, mask=m2, other=0.0))
            kk_re, kk_im, km_re, km_im = unpack_pair(p_re, p_im, q_re, q_im, w_re, w_im)
        else:
            kk_re, kk_im = tl.split(tl.load(kr + 2 * j[:, None] + ri, mask=m2, other=0.0))
            km_re, km_im = tl.split(tl.load(kr + 2 * jk[:, None] + ri, mask=m2, other=0.0))
        xk_re, xk_im, xm_re, xm_im = unpack_pair(a_re, a_im, b_re, b_im, w_re, w_im)
        yk_re = xk_re * kk_re - xk_im * kk_im
        yk_im = xk_re * kk_im + xk_im * kk_re
        ym_re = xm_re * km_re - xm_im * km_im
        ym_im = xm_re * km_im + xm_im * km_re
        # Z'[j] = s + i conj(w^j) d,  s = Y[j] + conj Y[M-j],  d = Y[j] - conj Y[M-j]
        s_re = yk_re + ym_re
        s_im = yk_im - ym_im
        d_re = yk_re - ym_re
        d_im = yk_im + ym_im
        zk = tl.join(s_re + w_im * d_re - w_re * d_im, s_im + w_im * d_im + w_re * d_re)
        tl.store(zr + 2 * j[:, None] + ri, zk, mask=m2)
        # Z'[M-j] = conj(s) - i w^j (-conj d) = conj(s) + i w^j conj(d)
        zm = tl.join(s_re - w_im * d_re + w_re * d_im, -s_im + w_re * d_re + w_im * d_im)
        tl.store(zr + 2 * jk[:, None] + ri, zm, mask=m2 & (j > 0)[:, None])

    class K:
        pass

    k = K()
    k.filter_kernel = filter_kernel
    k.short_conv_gate_kernel = short_conv_gate_kernel
    k.fft_epilogue_kernel = fft_epilogue_kernel
    k.layer_norm_kernel = layer_norm_kernel
    k.packed_product_kernel = packed_product_kernel
    k.add_layer_norm_kernel = add_layer_norm_kernel
    return k
