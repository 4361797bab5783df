"""The selective scan as one Triton kernel (inference, CUDA): Mamba on a GPU without mamba-ssm.

Computes exactly what `seqssm.ops.selective_scan.selective_scan_ref` defines (see there for the
recurrence and the shapes), forward only, with two things mamba-ssm's kernel lacks: an initial
state, and `reverse=True` (the recurrence run from the last position to the first, i.e. the scan of
the flipped inputs, flipped back, without materialising a flip).

How it works. One program owns a batch row and BD channels, holds their [BD, dstate] state in
registers in float32, and walks the sequence TT positions at a time: it loads a [BD, TT] tile of
delta, u (and z) and a [dstate, TT] tile of B and C, then runs the TT steps of the recurrence one
after another, picking each position's column out of the tiles. A sequential walk has nothing to
combine between threads and computes exp(delta * A) once per (position, channel, state), which a
parallel prefix scan cannot avoid either. The grid (batch x channel blocks) is wide enough at batch
8, d_inner 512 (8 x 128 programs); for small batches each program takes fewer channels, and where
even one channel per program leaves the GPU short of programs (batch 1), the sequence is cut into
chunks scanned side by side, at twice the arithmetic (`chunks`). Measured on an H100 at d_inner 512,
dstate 16, 131,072 positions, bf16: batch 8 15.8-17.8 ms, against 11.6 ms for mamba-ssm's kernel and
~2.6 s for the chunked torch scan on the same GPU; batch 1 8.6 ms in 16 chunks, 13.2 ms in one
(docs/BENCHMARKS.md).

Where Triton has Gluon (its explicit-layout dialect; Triton 3.6), the same recurrence runs in the
kernel of `seqssm.ops.selective_scan_gluon` instead, which fixes the data layout so that stepping
between positions is a register rename: 11.2-11.4 ms at batch 8 (1.55x faster than this file's
kernel, on par with mamba-ssm's 11.5 ms) and 2.0-2.2 ms at batch 1. This file's kernel stays as the fallback for
Triton without Gluon and for dstate above 128; `kernel="triton"` / `"gluon"` picks one explicitly.

No backward: `selective_scan` uses it only when no gradient is needed (training without mamba-ssm
takes the torch path). B and C must be per position with one group ([batch, dstate, L]), as in Mamba.
"""

from __future__ import annotations

import functools

import torch

# Tile sizes of the H100 sweep: 4 channels x 16 positions per program, one warp, loads for 3 tiles in
# flight; fewer channels per program when the grid would leave streaming multiprocessors idle.
BLOCK_CHANNELS = 4
BLOCK_POSITIONS = 16
PROGRAMS_PER_SM = 4
CHUNK_PROGRAMS_PER_SM = 64  # below this many one-channel programs per multiprocessor, cut the sequence
MIN_CHUNK = 2048  # positions per chunk at least
NUM_WARPS = 1
NUM_STAGES = 3
GLUON_UNCHUNKED_WARPS_PER_SM = 2
GLUON_WARPS_PER_SM = 8


