"""The residual add + norm of Mamba blocks (the "fused" semantics) as one Triton kernel: inference on a GPU
without mamba-ssm.

Computes what `seqssm.layers.norm.add_norm(..., fused=True)` defines in torch (see that module for
the semantics): s = float32(x) + float32(r); out = norm(s) in float32, returned in x's dtype; the new
residual is s in the residual's dtype. One pass over x and r instead of the torch path's chain of
float32 copies and elementwise kernels (about 250 ms of a Caduceus-PS d256 x 16 forward at
8 x 131,072 positions on an H100 without mamba-ssm, docs/BENCHMARKS.md). Forward only.
"""

from __future__ import annotations

import functools

import torch

from seqssm.ops.selective_scan_triton import _offsets_fit

MAX_WIDTH = 16384  # channels held in one program's registers


@functools.cache
def _kernel():
    """The jitted kernel, or None where Triton is missing (imported on first use only)."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def add_norm_kernel(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, res_ptr, rows, d, s_x, s_r, eps, L, half,
                        BR: tl.constexpr, BC: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, RMS: tl.constexpr, STORE_RES: tl.constexpr, SWAP: tl.constexpr):
        row = tl.program_id(0) * BR + tl.arange(0, BR)
        col = tl.arange(0, BC)
        mc = col < d
        if SWAP:  # row (b, t) of [2 half, L, d] goes to ((b + half) mod 2 half, L - 1 - t)
            bb = row // L
            orow = tl.where(bb < half, bb + half, bb - half) * L + (L - 1 - (row - bb * L))
        else:
            orow = row
        m = (row < rows)[:, None] & mc[None, :]
        s = tl.load(x_ptr + row[:, None] * s_x + col[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(r_ptr + row[:, None] * s_r + col[None, :], mask=m, other=0.0).to(tl.float32)
        if RMS:
            y = s * tl.rsqrt(tl.sum(s * s, axis=1) / d + eps)[:, None]
        else:
            c = tl.where(m, s - (tl.sum(s, axis=1) / d)[:, None], 0.0)
            y = c * tl.rsqrt(tl.sum(c * c, axis=1) / d + eps)[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + col, mask=mc, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + col, mask=mc, other=0.0).to(tl.float32)[None, :]
        o = orow.to(tl.int64)[:, None] * d + col[None, :]
        tl.store(out_ptr + o, y.to(out_ptr.dtype.element_ty), mask=m)
        if STORE_RES:
            tl.store(res_ptr + o, s.to(res_ptr.dtype.element_ty), mask=m)

    return add_norm_kernel


def triton_norm_available() -> bool:
    """True where this kernel can run: a CUDA device and an importable Triton."""
    return torch.cuda.is_available() and _kernel() is not None


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as [rows, d] with unit channel stride, a view (None where that needs a copy)."""
    if t is None or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def fits_triton_norm(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """CUDA tensors this kernel reads in place: unit channel stride, rows as one strided axis, and
    offsets within 32 bits."""
    if not x.is_cuda or x.shape[-1] > MAX_WIDTH or x.numel() == 0 or _rows(x) is None:
        return False
    if residual is not None and (residual.shape != x.shape or _rows(residual) is None):
        return False
    return _offsets_fit(x, *(t for t in (residual,) if t is not None))


# Eager under torch.compile (a graph break), as models/hyena_lean.py: a traced hand-written Triton kernel
# has failed under dynamo before, and this one is fused already.
@torch.compiler.disable
def add_norm_triton(x, residual, weight, bias, eps: float, rms: bool, res_dtype: torch.dtype,
                    store_residual: bool = True, swap_strands: bool = False):
    """(norm(x + residual) in x's dtype, x + residual in res_dtype) computed in float32; the norm is
    RMSNorm (rms=True) or LayerNorm over the last axis with optional weight and bias. No autograd.

    swap_strands: x and residual are [2 B, L, d] (the two strands of an RCPS state as batch rows,
    layers.rcps.strands_add_norm_ref) and both results come out with the two halves of the batch
    exchanged and each reversed in length, on the way out (rows written in place of a copy; the
    channels keep their order, so the stores stay contiguous)."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("add_norm_triton needs Triton")
    if not fits_triton_norm(x, residual):
        raise ValueError("add_norm_triton: CUDA tensors with unit channel stride whose rows form one strided axis")
    import triton

    x2, r2 = _rows(x), _rows(residual)
    rows, d = x2.shape
    if swap_strands and (x.dim() != 3 or x.shape[0] % 2):
        raise ValueError(f"add_norm_triton: swap_strands needs [2 B, L, d], got {tuple(x.shape)}")
    L, half = (x.shape[1], x.shape[0] // 2) if swap_strands else (1, 0)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    res = torch.empty(x.shape, device=x.device, dtype=res_dtype) if store_residual else out
    BC = triton.next_power_of_2(d)
    BR = max(1, min(64, 4096 // BC))
    kernel[(triton.cdiv(rows, BR),)](
        x2, r2 if r2 is not None else x2, weight if weight is not None else x2, bias if bias is not None else x2,
        out, res, rows, d, x2.stride(0), r2.stride(0) if r2 is not None else 0, float(eps), L, half, BR=BR, BC=BC,
        HAS_RES=r2 is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=bool(rms),
        STORE_RES=bool(store_residual), SWAP=bool(swap_strands), num_warps=4 if BC <= 1024 else 8)
    return out, (res if store_residual else None)
