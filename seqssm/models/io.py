"""Load and save HyenaDNA and Caduceus models without ever unpickling arbitrary objects.

Accepted by `load_model`:

* a bundled name: a seqssm model directory under seqssm.resources "models/<name>/";
* a seqssm model directory, as written by `save_model`:
      config.json (model_type "hyenadna" + HyenaConfig fields), model.safetensors,
      tokenizer.json (DNATokenizer.to_dict()), training.json (optional: data, metrics...);
  or a fine-tuned one (seqssm.models.heads.save_finetuned: config.json also has "head" and
  "preprocessing", model.safetensors also `head.*`): load_model gives its backbone (head keys
  ignored, LM head tied to the embeddings), load_finetuned the whole classifier;
* a HuggingFace-format HyenaDNA directory (LongSafari/hyenadna-*-hf, or anything written by its
  save_pretrained): config.json + model.safetensors or pytorch_model.bin, keys `backbone.*`
  (HyenaDNAModel) or `hyena.backbone.*` + `lm_head.weight` (HyenaDNAForCausalLM);
* an original HyenaDNA Lightning checkpoint (`weights.ckpt`, or a directory holding one):
  "state_dict" keyed `model.backbone.*`; the model config from "hyper_parameters" (["model"]) or,
  failing that, a config.json beside the file (original nested format with a "layer" section,
  or the HF flat format).

* a Caduceus directory (config.json with model_type "caduceus"): HuggingFace format
  (kuleshov-group/caduceus-*: config.json + model.safetensors or pytorch_model.bin, keys
  `caduceus.backbone.*` / `backbone.*`; max length from tokenizer_config.json's model_max_length,
  else from config.json, else 131,072, the length the published models were trained at), or a
  seqssm one as `save_model` writes it (the same config.json, which stays loadable by the
  reference code, + model.safetensors + tokenizer.json + training.json), or a fine-tuned one
  (save_finetuned: keys `backbone.*` + `head.*`; load_model gives its backbone, head ignored);

Tensors come from safetensors, or from torch.load(..., weights_only=True). A file that
weights_only refuses is reported as a SeqssmError; there is no fallback to full unpickling.

Shared tensors: the sine `freq` of each filter MLP is one Parameter listed under several keys,
and a tied lm_head is the word-embedding matrix. Files may hold any subset of those aliases
(safetensors writers drop duplicates); loading fills every alias from the one present, checks
that aliases stored twice agree, and the loaded model shares one Parameter as it should.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pickle
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch

from seqssm.errors import SeqssmError
from seqssm.models.hyena import HyenaConfig, HyenaDNAForCausalLM
from seqssm.tokenizers.dna import VOCAB_SIZE, DNATokenizer

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")
MODEL_TYPE = "hyenadna"
CADUCEUS = "caduceus"
# Window length of the published Caduceus checkpoints, for HF directories that do not say.
CADUCEUS_DEFAULT_MAX_LENGTH = 131072
_SHOW = 5  # how many keys an error message lists


@dataclass
class LoadedModel:
    """A DNA language model ready for use, whatever its architecture.

    The embed pipeline needs only: `max_length`, `dim`, `embed(ids, rc_average=...)` and, for
    `--stream`, `can_stream` / `embed_stream(ids, state)`; `architecture` describes the model.
    """

    model: torch.nn.Module  # HyenaDNAForCausalLM or CaduceusForMaskedLM, in eval mode, on the requested device
    tokenizer: DNATokenizer
    config: object  # HyenaConfig or CaduceusConfig
    info: dict = field(default_factory=dict)  # training.json + "source" + "format"
    name: str = ""
    # Feed N (id 11) as [PAD] (4): the published Caduceus checkpoints never saw token 11 (their
    # pretraining replaced N by [PAD]); models trained here see N as N.
    n_as_pad: bool = False

    @property
    def model_type(self) -> str:
        """"hyenadna" or "caduceus"."""
        return CADUCEUS if _is_caduceus(self.model) else MODEL_TYPE

    @property
    def max_length(self) -> int:
        """The longest window the model takes: HyenaDNA's filter length, else the tokenizer's model_max_length."""
        if self.model_type == MODEL_TYPE:
            return int(self.config.max_seq_len)
        return int(self.tokenizer.model_max_length)

    @property
    def dim(self) -> int:
        """Width of the per-position embeddings returned by `embed` (d_model; Caduceus-PS: d_model too)."""
        return int(self.config.d_model)

    @property
    def is_causal(self) -> bool:
        """The embedding of a position depends on it and the positions before it only."""
        return True if self.model_type == MODEL_TYPE else self.model.is_causal

    @property
    def strand_invariant(self) -> bool:
        """`embed` of the reverse complement is `embed` reversed in position, by construction (Caduceus-PS)."""
        return self.model_type == CADUCEUS and bool(self.config.rcps)

    @property
    def can_stream(self) -> bool:
        """`embed_stream` is available: causal Mamba models (Caduceus with bidirectional=False, rcps=False)."""
        return self.model_type == CADUCEUS and self.model.is_causal

    @property
    def architecture(self) -> str:
        return architecture_of(self.config)

    def prepare_inputs(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids as the model was trained on them (N -> [PAD] when n_as_pad)."""
        if not self.n_as_pad:
            return ids
        from seqssm.tokenizers.dna import N, PAD

        return torch.where(ids == N, torch.full_like(ids, PAD), ids)

    def embed(self, ids: torch.Tensor, *, rc_average: bool = False) -> torch.Tensor:
        """ids [B, L] (int, on the model's device) -> float32 per-position embeddings [B, L, dim], aligned
        with the input. rc_average: average with the position-reversed embeddings of the reverse
        complement (strand-symmetric; a no-op for Caduceus-PS, which is strand-invariant already).
        Runs under whatever autocast the caller sets; no gradient is disabled here."""
        if self.model_type == MODEL_TYPE:
            from seqssm.tokenizers.dna import reverse_complement

            h = self.model.backbone(ids).float()
            if rc_average:
                h = 0.5 * (h + self.model.backbone(reverse_complement(ids)).float().flip(1))
            return h
        x = self.prepare_inputs(ids)
        return self.model.embed(x, conjoin=rc_average and not self.config.rcps)

    def embed_stream(self, ids: torch.Tensor, state=None):
        """Causal models: (embed of the window [B, L, dim] float32, state after it), given the state after
        the previous windows (None at the start); consecutive windows give exactly the embeddings of
        one pass over the whole prefix, in constant memory. Other models raise a SeqssmError."""
        if self.model_type != CADUCEUS:
            raise SeqssmError(f"model {self.name or 'HyenaDNA'}: HyenaDNA has no recurrent (streaming) mode here; "
                              "embed in windows instead")
        return self.model.embed_stream(self.prepare_inputs(ids), state)


