"""S4 kernels (seqssm.ops.s4_kernel) against their twins, and the S4 layer's step() against forward()."""

from __future__ import annotations

import math

import pytest
import torch

from seqssm.layers.s4 import S4Layer
from seqssm.ops import s4_kernel as sk

C64, C128 = torch.complex64, torch.complex128


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run thousands of tiny batched ops and LAPACK calls: OpenMP threads only add
    synchronisation to them (10-30x slower on a shared CPU). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the whole tensor (in float64 / complex128)."""
    a, b = (t.to(torch.promote_types(t.dtype, torch.float64)) for t in (a, b))
    return float((a - b).abs().max() / b.abs().max())


def legs_system(H: int, N: int, *, seed: int, perturb: float = 0.0):
    """(log_dt, w, P, B, C) in float64 / complex128: the HiPPO-LegS NPLR init with log-uniform dt,
    optionally moved away from it the way training would (every parameter, by ~perturb)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w, P, B, _ = sk.nplr_legs(N)
    w, P, B = (t.expand(H, N // 2).clone() for t in (w, P, B))
    log_dt = math.log(1e-3) + torch.rand(H, generator=g, dtype=torch.float64) * math.log(100.0)
    C = torch.complex(rn(H, N // 2), rn(H, N // 2)) / math.sqrt(2)
    if perturb:
        s = perturb
        w = torch.complex(w.real * torch.exp(s * rn(H, N // 2)), w.imag * (1 + s * rn(H, N // 2)) + s * rn(H, N // 2))
        P = P * torch.complex(1 + s * rn(H, N // 2), s * rn(H, N // 2))
        B = B * torch.complex(1 + s * rn(H, N // 2), s * rn(H, N // 2))
        log_dt = log_dt + s * rn(H)
    return log_dt, w, P, B, C


def to32(*ts):
    """Round to float32 / complex64 (the parameters a model actually holds)."""
    return [t.to(C64) if t.is_complex() else t.float() for t in ts]


def back64(*ts):
    return [t.to(C128) if t.is_complex() else t.double() for t in ts]


# -- initialisations ---------------------------------------------------------------------------


def test_nplr_legs_is_hippo_legs_in_normal_plus_low_rank_form():
    N = 16
    A, B = sk.hippo_legs(N)
    assert A[3, 1] == pytest.approx(-math.sqrt(7 * 3)) and A[2, 2] == -3 and A[1, 4] == 0
    w, P, Bh, V = sk.nplr_legs(N)
    Vf = torch.cat([V, V.conj()], dim=1)
    assert torch.allclose(Vf.conj().T @ Vf, torch.eye(N, dtype=C128), atol=1e-12)  # unitary
    Pf = sk.full(P)
    A_rebuilt = Vf @ (torch.diag(sk.full(w)) - Pf[:, None] * Pf.conj()[None, :]) @ Vf.conj().T
    assert (A_rebuilt - A).abs().max() < 1e-11
    assert (Vf @ sk.full(Bh) - B).abs().max() < 1e-12
    assert torch.all(w.real == -0.5) and torch.all(w.imag > 0)
    ws, Bs = sk.s4d_legs(N)
    assert torch.equal(ws, w) and torch.allclose(Bs, Bh / 2)
    wl, Bl = sk.s4d_lin(N)
    assert torch.allclose(wl.imag, math.pi * torch.arange(N // 2, dtype=torch.float64)) and torch.all(Bl == 1)
    with pytest.raises(ValueError):
        sk.nplr_legs(7)


# -- Cauchy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [C128, C64])
@pytest.mark.parametrize("conj", [False, True])
def test_cauchy_matches_naive(dtype, conj):
    g = torch.Generator().manual_seed(0)
    H, n, L = 5, 12, 37

    def c(*shape):
        x = torch.randn(*shape, 2, generator=g, dtype=torch.float64)
        return torch.view_as_complex(x).to(dtype)

    v, w = c(3, H, n), c(H, n) - 2.0  # three vectors sharing one set of poles
    z = 1j * torch.linspace(-5, 5, L, dtype=torch.float64).to(dtype).expand(H, L)
    expected = sk.cauchy_naive(v.to(C128), z.to(C128), w.to(C128), conj=conj)
    tol = 1e-12 if dtype == C128 else 1e-5
    assert rel(sk.cauchy(v, z, w, conj=conj), expected) < tol
    assert rel(sk.cauchy(v, z, w, conj=conj, max_elements=50), expected) < tol  # several node chunks
    if conj:  # the pair sum of a conjugate-symmetric system at conjugate-symmetric nodes is real on the real axis
        zr = torch.linspace(0.5, 3, L, dtype=torch.float64).to(dtype).expand(H, L)
        assert sk.cauchy(v, zr, w, conj=True).imag.abs().max() < 1e-4 * sk.cauchy(v, zr, w, conj=True).abs().max()


# -- NPLR kernel -------------------------------------------------------------------------------


@pytest.mark.parametrize("perturb", [0.0, 0.1, 0.3])
def test_nplr_kernel_matches_dense_kernel(perturb):
    H, N = 6, 64
    log_dt, w, P, B, C = legs_system(H, N, seed=1, perturb=perturb)
    for L in (100, 99, 7, 2, 1):
        Ct = sk.c_tilde(log_dt, w, P, C, L)
        K_dense = sk.dense_kernel(log_dt, w, P, B, C, L)
        assert sk.kernel_error(sk.nplr_kernel(log_dt, w, P, B, Ct, L), K_dense) < 1e-10, L
    # float32 (parameters as a model holds them; the reference is exact for those same numbers)
    L = 100
    p32 = to32(log_dt, w, P, B, sk.c_tilde(log_dt, w, P, C, L))
    ld, w_, P_, B_, Ct_ = back64(*p32)
    K_exact = sk.nplr_kernel(ld, w_, P_, B_, Ct_, L)
    assert sk.kernel_error(K_exact, sk.dense_kernel(ld, w_, P_, B_, sk.c_from_tilde(ld, w_, P_, Ct_, L), L)) < 1e-9
    K32 = sk.nplr_kernel(*p32, L)
    assert K32.dtype == torch.float32
    assert rel(K32, K_exact) <= 1e-5
    assert sk.kernel_error(K32.double(), K_exact) < 1e-4  # worst single channel


def test_nplr_kernel_is_differentiable_and_truncation_matters():
    log_dt, w, P, B, C = legs_system(4, 16, seed=2)
    L = 50
    K_dense = sk.dense_kernel(log_dt, w, P, B, C, L)
    # Without the C~ correction the kernel is aliased by its tail (slow channels barely decay in L steps)
    assert sk.kernel_error(sk.nplr_kernel(log_dt, w, P, B, C, L), K_dense) > 1e-2
    params = [t.clone().requires_grad_() for t in (log_dt, w, P, B, C)]
    sk.nplr_kernel(*params[:4], sk.c_tilde(*params[:3], params[4], L), L).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("perturb", [0.0, 0.1])
def test_c_tilde_and_its_inverse_match_the_dense_twins(perturb):
    log_dt, w, P, B, C = legs_system(5, 32, seed=3, perturb=perturb)
    for L in (1, 2, 63, 100):
        Ct = sk.c_tilde(log_dt, w, P, C, L)
        assert rel(Ct, sk.c_tilde_dense(log_dt, w, P, C, L)) < 1e-11
        assert rel(sk.c_from_tilde(log_dt, w, P, Ct, L), sk.c_from_tilde_dense(log_dt, w, P, Ct, L)) < 1e-10
        assert rel(sk.c_from_tilde(log_dt, w, P, Ct, L), C) < 1e-10


# -- S4D kernel --------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [sk.s4d_legs, sk.s4d_lin])
def test_s4d_kernel_matches_vandermonde_twin(init):
    H, N, L = 6, 64, 100
    log_dt, _, _, _, C = legs_system(H, N, seed=4)
    w, B = (t.expand(H, N // 2) for t in init(N))
    w = torch.complex(w.real * (1 + 0.2 * torch.rand(H, N // 2, dtype=torch.float64)), w.imag)
    K_ref = sk.s4d_kernel_ref(log_dt, w, B, C, L)
    assert sk.kernel_error(sk.s4d_kernel(log_dt, w, B, C, L), K_ref) < 1e-11
    p32 = to32(log_dt, w, B, C)
    # in float32 the phases l dt Im(w) of the fast modes (up to ~1e4 rad) keep ~1e-5 of the kernel
    assert rel(sk.s4d_kernel(*p32, L), sk.s4d_kernel_ref(*back64(*p32), L)) < 1e-4


# -- recurrent forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("perturb", [0.0, 0.1])
def test_dplr_recurrence_reproduces_the_nplr_kernel(perturb):
    log_dt, w, P, B, C = legs_system(6, 64, seed=5, perturb=perturb)
    L = 100
    K = sk.dense_kernel(log_dt, w, P, B, C, L)
    rec = sk.nplr_recurrence(log_dt, w, P, B, C)
    assert rec.state_size == 32
    assert sk.kernel_error(sk.recurrence_kernel(rec, L), K) < 1e-11
    assert sk.kernel_error(sk.recurrence_kernel(rec.to(C64), L).double(), K) < 2e-5


def test_s4d_recurrence_reproduces_the_s4d_kernel():
    H, N, L = 4, 16, 80
    log_dt, _, _, _, C = legs_system(H, N, seed=6)
    w, B = (t.expand(H, N // 2) for t in sk.s4d_legs(N))
    rec = sk.s4d_recurrence(log_dt, w, B, C)
    assert sk.kernel_error(sk.recurrence_kernel(rec, L), sk.s4d_kernel_ref(log_dt, w, B, C, L)) < 1e-12


def test_nplr_diagonalization_error_exposes_the_legs_ill_conditioning():
    L = 100
    # Exact HiPPO-LegS: eigenvalues -1..-N, eigenvectors ~2^(4N/3): the diagonal form is wrong even in float64.
    exact = legs_system(6, 64, seed=7)
    assert sk.nplr_diagonalization_error(*exact, L) > 1e-3
    # Moved away from LegS it diagonalises in float64 ...
    moved = legs_system(6, 64, seed=7, perturb=0.05)
    assert sk.nplr_diagonalization_error(*moved, L) < 1e-8
    # ... but near the init the complex64 recurrence cancels huge terms, so the check must use the run dtype
    near = back64(*to32(*exact))  # LegS rounded to float32, as a model stores it
    assert sk.nplr_diagonalization_error(*near, L) < 1e-5
    assert sk.nplr_diagonalization_error(*near, L, dtype=C64) > 1e-2
    log_dt, w, P, B, C = near
    form = sk.discretize_for_step("nplr", log_dt, w, B, C, P, check_length=L)
    assert form.kind == "dplr" and form.diag_error > 1e-2
    # A comfortably diagonalisable NPLR system keeps the diagonal form (N states, output 2 Re)
    far = legs_system(6, 64, seed=7, perturb=0.3)
    log_dt, w, P, B, C = far
    form = sk.discretize_for_step("nplr", log_dt, w, B, C, P, check_length=L)
    assert form.kind == "diag" and form.recurrence.state_size == 64 and form.diag_error <= 1e-5
    K = sk.dense_kernel(*far, L)
    assert sk.kernel_error(sk.recurrence_kernel(form.recurrence, L).double(), K) <= 1e-5
    # diagonalize=False: always the exact DPLR step
    assert sk.discretize_for_step("nplr", log_dt, w, B, C, P, diagonalize=False).kind == "dplr"


# -- the layer ---------------------------------------------------------------------------------


def perturb_(layer: S4Layer, scale: float, seed: int) -> None:
    """Move every parameter as training would (in place: bumps the version counters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().clamp_min(0.1))


def run_steps(layer: S4Layer, x: torch.Tensor) -> torch.Tensor:
    state = layer.default_state(x.shape[0])
    out = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state)
        out.append(y)
    return torch.stack(out, dim=1)


CASES = [("nplr", 100, 100), ("nplr", 100, 63), ("nplr", None, 40), ("diag", 100, 100), ("diag", None, 40)]


@pytest.mark.parametrize("mode,l_max,L", CASES)
@pytest.mark.parametrize("perturb", [0.0, 0.1])
def test_step_equals_forward(mode, l_max, L, perturb):
    torch.manual_seed(0)
    layer = S4Layer(16, 64, mode=mode, dropout=0.3, l_max=l_max).eval()
    if perturb:
        perturb_(layer, perturb, seed=1)
    x = torch.randn(3, L, 16)
    with torch.no_grad():
        y = layer(x)
        y_step = run_steps(layer, x)
    assert y.shape == y_step.shape == (3, L, 16)
    assert rel(y_step, y) <= 1e-5


def test_step_follows_parameter_updates():
    torch.manual_seed(0)
    layer = S4Layer(8, 16, l_max=30).eval()
    x = torch.randn(2, 30, 8)
    layer.setup_step()
    rec = layer.recurrence()
    layer.setup_step()
    assert layer.recurrence() is rec  # cached while nothing changed
    layer(x).pow(2).sum().backward()
    with torch.no_grad():  # what an optimizer step does: in place, bumping the version counters
        for p in layer.parameters():
            p.sub_(0.02 * p.grad.sign())
    assert layer.recurrence() is not rec
    with torch.no_grad():
        assert rel(run_steps(layer, x), layer(x)) <= 1e-5
    other = S4Layer(8, 16, l_max=30).eval()
    other.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert rel(run_steps(other, x), layer(x)) <= 1e-5


def test_step_after_a_fused_optimizer_which_bumps_no_version_counter():
    torch.manual_seed(0)
    layer = S4Layer(8, 16, l_max=30).eval()
    x = torch.randn(2, 30, 8)
    layer.setup_step()
    layer.train()  # drops the cache: what happens next may be invisible to the version counters
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05, fused=True)
    versions = [p._version for p in layer.parameters()]
    layer(x).pow(2).sum().backward()
    opt.step()
    assert [p._version for p in layer.parameters()] == versions  # the blind spot is real
    layer.eval()
    with torch.no_grad():
        assert rel(run_steps(layer, x), layer(x)) <= 1e-5
    # in training mode the cache is never trusted (dropout is 0 here, so step and forward still agree)
    layer.train()
    layer.setup_step()
    layer(x).pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        assert rel(run_steps(layer, x), layer(x)) <= 1e-5
    layer.eval()
    # in eval mode the same kind of write needs setup_step(force=True)
    with torch.no_grad():
        layer.log_A_real.data.add_(0.3)
        y = layer(x)
        assert rel(run_steps(layer, x), y) > 1e-3
        layer.setup_step(force=True)
        assert rel(run_steps(layer, x), y) <= 1e-5


def test_diagonalized_step_for_a_trained_like_nplr_layer():
    torch.manual_seed(0)
    layer = S4Layer(8, 64, l_max=50).eval()
    perturb_(layer, 0.3, seed=2)
    layer.setup_step(diagonalize=True)
    err = layer.diagonalization_error()
    assert err is not None
    kind = layer.recurrent_parameters()["kind"]
    assert kind == ("diag" if err <= layer.step_tol else "dplr")
    x = torch.randn(2, 50, 8)
    with torch.no_grad():
        assert rel(run_steps(layer, x), layer(x)) <= 1e-5
    fresh = S4Layer(8, 64, l_max=50).eval()
    fresh.setup_step(diagonalize=True)
    assert fresh.recurrent_parameters()["kind"] == "dplr"  # near LegS: rejected, exact fallback
    assert fresh.diagonalization_error() > fresh.step_tol


@pytest.mark.parametrize("mode", ["nplr", "diag"])
def test_causal(mode):
    torch.manual_seed(0)
    layer = S4Layer(8, 16, mode=mode, l_max=40).double().eval()
    x = torch.randn(2, 40, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 25:] += torch.randn(2, 15, 8, dtype=torch.float64)
    y, y2 = layer(x), layer(x2)
    assert (y[:, :25] - y2[:, :25]).abs().max() < 1e-12
    assert (y[:, 25:] - y2[:, 25:]).abs().max() > 1e-2


@pytest.mark.parametrize("mode,l_max", [("nplr", 32), ("nplr", None), ("diag", 32)])
def test_gradient_reaches_every_parameter(mode, l_max):
    torch.manual_seed(0)
    layer = S4Layer(8, 16, mode=mode, l_max=l_max, n_ssm=2)
    layer(torch.randn(2, 32, 8)).pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_layer_parameters_options_and_errors():
    layer = S4Layer(8, 16, l_max=20, n_ssm=4)
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters()}
    assert shapes["log_dt"] == (8,) and shapes["C"] == (8, 8, 2) and shapes["D"] == (8,)
    assert shapes["log_A_real"] == shapes["A_imag"] == (4, 8) and shapes["B"] == shapes["P"] == (4, 8, 2)
    ssm = layer.ssm_parameters()
    assert {id(p) for p in ssm} == {id(layer.log_dt), id(layer.log_A_real), id(layer.A_imag), id(layer.B), id(layer.P)}
    assert all(p._optim == {"weight_decay": 0.0, "lr": 0.001} for p in ssm)
    dt = layer.log_dt.exp()
    assert dt.min() >= 0.001 * (1 - 1e-6) and dt.max() <= 0.1 * (1 + 1e-6)
    assert S4Layer(8, 16, mode="diag").P is None
    with pytest.raises(ValueError, match="l_max"):
        layer(torch.randn(1, 21, 8))
    for bad in (dict(mode="s5"), dict(d_state=15), dict(n_ssm=3), dict(mode="nplr", init="lin")):
        with pytest.raises(ValueError):
            S4Layer(8, **{"d_state": 16, **bad})
    state = layer.default_state(3)
    assert state.shape == (3, 8, 8) and state.dtype == C64
    assert layer.default_state(1, dtype=torch.float64).dtype == C128


def test_bf16_autocast_forward_keeps_the_convolution_in_float32():
    torch.manual_seed(0)
    layer = S4Layer(16, 16, l_max=50).eval()
    x = torch.randn(2, 50, 16)
    with torch.no_grad():
        y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = layer(x)
            assert layer.kernel(50).dtype == torch.float32
    assert y16.dtype == torch.bfloat16
    assert rel(y16.float(), y) < 5e-2
