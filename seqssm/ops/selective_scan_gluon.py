"""The selective scan kernel written in Gluon (Triton's explicit-layout dialect), for inference on CUDA.

Same computation, arguments and host code as the plain Triton kernel in
`seqssm.ops.selective_scan_triton` (which imports this module lazily and prefers it where Gluon is
available); both compute what `seqssm.ops.selective_scan.selective_scan_ref` defines.

Why Gluon. The sequential walk wants each thread to own a few states of one channel and every
position of a tile, so that stepping from one position to the next is a register rename. Plain
Triton chooses data layouts itself and spreads positions over lanes (they are contiguous in memory),
so picking one position's column out of a tile costs a masked reduction across lanes per step: about
31 instructions per (channel, state, position). Here the layout is written down:

- tiles are [BD channels, NP states, TT = 8 positions]; a thread holds NI = 4 states of one channel
  and the 8 positions (`size_per_thread [1, NI, TT]`), a channel's states lie on NL = NP / NI lanes;
- one position is pulled out of a tile by `split` of the in-thread axis (no data movement), the
  recurrence runs on [BD, NP] tensors, and the 8 states are joined back;
- the output's sum over states is in-thread over NI and across NL lanes (log2(NL) shuffles);
- the per-channel work (softplus of delta, delta * u, D * u, the z gate, the bf16 loads and the
  store) runs in a layout that spreads a channel's 8 positions over its NL lanes instead of repeating
  it in each, and reaches the state layout through shared memory;
- each tile's loads are issued one tile ahead of its use.

Measured on an H100 (8 x 512 channels x 131,072 positions, dstate 16, bf16, docs/BENCHMARKS.md):
11.2-11.4 ms, against 17.3-17.6 ms for the plain Triton kernel and 11.5 ms for mamba-ssm's CUDA kernel
in the same calls; batch 1 in 16-17 chunks 2.0-2.2 ms against 8.6 ms (mamba-ssm: 1.6 ms). exp2 and log2 use the approximate
special-function instructions (relative error ~1e-7, inside the float32 tests' 1e-5).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

POSITIONS = 8  # TT: positions per tile (16-byte loads of bf16); `_walk8` is written for 8
STATES_PER_THREAD = 4  # NI: 4 measured fastest of 2, 4, 8, 16 at dstate 16


@gluon.jit
def _ex2(x):
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _lg2(x):
    return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _unstack8(x):
    """[BD, NP, 8] -> its 8 positions as [BD, NP] tensors: splits of an in-thread axis, no data movement."""
    e, o = gl.split(gl.reshape(x, [x.shape[0], x.shape[1], 4, 2]))  # even and odd positions
    ee, eo = gl.split(gl.reshape(e, [x.shape[0], x.shape[1], 2, 2]))  # 0, 4 and 2, 6
    oe, oo = gl.split(gl.reshape(o, [x.shape[0], x.shape[1], 2, 2]))  # 1, 5 and 3, 7
    p0, p4 = gl.split(ee)
    p2, p6 = gl.split(eo)
    p1, p5 = gl.split(oe)
    p3, p7 = gl.split(oo)
    return p0, p1, p2, p3, p4, p5, p6, p7


@gluon.jit
def _stack8(p0, p1, p2, p3, p4, p5, p6, p7):
    """The inverse of `_unstack8`."""
    e = gl.reshape(gl.join(gl.join(p0, p4), gl.join(p2, p6)), [p0.shape[0], p0.shape[1], 4])
    o = gl.reshape(gl.join(gl.join(p1, p5), gl.join(p3, p7)), [p0.shape[0], p0.shape[1], 4])
    return gl.reshape(gl.join(e, o), [p0.shape[0], p0.shape[1], 8])


@gluon.jit
def _as(x, like):
    """x in like's layout: the same registers under the layout's other name (no data movement)."""
    return gl.convert_layout(x, like.type.layout, assert_trivial=True)


@gluon.jit
def _chain8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, h):
    """h <- a_i * h + b_i for i = 0..7 in this order; returns the 8 states."""
    h0 = _as(a0, h) * h + _as(b0, h)
    h1 = _as(a1, h) * h0 + _as(b1, h)
    h2 = _as(a2, h) * h1 + _as(b2, h)
    h3 = _as(a3, h) * h2 + _as(b3, h)
    h4 = _as(a4, h) * h3 + _as(b4, h)
    h5 = _as(a5, h) * h4 + _as(b5, h)
    h6 = _as(a6, h) * h5 + _as(b6, h)
    h7 = _as(a7, h) * h6 + _as(b7, h)
    return h0, h1, h2, h3, h4, h5, h6, h7


@gluon.jit
def _walk8(a, b, h, REVERSE: gl.constexpr):
    """h <- a[t] * h + b[t] for the tile's 8 positions in order (or reversed); returns (h at each position, last h)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = _unstack8(a)
    b0, b1, b2, b3, b4, b5, b6, b7 = _unstack8(b)
    if REVERSE:
        h7, h6, h5, h4, h3, h2, h1, h0 = _chain8(a7, a6, a5, a4, a3, a2, a1, a0, b7, b6, b5, b4, b3, b2, b1, b0, h)
        last = h0
    else:
        h0, h1, h2, h3, h4, h5, h6, h7 = _chain8(a0, a1, a2, a3, a4, a5, a6, a7, b0, b1, b2, b3, b4, b5, b6, b7, h)
        last = h7
    return _as(_stack8(h0, h1, h2, h3, h4, h5, h6, h7), a), last


