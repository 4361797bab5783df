"""Sequence-level heads on a DNA backbone (HyenaDNA, or Caduceus / Mamba), and the fine-tuned model directory.

    input_ids [B, L] (right-padded with PAD), lengths [B]
      -> backbone features                                     hidden [B, L, d_model]
      -> pooling over each sequence's own positions            pooled [B, d_model] (flatten: [B, L * d_model])
      -> dropout -> Linear                                     logits [B, n_outputs]

Backbones (SequenceClassifier.architecture, from the config's type):
  hyenadna  HyenaDNAModel: the hidden states of the causal HyenaDNA.
  caduceus  CaduceusBackbone (seqssm.models.caduceus), any of its variants: bidirectional BiMamba
            (Caduceus-Ph), RC-equivariant (Caduceus-PS, rcps) or causal Mamba. Features: the
            hidden states, and for Caduceus-PS the strand-invariant (forward half +
            channel-flipped reverse-complement half) / 2 of CaduceusBackbone.embed, the
            embeddings `seqssm embed` gives. Models pretrained with N fed as [PAD] (n_as_pad,
            seqssm.models.io.LoadedModel) get their inputs the same way here.

Right padding is exact: a row's logits in a padded batch are those of the row alone (up to float
rounding). HyenaDNA is causal: the hidden state at t < length depends on positions 0..t only. A
Caduceus gets the lengths: its right-to-left scans reverse each row within its own length, so
they read the padding last too (CaduceusBackbone.forward).

Pooling:
  mean   mean of the features over the sequence's positions;
  last   the features of the last base (for a causal backbone the only position that has seen the
         whole sequence; for a bidirectional one, just the last base's state);
  both   the mean-pooled forward pass averaged with the mean-pooled pass over the reverse
         complement (each sequence reverse-complemented within its own length): the logits of x
         and of rc(x) are the same, so the model is strand-symmetric by construction;
  flatten  the features of every position side by side, divided by the length: a weight vector
         per position (HeadConfig.length, which every input must have), for aligned inputs in
         which where a motif sits matters (promoters around a TSS, windows centred on a site). With all
         position weights equal it is mean pooling, hence the 1/length: AdamW's steps move the
         logits as fast as they do under mean pooling, not length times faster.
A Caduceus-PS with mean pooling is strand-symmetric already (its features of rc(x) are those of x
reversed in position), so "both" is "mean" there (no second pass), and rc averaging is a no-op
(``strand_invariant``).

Outputs (``predict_proba``): binary -> P(class 1) [B]; multiclass -> softmax [B, C];
multilabel -> sigmoid per label [B, T]; regression -> values [B, T] in the units of the
training targets (the head learns standardised targets; the mean and standard deviation are
kept in the HeadConfig).

A fine-tuned model directory is a seqssm model directory (config.json, model.safetensors,
tokenizer.json, training.json): config.json holds the backbone config plus "head" (HeadConfig)
and "preprocessing" (how inputs were made: length, input kind, label columns...); its
"model_type" ("hyenadna" or "caduceus") names the architecture. HyenaDNA: the flat HyenaConfig
(as it always was); Caduceus: the reference config (CaduceusConfig.to_hf_dict) plus
"seqssm_n_as_pad", as save_model writes it. model.safetensors holds ``backbone.*`` and ``head.*``
(for Caduceus, ``backbone.*`` are the keys of the reference's `Caduceus` model). ``load_finetuned``
rebuilds the classifier; ``seqssm.models.load_model`` reads the same directory as a plain
backbone (the head keys are ignored; the LM head is the tied embedding matrix), which is what
``seqssm embed`` needs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from seqssm.errors import SeqssmError
from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM, pretraining_inputs
from seqssm.models.hyena import HyenaConfig, HyenaDNAForCausalLM, HyenaDNAModel
from seqssm.models.io import CADUCEUS, MODEL_TYPE as HYENADNA  # architectures, as config.json's model_type
from seqssm.tokenizers.dna import COMPLEMENT_LUT, PAD, VOCAB_SIZE, DNATokenizer

TASKS = ("binary", "multiclass", "multilabel", "regression")
POOLINGS = ("mean", "last", "both", "flatten")
HEAD_PREFIX = "head."

__all__ = [
    "TASKS", "POOLINGS", "HeadConfig", "SequenceHead", "SequenceClassifier", "batch_examples",
    "reverse_complement_padded", "save_finetuned", "load_finetuned", "is_finetuned", "architecture_of_config",
    "new_backbone", "lm_backbone",
]


@dataclass
class HeadConfig:
    """What the head predicts and how it pools; saved as config.json["head"]."""

    task: str
    n_outputs: int
    pooling: str = "mean"
    label_names: list[str] = field(default_factory=list)
    dropout: float = 0.1
    length: int | None = None  # flatten pooling only: the one input length the head takes
    # regression only: the head predicts (y - mean) / std; predict_proba returns y
    target_mean: list[float] | None = None
    target_std: list[float] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.n_outputs = int(self.n_outputs)
        if self.n_outputs < 1:
            raise ValueError(f"n_outputs must be >= 1, got {self.n_outputs}")
        if self.task == "binary" and self.n_outputs != 1:
            raise ValueError(f"a binary head has one output (the logit of class 1), got {self.n_outputs}")
        if self.task == "multiclass" and self.n_outputs < 2:
            raise ValueError(f"a multiclass head needs >= 2 outputs, got {self.n_outputs}")
        if self.pooling == "flatten":
            if self.length is None or int(self.length) < 1:
                raise ValueError(f"flatten pooling needs the input length (>= 1), got {self.length}")
            self.length = int(self.length)
        elif self.length is not None:
            raise ValueError(f"length is for flatten pooling only (pooling {self.pooling!r})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be within [0, 1), got {self.dropout}")
        self.label_names = [str(n) for n in self.label_names]
        for name in ("target_mean", "target_std"):
            v = getattr(self, name)
            if v is not None:
                v = [float(x) for x in v]
                if len(v) != self.n_outputs:
                    raise ValueError(f"{name} has {len(v)} values for {self.n_outputs} outputs")
                setattr(self, name, v)

    @property
    def n_classes(self) -> int:
        """Classes of a classification task (binary: 2); outputs of a regression/multilabel one."""
        return 2 if self.task == "binary" else self.n_outputs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# batching and reverse complement of right-padded batches


def batch_examples(ids_list, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id arrays with PAD: (ids LongTensor [B, Lmax], lengths LongTensor [B]).

    ``pad_to`` fixes the padded length (at least the longest sequence).
    """
    lengths = [int(len(a)) for a in ids_list]
    if not lengths:
        raise ValueError("batch_examples: no sequences")
    if min(lengths) < 1:
        raise ValueError("batch_examples: a sequence has length 0")
    width = max(lengths)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"batch_examples: pad_to {pad_to} is shorter than the longest sequence ({width})")
        width = int(pad_to)
    out = np.full((len(lengths), width), PAD, dtype=np.int64)
    for i, a in enumerate(ids_list):
        out[i, : lengths[i]] = np.asarray(a)
    return torch.from_numpy(out), torch.tensor(lengths, dtype=torch.long)