@functools.cache
def _kernel():
    """The jitted kernel, or None where Triton is missing (imported on first use only)."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def scan_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, h0_ptr, out_ptr, hT_ptr, dts_ptr,
                    dim, N, L, nblk, nchunk,
                    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_b_b, s_b_n, s_b_l, s_c_b, s_c_n, s_c_l,
                    s_z_b, s_z_d, s_z_l, s_o_b, s_o_d, s_o_l,
                    NP: tl.constexpr, BD: tl.constexpr, TT: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, HAS_H0: tl.constexpr,
                    STORE_LAST: tl.constexpr, REVERSE: tl.constexpr, STAGES: tl.constexpr,
                    STORE_OUT: tl.constexpr, STORE_DTSUM: tl.constexpr):
        # program (channel block, batch row, chunk): chunk c covers positions [c, c + 1) * nblk * TT
        b = tl.program_id(1)
        c = tl.program_id(2)
        bc = b * nchunk + c  # index of this (row, chunk) in the per-chunk states
        d = tl.program_id(0) * BD + tl.arange(0, BD)
        n = tl.arange(0, NP)  # dstate padded to a power of two; padded states stay 0 (A = 0, B = 0)
        md = d < dim
        mn = n < N
        mdn = md[:, None] & mn[None, :]
        # exp(delta A) = exp2(delta A log2(e))
        A2 = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0).to(tl.float32) * 1.4426950408889634
        if HAS_H0:
            h = tl.load(h0_ptr + (bc * dim + d[:, None]) * N + n[None, :], mask=mdn, other=0.0).to(tl.float32)
        else:
            h = tl.zeros((BD, NP), dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
        if HAS_DTB:
            bias = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
        pos = tl.arange(0, TT)
        if STORE_DTSUM:
            dt_sum = tl.zeros((BD,), dtype=tl.float32)
        for i in tl.range(0, nblk, num_stages=STAGES):
            if REVERSE:
                t0 = (c * nblk + nblk - 1 - i) * TT
            else:
                t0 = (c * nblk + i) * TT
            t = t0 + pos
            mt = t < L
            m = md[:, None] & mt[None, :]
            dt = tl.load(dt_ptr + b * s_dt_b + d[:, None] * s_dt_d + t[None, :] * s_dt_l, mask=m, other=0.0)
            dt = dt.to(tl.float32)
            if HAS_DTB:
                dt = dt + bias[:, None]
            if SOFTPLUS:  # torch's softplus (threshold 20)
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            dt = tl.where(m, dt, 0.0)  # positions past the end: decay 1, input 0 (the state passes unchanged)
            if STORE_DTSUM:
                dt_sum += tl.sum(dt, axis=1)
            u = tl.load(u_ptr + b * s_u_b + d[:, None] * s_u_d + t[None, :] * s_u_l, mask=m, other=0.0)
            u = u.to(tl.float32)
            mbt = mn[:, None] & mt[None, :]
            Bt = tl.load(B_ptr + b * s_b_b + n[:, None] * s_b_n + t[None, :] * s_b_l, mask=mbt, other=0.0)
            Ct = tl.load(C_ptr + b * s_c_b + n[:, None] * s_c_n + t[None, :] * s_c_l, mask=mbt, other=0.0)
            Bt = Bt.to(tl.float32)
            Ct = Ct.to(tl.float32)
            dtu = dt * u
            y = tl.zeros((BD, TT), dtype=tl.float32)
            for j in tl.static_range(TT):
                if REVERSE:
                    k = TT - 1 - j
                else:
                    k = j
                at_k = pos[None, :] == k  # position k's column of each tile (a Triton tensor has no indexing)
                dk = tl.sum(tl.where(at_k, dt, 0.0), axis=1)
                xk = tl.sum(tl.where(at_k, dtu, 0.0), axis=1)
                bk = tl.sum(tl.where(at_k, Bt, 0.0), axis=1)
                ck = tl.sum(tl.where(at_k, Ct, 0.0), axis=1)
                h = tl.exp2(dk[:, None] * A2) * h + xk[:, None] * bk[None, :]
                if STORE_OUT:
                    yk = tl.sum(h * ck[None, :], axis=1)
                    y = tl.where(at_k, yk[:, None], y)
            if STORE_OUT:
                if HAS_D:
                    y = y + Dv[:, None] * u
                if HAS_Z:
                    z = tl.load(z_ptr + b * s_z_b + d[:, None] * s_z_d + t[None, :] * s_z_l, mask=m, other=0.0)
                    z = z.to(tl.float32)
                    y = y * (z / (1.0 + tl.exp(-z)))
                tl.store(out_ptr + b * s_o_b + d[:, None] * s_o_d + t[None, :] * s_o_l,
                         y.to(out_ptr.dtype.element_ty), mask=m)
        if STORE_LAST:
            tl.store(hT_ptr + (bc * dim + d[:, None]) * N + n[None, :], h, mask=mdn)
        if STORE_DTSUM:
            tl.store(dts_ptr + bc * dim + d, dt_sum, mask=md)

    return scan_kernel


@functools.cache
def _gluon_kernel():
    """The Gluon kernel, or None where Triton has no Gluon (or a Gluon this code does not compile with)."""
    try:
        from seqssm.ops.selective_scan_gluon import scan_kernel
    except Exception:
        return None
    return scan_kernel


def triton_scan_available() -> bool:
    """True where this kernel can run: a CUDA device and an importable Triton."""
    return torch.cuda.is_available() and _kernel() is not None


def fits_triton_scan(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *others) -> bool:
    """Inputs this kernel takes: CUDA tensors, real A, B and C per position with one group, and
    offsets that fit in 32 bits (the kernel's pointer arithmetic; batch 2 x 512 channels x 4M
    positions does not: the torch path takes those)."""
    return (u.is_cuda and not A.is_complex() and B.dim() == 3 and C.dim() == 3
            and B.shape[0] == u.shape[0] and C.shape[0] == u.shape[0]
            and _offsets_fit(u, B, C, *(t for t in others if t is not None)))


def _offsets_fit(*tensors: torch.Tensor) -> bool:
    return all(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) < 2**31 for t in tensors)


def _block_channels(batch: int, dim: int, device) -> int:
    want = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    bd = BLOCK_CHANNELS
    while bd > 1 and batch * -(-dim // bd) < want:
        bd //= 2
    return bd


def _chunks(batch: int, dim: int, L: int, bd: int, device) -> int:
    """Sequence chunks to scan side by side: 1 unless even one channel per program leaves the GPU
    short of programs (batch 1, say), where a walk of the whole length would be the bottleneck."""
    if bd > 1:
        return 1
    want = CHUNK_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch * dim
    if programs >= want:
        return 1
    return max(1, min(-(-want // programs), L // MIN_CHUNK))


def gluon_fills_gpu(batch: int, dim: int, dstate: int, device) -> bool:
    """Whether one Gluon scan of this shape fills the GPU, i.e. runs unchunked (see _gluon_chunks):
    where it does not, a second scan can run beside it (BiMambaWrapper's two directions on two streams)."""
    from seqssm.ops.selective_scan_gluon import STATES_PER_THREAD

    NP = 1 << max(0, (dstate - 1).bit_length())
    channels_per_warp = 32 // (NP // min(STATES_PER_THREAD, NP))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return batch * -(-dim // channels_per_warp) >= GLUON_UNCHUNKED_WARPS_PER_SM * sms


def _gluon_chunks(warps: int, L: int, device) -> int:
    """The Gluon kernel's chunks: none from 2 one-warp programs per multiprocessor up (batch 8 x 512
    channels: 512 warps, fastest unchunked on the H100), else enough for about 8 (batch 1 x 512: 17;
    16 measured fastest of 8, 16, 24 and 32)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if warps >= GLUON_UNCHUNKED_WARPS_PER_SM * sms:
        return 1
    return max(1, min(-(-GLUON_WARPS_PER_SM * sms // warps), L // MIN_CHUNK))


# Eager under torch.compile (a graph break), as models/hyena_lean.py: a traced hand-written Triton kernel
# has failed under dynamo before, and this one is fused already.
@torch.compiler.disable
def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    *, initial_state=None, reverse: bool = False, block_channels: int | None = None, chunks: int | None = None,
    kernel: str | None = None,
):
    """The selective scan in one Triton kernel; arguments and result as selective_scan_ref (no autograd).

    reverse=True: the recurrence runs from the last position to the first (equal to scanning the
    inputs flipped along the length and flipping the output back); the last state is then the
    state after position 0. block_channels: channels per program (default: 4, or 2 or 1 where batch x
    channels is too small to give every multiprocessor several programs, e.g. batch 1). chunks: the
    sequence is cut into this many pieces scanned side by side (default: 1, more where one channel
    per program still leaves the GPU short of work): a first pass runs each piece from a zero
    state and keeps its last state and its sum of delta, the states entering the pieces follow in
    order (h_in[c+1] = exp(A sum(delta)[c]) h_in[c] + h_last[c]), and a second pass runs each piece
    from its entering state; twice the arithmetic, for many more programs. kernel: "gluon" or
    "triton" (default: the Gluon kernel where Triton has Gluon and dstate <= 128, unless
    block_channels is given, which only the plain Triton kernel has).
    """
    if kernel not in (None, "gluon", "triton"):
        raise ValueError(f"selective_scan_triton: kernel must be 'gluon' or 'triton', not {kernel!r}")
    if kernel is None:
        gluon_fits = _gluon_kernel() is not None and A.shape[-1] <= 128 and block_channels is None
        kernel = "gluon" if gluon_fits else "triton"
    if kernel == "gluon" and (_gluon_kernel() is None or A.shape[-1] > 128 or block_channels is not None):
        raise RuntimeError("selective_scan_triton: the Gluon kernel needs Triton with Gluon, dstate <= 128 and no "
                           "block_channels")
    if _kernel() is None:
        raise RuntimeError("selective_scan_triton needs Triton")
    if not fits_triton_scan(u, A, B, C, delta, z):
        raise ValueError("selective_scan_triton: CUDA tensors, real A, B and C of shape [batch, dstate, L], and "
                         "offsets below 2^31 elements")
    batch, dim, L = u.shape
    N = A.shape[1]
    import triton

    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    A = A.float().contiguous()
    zz = z if z is not None else u
    NP = triton.next_power_of_2(N)
    if kernel == "gluon":
        from seqssm.ops.selective_scan_gluon import POSITIONS, STATES_PER_THREAD

        fn = _gluon_kernel()
        NI = min(STATES_PER_THREAD, NP)
        BD, TT = 32 // (NP // NI), POSITIONS  # one warp: BD channels x NP // NI lanes each
        nchunk = chunks or _gluon_chunks(batch * triton.cdiv(dim, BD), L, u.device)
        extra = dict(NI=NI, WARPS=1, num_warps=1)
    else:
        fn = _kernel()
        BD, TT = block_channels or _block_channels(batch, dim, u.device), BLOCK_POSITIONS
        nchunk = chunks or _chunks(batch, dim, L, BD, u.device)
        extra = dict(num_warps=NUM_WARPS)
    chunk_len = triton.cdiv(triton.cdiv(L, nchunk), TT) * TT
    nchunk = triton.cdiv(L, chunk_len)
    args = (u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A)
    strides = (*u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zz.stride(), *out.stride())
    kw = dict(NP=NP, BD=BD, TT=TT, SOFTPLUS=bool(delta_softplus), HAS_D=D is not None, HAS_Z=z is not None,
              HAS_DTB=delta_bias is not None, REVERSE=bool(reverse), STAGES=NUM_STAGES, **extra)
    grid = (triton.cdiv(dim, BD), batch, nchunk)
    nblk = chunk_len // TT
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    last = None
    if nchunk > 1:
        # pass 1: each piece from a zero state -> its last state and its sum of delta
        ends = torch.empty(batch, nchunk, dim, N, device=u.device, dtype=torch.float32)
        sums = torch.empty(batch, nchunk, dim, device=u.device, dtype=torch.float32)
        fn[grid](*args, out, out, ends, sums, dim, N, L, nblk, nchunk, *strides, HAS_H0=False, STORE_LAST=True,
                 STORE_OUT=False, STORE_DTSUM=True, **kw)
        decay = torch.exp(A * sums[..., None])  # [batch, nchunk, dim, N]: the product of the piece's exp(delta A)
        starts = torch.empty_like(ends)
        h = h0 if h0 is not None else torch.zeros(batch, dim, N, device=u.device, dtype=torch.float32)
        for c in (reversed(range(nchunk)) if reverse else range(nchunk)):
            starts[:, c] = h
            h = decay[:, c] * h + ends[:, c]
        h0, last = starts, h
    elif return_last_state:
        last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
    store_last = nchunk == 1 and bool(return_last_state)
    fn[grid](*args, h0 if h0 is not None else out, out, last if store_last else out, out, dim, N, L, nblk, nchunk,
             *strides, HAS_H0=h0 is not None, STORE_LAST=store_last, STORE_OUT=True, STORE_DTSUM=False, **kw)
    return (out, last) if return_last_state else out
