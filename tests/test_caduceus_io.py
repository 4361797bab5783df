"""load_model / save_model for Caduceus: HF-format and seqssm directories, and what LoadedModel
offers the embed pipeline (max length, dim, embed, streaming) for Caduceus and HyenaDNA alike."""

import copy
import json

import numpy as np
import pytest
import torch

from seqssm.errors import SeqssmError
from seqssm.models import HyenaConfig, HyenaDNAForCausalLM, load_model, save_model
from seqssm.models.caduceus import CaduceusForMaskedLM
from seqssm.tokenizers.dna import DNATokenizer, encode, reverse_complement

from test_caduceus import PUBLISHED_PS_CONFIG, build, small_config, write_hf_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lambda_ids(genome, starts, length):
    return torch.from_numpy(np.stack([encode(genome[s:s + length]) for s in starts]).astype(np.int64))


def test_hf_directory_loads_with_the_tokenizer_max_length(tmp_path, lambda_genome):
    cfg = small_config()
    model = build(cfg, seed=1)
    write_hf_dir(tmp_path / "ps", cfg, model)
    (tmp_path / "ps" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072,
                                                                        "tokenizer_class": "CaduceusTokenizer"}))
    loaded = load_model(tmp_path / "ps")
    assert isinstance(loaded.model, CaduceusForMaskedLM) and not loaded.model.training
    assert loaded.model_type == "caduceus" and loaded.info["format"] == "hf" and loaded.name == "ps"
    assert loaded.max_length == 131072 and loaded.dim == 32
    assert loaded.strand_invariant and not loaded.is_causal and not loaded.can_stream
    assert loaded.architecture.startswith("Caduceus-PS") and "d_model 32, 2 layers" in loaded.architecture
    assert loaded.n_as_pad  # published checkpoints were trained with N replaced by [PAD]
    ids = lambda_ids(lambda_genome, [100, 9000], 64)
    ids[0, 10] = 11  # an N
    with torch.no_grad():
        got = loaded.embed(ids)
        want = model.embed(torch.where(ids == 11, 4, ids))
        # Caduceus-PS is strand-invariant by construction: rc averaging changes nothing
        averaged = loaded.embed(ids, rc_average=True)
        on_rc = loaded.embed(reverse_complement(ids))
    assert torch.equal(got, want) and got.dtype == torch.float32 and got.shape == (2, 64, 32)
    assert torch.equal(averaged, got)
    assert torch.allclose(on_rc, got.flip(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(SeqssmError, match="overlapping windows"):
        loaded.embed_stream(ids)


@pytest.mark.parametrize("tokenizer_config,config_extra,want", [
    (None, {}, 131072),
    ({"model_max_length": int(1e30)}, {}, 131072),  # HF's "no limit" sentinel is not a length
    ({"model_max_length": 1024}, {}, 1024),
    (None, {"max_seq_len": 4096}, 4096),
])
def test_hf_max_length_fallbacks(tmp_path, tokenizer_config, config_extra, want):
    cfg = small_config(rcps=False)
    write_hf_dir(tmp_path / "m", {**cfg, **config_extra}, build(cfg, seed=2))
    if tokenizer_config is not None:
        (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert load_model(tmp_path / "m").max_length == want


def test_seqssm_round_trip(tmp_path, lambda_genome):
    cfg = small_config(rcps=False, fused_add_norm=False)
    model = build(cfg, seed=3)
    info = {"training_data": {"description": "test"}, "heldout": {"perplexity": 3.5, "masked_accuracy": 0.4}}
    d = save_model(model, tmp_path / "ph", tokenizer=DNATokenizer(model_max_length=2048), info=info)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                    "training.json"]
    written = json.loads((d / "config.json").read_text())
    assert written["model_type"] == "caduceus" and written["seqssm_n_as_pad"] is False
    assert written["architectures"] == ["CaduceusForMaskedLM"] and written["vocab_size"] == 16
    loaded = load_model(d)
    assert loaded.info["format"] == "seqssm" and loaded.info["heldout"]["masked_accuracy"] == 0.4
    assert loaded.max_length == 2048 and not loaded.n_as_pad and not loaded.strand_invariant
    assert loaded.architecture.startswith("Caduceus-Ph")
    ids = lambda_ids(lambda_genome, [500], 80)
    ids[0, 3] = 11
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
        assert torch.equal(loaded.embed(ids), model.embed(ids))  # N stays N
        # rc_average on a Ph model is the post-hoc conjoined embedding
        assert torch.equal(loaded.embed(ids, rc_average=True), model.embed(ids, conjoin=True))
    # the same directory is a HuggingFace checkpoint too
    again = CaduceusForMaskedLM.from_pretrained(d)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    # a model loaded from HF format keeps its N -> [PAD] convention when saved here
    d2 = save_model(loaded.model, tmp_path / "ph2", tokenizer=loaded.tokenizer, n_as_pad=True)
    assert load_model(d2).n_as_pad


def test_published_ps_layout_saves_and_loads(tmp_path):
    model = build(PUBLISHED_PS_CONFIG, seed=4)
    d = save_model(model, tmp_path / "ps", tokenizer=DNATokenizer(model_max_length=131072))
    loaded = load_model(d)
    x = torch.randint(7, 11, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    lw = loaded.model.caduceus.backbone.layers[5].mixer.submodule
    assert lw.mamba_rev.out_proj.weight is lw.mamba_fwd.out_proj.weight


def test_causal_model_streams_through_loaded_model(tmp_path, lambda_genome):
    cfg = small_config(rcps=False, bidirectional=False)
    model = build(cfg, seed=5)
    loaded = load_model(save_model(model, tmp_path / "causal", tokenizer=DNATokenizer(model_max_length=512)))
    assert loaded.is_causal and loaded.can_stream and "causal" in loaded.architecture
    ids = lambda_ids(lambda_genome, [700, 20000], 150)
    with torch.no_grad():
        whole = loaded.embed(ids)
        a, state = loaded.embed_stream(ids[:, :61])
        b, state = loaded.embed_stream(ids[:, 61:], state)
    assert ((torch.cat([a, b], 1) - whole).abs().max() / whole.abs().max()).item() <= 1e-5


def test_hyenadna_loaded_model_api_is_unchanged(tmp_path, lambda_genome):
    torch.manual_seed(0)
    cfg = HyenaConfig(d_model=32, n_layer=2, d_inner=64, max_seq_len=256)
    model = HyenaDNAForCausalLM(cfg).eval()
    loaded = load_model(save_model(model, tmp_path / "h", tokenizer=DNATokenizer(model_max_length=256)))
    assert loaded.model_type == "hyenadna" and loaded.max_length == 256 and loaded.dim == 32
    assert loaded.is_causal and not loaded.can_stream and not loaded.strand_invariant
    assert loaded.architecture == "HyenaDNA (d_model 32, 2 layers, order 2)"
    ids = lambda_ids(lambda_genome, [0], 100)
    with torch.no_grad():
        h = loaded.model.backbone(ids).float()
        assert torch.equal(loaded.embed(ids), h)
        want = 0.5 * (h + loaded.model.backbone(reverse_complement(ids)).float().flip(1))
        assert torch.equal(loaded.embed(ids, rc_average=True), want)
    with pytest.raises(SeqssmError, match="streaming"):
        loaded.embed_stream(ids)
    with pytest.raises(TypeError, match="CaduceusForMaskedLM"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x", tokenizer=DNATokenizer())


def test_bad_caduceus_directory_is_a_user_error(tmp_path):
    cfg = small_config()
    write_hf_dir(tmp_path / "m", cfg, build(cfg, seed=6))
    bad = copy.deepcopy(cfg)
    bad["bidirectional_strategy"] = "concat"
    (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(SeqssmError, match="config.json: bad Caduceus config"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(SeqssmError, match="no model.safetensors"):
        load_model(tmp_path / "m")


def test_dna_config_matches_the_published_layout(tmp_path):
    from seqssm.models.caduceus import CaduceusConfig

    cfg = CaduceusConfig.dna()
    hf = cfg.to_hf_dict()
    for key, value in PUBLISHED_PS_CONFIG.items():
        if key not in ("architectures", "auto_map", "torch_dtype", "transformers_version"):
            assert hf[key] == value, key
    causal = CaduceusConfig.dna(32, 2, rcps=False, bidirectional=False, d_state=8)
    model = CaduceusForMaskedLM(causal)
    assert model.is_causal and causal.ssm_cfg["d_state"] == 8
