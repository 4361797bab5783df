"""The flip-free RC paths of Caduceus-PS against their literal twins, on fresh random inputs.

rcps_fused_add_norm vs rcps_fused_add_norm_ref (reversed-weight norm instead of reversed
activations), Mamba(flip_channels=True) vs flipC(Mamba(flipC(x))), BiMambaWrapper.forward_rc vs
flipLC(f(flipLC(b))), RCPSWrapper.forward vs forward_ref; BiMambaWrapper's inference path (shared
projections, the backward direction read in place) vs the two whole Mambas with literal flips; the
strand-major stack (state as [2B, L, d], strands_add_norm) vs the layer-by-layer RCPS stack.
"""

import pytest
import torch
import torch.nn as nn

from seqssm.layers.mamba import Mamba
from seqssm.layers.norm import RMSNorm, add_norm
from seqssm.layers.rcps import (RCPSWrapper, flip_lc, from_strands, rcps_fused_add_norm, rcps_fused_add_norm_ref,
                                strands_add_norm_ref, to_strands)
from seqssm.models.caduceus import BiMambaWrapper

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomized(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.mark.parametrize("norm_cls", [RMSNorm, nn.LayerNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual,residual_in_fp32", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("swap", [True, False])
@pytest.mark.parametrize("prenorm", [True, False])
def test_rcps_fused_add_norm_equals_the_reference_order(norm_cls, dtype, with_residual, residual_in_fp32, swap,
                                                        prenorm):
    g = torch.Generator().manual_seed(int(swap) + 2 * int(with_residual))
    norm = randomized(norm_cls(24), seed=1)
    x = torch.randn(2, 33, 48, generator=g).to(dtype)
    r = torch.randn(2, 33, 48, generator=g).to(dtype) if with_residual else None
    kw = dict(residual_in_fp32=residual_in_fp32, prenorm=prenorm, swap_halves=swap)
    got, want = rcps_fused_add_norm(x, r, norm, **kw), rcps_fused_add_norm_ref(x, r, norm, **kw)
    got, want = (got, want) if prenorm else ((got,), (want,))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if dtype == torch.float32:
            assert rel(a, b) <= 1e-6
        else:  # the float32 results agree to ~1e-7; rounding to bf16 may differ by one ulp
            assert rel(a, b) <= 1e-2
    if prenorm:  # the residual is elementwise: identical
        assert torch.equal(got[1], want[1])


def test_add_norm_flip_weight_is_the_flipped_norm():
    norm = randomized(nn.LayerNorm(16), seed=2)
    x, r = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    out, res = add_norm(x, r, norm, prenorm=True, fused=True, flip_weight=True)
    out_ref, res_ref = add_norm(x.flip(-1), r.flip(-1), norm, prenorm=True, fused=True)
    assert rel(out, out_ref.flip(-1)) <= 1e-6 and torch.equal(res, res_ref.flip(-1))
    with pytest.raises(ValueError, match="fused"):
        add_norm(x, r, norm, fused=False, flip_weight=True)


@pytest.mark.parametrize("bias", [False, True])
def test_mamba_flip_channels(bias):
    torch.manual_seed(3)
    m = randomized(Mamba(16, d_state=4, bias=bias), seed=3)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        want = m(x.flip(-1)).flip(-1)
        got = m(x, flip_channels=True)
        # with a carried state as well
        y1, s1 = m(x[:, :17], return_state=True, flip_channels=True)
        y2 = m(x[:, 17:], state=s1, flip_channels=True)
    assert rel(got, want) <= 1e-6
    assert rel(torch.cat([y1, y2], 1), want) <= 1e-5
    assert not torch.allclose(got, m(x), atol=1e-3)


@pytest.mark.parametrize("kw", [dict(), dict(bidirectional_strategy="ew_multiply", bidirectional_weight_tie=False),
                                dict(bidirectional=False)])
def test_bimamba_forward_rc_and_rcps_wrapper(kw):
    torch.manual_seed(4)
    bi = randomized(BiMambaWrapper(16, d_state=4, **kw), seed=4)
    b = torch.randn(2, 30, 16)
    with torch.no_grad():
        assert rel(bi.forward_rc(b), flip_lc(bi(flip_lc(b)))) <= 1e-6
        wrapper = RCPSWrapper(bi)
        x = torch.randn(2, 30, 32)
        assert rel(wrapper(x), wrapper.forward_ref(x)) <= 1e-6
        # both strands as one batch (what CUDA inference on the Triton scan does) gives the same
        wrapper.batch_strands = True
        assert rel(wrapper(x), wrapper.forward_ref(x)) <= 1e-6
        wrapper.batch_strands = None
        assert not wrapper._batch_strands(x)  # auto: not on the CPU
    # gradients flow through the reversed weights like through the reversed activations
    x = torch.randn(1, 12, 32)
    w = torch.randn(1, 12, 32)
    grads = []
    for fn in (wrapper.forward, wrapper.forward_ref):
        bi.zero_grad()
        (fn(x) * w).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in bi.parameters()]))
    assert rel(grads[0], grads[1]) <= 1e-5


