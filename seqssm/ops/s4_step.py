"""One recurrent S4 step, fused into a single Triton kernel on CUDA.

The plain twins are the recurrences of ``seqssm.ops.s4_kernel`` (``DiagonalRecurrence.step``,
``DPLRRecurrence.step``); ``fused_step`` computes the same thing with the state read once and
written once, in place. Sampling thousands of molecules at a time is bound by that traffic: the
torch version makes one pass over the [B, H, N/2] complex state per elementwise operation.

    diag:  x' = dA x + dB u;                         y = 2 Re(sum_n C x')
    dplr:  v  = F x + P1 Re(sum Q x) + B1 u;  v = E v;  x' = v + P2 Re(sum Q v);  y = 2 Re(sum C x')

Each program handles a block of channels for a block of batch rows, so the per-channel
parameters are loaded once per program, not once per row. The state is complex64 [B, H, M]
(its float32 view [B, H, M, 2] interleaves real and imaginary parts); M must be a power of two
(else the twin runs).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except Exception:  # no triton here: the torch twin is used
        return None

    @triton.jit
    def _ld(ptr, off, mask):
        return tl.load(ptr + off, mask=mask, other=0.0), tl.load(ptr + off + 1, mask=mask, other=0.0)

    @triton.jit
    def _ld_state(x_ptr, s, p, mask, PAIRS: tl.constexpr):
        """The state tile as float32 (re, im); with PAIRS one contiguous load of [h, n, 2] pairs."""
        if PAIRS:
            c = tl.arange(0, 2)
            x = tl.load(x_ptr + s + p[:, :, None] + c[None, None, :], mask=mask[:, :, None], other=0.0)
            xr, xi = tl.split(x.to(tl.float32))
        else:
            xr, xi = _ld(x_ptr, s + p, mask)
            xr = xr.to(tl.float32)
            xi = xi.to(tl.float32)
        return xr, xi

    @triton.jit
    def _st_state(x_ptr, s, p, mask, nr, ni, PAIRS: tl.constexpr):
        if PAIRS:
            c = tl.arange(0, 2)
            tl.store(x_ptr + s + p[:, :, None] + c[None, None, :], tl.join(nr, ni).to(x_ptr.dtype.element_ty),
                     mask=mask[:, :, None])
        else:
            tl.store(x_ptr + s + p, nr.to(x_ptr.dtype.element_ty), mask=mask)
            tl.store(x_ptr + s + p + 1, ni.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def diag_kernel(x_ptr, u_ptr, a_ptr, b_ptr, c_ptr, y_ptr, Bsz, H, M: tl.constexpr,
                    BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr):
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        n = tl.arange(0, M)
        mh = h < H
        m2 = mh[:, None]
        p = h[:, None] * (M * 2) + n[None, :] * 2
        ar, ai = _ld(a_ptr, p, m2)
        br, bi = _ld(b_ptr, p, m2)
        cr, ci = _ld(c_ptr, p, m2)
        for r in range(ROWS):
            b = tl.program_id(0) * ROWS + r
            ok = b < Bsz
            mr = m2 & ok
            u = tl.load(u_ptr + b * H + h, mask=mh & ok, other=0.0).to(tl.float32)[:, None]
            s = b.to(tl.int64) * H * M * 2
            xr, xi = _ld_state(x_ptr, s, p, mr, PAIRS)
            nr = ar * xr - ai * xi + br * u
            ni = ar * xi + ai * xr + bi * u
            _st_state(x_ptr, s, p, mr, nr, ni, PAIRS)
            tl.store(y_ptr + b * H + h, 2.0 * tl.sum(cr * nr - ci * ni, axis=1), mask=mh & ok)

    @triton.jit
    def dplr_kernel(x_ptr, u_ptr, f_ptr, p1_ptr, q_ptr, b1_ptr, e_ptr, p2_ptr, c_ptr, y_ptr, Bsz, H,
                    M: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, PAIRS: tl.constexpr):
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        n = tl.arange(0, M)
        mh = h < H
        m2 = mh[:, None]
        p = h[:, None] * (M * 2) + n[None, :] * 2
        fr, fi = _ld(f_ptr, p, m2)
        p1r, p1i = _ld(p1_ptr, p, m2)
        qr, qi = _ld(q_ptr, p, m2)
        b1r, b1i = _ld(b1_ptr, p, m2)
        er, ei = _ld(e_ptr, p, m2)
        p2r, p2i = _ld(p2_ptr, p, m2)
        cr, ci = _ld(c_ptr, p, m2)
        for r in range(ROWS):
            b = tl.program_id(0) * ROWS + r
            ok = b < Bsz
            mr = m2 & ok
            u = tl.load(u_ptr + b * H + h, mask=mh & ok, other=0.0).to(tl.float32)[:, None]
            s = b.to(tl.int64) * H * M * 2
            xr, xi = _ld_state(x_ptr, s, p, mr, PAIRS)
            s1 = tl.sum(qr * xr - qi * xi, axis=1)[:, None]  # Re(sum Q x)
            vr = fr * xr - fi * xi + p1r * s1 + b1r * u
            vi = fr * xi + fi * xr + p1i * s1 + b1i * u
            wr = er * vr - ei * vi  # E v
            wi = er * vi + ei * vr
            s2 = tl.sum(qr * wr - qi * wi, axis=1)[:, None]
            nr = wr + p2r * s2
            ni = wi + p2i * s2
            _st_state(x_ptr, s, p, mr, nr, ni, PAIRS)
            tl.store(y_ptr + b * H + h, 2.0 * tl.sum(cr * nr - ci * ni, axis=1), mask=mh & ok)

    return diag_kernel, dplr_kernel


def triton_available() -> bool:
    return _kernels() is not None


def is_half_state(state) -> bool:
    """A state stored as float16 real/imaginary pairs [B, H, M, 2] (halves the sampler's traffic)."""
    return isinstance(state, torch.Tensor) and state.dtype == torch.float16 and state.dim() == 4 and state.shape[-1] == 2


def can_fuse(rec, state: torch.Tensor) -> bool:
    """Whether ``fused_step`` runs the Triton kernel for this recurrence and state."""
    if not isinstance(state, torch.Tensor):
        return False
    M = state.shape[-2] if is_half_state(state) else state.shape[-1]
    return (state.is_cuda and (state.dtype == torch.complex64 or is_half_state(state)) and state.is_contiguous()
            and M & (M - 1) == 0 and rec.kind in ("diag", "dplr") and _kernels() is not None)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.to(torch.complex64).contiguous())


