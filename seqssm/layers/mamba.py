"""The Mamba mixer (Gu & Dao 2023, "Mamba-1" / mamba_simple in mamba-ssm) and its residual Block.

    hidden [B, L, d_model] --in_proj--> x, z                    [B, d_inner, L] each (d_inner = expand * d_model)
    x <- silu(causal depthwise conv1d(x))                       width d_conv
    dt, B, C <- split(x_proj(x))                                dt_rank, d_state, d_state per position
    dt <- dt_proj.weight @ dt                                   (its bias is added inside the scan)
    y  <- selective_scan(x, dt, A = -exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus)
    out <- out_proj(y)                                          [B, L, d_model]

Parameter names, shapes and initialization are those of mamba-ssm, so its state dicts (and those
of models built on it, like Caduceus) load unchanged: in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj. A_log and D are kept in float32 whatever the module's dtype, as in mamba-ssm.

Recurrent use. The state of one block is (conv_state [B, d_inner, d_conv]: the last d_conv inputs
of the convolution, oldest first; ssm_state [B, d_inner, d_state] float32). `allocate_state`
makes a zero state, `step` advances it by one position (in place), and
`forward(x, state=..., return_state=True)` processes a whole window from a given state and
returns the state after it, so a chromosome can be run window by window with exact left context:
forward over [w1, w2] == forward(w1) then forward(w2, state=state after w1).

Backends: "auto" scans with seqssm's Triton (Gluon) kernel for inference (no gradient) on a GPU
(ops.selective_scan.mixer_backend: where mamba-ssm is installed, from 2 rows up or from an initial
state, where seqssm's path was the faster one); with a gradient it uses the CUDA kernels of mamba-ssm /
causal-conv1d when the input is on a GPU and they are installed (imported on first use), the PyTorch
implementations in seqssm.ops otherwise. The commands' --backend option sets them per model
(configure_backend); "triton" forces that scan, "cuda" mamba-ssm's kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.errors import SeqssmError
from seqssm.layers.norm import add_norm
from seqssm.ops.causal_conv import causal_conv1d, causal_conv1d_kernels_available, causal_conv1d_update
from seqssm.ops.selective_scan import (cuda_kernels_available, mixer_backend, selective_scan,
                                       selective_state_update)
from seqssm.ops.selective_scan_triton import triton_scan_available

MambaState = tuple[torch.Tensor, torch.Tensor]  # (conv_state, ssm_state)


class Mamba(nn.Module):
    """Selective state-space mixer: [B, L, d_model] -> [B, L, d_model], causal (left to right)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path  # on CUDA: the fused mamba_inner_fn when no state is carried
        self.layer_idx = layer_idx
        self.backend = backend

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # dt_proj.weight ~ U(-s, s) (or = s) with s = dt_scale / sqrt(dt_rank), preserving variance.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        # dt_proj.bias such that softplus(bias) is log-uniform in [dt_min, dt_max] (floored):
        # the inverse of softplus(b) = log(1 + e^b) is b = dt + log(1 - e^-dt).
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # model-level init must not zero it

        # S4D-real: A[d, n] = -(n + 1), stored as A_log = log(n + 1).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    # -- helpers
    def _kernel_backend(self) -> str:
        """The backend of the convolution and the one-step update: "triton" names a scan only."""
        return "auto" if self.backend == "triton" else self.backend

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # [d_inner, d_conv]

    def _ssm_inputs(self, x: torch.Tensor):
        """x [B, d_inner, L] (after the conv) -> dt [B, d_inner, L] (no bias), B, C [B, d_state, L]."""
        # weight @ x per row (batched GEMMs, the weight broadcast with batch stride 0): [B, dt_rank +
        # 2 d_state, L] with length the fastest axis, the layout the scan wants, without a transposed
        # copy of x ([B, d_inner, L]); torch.matmul would fold the batch into one GEMM over x^T, a copy
        batch = x.shape[0]
        x_dbl = torch.bmm(self.x_proj.weight.to(x.dtype).expand(batch, -1, -1), x)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        return torch.bmm(self.dt_proj.weight.to(dt.dtype).expand(batch, -1, -1), dt), Bm, Cm

    def allocate_state(self, batch_size: int, *, device=None, dtype=None) -> MambaState:
        """Zero (conv_state [B, d_inner, d_conv] in the conv's dtype, ssm_state [B, d_inner, d_state] float32)."""
        device = self.out_proj.weight.device if device is None else device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return conv_state, ssm_state

    # -- the three parts of forward (a bidirectional wrapper shares the projections between directions)
    def projections(self, flip_channels: bool = False):
        """(in_proj weight, out_proj weight, out_proj bias), channel-reversed for flip_channels."""
        w_in, w_out, b_out = self.in_proj.weight, self.out_proj.weight, self.out_proj.bias
        if flip_channels:
            w_in, w_out = w_in.flip(1), w_out.flip(0)
            b_out = None if b_out is None else b_out.flip(0)
        return w_in, w_out, b_out

    def project_in(self, hidden_states: torch.Tensor, w_in: torch.Tensor) -> torch.Tensor:
        """[B, L, d_model] -> xz [B, 2 d_inner, L]."""
        batch, L, _ = hidden_states.shape
        # in_proj as mamba-ssm computes it: weight @ hidden^T, giving [B, 2 d_inner, L] with length
        # the fastest axis (the layout the conv and scan kernels want).
        xz = (w_in @ hidden_states.reshape(batch * L, -1).t()).view(-1, batch, L).transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        return xz

    def mix(self, xz: torch.Tensor, state: MambaState | None = None, return_state: bool = False,
            reverse: bool = False):
        """xz [B, 2 d_inner, L] -> y [B, d_inner, L]: conv, SiLU, the selective scan gated by z (and the
        SSM state after the window with return_state). reverse: the same read from the last position
        to the first (anti-causal conv, scan run backwards), equal to flipping xz along the length and
        the result back, without those copies (a bidirectional mixer's backward direction)."""
        x, z = xz.chunk(2, dim=1)
        conv_state, ssm_state = (None, None) if state is None else state
        if reverse and state is not None:
            raise ValueError("Mamba.mix: reverse=True starts from no state")
        init = None if conv_state is None else conv_state[..., conv_state.shape[-1] - (self.d_conv - 1):]
        x = causal_conv1d(x, self._conv_weight(), self.conv1d.bias, initial_states=init,
                          activation="silu", backend=self._kernel_backend(), reverse=reverse)
        dt, Bm, Cm = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.float())
        return selective_scan(
            x, dt, A, Bm, Cm, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=return_state, initial_state=ssm_state, backend=self.backend, reverse=reverse,
        )

    def project_out(self, y: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor | None,
                    accumulate: torch.Tensor | None = None) -> torch.Tensor:
        """y [B, d_inner, L] -> [B, L, d_model] (plus b_out); with `accumulate`, y's projection is added
        to that tensor in place (by the matmul) and it is returned, without the bias."""
        batch = y.shape[0]
        # out_proj on y read transposed in place (F.linear would copy y^T to fold the batch)
        w = w_out.t().to(y.dtype).expand(batch, -1, -1)
        if accumulate is not None:
            return accumulate.baddbmm_(y.transpose(1, 2), w)
        out = torch.bmm(y.transpose(1, 2), w)
        return out if b_out is None else out + b_out.to(out.dtype)

    # -- whole sequences
    def forward(self, hidden_states: torch.Tensor, state: MambaState | None = None, return_state: bool = False,
                flip_channels: bool = False):
        """hidden_states [B, L, d_model] -> [B, L, d_model]; with return_state, also the state after.

        `state` (conv_state, ssm_state) is the state before the first position (zeros if None); it
        is not modified. flip_channels: compute flipC(self(flipC(hidden_states))) (flipC reverses
        the d_model channels) by reversing in_proj's input columns and out_proj's output rows
        instead of the activations (used by the RC-equivariant blocks).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: expected [batch, length, {self.d_model}], got {tuple(hidden_states.shape)}")
        batch, L, _ = hidden_states.shape
        if L == 0:
            raise ValueError("Mamba: empty sequence (length 0)")
        w_in, w_out, b_out = self.projections(flip_channels)
        xz = self.project_in(hidden_states, w_in)
        if state is None and not return_state and self.use_fast_path and mixer_backend(self.backend, xz) == "cuda":
            fast = _mamba_inner(self, xz, -torch.exp(self.A_log.float()), w_out, b_out)
            if fast is not None:
                return fast

        res = self.mix(xz, state=state, return_state=return_state)
        y, last = res if return_state else (res, None)
        out = self.project_out(y, w_out, b_out)
        if not return_state:
            return out
        conv_state = None if state is None else state[0]
        # The conv state after the window: the last d_conv inputs of [previous inputs, this window].
        x_in = xz[:, : self.d_inner]
        state_dtype = self.conv1d.weight.dtype if conv_state is None else conv_state.dtype
        prev = x_in.new_zeros(batch, self.d_inner, self.d_conv) if conv_state is None else conv_state.to(x_in.dtype)
        new_conv = torch.cat([prev, x_in[..., -self.d_conv:]], dim=-1)[..., -self.d_conv:].to(state_dtype)
        return out, (new_conv, last)

    # -- one position
    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One position: hidden_states [B, 1, d_model] or [B, d_model] -> out of the same shape.

        conv_state and ssm_state are updated in place (and returned, as in mamba-ssm).
        """
        squeeze = hidden_states.dim() == 3
        if squeeze:
            if hidden_states.shape[1] != 1:
                raise ValueError(f"Mamba.step: one position at a time, got length {hidden_states.shape[1]}")
            hidden_states = hidden_states[:, 0]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # [B, d_inner] each
        x = causal_conv1d_update(x, conv_state, self._conv_weight(), self.conv1d.bias, "silu",
                                 backend=self._kernel_backend())
        dt, Bm, Cm = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added in the update
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(ssm_state, x, dt, A, Bm, Cm, self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True, backend=self._kernel_backend())
        out = self.out_proj(y)
        return (out.unsqueeze(1) if squeeze else out), conv_state, ssm_state


