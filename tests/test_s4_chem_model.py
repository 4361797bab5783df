"""The S4 chemical language model: step() == forward(), causality, files, likelihoods, size."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from seqssm.errors import InputError, SeqssmError
from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM, ScalarLayerNorm, sequence_log_likelihood


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models, many tiny ops: OpenMP threads only add synchronisation. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(**kw) -> S4ChemConfig:
    return S4ChemConfig(**{"vocab_size": 23, "d_model": 24, "n_blocks": 2, "d_state": 16, "max_len": 40, **kw})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def tokens(cfg: S4ChemConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, cfg.vocab_size, (batch, length), generator=g)
    t[:, 0] = cfg.bos_id
    return t


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.abs().clamp_min(0.1))


@pytest.mark.parametrize("kernel", ["nplr", "diag"])
@pytest.mark.parametrize("trained", [False, True])
def test_step_equals_forward(kernel, trained):
    torch.manual_seed(0)
    model = S4ChemLM(small(kernel=kernel)).eval()  # dropout 0.25 in the config, off in eval
    if trained:
        perturb_(model)
    x = tokens(model.cfg, 3, 40)
    with torch.no_grad():
        logits = model(x)
        model.setup_step()
        state = model.default_state(3)
        assert len(state) == 2 * model.cfg.n_blocks
        steps = []
        for t in range(x.shape[1]):
            lg, state = model.step(x[:, t], state)
            steps.append(lg)
    assert logits.shape == (3, 40, 23)
    assert rel(torch.stack(steps, 1), logits) <= 1e-5


def test_recurrent_parameters_and_setup_step_cache():
    torch.manual_seed(0)
    for kernel, kind in (("nplr", "dplr"), ("diag", "diag")):
        model = S4ChemLM(small(kernel=kernel)).eval()
        model.setup_step()
        recs = [layer.recurrence() for layer in model.s4_layers()]
        model.setup_step()  # cheap again: nothing changed, nothing recomputed
        assert all(layer.recurrence() is r for layer, r in zip(model.s4_layers(), recs))
        params = model.recurrent_parameters()
        assert len(params) == 4 and all(p["kind"] == kind for p in params)
        for p in params:
            assert p["D"].shape == (24,)
            for k, v in p.items():
                if k not in ("kind", "D"):
                    assert v.shape == (24, 8) and v.dtype == torch.complex64, k
        if kind == "diag":
            assert set(params[0]) == {"kind", "dA", "dB", "dC", "D"}
            assert params[0]["dA"].abs().max() < 1


def test_step_after_training_updates():
    torch.manual_seed(0)
    model = S4ChemLM(small(dropout=0.1))
    x = tokens(model.cfg, 4, 30)
    model.eval()
    model.setup_step()
    model.train()
    for _ in range(2):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 23), x[:, 1:].reshape(-1))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():  # an optimizer step: in place, so the parameters' versions move
            for p in model.parameters():
                p.sub_(1e-2 * p.grad.sign())
    model.eval()
    with torch.no_grad():
        state = model.default_state(4)
        steps = []
        for t in range(30):
            lg, state = model.step(x[:, t], state)
            steps.append(lg)
        assert rel(torch.stack(steps, 1), model(x)) <= 1e-5


def test_causal():
    torch.manual_seed(0)
    model = S4ChemLM(small()).eval()
    x = tokens(model.cfg, 2, 40)
    x2 = x.clone()
    x2[:, 20:] = tokens(model.cfg, 2, 20, seed=5)
    with torch.no_grad():
        a, b = model(x), model(x2)
    scale = a.abs().max()
    assert (a[:, :20] - b[:, :20]).abs().max() <= 1e-5 * scale  # float32 FFT rounding only
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-2 * scale
    with torch.no_grad():  # prefixes give the same logits as the full sequence
        assert rel(model(x[:, :13]), a[:, :13]) <= 1e-5
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(model.cfg, 1, 41))


def test_sequence_log_likelihood_is_the_sum_of_next_token_log_probabilities():
    torch.manual_seed(0)
    cfg = small()
    model = S4ChemLM(cfg).eval()
    x = tokens(cfg, 3, 12)
    lengths = torch.tensor([12, 7, 2])
    for b, n in enumerate(lengths.tolist()):
        x[b, n - 1] = cfg.eos_id
        x[b, n:] = cfg.pad_id
    with torch.no_grad():
        ll = sequence_log_likelihood(model, x, lengths)
        logits = model(x)
    expected = []
    for b, n in enumerate(lengths.tolist()):
        logp = torch.log_softmax(logits[b].double(), -1)
        expected.append(sum(float(logp[t - 1, x[b, t]]) for t in range(1, n)))  # includes eos
    assert ll.shape == (3,)
    assert torch.allclose(ll.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4)
    x_longer = torch.cat([x, torch.full((3, 5), cfg.pad_id)], dim=1)  # extra padding changes nothing
    with torch.no_grad():
        assert torch.allclose(sequence_log_likelihood(model, x_longer, lengths), ll, atol=1e-4)
    with pytest.raises(ValueError):
        sequence_log_likelihood(model, x, torch.tensor([13, 2, 2]))


class _VocabSaver:
    """Stands in for the SMILES tokenizer: save(directory) writes vocab.json."""

    def save(self, directory):
        (directory / "vocab.json").write_text(json.dumps(["<pad>", "<bos>", "<eos>"]))


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = S4ChemLM(small(kernel="diag", dropout=0.1)).eval()
    perturb_(model)
    target = tmp_path / "run" / "model"
    model.save_pretrained(target, tokenizer=_VocabSaver(), info={"step": 7})
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "info.json", "model.safetensors", "vocab.json"]
    assert json.loads((target / "config.json").read_text()) == asdict(model.cfg)
    assert json.loads((target / "info.json").read_text()) == {"step": 7}
    loaded = S4ChemLM.from_pretrained(target)
    assert not loaded.training and loaded.cfg == model.cfg
    x = tokens(model.cfg, 2, 40)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # saving again replaces the directory whole and leaves no temporary directories behind
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SeqssmError, match="not a directory"):
        model.save_pretrained(tmp_path / "afile")


def test_from_pretrained_errors_name_the_directory(tmp_path):
    model = S4ChemLM(small())
    good = tmp_path / "good"
    model.save_pretrained(good)

    def broken(name: str, edit) -> str:
        d = tmp_path / name
        model.save_pretrained(d)
        edit(d)
        with pytest.raises(InputError) as e:
            S4ChemLM.from_pretrained(d)
        assert isinstance(e.value, SeqssmError) and str(d) in str(e.value)
        return str(e.value)

    cfg = json.loads((good / "config.json").read_text())
    assert "model_type is 'hyenadna'" in broken(
        "hyena", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "model_type": "hyenadna"})))
    assert "no config.json" in broken("noconfig", lambda d: (d / "config.json").unlink())
    assert "no model.safetensors" in broken("noweights", lambda d: (d / "model.safetensors").unlink())
    assert "unreadable" in broken("badjson", lambda d: (d / "config.json").write_text("{not json"))
    assert "unknown configuration fields ['heads']" in broken(
        "unknown", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "heads": 4})))
    assert "invalid model configuration" in broken(
        "invalid", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "kernel": "s5"})))
    assert "wrong shape" in broken(
        "mismatch", lambda d: (d / "config.json").write_text(json.dumps({**cfg, "d_state": 32})))
    assert "unreadable weights" in broken("truncated", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 9))
    with pytest.raises(InputError, match="not found"):
        S4ChemLM.from_pretrained(tmp_path / "absent")


def reference_parameter_count(V: int, H: int = 256, N: int = 64, blocks: int = 4, n_ssm: int = 1) -> int:
    """Parameters of the authors' StructuredStateSpaceSequenceModel, counted from its architecture
    (nothing instantiated): embedding; per block 2 x S4 (kernel C [1, H, N/2] complex, log_dt [H],
    B and P [n_ssm, N/2] complex, inv_w_real and w_imag [n_ssm, N/2], D [1, H], output
    TransposedLinear(H, 2H) + bias), FF (Linear(H, 4H), Linear(4H, H)), 3 scalar TransposedLN
    (m, s); final scalar norm; output Linear(H, V)."""
    s4 = 2 * H * N // 2 + H + 2 * (2 * n_ssm * N // 2) + 2 * n_ssm * N // 2 + H + (H * 2 * H + 2 * H)
    ff = (H * 4 * H + 4 * H) + (4 * H * H + H)
    return V * H + blocks * (2 * s4 + ff + 3 * 2) + 2 + (H * V + V)


def test_default_config_is_the_published_model():
    cfg = S4ChemConfig(vocab_size=37)
    assert (cfg.d_model, cfg.n_blocks, cfg.d_state, cfg.dropout, cfg.max_len, cfg.kernel, cfg.n_ssm) == (
        256, 4, 64, 0.25, 100, "nplr", 1)
    model = S4ChemLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"S4ChemLM default config, vocab 37: {n:,} parameters")
    assert n == reference_parameter_count(37) == 3_291_674 + 513 * 37 == 3_310_655
    layer = model.blocks[0].s4_1
    assert layer.mode == "nplr" and layer.l_max == 100 and layer.d_state == 64
    assert layer.dropout.p == model.blocks[0].drop.p == model.blocks[0].ff.dropout.p == 0.25
    assert layer.C.shape == (256, 32, 2) and layer.B.shape == (1, 32, 2)
    n_per_channel = sum(p.numel() for p in S4ChemLM(replace(cfg, n_ssm=256)).parameters())
    assert n_per_channel == reference_parameter_count(37, n_ssm=256)


def test_scalar_layer_norm_is_the_reference_transposed_ln():
    norm = ScalarLayerNorm()
    with torch.no_grad():
        norm.m.fill_(0.5)
        norm.s.fill_(2.0)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    std, mean = torch.std_mean(x, dim=-1, unbiased=False, keepdim=True)
    expected = (2.0 / std) * (x - mean + 0.5)  # module_library TransposedLN(scalar=True), channels last
    assert torch.allclose(norm(x), expected, rtol=1e-4)


def test_config_validation():
    for bad in (dict(kernel="s5"), dict(d_state=63), dict(dropout=1.0), dict(max_len=1), dict(n_ssm=5),
                dict(bos_id=0), dict(eos_id=23), dict(model_type="hyenadna")):
        with pytest.raises(ValueError):
            small(**bad)
    cfg = small()
    cfg.kernel = "s5"  # set after construction: caught when the model is built
    with pytest.raises(ValueError):
        S4ChemLM(cfg)


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    model = S4ChemLM(small()).eval()
    x = tokens(model.cfg, 2, 40)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all() and rel(out.float(), ref) < 5e-2


@pytest.mark.parametrize("kernel", ["nplr", "diag"])
def test_history_step_equals_forward_and_recurrence(kernel):
    """The convolution-history step (CPU sampling) gives forward()'s logits, like the recurrence."""
    torch.manual_seed(3)
    m = S4ChemLM(S4ChemConfig(vocab_size=20, d_model=32, n_blocks=2, d_state=16, dropout=0.0, max_len=24,
                              kernel=kernel)).eval()
    tokens = torch.randint(3, 20, (3, 24))
    with torch.no_grad():
        full = m(tokens)
        hist = m.default_state(3, mode="history")
        rec = m.default_state(3)
        for t in range(24):
            a, hist = m.step(tokens[:, t], hist)
            b, rec = m.step(tokens[:, t], rec)
            scale = full[:, t].abs().max()
            assert float((a - full[:, t]).abs().max() / scale) <= 1e-5
            assert float((a - b).abs().max() / scale) <= 1e-5
        with pytest.raises(ValueError, match="l_max"):
            m.step(tokens[:, 0], hist)
