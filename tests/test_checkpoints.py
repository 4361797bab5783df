"""Loading and saving HyenaDNA checkpoints: seqssm round trips, HuggingFace directories (safetensors
and pytorch_model.bin, both key prefixes), original Lightning checkpoints, refusals, and fidelity
to the HF reference implementation on a real published checkpoint."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from seqssm.errors import SeqssmError
from seqssm.models import (
    HyenaConfig,
    HyenaDNAForCausalLM,
    bundled_models,
    count_parameters,
    load_model,
    save_model,
)
from seqssm.tokenizers.dna import DNATokenizer

from test_hyena import perturbed, rel, tiny_config, windows

HF_KEYS = ("vocab_size", "d_model", "n_layer", "d_inner", "max_seq_len", "emb_dim", "filter_order",
           "short_filter_order", "hyena_order", "activation_freq", "num_inner_mlps", "train_freq", "use_bias",
           "pad_vocab_size_multiple", "layer_norm_epsilon", "initializer_range", "embed_dropout",
           "hyena_dropout", "hyena_filter_dropout")


class NotATensor:  # an arbitrary class: torch.load(weights_only=True) must refuse to rebuild it
    def __init__(self):
        self.payload = "anything"


@pytest.fixture
def source(lambda_genome):
    """A small untrained model with every weight moved off its init, and real DNA to run it on."""
    torch.manual_seed(0)
    model = perturbed(HyenaDNAForCausalLM(tiny_config())).eval()
    ids = windows(lambda_genome, [0, 1234, 40000], 120)
    with torch.no_grad():
        logits = model(ids)
    return model, ids, logits


def outputs(loaded, ids):
    with torch.no_grad():
        return loaded.model(ids)


def freq_shared(model) -> bool:
    return all(
        layer.mixer.filter_fn.implicit_filter[1].freq is layer.mixer.filter_fn.implicit_filter[3].freq
        is layer.mixer.filter_fn.implicit_filter[5].freq
        for layer in model.backbone.layers
    )


def hf_config(cfg: HyenaConfig, **extra) -> dict:
    """config.json the way the HF port writes it (its keys only, plus HF bookkeeping)."""
    d = {k: v for k, v in cfg.to_dict().items() if k in HF_KEYS}
    return {"model_type": "hyenadna", "architectures": ["HyenaDNAModel"], "tie_word_embeddings": False,
            "transformers_version": "5.14.1", "pad_token_id": 4, **d, **extra}


def original_config(cfg: HyenaConfig) -> dict:
    """config.json / hyper_parameters["model"] of the original HyenaDNA (Lightning) code."""
    return {
        "_name_": "lm", "d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_inner": cfg.d_inner,
        "vocab_size": cfg.vocab_size, "resid_dropout": 0.0, "embed_dropout": 0.1, "fused_mlp": False,
        "fused_dropout_add_ln": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 8,
        "layer": {"_name_": "hyena", "emb_dim": cfg.emb_dim, "filter_order": cfg.filter_order,
                  "short_filter_order": 3, "l_max": cfg.max_seq_len, "modulate": True, "w": cfg.activation_freq,
                  "lr": 6e-4, "wd": 0.0, "lr_pos_emb": 0.0},
    }


# ------------------------------------------------------------------------------------------------
# seqssm format


def test_save_load_round_trip(source, tmp_path):
    model, ids, logits = source
    info = {"training_data": {"genome": "lambda"}, "heldout": {"perplexity": np.float32(3.5)}}
    out = save_model(model, tmp_path / "m", tokenizer=DNATokenizer(model_max_length=130), info=info)
    assert out == (tmp_path / "m").absolute()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "training.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "hyenadna" and cfg["d_model"] == 16 and cfg["tie_word_embeddings"] is True
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: stored once, as the embeddings
    assert sum(k.endswith(".freq") for k in tensors) == 2  # one per layer, not three

    loaded = load_model(out)
    assert torch.equal(outputs(loaded, ids), logits)
    assert loaded.name == "m" and loaded.info["format"] == "seqssm" and loaded.info["source"] == str(out)
    assert loaded.info["heldout"] == {"perplexity": 3.5} and loaded.info["training_data"] == {"genome": "lambda"}
    assert loaded.tokenizer == DNATokenizer(model_max_length=130)
    assert loaded.config == model.config and not loaded.model.training
    assert freq_shared(loaded.model)
    assert loaded.model.lm_head.weight is loaded.model.backbone.embeddings.word_embeddings.weight
    assert count_parameters(loaded.model) == count_parameters(model)

    # Saving what was loaded: "source"/"format" describe the load, not the training; not written back.
    again = save_model(loaded.model, tmp_path / "m", tokenizer=loaded.tokenizer, info=loaded.info)
    assert "source" not in json.loads((again / "training.json").read_text())
    assert torch.equal(outputs(load_model(again), ids), logits)


def test_untied_head_round_trip(lambda_genome, tmp_path):
    model = perturbed(HyenaDNAForCausalLM(tiny_config(tie_word_embeddings=False))).eval()
    ids = windows(lambda_genome, [500], 100)
    d = save_model(model, tmp_path / "untied", tokenizer=DNATokenizer())
    assert "lm_head.weight" in load_file(d / "model.safetensors") and not (d / "training.json").exists()
    loaded = load_model(d)
    assert loaded.model.lm_head.weight is not loaded.model.backbone.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))


def test_save_refuses_to_replace_a_foreign_directory(source, tmp_path):
    model = source[0]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(SeqssmError, match="notes.txt"):
        save_model(model, tmp_path / "docs", tokenizer=DNATokenizer())
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_unknown_name_lists_bundled_models(tmp_path):
    with pytest.raises(SeqssmError, match="bundled") as e:
        load_model("no-such-model-xyz")
    for name in bundled_models():
        assert name in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeqssmError, match="not a model directory"):
        load_model(tmp_path / "empty")


def test_bundled_models_load():
    from seqssm.chem.model_dir import bundled_chem_models, load_chem_model

    chem = bundled_chem_models()
    assert "s4-chem-moses" in chem
    for name, path in bundled_models().items():
        if name in chem:
            assert load_chem_model(name).path == path
            with pytest.raises(SeqssmError, match="chemical language model"):
                load_model(name)
            continue
        loaded = load_model(name)
        assert loaded.name == name and Path(loaded.info["source"]) == path


def test_missing_and_unexpected_keys_are_listed(source, tmp_path):
    model = source[0]
    d = save_model(model, tmp_path / "m", tokenizer=DNATokenizer())
    tensors = load_file(d / "model.safetensors")
    del tensors["backbone.layers.1.mlp.fc1.weight"]
    tensors["backbone.layers.7.mlp.fc1.weight"] = torch.zeros(3)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(SeqssmError) as e:
        load_model(d)
    assert "backbone.layers.1.mlp.fc1.weight" in str(e.value) and "backbone.layers.7.mlp.fc1.weight" in str(e.value)

    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith(".freq") or ".1.freq" in k}
    tensors["backbone.ln_f.weight"] = torch.ones(17)
    tensors.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in tensors.items()}, d / "model.safetensors")
    with pytest.raises(SeqssmError, match="wrong shape"):
        load_model(d)


# ------------------------------------------------------------------------------------------------
# HuggingFace format


def _hf_dir(tmp_path, name, cfg, config_extra=None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config(cfg, **(config_extra or {}))))
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": cfg.max_seq_len, "padding_side": "left"}))
    return d


def test_hf_safetensors_backbone_prefix(source, tmp_path):
    """HyenaDNAModel.save_pretrained: keys backbone.*, shared freq stored once (under any alias)."""
    model, ids, logits = source
    sd = {k: v.contiguous() for k, v in model.backbone.state_dict().items()}
    for i in range(model.config.n_layer):  # safetensors writers keep one name per shared tensor
        for j in (1, 3):
            del sd[f"layers.{i}.mixer.filter_fn.implicit_filter.{j}.freq"]
    d = _hf_dir(tmp_path, "hf-st", model.config)
    save_file({f"backbone.{k}": v for k, v in sd.items()}, d / "model.safetensors")

    loaded = load_model(d)
    assert loaded.info["format"] == "hf" and loaded.name == "hf-st"
    assert torch.equal(outputs(loaded, ids), logits)  # head tied to the embeddings: same as the source
    assert freq_shared(loaded.model)
    assert loaded.config.tie_word_embeddings  # the file has no head, so it is tied ...
    assert loaded.model.lm_head.weight is loaded.model.backbone.embeddings.word_embeddings.weight
    assert loaded.tokenizer.model_max_length == model.config.max_seq_len and loaded.tokenizer.add_eos


def test_hf_safetensors_causal_lm_prefix_with_own_head(lambda_genome, tmp_path):
    model = perturbed(HyenaDNAForCausalLM(tiny_config(tie_word_embeddings=False))).eval()
    ids = windows(lambda_genome, [2000, 3000], 90)
    sd = {f"hyena.{k}" if k.startswith("backbone.") else k: v.contiguous() for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.endswith((".1.freq", ".5.freq"))]:
        del sd[k]
    d = _hf_dir(tmp_path, "hf-lm", model.config, {"architectures": ["HyenaDNAForCausalLM"]})
    save_file(sd, d / "model.safetensors")
    loaded = load_model(d)
    assert not loaded.config.tie_word_embeddings
    assert loaded.model.lm_head.weight is not loaded.model.backbone.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    assert freq_shared(loaded.model)


@pytest.mark.parametrize("prefix", ["backbone.", "hyena.backbone."])
def test_hf_pytorch_model_bin(source, tmp_path, prefix):
    """torch.save of a state dict: every freq alias present, sharing storage."""
    model, ids, logits = source
    sd = {prefix + k: v for k, v in model.backbone.state_dict().items()}
    d = _hf_dir(tmp_path, "hf-bin", model.config)
    torch.save(sd, d / "pytorch_model.bin")
    loaded = load_model(d)
    assert torch.equal(outputs(loaded, ids), logits)
    assert freq_shared(loaded.model)


def test_hf_disagreeing_freq_aliases_are_refused(source, tmp_path):
    model = source[0]
    sd = {"backbone." + k: v.clone() for k, v in model.backbone.state_dict().items()}
    sd["backbone.layers.0.mixer.filter_fn.implicit_filter.3.freq"] += 1.0
    d = _hf_dir(tmp_path, "hf-bad", model.config)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(SeqssmError, match="shared tensor"):
        load_model(d)


def test_weights_only_refusal(source, tmp_path):
    model = source[0]
    d = _hf_dir(tmp_path, "hf-pickle", model.config)
    torch.save({**{"backbone." + k: v for k, v in model.backbone.state_dict().items()}, "extra": NotATensor()},
               d / "pytorch_model.bin")
    with pytest.raises(SeqssmError, match="weights_only.*NotATensor"):
        load_model(d)
    ckpt = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": original_config(model.config)}, "callbacks": NotATensor()}, ckpt)
    with pytest.raises(SeqssmError, match="refusing to load.*NotATensor"):
        load_model(ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(SeqssmError, match="not a readable torch checkpoint"):
        load_model(ckpt)


# ------------------------------------------------------------------------------------------------
# original Lightning checkpoints


def _lightning_state(model, *, checkpointed=False) -> dict:
    sd = {}
    for k, v in model.state_dict().items():
        if checkpointed:  # trained with checkpoint_mixer / checkpoint_mlp
            k = k.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer.")
        sd["model." + k] = v
    sd["decoder.0.output_transform.weight"] = torch.zeros(2, model.config.d_model)  # a task head
    return sd


def test_lightning_ckpt_with_hyper_parameters(source, tmp_path):
    model, ids, logits = source
    path = tmp_path / "run" / "weights.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": _lightning_state(model), "epoch": 3, "global_step": 1000,
                "pytorch-lightning_version": "1.8.6",
                "hyper_parameters": {"model": original_config(model.config), "train": {"seed": 1}}}, path)
    loaded = load_model(path)
    assert loaded.info["format"] == "lightning" and loaded.name == "run"
    assert loaded.info["ignored_keys"] == ["decoder.0.output_transform.weight"]
    assert torch.equal(outputs(loaded, ids), logits)
    assert loaded.config.max_seq_len == model.config.max_seq_len and loaded.config.activation_freq == 10
    assert loaded.config.tie_word_embeddings and freq_shared(loaded.model)


def test_lightning_ckpt_with_config_beside_it(source, tmp_path):
    model, ids, logits = source
    d = tmp_path / "hyenadna-tiny"
    d.mkdir()
    torch.save({"state_dict": _lightning_state(model, checkpointed=True)}, d / "weights.ckpt")
    with pytest.raises(SeqssmError, match="config.json"):
        load_model(d / "weights.ckpt")
    (d / "config.json").write_text(json.dumps(original_config(model.config)))
    for target in (d / "weights.ckpt", d):  # the file, or the directory holding it
        loaded = load_model(target)
        assert loaded.name == "hyenadna-tiny"
        assert torch.equal(outputs(loaded, ids), logits)


# ------------------------------------------------------------------------------------------------
# the real checkpoint against the HF reference code


def import_hf_reference(checkpoint_dir: Path):
    """modeling_hyena / configuration_hyena from the checkpoint directory, as a throwaway package."""
    pytest.importorskip("transformers")
    name = "_hyenadna_hf_reference"
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(checkpoint_dir)]
    sys.modules[name] = pkg
    try:
        return (importlib.import_module(f"{name}.modeling_hyena"),
                importlib.import_module(f"{name}.configuration_hyena"))
    except ImportError as e:  # a transformers release that the reference code no longer supports
        pytest.skip(f"cannot import the HF reference code: {e}")


@pytest.mark.network
def test_fidelity_to_hf_reference_on_real_checkpoint(anticapt_hyenadna, lambda_genome, tmp_path):
    modeling, configuration = import_hf_reference(anticapt_hyenadna)
    cfg_dict = json.loads((anticapt_hyenadna / "config.json").read_text())
    ref = modeling.HyenaDNAModel(configuration.HyenaConfig(**cfg_dict))
    state = torch.load(anticapt_hyenadna / "pytorch_model.bin", map_location="cpu", weights_only=True)
    ref.load_state_dict(state, strict=True)
    ref.eval()

    loaded = load_model(anticapt_hyenadna)
    assert loaded.info["format"] == "hf" and loaded.config.activation_freq == 10
    assert loaded.config.max_seq_len == 1026 and loaded.config.d_model == 128 and loaded.config.n_layer == 2

    # Size: 436,096 trainable numbers (the shared freq once); 448,920 numbers in the state dict
    # (freq listed three times per layer, plus the z/t/deltas buffers).
    assert count_parameters(loaded.model) == sum(p.numel() for p in ref.parameters()) == 436_096
    assert sum(v.numel() for v in loaded.model.backbone.state_dict().values()) == 448_920
    assert sum(v.numel() for v in ref.state_dict().values()) == 448_920
    assert freq_shared(loaded.model)

    rng = np.random.default_rng()
    for length in (1000, 1026, 257):
        starts = rng.integers(0, len(lambda_genome) - length, size=4)
        ids = windows(lambda_genome, starts, length)
        with torch.no_grad():
            want = ref(ids, return_dict=True).last_hidden_state
            got = loaded.model.backbone(ids)
        assert got.shape == want.shape == (4, length, 128)
        err = rel(got, want)
        assert err <= 1e-5, (length, starts, err)

    # And through a seqssm save/load round trip.
    again = load_model(save_model(loaded.model, tmp_path / "tiny", tokenizer=loaded.tokenizer))
    with torch.no_grad():
        assert torch.equal(again.model.backbone(ids), got)
