"""The short depthwise causal convolution (+ SiLU) as one Triton kernel: inference on a GPU without causal-conv1d.

Computes what `seqssm.ops.causal_conv.causal_conv1d_ref` defines (see there for the formula and the
shapes), forward only, in float32 registers. Each program owns a [channels x positions] tile, reads
the W shifted windows of its input (straight from a strided view such as the x half of Mamba's
in_proj output; positions before the start come from `initial_states`), and writes the activated
result once. The torch path it replaces pads a copy of the input, runs PyTorch's depthwise
convolution kernel and applies SiLU in a third pass: in a Caduceus-PS d256 forward at 8 x 131,072
positions without causal-conv1d, 5.6 ms of convolution alone per mixer call (H100, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import torch

from seqssm.ops.selective_scan_triton import _offsets_fit

BLOCK_CHANNELS = 4
BLOCK_POSITIONS = 512


@functools.cache
def _kernel():
    """The jitted kernel, or None where Triton is missing (imported on first use only)."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def conv_kernel(x_ptr, w_ptr, b_ptr, init_ptr, out_ptr, dim, L, s_x_b, s_x_d, s_x_l, s_i_b, s_i_d, s_i_l,
                    W: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_INIT: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr):
        b = tl.program_id(2)
        d = tl.program_id(1) * BD + tl.arange(0, BD)
        t = tl.program_id(0) * BL + tl.arange(0, BL)
        md = d < dim
        mt = t < L
        acc = tl.zeros((BD, BL), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + d, mask=md, other=0.0).to(tl.float32)[:, None]
        for k in tl.static_range(W):
            if REVERSE:  # anti-causal: the causal conv of the reversed input, reversed back
                j = t + (W - 1) - k
                m = md[:, None] & (j < L)[None, :]
            else:
                j = t - (W - 1) + k  # the input position tap k reads
                m = md[:, None] & (mt & (j >= 0))[None, :]
            wk = tl.load(w_ptr + d * W + k, mask=md, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + b * s_x_b + d[:, None] * s_x_d + j[None, :] * s_x_l, mask=m, other=0.0)
            xv = xv.to(tl.float32)
            if HAS_INIT:  # positions before the start: initial_states[..., W - 1 + j]
                mi = md[:, None] & (mt & (j < 0))[None, :]
                iv = tl.load(init_ptr + b * s_i_b + d[:, None] * s_i_d + (j + W - 1)[None, :] * s_i_l, mask=mi,
                             other=0.0)
                xv += iv.to(tl.float32)
            acc += wk[:, None] * xv
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(out_ptr + (b * dim + d[:, None]) * L + t[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=md[:, None] & mt[None, :])

    return conv_kernel


def triton_conv_available() -> bool:
    """True where this kernel can run: a CUDA device and an importable Triton."""
    return torch.cuda.is_available() and _kernel() is not None


def fits_triton_conv(x: torch.Tensor, weight: torch.Tensor, initial_states=None) -> bool:
    """CUDA tensors whose element offsets fit in 32 bits (the kernel's pointer arithmetic)."""
    return x.is_cuda and weight.is_cuda and _offsets_fit(x, *(t for t in (initial_states,) if t is not None))


# Eager under torch.compile (a graph break), as models/hyena_lean.py: a traced hand-written Triton kernel
# has failed under dynamo before, and this one is fused already.
@torch.compiler.disable
def causal_conv1d_triton(x, weight, bias=None, initial_states=None, activation=None, *, reverse: bool = False):
    """The convolution (arguments as causal_conv1d_ref, already checked) -> out [batch, dim, L] in x's
    dtype, contiguous. x may be any strided view; no autograd. reverse: the anti-causal convolution,
    flip(conv(flip(x))) along the length, read and written in place (no initial_states then)."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("causal_conv1d_triton needs Triton")
    if not fits_triton_conv(x, weight, initial_states):
        raise ValueError("causal_conv1d_triton: CUDA tensors with offsets below 2^31 elements")
    if reverse and initial_states is not None:
        raise ValueError("causal_conv1d_triton: reverse=True takes no initial_states")
    import triton

    batch, dim, L = x.shape
    W = weight.shape[1]
    out = torch.empty(batch, dim, L, device=x.device, dtype=x.dtype)
    init = initial_states if initial_states is not None else x
    grid = (triton.cdiv(L, BLOCK_POSITIONS), triton.cdiv(dim, BLOCK_CHANNELS), batch)
    kernel[grid](x, weight.contiguous(), bias if bias is not None else weight, init, out, dim, L, *x.stride(),
                 *init.stride(), W=W, BD=BLOCK_CHANNELS, BL=BLOCK_POSITIONS, HAS_BIAS=bias is not None,
                 HAS_INIT=initial_states is not None, SILU=activation in ("silu", "swish"), REVERSE=bool(reverse),
                 num_warps=4)
    return out
