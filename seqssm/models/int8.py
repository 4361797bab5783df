"""Int8 storage of weight matrices: symmetric rounding with one float32 scale per row.

Storage compression only. Weights are dequantised once, when a model is loaded, and the model
then computes in float32 (or whatever it is moved to). It halves a float16 file: the bundled
d_model 512 chemical LM is 14 MB instead of 26 MB. Its MOSES metrics were measured on the
rounded weights (docs/BENCHMARKS.md), since rounding is not free in general.

In model.safetensors a rounded tensor `name` is stored as int8 under `name` and its scales,
float32 [rows], under `name + SCALE_SUFFIX`. Every other tensor is stored unchanged. The
metadata entry "quantization" reads QUANTIZATION.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = ".int8_scale"
QUANTIZATION = "int8-rowwise"
MIN_NUMEL = 4096  # smaller matrices (and all vectors, S4 kernel parameters) are not worth the error


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, cols], scale float32 [rows]) with w ~= q * scale[:, None], |q| <= 127.

    scale = max |w[row]| / 127, so each element is off by at most scale / 2. An all-zero row gets
    scale 0 and q 0, and dequantises to exact zeros.
    """
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"expected a floating-point matrix, got {w.dtype} of shape {tuple(w.shape)}")
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * scale[:, None]."""
    return q.float() * scale.float()[:, None]


def is_quantizable(name: str, t: torch.Tensor) -> bool:
    """Weight matrices of at least MIN_NUMEL elements: linear layers, embeddings, LM heads."""
    return t.is_floating_point() and t.ndim == 2 and name.endswith(".weight") and t.numel() >= MIN_NUMEL


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for storage: quantizable matrices as int8 + scales, the rest as given."""
    out = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"{name}: tensor names ending in {SCALE_SUFFIX!r} are reserved for int8 scales")
        if is_quantizable(name, t):
            out[name], out[name + SCALE_SUFFIX] = quantize_rowwise(t)
        else:
            out[name] = t
    return out


def dequantize_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of quantize_state (up to the rounding): int8 tensors with their scales -> float32.

    A state without int8 tensors comes back as it is. Raises ValueError for an int8 tensor
    without its scales, scales without their tensor, or shapes that do not match.
    """
    out = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise ValueError(f"{name}: int8 scales without the tensor {name[: -len(SCALE_SUFFIX)]!r}")
            continue
        if t.dtype != torch.int8:
            out[name] = t
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None:
            raise ValueError(f"{name}: int8 tensor without its scales {name + SCALE_SUFFIX!r}")
        if t.ndim != 2 or tuple(scale.shape) != (t.shape[0],):
            raise ValueError(f"{name}: int8 tensor of shape {tuple(t.shape)} with scales of shape "
                             f"{tuple(scale.shape)}; expected a matrix and one scale per row")
        out[name] = dequantize_rowwise(t, scale)
    return out
