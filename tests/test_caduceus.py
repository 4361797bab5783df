"""Caduceus: state-dict layout of the reference, RC equivariance, strand-invariant embeddings,
and HF-format checkpoints."""

import copy
import json

import pytest
import torch
import torch.nn as nn

from seqssm.errors import SeqssmError
from seqssm.layers.norm import RMSNorm
from seqssm.layers.rcps import flip_lc
from seqssm.models.caduceus import (
    BiMambaWrapper,
    CaduceusConfig,
    CaduceusForMaskedLM,
    pretraining_inputs,
    rc_token_ids,
    unique_state_dict,
)
from seqssm.tokenizers.dna import COMPLEMENT_LUT, DNATokenizer

# Tiny tensors: one thread avoids OpenMP synchronisation costs (large on a busy machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# config.json of kuleshov-group/caduceus-ps_seqlen-131k_d_model-256_n_layer-16 on the HuggingFace hub.
PUBLISHED_PS_CONFIG = {
    "architectures": ["CaduceusForMaskedLM"],
    "auto_map": {
        "AutoConfig": "configuration_caduceus.CaduceusConfig",
        "AutoModel": "modeling_caduceus.Caduceus",
        "AutoModelForMaskedLM": "modeling_caduceus.CaduceusForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_caduceus.CaduceusForSequenceClassification",
    },
    "bidirectional": True,
    "bidirectional_strategy": "add",
    "bidirectional_weight_tie": True,
    "complement_map": {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "6": 6, "7": 10, "8": 9, "9": 8, "10": 7,
                       "11": 11, "12": 12, "13": 13, "14": 14, "15": 15},
    "d_model": 256,
    "fused_add_norm": True,
    "initializer_cfg": {"initializer_range": 0.02, "n_residuals_per_layer": 1, "rescale_prenorm_residual": True},
    "model_type": "caduceus",
    "n_layer": 16,
    "norm_epsilon": 1e-05,
    "pad_vocab_size_multiple": 8,
    "rcps": True,
    "residual_in_fp32": False,
    "rms_norm": True,
    "ssm_cfg": {"bias": False, "conv_bias": True, "d_conv": 4, "d_state": 16, "dt_init": "random",
                "dt_init_floor": 0.0001, "dt_max": 0.1, "dt_min": 0.001, "dt_rank": "auto", "dt_scale": 1.0,
                "expand": 2, "use_fast_path": True},
    "torch_dtype": "float32",
    "transformers_version": "4.38.1",
    "vocab_size": 16,
}


def small_config(**over) -> dict:
    """The published config scaled down (2 layers, d_model 32), with overrides."""
    cfg = copy.deepcopy(PUBLISHED_PS_CONFIG)
    cfg.update(d_model=32, n_layer=2, ssm_cfg={**cfg["ssm_cfg"], "d_state": 8})
    cfg.update(over)
    return cfg


