"""The lean HyenaDNA inference path (models/hyena_lean.py) against the reference forward it replaces:
grouped, gated FFT convolution against the direct sum, transform lengths, whole models in float32
and bf16 autocast, chunk and group sizes that do not divide the shapes, the filter-spectrum cache and
its invalidation, and the dispatch (autograd and training mode keep the reference path)."""

from __future__ import annotations

import pytest
import torch

from seqssm.models import HyenaConfig, HyenaDNAModel, load_model
from seqssm.models.hyena_lean import LeanHyenaInference
from seqssm.ops.fftconv import fft_length, fftconv_gated_, fftconv_ref
from seqssm.tokenizers.dna import encode

from test_hyena import fresh_generator, perturbed, rel


def reference(model: HyenaDNAModel, x: torch.Tensor) -> torch.Tensor:
    """The plain forward (lean path switched off), without autograd."""
    lean, model.lean = model.lean, None
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.lean = lean


def model_for(seed: int, **kw) -> HyenaDNAModel:
    torch.manual_seed(seed)
    base = dict(d_model=24, n_layer=2, d_inner=40, max_seq_len=700, emb_dim=5, filter_order=16, activation_freq=10)
    return perturbed(HyenaDNAModel(HyenaConfig(**{**base, **kw})), seed=seed, scale=0.1).eval()


def test_fft_length_is_the_smallest_fast_size():
    def fast(n):  # 2^a or 3 * 2^a
        while n % 2 == 0:
            n //= 2
        return n in (1, 3)

    for L in list(range(1, 300)) + [1000, 4097, 32768, 1_000_000, 1_000_002]:
        n = fft_length(L)
        assert n >= 2 * L - 1 and fast(n), L
        assert not any(fast(m) for m in range(2 * L - 1, n)), L


@pytest.mark.parametrize("B,H,L,rows", [(1, 6, 50, 4), (3, 5, 77, 7), (4, 8, 33, 2), (2, 3, 1, 64)])
def test_gated_fftconv_matches_direct_sum(B, H, L, rows):
    g, seed = fresh_generator()
    v = torch.randn(B, H, L, generator=g)
    k = torch.randn(H, L, generator=g) * torch.exp(-torch.arange(L) / 20)
    D = torch.randn(H, generator=g)
    gate = torch.randn(B, H, L, generator=g)
    want = fftconv_ref(v.double(), k.double(), D.double()) * gate.double()
    n = fft_length(L)
    calls = []

    def spectrum(c0, c1):
        calls.append((c0, c1))
        return torch.fft.rfft(k[c0:c1], n=n) / n

    out = fftconv_gated_(v, D, gate.clone(), spectrum, n=n, rows_per_group=rows)
    assert rel(out, want) <= 1e-5, f"seed {seed}"
    # each channel's filter is transformed exactly once, whatever the batch size
    assert sorted(c for c0, c1 in calls for c in range(c0, c1)) == list(range(H))


@pytest.mark.parametrize("n", [2, 4, 12, 30, 96, 1024])
def test_packed_spectral_product_twin_is_the_real_fft_convolution(n):
    """Half-length complex FFTs of the packed pairs, the fused spectral step, the inverse: = irfft(rfft(x) K)."""
    g, seed = fresh_generator()
    M, C = n // 2, 5
    x = torch.randn(3, C, n, generator=g, dtype=torch.float64)
    kf = torch.randn(C, n, generator=g, dtype=torch.float64) / n
    K = torch.fft.rfft(kf)
    Kp = torch.fft.fft(torch.view_as_complex(kf.unflatten(-1, (M, 2))))  # the filter in packed form
    assert rel(torch.view_as_real(hf.real_spectrum_from_packed(Kp, n)), torch.view_as_real(K)) <= 1e-12
    want = torch.fft.irfft(torch.fft.rfft(x) * K, n=n, norm="forward")
    Z = torch.fft.fft(torch.view_as_complex(x.unflatten(-1, (M, 2))))
    for spec in (K, Kp):
        Zp = hf.packed_spectral_product_ref(Z, spec, n)
        got = torch.view_as_real(torch.fft.ifft(Zp, norm="forward")).flatten(-2)
        assert rel(got, want) <= 1e-12, f"seed {seed}"
        Z2 = Z.clone()
        assert hf.packed_spectral_product_(Z2, spec, n) is Z2 and torch.equal(Z2, Zp)  # in place (the twin on CPU)


