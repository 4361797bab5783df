"""The chunked selective scan against the sequential loop it must equal, and the backend dispatch."""

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqssm.errors import SeqssmError
from seqssm.ops.selective_scan import (
    _scan_with_kernel,
    cuda_kernels_available,
    scan_backend,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
    selective_state_update,
    selective_state_update_ref,
)


# Tiny tensors: one thread avoids OpenMP synchronisation costs (large on a busy machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    """max |a - b| relative to max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make(batch=2, dim=12, N=5, L=77, bform="v", cform="v", *, seed=0, softplus=True, groups=3, extras=True):
    g = torch.Generator().manual_seed(seed)

    def mat(form):
        return {
            "c": lambda: torch.randn(dim, N, generator=g),
            "v": lambda: torch.randn(batch, N, L, generator=g),
            "g": lambda: torch.randn(batch, groups, N, L, generator=g),
        }[form]()

    u = torch.randn(batch, dim, L, generator=g)
    if softplus:
        delta = torch.randn(batch, dim, L, generator=g) - 1.0
        delta_bias = 0.5 * torch.randn(dim, generator=g)
    else:  # the raw delta is used: keep it positive (a negative one makes the recurrence grow)
        delta = 0.3 * torch.rand(batch, dim, L, generator=g)
        delta_bias = 0.1 * torch.rand(dim, generator=g)
    A = -torch.exp(torch.randn(dim, N, generator=g))
    args = (u, delta, A, mat(bform), mat(cform))
    kw = dict(delta_softplus=softplus, delta_bias=delta_bias)
    if extras:
        kw.update(D=torch.randn(dim, generator=g), z=torch.randn(batch, dim, L, generator=g))
    return args, kw, torch.randn(batch, dim, N, generator=g)


FORMS = list(itertools.product("cvg", "cvg"))


@pytest.mark.parametrize("bform,cform", FORMS)
def test_torch_matches_ref_for_every_form_of_B_and_C(bform, cform):
    args, kw, h0 = make(bform=bform, cform=cform)
    out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=h0)
    got, got_last = selective_scan_torch(*args, **kw, return_last_state=True, initial_state=h0)
    assert got.dtype == out.dtype == torch.float32
    assert rel(got, out) <= 1e-5
    assert rel(got_last, last) <= 1e-5


@pytest.mark.parametrize("extras,softplus,bias,init", list(itertools.product([False, True], repeat=4)))
def test_torch_matches_ref_with_and_without_options(extras, softplus, bias, init):
    args, kw, h0 = make(softplus=softplus, extras=extras, seed=3)
    if not bias:
        kw["delta_bias"] = None
    state = h0 if init else None
    out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=state)
    got, got_last = selective_scan_torch(*args, **kw, return_last_state=True, initial_state=state)
    assert rel(got, out) <= 1e-5 and rel(got_last, last) <= 1e-5
    # without return_last_state: the output alone
    assert torch.equal(selective_scan_torch(*args, **kw, initial_state=state), got)


@pytest.mark.parametrize("chunk_size,sub_chunk",
                         [(16, 4), (10, 3), (77, 77), (76, 5), (5, 1), (1, 1), (200, 7), (33, 32)])
def test_chunk_boundaries(chunk_size, sub_chunk):
    """L = 77 is not a multiple of the chunk or the sub-chunk: padding must leave the state unchanged."""
    args, kw, h0 = make(seed=5)
    out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=h0)
    got, got_last = selective_scan_torch(*args, **kw, return_last_state=True, initial_state=h0,
                                         chunk_size=chunk_size, sub_chunk=sub_chunk)
    assert rel(got, out) <= 1e-5 and rel(got_last, last) <= 1e-5