def architecture_of(cfg) -> str:
    """One line naming the architecture of a HyenaConfig or CaduceusConfig, with its sizes."""
    if getattr(cfg, "model_type", None) != CADUCEUS:
        return f"HyenaDNA (d_model {cfg.d_model}, {cfg.n_layer} layers, order {cfg.hyena_order})"
    if cfg.rcps:
        kind = "Caduceus-PS (bidirectional, RC-equivariant)"
    elif cfg.bidirectional:
        kind = "Caduceus-Ph (bidirectional)"
    else:
        kind = "Caduceus / Mamba (causal)"
    d_state = (cfg.ssm_cfg or {}).get("d_state", 16)
    return f"{kind} (d_model {cfg.d_model}, {cfg.n_layer} layers, d_state {d_state})"


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable numbers in the model: shared Parameters counted once, buffers not counted."""
    return sum(p.numel() for p in model.parameters())


def bundled_models() -> dict[str, Path]:
    """Bundled model name -> its directory (seqssm.resources models/<name>/ holding a config.json)."""
    try:
        root = importlib.resources.files("seqssm.resources") / "models"
    except ModuleNotFoundError:
        return {}
    if not root.is_dir():
        return {}
    return {
        entry.name: Path(str(entry))
        for entry in sorted(root.iterdir(), key=lambda e: e.name)
        if entry.is_dir() and (entry / "config.json").is_file()
    }


# ----------------------------------------------------------------------------------------------
# loading


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a bundled model by name, or a seqssm / HuggingFace / Lightning checkpoint by path."""
    text = os.fspath(name_or_path)
    bundled = bundled_models()
    if text in bundled:
        loaded = _load_dir(bundled[text])
        loaded.name = text
    else:
        path = Path(text).expanduser()
        if not path.exists():
            names = ", ".join(bundled) or "none"
            raise SeqssmError(
                f"no model '{text}': not a bundled model (bundled: {names}) and no such file or directory"
            )
        loaded = _load_lightning(path) if path.is_file() else _load_dir(path)
        loaded.name = (path if path.is_dir() else path.parent).resolve().name
    loaded.model.to(device).eval()
    return loaded