def reverse_complement_padded(input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse complement of each row within its own length; the padding stays at the right."""
    L = input_ids.shape[1]
    pos = torch.arange(L, device=input_ids.device)
    lengths = lengths.to(input_ids.device).long()
    src = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)
    lut = torch.as_tensor(COMPLEMENT_LUT[:VOCAB_SIZE].astype(np.int64), device=input_ids.device)
    rc = lut[input_ids.long().gather(1, src)]
    return torch.where(pos[None, :] < lengths[:, None], rc, torch.full_like(rc, PAD)).to(input_ids.dtype)


def _check_batch(input_ids: torch.Tensor, lengths: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if lengths.shape != (input_ids.shape[0],):
        raise ValueError(f"lengths must be [batch={input_ids.shape[0]}], got shape {tuple(lengths.shape)}")


# ----------------------------------------------------------------------------------------------
# the model


class SequenceHead(nn.Module):
    """pooled [B, d_model] (flatten: [B, length * d_model]) -> dropout -> Linear -> logits [B, n_outputs]."""

    def __init__(self, d_model: int, config: HeadConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        width = d_model * config.length if config.pooling == "flatten" else d_model
        self.proj = nn.Linear(width, config.n_outputs)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(pooled))


def architecture_of_config(config) -> str:
    """"caduceus" for a CaduceusConfig, "hyenadna" for a HyenaConfig."""
    if isinstance(config, CaduceusConfig):
        return CADUCEUS
    if isinstance(config, HyenaConfig):
        return HYENADNA
    raise TypeError(f"expected a HyenaConfig or CaduceusConfig, got {type(config).__name__}")


def new_backbone(config) -> nn.Module:
    """A randomly initialised backbone of the architecture (Caduceus: the reference's initialisation)."""
    if architecture_of_config(config) == CADUCEUS:
        return CaduceusForMaskedLM(config).caduceus.backbone
    return HyenaDNAModel(config)


def lm_backbone(lm: nn.Module) -> nn.Module:
    """The backbone a classifier wraps, of a language model as load_model gives it (shared, not copied)."""
    if isinstance(lm, CaduceusForMaskedLM):
        return lm.caduceus.backbone
    if isinstance(lm, HyenaDNAForCausalLM):
        return lm.backbone
    raise TypeError(f"expected a HyenaDNAForCausalLM or CaduceusForMaskedLM, got {type(lm).__name__}")


class SequenceClassifier(nn.Module):
    """DNA backbone + pooling + linear head (classification, multi-label or regression).

    ``config``: a HyenaConfig (backbone: HyenaDNAModel) or a CaduceusConfig (backbone:
    CaduceusBackbone); ``backbone``: a pretrained one (see lm_backbone), else a fresh one.
    ``n_as_pad``: feed N as [PAD], as the published Caduceus checkpoints were pretrained.
    """

    def __init__(self, config, head_config: HeadConfig, backbone: nn.Module | None = None, *, n_as_pad: bool = False):
        super().__init__()
        self.architecture = architecture_of_config(config)
        self.config = config
        self.head_config = head_config
        self.n_as_pad = bool(n_as_pad)
        self.backbone = backbone if backbone is not None else new_backbone(config)
        self.head = SequenceHead(config.d_model, head_config)
        if head_config.target_mean is not None:
            self.register_buffer("target_mean", torch.tensor(head_config.target_mean), persistent=False)
            self.register_buffer("target_std", torch.tensor(head_config.target_std or [1.0] * head_config.n_outputs),
                                 persistent=False)
        else:
            self.target_mean = self.target_std = None

    @property
    def rc_equivariant(self) -> bool:
        """The features of rc(x) are those of x reversed in position (Caduceus-PS)."""
        return self.architecture == CADUCEUS and bool(self.config.rcps)

    @property
    def strand_invariant(self) -> bool:
        """The outputs of x and of rc(x) agree by construction: "both" pooling, or a Caduceus-PS with
        mean pooling. Averaging over both strands (rc_average) would only repeat the work."""
        how = self.head_config.pooling
        return how == "both" or (how == "mean" and self.rc_equivariant)

    @property
    def max_length(self) -> int | None:
        """The longest input: HyenaDNA's filter length; None for Caduceus (no positional limit)."""
        return int(self.config.max_seq_len) if self.architecture == HYENADNA else None

    # -- features and pooling
    def features(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-position features [B, L, d_model] (float32) of right-padded rows; see the module docstring."""
        if self.architecture == HYENADNA:
            return self.backbone(input_ids).float()  # causal: the padding cannot reach a real position
        if self.n_as_pad:
            input_ids = pretraining_inputs(input_ids)
        return self.backbone.embed(input_ids, lengths=lengths)

    def _pool(self, hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
        hidden = hidden.float()
        if how == "flatten":
            L = self.head_config.length
            bad = lengths[lengths != L]
            if bad.numel():
                raise ValueError(f"flatten pooling takes sequences of exactly {L} bp, got one of {int(bad[0])}")
            return hidden[:, :L].reshape(hidden.shape[0], -1) / L
        if how == "last":
            idx = (lengths - 1).clamp(min=0)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        total = (hidden * mask[..., None]).sum(dim=1)
        return total / lengths.clamp(min=1)[:, None].to(total.dtype)

    def pool(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, d_model] (float32)."""
        _check_batch(input_ids, lengths)
        lengths = lengths.to(input_ids.device).long()
        how = self.head_config.pooling
        if how == "both" and self.rc_equivariant:
            how = "mean"  # mean pooling of rc(x) repeats that of x: no second pass
        if how != "both":
            return self._pool(self.features(input_ids, lengths), lengths, how)
        B = input_ids.shape[0]
        both = torch.cat([input_ids, reverse_complement_padded(input_ids, lengths)], dim=0)
        twice = torch.cat([lengths, lengths])
        pooled = self._pool(self.features(both, twice), twice, "mean")
        return 0.5 * (pooled[:B] + pooled[B:])

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_outputs] in float32 (regression: standardised values)."""
        return self.head(self.pool(input_ids, lengths)).float()

    # -- outputs
    def outputs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities (classification) or values in target units (regression)."""
        task = self.head_config.task
        logits = logits.float()
        if task == "binary":
            return torch.sigmoid(logits[:, 0])
        if task == "multiclass":
            return torch.softmax(logits, dim=-1)
        if task == "multilabel":
            return torch.sigmoid(logits)
        if self.target_mean is not None:
            return logits * self.target_std + self.target_mean
        return logits

    def predict_proba(self, input_ids: torch.Tensor, lengths: torch.Tensor, *, rc_average: bool = False) -> torch.Tensor:
        """Outputs of ``outputs_from_logits``; with ``rc_average`` the mean of those on x and on rc(x).

        A strand-invariant model (pooling "both", or a Caduceus-PS with mean pooling) is
        strand-symmetric already: rc_average changes nothing and costs nothing there.
        """
        out = self.outputs_from_logits(self(input_ids, lengths))
        if rc_average and not self.strand_invariant:
            rc = reverse_complement_padded(input_ids, lengths.to(input_ids.device))
            out = 0.5 * (out + self.outputs_from_logits(self(rc, lengths)))
        return out

    def backbone_parameters(self):
        return self.backbone.parameters()


# ----------------------------------------------------------------------------------------------
# the fine-tuned model directory


def is_finetuned(config: dict) -> bool:
    return isinstance(config, dict) and isinstance(config.get("head"), dict)


def save_finetuned(
    model: SequenceClassifier,
    directory: str | os.PathLike,
    *,
    tokenizer: DNATokenizer,
    preprocessing: dict,
    info: dict | None = None,
) -> Path:
    """Write a fine-tuned seqssm model directory atomically; return its path.

    config.json: the backbone's config with its "model_type" (HyenaDNA: {"model_type": "hyenadna",
    HyenaConfig fields}; Caduceus: CaduceusConfig.to_hf_dict() + "seqssm_n_as_pad"), with
    tie_word_embeddings true (the model has no LM head of its own), + "head": HeadConfig,
    "preprocessing": {...}; model.safetensors: ``backbone.*`` and ``head.*`` (each shared tensor
    once); tokenizer.json; training.json (``info``). Written into a temporary directory beside the
    target and renamed into place; an existing target is replaced only if it holds nothing but
    these files.
    """
    from safetensors.torch import save_file

    from seqssm import __version__
    from seqssm.models.io import MODEL_TYPE, _replace_dir, _unique_tensors, _write_json, prepare_model_target

    if not isinstance(model, SequenceClassifier):
        raise TypeError(f"save_finetuned: expected a SequenceClassifier, got {type(model).__name__}")
    if not isinstance(tokenizer, DNATokenizer):
        raise TypeError(f"save_finetuned: expected a DNATokenizer, got {type(tokenizer).__name__}")
    target = prepare_model_target(directory)

    if model.architecture == CADUCEUS:
        backbone = {**model.config.to_hf_dict(), "tie_word_embeddings": True, "seqssm_version": __version__,
                    "seqssm_n_as_pad": model.n_as_pad}
    else:
        backbone = {"model_type": MODEL_TYPE, "seqssm_version": __version__, **model.config.to_dict(),
                    "tie_word_embeddings": True}
    config = {**backbone, "head": model.head_config.to_dict(), "preprocessing": dict(preprocessing)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_json(tmp / "config.json", config)
        save_file(_unique_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "tokenizer.json", tokenizer.to_dict())
        _write_json(tmp / "training.json", {k: v for k, v in (info or {}).items() if k not in ("source", "format")})
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_finetuned(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, tokenizer, head_config, preprocessing, info) of a directory
    written by save_finetuned (or a bundled fine-tuned model by name).

    SeqssmError when the directory holds a model without a head.
    """
    from seqssm.models.io import (
        _build, _check_model_type, _config, _read_json, _read_safetensors, bundled_models,
    )

    text = os.fspath(path)
    bundled = bundled_models()
    d = bundled[text] if text in bundled else Path(text).expanduser()
    if not d.exists():
        raise SeqssmError(f"no model '{text}': no such file or directory")
    if not d.is_dir() or not (d / "config.json").is_file():
        raise SeqssmError(f"{d}: not a model directory (no config.json)")
    cfg = _read_json(d / "config.json")
    caduceus = isinstance(cfg, dict) and cfg.get("model_type") == CADUCEUS
    if not caduceus:
        _check_model_type(cfg, d / "config.json")
    if not is_finetuned(cfg):
        raise SeqssmError(f"{d}: not a fine-tuned model (no head in config.json); use seqssm embed for a "
                          "pretrained backbone")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise SeqssmError(f"{d}: incomplete fine-tuned model directory: {name} is missing")
    try:
        config = CaduceusConfig.from_dict(cfg) if caduceus else _config(cfg, d / "config.json")
        head_config = HeadConfig.from_dict(cfg["head"])
        tokenizer = DNATokenizer.from_dict(_read_json(d / "tokenizer.json"))
    except (TypeError, ValueError) as e:
        raise SeqssmError(f"{d}: bad fine-tuned model config: {e}") from None
    state = _read_safetensors(d / "model.safetensors")
    head_state = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    if caduceus:
        backbone = _caduceus_backbone(config, state, d / "model.safetensors")
    else:
        backbone = _build(config, state, d / "model.safetensors").backbone
    model = SequenceClassifier(config, head_config, backbone=backbone,
                               n_as_pad=caduceus and bool(cfg.get("seqssm_n_as_pad", False)))
    try:
        model.head.load_state_dict(head_state, strict=True)
    except RuntimeError as e:
        raise SeqssmError(f"{d / 'model.safetensors'}: head weights do not match the head config: "
                          f"{str(e).splitlines()[0]}") from None
    info = _read_json(d / "training.json") if (d / "training.json").is_file() else {}
    if not isinstance(info, dict):
        raise SeqssmError(f"{d / 'training.json'}: expected a JSON object")
    info.update(source=str(d), format="seqssm-finetuned")
    preprocessing = cfg.get("preprocessing") or {}
    model.to(device).eval()
    return model, tokenizer, head_config, dict(preprocessing), info


def _caduceus_backbone(config: CaduceusConfig, state: dict, source) -> nn.Module:
    """The CaduceusBackbone of ``state`` (keys ``backbone.*``, as the reference's `Caduceus`), loaded
    strictly as CaduceusForMaskedLM.from_pretrained loads it (tied LM head, complement maps checked)."""
    from seqssm.models.caduceus import _load_state, _normalize_keys

    config.tie_word_embeddings = True  # the directory holds no LM head
    lm = CaduceusForMaskedLM(config)
    _load_state(lm, _normalize_keys(state)[0], source)
    return lm.caduceus.backbone