@gluon.jit
def scan_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, h0_ptr, out_ptr, hT_ptr, dts_ptr,
                dim, N, L, nblk, nchunk,
                s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_b_b, s_b_n, s_b_l, s_c_b, s_c_n, s_c_l,
                s_z_b, s_z_d, s_z_l, s_o_b, s_o_d, s_o_l,
                NP: gl.constexpr, BD: gl.constexpr, TT: gl.constexpr, SOFTPLUS: gl.constexpr,
                HAS_D: gl.constexpr, HAS_Z: gl.constexpr, HAS_DTB: gl.constexpr, HAS_H0: gl.constexpr,
                STORE_LAST: gl.constexpr, REVERSE: gl.constexpr, STAGES: gl.constexpr,
                STORE_OUT: gl.constexpr, STORE_DTSUM: gl.constexpr, NI: gl.constexpr, WARPS: gl.constexpr):
    # program (channel block, batch row, chunk), as the plain Triton kernel; STAGES is unused (loads are
    # issued a tile ahead by hand). BD must be (32 // (NP // NI)) * WARPS and TT 8.
    NL: gl.constexpr = NP // NI
    L3: gl.constexpr = gl.BlockedLayout([1, NI, TT], [32 // NL, NL, 1], [WARPS, 1, 1], [2, 1, 0])
    LDT: gl.constexpr = gl.SliceLayout(1, L3)  # [BD, TT], each thread all TT positions of its channel
    LNT: gl.constexpr = gl.SliceLayout(0, L3)  # [NP, TT]
    LDN: gl.constexpr = gl.SliceLayout(2, L3)  # [BD, NP], the state
    LDX: gl.constexpr = gl.BlockedLayout([1, TT // NL], [32 // NL, NL], [WARPS, 1], [1, 0])  # [BD, TT] spread
    b = gl.program_id(1)
    c = gl.program_id(2)
    bc = b * nchunk + c
    d0 = gl.program_id(0) * BD
    d_dn = d0 + gl.arange(0, BD, layout=gl.SliceLayout(1, LDN))
    n_dn = gl.arange(0, NP, layout=gl.SliceLayout(0, LDN))
    mdn = (d_dn < dim)[:, None] & (n_dn < N)[None, :]  # padded states: A = 0, B = 0, so they stay 0
    A2 = gl.load(A_ptr + d_dn[:, None] * N + n_dn[None, :], mask=mdn, other=0.0).to(gl.float32) * 1.4426950408889634
    A3 = gl.expand_dims(A2, 2)  # exp(delta A) = exp2(delta A log2(e))
    if HAS_H0:
        h = gl.load(h0_ptr + (bc * dim + d_dn[:, None]) * N + n_dn[None, :], mask=mdn, other=0.0).to(gl.float32)
    else:
        h = gl.zeros([BD, NP], gl.float32, layout=LDN)
    d_dt = d0 + gl.arange(0, BD, layout=gl.SliceLayout(1, LDX))
    p_dt = gl.arange(0, TT, layout=gl.SliceLayout(0, LDX))
    md_dt = d_dt < dim
    if HAS_D:
        Dv = gl.load(D_ptr + d_dt, mask=md_dt, other=0.0).to(gl.float32)[:, None]
    if HAS_DTB:
        bias = gl.load(dtb_ptr + d_dt, mask=md_dt, other=0.0).to(gl.float32)[:, None]
    n_nt = gl.arange(0, NP, layout=gl.SliceLayout(1, LNT))
    p_nt = gl.arange(0, TT, layout=gl.SliceLayout(0, LNT))
    mn_nt = n_nt < N
    if STORE_DTSUM:
        dt_sum = gl.zeros([BD], gl.float32, layout=gl.SliceLayout(1, LDX))
    if REVERSE:
        t0 = (c * nblk + nblk - 1) * TT
    else:
        t0 = c * nblk * TT
    t_dt = t0 + p_dt
    m = md_dt[:, None] & (t_dt < L)[None, :]
    t_nt = t0 + p_nt
    mbt = mn_nt[:, None] & (t_nt < L)[None, :]
    dt_raw = gl.load(dt_ptr + b * s_dt_b + d_dt[:, None] * s_dt_d + t_dt[None, :] * s_dt_l, mask=m, other=0.0)
    u_raw = gl.load(u_ptr + b * s_u_b + d_dt[:, None] * s_u_d + t_dt[None, :] * s_u_l, mask=m, other=0.0)
    B_raw = gl.load(B_ptr + b * s_b_b + n_nt[:, None] * s_b_n + t_nt[None, :] * s_b_l, mask=mbt, other=0.0)
    if STORE_OUT:
        C_raw = gl.load(C_ptr + b * s_c_b + n_nt[:, None] * s_c_n + t_nt[None, :] * s_c_l, mask=mbt, other=0.0)
        if HAS_Z:
            z_raw = gl.load(z_ptr + b * s_z_b + d_dt[:, None] * s_z_d + t_dt[None, :] * s_z_l, mask=m, other=0.0)
    for i in range(0, nblk):
        # the next tile's loads (masked off after the last tile) go out before this tile's work
        if REVERSE:
            t1 = t0 - TT
        else:
            t1 = t0 + TT
        more = i + 1 < nblk
        t_dt1 = t1 + p_dt
        m1 = md_dt[:, None] & ((t_dt1 < L) & more)[None, :]
        t_nt1 = t1 + p_nt
        mbt1 = mn_nt[:, None] & ((t_nt1 < L) & more)[None, :]
        dt_nxt = gl.load(dt_ptr + b * s_dt_b + d_dt[:, None] * s_dt_d + t_dt1[None, :] * s_dt_l, mask=m1, other=0.0)
        u_nxt = gl.load(u_ptr + b * s_u_b + d_dt[:, None] * s_u_d + t_dt1[None, :] * s_u_l, mask=m1, other=0.0)
        B_nxt = gl.load(B_ptr + b * s_b_b + n_nt[:, None] * s_b_n + t_nt1[None, :] * s_b_l, mask=mbt1, other=0.0)
        if STORE_OUT:
            C_nxt = gl.load(C_ptr + b * s_c_b + n_nt[:, None] * s_c_n + t_nt1[None, :] * s_c_l, mask=mbt1,
                            other=0.0)
            if HAS_Z:
                z_nxt = gl.load(z_ptr + b * s_z_b + d_dt[:, None] * s_z_d + t_dt1[None, :] * s_z_l, mask=m1,
                                other=0.0)
        dt = dt_raw.to(gl.float32)
        if HAS_DTB:
            dt = dt + bias
        if SOFTPLUS:  # log(1 + e^x), and x itself above 20 (torch's threshold)
            sp = _lg2(1.0 + _ex2(dt * 1.4426950408889634)) * 0.6931471805599453
            dt = gl.where(dt <= 20.0, sp, dt)
        dt = gl.where(m, dt, 0.0)  # positions past the end: decay 1, input 0 (the state passes unchanged)
        if STORE_DTSUM:
            dt_sum += gl.sum(dt, axis=1)
        u = u_raw.to(gl.float32)
        a3 = _ex2(gl.expand_dims(gl.convert_layout(dt, LDT), 1) * A3)  # [BD, NP, TT]: exp(delta A)
        b3 = gl.expand_dims(gl.convert_layout(dt * u, LDT), 1) * gl.expand_dims(B_raw.to(gl.float32), 0)
        hs, h = _walk8(a3, b3, h, REVERSE)
        if STORE_OUT:
            y = gl.convert_layout(gl.sum(hs * gl.expand_dims(C_raw.to(gl.float32), 0), axis=1), LDX)
            if HAS_D:
                y = y + Dv * u
            if HAS_Z:
                z = z_raw.to(gl.float32)
                y = y * (z / (1.0 + _ex2(-1.4426950408889634 * z)))
            gl.store(out_ptr + b * s_o_b + d_dt[:, None] * s_o_d + t_dt[None, :] * s_o_l,
                     y.to(out_ptr.dtype.element_ty), mask=m)
            C_raw = C_nxt
            if HAS_Z:
                z_raw = z_nxt
        dt_raw = dt_nxt
        u_raw = u_nxt
        B_raw = B_nxt
        t0 = t1
        t_dt = t_dt1
        m = m1
    if STORE_LAST:
        gl.store(hT_ptr + (bc * dim + d_dn[:, None]) * N + n_dn[None, :], h, mask=mdn)
    if STORE_DTSUM:
        gl.store(dts_ptr + bc * dim + d_dt, dt_sum, mask=md_dt)