def _is_caduceus(model) -> bool:
    from seqssm.models.caduceus import CaduceusForMaskedLM

    return isinstance(model, CaduceusForMaskedLM)


def _load_dir(d: Path) -> LoadedModel:
    if (d / "config.json").is_file():
        cfg = _read_json(d / "config.json")
        if isinstance(cfg, dict) and cfg.get("model_type") == CADUCEUS:
            return _load_caduceus(d, cfg)
    if (d / "tokenizer.json").is_file() and (d / "model.safetensors").is_file():
        tok = _read_json(d / "tokenizer.json")
        if isinstance(tok, dict) and tok.get("type") == "dna-char":
            return _load_seqssm(d, tok)
    if (d / "config.json").is_file() and any((d / f).is_file() for f in _HF_WEIGHTS + _HF_SHARDED):
        return _load_hf(d)
    if (d / "weights.ckpt").is_file():
        return _load_lightning(d / "weights.ckpt")
    raise SeqssmError(
        f"{d}: not a model directory: expected config.json + model.safetensors + tokenizer.json (seqssm), "
        "config.json + model.safetensors or pytorch_model.bin (HuggingFace), or weights.ckpt (Lightning)"
    )


def _load_seqssm(d: Path, tok: dict) -> LoadedModel:
    cfg_dict = _read_json(d / "config.json")
    _check_model_type(cfg_dict, d / "config.json")
    config = _config(cfg_dict, d / "config.json")
    try:
        tokenizer = DNATokenizer.from_dict(tok)
    except ValueError as e:
        raise SeqssmError(f"{d / 'tokenizer.json'}: {e}") from None
    info = {}
    if (d / "training.json").is_file():
        info = _read_json(d / "training.json")
        if not isinstance(info, dict):
            raise SeqssmError(f"{d / 'training.json'}: expected a JSON object")
    state = _read_safetensors(d / "model.safetensors")
    if isinstance(cfg_dict.get("head"), dict):
        # A fine-tuned model (seqssm.models.heads): the backbone alone; the head is load_finetuned's.
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        info["finetuned_head"] = cfg_dict["head"]
    model = _build(config, state, d / "model.safetensors")
    info.update(source=str(d), format="seqssm")
    return LoadedModel(model, tokenizer, config, info)


_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_SHARDED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_HEADS = ("score.",)  # sequence-classification head of the HF port: not part of the LM


def _load_hf(d: Path) -> LoadedModel:
    cfg_dict = _read_json(d / "config.json")
    _check_model_type(cfg_dict, d / "config.json")
    config = _config(cfg_dict, d / "config.json")
    weights = next((d / f for f in _HF_WEIGHTS if (d / f).is_file()), None)
    if weights is None:
        raise SeqssmError(f"{d}: sharded HuggingFace checkpoints are not supported (only *.index.json found)")
    raw = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_torch(weights)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise SeqssmError(f"{weights}: expected a flat mapping of names to tensors")
    state, ignored = {}, []
    for key, value in raw.items():
        if key.startswith("hyena.backbone."):
            key = key[len("hyena.") :]
        if key.startswith(_HF_HEADS):
            ignored.append(key)
            continue
        state[key] = value
    _decide_tying(config, state)
    model = _build(config, state, weights)
    tokenizer = DNATokenizer(model_max_length=_hf_max_length(d, config), add_eos=True)
    info = {"source": str(d), "format": "hf"}
    if ignored:
        info["ignored_keys"] = ignored
    return LoadedModel(model, tokenizer, config, info)


