"""HyenaDNA in PyTorch: the FFT convolution against its direct reference, causality, lengths and
batches, mixed precision, and that the language model actually learns DNA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqssm.errors import SeqssmError
from seqssm.models import HyenaConfig, HyenaDNAForCausalLM, HyenaDNAModel, count_parameters
from seqssm.ops import fftconv, fftconv_ref
from seqssm.tokenizers.dna import encode


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(torch.seed())))
    return torch.Generator().manual_seed(seed), seed


def tiny_config(**kw) -> HyenaConfig:
    base = dict(d_model=16, n_layer=2, d_inner=32, max_seq_len=130, emb_dim=5, filter_order=16, activation_freq=10)
    return HyenaConfig(**{**base, **kw})


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter away from its initial value so that each one influences the output
    (at init the filter MLP's output is nearly zero and LayerNorms are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------------
# FFT convolution


@pytest.mark.parametrize("shape", [(2, 3, 1), (1, 4, 7), (3, 5, 64), (2, 8, 1000), (2, 3, 4, 33)])
def test_fftconv_matches_direct_convolution(shape):
    g, seed = fresh_generator()
    *_, H, L = shape
    u = torch.randn(shape, generator=g)
    k = torch.randn(H, L, generator=g) * torch.exp(-torch.arange(L) / max(L / 4, 1))  # decaying, like Hyena's
    D = torch.randn(H, generator=g)
    ref = fftconv_ref(u.double(), k.double(), D.double())
    out = fftconv(u, k, D)
    assert out.dtype == torch.float32 and out.shape == u.shape
    assert rel(out, ref) <= 1e-5, f"seed {seed}"
    # In float64 the FFT path is exact to rounding.
    assert rel(fftconv(u.double(), k.double(), D.double()), ref) <= 1e-12, f"seed {seed}"


def test_fftconv_reference_is_the_causal_sum():
    """The reference itself, against the definition written as a Python loop (tiny sizes)."""
    g, seed = fresh_generator()
    u, k, D = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 3, 9), (3, 9), (3,)))
    y = torch.zeros_like(u)
    for t in range(9):
        for s in range(t + 1):
            y[..., t] += k[:, s] * u[..., t - s]
    y += D[:, None] * u
    assert torch.allclose(fftconv_ref(u, k, D), y, rtol=1e-12, atol=1e-12), f"seed {seed}"


def test_fftconv_uses_only_first_L_filter_taps():
    g, _ = fresh_generator()
    u, k, D = torch.randn(2, 4, 50, generator=g), torch.randn(4, 80, generator=g), torch.randn(4, generator=g)
    assert torch.equal(fftconv(u, k, D), fftconv(u, k[:, :50], D))


def test_fftconv_under_autocast_bf16_runs_in_float32():
    g, seed = fresh_generator()
    u = torch.randn(2, 8, 1000, generator=g).bfloat16()  # what a bf16 linear layer hands over
    k = torch.randn(8, 1000, generator=g) * torch.exp(-torch.arange(1000) / 200)
    D = torch.randn(8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fftconv(u, k, D)
    assert out.dtype == torch.bfloat16
    ref = fftconv_ref(u.double(), k.double(), D.double())
    err = rel(out, ref)
    # Only the final rounding to bf16 (8 mantissa bits, ~2e-3 relative) may remain.
    assert err <= 1e-2, f"seed {seed}: {err}"
    assert err <= 4 * rel(ref.bfloat16(), ref), f"seed {seed}: more error than rounding the exact result to bf16"


def test_fftconv_gradients():
    g, _ = fresh_generator()
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 11), (3, 11), (3,))]
    assert torch.autograd.gradcheck(fftconv, args)


# ------------------------------------------------------------------------------------------------
# the model


def test_module_names_match_hf_checkpoints():
    model = HyenaDNAForCausalLM(tiny_config())
    keys = set(model.state_dict())
    for k in (
        "backbone.embeddings.word_embeddings.weight",
        "backbone.layers.0.mixer.in_proj.weight",
        "backbone.layers.0.mixer.short_filter.weight",
        "backbone.layers.0.mixer.filter_fn.bias",
        "backbone.layers.0.mixer.filter_fn.pos_emb.z",
        "backbone.layers.0.mixer.filter_fn.pos_emb.t",
        "backbone.layers.0.mixer.filter_fn.implicit_filter.0.weight",
        "backbone.layers.0.mixer.filter_fn.implicit_filter.1.freq",
        "backbone.layers.0.mixer.filter_fn.implicit_filter.3.freq",
        "backbone.layers.0.mixer.filter_fn.implicit_filter.5.freq",
        "backbone.layers.0.mixer.filter_fn.implicit_filter.6.weight",
        "backbone.layers.0.mixer.filter_fn.modulation.deltas",
        "backbone.layers.1.norm1.weight",
        "backbone.layers.1.mlp.fc1.weight",
        "backbone.layers.1.mlp.fc2.bias",
        "backbone.layers.1.norm2.bias",
        "backbone.ln_f.weight",
        "lm_head.weight",
    ):
        assert k in keys, k
    f = model.backbone.layers[0].mixer.filter_fn.implicit_filter
    assert f[1].freq is f[3].freq is f[5].freq  # one shared sine frequency per filter
    assert model.lm_head.weight is model.backbone.embeddings.word_embeddings.weight
    assert model.backbone.embeddings.word_embeddings.weight.shape == (16, 16)  # 12 padded to 16
    assert sum(n.endswith(".freq") for n, _ in model.named_parameters()) == 2  # once per layer


def test_parameter_count_formula():
    cfg = tiny_config()
    d, f, e, V = cfg.d_model, cfg.filter_order, cfg.emb_dim, cfg.padded_vocab_size
    per_layer = (
        (d * 3 * d + 3 * d) + (d * d + d) + (3 * d * 3 + 3 * d)  # in_proj, out_proj, short conv
        + d + (e * f + f) + f + 2 * (f * f + f) + f * d  # D, filter MLP (one freq), last linear
        + 2 * (2 * d) + (d * cfg.d_inner + cfg.d_inner) + (cfg.d_inner * d + d)  # norms, MLP
    )
    expected = V * d + cfg.n_layer * per_layer + 2 * d
    assert count_parameters(HyenaDNAForCausalLM(cfg)) == expected  # tied head adds nothing
    assert count_parameters(HyenaDNAForCausalLM(tiny_config(tie_word_embeddings=False))) == expected + V * d


def test_config_dict_round_trip_and_hf_keys():
    cfg = HyenaConfig.from_dict({"d_model": 64, "n_layer": 3, "d_inner": None, "model_type": "hyenadna",
                                 "auto_map": {}, "transformers_version": "5.14.1", "activation_freq": 10})
    assert cfg.d_inner == 256 and cfg.n_layer == 3 and cfg.activation_freq == 10
    assert HyenaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        HyenaConfig(hyena_order=3)
    with pytest.raises(ValueError):
        HyenaConfig(emb_dim=4)


def windows(genome: str, starts, length: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([encode(genome[s : s + length]) for s in starts]).astype(np.int64))


def test_causal_change_at_t_leaves_earlier_positions_unchanged(lambda_genome):
    model = perturbed(HyenaDNAModel(tiny_config())).eval()
    ids = windows(lambda_genome, [1000, 20000], 128)
    for t in (0, 1, 2, 37, 127):
        other = ids.clone()
        other[:, t] = torch.where(other[:, t] == 7, 8, 7)  # A <-> C
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            m = model.to(dtype)
            with torch.no_grad():
                h, h2 = m(ids), m(other)
            scale = h.norm() / h.numel() ** 0.5
            if t > 0:
                leak = (h2[:, :t] - h[:, :t]).abs().max() / scale
                assert leak <= tol, (t, dtype, leak.item())
            assert (h2[:, t] - h[:, t]).abs().max() / scale > 1e-3  # the change is seen at t
        model.float()


def test_prefix_of_input_gives_prefix_of_output(lambda_genome):
    model = perturbed(HyenaDNAModel(tiny_config())).eval().double()
    ids = windows(lambda_genome, [5000], 130)
    with torch.no_grad():
        full = model(ids)
        for L in (1, 2, 3, 64, 129):
            assert rel(model(ids[:, :L]), full[:, :L]) <= 1e-12


def test_batches_and_lengths(lambda_genome):
    cfg = tiny_config()
    lm = perturbed(HyenaDNAForCausalLM(cfg)).eval()
    for L in (1, 2, 5, 64, 99, cfg.max_seq_len):
        ids = windows(lambda_genome, [0, 777, 4242, 30000], L)
        with torch.no_grad():
            logits = lm(ids)
            one_by_one = torch.cat([lm(ids[i : i + 1]) for i in range(4)])
        assert logits.shape == (4, L, cfg.padded_vocab_size) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        assert rel(logits, one_by_one) <= 1e-6
    with pytest.raises(SeqssmError, match="maximum length 130"):
        lm(windows(lambda_genome, [0], cfg.max_seq_len + 1))


def test_autocast_bf16_close_to_float32(lambda_genome):
    model = perturbed(HyenaDNAModel(tiny_config(d_model=32, d_inner=64)), scale=0.1).eval()
    ids = windows(lambda_genome, [100, 9000, 40000], 130)
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids)
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= 2e-2  # measured ~7e-3


def test_causal_lm_learns_lambda_dna(lambda_genome):
    torch.manual_seed(0)
    cfg = HyenaConfig(d_model=32, n_layer=2, d_inner=64, max_seq_len=256, emb_dim=5, filter_order=32, activation_freq=10)
    lm = HyenaDNAForCausalLM(cfg).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, len(lambda_genome) - 257, (16,), generator=g).tolist()
        ids = windows(lambda_genome, starts, 257)
        logits = lm(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    # From ~ln(16) = 2.77 (uniform over the padded vocabulary) to near the base-composition entropy (1.39).
    assert last < first - 0.8, losses
    assert last < 1.6, losses


# ------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_cuda_autocast_bf16(lambda_genome):
    dev = torch.device("cuda")
    g, seed = fresh_generator()
    # Non-power-of-two FFT size (2L = 2000): cuFFT would refuse it in half precision.
    u = torch.randn(2, 8, 1000, generator=g).to(dev)
    k = (torch.randn(8, 1000, generator=g) * torch.exp(-torch.arange(1000) / 200)).to(dev)
    D = torch.randn(8, generator=g).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fftconv(u.bfloat16(), k, D)
    assert out.dtype == torch.bfloat16
    assert rel(out.cpu(), fftconv_ref(u.bfloat16().double().cpu(), k.double().cpu(), D.double().cpu())) <= 1e-2, seed
    assert rel(fftconv(u, k, D).cpu(), fftconv_ref(u.double().cpu(), k.double().cpu(), D.double().cpu())) <= 1e-5, seed

    cfg = HyenaConfig(d_model=64, n_layer=2, d_inner=128, max_seq_len=1026, emb_dim=5, filter_order=32, activation_freq=10)
    model = perturbed(HyenaDNAModel(cfg), scale=0.1).eval()
    ids = windows(lambda_genome, [0, 10000, 20000, 30000], 1000)
    with torch.no_grad():
        ref = model(ids)
        model.to(dev)
        fp32 = model(ids.to(dev)).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(ids.to(dev)).float().cpu()
    assert rel(fp32, ref) <= 1e-4  # TF32 may be on for matmuls
    assert torch.isfinite(bf16).all() and rel(bf16, ref) <= 5e-2
