"""Choosing between a CUDA kernel package and the PyTorch reference ("auto", "torch", "cuda").

Shared by the selective scan (mamba-ssm) and the causal convolution (causal-conv1d): "auto" takes
the kernel when the tensors are on a GPU, the package imports and the inputs suit it; asking for
"cuda" where that cannot work is an error that says why.
"""

from __future__ import annotations

from typing import Callable

import torch

from seqssm.errors import SeqssmError

BACKENDS = ("auto", "torch", "cuda")


def resolve_backend(backend: str, tensor: torch.Tensor, kernel: Callable[[], object], what: str, package: str,
                    fits: Callable[[], bool] | None = None, unfit: str = "") -> str:
    """"torch" or "cuda" for `what` on tensors like `tensor`; `kernel()` is None when `package`
    is missing, `fits()` says whether these inputs suit the kernel (`unfit` says what it needs)."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    suits = fits is None or fits()
    if backend == "auto":
        return "cuda" if tensor.is_cuda and kernel() is not None and suits else "torch"
    if backend == "cuda":
        if not tensor.is_cuda:
            raise ValueError(f"{what}: backend 'cuda' needs tensors on a CUDA device, got {tensor.device}")
        if kernel() is None:
            raise SeqssmError(
                f"{what}: the {package} CUDA kernels are not installed (or failed to import): "
                "install them with `pip install \"seqssm[gpu]\"`, or use backend 'torch'"
            )
        if not suits:
            raise ValueError(f"{what}: {unfit}")
    return backend