def test_matches_float64_recurrence():
    """Both float32 versions are close to the recurrence evaluated in float64 (not just to each other)."""
    args, kw, h0 = make(seed=7, L=300)
    u, delta, A, B, C = args
    d = torch.nn.functional.softplus(delta.double() + kw["delta_bias"].double()[:, None])
    h = h0.double()
    ys = []
    for t in range(u.shape[-1]):
        dBu = (d[:, :, t] * u[:, :, t].double())[..., None] * B[:, None, :, t].double()
        h = torch.exp(d[:, :, t, None] * A.double()) * h + dBu
        ys.append((h * C[:, None, :, t].double()).sum(-1))
    y = torch.stack(ys, -1) + u.double() * kw["D"].double()[:, None]
    y = y * torch.nn.functional.silu(kw["z"].double())
    got, got_last = selective_scan_torch(*args, **kw, return_last_state=True, initial_state=h0, chunk_size=64)
    assert rel(got, y) <= 1e-5 and rel(got_last, h) <= 1e-5
    assert rel(selective_scan_ref(*args, **kw, initial_state=h0), y) <= 1e-5


def test_strong_decay_does_not_overflow():
    """delta * |A| of hundreds per step (a state forgotten at once) must give finite, correct values."""
    args, kw, h0 = make(seed=11, L=100)
    u, delta, A, B, C = args
    A = A * 50.0
    delta = delta + 4.0  # softplus(delta + bias) ~ 3..8 -> decays of exp(-hundreds)
    args = (u, delta, A, B, C)
    out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=h0)
    got, got_last = selective_scan_torch(*args, **kw, return_last_state=True, initial_state=h0, chunk_size=32)
    assert torch.isfinite(got).all() and torch.isfinite(got_last).all()
    assert rel(got, out) <= 1e-5 and rel(got_last, last) <= 1e-5


def test_windows_with_carried_state_equal_the_whole():
    args, kw, _ = make(seed=13, L=150, bform="v", cform="v")
    u, delta, A, B, C = args
    whole, last = selective_scan_torch(*args, **kw, return_last_state=True)
    k = 61
    first = {**kw, "z": kw["z"][..., :k]}
    second = {**kw, "z": kw["z"][..., k:]}
    y1, h1 = selective_scan_torch(u[..., :k], delta[..., :k], A, B[..., :k], C[..., :k], **first,
                                  return_last_state=True)
    y2, h2 = selective_scan_torch(u[..., k:], delta[..., k:], A, B[..., k:], C[..., k:], **second,
                                  return_last_state=True, initial_state=h1)
    assert rel(torch.cat([y1, y2], -1), whole) <= 1e-5
    assert rel(h2, last) <= 1e-5


@pytest.mark.parametrize("bform,cform,init", [("v", "v", True), ("g", "c", True), ("c", "g", False)])
def test_backward_matches_ref(bform, cform, init):
    args, kw, h0 = make(batch=2, dim=6, N=4, L=40, bform=bform, cform=cform, seed=17)
    tensors = list(args) + [kw["D"], kw["z"], kw["delta_bias"]] + ([h0] if init else [])

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        u, delta, A, B, C, D, z, bias = leaves[:8]
        out, last = fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True,
                       return_last_state=True, initial_state=leaves[8] if init else None)
        g = torch.Generator().manual_seed(1)
        loss = (out * torch.randn(out.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()
        loss.backward()
        return [t.grad for t in leaves]

    ref_grads = run(selective_scan_ref)
    got_grads = run(lambda *a, **k: selective_scan_torch(*a, **k, chunk_size=16, sub_chunk=4))
    for i, (r, g) in enumerate(zip(ref_grads, got_grads)):
        assert g is not None, f"no gradient for input {i}"
        assert rel(g, r) <= 1e-4, f"gradient of input {i}"


def test_gradient_of_D_and_z_alone():
    """Only D and z need a gradient: the scan may run in place, the output step must not."""
    args, kw, _ = make(seed=18)
    grads = []
    for fn in (selective_scan_ref, selective_scan_torch):
        D, z = kw["D"].clone().requires_grad_(True), kw["z"].clone().requires_grad_(True)
        (fn(*args, **{**kw, "D": D, "z": z}) ** 2).sum().backward()
        grads.append((D.grad, z.grad))
    assert rel(grads[1][0], grads[0][0]) <= 1e-4 and rel(grads[1][1], grads[0][1]) <= 1e-4


def test_long_sequence_in_default_chunks():
    """A long sequence goes through several default-sized chunks (1,024 positions here; the last one padded)."""
    args, kw, h0 = make(batch=1, dim=64, N=16, L=2_500, seed=19)
    out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=h0)
    got, got_last = selective_scan_torch(*args, **kw, return_last_state=True, initial_state=h0)
    assert rel(got, out) <= 1e-5 and rel(got_last, last) <= 1e-5


def test_half_precision_inputs_compute_in_float32():
    args, kw, h0 = make(seed=23)
    u, delta, A, B, C = args
    half = (u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16())
    kwh = {**kw, "z": kw["z"].bfloat16()}
    out = selective_scan_ref(*half, **kwh)
    got = selective_scan_torch(*half, **kwh)
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), out.float()) <= 1e-2