def _load_caduceus(d: Path, cfg: dict) -> LoadedModel:
    """A Caduceus directory: seqssm format (tokenizer.json of type dna-char) or HuggingFace format."""
    from seqssm.models.caduceus import CaduceusForMaskedLM

    model = CaduceusForMaskedLM.from_pretrained(d)
    tok = _read_json(d / "tokenizer.json") if (d / "tokenizer.json").is_file() else None
    info: dict = {}
    if isinstance(tok, dict) and tok.get("type") == "dna-char":
        try:
            tokenizer = DNATokenizer.from_dict(tok)
        except ValueError as e:
            raise SeqssmError(f"{d / 'tokenizer.json'}: {e}") from None
        if (d / "training.json").is_file():
            info = _read_json(d / "training.json")
            if not isinstance(info, dict):
                raise SeqssmError(f"{d / 'training.json'}: expected a JSON object")
        fmt, n_as_pad = "seqssm", bool(cfg.get("seqssm_n_as_pad", False))
    else:
        tokenizer = DNATokenizer(model_max_length=_caduceus_max_length(d, cfg))
        fmt, n_as_pad = "hf", bool(cfg.get("seqssm_n_as_pad", True))
    ignored = model.load_info.get("ignored_keys") or []
    if isinstance(cfg.get("head"), dict):
        # A fine-tuned model (seqssm.models.heads): the backbone alone; the head is load_finetuned's.
        ignored = [k for k in ignored if not k.startswith("head.")]
        info["finetuned_head"] = cfg["head"]
    if ignored:
        info["ignored_keys"] = ignored
    info.update(source=str(d), format=fmt)
    return LoadedModel(model, tokenizer, model.config, info, n_as_pad=n_as_pad)


def _caduceus_max_length(d: Path, cfg: dict) -> int:
    """tokenizer_config.json's model_max_length (131072 for the published checkpoints), else a length in
    config.json, else CADUCEUS_DEFAULT_MAX_LENGTH. (Caduceus has no positional limit: this is the
    window length the model was trained on, which the embed pipeline uses as its default window.)"""
    p = d / "tokenizer_config.json"
    candidates = []
    if p.is_file():
        try:
            candidates.append(json.loads(p.read_text()).get("model_max_length"))
        except (OSError, ValueError, AttributeError):
            pass
    candidates += [cfg.get(k) for k in ("model_max_length", "max_seq_len", "max_position_embeddings")]
    for n in candidates:
        # HF writes a huge sentinel (int(1e30)) when a tokenizer has no limit: not a length
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 31:
            return n
    return CADUCEUS_DEFAULT_MAX_LENGTH


def _hf_max_length(d: Path, config: HyenaConfig) -> int:
    p = d / "tokenizer_config.json"
    if p.is_file():
        try:
            n = json.loads(p.read_text()).get("model_max_length")
            if isinstance(n, int) and 0 < n <= config.max_seq_len:
                return n
        except (OSError, ValueError, AttributeError):
            pass
    return config.max_seq_len


def _load_lightning(path: Path) -> LoadedModel:
    ckpt = _read_torch(path)
    if not isinstance(ckpt, dict):
        raise SeqssmError(f"{path}: not a checkpoint (expected a dict with a 'state_dict')")
    raw = ckpt.get("state_dict", ckpt)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise SeqssmError(f"{path}: 'state_dict' is not a flat mapping of names to tensors")

    cfg_dict, cfg_source = _lightning_config(ckpt.get("hyper_parameters")), f"{path} (hyper_parameters)"
    if cfg_dict is None:
        beside = path.parent / "config.json"
        if not beside.is_file():
            raise SeqssmError(
                f"{path}: the checkpoint has no model config under 'hyper_parameters' and there is "
                f"no config.json beside it"
            )
        cfg_dict, cfg_source = _read_json(beside), str(beside)
    config = _config(cfg_dict, cfg_source)

    state, ignored = {}, []
    for key, value in raw.items():
        if not key.startswith("model."):
            ignored.append(key)  # task decoders / encoders of the training run, not the LM
            continue
        # Models trained with checkpoint_mixer / checkpoint_mlp wrap those in a `.layer`.
        key = re.sub(r"\.(mixer|mlp)\.layer\.", r".\1.", key[len("model.") :])
        state[key] = value
    if not any(k.startswith("backbone.") for k in state):
        raise SeqssmError(f"{path}: no HyenaDNA backbone weights (keys model.backbone.*) in the checkpoint")
    _decide_tying(config, state)
    model = _build(config, state, path)
    tokenizer = DNATokenizer(model_max_length=config.max_seq_len, add_eos=True)
    info = {"source": str(path), "format": "lightning"}
    if ignored:
        info["ignored_keys"] = ignored
    return LoadedModel(model, tokenizer, config, info)


