"""S4 and S4D: initialisations, convolution kernels and recurrent (step) forms, each with a twin.

One state space model per channel h (H channels, state size N):

    x'(t) = A x(t) + B u(t),    y(t) = C x(t) + D u(t)

discretised with a step dt_h into  x[t] = dA x[t-1] + dB u[t],  y[t] = C x[t] + D u[t],  which is
the causal convolution  y[t] = sum_{l<=t} K[l] u[t-l] + D u[t]  with  K[l] = C dA^l dB.
(D is left to the layer; everything here is about K and the state.)

Conjugate pairs. Every system is real, but written in a complex basis where the N state entries
come in conjugate pairs (x, conj x), so only one member of each pair is stored: w, P, B, C and the
state have N/2 complex entries (shapes [H, N/2] below, "n" = N/2), and a sum over the N states is
2 Re(sum over the N/2 stored ones). Functions that need the full N-dimensional system (the dense
twins) rebuild it with `full()`.

Two parameterisations of A:

* NPLR (S4; Gu, Goel & Re 2022): A = diag(w) - P P^*, rank 1, bilinear (Tustin) discretisation
      dA = (I - dt/2 A)^-1 (I + dt/2 A),   dB = (I - dt/2 A)^-1 dt B.
  `nplr_kernel` never forms dA: the length-L kernel's DFT is its generating function at the L-th
  roots of unity z_k = exp(-2 pi i k/L),
      Khat(z) = sum_{l<L} C dA^l dB z^l = Ct (I - dA z)^-1 dB,    Ct = C (I - dA^L)
  ("C tilde": the factor I - dA^L truncates the infinite sum at L, since z^L = 1), and
      (I - dA z)^-1 dB = 2/(1+z) (g(z) - A)^-1 B,   g(z) = 2/dt (1-z)/(1+z) = 2i tan(pi k/L)/dt,
  so Khat is a diagonal resolvent (a Cauchy sum over the eigenvalues w) plus a rank-1 Woodbury
  correction, and K = irfft(Khat). At z = -1 (Nyquist, even L) the limit is Khat = dt/2 Ct B.
  The parameter the S4 layer learns is Ct itself (for its maximum length), as in the reference.
  Twin: `dense_kernel` materialises dA, dB as dense N x N complex matrices and computes C dA^l dB.

* diagonal (S4D; Gu, Gupta, Goel & Re 2022): A = diag(w), zero-order hold
      dA = exp(dt w),   dB = (exp(dt w) - 1) / w * B,
  kernel through a Vandermonde product (`s4d_kernel`); twin `s4d_kernel_ref` takes the ZOH from
  a matrix exponential and unrolls the powers.

Precision: in float32 the kernels keep about 1e-6 (NPLR) and 1e-5 (S4D: the phases l dt Im(w)
of the fast modes reach 1e4 radians) of max |K|; the layer computes them in float64.

Recurrent forms (for token-by-token generation); the state is complex, the output 2 Re(dC . x):

* `DiagonalRecurrence` (dA, dB, dC diagonal): exact for S4D (`s4d_recurrence`), N/2 states.
* `DPLRRecurrence`: the bilinear step of an NPLR system done with the Woodbury identity, N/2
  states, O(N) per step, exact (`nplr_recurrence`; C from C~ by `c_from_tilde`).
* `nplr_diagonalize`: eigendecomposition of the dense dA (complex128) into a DiagonalRecurrence of
  N states (conjugate pairs do not survive in general: the exact LegS matrix has only real
  eigenvalues, -1, ..., -N; dC is halved so that the output is still 2 Re(dC . x)). It is only
  as good as the eigenvectors are conditioned, and HiPPO-LegS is the classic bad case (entries
  growing like 2^(4N/3), the reason S4 uses the NPLR form). Measured at N = 64, L = 100, worst of
  64 channels (`nplr_diagonalization_error`): exact LegS in float64: 0.4 relative kernel error;
  LegS rounded to float32 as a model stores it: 1e-7 in float64 but 67 (garbage) when the
  recurrence runs in complex64, because V^-1 dB holds entries of 1e7 and more whose products
  cancel; parameters moved by 0.1 % / 1 % / 10 % / 30 %: 1e-3 / 8e-5 / 2e-5 / 2e-6 in complex64.
  The exact DPLR step stays at 2e-6 in complex64 throughout, with half the states.
  `discretize_for_step` keeps the diagonal form only if it passes in the running dtype, else
  falls back to the DPLR step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

# ---------------------------------------------------------------------------------------------
# Initialisations (float64 / complex128; the caller casts)
# ---------------------------------------------------------------------------------------------


def hippo_legs(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The HiPPO-LegS transition (A [N, N], B [N]), real float64.

    A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k;  B[n] = sqrt(2n+1).
    """
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)
    return A, r.clone()