def test_kernel_without_initial_state_plus_linearity_equals_the_scan():
    """The CUDA path adds an initial state by linearity; checked here with the reference as the kernel."""

    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):  # mamba-ssm's signature
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    for bform, cform in (("v", "v"), ("g", "c")):
        args, kw, h0 = make(bform=bform, cform=cform, seed=29)
        out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=h0)
        got, got_last = _scan_with_kernel(kernel, *args, kw["D"], kw["z"], kw["delta_bias"], True, True, h0)
        assert rel(got, out) <= 1e-5 and rel(got_last, last) <= 1e-5
        assert rel(_scan_with_kernel(kernel, *args, kw["D"], kw["z"], kw["delta_bias"], True, False, h0), out) <= 1e-5
    # several chunks, and a decay so strong that the initial state is gone after the first one
    args, kw, h0 = make(seed=30, L=60)
    u, delta, A, B, C = args
    for scale in (1.0, 50.0):
        a = (u, delta + (4.0 if scale > 1 else 0.0), A * scale, B, C)
        out, last = selective_scan_ref(*a, **kw, return_last_state=True, initial_state=h0)
        got, got_last = _scan_with_kernel(kernel, *a, kw["D"], kw["z"], kw["delta_bias"], True, True, h0, chunk=16)
        assert rel(got, out) <= 1e-5 and rel(got_last, last) <= 1e-5