def build(cfg: dict, seed: int = 0) -> CaduceusForMaskedLM:
    """A model with every parameter perturbed (no test may pass thanks to an initial value)."""
    torch.manual_seed(seed)
    model = CaduceusForMaskedLM(CaduceusConfig.from_dict(copy.deepcopy(cfg)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def reference_state_dict_keys(cfg: dict) -> list[str]:
    """state_dict() keys of the reference CaduceusForMaskedLM for a config.json dict, in order.

    Derived from kuleshov-group/caduceus (modeling_caduceus.py: CaduceusForMaskedLM has `caduceus`
    then `lm_head`; Caduceus has `backbone`; CaduceusMixerModel has `embeddings`, `layers`, `norm_f`,
    where norm_f is wrapped in RCPSAddNormWrapper (`submodule`) only for rcps without fused_add_norm;
    BiMambaWrapper has `mamba_fwd`, `mamba_rev`; modeling_rcps.py: RCPSEmbedding registers the
    `complement_map` buffer then `embedding`, RCPSMambaBlock `mixer` (RCPSWrapper: `submodule`) then
    `norm` (RCPSAddNormWrapper unless fused), RCPSLMHead `complement_map` then `lm_head`) and from
    mamba-ssm (Mamba: A_log, D are its own parameters, then in_proj, conv1d, x_proj, dt_proj,
    out_proj; Block (mambav2, used when rcps is false) registers `norm` before `mixer`; RMSNorm has
    no bias). nn.Module.state_dict lists own parameters, own buffers, then children in order;
    Parameters shared by weight tying appear under every name.
    """
    ssm = cfg.get("ssm_cfg") or {}
    bias, conv_bias = ssm.get("bias", False), ssm.get("conv_bias", True)

    def mamba(p):
        keys = [p + "A_log", p + "D", p + "in_proj.weight"] + ([p + "in_proj.bias"] if bias else [])
        keys += [p + "conv1d.weight"] + ([p + "conv1d.bias"] if conv_bias else [])
        keys += [p + "x_proj.weight", p + "dt_proj.weight", p + "dt_proj.bias", p + "out_proj.weight"]
        return keys + ([p + "out_proj.bias"] if bias else [])

    def norm(p):
        return [p + "weight"] + ([] if cfg["rms_norm"] else [p + "bias"])

    rcps, fused = cfg["rcps"], cfg["fused_add_norm"]
    b = "caduceus.backbone."
    if rcps:
        keys = [b + "embeddings.word_embeddings.complement_map", b + "embeddings.word_embeddings.embedding.weight"]
    else:
        keys = [b + "embeddings.word_embeddings.weight"]
    for i in range(cfg["n_layer"]):
        layer = f"{b}layers.{i}."
        mixer = layer + ("mixer.submodule." if rcps else "mixer.")
        mixer_keys = mamba(mixer + "mamba_fwd.") + (mamba(mixer + "mamba_rev.") if cfg["bidirectional"] else [])
        norm_keys = norm(layer + ("norm.submodule." if rcps and not fused else "norm."))
        keys += mixer_keys + norm_keys if rcps else norm_keys + mixer_keys
    keys += norm(b + ("norm_f.submodule." if rcps and not fused else "norm_f."))
    keys += ["lm_head.complement_map", "lm_head.lm_head.weight"] if rcps else ["lm_head.weight"]
    return keys


def hf_saved_keys(cfg: dict) -> list[str]:
    """The keys HF transformers writes to model.safetensors: each shared tensor under its first name."""
    drop = set()
    if cfg["bidirectional"] and cfg["bidirectional_weight_tie"]:
        drop |= {k for k in reference_state_dict_keys(cfg)
                 if ".mamba_rev." in k and ("in_proj." in k or "out_proj." in k)}
    if cfg.get("tie_word_embeddings", True):
        drop |= {"lm_head.lm_head.weight", "lm_head.weight"}
    return [k for k in reference_state_dict_keys(cfg) if k not in drop]


def rc(ids, model):
    return rc_token_ids(ids, torch.tensor(model.config.complement_ids()))


def dna(batch, L, seed=0):
    return torch.randint(7, 12, (batch, L), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# state-dict layout


LAYOUTS = [
    dict(),
    dict(fused_add_norm=False),
    dict(rms_norm=False),
    dict(rms_norm=False, fused_add_norm=False),
    dict(rcps=False),
    dict(rcps=False, fused_add_norm=False, rms_norm=False),
    dict(bidirectional=False),
    dict(bidirectional_weight_tie=False),
    dict(ssm_cfg={"d_state": 4, "bias": True, "conv_bias": False}),
]


@pytest.mark.parametrize("over", LAYOUTS)
def test_state_dict_keys_are_the_reference_s(over):
    cfg = small_config(**over)
    model = CaduceusForMaskedLM(CaduceusConfig.from_dict(copy.deepcopy(cfg)))
    assert list(model.state_dict()) == reference_state_dict_keys(cfg)
    assert list(unique_state_dict(model)) == hf_saved_keys(cfg)


def test_published_config_layout():
    cfg = copy.deepcopy(PUBLISHED_PS_CONFIG)
    config = CaduceusConfig.from_dict(cfg)
    model = CaduceusForMaskedLM(config)
    sd = model.state_dict()
    assert list(sd) == reference_state_dict_keys(cfg)
    emb = sd["caduceus.backbone.embeddings.word_embeddings.embedding.weight"]
    assert emb.shape == (16, 256)  # vocabulary padded to 16; each strand half is d_model wide
    assert sd["caduceus.backbone.layers.0.mixer.submodule.mamba_fwd.in_proj.weight"].shape == (1024, 256)
    assert sd["caduceus.backbone.layers.0.mixer.submodule.mamba_fwd.x_proj.weight"].shape == (16 + 32, 512)
    assert sd["caduceus.backbone.layers.15.norm.weight"].shape == (256,)
    assert sd["lm_head.complement_map"].tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 9, 8, 7, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("tie", [True, False])
def test_bimamba_weight_tying(tie):
    m = BiMambaWrapper(16, bidirectional_weight_tie=tie, d_state=4, bias=True)
    for name in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"):
        a, b = m.mamba_fwd.get_parameter(name), m.mamba_rev.get_parameter(name)
        assert (a is b) == tie
    for name in ("A_log", "D", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"):
        assert m.mamba_fwd.get_parameter(name) is not m.mamba_rev.get_parameter(name)
    keys = list(m.state_dict())
    assert "mamba_rev.in_proj.weight" in keys and "mamba_rev.out_proj.weight" in keys  # listed under both names
    n_fwd = sum(p.numel() for p in m.mamba_fwd.parameters())
    shared = sum(m.mamba_fwd.get_parameter(n).numel() for n in ("in_proj.weight", "in_proj.bias", "out_proj.weight",
                                                                 "out_proj.bias"))
    assert sum(p.numel() for p in m.parameters()) == 2 * n_fwd - (shared if tie else 0)


@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
def test_bimamba_combines_both_directions(strategy):
    torch.manual_seed(0)
    m = BiMambaWrapper(16, bidirectional_strategy=strategy, d_state=4).eval()
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        fwd, rev = m.mamba_fwd(x), m.mamba_rev(x.flip(1)).flip(1)
        want = fwd + rev if strategy == "add" else fwd * rev
        assert torch.allclose(m(x), want, atol=1e-6)
        uni = BiMambaWrapper(16, bidirectional=False, d_state=4).eval()
        assert uni.mamba_rev is None and torch.allclose(uni(x), uni.mamba_fwd(x))
    with pytest.raises(ValueError, match="bidirectional_strategy"):
        BiMambaWrapper(16, bidirectional_strategy="concat")


@pytest.mark.parametrize("over", [dict(), dict(bidirectional_strategy="ew_multiply", bidirectional_weight_tie=False),
                                  dict(rcps=False), dict(rcps=False, bidirectional=False)])
def test_long_inference_in_pieces_equals_one_pass(over, monkeypatch):
    """Inference longer than BiMambaWrapper.piece_length runs each Mamba piece by piece with its state
    carried (forward pieces left to right, reverse and rc pieces right to left): same outputs."""
    model = build(small_config(**over), seed=4).eval()
    x = dna(2, 70, seed=5)
    with torch.inference_mode():
        whole = model.caduceus(x)
        monkeypatch.setattr(BiMambaWrapper, "piece_length", 16)  # 5 pieces, the last one short
        pieces = model.caduceus(x)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # training mode (or autograd) never splits
        model.train()
        calls = []
        monkeypatch.setattr("seqssm.models.caduceus._scan_in_pieces", lambda *a, **k: calls.append(1))
        model.caduceus(x)
        assert not calls


# ----------------------------------------------------------------------------------------------
# reverse-complement equivariance


EQUIVARIANT = [
    dict(),
    dict(fused_add_norm=False),
    dict(rms_norm=False, residual_in_fp32=True),
    dict(fused_add_norm=False, rms_norm=False, residual_in_fp32=True),
    dict(bidirectional=False),
    dict(bidirectional_strategy="ew_multiply", bidirectional_weight_tie=False),
]


@pytest.mark.parametrize("over", EQUIVARIANT)
def test_ps_logits_and_hidden_states_are_rc_equivariant(over):
    model = build(small_config(**over), seed=1)
    x = dna(2, 48, seed=2)
    x[0, 5] = 11  # an N
    xr = rc(x, model)
    cmap = torch.tensor(model.config.complement_ids())
    with torch.no_grad():
        logits, logits_rc = model(x), model(xr)
        hidden, hidden_rc = model.caduceus(x), model.caduceus(xr)
    assert logits.shape == (2, 48, 16) and hidden.shape == (2, 48, 64)
    # rc input: positions reversed, complementary tokens exchanged
    assert torch.allclose(logits_rc, logits.flip(1)[..., cmap], rtol=1e-5, atol=1e-5)
    assert torch.allclose(hidden_rc, flip_lc(hidden), rtol=1e-5, atol=1e-5)
    # and it is not trivially so: the logits do depend on the strand
    assert not torch.allclose(logits_rc, logits, atol=1e-3)


def test_fused_block_order_is_the_reference_s():
    """rcps + fused_add_norm: the reference's block normalizes the second half as "forward".

    Transcription of RCPSMambaBlock.forward (fused branch) and of the final norm of
    CaduceusMixerModel, with the fused kernel's fp32 semantics written out.
    """
    model = build(small_config(), seed=3)
    backbone = model.caduceus.backbone

    def fused(x, residual, norm):  # rms_norm_fn(..., prenorm=True) in float32
        s = x if residual is None else x + residual
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight, s

    x = dna(1, 40, seed=4)
    with torch.no_grad():
        h, residual = backbone.embeddings(x), None
        for layer in backbone.layers:
            n = h.shape[-1] // 2
            hf, rf = fused(h[..., n:], None if residual is None else residual[..., n:], layer.norm)
            hr, rr = fused(h[..., :n].flip(dims=[-2, -1]),
                           None if residual is None else residual[..., :n].flip(dims=[-2, -1]), layer.norm)
            h = torch.cat([hf, hr.flip(dims=[-2, -1])], dim=-1)
            residual = torch.cat([rf, rr.flip(dims=[-2, -1])], dim=-1)
            h = layer.mixer(h)
        n = h.shape[-1] // 2
        out_f, _ = fused(h[..., :n], residual[..., :n], backbone.norm_f)
        out_r, _ = fused(h[..., n:].flip(dims=[-2, -1]), residual[..., n:].flip(dims=[-2, -1]), backbone.norm_f)
        want = torch.cat([out_f, out_r.flip(dims=[-2, -1])], dim=-1)
        got = backbone(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # the unfused reference code keeps the halves in place: a different function of the same weights
    unfused = CaduceusForMaskedLM(CaduceusConfig.from_dict(small_config(fused_add_norm=False)))
    sd = {k.replace(".norm.weight", ".norm.submodule.weight").replace("norm_f.weight", "norm_f.submodule.weight"): v
          for k, v in model.state_dict().items()}
    unfused.load_state_dict(sd)
    with torch.no_grad():
        assert not torch.allclose(unfused.eval().caduceus(x), got, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# embeddings


@pytest.mark.parametrize("over", [dict(), dict(fused_add_norm=False)])
def test_ps_per_token_embeddings_are_strand_invariant(over):
    model = build(small_config(**over), seed=5)
    x = dna(3, 37, seed=6)
    with torch.no_grad():
        e, e_rc = model.embed(x), model.embed(rc(x, model))
        hidden = model.caduceus(x)
        pooled, pooled_rc = model.embed_pooled(x), model.embed_pooled(rc(x, model))
    assert e.shape == (3, 37, 32)
    assert torch.allclose(e_rc, e.flip(1), rtol=1e-5, atol=1e-6)  # position t of x is position L-1-t of rc(x)
    assert torch.allclose(e, 0.5 * (hidden[..., :32] + hidden[..., 32:].flip(-1)))
    assert torch.allclose(pooled, pooled_rc, rtol=1e-5, atol=1e-6) and pooled.shape == (3, 32)


def test_ph_conjoined_embeddings_are_strand_invariant():
    model = build(small_config(rcps=False), seed=7)
    x = dna(2, 33, seed=8)
    with torch.no_grad():
        plain, plain_rc = model.embed(x), model.embed(rc(x, model))
        e, e_rc = model.embed(x, conjoin=True), model.embed(rc(x, model), conjoin=True)
    assert not torch.allclose(plain_rc, plain.flip(1), atol=1e-3)  # a Ph model alone is not strand-symmetric
    assert torch.allclose(e_rc, e.flip(1), rtol=1e-5, atol=1e-6)
    # right-padded rows are reverse-complemented within their length (the padding stays at the right),
    # so the conjoined embeddings of a padded batch are strand-invariant row by row
    lengths = torch.tensor([33, 20])
    padded = x.clone()
    padded[1, 20:] = 4  # [PAD]
    padded_rc = rc_token_ids(padded, torch.tensor(model.config.complement_ids()), lengths)
    assert torch.equal(padded_rc[1, :20], rc(padded[1:, :20], model)[0]) and (padded_rc[1, 20:] == 4).all()
    with torch.no_grad():
        ep = model.embed(padded, conjoin=True, lengths=lengths)
        ep_rc = model.embed(padded_rc, conjoin=True, lengths=lengths)
        pooled = model.embed_pooled(padded, conjoin=True, lengths=lengths)
        pooled_rc = model.embed_pooled(padded_rc, conjoin=True, lengths=lengths)
    assert torch.allclose(ep_rc[1, :20], ep[1, :20].flip(0), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ep[0], e[0], atol=1e-6)
    assert torch.allclose(pooled[1], ep[1, :20].mean(0), atol=1e-6)
    assert torch.allclose(pooled, pooled_rc, rtol=1e-5, atol=1e-6)


def test_token_ids_are_those_of_the_dna_tokenizer():
    caduceus_vocab = {"[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[MASK]": 3, "[PAD]": 4, "[RESERVED]": 5, "[UNK]": 6,
                      "A": 7, "C": 8, "G": 9, "T": 10, "N": 11}
    assert DNATokenizer().vocab() == caduceus_vocab
    published = [PUBLISHED_PS_CONFIG["complement_map"][str(i)] for i in range(16)]
    assert published[:12] == [int(v) for v in COMPLEMENT_LUT[:12]]
    assert CaduceusConfig.from_dict(small_config()).complement_ids() == published
    # pretraining replaced N by [PAD]; nothing else changes
    ids = torch.tensor([[7, 8, 11, 9, 10, 4, 11]])
    assert pretraining_inputs(ids).tolist() == [[7, 8, 4, 9, 10, 4, 4]]
    # a map given for the 12 tokens only is extended by identity up to the padded vocabulary
    short = CaduceusConfig.from_dict(small_config(vocab_size=12,
                                                  complement_map={str(i): published[i] for i in range(12)}))
    assert short.padded_vocab_size == 16 and short.complement_ids() == published


# ----------------------------------------------------------------------------------------------
# checkpoints


def write_hf_dir(path, cfg: dict, model, *, fmt="safetensors", prefix="caduceus.backbone.", dedup=True):
    """An HF-format directory as transformers' save_pretrained writes it (shared tensors once)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        ptr = v.untyped_storage().data_ptr()
        if dedup and ptr in seen:
            continue
        seen.add(ptr)
        if not k.startswith("caduceus.backbone."):
            if prefix != "caduceus.backbone.":
                continue  # an AutoModel (Caduceus) checkpoint has no LM head
        state[prefix + k[len("caduceus.backbone."):] if k.startswith("caduceus.backbone.") else k] = v.clone()
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, path / "pytorch_model.bin")
    return state


def test_published_checkpoint_layout_round_trip(tmp_path):
    """The published Caduceus-PS config (d_model 256, 16 layers) saved as HF writes it, loaded back."""
    model = build(PUBLISHED_PS_CONFIG, seed=9)
    state = write_hf_dir(tmp_path / "ps", PUBLISHED_PS_CONFIG, model)
    assert list(state) == hf_saved_keys(PUBLISHED_PS_CONFIG)
    assert all(k.startswith(("caduceus.backbone.", "lm_head.")) for k in state)
    loaded = CaduceusForMaskedLM.from_pretrained(tmp_path / "ps")
    x = dna(1, 24, seed=10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    lw = loaded.caduceus.backbone.layers[3].mixer.submodule
    assert lw.mamba_rev.in_proj.weight is lw.mamba_fwd.in_proj.weight  # ties rebuilt, not copied
    assert loaded.lm_head.weight is loaded.caduceus.backbone.embeddings.word_embeddings.weight
    assert not loaded.training and loaded.config.padded_vocab_size == 16


@pytest.mark.parametrize("fmt,prefix,dedup", [("bin", "caduceus.backbone.", False), ("safetensors", "backbone.", True)])
def test_other_checkpoint_forms_load(tmp_path, fmt, prefix, dedup):
    """pytorch_model.bin with every alias (read with weights_only=True), and an AutoModel (`backbone.*`) file."""
    cfg = small_config(fused_add_norm=False)
    model = build(cfg, seed=11)
    write_hf_dir(tmp_path / "m", cfg, model, fmt=fmt, prefix=prefix, dedup=dedup)
    loaded = CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    x = dna(2, 30, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_pretrained_round_trip(tmp_path):
    model = build(small_config(rcps=False, rms_norm=False, bidirectional_weight_tie=False), seed=13)
    d = model.save_pretrained(tmp_path / "out")
    written = json.loads((d / "config.json").read_text())
    assert written["model_type"] == "caduceus" and written["vocab_size"] == 16
    assert written["architectures"] == ["CaduceusForMaskedLM"]
    from safetensors.torch import load_file

    # (safetensors files keep no order of their own)
    assert sorted(load_file(str(d / "model.safetensors"))) == sorted(hf_saved_keys(small_config(
        rcps=False, rms_norm=False, bidirectional_weight_tie=False)))
    loaded = CaduceusForMaskedLM.from_pretrained(d)
    x = dna(2, 19, seed=14)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # our config.json holds every field of the published one, with the same values
    ps = build(small_config(), seed=15).save_pretrained(tmp_path / "ps")
    ours = json.loads((ps / "config.json").read_text())
    for key, value in small_config().items():
        if key not in ("auto_map", "transformers_version", "torch_dtype"):
            assert ours[key] == value, key


def test_untied_lm_head_in_the_file_is_kept(tmp_path):
    cfg = small_config(rcps=False)
    model = build(cfg, seed=16)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() + 1.0)  # a head of its own
    model.config.tie_word_embeddings = False
    write_hf_dir(tmp_path / "m", cfg, model)
    loaded = CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    assert loaded.config.tie_word_embeddings is False
    x = dna(1, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_bad_checkpoints_are_user_errors(tmp_path):
    cfg = small_config()
    model = build(cfg, seed=17)
    state = write_hf_dir(tmp_path / "m", cfg, model, fmt="bin", dedup=False)
    # tied tensors stored twice with different values
    key = next(k for k in state if ".mamba_rev.in_proj.weight" in k)
    torch.save({**state, key: state[key] + 1}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(SeqssmError, match="shared tensor"):
        CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    # a missing tensor
    torch.save({k: v for k, v in state.items() if not k.endswith("layers.1.norm.weight")},
               tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(SeqssmError, match="missing key"):
        CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    # a complement map in the weights that contradicts config.json
    bad = dict(state)
    bad["lm_head.complement_map"] = torch.arange(16)
    torch.save(bad, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(SeqssmError, match="complement_map"):
        CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    # not a Caduceus config; a pickled object instead of tensors
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "model_type": "hyenadna"}))
    with pytest.raises(SeqssmError, match="model_type"):
        CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    torch.save({"model": RMSNorm(4)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(SeqssmError, match="refusing"):
        CaduceusForMaskedLM.from_pretrained(tmp_path / "m")
    with pytest.raises(SeqssmError, match="not a directory"):
        CaduceusForMaskedLM.from_pretrained(tmp_path / "nowhere")


def test_config_validation():
    with pytest.raises(ValueError, match="complement_map"):
        CaduceusConfig(d_model=8, n_layer=1, vocab_size=12, rcps=True)
    with pytest.raises(ValueError, match="in order"):
        CaduceusConfig(d_model=8, n_layer=1, vocab_size=12, complement_map={"1": 1, "0": 0})
    with pytest.raises(ValueError, match="ssm_cfg"):
        CaduceusConfig(d_model=8, n_layer=1, vocab_size=12, ssm_cfg={"d_states": 4})
    cfg = CaduceusConfig.from_dict({**small_config(), "bidirectional_strategy": None, "pad_token_id": 4})
    assert cfg.bidirectional_strategy == "add"