# One program's tile per state storage: channels x state size (`elems`), batch rows, warps. The
# fastest of those tried on an H100 at batch 16,384 with the bundled chemical LM (state size 32;
# benchmarks/bench_s4_step.py, docs/BENCHMARKS.md). One warp: each thread keeps more state in flight.
TILES = {"float16": dict(elems=128, rows=128, num_warps=1), "complex64": dict(elems=256, rows=32, num_warps=1)}


def fused_step(rec, u: torch.Tensor, state: torch.Tensor, *, rows: int | None = None, block_h: int | None = None,
               num_warps: int | None = None, pairs: bool = True) -> torch.Tensor:
    """y [B, H] float32 of one step; ``state`` (complex64 [B, H, M], or float16 pairs [B, H, M, 2]; contiguous)
    is updated in place (half-precision states are computed in float32 and rounded on store).

    Falls back to the recurrence's own step (writing the result into ``state``) when the Triton
    kernel cannot run."""
    if not can_fuse(rec, state):
        x = torch.view_as_complex(state.float()) if is_half_state(state) else state
        y, new = rec.step(u.to(x.real.dtype), x)
        state.copy_(torch.view_as_real(new) if is_half_state(state) else new)
        return y
    if is_half_state(state):
        Bsz, H, M, _ = state.shape
        x = state
    else:
        Bsz, H, M = state.shape
        x = torch.view_as_real(state)
    u = u.float().contiguous()
    y = torch.empty(Bsz, H, device=state.device, dtype=torch.float32)
    # A few channels per program: the 7 parameter tiles stay in registers (no spills) and are
    # reused for `rows` batch rows; the state moves as contiguous (re, im) pairs.
    tile = TILES["float16" if is_half_state(state) else "complex64"]
    block_h = block_h or max(1, tile["elems"] // M)
    rows = rows or tile["rows"]
    num_warps = num_warps or tile["num_warps"]
    grid = (triton_cdiv(Bsz, rows), triton_cdiv(H, block_h))
    diag_kernel, dplr_kernel = _kernels()
    t = {k: _real(v) for k, v in rec.tensors().items()}
    if rec.kind == "diag":
        a, b, c = (t[k] for k in _diag_names(t))
        diag_kernel[grid](x, u, a, b, c, y, Bsz, H, M=M, BLOCK_H=block_h, ROWS=rows, PAIRS=pairs,
                          num_warps=num_warps)
    else:
        dplr_kernel[grid](x, u, t["F"], t["P1"], t["Q"], t["B1"], t["E"], t["P2"], t["C"], y, Bsz, H, M=M,
                          BLOCK_H=block_h, ROWS=rows, PAIRS=pairs, num_warps=num_warps)
    return y


def _diag_names(t: dict) -> tuple[str, str, str]:
    names = list(t)
    if len(names) != 3:
        raise ValueError(f"a diagonal recurrence has three tensors (dA, dB, C), got {names}")
    return names[0], names[1], names[2]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