BACKENDS = ("auto", "torch", "cuda", "triton")


def check_backend(backend: str, device: torch.device | str, *, training: bool) -> None:
    """The --backend option of the commands, checked before any work: what cannot work on `device`
    is a one-line error now, not at the first forward pass (see configure_backend for the values)."""
    allowed = BACKENDS[:3] if training else BACKENDS
    if backend not in allowed:
        hint = " (triton is for inference: embed, predict)" if backend == "triton" else ""
        raise SeqssmError(f"--backend {backend!r}: expected one of {', '.join(allowed)}{hint}")
    if backend in ("cuda", "triton") and torch.device(device).type != "cuda":
        raise SeqssmError(f"--backend {backend} needs a CUDA device (--device cuda), not {device}")
    if backend == "cuda" and not (cuda_kernels_available() and causal_conv1d_kernels_available()):
        raise SeqssmError("--backend cuda: the mamba-ssm / causal-conv1d kernels are not installed (or failed "
                          "to import): pip install \"seqssm[gpu]\", or use --backend auto")
    if backend == "triton" and not triton_scan_available():
        raise SeqssmError("--backend triton: Triton is not installed (it comes with the CUDA builds of torch)")


def configure_backend(model: nn.Module, backend: str, device: torch.device | str, *, training: bool) -> int:
    """Set the kernels of every Mamba mixer in `model` (the --backend option of the commands), after
    check_backend; returns how many mixers there are (0 for a HyenaDNA model: no effect).

    "auto": for inference on a GPU seqssm's Triton scan (mixer_backend), for training mamba-ssm +
    causal-conv1d on a GPU where installed, else PyTorch; "torch": PyTorch only; "cuda": mamba-ssm +
    causal-conv1d; "triton": seqssm's Triton scan (inference only), the convolution as "auto".
    """
    check_backend(backend, device, training=training)
    mixers = [m for m in model.modules() if isinstance(m, Mamba)]
    for m in mixers:
        m.backend = backend
    return len(mixers)


