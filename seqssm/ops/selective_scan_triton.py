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
parallel prefix scan cannot avoid either; the grid (batch x channel blocks) is wide enough at the
sizes this is for (e.g. 8 x 128 programs for batch 8, d_inner 512). Measured on an H100 at batch 8,
d_inner 512, dstate 16, 131,072 positions, bf16: 15.8 ms, against 11.6 ms for mamba-ssm's kernel and
~2.6 s for the chunked torch scan on the same GPU (docs/BENCHMARKS.md).

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
NUM_WARPS = 1
NUM_STAGES = 3


@functools.cache
def _kernel():
    """The jitted kernel, or None where Triton is missing (imported on first use only)."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def scan_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dtb_ptr, h0_ptr, out_ptr, hT_ptr,
                    dim, N, L, nblk,
                    s_u_b, s_u_d, s_u_l, s_dt_b, s_dt_d, s_dt_l, s_b_b, s_b_n, s_b_l, s_c_b, s_c_n, s_c_l,
                    s_z_b, s_z_d, s_z_l, s_o_b, s_o_d, s_o_l,
                    NP: tl.constexpr, BD: tl.constexpr, TT: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr, HAS_H0: tl.constexpr,
                    STORE_LAST: tl.constexpr, REVERSE: tl.constexpr, STAGES: tl.constexpr):
        b = tl.program_id(1)
        d = tl.program_id(0) * BD + tl.arange(0, BD)
        n = tl.arange(0, NP)  # dstate padded to a power of two; padded states stay 0 (A = 0, B = 0)
        md = d < dim
        mn = n < N
        mdn = md[:, None] & mn[None, :]
        # exp(delta A) = exp2(delta A log2(e))
        A2 = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mdn, other=0.0).to(tl.float32) * 1.4426950408889634
        if HAS_H0:
            h = tl.load(h0_ptr + (b * dim + d[:, None]) * N + n[None, :], mask=mdn, other=0.0).to(tl.float32)
        else:
            h = tl.zeros((BD, NP), dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
        if HAS_DTB:
            bias = tl.load(dtb_ptr + d, mask=md, other=0.0).to(tl.float32)
        pos = tl.arange(0, TT)
        for i in tl.range(0, nblk, num_stages=STAGES):
            if REVERSE:
                t0 = (nblk - 1 - i) * TT
            else:
                t0 = i * TT
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
                yk = tl.sum(h * ck[None, :], axis=1)
                y = tl.where(at_k, yk[:, None], y)
            if HAS_D:
                y = y + Dv[:, None] * u
            if HAS_Z:
                z = tl.load(z_ptr + b * s_z_b + d[:, None] * s_z_d + t[None, :] * s_z_l, mask=m, other=0.0)
                z = z.to(tl.float32)
                y = y * (z / (1.0 + tl.exp(-z)))
            tl.store(out_ptr + b * s_o_b + d[:, None] * s_o_d + t[None, :] * s_o_l,
                     y.to(out_ptr.dtype.element_ty), mask=m)
        if STORE_LAST:
            tl.store(hT_ptr + (b * dim + d[:, None]) * N + n[None, :], h, mask=mdn)

    return scan_kernel


def triton_scan_available() -> bool:
    """True where this kernel can run: a CUDA device and an importable Triton."""
    return torch.cuda.is_available() and _kernel() is not None


def fits_triton_scan(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> bool:
    """Inputs this kernel takes: CUDA tensors, real A, B and C per position with one group."""
    return (u.is_cuda and not A.is_complex() and B.dim() == 3 and C.dim() == 3
            and B.shape[0] == u.shape[0] and C.shape[0] == u.shape[0])


def _block_channels(batch: int, dim: int, device) -> int:
    want = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    bd = BLOCK_CHANNELS
    while bd > 1 and batch * -(-dim // bd) < want:
        bd //= 2
    return bd


def selective_scan_triton(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    *, initial_state=None, reverse: bool = False, block_channels: int | None = None,
):
    """The selective scan in one Triton kernel; arguments and result as selective_scan_ref (no autograd).

    reverse=True: the recurrence runs from the last position to the first (equal to scanning the
    inputs flipped along the length and flipping the output back); the last state is then the
    state after position 0. block_channels: channels per program (default: 4, or 2 or 1 where batch x
    channels is too small to give every multiprocessor several programs, e.g. batch 1).
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("selective_scan_triton needs Triton")
    if not fits_triton_scan(u, A, B, C):
        raise ValueError("selective_scan_triton: CUDA tensors, real A and B, C of shape [batch, dstate, L]")
    batch, dim, L = u.shape
    N = A.shape[1]
    import triton

    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32) if return_last_state else out
    A = A.float().contiguous()
    h0 = initial_state.float().contiguous() if initial_state is not None else out
    zz = z if z is not None else u
    nblk = triton.cdiv(L, BLOCK_POSITIONS)
    BD = block_channels or _block_channels(batch, dim, u.device)
    grid = (triton.cdiv(dim, BD), batch)
    kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, h0, out, last,
        dim, N, L, nblk, *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *zz.stride(), *out.stride(),
        NP=triton.next_power_of_2(N), BD=BD, TT=BLOCK_POSITIONS, SOFTPLUS=bool(delta_softplus),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=delta_bias is not None, HAS_H0=initial_state is not None,
        STORE_LAST=bool(return_last_state), REVERSE=bool(reverse), STAGES=NUM_STAGES, num_warps=NUM_WARPS,
    )
    return (out, last) if return_last_state else out
