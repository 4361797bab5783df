"""Sequence-level heads on the HyenaDNA backbone, and the fine-tuned model directory.

    input_ids [B, L] (right-padded with PAD), lengths [B]
      -> backbone (causal HyenaDNAModel)                      hidden [B, L, d_model]
      -> pooling over each sequence's own positions            pooled [B, d_model]
      -> dropout -> Linear                                     logits [B, n_outputs]

Right padding is exact: the backbone is causal, so the hidden state at position t < length
depends on positions 0..t only, never on the PAD tokens after the sequence (up to float
rounding of an FFT of another size).

Pooling:
  mean   mean of the hidden states over the sequence's positions;
  last   the hidden state of the last base (the only one that has seen the whole sequence);
  both   the mean-pooled forward pass averaged with the mean-pooled pass over the reverse
         complement (each sequence reverse-complemented within its own length): the logits of x
         and of rc(x) are the same, so the model is strand-symmetric by construction.

Outputs (``predict_proba``): binary -> P(class 1) [B]; multiclass -> softmax [B, C];
multilabel -> sigmoid per label [B, T]; regression -> values [B, T] in the units of the
training targets (the head learns standardised targets; the mean and standard deviation are
kept in the HeadConfig).

A fine-tuned model directory is a seqssm model directory (config.json, model.safetensors,
tokenizer.json, training.json): config.json holds the backbone config plus "head" (HeadConfig)
and "preprocessing" (how inputs were made: length, input kind, label columns...);
model.safetensors holds ``backbone.*`` and ``head.*``. ``load_finetuned`` rebuilds the
classifier; ``seqssm.models.load_model`` reads the same directory as a plain backbone (the head
keys are ignored; the LM head is the tied embedding matrix), which is what ``seqssm embed`` needs.
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
from seqssm.models.hyena import HyenaConfig, HyenaDNAModel
from seqssm.tokenizers.dna import COMPLEMENT_LUT, PAD, VOCAB_SIZE, DNATokenizer

TASKS = ("binary", "multiclass", "multilabel", "regression")
POOLINGS = ("mean", "last", "both")
HEAD_PREFIX = "head."

__all__ = [
    "TASKS", "POOLINGS", "HeadConfig", "SequenceHead", "SequenceClassifier", "batch_examples",
    "reverse_complement_padded", "save_finetuned", "load_finetuned", "is_finetuned",
]


@dataclass
class HeadConfig:
    """What the head predicts and how it pools; saved as config.json["head"]."""

    task: str
    n_outputs: int
    pooling: str = "mean"
    label_names: list[str] = field(default_factory=list)
    dropout: float = 0.1
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
    """pooled [B, d_model] -> dropout -> Linear -> logits [B, n_outputs]."""

    def __init__(self, d_model: int, config: HeadConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.proj = nn.Linear(d_model, config.n_outputs)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(pooled))


class SequenceClassifier(nn.Module):
    """HyenaDNA backbone + pooling + linear head (classification, multi-label or regression)."""

    def __init__(self, config: HyenaConfig, head_config: HeadConfig, backbone: HyenaDNAModel | None = None):
        super().__init__()
        self.config = config
        self.head_config = head_config
        self.backbone = backbone if backbone is not None else HyenaDNAModel(config)
        self.head = SequenceHead(config.d_model, head_config)
        if head_config.target_mean is not None:
            self.register_buffer("target_mean", torch.tensor(head_config.target_mean), persistent=False)
            self.register_buffer("target_std", torch.tensor(head_config.target_std or [1.0] * head_config.n_outputs),
                                 persistent=False)
        else:
            self.target_mean = self.target_std = None

    # -- pooling
    def _pool(self, hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
        hidden = hidden.float()
        if how == "last":
            idx = (lengths - 1).clamp(min=0)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        total = (hidden * mask[..., None]).sum(dim=1)
        return total / lengths.clamp(min=1)[:, None].to(total.dtype)

    def pool(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled hidden states [B, d_model] (float32)."""
        _check_batch(input_ids, lengths)
        lengths = lengths.to(input_ids.device).long()
        how = self.head_config.pooling
        if how != "both":
            return self._pool(self.backbone(input_ids), lengths, how)
        B = input_ids.shape[0]
        both = torch.cat([input_ids, reverse_complement_padded(input_ids, lengths)], dim=0)
        pooled = self._pool(self.backbone(both), torch.cat([lengths, lengths]), "mean")
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

        With pooling "both" the model is already strand-symmetric and rc_average changes nothing.
        """
        out = self.outputs_from_logits(self(input_ids, lengths))
        if rc_average and self.head_config.pooling != "both":
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

    config.json: {"model_type": "hyenadna", backbone config fields (tie_word_embeddings true: the
    model has no LM head of its own), "head": HeadConfig, "preprocessing": {...}};
    model.safetensors: ``backbone.*`` and ``head.*`` (each shared tensor once); tokenizer.json;
    training.json (``info``). Written into a temporary directory beside the target and renamed
    into place; an existing target is replaced only if it holds nothing but these files.
    """
    from safetensors.torch import save_file

    from seqssm import __version__
    from seqssm.models.io import MODEL_TYPE, _replace_dir, _unique_tensors, _write_json, prepare_model_target

    if not isinstance(model, SequenceClassifier):
        raise TypeError(f"save_finetuned: expected a SequenceClassifier, got {type(model).__name__}")
    if not isinstance(tokenizer, DNATokenizer):
        raise TypeError(f"save_finetuned: expected a DNATokenizer, got {type(tokenizer).__name__}")
    target = prepare_model_target(directory)

    backbone = {**model.config.to_dict(), "tie_word_embeddings": True}
    config = {"model_type": MODEL_TYPE, "seqssm_version": __version__, **backbone,
              "head": model.head_config.to_dict(), "preprocessing": dict(preprocessing)}
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
    _check_model_type(cfg, d / "config.json")
    if not is_finetuned(cfg):
        raise SeqssmError(f"{d}: not a fine-tuned model (no head in config.json); use seqssm embed for a "
                          "pretrained backbone")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise SeqssmError(f"{d}: incomplete fine-tuned model directory: {name} is missing")
    config = _config(cfg, d / "config.json")
    try:
        head_config = HeadConfig.from_dict(cfg["head"])
        tokenizer = DNATokenizer.from_dict(_read_json(d / "tokenizer.json"))
    except (TypeError, ValueError) as e:
        raise SeqssmError(f"{d}: bad fine-tuned model config: {e}") from None
    state = _read_safetensors(d / "model.safetensors")
    head_state = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    lm = _build(config, {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}, d / "model.safetensors")
    model = SequenceClassifier(config, head_config, backbone=lm.backbone)
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