def _lightning_config(hp) -> dict | None:
    if not isinstance(hp, dict):
        return None
    if isinstance(hp.get("model"), dict):
        return hp["model"]
    return hp if "d_model" in hp else None


def _config(d, source) -> HyenaConfig:
    """HyenaConfig from a HF/seqssm flat config or an original HyenaDNA (nested "layer") config."""
    if not isinstance(d, dict):
        raise SeqssmError(f"{source}: the model config is not a JSON object")
    try:
        config = _config_from_original(d, source) if isinstance(d.get("layer"), dict) else HyenaConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise SeqssmError(f"{source}: bad model config: {e}") from None
    if config.vocab_size < VOCAB_SIZE:
        raise SeqssmError(f"{source}: vocab_size {config.vocab_size} is smaller than the DNA vocabulary ({VOCAB_SIZE})")
    return config


# Options of the original HyenaOperator/HyenaFilter that change the computation; this port
# implements only their defaults (those of every published HyenaDNA model).
_ORIGINAL_DEFAULTS = {
    "num_heads": 1, "inner_factor": 1, "num_blocks": 1, "outer_mixing": False, "post_order_ffn": False,
    "linear_mixer": False, "normalized": False, "modulate": True, "activation": "id", "bidirectional": False,
}


def _config_from_original(d: dict, source) -> HyenaConfig:
    layer = d["layer"]
    kind = layer.get("_name_", "hyena")
    if kind != "hyena":
        raise SeqssmError(f"{source}: layer type '{kind}' is not a Hyena layer")
    for key, default in _ORIGINAL_DEFAULTS.items():
        value = layer.get(key, default)
        if value != default and not (key == "activation" and value in (None, "id", "identity")):
            raise SeqssmError(f"{source}: layer option {key}={value!r} is not supported (only {default!r})")
    return HyenaConfig(
        vocab_size=d.get("vocab_size", VOCAB_SIZE),
        d_model=d["d_model"],
        n_layer=d["n_layer"],
        d_inner=d.get("d_inner"),
        max_seq_len=layer["l_max"],
        emb_dim=layer.get("emb_dim", 3),
        filter_order=layer.get("filter_order", 64),
        short_filter_order=layer.get("short_filter_order", layer.get("local_order", 3)),
        hyena_order=layer.get("order", 2),
        activation_freq=layer.get("w", 1),
        num_inner_mlps=layer.get("num_inner_mlps", 2),
        train_freq=layer.get("train_freq", True),
        use_bias=layer.get("bias", True),
        pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 1),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        embed_dropout=d.get("embed_dropout", 0.1),
        resid_dropout=d.get("resid_dropout", 0.0),
        hyena_dropout=layer.get("dropout", 0.0),
        hyena_filter_dropout=layer.get("filter_dropout", 0.0),
        # The authors' inference code (standalone_hyenadna.py) and the HF port use 0.05.
        modulation_shift=layer.get("shift", 0.05),
    )


def _check_model_type(d, source) -> None:
    if isinstance(d, dict) and d.get("model_type") == "s4-chem":
        raise SeqssmError(f"{Path(source).parent}: a chemical language model (SMILES), not a DNA model; use it with "
                          "generate-molecules, score-molecules or finetune-molecules")
    if isinstance(d, dict) and d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise SeqssmError(f"{source}: model_type '{d.get('model_type')}' is not '{MODEL_TYPE}'")


def _decide_tying(config: HyenaConfig, state: dict) -> None:
    """Foreign checkpoints: tie the head to the embeddings unless the file has a head of its own."""
    head = state.get("lm_head.weight")
    emb = state.get("backbone.embeddings.word_embeddings.weight")
    config.tie_word_embeddings = head is None or (
        emb is not None and head.shape == emb.shape and torch.equal(head, emb)
    )
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)


def _build(config: HyenaConfig, state: dict, source) -> HyenaDNAForCausalLM:
    model = HyenaDNAForCausalLM(config)
    load_matching_state(model, state, source, "a HyenaDNA model")
    return model


