"""Short depthwise causal convolution (the conv1d of a Mamba block), with its one-step update.

    out[b, d, t] = bias[d] + sum_{k=0..W-1} weight[d, k] * x[b, d, t - (W-1) + k]      (then SiLU)

Positions before the start read `initial_states` [batch, dim, W-1] (the last W-1 inputs of the
previous window), or zeros. Shapes as the causal-conv1d package: x [batch, dim, L],
weight [dim, W], bias [dim].

`causal_conv1d_ref` writes the sum over the W taps out (the obviously right version);
`causal_conv1d_torch` is the same as one grouped F.conv1d (what runs on CPU); `causal_conv1d`
dispatches to the CUDA kernel of the causal-conv1d package on a GPU (imported on first use), or,
where that package is missing and no gradient is needed, to seqssm's Triton kernel
(seqssm.ops.causal_conv_triton).
`causal_conv1d_update*` advance a rolling state by one (or a few) positions for recurrent decoding.

Precision: computed in the weight's dtype, returned in x's dtype (as causal-conv1d does).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from seqssm.ops.backends import resolve_backend
from seqssm.ops.causal_conv_triton import causal_conv1d_triton, fits_triton_conv, triton_conv_available

ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, initial_states, activation) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [batch, dim, length], got shape {tuple(x.shape)}")
    batch, dim, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"causal_conv1d: weight must be [dim={dim}, width], got shape {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"causal_conv1d: bias must be [dim={dim}], got shape {tuple(bias.shape)}")
    if initial_states is not None and initial_states.shape != (batch, dim, W - 1):
        raise ValueError(
            f"causal_conv1d: initial_states must be [batch={batch}, dim={dim}, width-1={W - 1}], "
            f"got shape {tuple(initial_states.shape)}"
        )
    return W


def _padded(x, initial_states, W):
    """[initial_states or zeros, x]: the W-1 positions before the start, then x (weight dtype)."""
    if initial_states is None:
        return F.pad(x, (W - 1, 0))
    return torch.cat([initial_states.to(x.dtype), x], dim=-1)


def _final_states(xp, W):
    """The last W-1 inputs, zero-padded on the left when the input is shorter."""
    return xp[..., xp.shape[-1] - (W - 1):] if W > 1 else xp[..., :0]


def _tail_states(x, initial_states, W):
    """_final_states(_padded(x, initial_states, W), W) without copying the whole input."""
    if x.shape[-1] >= W - 1:
        return x[..., x.shape[-1] - (W - 1):]
    return _final_states(_padded(x, initial_states, W), W)


def _activate(out, activation, dtype):
    return (out if activation is None else F.silu(out)).to(dtype)


def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """The causal convolution as an explicit sum over the W taps.

    Returns out [batch, dim, L] in x's dtype, or (out, final_states [batch, dim, W-1]) when
    return_final_states (the last W-1 inputs, to pass as initial_states of the next window).
    """
    W = _check(x, weight, bias, initial_states, activation)
    L = x.shape[-1]
    xp = _padded(x.to(weight.dtype), initial_states, W)  # [batch, dim, W-1 + L]
    out = torch.zeros_like(xp[..., :L])
    for k in range(W):  # tap k reads the input k - (W-1) positions away
        out = out + weight[:, k, None] * xp[..., k : k + L]
    if bias is not None:
        out = out + bias[:, None]
    out = _activate(out, activation, x.dtype)
    return (out, _final_states(xp, W).to(x.dtype)) if return_final_states else out


def causal_conv1d_torch(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None):
    """The same convolution as one depthwise F.conv1d over [initial_states or zeros, x]."""
    W = _check(x, weight, bias, initial_states, activation)
    dim = x.shape[1]
    xp = _padded(x.to(weight.dtype), initial_states, W)
    out = F.conv1d(xp, weight.unsqueeze(1), bias, groups=dim)
    out = _activate(out, activation, x.dtype)
    return (out, _final_states(xp, W).to(x.dtype)) if return_final_states else out


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """Advance the rolling input window by x [batch, dim] (one position) or [batch, dim, l].

    conv_state [batch, dim, S] with S >= W-1 holds the last S inputs, oldest first; it is
    updated in place (shifted left, x written at the end) and the outputs at x's positions are
    returned, shaped like x. A Mamba block keeps S = W (mamba-ssm's layout).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d_update: activation must be None, 'silu' or 'swish', got {activation!r}")
    one = x.dim() == 2
    x3 = x.unsqueeze(-1) if one else x
    batch, dim, l = x3.shape
    W = weight.shape[1]
    S = conv_state.shape[-1]
    if conv_state.shape[:2] != (batch, dim) or S < W - 1 or weight.shape[0] != dim:
        raise ValueError(
            f"causal_conv1d_update: conv_state must be [batch={batch}, dim={dim}, >= width-1={W - 1}] and "
            f"weight [dim, width]; got {tuple(conv_state.shape)} and {tuple(weight.shape)}"
        )
    xs = torch.cat([conv_state.to(weight.dtype), x3.to(weight.dtype)], dim=-1)  # [batch, dim, S + l]
    conv_state.copy_(xs[..., -S:])
    out = F.conv1d(xs[..., S - (W - 1):], weight.unsqueeze(1), bias, groups=dim)  # [batch, dim, l]
    out = _activate(out, activation, x.dtype)
    return out.squeeze(-1) if one else out


# ----------------------------------------------------------------------------------------------
# the CUDA kernels of causal-conv1d (imported on first use only)


@functools.lru_cache(maxsize=None)
def _kernels():
    """(causal_conv1d_fn, causal_conv1d_update) of the causal-conv1d package, or None."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:  # ImportError, or a broken build of the extension
        return None
    return causal_conv1d_fn, causal_conv1d_update


def causal_conv1d_kernels_available() -> bool:
    """True when the causal-conv1d CUDA kernels can be used (the import is tried once)."""
    return torch.cuda.is_available() and _kernels() is not None


def _kernel_fits(x, weight) -> bool:
    supported = (torch.float32, torch.float16, torch.bfloat16)
    return 2 <= weight.shape[1] <= 4 and x.dtype in supported and weight.dtype in supported


def _resolve(backend, x, weight, what) -> str:
    return resolve_backend(backend, x, _kernels, what, "causal-conv1d", fits=lambda: _kernel_fits(x, weight),
                           unfit="the CUDA kernel needs width 2..4 and float32/float16/bfloat16 tensors")


def causal_conv1d(x, weight, bias=None, initial_states=None, return_final_states=False, activation=None,
                  *, backend: str = "auto", reverse: bool = False):
    """The causal convolution on the best available backend; arguments as causal_conv1d_ref.

    On CUDA the causal-conv1d kernel gets [initial_states, x] as one contiguous input and the first W-1
    outputs are dropped (the kernel's own initial_states argument wants a channel-last layout); "auto"
    on a CUDA device with no gradient needed takes seqssm's Triton kernel instead (installed or not),
    which reads x (any strided view) and initial_states in place. The final states are the last W-1
    inputs, sliced here.

    reverse=True: the anti-causal convolution flip(conv(flip(x))) along the length (the backward
    direction of a bidirectional mixer); the Triton kernel computes it in place, the other backends
    through the two flips. It takes no initial or final states.
    """
    if reverse:
        if initial_states is not None or return_final_states:
            raise ValueError("causal_conv1d: reverse=True takes no initial_states and returns no final states")
        _resolve(backend, x, weight, "causal_conv1d")  # the one-line error for a backend that cannot run here
        if backend == "auto" and _triton_suits(x, weight, bias, None):  # even where causal-conv1d is installed
            _check(x, weight, bias, None, activation)
            return causal_conv1d_triton(x, weight, bias, None, activation, reverse=True)
        return causal_conv1d(x.flip(-1), weight, bias, activation=activation, backend=backend).flip(-1)
    which = _resolve(backend, x, weight, "causal_conv1d")
    if backend == "auto" and _triton_suits(x, weight, bias, initial_states):
        which = "triton"  # even where causal-conv1d is installed: it needs x (a strided half) contiguous
    if which == "torch":
        return causal_conv1d_torch(x, weight, bias, initial_states, return_final_states, activation)
    W = _check(x, weight, bias, initial_states, activation)
    if which == "triton":
        out = causal_conv1d_triton(x, weight, bias, initial_states, activation)
    else:
        fn = _kernels()[0]
        xp = x if initial_states is None else torch.cat([initial_states.to(x.dtype), x], dim=-1)
        out = fn(xp.contiguous(), weight.contiguous(), bias, activation=activation)
        if initial_states is not None:
            out = out[..., W - 1:]
    if not return_final_states:
        return out
    return out, _tail_states(x, initial_states, W)


def _triton_suits(x, weight, bias, initial_states) -> bool:
    """seqssm's Triton kernel can stand in for causal-conv1d's: a CUDA device, Triton, offsets it takes,
    and no gradient to compute (it has no backward)."""
    if not (x.is_cuda and triton_conv_available() and fits_triton_conv(x, weight, initial_states)):
        return False
    tensors = (x, weight, bias, initial_states)
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, backend: str = "auto"):
    """One (or a few) positions of the convolution; updates conv_state in place (see the ref)."""
    which = _resolve(backend, x, weight, "causal_conv1d_update")
    if which == "torch":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    return _kernels()[1](x, conv_state, weight, bias, activation)
