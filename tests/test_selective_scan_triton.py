"""seqssm's Triton selective scans (inference on a GPU without mamba-ssm) against the loop reference.

Both kernels, the Gluon one (`seqssm.ops.selective_scan_gluon`, the default where Triton has Gluon)
and the plain Triton one. GPU tests (CUDA and Triton): fresh random inputs, float32 within 1e-5 and bfloat16 within 1e-2
(relative to the output's norm), every optional input on and off, dstate not a power of two,
lengths and channel counts that the tiles do not divide, the reverse direction, the initial and
last states; `selective_scan` picks it only when mamba-ssm is missing and no gradient is needed;
a Mamba block on it equals the torch backend, whole and window by window.
"""

from __future__ import annotations

import pytest
import torch

import seqssm.ops.selective_scan as ss
from seqssm.layers.mamba import Mamba
from seqssm.ops.selective_scan import selective_scan, selective_scan_ref
from seqssm.ops.selective_scan_triton import _gluon_kernel, selective_scan_triton, triton_scan_available

KERNELS = ["gluon", "triton"]


def _need_gpu(kernel="triton"):
    if not triton_scan_available():
        pytest.skip("needs a CUDA GPU and Triton")
    if kernel == "gluon" and _gluon_kernel() is None:
        pytest.skip("needs Triton with Gluon")


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def _inputs(Bsz, D, N, L, seed, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    return dict(
        u=r(Bsz, D, L).to(dtype), delta=(0.5 * r(Bsz, D, L) - 1).to(dtype),
        A=-torch.rand(D, N, generator=g, device="cuda") * 4 - 0.05,
        B=r(Bsz, N, L).to(dtype), C=r(Bsz, N, L).to(dtype), D=r(D), z=r(Bsz, D, L).to(dtype),
        delta_bias=0.1 * r(D), initial_state=r(Bsz, D, N),
    )


def _flip(x):
    return None if x is None else x.flip(-1)


SHAPES = [(2, 64, 16, 777), (1, 6, 12, 100), (3, 33, 16, 5), (1, 8, 4, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_equals_the_loop_reference_fp32(kernel, shape, reverse):
    _need_gpu(kernel)
    x = _inputs(*shape, seed=sum(shape) + reverse)
    got, last = selective_scan_triton(**{k: v for k, v in x.items() if k != "initial_state"}, delta_softplus=True,
                                      return_last_state=True, initial_state=x["initial_state"], reverse=reverse,
                                      kernel=kernel)
    if reverse:  # the recurrence from the end = the scan of the flipped inputs, flipped back
        f = {k: (_flip(v) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
        want, want_last = selective_scan_ref(**{k: v for k, v in f.items() if k != "initial_state"},
                                             delta_softplus=True, return_last_state=True,
                                             initial_state=f["initial_state"])
        want = want.flip(-1)
    else:
        want, want_last = selective_scan_ref(**{k: v for k, v in x.items() if k != "initial_state"},
                                             delta_softplus=True, return_last_state=True,
                                             initial_state=x["initial_state"])
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _rel(got, want) <= 1e-5
    assert _rel(last, want_last) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("drop", ["D", "z", "delta_bias", "initial_state", "softplus", "all"])
def test_triton_scan_optional_inputs(kernel, drop):
    _need_gpu(kernel)
    x = _inputs(2, 20, 16, 300, seed=7)
    softplus = drop not in ("softplus", "all")
    if drop != "softplus":
        for k in (("D", "z", "delta_bias", "initial_state") if drop == "all" else (drop,)):
            x[k] = None
    if not softplus:
        x["delta"] = x["delta"].abs() * 0.3  # a valid step size without softplus
    h0 = x.pop("initial_state")
    got, last = selective_scan_triton(**x, delta_softplus=softplus, return_last_state=True, initial_state=h0,
                                      kernel=kernel)
    want, want_last = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True, initial_state=h0)
    assert _rel(got, want) <= 1e-5 and _rel(last, want_last) <= 1e-5
    assert selective_scan_triton(**x, delta_softplus=softplus, initial_state=h0, kernel=kernel).shape == want.shape


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_scan_bf16_within_1e_2_of_float32(kernel):
    _need_gpu(kernel)
    x = _inputs(2, 64, 16, 1500, seed=11, dtype=torch.bfloat16)
    h0 = x.pop("initial_state")
    got = selective_scan_triton(**x, delta_softplus=True, initial_state=h0, kernel=kernel)
    # the float32 reference on the same (bf16-rounded) inputs
    want = selective_scan_ref(**{k: (v.float() if v is not None else None) for k, v in x.items()},
                              delta_softplus=True, initial_state=h0)
    assert got.dtype == torch.bfloat16 and _rel(got, want) <= 1e-2


@pytest.mark.gpu
def test_auto_backend_takes_triton_without_gradients(monkeypatch):
    _need_gpu()
    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: None)  # as on a machine without mamba-ssm
    calls = []
    real = ss.selective_scan_triton
    monkeypatch.setattr(ss, "selective_scan_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs(2, 16, 16, 200, seed=3)
    h0 = x.pop("initial_state")
    with torch.no_grad():
        out = selective_scan(**x, delta_softplus=True, initial_state=h0)
    assert calls == [1]
    assert _rel(out, selective_scan_ref(**x, delta_softplus=True, initial_state=h0)) <= 1e-5
    # a gradient is needed: the torch path (the kernel has no backward), and the gradient flows
    u = x.pop("u").requires_grad_()
    out = selective_scan(u, **x, delta_softplus=True)
    out.sum().backward()
    assert calls == [1] and u.grad is not None and torch.isfinite(u.grad).all()
    with torch.no_grad():  # an explicit backend is obeyed
        selective_scan(u, **x, delta_softplus=True, backend="torch")
    assert calls == [1]


@pytest.mark.gpu
def test_mamba_block_on_triton_equals_torch_whole_and_in_windows(monkeypatch):
    _need_gpu()
    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: None)
    torch.manual_seed(0)
    m = Mamba(48, d_state=16).cuda().eval()
    with torch.no_grad():
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.dt_proj.bias.add_(0.5 * torch.randn_like(m.dt_proj.bias))
    x = torch.randn(2, 700, 48, device="cuda")
    with torch.no_grad():
        whole = m(x)
        m.backend = "torch"
        ref = m(x)
        m.backend = "auto"
        a, state = m(x[:, :333], return_state=True)  # the second window starts from the carried state
        b = m(x[:, 333:], state=state)
    assert _rel(whole, ref) <= 1e-5
    assert _rel(torch.cat([a, b], dim=1), whole) <= 1e-5


@pytest.mark.gpu
def test_gluon_kernel_is_the_default_where_available():
    _need_gpu("gluon")
    x = _inputs(2, 40, 16, 999, seed=13, dtype=torch.bfloat16)
    h0 = x.pop("initial_state")
    default = selective_scan_triton(**x, delta_softplus=True, initial_state=h0)
    assert torch.equal(default, selective_scan_triton(**x, delta_softplus=True, initial_state=h0, kernel="gluon"))
    # the two kernels agree with each other as well as with the reference
    assert _rel(default, selective_scan_triton(**x, delta_softplus=True, initial_state=h0, kernel="triton")) <= 1e-2


def test_triton_scan_kernel_choice_is_checked():
    x = dict(u=torch.randn(1, 4, 8), delta=torch.rand(1, 4, 8), A=-torch.rand(4, 16), B=torch.randn(1, 16, 8),
             C=torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="kernel must be"):
        selective_scan_triton(**x, kernel="cuda")
    with pytest.raises((RuntimeError, ValueError)):  # no Gluon here, or CPU tensors
        selective_scan_triton(**x, kernel="gluon")
    with pytest.raises(RuntimeError, match="Gluon kernel needs"):  # block sizes belong to the plain kernel
        selective_scan_triton(**x, kernel="gluon", block_channels=2)


def test_triton_scan_refuses_cpu_tensors():
    x = {k: v for k, v in dict(u=torch.randn(1, 4, 8), delta=torch.rand(1, 4, 8), A=-torch.rand(4, 16),
                               B=torch.randn(1, 16, 8), C=torch.randn(1, 16, 8)).items()}
    with pytest.raises((RuntimeError, ValueError)):
        selective_scan_triton(**x)


@pytest.mark.gpu
@pytest.mark.parametrize("block_channels", [1, 2, 4])
def test_triton_scan_every_channel_block_size(block_channels):
    _need_gpu()
    x = _inputs(1, 10, 16, 500, seed=5)
    h0 = x.pop("initial_state")
    got, last = selective_scan_triton(**x, delta_softplus=True, return_last_state=True, initial_state=h0,
                                      block_channels=block_channels, kernel="triton")
    want, want_last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True, initial_state=h0)
    assert _rel(got, want) <= 1e-5 and _rel(last, want_last) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks", [1, 3, 8])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_triton_scan_in_chunks_side_by_side(kernel, chunks, reverse, with_h0):
    """The sequence cut into pieces scanned in parallel, the state carried between them afterwards."""
    _need_gpu(kernel)
    x = _inputs(1, 6, 16, 3001, seed=chunks + 2 * reverse)
    h0 = x.pop("initial_state")
    h0 = h0 if with_h0 else None
    got, last = selective_scan_triton(**x, delta_softplus=True, return_last_state=True, initial_state=h0,
                                      reverse=reverse, chunks=chunks, kernel=kernel)
    f = {k: (_flip(v) if (reverse and k in ("u", "delta", "B", "C", "z")) else v) for k, v in x.items()}
    want, want_last = selective_scan_ref(**f, delta_softplus=True, return_last_state=True, initial_state=h0)
    if reverse:
        want = want.flip(-1)
    assert _rel(got, want) <= 1e-5 and _rel(last, want_last) <= 1e-5


def test_offsets_past_32_bits_are_left_to_the_torch_path():
    from seqssm.ops.selective_scan_triton import _offsets_fit

    assert _offsets_fit(torch.empty(8, 512, 131072, device="meta"), torch.empty(8, 16, 131072, device="meta"))
    assert _offsets_fit(torch.empty(1, 512, 1 << 22, device="meta"))  # last offset 2^31 - 1: still fits
    assert not _offsets_fit(torch.empty(2, 512, 1 << 22, device="meta"))
    # a transposed view reaches as far as its storage does
    assert not _offsets_fit(torch.empty((1 << 22) + 1, 512, device="meta").t()[None])


def test_dispatch_to_the_triton_scan_without_a_gpu(monkeypatch):
    """Which backend selective_scan takes, with the GPU facts stubbed (the kernel itself: GPU tests above)."""
    calls = []
    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: None)
    monkeypatch.setattr(ss, "selective_scan_triton", lambda *a, **k: calls.append(1) or "triton")
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 4, 9, generator=g), torch.rand(1, 4, 9, generator=g), -torch.rand(4, 16, generator=g),
         torch.randn(1, 16, 9, generator=g), torch.randn(1, 16, 9, generator=g))
    monkeypatch.setattr(ss, "_triton_suits", lambda *a: True)
    assert selective_scan(*x) == "triton" and selective_scan(*x, backend="triton") == "triton"
    assert torch.allclose(selective_scan(*x, backend="torch"), selective_scan_ref(*x), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # an explicit torch backend is obeyed
    monkeypatch.setattr(ss, "_triton_suits", lambda *a: False)
    assert torch.allclose(selective_scan(*x), selective_scan_ref(*x), rtol=1e-5, atol=1e-6) and len(calls) == 2
    with pytest.raises(ValueError, match="backend 'triton' needs"):
        selective_scan(*x, backend="triton")
    with pytest.raises(ValueError, match="A must be"):  # shapes are checked before the kernel is called
        selective_scan(*x[:2], -torch.rand(3, 16), *x[3:], backend="triton")


def test_auto_inference_takes_the_gluon_kernel_even_with_mamba_ssm(monkeypatch):
    """With no gradient needed, auto takes the Gluon kernel even where mamba-ssm's imports, from 2 rows up
    or from an initial state (which mamba-ssm's kernel cannot start from); a single row without one, or
    only the plain Triton kernel, leaves it to mamba-ssm's (GPU facts stubbed)."""
    calls = []
    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: object())
    monkeypatch.setattr(ss, "_resolve", lambda backend, *a, **k: "cuda" if backend == "auto" else backend)
    monkeypatch.setattr(ss, "_scan_with_kernel", lambda *a, **k: calls.append("cuda") or "cuda")
    monkeypatch.setattr(ss, "selective_scan_triton", lambda *a, **k: calls.append("triton") or "triton")
    monkeypatch.setattr(ss, "_triton_suits", lambda *a: True)
    monkeypatch.setattr(ss, "_gluon_kernel", lambda: object())
    g = torch.Generator().manual_seed(0)

    def inputs(rows):
        return (torch.randn(rows, 4, 9, generator=g), torch.rand(rows, 4, 9, generator=g),
                -torch.rand(4, 16, generator=g), torch.randn(rows, 16, 9, generator=g),
                torch.randn(rows, 16, 9, generator=g))

    one, two = inputs(1), inputs(2)
    h0 = torch.randn(1, 4, 16, generator=g)
    assert selective_scan(*two) == "triton" and selective_scan(*one) == "cuda"
    assert selective_scan(*one, initial_state=h0) == "triton"
    assert selective_scan(*one, initial_state=h0, backend="cuda") == "cuda"  # an explicit backend is obeyed
    monkeypatch.setattr(ss, "_gluon_kernel", lambda: None)  # the plain Triton kernel is no faster than mamba-ssm's
    assert selective_scan(*two) == "cuda" and selective_scan(*one, initial_state=h0) == "cuda"
    assert calls == ["triton", "cuda", "triton", "cuda", "cuda", "cuda"]


