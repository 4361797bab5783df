"""The S4 layer (Gu, Goel & Re 2022), as used by the S4 chemical language model (Ozcelik et al. 2024).

    u [B, L, H] --causal SSM convolution + D u (one SSM per channel, FFT)--> GELU --> dropout
              --> Linear(H, 2H) --> GLU --> y [B, L, H]

Two modes for the SSMs (seqssm.ops.s4_kernel has the maths and the twins):
  "nplr"  S4: A = diag(w) - P P^* from HiPPO-LegS, bilinear discretisation, Cauchy kernel.
  "diag"  S4D: A = diag(w), zero-order hold, Vandermonde kernel (init S4D-LegS or S4D-Lin).

Parameters (n = d_state/2 stored conjugate pairs, S = n_ssm copies of (A, B, P), default H, one
per channel; channel h uses copy h % S; complex numbers stored as a trailing real/imag pair):
  log_dt      [H]        dt = exp(log_dt), initialised log-uniform in [dt_min, dt_max]
  log_A_real  [S, n]     Re w = -exp(log_A_real) < 0, so every mode decays
  A_imag      [S, n]     Im w
  B           [S, n, 2]
  P           [S, n, 2]  ("nplr" only; rank 1)
  C           [H, n, 2]  "nplr" with l_max: C~ = C (I - dA^l_max), the quantity the kernel needs
                         (as in the reference implementation); otherwise the plain C
  D           [H]        skip
  output_linear          Linear(H, 2H), followed by a GLU
`ssm_parameters()` lists log_dt, log_A_real, A_imag, B, P; each also carries `_optim =
{"weight_decay": 0.0, "lr": ssm_lr}` (S4's convention: lr 0.001, no weight decay) for a trainer
that builds its parameter groups from it.

Lengths: with l_max the kernel is computed at length l_max (cost independent of L) and cut to
the input's length; longer inputs are refused. "nplr" without l_max converts C to C~ on every
forward with a dense matrix power (exact for any length, slower: pass l_max when you know it).

Precision: the kernel is computed in float64 from the (float32) parameters and handed to the
float32 convolution (a batched Toeplitz GEMM for inputs up to 256 tokens, the FFT beyond). It is only H x L numbers, and float32 loses up to ~4e-5 of it (the
phases l dt Im(w) of the fast modes reach 1e4 radians), which would show as a step/forward
mismatch. Autocast is off inside; under bf16 autocast the output projection runs in bf16.

Recurrent mode: `setup_step()` discretises once (float64 on the CPU, then the parameters'
complex dtype on their device) and caches the result; train(True), load_state_dict, .to() and
in-place updates that bump version counters invalidate it, and `step()` and `default_state()`
set it up again when stale (setup_step names the blind spot: parameters changed in eval mode by a
fused optimizer or through p.data). The state is [batch, H, M] complex (complex64 for float32
parameters):
  "diag"  exact diagonal recurrence, M = n.
  "nplr"  exact DPLR step (Woodbury; see s4_kernel.DPLRRecurrence), M = n; or, with
          setup_step(diagonalize=True), the eigendecomposed recurrence (M = 2n) when it passes
          the accuracy check in complex64 -- which it does not near the HiPPO-LegS init.
Other step states: float16 real/imaginary pairs [batch, H, M, 2] (the fused CUDA step computes
in float32 and rounds on store; the sampler's compact option), and `KernelHistory` (the inputs so
far; y_t = sum_s K[t-s] u_s, the same outputs at far less memory traffic on CPUs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.ops.fftconv import fftconv
from seqssm.ops.s4_step import can_fuse, fused_step, is_half_state
from seqssm.ops.toeplitz import TOEPLITZ_MAX_LEN, toeplitz_conv
from seqssm.ops.s4_kernel import (
    Recurrence,
    c_from_tilde,
    c_tilde,
    c_tilde_dense,
    discretize_for_step,
    nplr_kernel,
    nplr_legs,
    s4d_kernel,
    s4d_legs,
    s4d_lin,
)

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128, torch.float16: torch.complex64,
            torch.bfloat16: torch.complex64}


def _as_complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_complex else _COMPLEX[dtype]


def _version(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:  # inference tensors (made under torch.inference_mode) have no version counter
        return -1


def _drop_step_cache(module: "S4Layer", incompatible_keys) -> None:
    module._step_cache = None


HISTORY_BLOCK = 8  # steps whose outputs from earlier inputs one batched GEMM per layer gives at once


@dataclass
class KernelHistory:
    """State of the convolution-history step: y_t = sum_{s<=t} K[t-s] u_s over the layer's inputs
    so far is the output the recurrence gives (K is its impulse response), at t multiply-adds per
    channel instead of a pass over the N/2 complex states: much cheaper on a CPU for
    SMILES-length sequences.

    ``hist`` [H, R, B] float32 holds the inputs by step (a ring of R >= l_max steps, R a multiple
    of the block); ``pre`` [H, HISTORY_BLOCK, B] the current block's outputs from the inputs
    before the block, computed at its first step with one GEMM per channel, so each step itself
    only sums over the block's own inputs (reading the whole history every step cost as much as
    the step's matmuls).

    Rows may start over at different steps (continuous batching, ``restart_rows``): then ``t``
    is a clock shared by all rows, and a restarted row's entries before its start are zero, so
    the same sums over the shared clock give each row its own sequence's output. ``start`` ([B]
    clock of each row's first input) and ``oldest`` (its minimum: how far back the sums must
    reach) exist only once a row has been restarted."""

    hist: torch.Tensor
    pre: torch.Tensor
    t: int = 0
    start: torch.Tensor | None = None
    oldest: int = 0

    def restart_rows(self, rows: torch.Tensor) -> None:
        """Rows (indices) start a new sequence at the next step."""
        if self.start is None:
            self.start = torch.zeros(self.hist.shape[-1], dtype=torch.long, device=self.hist.device)
        keep = torch.ones(self.hist.shape[-1], device=self.hist.device).index_fill_(0, rows, 0.0)
        self.hist.mul_(keep)  # (rows are the last dimension: a masked multiply beats a strided fill)
        self.pre.mul_(keep)
        self.start.index_fill_(0, rows, self.t)
        self.oldest = int(self.start.min())


class S4Layer(nn.Module):
    """S4 / S4D sequence mixer: [B, L, H] -> [B, L, H], causal. See the module docstring."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        mode: str = "nplr",
        dropout: float = 0.0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        l_max: int | None = None,
        *,
        init: str = "legs",
        n_ssm: int | None = None,
        ssm_lr: float | None = 0.001,
        step_tol: float = 1e-5,
    ):
        super().__init__()
        if mode not in ("nplr", "diag"):
            raise ValueError(f"mode must be 'nplr' or 'diag', got {mode!r}")
        if init not in ("legs", "lin") or (mode == "nplr" and init != "legs"):
            raise ValueError(f"init must be 'legs' (or 'lin' for mode 'diag'), got {init!r} for mode {mode!r}")
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be even and >= 2 (conjugate pairs), got {d_state}")
        n_ssm = d_model if n_ssm is None else n_ssm
        if n_ssm < 1 or d_model % n_ssm:
            raise ValueError(f"n_ssm ({n_ssm}) must divide d_model ({d_model})")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if l_max is not None and l_max < 1:
            raise ValueError(f"l_max must be >= 1, got {l_max}")
        self.d_model = self.H = d_model
        self.d_state = d_state
        self.mode = mode
        self.l_max = l_max
        self.n_ssm = n_ssm
        self.step_tol = step_tol
        H, n = d_model, d_state // 2

        if mode == "nplr":
            w, P, B, _ = nplr_legs(d_state)
        else:
            w, B = s4d_legs(d_state) if init == "legs" else s4d_lin(d_state)
            P = None
        log_dt = torch.rand(H, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        C = torch.randn(H, n, dtype=torch.complex128)  # real and imaginary parts of variance 1/2
        if mode == "nplr" and l_max is not None:
            C = c_tilde(log_dt, w.expand(H, n), P.expand(H, n), C, l_max)

        f32 = torch.get_default_dtype()
        self.log_dt = nn.Parameter(log_dt.to(f32))
        self.log_A_real = nn.Parameter(torch.log(-w.real).expand(n_ssm, n).to(f32).clone())
        self.A_imag = nn.Parameter(w.imag.expand(n_ssm, n).to(f32).clone())
        self.B = nn.Parameter(torch.view_as_real(B.expand(n_ssm, n)).to(f32).clone())
        if P is not None:
            self.P = nn.Parameter(torch.view_as_real(P.expand(n_ssm, n)).to(f32).clone())
        else:
            self.register_parameter("P", None)
        self.C = nn.Parameter(torch.view_as_real(C).to(f32).clone())
        self.D = nn.Parameter(torch.randn(H))
        for p in self.ssm_parameters():
            p._optim = {"weight_decay": 0.0} if ssm_lr is None else {"weight_decay": 0.0, "lr": ssm_lr}

        self.dropout = nn.Dropout(dropout)
        self.output_linear = nn.Linear(H, 2 * H)
        self._step_cache: tuple | None = None  # (key, recurrence, diag_error)
        self._diagonalize = False
        self.register_load_state_dict_post_hook(_drop_step_cache)

    def ssm_parameters(self) -> list[nn.Parameter]:
        """The parameters of A, B, P and dt (S4 trains them with lr 0.001 and no weight decay)."""
        return [p for p in (self.log_dt, self.log_A_real, self.A_imag, self.B, self.P) if p is not None]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, mode={self.mode!r}, l_max={self.l_max}, "
                f"n_ssm={self.n_ssm}")

    # -- the SSM in complex form ----------------------------------------------------------------

    def _ssm(self, dtype: torch.dtype = torch.float64):
        """(log_dt [H], w, P, B, C [H, n] complex) in `dtype` (real) / its complex counterpart."""
        cdtype = _as_complex_dtype(dtype)
        reps = self.H // self.n_ssm

        def per_channel(t: torch.Tensor) -> torch.Tensor:  # [S, ...] -> [H, ...]: copy h % S
            return t if reps == 1 else t.repeat(reps, *([1] * (t.dim() - 1)))

        def cplx(t: torch.Tensor) -> torch.Tensor:
            return torch.view_as_complex(t.to(dtype)).to(cdtype)

        w = torch.complex(-self.log_A_real.to(dtype).exp(), self.A_imag.to(dtype))
        P = None if self.P is None else per_channel(cplx(self.P))
        return self.log_dt.to(dtype), per_channel(w), P, per_channel(cplx(self.B)), cplx(self.C)

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel for an input of length L, [H, L], in the parameters' dtype."""
        if self.l_max is not None and L > self.l_max:
            raise ValueError(f"sequence length {L} exceeds this S4 layer's l_max {self.l_max}")
        with torch.autocast(device_type=self.D.device.type, enabled=False):
            log_dt, w, P, B, C = self._ssm(torch.float64)
            if self.mode == "diag":
                K = s4d_kernel(log_dt, w, B, C, L)
            elif self.l_max is None:
                K = nplr_kernel(log_dt, w, P, B, c_tilde_dense(log_dt, w, P, C, L), L)
            else:
                K = nplr_kernel(log_dt, w, P, B, C, self.l_max)[:, :L]
        return K.to(self.D.dtype)

    # -- convolution mode -----------------------------------------------------------------------

    @torch.compiler.disable  # complex128 maths: inductor cannot generate it; the rest compiles
    def _kernel_for(self, L: int) -> torch.Tensor:
        return self.kernel(L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, H] -> [B, L, H]; the output at t depends on x[:, :t+1] only.

        Short inputs (SMILES) convolve as one batched Toeplitz matrix product, long ones by FFT;
        both in float32 (seqssm.ops.toeplitz, seqssm.ops.fftconv)."""
        L = x.shape[-2]
        k = self._kernel_for(L)
        if L <= TOEPLITZ_MAX_LEN:
            y = toeplitz_conv(x, k, self.D)
        else:
            y = fftconv(x.transpose(-1, -2), k, self.D).transpose(-1, -2)
        y = self.dropout(F.gelu(y))
        return F.glu(self.output_linear(y), dim=-1)

    # -- recurrent mode -------------------------------------------------------------------------

    def _step_key(self) -> tuple:
        return tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in [*self.ssm_parameters(), self.C])

    def train(self, mode: bool = True) -> "S4Layer":
        if mode:  # training changes the parameters, not always visibly (see setup_step)
            self._step_cache = None
        return super().train(mode)

    @torch.no_grad()
    def setup_step(self, *, force: bool = False, diagonalize: bool | None = None) -> None:
        """Discretise for `step()` and cache it (a no-op while the SSM parameters are unchanged).

        "diag": the exact diagonal recurrence (N/2 states). "nplr": the exact DPLR step (N/2
        states, O(N)); with diagonalize=True (remembered for later automatic setups) the
        eigendecomposition is tried first and kept if it passes the accuracy check in the
        parameters' complex dtype (`step_tol`). It rarely does near the HiPPO-LegS init, costs a
        batch of N x N eigenproblems, and its N states cost a fused step as much as the DPLR
        step's N/2, so it is off by default. Computed on the CPU in float64.

        Staleness: the cache is dropped by train(True) and load_state_dict, never trusted in
        training mode, and keyed on each SSM parameter's storage, dtype, device and version
        counter. Fused optimizers (torch.optim fused=True) and writes through `p.data` do not
        bump version counters: after changing parameters that way in eval mode, call
        setup_step(force=True).
        """
        if diagonalize is not None and diagonalize != self._diagonalize:
            self._diagonalize, force = diagonalize, True
        key = self._step_key()
        if not force and self._step_cache is not None and self._step_cache[0] == key:
            return
        with torch.autocast(device_type=self.D.device.type, enabled=False):
            log_dt, w, P, B, C = (None if t is None else t.detach().cpu() for t in self._ssm(torch.float64))
            if self.mode == "nplr" and self.l_max is not None:
                C = c_from_tilde(log_dt, w, P, C, self.l_max)
            form = discretize_for_step(self.mode, log_dt, w, B, C, P, dtype=_as_complex_dtype(self.D.dtype),
                                       check_length=self.l_max or 128, diagonalize=self._diagonalize,
                                       tol=self.step_tol)
        rec = type(form.recurrence)(**{k: t.to(self.D.device) for k, t in form.recurrence.tensors().items()})
        self._step_cache = (key, rec, form.diag_error)

    def recurrence(self) -> Recurrence:
        """The cached recurrent form (set up first if missing or stale; always anew in training mode)."""
        if self.training or self._step_cache is None or self._step_cache[0] != self._step_key():
            self.setup_step(force=True)
        return self._step_cache[1]

    def diagonalization_error(self) -> float | None:
        """For "nplr" set up with diagonalize=True: the relative kernel error of the diagonalised
        recurrence (run in the parameters' complex dtype) that the last setup measured; else None."""
        self.recurrence()
        return self._step_cache[2]

    def default_state(self, batch: int, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Zero state [batch, H, M] (complex; a real `dtype` means its complex counterpart)."""
        rec = self.recurrence()
        dtype = _as_complex_dtype(dtype or self.D.dtype)
        return torch.zeros(batch, self.H, rec.state_size, dtype=dtype, device=device or self.D.device)

    def history_state(self, batch: int, device=None) -> KernelHistory:
        """Zero state for the convolution-history step (needs l_max)."""
        if self.l_max is None:
            raise ValueError("the convolution-history step needs a layer built with l_max")
        P = HISTORY_BLOCK
        ring = -(-self.l_max // P) * P
        device = device or self.D.device
        return KernelHistory(torch.zeros(self.H, ring, batch, device=device),
                             torch.zeros(self.H, P, batch, device=device))

    @torch.no_grad()
    def _history_kernel(self) -> torch.Tensor:
        """K(l_max) as [H, l_max + HISTORY_BLOCK] float32, zero beyond l_max; cached like the recurrence."""
        key = ("history", self._step_key())
        cache = getattr(self, "_history_cache", None)
        if self.training or cache is None or cache[0] != key:
            cache = (key, F.pad(self.kernel(self.l_max).float(), (0, HISTORY_BLOCK)).contiguous())
            self._history_cache = cache
        return cache[1]

    def _history_step(self, u: torch.Tensor, state: KernelHistory) -> torch.Tensor:
        t, L, P = state.t, self.l_max, HISTORY_BLOCK
        R = state.hist.shape[1]
        if state.start is None and t >= L:  # every row started at clock 0
            raise ValueError(f"step {t + 1} exceeds this S4 layer's l_max {L}")
        K = self._history_kernel()  # [H, L + P]
        j = t % P
        c0 = t - j
        if j == 0:  # a new block: its outputs from everything before it, for all P steps at once
            # back to the oldest row's first input; a row older than l_max steps has finished
            lo = 0 if state.start is None else max(state.oldest, c0 - L + 1)
            W = c0 - lo
            if W > 0:
                ar = torch.arange(P, device=K.device)[:, None] - torch.arange(W, device=K.device)[None, :]
                kt = K[:, W + ar]  # [H, P, W]: K[c0 + j - s] for s = lo .. c0-1 (zero past l_max)
                a = lo % R
                if a + W <= R:
                    torch.bmm(kt, state.hist[:, a:a + W], out=state.pre)
                else:  # the ring wraps
                    n1 = R - a
                    torch.bmm(kt[:, :, :n1], state.hist[:, a:], out=state.pre)
                    state.pre.baddbmm_(kt[:, :, n1:], state.hist[:, :W - n1])
            else:
                state.pre.zero_()
        slot = t % R  # the block never straddles the ring's end: R and c0 are multiples of P
        state.hist[:, slot].copy_(u.t())
        k = K[:, :j + 1].flip(-1)  # K[j], ..., K[0] for s = c0 .. t
        y = state.pre[:, j] + (state.hist[:, slot - j:slot + 1] * k[:, :, None]).sum(1)
        state.t = t + 1
        return y.t()

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step: x [B, H], state [B, H, M] -> (y [B, H], new state). Not differentiable
        through the SSM parameters (the recurrent form is cached without a graph)."""
        u = x.to(self.D.dtype)
        if isinstance(state, KernelHistory):
            y = self._history_step(u, state)
        else:
            rec = self.recurrence()
            if can_fuse(rec, state) or is_half_state(state):  # CUDA: one Triton kernel, state updated in place
                y = fused_step(rec, u, state)
            else:
                y, state = rec.step(u, state)
        y = (y + self.D * u).to(x.dtype)
        y = self.dropout(F.gelu(y))
        return F.glu(self.output_linear(y), dim=-1), state

    def recurrent_parameters(self) -> dict:
        """{"kind": "diag" | "dplr", the recurrence's tensors (see s4_kernel), "D": [H]} (detached)."""
        rec = self.recurrence()
        return {"kind": rec.kind, **rec.tensors(), "D": self.D.detach()}