def _initial_state_case(batch, dim, L, N, device, dtype=torch.float32, seed=0):
    """Inputs laid out as Mamba hands them to the scan: dt a transposed view, z half of xz."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = functools.partial(torch.randn, generator=g, device=device)
    u = r(batch, dim, L).to(dtype)
    dt = (r(dim, batch, L) * 0.5 - 4.0).to(dtype).transpose(0, 1)  # softplus(dt + bias) ~ 0.001 .. 0.3
    A = -torch.exp(r(dim, N) * 1.5)  # |A| from ~0.01 to ~100
    B, C = r(batch, N, L).to(dtype), r(batch, N, L).to(dtype)
    z = r(batch, 2 * dim, L).to(dtype)[:, dim:]
    return u, dt, A, B, C, r(dim), z, r(dim) * 0.5, r(batch, dim, N)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,dim,L,N,dtype", [(2, 96, 5000, 16, torch.float32), (1, 33, 77, 4, torch.float32),
                                                 (1, 512, 16384, 16, torch.float32), (2, 64, 3000, 16, torch.bfloat16)])
def test_fused_initial_state_response_matches_the_chunked_one(batch, dim, L, N, dtype):
    """Stream mode on CUDA: the initial state's share added in one Triton kernel (in place, from
    the raw dt, bias, softplus and z) against the chunked torch computation, with decays from
    negligible to complete inside the window."""
    pytest.importorskip("triton")

    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):  # mamba-ssm's signature
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    u, dt, A, B, C, D, z, bias, h0 = _initial_state_case(batch, dim, L, N, "cuda", dtype, seed=L)
    args = (kernel, u, dt, A, B, C, D, z, bias, True, True, h0)
    want, want_last = _scan_with_kernel(*args, chunk=1024)  # the torch path
    got, got_last = _scan_with_kernel(*args)  # the fused kernel
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == want.dtype and rel(got, want) <= tol and rel(got_last, want_last) <= 1e-5


def test_dispatch_on_cpu():
    args, kw, h0 = make(seed=31)
    assert scan_backend("auto", args[0]) == "torch"
    want = selective_scan_torch(*args, **kw, initial_state=h0)
    assert torch.equal(selective_scan(*args, **kw, initial_state=h0), want)
    assert torch.equal(selective_scan(*args, **kw, initial_state=h0, backend="torch"), want)
    with pytest.raises(ValueError, match="CUDA device"):
        selective_scan(*args, **kw, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*args, **kw, backend="triton")
    assert isinstance(cuda_kernels_available(), bool)
    if not torch.cuda.is_available():
        assert cuda_kernels_available() is False


def test_missing_kernels_are_a_user_error(monkeypatch):
    import seqssm.ops.selective_scan as ss

    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: None)

    class FakeCuda:  # only .is_cuda and .device are looked at before the kernel
        is_cuda = True
        device = "cuda:0"

    with pytest.raises(SeqssmError, match="seqssm\\[gpu\\]"):
        ss._resolve("cuda", FakeCuda(), ss._mamba_scan_kernel, "selective_scan")
    assert ss._resolve("auto", FakeCuda(), ss._mamba_scan_kernel, "selective_scan") == "torch"


def test_importing_and_running_never_imports_the_kernels():
    """mamba_ssm / causal_conv1d are imported lazily: a failing import of them must not matter."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mamba_ssm', 'causal_conv1d', 'selective_scan_cuda'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from seqssm.layers.mamba import Mamba\n"
        "from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM\n"
        "m = Mamba(16, d_state=4)\n"
        "y = m(torch.randn(1, 9, 16))\n"
        "c = CaduceusForMaskedLM(CaduceusConfig(d_model=16, n_layer=1, vocab_size=12, ssm_cfg={'d_state': 4}))\n"
        "c(torch.randint(0, 12, (1, 9)))\n"
        "assert not any(k.startswith(('mamba_ssm', 'causal_conv1d')) for k in sys.modules)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_shape_errors():
    args, kw, _ = make()
    u, delta, A, B, C = args
    with pytest.raises(ValueError, match="delta"):
        selective_scan_torch(u, delta[..., :-1], A, B, C)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_torch(u, delta, A, B[..., :-1], C)
    with pytest.raises(ValueError, match="complex"):
        selective_scan_torch(u, delta, A.to(torch.complex64), B, C)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan_torch(u, delta, A, B, C, initial_state=torch.zeros(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# one step


def test_state_update_steps_equal_the_scan():
    args, kw, h0 = make(seed=37, L=30, bform="v", cform="v")
    u, delta, A, B, C = args
    out, last = selective_scan_ref(*args, **kw, return_last_state=True, initial_state=h0)
    state = h0.clone()
    steps = [
        selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D=kw["D"], z=kw["z"][..., t],
                               dt_bias=kw["delta_bias"], dt_softplus=True)
        for t in range(u.shape[-1])
    ]
    assert rel(torch.stack(steps, -1), out) <= 1e-5
    assert rel(state, last) <= 1e-5


def test_state_update_with_heads_equals_per_head():
    g = torch.Generator().manual_seed(41)
    batch, nheads, dim, N, groups = 2, 4, 3, 5, 2
    state = torch.randn(batch, nheads, dim, N, generator=g)
    x, dt, z = (torch.randn(batch, nheads, dim, generator=g) for _ in range(3))
    A = -torch.rand(nheads, dim, N, generator=g)
    B, C = torch.randn(batch, groups, N, generator=g), torch.randn(batch, groups, N, generator=g)
    D, bias = torch.randn(nheads, dim, generator=g), torch.randn(nheads, dim, generator=g)
    s = state.clone()
    out = selective_state_update_ref(s, x, dt, A, B, C, D, z, bias, True)
    for h in range(nheads):
        sh = state[:, h].clone()
        gi = h // (nheads // groups)
        oh = selective_state_update_ref(sh, x[:, h], dt[:, h], A[h], B[:, gi], C[:, gi], D[h], z[:, h], bias[h], True)
        assert torch.allclose(out[:, h], oh, atol=1e-6) and torch.allclose(s[:, h], sh, atol=1e-6)