def load_matching_state(model: torch.nn.Module, state: dict, source, what: str) -> None:
    """Load ``state`` into ``model`` strictly, with one-line errors naming ``source``.

    A tensor the model shares under several names (tied weights) may be stored under any of them;
    the others are filled in, and copies that disagree are refused. ``what`` names the model in
    the key-mismatch error ("a HyenaDNA model")."""
    expected = model.state_dict()
    state = dict(state)
    aliases: dict[int, list[str]] = {}
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        if name in expected:
            aliases.setdefault(id(t), []).append(name)
    for names in aliases.values():
        present = [n for n in names if n in state]
        if len(names) < 2 or not present:
            continue
        value = state[present[0]]
        for n in present[1:]:
            if state[n].shape != value.shape or not torch.equal(state[n], value):
                raise SeqssmError(
                    f"{source}: {present[0]} and {n} must be one shared tensor in this model but hold different values"
                )
        for n in names:
            state[n] = value

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:_SHOW])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:_SHOW])}")
        raise SeqssmError(f"{source}: weights do not match {what} with this config: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise SeqssmError(
            f"{source}: {len(wrong)} tensor(s) have the wrong shape for the config (file vs model), "
            f"e.g. {'; '.join(wrong[:_SHOW])}"
        )
    model.load_state_dict(state, strict=True)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SeqssmError(f"{path}: cannot read JSON: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError, OSError: corrupt or truncated file
        raise SeqssmError(f"{path}: cannot read safetensors file: {e}") from None


def _read_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a pickle of tensors at all (corrupt, or some other format)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SeqssmError(f"{path}: not a readable torch checkpoint ({reason})") from None
        raise SeqssmError(
            f"{path}: refusing to load: the file holds a pickled Python object ({found.group(1)}) that "
            "torch.load(weights_only=True) will not rebuild, and seqssm never unpickles arbitrary objects. "
            "Re-save its tensors as safetensors, or as a plain dict of tensors and plain values with torch.save"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SeqssmError(f"{path}: cannot read torch checkpoint: {e}") from None


# ----------------------------------------------------------------------------------------------
# saving


def prepare_model_target(directory) -> Path:
    """Absolute path of a model directory about to be (re)written; refuses to replace a directory
    holding anything but model files, so a wrong -o never deletes a user's data."""
    target = Path(directory).expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            raise SeqssmError(f"{target}: exists and is not a directory")
        extra = sorted(p.name for p in target.iterdir() if p.name not in MODEL_FILES)
        if extra:
            raise SeqssmError(f"{target}: refusing to replace a directory holding other files ({', '.join(extra[:_SHOW])})")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def save_model(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: DNATokenizer,
    info: dict | None = None,
    n_as_pad: bool = False,
) -> Path:
    """Write a seqssm model directory atomically; return its path.

    `model`: a HyenaDNAForCausalLM or a CaduceusForMaskedLM. Files: config.json,
    model.safetensors (each shared tensor once), tokenizer.json and, when `info` is given,
    training.json (without the "source"/"format" keys that load_model adds). A Caduceus config.json
    is the reference's (CaduceusConfig.to_hf_dict, so the directory also loads as a HuggingFace
    checkpoint) plus "seqssm_version" and "seqssm_n_as_pad" (`n_as_pad`: the model was trained with
    N fed as [PAD], see LoadedModel.n_as_pad; HyenaDNA ignores it).
    Everything is written to a temporary directory beside the target, then renamed into place.
    An existing target is replaced only if it holds nothing but these files.
    """
    caduceus = _is_caduceus(model)
    if not caduceus and not isinstance(model, HyenaDNAForCausalLM):
        raise TypeError(f"save_model: expected a HyenaDNAForCausalLM or CaduceusForMaskedLM, got {type(model).__name__}")
    if not isinstance(tokenizer, DNATokenizer):
        raise TypeError(f"save_model: expected a DNATokenizer, got {type(tokenizer).__name__}")
    from safetensors.torch import save_file

    from seqssm import __version__

    target = prepare_model_target(directory)

    if caduceus:
        config = {**model.config.to_hf_dict(), "seqssm_version": __version__, "seqssm_n_as_pad": bool(n_as_pad)}
    else:
        config = {"model_type": MODEL_TYPE, "seqssm_version": __version__, **model.config.to_dict()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_json(tmp / "config.json", config)
        save_file(_unique_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "tokenizer.json", tokenizer.to_dict())
        if info is not None:
            _write_json(tmp / "training.json", {k: v for k, v in info.items() if k not in ("source", "format")})
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (first name wins), contiguous, on the CPU."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def _replace_dir(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _json_default(o):
    if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
        return o.item()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