def _mamba_inner(m: Mamba, xz: torch.Tensor, A: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor | None):
    """mamba-ssm's fused conv + scan + out_proj (its training fast path), or None if unavailable."""
    try:
        from causal_conv1d import causal_conv1d_fn  # noqa: F401  (mamba_inner_fn needs it)
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception:
        return None
    return mamba_inner_fn(
        xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight, w_out.contiguous(),
        b_out, A, None, None, m.D.float(), delta_bias=m.dt_proj.bias.float(), delta_softplus=True,
    )


class Block(nn.Module):
    """mamba-ssm's Block without MLP: residual add + norm, then the mixer.

        hidden, residual = add_norm(hidden, residual, norm)   (residual None in the first block)
        hidden = mixer(hidden)
        return hidden, residual

    The model adds the last mixer output to the residual and applies its final norm. Parameters
    `mixer.*` and `norm.*`, as in mamba-ssm (and in Caduceus's non-RC-equivariant blocks).
    """

    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, fused_add_norm: bool = False,
                 residual_in_fp32: bool = False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm
        self.mixer = mixer

    def forward(self, hidden_states, residual=None, state: MambaState | None = None, return_state: bool = False,
                lengths: torch.Tensor | None = None):
        """(hidden, residual) -> (mixer output, new residual); with return_state also the mixer state.
        `lengths` (right-padded rows) goes to a mixer that reads right to left (BiMambaWrapper)."""
        hidden_states, residual = add_norm(hidden_states, residual, self.norm, residual_in_fp32=self.residual_in_fp32,
                                           prenorm=True, fused=self.fused_add_norm)
        if lengths is not None:
            return self.mixer(hidden_states, lengths=lengths), residual
        if state is None and not return_state:
            return self.mixer(hidden_states), residual
        out, new_state = self.mixer(hidden_states, state=state, return_state=True)
        return (out, residual, new_state) if return_state else (out, residual)

    def step(self, hidden_states, residual, conv_state, ssm_state):
        """One position through the block; the mixer's states are updated in place."""
        hidden_states, residual = add_norm(hidden_states, residual, self.norm, residual_in_fp32=self.residual_in_fp32,
                                           prenorm=True, fused=self.fused_add_norm)
        out, _, _ = self.mixer.step(hidden_states, conv_state, ssm_state)
        return out, residual
