"""HyenaDNA (Nguyen et al. 2023): a causal DNA language model built from Hyena mixers.

    input_ids [B, L]
      -> word embeddings (vocabulary padded to a multiple of 8)        HyenaEmbeddings
      -> embed dropout
      -> n_layer x  r = r + Hyena(LN(r));  r = r + MLP(LN(r))           HyenaBlock (pre-norm)
      -> final LayerNorm                                               hidden [B, L, d_model]
      -> lm_head (tied to the word embeddings unless a checkpoint has its own)   logits

Module names follow the HuggingFace port (LongSafari/hyenadna-*-hf), so its state dict keys
`backbone.*` (HyenaDNAModel) and `hyena.backbone.*` (HyenaDNAForCausalLM) load here after
stripping a prefix, and the original Lightning `model.backbone.*` keys likewise.

Numerics follow the HF code in eval mode: the residual stream is kept in float32, the long
convolution runs in float32 (also under autocast), GELU is the tanh approximation.
Dropout follows the original HyenaDNA training code (the HF port builds `embed_dropout` but never
applies it): embed_dropout on the embeddings, resid_dropout on each branch before its residual add,
hyena_dropout on the gated input of the long convolution. `hyena_filter_dropout` is accepted for
config compatibility and, as in both references, not applied.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seqssm.errors import SeqssmError
from seqssm.layers.hyena import HyenaOperator
from seqssm.models.hyena_lean import LeanHyenaInference


@dataclass
class HyenaConfig:
    """Hyperparameters; field names and defaults are those of the HF HyenaDNA config.json."""

    vocab_size: int = 12
    d_model: int = 256
    n_layer: int = 12
    d_inner: int | None = None  # MLP width; None -> 4 * d_model
    max_seq_len: int = 1024  # filters exist for positions < max_seq_len only
    emb_dim: int = 3  # positional features of the filter MLP (odd: time + cos/sin bands)
    filter_order: int = 64  # width of the filter MLP
    short_filter_order: int = 3
    hyena_order: int = 2
    activation_freq: float = 1  # initial `freq` of the sine activations
    num_inner_mlps: int = 2
    train_freq: bool = True
    use_bias: bool = True  # skip term D of the long convolution
    pad_vocab_size_multiple: int = 8
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    embed_dropout: float = 0.1
    hyena_dropout: float = 0.0
    hyena_filter_dropout: float = 0.0  # not applied (as in the references)
    resid_dropout: float = 0.0
    modulation_shift: float = 0.05  # h(t) *= exp(-t|delta|) + shift; 0.05 in the HF port
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.d_inner is None:
            self.d_inner = 4 * self.d_model
        if self.hyena_order != 2:
            raise ValueError(f"hyena_order {self.hyena_order}: only order 2 is implemented")
        if self.emb_dim < 3 or self.emb_dim % 2 == 0:
            raise ValueError(f"emb_dim {self.emb_dim}: must be odd and at least 3")
        for name in ("vocab_size", "d_model", "n_layer", "d_inner", "max_seq_len", "filter_order",
                     "short_filter_order", "pad_vocab_size_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HyenaConfig":
        """Build from a config dict, ignoring keys that are not fields (HF bookkeeping, model_type...)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class HyenaEmbeddings(nn.Module):
    def __init__(self, config: HyenaConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class HyenaMlp(nn.Module):
    def __init__(self, config: HyenaConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_inner)
        self.fc2 = nn.Linear(config.d_inner, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class HyenaBlock(nn.Module):
    """Pre-norm block on a float32 residual stream: r += Hyena(LN(r)); r += MLP(LN(r))."""

    def __init__(self, config: HyenaConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mixer = HyenaOperator(
            config.d_model,
            config.max_seq_len,
            order=config.hyena_order,
            filter_order=config.filter_order,
            emb_dim=config.emb_dim,
            short_filter_order=config.short_filter_order,
            num_inner_mlps=config.num_inner_mlps,
            activation_freq=config.activation_freq,
            train_freq=config.train_freq,
            use_bias=config.use_bias,
            dropout=config.hyena_dropout,
            modulation_shift=config.modulation_shift,
        )
        self.dropout1 = nn.Dropout(config.resid_dropout)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mlp = HyenaMlp(config)
        self.dropout2 = nn.Dropout(config.resid_dropout)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        h = self.mixer(self.norm1(residual.to(self.norm1.weight.dtype)))
        residual = self.dropout1(h) + residual
        h = self.mlp(self.norm2(residual.to(self.norm2.weight.dtype)))
        return self.dropout2(h) + residual


class HyenaDNAModel(nn.Module):
    """The backbone: input_ids [B, L] -> hidden states [B, L, d_model] (after the final norm)."""

    def __init__(self, config: HyenaConfig):
        super().__init__()
        self.config = config
        self.embeddings = HyenaEmbeddings(config)
        self.dropout = nn.Dropout(config.embed_dropout)
        self.layers = nn.ModuleList(HyenaBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.apply(self._init_weights)
        # GPT-2 style: scale down the projections that write into the residual stream.
        std = config.initializer_range / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("mixer.out_proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=std)
        # Inference (eval mode, no autograd) goes through the bounded-memory staged path;
        # set to None to run the reference layer-by-layer code below instead.
        self.lean: LeanHyenaInference | None = LeanHyenaInference()
        # Training at long lengths: keep only each block's input and recompute the block in the
        # backward pass (a million-token step then needs one block's activations, not all of them).
        self.gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        L = input_ids.shape[1]
        if L > self.config.max_seq_len:
            raise SeqssmError(
                f"input length {L} exceeds the model's maximum length {self.config.max_seq_len} "
                "(its long filters are defined only that far): cut the sequence into windows"
            )
        if L == 0:
            raise ValueError("input_ids has length 0")
        if input_ids.dtype not in (torch.long, torch.int):
            input_ids = input_ids.long()
        if self.lean is not None and not self.training and not torch.is_grad_enabled():
            return self.lean(self, input_ids)
        residual = self.dropout(self.embeddings(input_ids)).float()
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                residual = checkpoint(layer, residual, use_reentrant=False)
            else:
                residual = layer(residual)
        return self.ln_f(residual.to(self.ln_f.weight.dtype))


class HyenaDNAForCausalLM(nn.Module):
    """Backbone + linear head: input_ids [B, L] -> next-token logits [B, L, padded_vocab] (float32)."""

    def __init__(self, config: HyenaConfig):
        super().__init__()
        self.config = config
        self.backbone = HyenaDNAModel(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()
        else:
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.backbone.embeddings.word_embeddings.weight
        self.config.tie_word_embeddings = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.backbone(input_ids)).float()