def test_mixer_backend(monkeypatch):
    """What a Mamba mixer's call takes (stubbed GPU facts): Triton for CUDA inference under auto without
    mamba-ssm; with it, from 2 rows up (`rows` overrides the tensor's batch) and not with only the plain
    kernel; with a gradient, scan_backend."""
    class FakeCuda:
        is_cuda = True
        device = torch.device("cpu")

        def __init__(self, rows):
            self.shape = (rows, 8, 100)

    one, two = FakeCuda(1), FakeCuda(2)
    monkeypatch.setattr(ss, "triton_scan_available", lambda: True)
    monkeypatch.setattr(ss, "_gluon_kernel", lambda: object())
    for installed in ("cuda", "torch"):
        monkeypatch.setattr(ss, "scan_backend", lambda backend, tensor, i=installed: i if backend == "auto" else backend)
        with torch.no_grad():
            assert ss.mixer_backend("auto", two) == "triton"
            assert ss.mixer_backend("auto", one) == ("cuda" if installed == "cuda" else "triton")
            assert ss.mixer_backend("auto", one, rows=2) == "triton"
            assert ss.mixer_backend("torch", two) == "torch" and ss.mixer_backend("triton", one) == "triton"
        assert ss.mixer_backend("auto", two) == installed  # a gradient: no Triton (no backward)
    monkeypatch.setattr(ss, "_gluon_kernel", lambda: None)
    with torch.no_grad():
        assert ss.mixer_backend("auto", two) == "triton"  # without mamba-ssm (the stub above): the plain kernel
        monkeypatch.setattr(ss, "scan_backend", lambda backend, tensor: "cuda")
        assert ss.mixer_backend("auto", two) == "cuda"
        monkeypatch.setattr(ss, "_gluon_kernel", lambda: object())
        assert ss.mixer_backend("auto", torch.zeros(2, 1)) == "cuda"  # a CPU tensor