@pytest.mark.parametrize("B,H,L,rows", [(1, 6, 50, 4), (3, 5, 77, 7), (2, 3, 1, 64), (2, 4, 16, 8)])
def test_packed_gated_fftconv_matches_direct_sum(B, H, L, rows):
    g, seed = fresh_generator()
    v = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    k = torch.randn(H, L, generator=g, dtype=torch.float64) * torch.exp(-torch.arange(L) / 20)
    D = torch.randn(H, generator=g, dtype=torch.float64)
    gate = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    want = fftconv_ref(v, k, D) * gate
    n = fft_length(L)
    vpad = torch.nn.functional.pad(v, (0, n - L))
    kp = torch.nn.functional.pad(k, (0, n - L)) / n
    spectra = {
        "rfft": lambda c0, c1: torch.fft.rfft(k[c0:c1], n=n) / n,
        "packed": lambda c0, c1: torch.fft.fft(torch.view_as_complex(kp[c0:c1].unflatten(-1, (n // 2, 2)))),
    }
    for x in (v, vpad):  # unpadded input, and a buffer already zero past L
        for form, spectrum in spectra.items():
            if form == "packed" and n % 2:
                continue
            out = fftconv_gated_(x, D, gate.clone(), spectrum, n=n, rows_per_group=rows, packed=True)
            assert rel(out, want) <= 1e-12, f"seed {seed} {form}"


def test_gated_fftconv_rejects_a_circular_transform():
    v = torch.randn(1, 2, 10)
    with pytest.raises(ValueError, match="2L - 1"):
        fftconv_gated_(v, torch.zeros(2), v.clone(), lambda a, b: None, n=18, rows_per_group=2)


@pytest.mark.parametrize("B,L,seq_chunk,rows", [(1, 600, 1 << 18, 64), (3, 257, 100, 7), (2, 130, 3, 1), (5, 2, 4, 3)])
def test_lean_forward_equals_reference_float32(B, L, seq_chunk, rows):
    g, seed = fresh_generator()
    model = model_for(seed % 1000)
    x = torch.randint(7, 12, (B, L), generator=g)
    want = reference(model, x)
    for packed in (None, True):  # the CPU default (real transforms), and the packed form's torch twins
        model.lean = LeanHyenaInference(seq_chunk=seq_chunk, rows_per_group=rows, packed=packed)
        for _ in range(2):  # the second call uses the cached filter spectra
            with torch.inference_mode():
                got = model(x)
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert rel(got, want) <= 1e-5, f"seed {seed} packed {packed}"


def test_lean_forward_float64_is_exact():
    g, seed = fresh_generator()
    model = model_for(seed % 1000).double()
    model.lean = LeanHyenaInference(seq_chunk=50, rows_per_group=5)
    x = torch.randint(7, 12, (2, 333), generator=g)
    want = reference(model, x)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float64 and rel(got, want) <= 1e-12, f"seed {seed}"


def test_gradient_checkpointing_gives_the_same_gradients():
    g, seed = fresh_generator()
    model = model_for(seed % 1000).train()
    model.dropout.p = 0.0
    x = torch.randint(7, 12, (2, 100), generator=g)
    w = torch.randn(2, 100, model.config.d_model, generator=g)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        (model(x) * w).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert rel(b, a) <= 1e-6, f"seed {seed}"


def test_lean_forward_on_the_bundled_model_and_real_dna(lambda_genome):
    loaded = load_model("hyenadna-small-chr20")
    model = loaded.model.backbone.eval()
    L = min(model.config.max_seq_len, 1024)
    x = torch.from_numpy(encode(lambda_genome[5000 : 5000 + 2 * L]).astype("int64")).view(2, L)
    want = reference(model, x)
    model.lean = LeanHyenaInference(seq_chunk=300, rows_per_group=48)
    with torch.no_grad():
        got = model(x)
    assert rel(got, want) <= 1e-5


def test_lean_forward_bf16_autocast_close_to_float32_reference(lambda_genome):
    model = model_for(3)
    x = torch.from_numpy(encode(lambda_genome[100:700]).astype("int64"))[None]
    want = reference(model, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x)
    assert got.dtype == torch.float32
    assert rel(got, want) <= 1e-2


def test_spectrum_cache_is_used_and_invalidated_by_parameter_updates():
    g, seed = fresh_generator()
    model = model_for(seed % 1000)
    x = torch.randint(7, 12, (2, 300), generator=g)
    with torch.no_grad():
        first = model(x)
        assert len(model.lean._cache) == model.config.n_layer  # one spectrum per layer, this length
        again = model(x)
        assert torch.equal(first, again)
        # An in-place update (what an optimizer step does) must not leave a stale spectrum behind.
        model.layers[1].mixer.filter_fn.implicit_filter[-1].weight.mul_(1.5)
        updated = model(x)
    assert rel(updated, reference(model, x)) <= 1e-5, f"seed {seed}"
    assert rel(updated, first) > 1e-3
    # Switching the transform form replaces each layer's entry instead of caching a second form.
    model.lean.packed = True
    with torch.no_grad():
        assert rel(model(x), updated) <= 1e-5
    assert len(model.lean._cache) == model.config.n_layer


def test_spectrum_cache_respects_its_budget():
    model = model_for(5)
    model.lean = LeanHyenaInference(cache_bytes=0)
    x = torch.randint(7, 12, (1, 200))
    with torch.no_grad():
        got = model(x)
    assert not model.lean._cache
    assert rel(got, reference(model, x)) <= 1e-5


def test_autograd_and_training_mode_use_the_reference_path():
    model = model_for(7)
    calls = []
    lean = model.lean

    def spy(backbone, ids):
        calls.append(ids.shape)
        return lean(backbone, ids)

    model.lean = spy
    x = torch.randint(7, 12, (1, 64))
    model(x).sum().backward()  # grad enabled: reference path, gradients flow
    assert model.layers[0].mixer.in_proj.weight.grad is not None and not calls
    model.train()
    with torch.no_grad():
        model(x)
    assert not calls
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls == [torch.Size([1, 64])]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_forward_cuda(dtype):
    g, seed = fresh_generator()
    model = model_for(seed % 1000, d_model=128, n_layer=2, d_inner=512, max_seq_len=1 << 17).cuda()
    x = torch.randint(7, 12, (2, (1 << 17) - 5), generator=g).cuda()
    want = reference(model, x)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        got = model(x)
    assert rel(got, want) <= (1e-4 if dtype is torch.float32 else 1e-2), f"seed {seed}"


@pytest.mark.gpu
def test_compiled_model_runs_the_lean_path_eagerly_cuda():
    """torch.compile of a model in eval mode (as `seqssm pretrain --compile` evaluates it): the lean
    path is left out of the graph, so its Triton kernels run as they are, with the lean results."""
    torch._dynamo.reset()
    g, seed = fresh_generator()
    model = model_for(seed % 1000, d_model=64, n_layer=2, d_inner=256, max_seq_len=1 << 13).cuda()
    x = torch.randint(7, 12, (2, (1 << 13) - 5), generator=g).cuda()
    want = reference(model, x)
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(x)
    assert rel(got, want) <= 1e-4, f"seed {seed}"


# ------------------------------------------------------------------------------------------------
# fused elementwise passes: the torch twins against first principles, the Triton kernels against twins

from seqssm.ops import hyena_fused as hf  # noqa: E402


def conv_gate_direct(z_full, w, bias, d):
    """Whole-sequence definition: depthwise causal conv1d over [B, 3d, L], then split and gate."""
    K = w.shape[1]
    zt = z_full.transpose(1, 2)
    zc = torch.nn.functional.conv1d(torch.nn.functional.pad(zt, (K - 1, 0)), w[:, None, :], bias, groups=3 * d)
    x0, x1, v = zc.split(d, dim=1)
    return x0, v * x1


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_short_conv_gate_twin_in_chunks_equals_whole_sequence_conv(chunk):
    g, seed = fresh_generator()
    B, L, d, K = 2, 37, 6, 3
    z = torch.randn(B, L, 3 * d, generator=g, dtype=torch.float64)
    w = torch.randn(3 * d, K, generator=g, dtype=torch.float64)
    bias = torch.randn(3 * d, generator=g, dtype=torch.float64)
    x0, vx = conv_gate_direct(z, w, bias, d)
    gate = torch.full((B, d, L), float("nan"), dtype=torch.float64)
    vbuf = torch.full((B, d, L + 3), float("nan"), dtype=torch.float64)
    for s0 in range(0, L, chunk):
        s1 = min(s0 + chunk, L)
        lo = max(s0 - (K - 1), 0)
        hf.short_conv_gate_ref(z[:, lo:s1], w, bias, gate, vbuf, s0, s0 - lo)
    assert rel(gate, x0) <= 1e-12 and rel(vbuf[..., :L], vx) <= 1e-12, f"seed {seed}"
    assert torch.isnan(vbuf[..., L:]).all()  # nothing written past the sequence


@pytest.mark.gpu
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_their_twins_cuda(cd):
    g, seed = fresh_generator()
    dev = "cuda"
    B, L, d, K = 3, 3000, 80, 3
    z = torch.randn(B, L, 3 * d, generator=g).to(dev, cd)
    w = torch.randn(3 * d, K, generator=g).to(dev)
    bias = torch.randn(3 * d, generator=g).to(dev)
    outs = []
    for fn in (hf.short_conv_gate, hf.short_conv_gate_ref):
        gate = torch.full((B, d, L), float("nan"), device=dev, dtype=cd)
        vbuf = torch.full((B, d, L + 7), float("nan"), device=dev)
        for s0 in range(0, L, 700):
            s1 = min(s0 + 700, L)
            lo = max(s0 - (K - 1), 0)
            fn(z[:, lo:s1], w, bias, gate, vbuf, s0, s0 - lo)
        assert not gate.isnan().any() and not vbuf[..., :L].isnan().any()
        outs.append((gate.float(), vbuf[..., :L]))
    tol = 1e-6 if cd is torch.float32 else 1e-2
    assert rel(outs[0][0], outs[1][0]) <= tol and rel(outs[0][1], outs[1][1]) <= 1e-6, f"seed {seed}"

    y = torch.randn(B, d, 2 * L, generator=g).to(dev)
    x = torch.randn(B, d, L + 5, generator=g).to(dev)[..., :L]
    D = torch.randn(d, generator=g).to(dev)
    gate0 = torch.randn(B, d, L, generator=g).to(dev, cd)
    a, b = gate0.clone(), gate0.clone()
    hf.fft_epilogue(y, x, a, D)
    hf.fft_epilogue_ref(y, x, b, D)
    assert rel(a.float(), b.float()) <= (1e-6 if cd is torch.float32 else 1e-2), f"seed {seed}"

    r = torch.randn(B, L + 4, d, generator=g).to(dev)[:, 2 : L + 2] * 3 + 1
    wn, bn = torch.randn(d, generator=g).to(dev), torch.randn(d, generator=g).to(dev)
    got = hf.layer_norm_to(r, wn, bn, 1e-5, cd)
    want = hf.layer_norm_to_ref(r, wn, bn, 1e-5, cd)
    assert got.dtype == cd and rel(got.float(), want.float()) <= (1e-5 if cd is torch.float32 else 1e-2), f"seed {seed}"
    inplace = r.clone()
    hf.layer_norm_to(inplace, wn, bn, 1e-5, torch.float32, out=inplace)
    assert rel(inplace, hf.layer_norm_to_ref(r, wn, bn, 1e-5, torch.float32)) <= 1e-5, f"seed {seed}"

    feats = torch.randn(L, 64, generator=g).to(dev)
    wf = torch.randn(d, 64, generator=g).to(dev)
    t = torch.linspace(0, 1, L).to(dev)
    deltas = torch.randn(d, generator=g).to(dev) * 10
    a = torch.full((d, 2 * L), float("nan"), device=dev)
    a[:, L:] = 0
    b = a.clone()
    hf.hyena_filter_into(a, feats, wf, t, deltas, 0.05, 0.25)
    hf.hyena_filter_into_ref(b, feats, wf, t, deltas, 0.05, 0.25)
    assert not a.isnan().any() and (a[:, L:] == 0).all()
    assert rel(a, b) <= 1e-5, f"seed {seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("n,C,rows", [(65536, 256, 512), (3 * 2**11, 7, 21), (2**21, 3, 3), (30, 4, 8)])
def test_packed_spectral_product_kernel_matches_its_twin_cuda(n, C, rows):
    g, seed = fresh_generator()
    M = n // 2
    Z = torch.randn(rows // C, C, M, 2, generator=g)
    Z = torch.view_as_complex(Z).to("cuda")
    c128 = torch.complex128
    for size in (M + 1, M):  # the filter's spectrum in rfft form, and in packed form
        Kfull = torch.view_as_complex(torch.randn(C + 2, size, 2, generator=g)).to("cuda")
        K = Kfull[1 : C + 1]  # a slice, as the spectrum cache hands out
        want = hf.packed_spectral_product_ref(Z.to(c128), K.to(c128), n)
        for block, warps in ((1024, 4), (256, 2)):  # the default launch, and one with many programs per row
            got = hf.packed_spectral_product_(Z.clone(), K, n, block=block, warps=warps)
            assert rel(torch.view_as_real(got), torch.view_as_real(want)) <= 1e-6, f"seed {seed} size {size}"


def test_add_layer_norm_twin_is_the_residual_add_then_layer_norm():
    g, seed = fresh_generator()
    r = torch.randn(3, 7, 24, generator=g, dtype=torch.float64)
    y, b_in, b_out = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 7, 24), (24,), (24,)))
    w, b = torch.randn(24, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    s = r + (y + b_in)
    want_h = torch.nn.functional.layer_norm(s, (24,), w, b, 1e-5)
    got_r = r.clone()
    h = hf.add_layer_norm_(got_r, y, b_in, b_out, w, b, 1e-5, torch.float64)
    assert rel(h, want_h) <= 1e-12 and rel(got_r, s + b_out) <= 1e-12, f"seed {seed}"


def test_accumulate_matmul_adds_the_product_in_place():
    """On CPU (and where torch lacks the mixed-precision addmm): same dtype -> addmm_, else one add."""
    g, seed = fresh_generator()
    out = torch.randn(30, 8, generator=g)
    a, b = torch.randn(30, 16, generator=g), torch.randn(8, 16, generator=g).t()
    for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        o = out.clone()
        got = hf.accumulate_matmul_(o, a.to(dt), b.to(dt))
        assert got.data_ptr() == o.data_ptr() and got.dtype == torch.float32
        assert rel(o, out + a.to(dt).float() @ b.to(dt).float()) <= tol, f"seed {seed}"


def test_row_blocks_cover_every_token_once_in_contiguous_slices():
    from seqssm.models.hyena_lean import _row_blocks

    for B, L, chunk in [(1, 10, 3), (5, 2, 4), (3, 257, 100), (32, 32768, 1 << 17), (2, 7, 7), (4, 5, 1)]:
        seen = torch.zeros(B, L, dtype=torch.long)
        for b0, b1, s0, s1 in _row_blocks(B, L, chunk):
            assert (b1 - b0 == 1) or (s0, s1) == (0, L)  # whole rows, or a piece of one row
            assert (b1 - b0) * (s1 - s0) <= max(chunk, L) or b1 - b0 == 1
            seen[b0:b1, s0:s1] += 1
        assert (seen == 1).all(), (B, L, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("cd", [torch.float32, torch.bfloat16])
def test_add_layer_norm_and_accumulate_matmul_match_their_twins_cuda(cd):
    g, seed = fresh_generator()
    dev = "cuda"
    r0 = torch.randn(2, 1000, 256, generator=g).to(dev) * 3
    y = torch.randn(2, 1000, 256, generator=g).to(dev, cd)
    b_in, b_out, w, b = (torch.randn(256, generator=g).to(dev) for _ in range(4))
    r1, r2 = r0.clone(), r0.clone()
    h1 = hf.add_layer_norm_(r1, y, b_in, b_out, w, b, 1e-5, cd)
    h2 = hf.add_layer_norm_ref(r2, y, b_in, b_out, w, b, 1e-5, cd)
    tol = 1e-5 if cd is torch.float32 else 1e-2
    assert h1.dtype == cd and rel(h1.float(), h2.float()) <= tol and rel(r1, r2) <= 1e-6, f"seed {seed}"

    out = torch.randn(3000, 256, generator=g).to(dev)
    a = torch.randn(3000, 1024, generator=g).to(dev, cd)
    bt = torch.randn(256, 1024, generator=g).to(dev, cd).t()
    want = out.double() + a.double() @ bt.double()
    got = hf.accumulate_matmul_(out, a, bt)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    # in-matmul accumulation keeps float32 sums; the fallback (a bf16 product, then an add) is coarser
    tol = 1e-5 if cd is torch.float32 else (1e-4 if hf._ADDMM_OUT_DTYPE[0] else 1e-2)
    assert rel(out, want) <= tol, f"seed {seed}"
