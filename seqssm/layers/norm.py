"""RMSNorm and the residual add + norm of Mamba blocks, with mamba-ssm's exact semantics.

Mamba blocks are written "add -> norm -> mixer": each block receives the previous mixer output x
and the running residual r, and computes

    r <- x + r            (r = x in the first block, which has no residual yet)
    h <- norm(r)          (then h goes through the mixer)

mamba-ssm has two implementations of this, and checkpoints were trained with one or the other
(`fused_add_norm` in the config; the Caduceus and Mamba checkpoints use the fused one):

* unfused (Block with fused_add_norm=False):
      r = x + r                       in PyTorch's promoted dtype
      h = norm(r.to(norm.weight.dtype))
      r = r.float() if residual_in_fp32
* fused (the Triton kernel layer_norm_fn / rms_norm_fn with prenorm=True):
      s = float32(x) + float32(r)     the sum is always formed in float32
      h = norm(s) computed in float32, returned in x's dtype
      r = s stored in r's dtype if r was given, else in float32 if residual_in_fp32, else x's dtype

In float32 both give the same numbers; in bf16/fp16 they differ in rounding only.
`add_norm(..., fused=...)` reproduces either. With fused=True on a CUDA tensor it calls that very
Triton kernel of mamba-ssm when it is installed (one pass over x and r instead of some ten
elementwise torch kernels over float32 copies); without mamba-ssm and with no gradient needed,
seqssm's own one-pass Triton kernel (seqssm.ops.add_norm_triton); else it computes the same in
torch (backend="torch" forces the torch path; the GPU tests compare them). RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight,
computed in float32 and returned in x's dtype (mamba-ssm's RMSNorm module; no bias, so its state
dict has `weight` only). LayerNorm is torch.nn.LayerNorm (state dict `weight`, `bias`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.ops.add_norm_triton import add_norm_triton, fits_triton_norm, triton_norm_available


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale; parameter `weight` (ones at init), no bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.float(), self.weight, self.bias, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight (+ bias), in x's dtype (pass float32 for the kernels' numerics)."""
    rstd = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    y = x * rstd * weight.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def _affine(norm: nn.Module, flip_weight: bool):
    """norm's (weight, bias), channel-reversed when flip_weight."""
    w, b = norm.weight, norm.bias
    if flip_weight and w is not None:
        w = w.flip(-1)
        b = None if b is None else b.flip(-1)
    return w, b


def residual_dtype(x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool) -> torch.dtype:
    """The new residual's dtype under the fused semantics: the old residual's, or for the first block
    (no residual yet) float32 with residual_in_fp32, else x's."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x.dtype


def norm_float32(s: torch.Tensor, norm: nn.Module, flip_weight: bool = False) -> torch.Tensor:
    """norm applied in float32 to a float32 tensor (what the fused kernels compute)."""
    w, b = _affine(norm, flip_weight)
    bias = None if b is None else b.float()
    if isinstance(norm, RMSNorm):
        return rms_norm(s, w.float(), bias, norm.eps)
    if isinstance(norm, nn.LayerNorm):  # elementwise_affine=False: no weight, no bias
        return F.layer_norm(s, norm.normalized_shape, None if w is None else w.float(), bias, norm.eps)
    raise TypeError(f"add_norm: expected an RMSNorm or nn.LayerNorm, got {type(norm).__name__}")


@functools.lru_cache(maxsize=None)
def _norm_kernels():
    """(rms_norm_fn, layer_norm_fn) of mamba-ssm's Triton layer norm, or None (imported on first use)."""
    for mod in ("mamba_ssm.ops.triton.layer_norm", "mamba_ssm.ops.triton.layernorm"):
        try:
            m = __import__(mod, fromlist=["rms_norm_fn", "layer_norm_fn"])
            return m.rms_norm_fn, m.layer_norm_fn
        except Exception:  # ImportError, or a broken Triton / CUDA setup
            continue
    return None


def _triton_suits(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module) -> bool:
    """seqssm's Triton kernel can stand in for mamba-ssm's: a CUDA device, Triton, inputs it reads in
    place, a norm over the last axis, and no gradient to compute (it has no backward)."""
    if not (x.is_cuda and triton_norm_available() and fits_triton_norm(x, residual)):
        return False
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) != 1:
        return False
    tensors = (x, residual, norm.weight, norm.bias)
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _use_kernel(backend: str, x: torch.Tensor, norm: nn.Module) -> bool:
    if backend not in ("auto", "torch", "cuda"):
        raise ValueError(f"add_norm: backend must be auto, torch or cuda, got {backend!r}")
    if backend == "torch" or not x.is_cuda:
        if backend == "cuda":
            raise ValueError(f"add_norm: backend 'cuda' needs tensors on a CUDA device, got {x.device}")
        return False
    if isinstance(norm, nn.LayerNorm) and (norm.weight is None or len(norm.normalized_shape) != 1):
        return False  # the kernel wants an affine norm over the last axis
    if _norm_kernels() is None:
        if backend == "cuda":
            from seqssm.errors import SeqssmError

            raise SeqssmError("add_norm: mamba-ssm's Triton layer-norm kernels are not installed (or failed to "
                              "import): install them with `pip install \"seqssm[gpu]\"`, or use backend 'torch'")
        return False
    return True


def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm: nn.Module,
    *,
    residual_in_fp32: bool = False,
    prenorm: bool = False,
    fused: bool = True,
    backend: str = "auto",
    flip_weight: bool = False,
):
    """residual <- x + residual; return norm(residual), and the residual too when prenorm.

    `fused` selects mamba-ssm's fused-kernel semantics or its unfused Block code (see the module
    docstring); `residual` None means the first block (the residual is x itself). backend (fused
    only): "auto" = mamba-ssm's Triton kernel for CUDA tensors when installed, else torch.
    flip_weight (fused only): use the channel-reversed weight and bias, which gives
    flip_channels(norm(flip_channels(x + r))) without reversing x and r (a norm's statistics do not
    depend on the order of the channels; only the order of the float sum in them changes).
    """
    if not isinstance(norm, (RMSNorm, nn.LayerNorm)):
        raise TypeError(f"add_norm: expected an RMSNorm or nn.LayerNorm, got {type(norm).__name__}")
    if flip_weight and not fused:
        raise ValueError("add_norm: flip_weight is implemented for the fused semantics only")
    if fused and _use_kernel(backend, x, norm):
        rms_norm_fn, layer_norm_fn = _norm_kernels()
        fn = rms_norm_fn if isinstance(norm, RMSNorm) else layer_norm_fn
        w, b = _affine(norm, flip_weight)
        return fn(x, w, b, residual=residual, prenorm=prenorm, residual_in_fp32=residual_in_fp32, eps=norm.eps)
    if fused and backend == "auto" and _triton_suits(x, residual, norm):
        w, b = _affine(norm, flip_weight)
        res_dtype = residual_dtype(x, residual, residual_in_fp32)
        out, new_residual = add_norm_triton(x, residual, w, b, norm.eps, isinstance(norm, RMSNorm), res_dtype,
                                            store_residual=prenorm)
        return (out, new_residual) if prenorm else out
    if fused:
        s = x.float() if residual is None else x.float() + residual.float()
        out = norm_float32(s, norm, flip_weight).to(x.dtype)
        new_residual = s.to(residual_dtype(x, residual, residual_in_fp32))
    else:
        new_residual = x if residual is None else x + residual
        out = norm(new_residual.to(norm.weight.dtype))
        if residual_in_fp32:
            new_residual = new_residual.float()
    return (out, new_residual) if prenorm else out
