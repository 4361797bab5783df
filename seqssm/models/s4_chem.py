"""The S4 chemical language model (Ozcelik, de Ruiter, Criscuolo & Grisoni, Nat. Commun. 2024).

    tokens [B, L] -> embedding -> n_blocks x [S4, S4, FF] (pre-norm residual) -> norm -> logits [B, L, V]

    block:  x = x + dropout(S4(norm(x)))
            x = x + dropout(S4(norm(x)))
            x = x + dropout(FF(norm(x)))          FF = Linear(H, 4H), GELU, dropout, Linear(4H, H)

    S4 (seqssm.layers.s4): SSM convolution + D skip, GELU, dropout, Linear(H, 2H), GLU.

Published defaults, checked against the authors' code (molML/s4-for-de-novo-drug-design,
S4forDenovoDesign and the module_library it builds): d_model 256, 4 blocks, d_state 64 (32 complex
conjugate pairs), dropout 0.25 everywhere, 100 tokens with <bos> and <eos> (99 inputs), HiPPO-LegS
NPLR kernel of rank 1, bilinear discretisation, dt in [0.001, 0.1], GELU (exact), no input dropout,
identity pooling, residual weights 1. Deliberate choices, each noted:

* n_ssm = 1, as the published model: the S4 layers are built with n_ssm=1, so A (w, P) and B are
  one set shared by the 256 channels of a layer; dt, C and D are per channel. (The generic S4
  default is one SSM per channel; set n_ssm = d_model for that.)
* Norms: the reference's "layer" normalisation on its (B, H, L) layout is a LayerNorm over the
  channels with ONE scalar gain and ONE scalar shift, y = s (x - mean + m) / std (TransposedLN with
  scalar=True), not nn.LayerNorm's per-channel affine. `ScalarLayerNorm` reproduces it, adding
  eps = 1e-5 to the variance (the reference divides by the bare std).
* The learned C of the NPLR layers is C~ = C (I - dA^max_len) for the kernel length max_len, as the
  reference does after its first forward (it fixes the length lazily, at 99); here the length is
  max_len from the start and the conversion is done at initialisation.
* Kernel "diag" is S4D (ZOH, S4D-LegS init), an option the published model does not use.
* The kernel is computed in float64 (it is H x L numbers) and the FFT convolution in float32.
* Optimisation (the trainer's business): the reference trains everything with Adam, lr 1e-3, no
  weight decay; its SSM parameters carry {"weight_decay": 0} only. Here they carry
  `_optim = {"weight_decay": 0.0, "lr": 0.001}` and are listed by S4Layer.ssm_parameters().

Parameter count of the default config (d_model 256, 4 blocks, d_state 64, n_ssm 1), V = vocabulary:
4 blocks x 822,918 (2 S4 layers of 148,672, FF 525,568, 3 norms of 2) + final norm 2 + embedding
and head 513 V  =  3,291,674 + 513 V,  e.g. 3,310,655 for V = 37 (the reference's default
vocabulary size). The same sum over the reference's architecture (S4: C 16,384, log_dt 256, B 64,
P 64, A 64, D 256, output Linear 131,584; FF 525,568; 2 per scalar norm) gives the same figure;
tests/test_s4_chem_model.py checks it (and the n_ssm = d_model variant).

Recurrent mode: `setup_step()` then `default_state()` and `step()` per token; one state per S4
layer ([B, H, 32] complex64 for the defaults). `recurrent_parameters()` gives each S4 layer's
discrete recurrence for a fused sampler: kind "diag" (x <- dA x + dB u, y = 2 Re(dC . x) + D u)
for kernel "diag"; kind "dplr" (the exact O(N) bilinear step, see seqssm.ops.s4_kernel.
DPLRRecurrence) for "nplr", whose diagonalisation is numerically useless near the LegS init in
complex64 (see seqssm.ops.s4_kernel).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.errors import InputError, SeqssmError
from seqssm.layers.s4 import S4Layer
from seqssm.models.int8 import QUANTIZATION, dequantize_state, quantize_state

MODEL_TYPE = "s4-chem"
CONFIG_FILE, WEIGHTS_FILE, INFO_FILE = "config.json", "model.safetensors", "info.json"


@dataclass
class S4ChemConfig:
    vocab_size: int
    d_model: int = 256
    n_blocks: int = 4  # each block = S4, S4, FF (pre-norm residual)
    d_state: int = 64  # N: 32 complex conjugate pairs
    dropout: float = 0.25
    max_len: int = 100  # tokens including bos and eos
    ff_expand: int = 4
    kernel: str = "nplr"  # "nplr" (S4, HiPPO-LegS) or "diag" (S4D-LegS)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    model_type: str = MODEL_TYPE
    n_ssm: int = 1  # independent (A, B) per S4 layer; 1 as published, d_model for one per channel

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        for name in ("vocab_size", "d_model", "n_blocks", "ff_expand", "n_ssm"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.d_state, int) or self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state must be an even integer >= 2, got {self.d_state!r}")
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 (bos + eos), got {self.max_len!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.kernel not in ("nplr", "diag"):
            raise ValueError(f"kernel must be 'nplr' or 'diag', got {self.kernel!r}")
        if self.d_model % self.n_ssm:
            raise ValueError(f"n_ssm ({self.n_ssm}) must divide d_model ({self.d_model})")
        ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, i in ids.items():
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, {self.vocab_size}), got {i!r}")
        if len(set(ids.values())) != 3:
            raise ValueError(f"pad_id, bos_id and eos_id must differ, got {ids}")


class ScalarLayerNorm(nn.Module):
    """Normalise over the last dimension, then one scalar gain s and shift m: s (x - mean + m) / std.

    The reference's LayerNorm (module_library TransposedLN, scalar=True); eps added to the variance.
    Computed in float32 at least, also under autocast.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        var, mean = torch.var_mean(x32, dim=-1, unbiased=False, keepdim=True)
        return (x32 - mean + self.m) * (self.s * torch.rsqrt(var + self.eps))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, expand: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, expand * d_model)
        self.fc2 = nn.Linear(expand * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class S4ChemBlock(nn.Module):
    """S4, S4, FF, each as x + dropout(layer(norm(x)))."""

    def __init__(self, cfg: S4ChemConfig):
        super().__init__()

        def s4() -> S4Layer:
            return S4Layer(cfg.d_model, cfg.d_state, mode=cfg.kernel, dropout=cfg.dropout, l_max=cfg.max_len,
                           n_ssm=cfg.n_ssm)

        self.norm1, self.s4_1 = ScalarLayerNorm(), s4()
        self.norm2, self.s4_2 = ScalarLayerNorm(), s4()
        self.norm3, self.ff = ScalarLayerNorm(), FeedForward(cfg.d_model, cfg.ff_expand, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.s4_1(self.norm1(x)))
        x = x + self.drop(self.s4_2(self.norm2(x)))
        return x + self.drop(self.ff(self.norm3(x)))

    def step(self, x: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        y, s1 = self.s4_1.step(self.norm1(x), state[0])
        x = x + self.drop(y)
        y, s2 = self.s4_2.step(self.norm2(x), state[1])
        x = x + self.drop(y)
        return x + self.drop(self.ff(self.norm3(x))), [s1, s2]


class S4ChemLM(nn.Module):
    """Next-token model over SMILES tokens: forward() convolves, step() recurs; they agree."""

    def __init__(self, cfg: S4ChemConfig):
        super().__init__()
        cfg.validate()  # fields may have been set after construction
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([S4ChemBlock(cfg) for _ in range(cfg.n_blocks)])
        self.norm = ScalarLayerNorm()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def s4_layers(self) -> list[S4Layer]:
        return [layer for b in self.blocks for layer in (b.s4_1, b.s4_2)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L <= max_len) -> logits [B, L, V]; position t sees tokens[:, :t+1] only."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.cfg.max_len}")
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    # -- recurrent mode -------------------------------------------------------------------------

    def setup_step(self, *, diagonalize: bool | None = None) -> None:
        """Discretise every S4 layer for step() (cached; recomputed only after the parameters change)."""
        for layer in self.s4_layers():
            layer.setup_step(diagonalize=diagonalize)

    def default_state(self, batch: int, device=None, dtype: torch.dtype | None = None, *,
                      mode: str = "recurrent") -> list:
        """Zero states, one per S4 layer (in block order). ``mode="recurrent"``: [batch, d_model, M]
        complex SSM states; ``mode="history"``: the convolution-history form (S4Layer.KernelHistory),
        the same outputs at lower cost on CPUs for short sequences."""
        if mode == "history":
            return [layer.history_state(batch, device=device) for layer in self.s4_layers()]
        if mode != "recurrent":
            raise ValueError(f"mode must be 'recurrent' or 'history', got {mode!r}")
        return [layer.default_state(batch, device=device, dtype=dtype) for layer in self.s4_layers()]

    def step(self, token: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """token [B] (the latest input) -> (logits [B, V] for the next one, new state). Use eval mode."""
        if len(state) != 2 * len(self.blocks):
            raise ValueError(f"state must have {2 * len(self.blocks)} entries (one per S4 layer), got {len(state)}")
        x = self.embedding(token)
        new_state = []
        for i, block in enumerate(self.blocks):
            x, s = block.step(x, state[2 * i : 2 * i + 2])
            new_state += s
        return self.lm_head(self.norm(x)), new_state

    def recurrent_parameters(self) -> list[dict]:
        """Per S4 layer (block order): {"kind", the recurrence's tensors, "D"}; see S4Layer."""
        return [layer.recurrent_parameters() for layer in self.s4_layers()]

    # -- files ----------------------------------------------------------------------------------

    def save_pretrained(self, directory, *, tokenizer=None, info: dict | None = None, int8: bool = False) -> None:
        """Write config.json, model.safetensors (+ vocab.json via tokenizer.save, info.json).

        int8: store the weight matrices rounded to int8 with a scale per row (seqssm.models.int8),
        half the size of float16; from_pretrained dequantises them. Check the model's quality
        after rounding: this is lossy.

        Written into a temporary directory beside `directory`, which then replaces it: a reader
        sees the old model or the new one, and an interrupted save leaves the old one in place.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise SeqssmError(f"{directory}: exists and is not a directory; cannot save a model there")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
            metadata = {"format": "pt", "model_type": MODEL_TYPE}
            if int8:
                tensors = quantize_state(tensors)
                metadata["quantization"] = QUANTIZATION
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
            if tokenizer is not None:
                tokenizer.save(tmp)
            if info is not None:
                (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:12]}")
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "S4ChemLM":
        """Load a directory written by save_pretrained (safetensors only), in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(directory, "not found" if not directory.exists() else "not a directory")
        cfg_path = directory / CONFIG_FILE
        if not cfg_path.is_file():
            raise InputError(directory, f"no {CONFIG_FILE}: not a saved S4 chemical language model")
        try:
            raw = json.loads(cfg_path.read_text())
        except (ValueError, OSError) as e:
            raise InputError(cfg_path, f"unreadable model configuration ({e})") from None
        if not isinstance(raw, dict):
            raise InputError(cfg_path, "the model configuration is not a JSON object")
        if raw.get("model_type") != MODEL_TYPE:
            raise InputError(directory, f"model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}: "
                                        "not an S4 chemical language model")
        known = {f.name for f in fields(S4ChemConfig)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(cfg_path, f"unknown configuration fields {unknown} (written by a newer seqssm?)")
        try:
            cfg = S4ChemConfig(**raw)
        except (TypeError, ValueError) as e:
            raise InputError(cfg_path, f"invalid model configuration: {e}") from None
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise InputError(directory, f"no {WEIGHTS_FILE}")
        try:
            tensors = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise InputError(weights, f"unreadable weights ({e})") from None
        try:
            tensors = dequantize_state(tensors)
        except ValueError as e:
            raise InputError(weights, str(e)) from None
        model = cls(cfg)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            parts = [f"{what} {keys[:5]}{' ...' if len(keys) > 5 else ''}" for what, keys in found if keys]
            raise InputError(weights, "weights do not match config.json: " + "; ".join(parts))
        model.load_state_dict(tensors)
        return model.to(map_location).eval()


def sequence_log_likelihood(model: S4ChemLM, tokens: torch.Tensor, lengths) -> torch.Tensor:
    """log p(tokens[b, 1:lengths[b]] | tokens[b, 0]) = sum over t = 1 .. length-1 of log p(token_t | <t).

    tokens [B, L] start with bos; lengths [B] count bos and eos (positions >= length are padding
    and ignored). Returns [B] float32 (natural log). Runs the model in convolution mode on
    tokens[:, :-1] under whatever grad/autocast mode the caller set.
    """
    lengths = torch.as_tensor(lengths, device=tokens.device)
    if lengths.shape != tokens.shape[:1]:
        raise ValueError(f"lengths must be [batch={tokens.shape[0]}], got shape {tuple(lengths.shape)}")
    if tokens.shape[1] < 2:
        return torch.zeros(tokens.shape[0], device=tokens.device)
    if bool((lengths > tokens.shape[1]).any()) or bool((lengths < 1).any()):
        raise ValueError(f"lengths must lie in [1, {tokens.shape[1]}]")
    logp = torch.log_softmax(model(tokens[:, :-1]).float(), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [B, L-1]: log p(token_t | <t), t = 1..L-1
    t = torch.arange(1, tokens.shape[1], device=tokens.device)
    return torch.where(t[None, :] < lengths[:, None], picked, torch.zeros_like(picked)).sum(-1)