def nplr_legs(N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS in normal plus low-rank form: (w [N/2], P [N/2], B [N/2], V [N, N/2]), complex128.

    With p[n] = sqrt(n + 1/2), A + p p^T = -I/2 + S with S skew-symmetric, so A + p p^T is normal:
    S = U diag(i mu) U^* with U unitary (eigh of the Hermitian -iS), eigenvalues in pairs +-mu.
    Keeping the N/2 columns V of U with mu > 0 (the others are their conjugates),
        A = V_full (diag(w_full) - P_full P_full^*) V_full^*,   V_full = [V, conj V],
    with w = -1/2 + i mu, P = V^* p, B = V^* B_legs and x_full = [x, conj x] for every vector.
    """
    if N < 2 or N % 2:
        raise ValueError(f"the state size N must be even and >= 2 (conjugate pairs), got {N}")
    A, B = hippo_legs(N)
    p = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    S = A + p[:, None] * p[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)
    mu, U = torch.linalg.eigh(-1j * S.to(torch.complex128))
    keep = mu > 0
    if int(keep.sum()) != N // 2 or bool((mu.abs() < 1e-9).any()):
        raise ValueError(f"HiPPO-LegS skew part at N={N} does not split into N/2 conjugate pairs")
    V, mu = U[:, keep], mu[keep]
    w = torch.complex(torch.full_like(mu, -0.5), mu)
    Vh = V.conj().transpose(0, 1)
    return w, Vh @ p.to(torch.complex128), Vh @ B.to(torch.complex128), V


def s4d_legs(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D-LegS (w [N/2], B [N/2]): the diagonal (normal) part of the NPLR form of LegS, B halved.

    Dropping the low-rank term and halving B is the S4D paper's choice: the kernel of
    (diag(w), B/2) tends to the HiPPO-LegS kernel as N grows.
    """
    w, _, B, _ = nplr_legs(N)
    return w, B / 2


def s4d_lin(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S4D-Lin (w [N/2], B [N/2]): w_n = -1/2 + i pi n, B = 1."""
    if N < 2 or N % 2:
        raise ValueError(f"the state size N must be even and >= 2 (conjugate pairs), got {N}")
    n = torch.arange(N // 2, dtype=torch.float64)
    return torch.complex(torch.full_like(n, -0.5), math.pi * n), torch.ones(N // 2, dtype=torch.complex128)


def full(x: torch.Tensor) -> torch.Tensor:
    """[..., N/2] stored conjugate-pair half -> [..., N] full vector [x, conj x]."""
    return torch.cat([x, x.conj()], dim=-1)


# ---------------------------------------------------------------------------------------------
# Cauchy sums
# ---------------------------------------------------------------------------------------------


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, conj: bool = False,
           max_elements: int = 1 << 22) -> torch.Tensor:
    """r[..., l] = sum_n v[..., n] / (z[..., l] - w[..., n]), vectorised.

    With conj=True each term's conjugate partner conj(v_n) / (z_l - conj(w_n)) is added too (the
    sum over the full N states of a conjugate-pair system). Leading dimensions of v, z and w
    broadcast, so several v can share one set of reciprocals 1/(z - w) (computed once, then
    contracted with v). The nodes z are taken in chunks so that the [..., n, chunk] block of
    reciprocals stays under `max_elements`.
    """
    w = w.unsqueeze(-1)  # [..., n, 1]
    lead = torch.broadcast_shapes(w.shape[:-2], z.shape[:-1])
    chunk = max(1, max_elements // max(1, math.prod(lead) * w.shape[-2]))
    out = []
    for s in range(0, z.shape[-1], chunk):
        zc = z[..., None, s : s + chunk]  # [..., 1, c]
        r = torch.einsum("...n,...nl->...l", v, (zc - w).reciprocal())
        if conj:
            r = r + torch.einsum("...n,...nl->...l", v.conj(), (zc - w.conj()).reciprocal())
        out.append(r)
    return torch.cat(out, dim=-1)


def cauchy_naive(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, *, conj: bool = False) -> torch.Tensor:
    """`cauchy` as a plain loop over the n terms (for tests)."""
    r = torch.zeros((), dtype=torch.promote_types(v.dtype, z.dtype), device=z.device)
    for i in range(w.shape[-1]):
        vi, wi = v[..., i : i + 1], w[..., i : i + 1]
        r = r + vi / (z - wi)
        if conj:
            r = r + vi.conj() / (z - wi.conj())
    return r


# ---------------------------------------------------------------------------------------------
# NPLR (S4) kernel, bilinear discretisation
# ---------------------------------------------------------------------------------------------


def nplr_kernel(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
                C_tilde: torch.Tensor, L: int) -> torch.Tensor:
    """The length-L S4 kernel K [H, L] (real) of A = diag(w) - P P^* (bilinear), from C~.

    log_dt [H] real; w, P, B, C_tilde [H, N/2] complex. C_tilde = C (I - dA^L) for this same L
    (see `c_tilde`); passing the plain C gives the kernel aliased by its tail beyond L.
    Cost: one Cauchy sum of 4 vectors over L/2+1 nodes, O(H N L); differentiable.
    """
    if L < 1:
        raise ValueError(f"kernel length must be >= 1, got {L}")
    dt = log_dt.exp()
    k = torch.arange(L // 2 + 1, dtype=torch.float64, device=w.device)
    nyquist = L % 2 == 0
    t = torch.tan(math.pi * (k[:-1] if nyquist else k) / L)  # (1 - z)/(1 + z) = i t
    g = (2j * t).to(w.dtype)[None, :] / dt[:, None]  # [H, L'] bilinear image of the node z
    f = (1 + 1j * t).to(w.dtype)  # 2 / (1 + z)
    Q = P.conj()
    v = torch.stack([C_tilde * B, C_tilde * P, Q * B, Q * P])  # [4, H, n]
    r = cauchy(v, g, w, conj=True)  # [4, H, L']
    k_f = (r[0] - r[1] * r[2] / (1 + r[3])) * f  # Woodbury: (R^-1 + P Q^*)^-1
    if nyquist:
        k_nyq = dt * (C_tilde * B).sum(-1).real  # dt/2 * sum over the full N
        k_f = torch.cat([k_f, k_nyq.to(k_f.dtype)[:, None]], dim=-1)
    return torch.fft.irfft(k_f, n=L)


def bilinear_dense(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor,
                   B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bilinear discretisation of the full system: dA [H, N, N], dB [H, N] (complex)."""
    dt = log_dt.exp().to(w.dtype)[:, None, None]
    Pf = full(P)
    A = torch.diag_embed(full(w)) - Pf[..., :, None] * Pf.conj()[..., None, :]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    M0 = eye - dt / 2 * A
    dA = torch.linalg.solve(M0, eye + dt / 2 * A)
    dB = torch.linalg.solve(M0, dt * full(B)[..., None])[..., 0]
    return dA, dB


def dense_kernel(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, L: int) -> torch.Tensor:
    """K[h, l] = C dA^l dB with dense matrices: the obviously-right twin of `nplr_kernel` (takes C, not C~)."""
    dA, x = bilinear_dense(log_dt, w, P, B)
    Cf = full(C)
    out = []
    for _ in range(L):
        out.append((Cf * x).sum(-1).real)
        x = (dA @ x[..., None])[..., 0]
    return torch.stack(out, dim=-1)


def c_tilde(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """C~ = C (I - dA^L) [H, N/2], in O(L H N) without forming dA.

    C dA is the transpose of dA^T C^T, and A^T = diag(w) - conj(P) conj(P)^* is again NPLR (in
    the full basis P_full^T = (conj P_full)^*), so C dA^L is L zero-input steps of the DPLR
    recurrence of (w, conj P) started from C. Differentiable, but sequential in L.
    """
    rec = nplr_recurrence(log_dt, w, P.conj(), torch.zeros_like(w), C)
    x = C
    for _ in range(L):
        x = rec.update(x, None)
    return C - x


def c_tilde_dense(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """C~ = C (I - dA^L) through a dense matrix power (log2 L batched matmuls); differentiable."""
    dA, _ = bilinear_dense(log_dt, w, P, torch.zeros_like(w))
    Cf = full(C)
    Ct = Cf - (Cf[..., None, :] @ torch.linalg.matrix_power(dA, L))[..., 0, :]
    return Ct[..., : w.shape[-1]]


def c_from_tilde(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, C_tilde: torch.Tensor, L: int) -> torch.Tensor:
    """The output vector C [H, N/2] back from C~ = C (I - dA^L), in O(H L N) (use float64).

    Averaging the resolvent over the L-th roots of unity z_k inverts I - dA^L,
        (I - dA^L)^-1 = 1/L sum_k (I - z_k dA)^-1,
    and, with a = 1 - z, b = (1 + z) dt/2,  (I - z dA)^-1 = (a I - b A)^-1 (I - dt/2 A),  where
    a I - b A = diag(a - b w) + b p p^* is inverted by Woodbury. The terms of one k are not
    conjugate-symmetric, so this works on full N-vectors. Conditioned like I - dA^L: fine while
    every mode decays within L steps, ill when some channel barely does.
    Twin: `c_from_tilde_dense`.
    """
    dt = log_dt.exp().to(w.dtype)[:, None, None]  # [H, 1, 1]
    z = torch.exp(-2j * math.pi * torch.arange(L, dtype=torch.float64, device=w.device) / L).to(w.dtype)
    a, b = (1 - z)[:, None], (1 + z)[:, None] * dt / 2  # [L, 1], [H, L, 1]
    wf, pf, c = full(w)[:, None, :], full(P)[:, None, :], full(C_tilde)[:, None, :]  # [H, 1, N]
    R = 1 / (a - b * wf)  # [H, L, N]
    cR, qR = c * R, pf.conj() * R
    r = cR - b * (cR * pf).sum(-1, keepdim=True) / (1 + b * (qR * pf).sum(-1, keepdim=True)) * qR
    r = r * (1 - dt / 2 * wf) + dt / 2 * (r * pf).sum(-1, keepdim=True) * pf.conj()  # r (I - dt/2 A)
    return r.mean(dim=1)[..., : w.shape[-1]]


def c_from_tilde_dense(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, C_tilde: torch.Tensor,
                       L: int) -> torch.Tensor:
    """`c_from_tilde` with dense matrices: solve C (I - dA^L) = C~ (for tests)."""
    dA, _ = bilinear_dense(log_dt, w, P, torch.zeros_like(w))
    M = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device) - torch.linalg.matrix_power(dA, L)
    Cf = torch.linalg.solve(M.transpose(-1, -2), full(C_tilde)[..., None])[..., 0]
    return Cf[..., : w.shape[-1]]


# ---------------------------------------------------------------------------------------------
# Diagonal (S4D) kernel, zero-order hold
# ---------------------------------------------------------------------------------------------


def _zoh(log_dt: torch.Tensor, w: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtw = log_dt.exp().to(w.dtype)[:, None] * w
    return dtw, B * torch.expm1(dtw) / w  # expm1: exp(dt w) - 1 loses digits for small dt w


def s4d_kernel(log_dt: torch.Tensor, w: torch.Tensor, B: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """K[h, l] = 2 Re sum_n C_n dB_n exp(l dt w_n)  (S4D, ZOH), via a Vandermonde matrix. [H, L]."""
    dtw, dB = _zoh(log_dt, w, B)
    l = torch.arange(L, device=w.device, dtype=dtw.real.dtype)
    vandermonde = torch.exp(dtw[..., None] * l)  # [H, n, L]
    return 2 * torch.einsum("hn,hnl->hl", C * dB, vandermonde).real


def s4d_kernel_ref(log_dt: torch.Tensor, w: torch.Tensor, B: torch.Tensor, C: torch.Tensor, L: int) -> torch.Tensor:
    """`s4d_kernel` the long way (for tests): ZOH from the matrix exponential of the augmented
    system, expm(dt [[w, 1], [0, 0]]) = [[dA, dB/B], [0, 1]], then x <- dA x repeatedly."""
    dt = log_dt.exp().to(w.dtype)[:, None]
    M = torch.zeros(*w.shape, 2, 2, dtype=w.dtype, device=w.device)
    M[..., 0, 0], M[..., 0, 1] = dt * w, dt
    E = torch.linalg.matrix_exp(M)
    dA, x = E[..., 0, 0], E[..., 0, 1] * B
    out = []
    for _ in range(L):
        out.append(2 * (C * x).sum(-1).real)
        x = dA * x
    return torch.stack(out, dim=-1)


# ---------------------------------------------------------------------------------------------
# Recurrent forms
# ---------------------------------------------------------------------------------------------


@dataclass
class DiagonalRecurrence:
    """x <- dA * x + dB * u;  y = 2 Re(sum_m dC_m x_m).   dA, dB, dC: [H, M] complex."""

    dA: torch.Tensor
    dB: torch.Tensor
    dC: torch.Tensor
    kind: ClassVar[str] = "diag"

    @property
    def state_size(self) -> int:
        return self.dA.shape[-1]

    def update(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        x = self.dA * x
        return x if u is None else x + self.dB * u[..., None]

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (self.dC * x).sum(-1).real

    def step(self, u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [..., H] real, x [..., H, M] complex -> (y [..., H], new x)."""
        x = self.update(x, u)
        return self.output(x), x

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"dA": self.dA, "dB": self.dB, "dC": self.dC}

    def to(self, dtype: torch.dtype) -> "DiagonalRecurrence":
        return DiagonalRecurrence(*(t.to(dtype) for t in (self.dA, self.dB, self.dC)))


@dataclass
class DPLRRecurrence:
    """Exact bilinear step of A = diag(w) - P P^*, O(N), state N/2 complex:

        y  = F * x + P1 Re(sum Q x) + B1 u       (I + dt/2 A) x + dt B u
        x' = E * y + P2 Re(sum Q (E * y))        (I - dt/2 A)^-1 y, by Woodbury
        out = 2 Re(sum C x')

    with F = 1 + dt/2 w, Q = conj P, P1 = -dt P, B1 = dt B, E = 1/(1 - dt/2 w),
    P2 = -dt E P / (1 + dt sum |P|^2 Re E). (For the full vector [x, conj x], P^* x_full =
    2 Re(sum conj(P) x).) All [H, N/2] complex.
    """

    F: torch.Tensor
    P1: torch.Tensor
    Q: torch.Tensor
    B1: torch.Tensor
    E: torch.Tensor
    P2: torch.Tensor
    C: torch.Tensor
    kind: ClassVar[str] = "dplr"

    @property
    def state_size(self) -> int:
        return self.F.shape[-1]

    def update(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        y = self.F * x + self.P1 * (self.Q * x).sum(-1, keepdim=True).real
        if u is not None:
            y = y + self.B1 * u[..., None]
        y = self.E * y
        return y + self.P2 * (self.Q * y).sum(-1, keepdim=True).real

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (self.C * x).sum(-1).real

    def step(self, u: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [..., H] real, x [..., H, N/2] complex -> (y [..., H], new x)."""
        x = self.update(x, u)
        return self.output(x), x

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("F", "P1", "Q", "B1", "E", "P2", "C")}

    def to(self, dtype: torch.dtype) -> "DPLRRecurrence":
        return DPLRRecurrence(**{k: t.to(dtype) for k, t in self.tensors().items()})


Recurrence = DiagonalRecurrence | DPLRRecurrence


def s4d_recurrence(log_dt: torch.Tensor, w: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> DiagonalRecurrence:
    """The exact recurrent form of an S4D system (ZOH): dA = exp(dt w), dB = (dA - 1)/w B, dC = C."""
    dtw, dB = _zoh(log_dt, w, B)
    return DiagonalRecurrence(torch.exp(dtw), dB, C)


def nplr_recurrence(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> DPLRRecurrence:
    """The exact O(N) bilinear step of an NPLR system (C is the plain C, not C~)."""
    half_dt = log_dt.exp().to(w.dtype)[:, None] / 2
    E = 1 / (1 - half_dt * w)
    denom = 1 + 2 * half_dt * (P.abs() ** 2 * E.real).sum(-1, keepdim=True)
    return DPLRRecurrence(
        F=1 + half_dt * w,
        P1=-2 * half_dt * P,
        Q=P.conj(),
        B1=2 * half_dt * B,
        E=E,
        P2=-2 * half_dt * E * P / denom,
        C=C,
    )


def nplr_diagonalize(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor) -> DiagonalRecurrence:
    """Eigendecomposition dA = V diag(lam) V^-1 of the dense bilinear dA (pass complex128).

    Returns N (not N/2) diagonal states: lam, V^-1 dB and C_full V / 2 (halved so that the output
    convention 2 Re(dC . x) holds; the exact sum is real). Check the result with
    `nplr_diagonalization_error`: for HiPPO-LegS-like A it is not accurate (see the module notes).
    """
    dA, dB = bilinear_dense(log_dt, w, P, B)
    lam, V = torch.linalg.eig(dA)
    dB_d = torch.linalg.solve(V, dB[..., None])[..., 0]
    dC_d = (full(C)[..., None, :] @ V)[..., 0, :] / 2
    return DiagonalRecurrence(lam, dB_d, dC_d)


def recurrence_kernel(rec: Recurrence, L: int) -> torch.Tensor:
    """The impulse response of a recurrence, K [H, L], by running its `step` on u = (1, 0, 0, ...)."""
    x = torch.zeros_like(_first(rec))  # [H, M]
    u = torch.ones(x.shape[0], dtype=x.real.dtype, device=x.device)
    out = []
    for _ in range(L):
        y, x = rec.step(u, x)
        out.append(y)
        u = torch.zeros_like(u)
    return torch.stack(out, dim=-1)


def _first(rec: Recurrence) -> torch.Tensor:
    return next(iter(rec.tensors().values()))


def kernel_error(K: torch.Tensor, K_ref: torch.Tensor) -> float:
    """max over channels of max_l |K - K_ref| / max_l |K_ref|  (relative, per channel)."""
    scale = K_ref.abs().amax(-1).clamp_min(torch.finfo(K_ref.dtype).tiny)
    return float(((K - K_ref).abs().amax(-1) / scale).max())


def nplr_diagonalization_error(log_dt: torch.Tensor, w: torch.Tensor, P: torch.Tensor, B: torch.Tensor,
                               C: torch.Tensor, L: int, dtype: torch.dtype = torch.complex128) -> float:
    """Relative error (`kernel_error`) of the first L kernel taps of the diagonalised recurrence,
    run in `dtype`, against the dense kernel in float64. The eigendecomposition is in complex128."""
    log_dt = log_dt.detach().to(torch.float64)
    w, P, B, C = (t.detach().to(torch.complex128) for t in (w, P, B, C))
    rec = nplr_diagonalize(log_dt, w, P, B, C).to(dtype)
    K = recurrence_kernel(rec, L).to(torch.float64)
    return kernel_error(K, dense_kernel(log_dt, w, P, B, C, L))


@dataclass
class StepForm:
    """What `discretize_for_step` chose: the recurrence, and for NPLR the diagonalisation error."""

    recurrence: Recurrence
    diag_error: float | None = None  # None when no diagonalisation was attempted (or S4D: exact)

    @property
    def kind(self) -> str:
        return self.recurrence.kind


def discretize_for_step(mode: str, log_dt: torch.Tensor, w: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        P: torch.Tensor | None = None, *, dtype: torch.dtype = torch.complex64,
                        check_length: int = 128, diagonalize: bool = True, tol: float = 1e-5) -> StepForm:
    """The recurrent form of one layer's SSMs, computed in float64/complex128, returned in `dtype`.

    mode "diag": the exact S4D DiagonalRecurrence (N/2 states).
    mode "nplr" (C the plain C, not C~): if `diagonalize`, try `nplr_diagonalize`; keep it only if,
    run in `dtype`, its first `check_length` kernel taps match the dense float64 kernel to `tol`
    (relative, worst channel). The check has to be in the running precision: near HiPPO-LegS the
    eigenvector matrix is so ill-conditioned that V^-1 dB has entries of 1e7 and more whose
    products cancel to O(1), exact in float64 and garbage in complex64. Otherwise (and when
    `diagonalize` is False) the exact DPLRRecurrence (N/2 states, O(N) per step).
    """
    log_dt = log_dt.detach().to(torch.float64)
    w, B, C = (t.detach().to(torch.complex128) for t in (w, B, C))
    if mode == "diag":
        return StepForm(s4d_recurrence(log_dt, w, B, C).to(dtype))
    if mode != "nplr":
        raise ValueError(f"mode must be 'nplr' or 'diag', got {mode!r}")
    if P is None:
        raise ValueError("mode 'nplr' needs P")
    P = P.detach().to(torch.complex128)
    err = None
    if diagonalize:
        diag = nplr_diagonalize(log_dt, w, P, B, C).to(dtype)
        K = recurrence_kernel(diag, check_length).to(torch.float64)
        err = kernel_error(K, dense_kernel(log_dt, w, P, B, C, check_length))
        if err <= tol:  # (a NaN error, from an unstable eigenvalue, fails this too)
            return StepForm(diag, err)
    return StepForm(nplr_recurrence(log_dt, w, P, B, C).to(dtype), err)
