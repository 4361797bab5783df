"""The selective scan of Mamba (Gu & Dao 2023): a linear recurrence whose decay and input
matrices change with every position, next to the plain loop it must equal.

For each batch element b, channel d and state index n (shapes as in mamba-ssm):

    delta  <- softplus(delta + delta_bias)            (each optional)
    h[t]    = exp(delta[t] * A[d, n]) * h[t-1]  +  delta[t] * B[n, t] * u[t]     h[-1] = initial_state
    y[t]    = sum_n C[n, t] * h[t, n]  +  D[d] * u[t]
    out[t]  = y[t] * silu(z[t])

    u, delta, z   [batch, dim, L]           A   [dim, dstate] (real; negative in Mamba)
    B, C          [dim, dstate] (fixed), [batch, dstate, L] (one group) or [batch, groups, dstate, L]
    D, delta_bias [dim]                     initial_state / last state  [batch, dim, dstate]

`selective_scan_ref` is that recurrence written as a Python loop over positions (the obviously
right version, for tests). `selective_scan_torch` computes the same thing chunk by chunk and is
what runs on CPU; `selective_scan` picks the CUDA kernel of mamba-ssm on a GPU, seqssm's Triton
kernel (seqssm.ops.selective_scan_triton) for inference on a GPU without mamba-ssm (and, with it,
for inference that starts from a state), and the torch version elsewhere. `selective_state_update*` is one step of the recurrence (recurrent inference).

How selective_scan_torch works. The sequence is cut into chunks (default: as many positions as
keep one chunk's [batch, dim, positions, dstate] tensors near 1M numbers, 4 MB, so that they stay
in cache, which matters more on CPU than anything else; 128 positions at batch 1, dim 512,
dstate 16; at least 32) and the state is carried from one chunk to the next. Inside a chunk
everything is computed in parallel, in two levels:

  1. the chunk is split into sub-chunks of T positions (default sqrt(chunk) within 4..16); all
     sub-chunks are scanned at the same time from a zero state: T vectorized steps
     h_local[t] = dA[t] * h_local[t-1] + dBu[t], each over every sub-chunk of the chunk. The same
     steps accumulate P[t] = dA[first] * ... * dA[t], the decay since the start of the sub-chunk
     (= exp of the cumulative sum of delta*A measured from the sub-chunk start);
  2. the state entering each sub-chunk is carried across the sub-chunks of the chunk
     (s[k+1] = P_end[k] * s[k] + h_local_end[k]) and added back to every position at once:
     h[t] = h_local[t] + P[t] * s[k]; then y[t] = C[t] . h[t] for all positions at once.

Only products of per-step decays appear, never their inverses (the factorization
exp(S_t - S_s) = exp(S_t) / exp(S_s) of a one-pass cumulative-sum formulation overflows as soon
as a chunk's decay exceeds ~88 in float32, which trained Mamba channels do reach). With A <= 0 and
delta >= 0 every factor is in [0, 1], so nothing can overflow however strong the decay (a decay
that underflows to 0 is a state that is truly forgotten), and the result is the sequential
recurrence up to rounding. The Python loop runs T + chunk/T times per chunk, not once per
position, and every step works on a [batch, sub-chunks, dstate, dim] block. Memory is bounded by
the chunk, so a 131,072-long sequence costs a few tensors of [batch, dim, L] and no
[batch, dim, L, dstate] one. Gradients flow through it with ordinary autograd (out-of-place updates
when a gradient is needed, in-place ones otherwise).

Only real A is supported (complex A, an option of the S4D-style mamba-ssm kernel, is not).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from seqssm.ops.backends import resolve_backend
from seqssm.ops.selective_scan_triton import (_gluon_kernel, fits_triton_scan, selective_scan_triton,
                                             triton_scan_available)


# One chunk's [batch, dim, positions, dstate] tensors hold about this many numbers (4 MB in float32).
_CHUNK_ELEMENTS = 1 << 20
_MIN_CHUNK = 32


# ----------------------------------------------------------------------------------------------
# checks and common preparation


def _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, length], got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if L == 0:
        raise ValueError("selective_scan: empty sequence (length 0)")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be [dim={dim}, dstate], got shape {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported (only real A, as in Mamba)")
    N = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            ok = M.shape == (dim, N)
        elif M.dim() == 3:
            ok = M.shape == (batch, N, L)
        elif M.dim() == 4:
            ok = M.shape[0] == batch and M.shape[2:] == (N, L) and M.shape[1] >= 1 and dim % M.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must be [dim={dim}, dstate={N}], [batch={batch}, dstate={N}, L={L}] "
                f"or [batch, groups dividing {dim}, dstate, L], got shape {tuple(M.shape)}"
            )
        if M.is_complex():
            raise ValueError(f"selective_scan: complex {name} is not supported")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and v.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be [dim={dim}], got shape {tuple(v.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if initial_state is not None and initial_state.shape != (batch, dim, N):
        raise ValueError(
            f"selective_scan: initial_state must be [batch={batch}, dim={dim}, dstate={N}], "
            f"got shape {tuple(initial_state.shape)}"
        )


def _prepare_delta(delta, delta_bias, delta_softplus) -> torch.Tensor:
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _bc_range(M: torch.Tensor, dim: int, s: int, e: int) -> torch.Tensor:
    """B or C for positions s..e as float32, broadcastable to [batch, dim, dstate, e - s]."""
    if M.dim() == 2:  # fixed: [dim, N]
        return M.float()[None, :, :, None]
    M = M[..., s:e].float()
    if M.dim() == 3:  # one group: [batch, N, l]
        return M[:, None]
    return M.repeat_interleave(dim // M.shape[1], dim=1)  # groups: [batch, G, N, l] -> [batch, dim, N, l]


def _finish(y, u, D, z, dtype_in, inplace: bool = False):
    """out = (y + D u) * silu(z), in dtype_in; in place on y (a fresh float32 tensor) when no gradient is needed."""
    if inplace:
        if D is not None:
            y.addcmul_(u, D.float()[:, None])
        if z is not None:
            y.mul_(F.silu(z.float()))
        return y.to(dtype_in)
    out = y if D is None else y + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(dtype_in)


# ----------------------------------------------------------------------------------------------
# the reference


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    *, initial_state=None,
):
    """The selective scan as a loop over positions, in float32; output in u's dtype.

    Returns out [batch, dim, L], or (out, last_state [batch, dim, dstate] float32) when
    return_last_state. `initial_state` is the state before the first position (zeros if None).
    """
    _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    N = A.shape[1]
    u32 = u.float()
    delta32 = _prepare_delta(delta, delta_bias, delta_softplus)
    A32 = A.float()
    if initial_state is None:
        h = u32.new_zeros(batch, dim, N)
    else:
        h = initial_state.float()
    ys = []
    for t in range(L):
        d_t = delta32[:, :, t, None]  # [batch, dim, 1]
        B_t = _bc_range(B, dim, t, t + 1)[..., 0]  # [batch|1, dim|1, N]
        C_t = _bc_range(C, dim, t, t + 1)[..., 0]
        h = torch.exp(d_t * A32) * h + d_t * B_t * u32[:, :, t, None]
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = _finish(y, u32, D, z, u.dtype)
    return (out, h) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# the chunked scan


def _chunk_sizes(batch: int, dim: int, N: int, L: int, chunk_size, sub_chunk) -> tuple[int, int]:
    if chunk_size is None:
        chunk_size = max(_MIN_CHUNK, _CHUNK_ELEMENTS // max(1, batch * dim * N))
    chunk_size = max(1, min(int(chunk_size), L))
    if sub_chunk is None:
        sub_chunk = max(4, min(16, math.isqrt(chunk_size)))
    sub_chunk = max(1, min(int(sub_chunk), chunk_size))
    return chunk_size, sub_chunk


def _to_blocks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[..., l] (l a multiple of T) -> [T, ..., l // T]: position t of every sub-chunk in front."""
    *lead, l = x.shape
    return x.reshape(*lead, l // T, T).movedim(-1, 0)


def _bc_blocks(M: torch.Tensor, s: int, e: int, pad: int, T: int) -> torch.Tensor:
    """B or C for positions s..e, contiguous float32 [T, batch, nc, N, G] (fixed M: [N, dim])."""
    if M.dim() == 2:
        return M.float().t().contiguous()
    seg = M[..., s:e].float()
    if pad:
        seg = F.pad(seg, (0, pad))
    if M.dim() == 3:
        seg = seg[:, None]  # [batch, G=1, N, l]
    return _to_blocks(seg, T).permute(0, 1, 4, 3, 2).contiguous()  # [T, batch, G, N, nc] -> [T, batch, nc, N, G]


def _scan_chunk(u, delta, At, B, C, h, s, e, T, inplace):
    """Positions s..e of the scan entered with state h: (y [batch, dim, e - s], state at e).

    Internal layout: states are [T, batch, nc, N, dim] (dstate before dim: the contraction with C
    is then one [1, N] @ [N, dim] product per position); h is [batch, N, dim] and At is A.t().
    """
    batch, dim, _ = u.shape
    N = At.shape[0]
    l = e - s
    nc = -(-l // T)
    pad = nc * T - l
    # Padded positions have delta = 0: decay 1 and no input, so they leave the state unchanged.
    d = F.pad(delta[:, :, s:e], (0, pad))
    du = d * F.pad(u[:, :, s:e], (0, pad))
    # The operands are made contiguous (they are small: no dstate axis) so that the large
    # [T, batch, nc, N, dim] results come out contiguous and the in-place steps stay cheap.
    d = _to_blocks(d, T).transpose(-1, -2).unsqueeze(-2).contiguous()  # [T, batch, nc, 1, dim]
    du = _to_blocks(du, T).transpose(-1, -2).unsqueeze(-2).contiguous()
    Bb, Cb = _bc_blocks(B, s, e, pad, T), _bc_blocks(C, s, e, pad, T)

    dA = torch.exp(d * At)  # [T, batch, nc, N, dim]
    if B.dim() == 2:
        H = du * Bb
    else:  # each group of dim // G channels shares one B
        G = Bb.shape[-1]
        H = (du.view(T, batch, nc, 1, G, dim // G) * Bb.unsqueeze(-1)).view(T, batch, nc, N, dim)
    # 1. every sub-chunk from a zero state; P = decay accumulated since the sub-chunk start
    if inplace:
        for t in range(1, T):
            H[t].addcmul_(dA[t], H[t - 1])
            dA[t].mul_(dA[t - 1])
        P = dA
    else:
        hs, ps = [H[0]], [dA[0]]
        for t in range(1, T):
            hs.append(torch.addcmul(H[t], dA[t], hs[-1]))
            ps.append(ps[-1] * dA[t])
        H, P = torch.stack(hs), torch.stack(ps)
    # 2. carry the state across the sub-chunks, then add its decayed value to every position
    starts = []
    for k in range(nc):
        starts.append(h)
        h = torch.addcmul(H[-1, :, k], P[-1, :, k], h)
    S = torch.stack(starts, dim=1)  # [batch, nc, N, dim]
    H = H.addcmul_(P, S) if inplace else torch.addcmul(H, P, S)
    # 3. y = sum_n C[n] h[n]
    if C.dim() == 2:
        y = (H * Cb).sum(-2)
    elif Cb.shape[-1] == 1:
        y = torch.bmm(Cb.view(-1, 1, N), H.view(-1, N, dim))
    else:
        G = Cb.shape[-1]
        y = (H.view(T, batch, nc, N, G, dim // G) * Cb.unsqueeze(-1)).sum(3)
    y = y.reshape(T, batch, nc, dim).permute(1, 3, 2, 0).reshape(batch, dim, nc * T)
    return y[..., :l], h


def selective_scan_torch(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    *, initial_state=None, chunk_size: int | None = None, sub_chunk: int | None = None,
):
    """The selective scan computed in chunks (see the module docstring); arguments as selective_scan_ref.

    chunk_size: positions per chunk (default: about 1M numbers per [batch, dim, chunk, dstate]
    tensor, at least 32 positions); sub_chunk: positions per sub-chunk (default sqrt(chunk),
    within 4..16). Both change speed only, not the result beyond rounding.
    """
    _check_scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    N = A.shape[1]
    chunk, T = _chunk_sizes(batch, dim, N, L, chunk_size, sub_chunk)
    u32 = u.float()
    delta32 = _prepare_delta(delta, delta_bias, delta_softplus)
    At = A.float().t().contiguous()  # [N, dim]
    h = u32.new_zeros(batch, N, dim) if initial_state is None else initial_state.float().transpose(1, 2).contiguous()
    inplace = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state)
    ))
    if inplace:  # written chunk by chunk into one tensor (no list of chunks to concatenate)
        y = u32.new_empty(batch, dim, L)
        for s in range(0, L, chunk):
            y[..., s:min(s + chunk, L)], h = _scan_chunk(u32, delta32, At, B, C, h, s, min(s + chunk, L), T, True)
    else:
        ys = []
        for s in range(0, L, chunk):
            y_s, h = _scan_chunk(u32, delta32, At, B, C, h, s, min(s + chunk, L), T, False)
            ys.append(y_s)
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    out = _finish(y, u32, D, z, u.dtype, inplace=inplace and not (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (D, z))))
    return (out, h.transpose(1, 2).contiguous()) if return_last_state else out


# ----------------------------------------------------------------------------------------------
# the CUDA kernels of mamba-ssm (imported on first use only)


@functools.lru_cache(maxsize=None)
def _mamba_scan_kernel():
    """mamba_ssm's selective_scan_fn, or None when mamba-ssm or its compiled extension is missing."""
    try:
        from mamba_ssm.ops import selective_scan_interface as ssi
    except Exception:  # ImportError, or an OSError/RuntimeError from a broken build
        return None
    if getattr(ssi, "selective_scan_cuda", True) is None:  # newer releases import it optionally
        return None
    return getattr(ssi, "selective_scan_fn", None)


@functools.lru_cache(maxsize=None)
def _mamba_state_update_kernel():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:
        return None
    return selective_state_update


def cuda_kernels_available() -> bool:
    """True when mamba-ssm's CUDA selective scan can be used (the import is tried once)."""
    return torch.cuda.is_available() and _mamba_scan_kernel() is not None


def _resolve(backend: str, tensor: torch.Tensor, kernel, what: str) -> str:
    return resolve_backend(backend, tensor, kernel, what, "mamba-ssm")


def scan_backend(backend: str, tensor: torch.Tensor) -> str:
    """The backend selective_scan would use for tensors like `tensor`: "torch", "cuda" or "triton" (for
    backend "triton"; "auto" reports "torch" where it may take Triton for inference); errors as it would."""
    if backend == "triton":
        return "triton"
    return _resolve(backend, tensor, _mamba_scan_kernel, "selective_scan")


def mixer_backend(backend: str, tensor: torch.Tensor, rows: int | None = None) -> str:
    """The scan backend a Mamba mixer's call takes on tensors like `tensor` under the current grad mode.

    "triton" for backend "triton". For "auto" in inference (no gradient) on a CUDA device where the
    Triton scan runs: "triton" without mamba-ssm; with it, "triton" where Triton has its Gluon kernel and
    the scan has at least 2 rows (`rows`, default the tensor's batch). There, seqssm's inference path
    (shared projections, strand-major RCPS) was faster than mamba-ssm's fused one at every Caduceus-PS
    shape measured. A single row stays with mamba-ssm's kernel, whose scan alone is faster there (1.58
    against 2.16 ms at 1 x 512 x 131,072 in session 13, docs/BENCHMARKS.md). Otherwise as scan_backend."""
    if backend == "triton":
        return "triton"
    which = scan_backend(backend, tensor)
    if backend != "auto" or which == "triton" or not tensor.is_cuda or torch.is_grad_enabled():
        return which
    if not triton_scan_available():
        return which
    if which == "torch" or (_gluon_kernel() is not None and (rows if rows is not None else tensor.shape[0]) >= 2):
        return "triton"
    return which


def _initial_state_response(delta, A, C, h0, chunk: int):
    """What an initial state h0 adds to y, and to the last state, by itself.

    The recurrence is linear in (h0, inputs): run from h0 with no input, the state is
    h[t] = exp(A * sum_{s<=t} delta[s]) * h0, and y[t] = sum_n C[n, t] h[t, n]. Computed chunk by
    chunk with the cumulative sum taken from the chunk start (exponents <= 0 for A <= 0, delta >= 0).
    Returns (y0 [batch, dim, L] float32, decayed h0 [batch, dim, N]).
    """
    batch, dim, L = delta.shape
    h = h0.float()
    ys = []
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        if not h.any():  # the initial state is forgotten (its decay underflowed): nothing more to add
            ys.append(delta.new_zeros(batch, dim, L - s))
            break
        P = torch.exp(torch.cumsum(delta[:, :, s:e], dim=-1)[..., None] * A[:, None, :])  # [batch, dim, l, N]
        Cs = _bc_range(C, dim, s, e).expand(batch, dim, -1, e - s)
        ys.append(torch.einsum("bdln,bdnl->bdl", P * h[:, :, None, :], Cs))
        h = P[:, :, -1] * h
    return torch.cat(ys, dim=-1), h


@functools.cache
def _h0_kernel():
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def add_h0_response_kernel(dt_ptr, dtb_ptr, A_ptr, C_ptr, H_ptr, z_ptr, out_ptr, seg_ptr, dim, L, seg_len, nseg,
                               s_dt_b, s_dt_d, s_c_b, s_c_n, s_z_b, s_z_d, s_o_b, s_o_d,
                               N: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, SUMS: tl.constexpr,
                               BD: tl.constexpr, BT: tl.constexpr):
        """Program (b, channel block, segment). SUMS: write each segment's sum of delta to seg_ptr
        [batch, dim, nseg]; else seg_ptr holds the sum of delta before each segment."""
        b = tl.program_id(0)
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        k = tl.program_id(2)
        md = d < dim
        bias = tl.load(dtb_ptr + d, mask=md, other=0.0)
        seg = seg_ptr + (b * dim + d) * nseg + k
        if SUMS:
            carry = tl.zeros((BD,), dtype=tl.float32)
        else:
            carry = tl.load(seg, mask=md, other=0.0)  # sum of delta before the current block
        start = k * seg_len
        for t0 in range(start, tl.minimum(start + seg_len, L), BT):
            t = t0 + tl.arange(0, BT)
            mt = t < L
            m = md[:, None] & mt[None, :]
            dt = tl.load(dt_ptr + b * s_dt_b + d[:, None] * s_dt_d + t[None, :], mask=m, other=0.0).to(tl.float32)
            dt = dt + bias[:, None]
            if SOFTPLUS:  # as torch's softplus (threshold 20); log1p(e) = log(u) e / (u - 1), u = 1 + e (Kahan)
                e = tl.exp(tl.minimum(dt, 20.0))
                u = 1.0 + e
                lp = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
                dt = tl.where(dt <= 20.0, lp, dt)
            dt = tl.where(m, dt, 0.0)
            if not SUMS:
                S = carry[:, None] + tl.cumsum(dt, axis=1)
                y = tl.zeros((BD, BT), dtype=tl.float32)
                for n in range(N):
                    a = tl.load(A_ptr + d * N + n, mask=md, other=0.0)
                    h = tl.load(H_ptr + (b * dim + d) * N + n, mask=md, other=0.0)
                    c = tl.load(C_ptr + b * s_c_b + n * s_c_n + t, mask=mt, other=0.0).to(tl.float32)
                    y += (h[:, None] * c[None, :]) * tl.exp(a[:, None] * S)
                if HAS_Z:
                    z = tl.load(z_ptr + b * s_z_b + d[:, None] * s_z_d + t[None, :], mask=m, other=0.0)
                    z = z.to(tl.float32)
                    y = y * (z / (1.0 + tl.exp(-z)))
                o = out_ptr + b * s_o_b + d[:, None] * s_o_d + t[None, :]
                tl.store(o, (tl.load(o, mask=m, other=0.0).to(tl.float32) + y).to(out_ptr.dtype.element_ty), mask=m)
            carry = carry + tl.sum(dt, axis=1)
        if SUMS:
            tl.store(seg, carry, mask=md)

    return add_h0_response_kernel


def _add_initial_state_response_(out, delta, delta_bias, delta_softplus, A, C, z, h0):
    """out += silu(z) * y0 in place, y0 the response to the initial state h0 alone (as
    `_initial_state_response`), in one Triton kernel (CUDA; C of one group, [batch, N, L]); returns
    h0's share of the last state, exp(A * sum(delta)) * h0.

    With no input the state is h[t] = exp(A * S[t]) * h0, S the running sum of delta, so each
    program walks its channels' positions once, carrying S, and computes y0 in registers: delta
    (bias and softplus included), C, z and out are each read once and nothing else is written."""
    batch, dim, L = out.shape
    N = A.shape[1]
    if delta.stride(-1) != 1 or out.stride(-1) != 1 or C.stride(-1) != 1 or (z is not None and z.stride(-1) != 1):
        raise ValueError("_add_initial_state_response_: the length axis must be contiguous")
    A32, h = A.float().contiguous(), h0.float().contiguous()
    bias = (delta_bias.float() if delta_bias is not None else torch.zeros(dim, device=out.device)).contiguous()
    zz = z if z is not None else out
    BD, BT = 16, 256
    # Segments of the length axis run in parallel (a few per channel block fill the GPU): a first
    # pass sums delta per segment, the second starts each segment from the sum before it.
    seg_len = BT * max(1, -(-L // (32 * BT)))
    nseg = -(-L // seg_len)
    sums = torch.empty(batch, dim, nseg, device=out.device, dtype=torch.float32)
    grid = (batch, -(-dim // BD), nseg)
    args = (delta, bias, A32, C, h, zz, out)
    strides = (delta.stride(0), delta.stride(1), C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), out.stride(0),
               out.stride(1))
    kw = dict(N=N, SOFTPLUS=bool(delta_softplus), HAS_Z=z is not None, BD=BD, BT=BT, num_warps=4)
    _h0_kernel()[grid](*args, sums, dim, L, seg_len, nseg, *strides, SUMS=True, **kw)
    before = (torch.cumsum(sums, dim=-1) - sums).contiguous()
    _h0_kernel()[grid](*args, before, dim, L, seg_len, nseg, *strides, SUMS=False, **kw)
    return torch.exp(A32 * sums.sum(-1)[..., None]) * h


def _can_fuse_h0(delta, C) -> bool:
    return delta.is_cuda and C.dim() == 3 and _h0_kernel() is not None


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """mamba-ssm's scan loads 16 bytes at a time when the length allows it, so a view starting
    mid-row (the convolution output after its W-1 warm-up positions are dropped, in stream mode)
    faults with a misaligned address: such views are copied into a fresh buffer."""
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _scan_with_kernel(kernel, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state,
                      chunk: int | None = None):
    """Run a mamba-ssm style kernel (which has no initial state) and add the initial state's share.

    The scan is linear in its state, so out = kernel(...) + silu(z) * y0 and
    last = kernel_last + exp(A * sum(delta)) * h0, with y0 from _initial_state_response.
    """
    u, delta, B, C, z = (_aligned(t) for t in (u, delta, B, C, z))
    if initial_state is None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    res = kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    out, last = res
    if chunk is None and _can_fuse_h0(delta, C) and out.is_contiguous():
        last = last.float() + _add_initial_state_response_(out, delta, delta_bias, delta_softplus, A, C, z,
                                                           initial_state)
        return (out, last) if return_last_state else out
    d = _prepare_delta(delta, delta_bias, delta_softplus)
    batch, dim, L = u.shape
    # [batch, dim, chunk, dstate] intermediates of about 64M numbers on a GPU (256 MB), 1M elsewhere
    if chunk is None:
        budget = (1 << 26) if u.is_cuda else _CHUNK_ELEMENTS
        chunk = max(1, min(L, budget // max(1, batch * dim * A.shape[1])))
    y0, h0_end = _initial_state_response(d, A.float(), C, initial_state, chunk)
    if z is not None:
        y0 = y0 * F.silu(z.float())
    out = (out.float() + y0).to(out.dtype)
    last = last.float() + h0_end
    return (out, last) if return_last_state else out


def _triton_suits(u, delta, A, B, C, D, z, delta_bias, initial_state) -> bool:
    """The Triton scan can stand in for mamba-ssm's: a CUDA device, Triton, inputs it takes, and no
    gradient to compute (it has no backward)."""
    if not (u.is_cuda and triton_scan_available() and fits_triton_scan(u, A, B, C, delta, z)):
        return False
    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False,
    *, initial_state=None, backend: str = "auto", reverse: bool = False,
):
    """The selective scan on the best available backend; arguments as selective_scan_ref.

    reverse=True: the recurrence from the last position to the first, i.e. the scan of the inputs
    flipped along the length with the output flipped back (the last state is then the state after
    position 0). The Triton kernel runs it in place; the other backends through those flips.

    backend "torch": selective_scan_torch; "cuda": mamba-ssm's kernel (tensors on a GPU, mamba-ssm
    installed; an initial state is added by linearity, see _scan_with_kernel; as in mamba-ssm, no
    gradient flows back from the returned last state); "auto": with no gradient needed on a CUDA
    device, seqssm's own Triton kernel (seqssm.ops.selective_scan_triton), except where mamba-ssm's
    imports and either only the plain (non-Gluon) Triton kernel exists or there is a single row and
    no initial state; with a gradient, mamba-ssm's kernel where it imports; else torch.
    "triton": that Triton kernel (CUDA tensors, Triton installed, no gradient needed).
    """
    args = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if reverse and not (backend in ("auto", "triton") and _triton_suits(*args)):
        if backend == "triton":
            _check_scan(*args)
            raise ValueError("selective_scan: backend 'triton' needs tensors on a CUDA device, Triton, B and C of "
                             "shape [batch, dstate, L], offsets below 2^31 elements, and no gradient")
        flip = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        res = selective_scan(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z), delta_bias, delta_softplus,
                             return_last_state, initial_state=initial_state, backend=backend)
        return (flip(res[0]), res[1]) if return_last_state else flip(res)
    if reverse:
        _check_scan(*args)
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state=initial_state, reverse=True)
    if backend == "triton":
        which = "triton"
    else:
        which = _resolve(backend, u, _mamba_scan_kernel, "selective_scan")
        if which == "torch" and backend == "auto" and _triton_suits(*args):
            which = "triton"
        elif (which == "cuda" and backend == "auto" and _gluon_kernel() is not None and _triton_suits(*args)
              and (u.shape[0] >= 2 or initial_state is not None)):
            # inference: the Gluon kernel is level with mamba-ssm's from 2 rows up (mixer_backend), and it
            # starts from an initial state, which mamba-ssm's kernel adds afterwards by linearity
            which = "triton"
    if which == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    initial_state=initial_state)
    _check_scan(*args)
    if which == "triton":
        if backend == "triton" and not _triton_suits(*args):
            raise ValueError("selective_scan: backend 'triton' needs tensors on a CUDA device, Triton, B and C of "
                             "shape [batch, dstate, L], offsets below 2^31 elements, and no gradient (it is for "
                             "inference); use 'auto' or 'torch'")
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state=initial_state)
    return _scan_with_kernel(_mamba_scan_kernel(), u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, initial_state)


# ----------------------------------------------------------------------------------------------
# one step (recurrent inference)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One position of the scan; updates `state` in place and returns the output.

    Shapes as mamba-ssm's selective_state_update: state [batch, dim, dstate] (or with heads
    [batch, nheads, dim, dstate]), x, dt, z [batch, dim] ([batch, nheads, dim]), A [dim, dstate]
    ([nheads, dim, dstate]), B, C [batch, dstate] ([batch, ngroups, dstate]), D, dt_bias [dim]
    ([nheads, dim]). Computed in float32 (the state keeps its dtype); output in x's dtype.
    """
    heads = state.dim() == 4
    st = state if heads else state.unsqueeze(1)
    batch, nheads, dim, N = st.shape

    def lift(t, lead):  # add the heads axis where a no-heads tensor lacks it
        return None if t is None else (t if heads else t.unsqueeze(lead))

    x4, dt4, z4 = lift(x, 1), lift(dt, 1), lift(z, 1)
    A4, D4, b4 = lift(A, 0), lift(D, 0), lift(dt_bias, 0)
    B4 = B if B.dim() == 3 else B.unsqueeze(1)
    C4 = C if C.dim() == 3 else C.unsqueeze(1)
    if x4.shape != (batch, nheads, dim) or dt4.shape != x4.shape or A4.shape != (nheads, dim, N):
        raise ValueError(
            f"selective_state_update: shapes do not fit state {tuple(state.shape)}: x {tuple(x.shape)}, "
            f"dt {tuple(dt.shape)}, A {tuple(A.shape)}"
        )
    groups = B4.shape[1]
    if nheads % groups or B4.shape != (batch, groups, N) or C4.shape != B4.shape:
        raise ValueError(
            f"selective_state_update: B, C must be [batch, (groups,) dstate], got {tuple(B.shape)}, {tuple(C.shape)}"
        )
    d = dt4.float()
    if b4 is not None:
        d = d + b4.float()
    if dt_softplus:
        d = F.softplus(d)
    rep = nheads // groups
    Bh = B4.float().repeat_interleave(rep, dim=1)[:, :, None, :]  # [batch, nheads, 1, N]
    Ch = C4.float().repeat_interleave(rep, dim=1)[:, :, None, :]
    new = st.float() * torch.exp(d[..., None] * A4.float()) + (d * x4.float())[..., None] * Bh
    st.copy_(new)
    out = (new * Ch).sum(-1)
    if D4 is not None:
        out = out + x4.float() * D4.float()
    if z4 is not None:
        out = out * F.silu(z4.float())
    out = out.to(x.dtype)
    return out if heads else out.squeeze(1)


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *, backend: str = "auto",
):
    """One step of the scan on the best available backend (mamba-ssm's Triton kernel on CUDA).

    Updates `state` in place and returns the output; arguments as selective_state_update_ref.
    """
    which = _resolve(backend, x, _mamba_state_update_kernel, "selective_state_update")
    if which == "torch":
        return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if dt_bias is None:  # the Triton wrapper reads dt_bias's strides unconditionally
        dt_bias = torch.zeros_like(dt[0])
    return _mamba_state_update_kernel()(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