@pytest.mark.gpu
def test_strands_batched_on_the_triton_scan_equal_the_two_calls(monkeypatch):
    """CUDA inference without mamba-ssm runs both strands as one batch (auto); same output as two calls."""
    import seqssm.ops.selective_scan as ss
    from seqssm.ops.selective_scan_triton import triton_scan_available

    if not triton_scan_available():
        pytest.skip("needs a CUDA GPU and Triton")
    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: None)  # as without mamba-ssm
    torch.manual_seed(5)
    wrapper = RCPSWrapper(randomized(BiMambaWrapper(32, d_state=16), seed=5)).cuda()
    x = torch.randn(3, 700, 64, device="cuda")
    with torch.inference_mode():
        assert wrapper._batch_strands(x)
        batched = wrapper(x)
        wrapper.batch_strands = False
        separate = wrapper(x)
    assert rel(batched, separate) <= 1e-5 and rel(batched, wrapper.forward_ref(x)) <= 1e-5


def _unfused(monkeypatch):
    """Switch BiMambaWrapper's shared-projection inference path off (each Mamba whole, flips literal)."""
    monkeypatch.setattr(BiMambaWrapper, "_fused", lambda self, x: False)


@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
@pytest.mark.parametrize("bias", [False, True])
def test_bimamba_fused_inference_equals_the_two_whole_mambas(strategy, bias, monkeypatch):
    """Inference shares the tied in_proj / out_proj between the directions and reads the backward one
    right to left in place; forward and forward_rc equal the literal two-Mamba formula."""
    torch.manual_seed(7)
    bi = randomized(BiMambaWrapper(16, d_state=8, bidirectional_strategy=strategy, bias=bias), seed=7)
    h = torch.randn(2, 45, 16)
    calls = []
    real = BiMambaWrapper._forward_fused
    monkeypatch.setattr(BiMambaWrapper, "_forward_fused", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    with torch.no_grad():
        fused, fused_rc = bi(h), bi.forward_rc(h)
    assert calls == [{"flip_channels": False}, {"flip_channels": True, "swap": True}]
    with torch.no_grad():
        _unfused(monkeypatch)
        want, want_rc = bi(h), bi.forward_rc(h)
    assert rel(fused, want) <= 1e-6 and rel(fused_rc, want_rc) <= 1e-6
    with torch.no_grad():
        assert rel(fused_rc, flip_lc(bi(flip_lc(h)))) <= 1e-6


def test_bimamba_fused_path_only_for_tied_inference():
    torch.manual_seed(8)
    h = torch.randn(1, 10, 16)
    tied = BiMambaWrapper(16, d_state=4)
    untied = BiMambaWrapper(16, d_state=4, bidirectional_weight_tie=False)
    with torch.no_grad():
        assert tied._fused(h) and not untied._fused(h)
    assert not tied._fused(h)  # gradients wanted: the autograd path
    with torch.no_grad():
        assert not BiMambaWrapper(16, d_state=4, bidirectional=False)._fused(h)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
def test_bimamba_fused_on_the_triton_kernels_equals_torch(dtype, strategy, monkeypatch):
    """On a GPU the backward direction runs in the Triton conv and scan kernels (reverse=True): against
    the unfused torch path in float32, float32 within 1e-5 and bfloat16 autocast within 1e-2 (relative
    to the output's norm)."""
    from seqssm.ops.selective_scan_triton import triton_scan_available

    if not triton_scan_available():
        pytest.skip("needs a CUDA GPU and Triton")
    torch.manual_seed(9)
    bi = randomized(BiMambaWrapper(32, d_state=16, bidirectional_strategy=strategy), seed=9).cuda()
    for m in (bi.mamba_fwd, bi.mamba_rev):
        m.backend = "triton"
    h = torch.randn(2, 1500, 32, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got, got_rc = bi(h), bi.forward_rc(h)
    for m in (bi.mamba_fwd, bi.mamba_rev):
        m.backend = "torch"
    _unfused(monkeypatch)
    with torch.inference_mode():
        want, want_rc = bi(h), bi.forward_rc(h)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    errs = [float((a.float() - b).norm() / b.norm()) for a, b in ((got, want), (got_rc, want_rc))]
    assert max(errs) <= tol, errs


@pytest.mark.parametrize("residual_in_fp32", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("norm_cls", [RMSNorm, nn.LayerNorm])
def test_strands_add_norm_is_the_swapping_rcps_add_norm_in_strand_major_form(residual_in_fp32, with_residual,
                                                                             norm_cls):
    torch.manual_seed(10)
    norm = randomized(norm_cls(6), seed=10)
    x = torch.randn(2, 7, 12)
    r = torch.randn(2, 7, 12) if with_residual else None
    out, res = rcps_fused_add_norm(x, r, norm, residual_in_fp32=residual_in_fp32, prenorm=True, swap_halves=True)
    x0, r0 = to_strands(x), None if r is None else to_strands(r)
    # from the plain strand-major form: results channel-reversed (weight reversed instead of activations)
    got, got_res = strands_add_norm_ref(x0, r0, norm, residual_in_fp32=residual_in_fp32, flip_weight=True)
    assert rel(got.flip(-1), to_strands(out)) <= 1e-6 and rel(got_res.flip(-1), to_strands(res)) <= 1e-6
    assert got_res.dtype == res.dtype
    # from the channel-reversed form: back to the plain one
    x1, r1 = x0.flip(-1), None if r0 is None else r0.flip(-1)
    got, got_res = strands_add_norm_ref(x1, r1, norm, residual_in_fp32=residual_in_fp32, flip_weight=False)
    assert rel(got, to_strands(out)) <= 1e-6 and rel(got_res, to_strands(res)) <= 1e-6
    assert torch.equal(from_strands(x0), x) and torch.equal(from_strands(x1, flipped=True), x)


@pytest.mark.parametrize("n_layer", [2, 3])
@pytest.mark.parametrize("overrides", [dict(), dict(fused_add_norm=False), dict(residual_in_fp32=True),
                                       dict(rms_norm=False, bidirectional_strategy="ew_multiply"),
                                       dict(bidirectional_weight_tie=False), "pieces"])
def test_strand_major_stack_equals_the_rcps_stack(n_layer, overrides, monkeypatch):
    """CaduceusBackbone._forward_strands (the state as [2B, L, d] from embeddings to final norm) against
    the layer-by-layer RCPS forward, forced on the CPU (on a GPU it is taken where strands are batched)."""
    from seqssm.models.caduceus import CaduceusBackbone, CaduceusConfig

    if overrides == "pieces":  # mixers over pieces of 16 positions with the state carried (as a 1M window)
        monkeypatch.setattr(BiMambaWrapper, "piece_length", 16)
        overrides = {}
    torch.manual_seed(11)
    backbone = randomized(CaduceusBackbone(CaduceusConfig.dna(d_model=16, n_layer=n_layer, **overrides)), seed=11)
    ids = torch.randint(7, 11, (2, 40))
    calls = []
    real = CaduceusBackbone._forward_strands
    monkeypatch.setattr(CaduceusBackbone, "_forward_strands", lambda self, h: calls.append(1) or real(self, h))
    with torch.no_grad():
        monkeypatch.setattr(RCPSWrapper, "batch_strands", False)
        want = backbone(ids)
        monkeypatch.setattr(RCPSWrapper, "batch_strands", True)
        got = backbone(ids)
        assert calls == [1]
        assert backbone(ids, output_hidden_states=True)[0].shape == got.shape and calls == [1]
    assert rel(got, want) <= 1e-5
    assert not backbone._strand_major(backbone.embeddings(ids))  # gradients wanted: the layer-by-layer path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pieces", [False, True])
def test_strand_major_stack_on_the_gpu_equals_the_rcps_stack(dtype, pieces, monkeypatch):
    """CUDA inference on the Triton kernels takes the strand-major stack by itself (auto); against the
    layer-by-layer stack on the torch kernels in float32: float32 within 1e-5, bfloat16 within 1e-2."""
    import seqssm.ops.selective_scan as ss
    from seqssm.models.caduceus import CaduceusBackbone, CaduceusConfig
    from seqssm.ops.selective_scan_triton import triton_scan_available

    if not triton_scan_available():
        pytest.skip("needs a CUDA GPU and Triton")
    monkeypatch.setattr(ss, "_mamba_scan_kernel", lambda: None)  # as without mamba-ssm
    if pieces:  # mixers over pieces with the state carried (the Gluon scan from an initial state)
        monkeypatch.setattr(BiMambaWrapper, "piece_length", 256)
    torch.manual_seed(12)
    backbone = randomized(CaduceusBackbone(CaduceusConfig.dna(d_model=32, n_layer=3)), seed=12).cuda()
    ids = torch.randint(7, 11, (2, 1000), device="cuda")
    calls = []
    real = CaduceusBackbone._forward_strands
    monkeypatch.setattr(CaduceusBackbone, "_forward_strands", lambda self, h: calls.append(1) or real(self, h))
    with torch.inference_mode():
        got = backbone.to(dtype)(ids)
        assert calls == [1]
        backbone.float()
        for m in backbone.modules():
            if isinstance(m, Mamba):
                m.backend = "torch"
        monkeypatch.setattr(RCPSWrapper, "batch_strands", False)
        want = backbone(ids)
    err = float((got.float() - want).norm() / want.norm())
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2), err


@pytest.mark.gpu
def test_directions_on_two_streams_equal_one_stream(monkeypatch):
    """The two directions' conv + scan side by side on two CUDA streams: the same numbers as in turn."""
    import seqssm.models.caduceus as cm
    from seqssm.ops.selective_scan_triton import gluon_fills_gpu, triton_scan_available

    if not triton_scan_available():
        pytest.skip("needs a CUDA GPU and Triton")
    torch.manual_seed(13)
    bi = randomized(BiMambaWrapper(64, d_state=16), seed=13).cuda()
    for m in (bi.mamba_fwd, bi.mamba_rev):
        m.backend = "triton"
    h = torch.randn(1, 5000, 64, device="cuda")  # 128 channels: one scan leaves the GPU short of work
    monkeypatch.setattr(BiMambaWrapper, "concurrent_min_length", 4096)  # (the default waits for 65,536)
    calls = []
    real = cm._both
    monkeypatch.setattr(cm, "_both", lambda *a, concurrent: calls.append(concurrent) or real(*a, concurrent=concurrent))
    assert not gluon_fills_gpu(1, 128, 16, "cuda") and gluon_fills_gpu(64, 512, 16, "cuda")
    with torch.inference_mode():
        together, together_rc = bi(h), bi.forward_rc(h)
        monkeypatch.setattr(BiMambaWrapper, "concurrent_directions", False)
        apart, apart_rc = bi(h), bi.forward_rc(h)
    assert calls == [True, True, False, False]
    assert torch.equal(together, apart) and torch.equal(together_rc, apart_rc)