def test_reverse_scan_dispatch(monkeypatch):
    """reverse=True: the Triton kernel runs it in place where it suits; otherwise the scan of the
    flipped inputs, flipped back (GPU facts stubbed; the kernel's own reverse: GPU tests above)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 4, 9, generator=g), torch.rand(2, 4, 9, generator=g), -torch.rand(4, 16, generator=g),
         torch.randn(2, 16, 9, generator=g), torch.randn(2, 16, 9, generator=g))
    z = torch.randn(2, 4, 9, generator=g)
    fl = [_flip(t) if t.dim() == 3 else t for t in x]
    want, last = selective_scan_ref(*fl, z=_flip(z), return_last_state=True)
    got, got_last = selective_scan(*x, z=z, return_last_state=True, reverse=True, backend="torch")
    assert torch.allclose(got, _flip(want), rtol=1e-5, atol=1e-6) and torch.allclose(got_last, last, atol=1e-6)
    calls = []
    monkeypatch.setattr(ss, "selective_scan_triton", lambda *a, **k: calls.append(k["reverse"]) or "triton")
    monkeypatch.setattr(ss, "_triton_suits", lambda *a: True)
    assert selective_scan(*x, reverse=True) == "triton" and calls == [True]
    assert torch.allclose(selective_scan(*x, z=z, reverse=True, backend="torch"), _flip(want), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(ss, "_triton_suits", lambda *a: False)
    with pytest.raises(ValueError, match="backend 'triton' needs"):
        selective_scan(*x, reverse=True, backend="triton")
