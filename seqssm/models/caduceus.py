"""Caduceus (Schiff et al. 2024): a bidirectional Mamba DNA language model, optionally
reverse-complement equivariant (Caduceus-PS), trained by masked language modeling.

    input_ids [B, L]
      -> embeddings                      [B, L, d]      (RCPS: [B, L, 2d] = [forward | rc half])
      -> n_layer x  Block                residual add + norm, then BiMamba (RCPS: on both halves)
             BiMamba(h) = Mamba_fwd(h) + flip(Mamba_rev(flip(h)))    (or the product: "ew_multiply")
      -> residual add + final norm       hidden [B, L, d] (RCPS: [B, L, 2d])
      -> lm_head                         logits [B, L, padded vocab]; tied to the embeddings

Everything follows the public implementation (kuleshov-group/caduceus, caduceus/modeling_caduceus.py
and modeling_rcps.py) in computation and in state-dict keys, so the HuggingFace checkpoints
(kuleshov-group/caduceus-{ph,ps}_seqlen-131k_d_model-256_n_layer-16, ...) load as they are:

    caduceus.backbone.embeddings.word_embeddings.weight         (RCPS: .embedding.weight + .complement_map)
    caduceus.backbone.layers.{i}.mixer[.submodule].mamba_fwd.*  (mamba-ssm Mamba names: A_log, D,
    caduceus.backbone.layers.{i}.mixer[.submodule].mamba_rev.*   in_proj, conv1d, x_proj, dt_proj, out_proj)
    caduceus.backbone.layers.{i}.norm[.submodule].weight        (.submodule: RCPS without fused add-norm)
    caduceus.backbone.norm_f[.submodule].weight
    lm_head.weight                                              (RCPS: lm_head.lm_head.weight, lm_head.complement_map)

With bidirectional_weight_tie, mamba_rev's in_proj and out_proj are mamba_fwd's Parameters (the
state dict lists them under both names; a safetensors file may hold either); a tied lm_head is
the embedding matrix. Numerics reproduced: the residual add + norm follows the config's
fused_add_norm (mamba-ssm's fused-kernel semantics, or its unfused Block code; see
seqssm.layers.norm), including the reference's order of the two halves in the fused RCPS blocks
(seqssm.layers.rcps.rcps_fused_add_norm). In RCPS models the reverse-complement half is computed
with channel-reversed weights instead of reversed activations (BiMambaWrapper.forward_rc,
rcps_fused_add_norm): the same function, up to the order of float sums, with fewer copies of
[B, L, d] activations per layer (6 fewer); the literal formulas stay as tested twins (*_ref).

Recurrent mode (unbounded context). A causal model (bidirectional=False and rcps=False: a plain
Mamba stack) can walk a chromosome window by window in constant memory: `embed_stream(ids,
state)` returns the window's embeddings and the state after it (per layer, the last d_conv conv
inputs and the SSM state h), and the embeddings of any window equal those of one pass over the
whole prefix. Each window runs the parallel chunked scan started from the carried h (torch), or,
on CUDA, mamba-ssm's kernel (which has no initial-state input) plus the exact linear correction
C[t] . (exp(A * cumsum(delta)[t]) * h0) computed chunk by chunk in torch (see
seqssm.ops.selective_scan._scan_with_kernel; its cost stops once h0 has decayed to zero), or, on
CUDA without mamba-ssm, seqssm's Triton scan, which starts from h0 itself.
Bidirectional and RC-equivariant models read each window right to left too, so a position's
output depends on bases to its right: they cannot carry a state and raise an error in stream
mode; embed long sequences with them in overlapping windows (stride < window).

Tokens. Caduceus checkpoints use the HF character tokenizer of the reference
(CaduceusTokenizer): [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6, then
A=7 C=8 G=9 T=10 N=11; the config's vocab_size is padded to 16 (pad_vocab_size_multiple 8) and
its complement_map maps ids 7<->10 (A<->T) and 8<->9 (C<->G), every other id to itself. These are
exactly the ids of seqssm.tokenizers.dna (and its COMPLEMENT_LUT), so our token ids go into the
model unchanged. Differences of the tokenizers, not of the ids: the reference tokenizer appends
[SEP] (id 1) when asked for special tokens (embedding code usually does not), pads on the left,
and turns IUPAC ambiguity codes (R, Y, ...) into [UNK] (6) where ours gives N (11); both
uppercase soft-masked bases.

Embeddings. `embed` gives one vector per input position, aligned with the forward strand:
* Caduceus-PS (rcps): the final hidden state is [a | b] (2d channels), a = forward-strand
  features of each position, b = the reverse-complement strand's, stored channel-reversed
  (flipLC convention). The strand-invariant embedding of position t is (a[t] + flip_channels(b[t])) / 2:
  by equivariance, hidden(rc(x))[t] = flipLC(hidden(x))[L-1-t], so embed(rc(x)) = embed(x)
  reversed in position, exactly.
* Caduceus-Ph and other non-RCPS models: the hidden state itself [B, L, d]; with conjoin=True the
  post-hoc conjoined (0.5 * (hidden(x) + hidden(rc(x)) reversed in position)), equally
  strand-invariant, at twice the cost.
`embed_pooled` averages them over the positions (of each row's length).

Padded batches. Sequences of different lengths are batched right-padded, with their `lengths`.
A causal model never reads the padding before a real position, but a right-to-left scan
(bidirectional models, and the reverse-complement half of RCPS ones) would read it first. Given
`lengths`, those scans reverse each row within its own length instead (`_flip_rows`), so the
padding comes last in both directions and every row's states equal those of the row alone (up to
float rounding). The sequence classifier (seqssm.models.heads) relies on it.

Inputs as in pretraining. The published checkpoints were pretrained (hg38, MLM) on windows in
which every N had been replaced by [PAD] (id 4) and without a trailing [SEP]: the model never saw
token 11. `pretraining_inputs(ids)` applies that replacement; use it to feed genome windows the
way the model was trained.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from seqssm.errors import SeqssmError
from seqssm.layers.mamba import Block, Mamba, MambaState
from seqssm.layers.norm import RMSNorm, add_norm
from seqssm.models.io import _read_json, _read_safetensors, _read_torch, load_matching_state
from seqssm.layers.rcps import (
    RCPSAddNormWrapper,
    RCPSEmbedding,
    RCPSLMHead,
    RCPSMambaBlock,
    from_strands,
    rcps_fused_add_norm,
    strands_add_norm,
    to_strands,
)
from seqssm.ops.selective_scan import mixer_backend
from seqssm.ops.selective_scan_triton import gluon_fills_gpu
from seqssm.tokenizers.dna import COMPLEMENT_LUT, N, PAD, VOCAB_SIZE

MODEL_TYPE = "caduceus"
STRATEGIES = ("add", "ew_multiply")
MAMBA_OPTIONS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                 "dt_init_floor", "conv_bias", "bias", "use_fast_path")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARDED_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class CaduceusConfig:
    """Hyperparameters; field names and defaults are those of the reference CaduceusConfig (config.json).

    ssm_cfg holds the Mamba options (d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init,
    dt_scale, dt_init_floor, conv_bias, bias, use_fast_path); initializer_cfg initializer_range,
    rescale_prenorm_residual, n_residuals_per_layer. complement_map maps each token id to its
    complement's id ({"7": 10, ...} in config.json, ids 0..n-1 in order); ids beyond it (up to the
    padded vocabulary) are their own complement, as in the reference.
    """

    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict | None = None
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    norm_epsilon: float = 1e-5
    initializer_cfg: dict | None = None
    bidirectional: bool = True
    bidirectional_strategy: str | None = "add"
    bidirectional_weight_tie: bool = True
    rcps: bool = False
    complement_map: dict | None = None
    tie_word_embeddings: bool = True  # a PretrainedConfig default; the reference ties the LM head

    model_type: ClassVar[str] = MODEL_TYPE

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.bidirectional and self.bidirectional_strategy is None:
            self.bidirectional_strategy = "add"  # the reference's default
        if self.bidirectional and self.bidirectional_strategy not in STRATEGIES:
            raise ValueError(f"bidirectional_strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.bidirectional_strategy!r}")
        unknown = sorted(set(self.ssm_cfg or {}) - set(MAMBA_OPTIONS))
        if unknown:
            raise ValueError(f"ssm_cfg: unknown Mamba option(s) {', '.join(unknown)}")
        if self.complement_map is not None:
            cmap = dict(self.complement_map)
            if [str(k) for k in cmap] != [str(i) for i in range(len(cmap))]:
                raise ValueError("complement_map must list token ids 0, 1, 2, ... in order")
            if any(not 0 <= int(v) < max(len(cmap), self.padded_vocab_size) for v in cmap.values()):
                raise ValueError("complement_map maps an id outside the vocabulary")
            if len(cmap) > self.padded_vocab_size:
                raise ValueError(f"complement_map has {len(cmap)} ids for a vocabulary of {self.padded_vocab_size}")
            self.complement_map = {str(k): int(v) for k, v in cmap.items()}
        elif self.rcps:
            raise ValueError("an RC-equivariant model (rcps) needs a complement_map")

    @classmethod
    def dna(cls, d_model: int = 256, n_layer: int = 16, *, rcps: bool = True, bidirectional: bool = True,
            d_state: int = 16, **overrides) -> "CaduceusConfig":
        """A fresh model's config for seqssm's DNA tokens (the published models' settings otherwise).

        vocab_size 12 (padded to 16), complement_map from the tokenizer (A<->T, C<->G), fused
        add-norm, RMSNorm, residual in the activations' dtype, d_conv 4, expand 2. rcps=True:
        Caduceus-PS; rcps=False: Caduceus-Ph; bidirectional=False, rcps=False: a causal Mamba,
        which can stream (see the module docstring).
        """
        ssm_cfg = {"d_state": d_state, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001, "dt_max": 0.1,
                   "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4, "conv_bias": True, "bias": False,
                   "use_fast_path": True}
        kw = dict(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB_SIZE, ssm_cfg=ssm_cfg, rms_norm=True,
                  residual_in_fp32=False, fused_add_norm=True, pad_vocab_size_multiple=8, norm_epsilon=1e-5,
                  initializer_cfg={"initializer_range": 0.02, "rescale_prenorm_residual": True,
                                   "n_residuals_per_layer": 1},
                  bidirectional=bidirectional, bidirectional_strategy="add" if bidirectional else None,
                  bidirectional_weight_tie=True, rcps=rcps,
                  complement_map={str(i): int(COMPLEMENT_LUT[i]) for i in range(VOCAB_SIZE)})
        kw.update(overrides)
        return cls(**kw)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def complement_ids(self) -> list[int]:
        """complement of every id of the padded vocabulary (ids missing from the map: themselves)."""
        cmap = [int(v) for v in (self.complement_map or {}).values()]
        return cmap + list(range(len(cmap), self.padded_vocab_size))

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    def to_hf_dict(self) -> dict:
        """config.json as the reference writes it: vocabulary padded, complement map extended."""
        d = self.to_dict()
        d["architectures"] = ["CaduceusForMaskedLM"]
        d["vocab_size"] = self.padded_vocab_size
        if self.complement_map is not None:
            d["complement_map"] = {str(i): v for i, v in enumerate(self.complement_ids())}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CaduceusConfig":
        """From a config dict, ignoring keys that are not fields (HF bookkeeping: architectures, auto_map...)."""
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------------------------
# layers


class BiMambaWrapper(nn.Module):
    """Mamba over the sequence and (bidirectional) another over its reversal, combined.

    out = mamba_fwd(h) + flip(mamba_rev(flip(h)))  ("add"), or their product ("ew_multiply");
    flip reverses the length axis. With weight_tie, mamba_rev.in_proj / out_proj (weight and bias)
    are mamba_fwd's Parameters.
    """

    def __init__(self, d_model: int, bidirectional: bool = True, bidirectional_strategy: str | None = "add",
                 bidirectional_weight_tie: bool = True, **mamba_kwargs):
        super().__init__()
        if bidirectional and bidirectional_strategy is None:
            bidirectional_strategy = "add"
        if bidirectional and bidirectional_strategy not in STRATEGIES:
            raise ValueError(f"bidirectional_strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {bidirectional_strategy!r}")
        self.bidirectional = bidirectional
        self.bidirectional_strategy = bidirectional_strategy
        self.mamba_fwd = Mamba(d_model, **mamba_kwargs)
        if bidirectional:
            self.mamba_rev = Mamba(d_model, **mamba_kwargs)
            if bidirectional_weight_tie:
                self.mamba_rev.in_proj.weight = self.mamba_fwd.in_proj.weight
                self.mamba_rev.in_proj.bias = self.mamba_fwd.in_proj.bias
                self.mamba_rev.out_proj.weight = self.mamba_fwd.out_proj.weight
                self.mamba_rev.out_proj.bias = self.mamba_fwd.out_proj.bias
        else:
            self.mamba_rev = None

    def forward(self, hidden_states: torch.Tensor, state: MambaState | None = None, return_state: bool = False,
                lengths: torch.Tensor | None = None, flip_channels: bool = False):
        """[B, L, d] -> [B, L, d]; a state (carried across windows) only for the causal, one-direction mixer.
        flip_channels: flipC(self(flipC(hidden_states))), through the projection weights (Mamba.forward).

        `lengths` [B]: rows right-padded beyond them; the reverse scan reads each row reversed within
        its own length (padding still last), so a row's outputs at positions < its length are those
        of the row alone. Positions beyond a length hold values of no meaning.
        """
        if state is not None or return_state:
            if self.bidirectional:
                raise ValueError("BiMambaWrapper: a bidirectional mixer has no recurrent state (it reads the "
                                 "window right to left too)")
            return self.mamba_fwd(hidden_states, state=state, return_state=return_state, flip_channels=flip_channels)
        fc = flip_channels
        if self._in_pieces(hidden_states, lengths):
            out = _scan_in_pieces(self.mamba_fwd, hidden_states, self.piece_length, flip_channels=fc)
            if self.bidirectional:
                _scan_in_pieces(self.mamba_rev, hidden_states, self.piece_length, reverse=True, into=out,
                                combine=self.bidirectional_strategy, flip_channels=fc)
            return out
        if lengths is None and self._fused(hidden_states):
            return self._forward_fused(hidden_states, flip_channels=fc)
        out = self.mamba_fwd(hidden_states, flip_channels=fc)
        if self.bidirectional:
            rev = _flip_rows(self.mamba_rev(_flip_rows(hidden_states, lengths), flip_channels=fc), lengths)
            out = out + rev if self.bidirectional_strategy == "add" else out * rev
        return out

    # Inference on inputs longer than this runs each Mamba over pieces of this many positions,
    # carrying its conv and SSM state from piece to piece (exact: the stream mode's machinery), so
    # the mixer's [B, 2 d_inner, L] intermediates exist for one piece at a time.
    piece_length = 1 << 17

    def _in_pieces(self, x: torch.Tensor, lengths) -> bool:
        return (not self.training and not torch.is_grad_enabled() and lengths is None
                and x.shape[1] > self.piece_length)

    def forward_rc(self, b: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """flipLC(self(flipLC(b))) (flipLC: reverse length and channels; the RC half of an RCPS block).

        flipLC(fwd(flipLC(b))) = flipL(fwd_c(flipL(b))) and flipLC(flipL(rev(flipL(flipLC(b))))) =
        rev_c(b), where m_c is m with its channels reversed (Mamba.forward(flip_channels=True):
        reversed projection weights, no reversed activations); both strategies are elementwise, so
        they commute with the flips. Two length reversals of [B, L, d] instead of the six copies of
        the literal formula. With `lengths`, each row is reversed within its length (as in forward):
        here it is the forward Mamba that reads the rc half right to left.
        """
        if self._in_pieces(b, lengths):
            out = _scan_in_pieces(self.mamba_fwd, b, self.piece_length, reverse=True, flip_channels=True)
            if self.bidirectional:
                _scan_in_pieces(self.mamba_rev, b, self.piece_length, flip_channels=True, into=out,
                                combine=self.bidirectional_strategy)
            return out
        if lengths is None and self._fused(b):
            return self._forward_fused(b, flip_channels=True, swap=True)
        out = _flip_rows(self.mamba_fwd(_flip_rows(b, lengths), flip_channels=True), lengths)
        if self.bidirectional:
            rev = self.mamba_rev(b, flip_channels=True)
            out = out + rev if self.bidirectional_strategy == "add" else out * rev
        return out

    # On a GPU the two directions' conv + scan run side by side on two CUDA streams (_forward_fused) where
    # one scan leaves the GPU short of work (batch 1 x 131,072 Caduceus-PS: 129.4 ms against 143.0 on one
    # stream, H100); where one scan fills it, side by side was no faster (746.0 against 739.5 ms at 8 x
    # 131,072), so they run in turn there; and on short windows, where the streams' bookkeeping costs more
    # than it hides (1 x 16,384: 44.3 ms against 39.9).
    concurrent_directions: bool = True
    concurrent_min_length: int = 1 << 16

    # Inference shares the tied projections between the directions (_forward_fused); False restores
    # the two whole Mamba calls with flipped copies (the reference it is tested and benchmarked against).
    share_projections: bool = True

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether inference takes _forward_fused: both directions share in_proj / out_proj (weight
        tying, as in Caduceus), no gradient is needed, and the scans do not go to mamba-ssm's fused
        kernel (which has no backward direction; there each Mamba runs whole, as before)."""
        f, r = self.mamba_fwd, self.mamba_rev
        return (self.share_projections and self.bidirectional and not torch.is_grad_enabled()
                and r.in_proj.weight is f.in_proj.weight
                and r.in_proj.bias is f.in_proj.bias and r.out_proj.weight is f.out_proj.weight
                and r.out_proj.bias is f.out_proj.bias and r.backend == f.backend
                and not (f.use_fast_path and mixer_backend(f.backend, x) == "cuda"))

    def _forward_fused(self, h: torch.Tensor, flip_channels: bool = False, swap: bool = False) -> torch.Tensor:
        """forward(h, flip_channels=...) (swap=False) or forward_rc(h) (flip_channels and swap), sharing the tied
        projections: in_proj once for both directions, the backward direction read right to left in
        place (Mamba.mix(reverse=True): no flipped copies), and for "add" out_proj(y_fwd) + out_proj(y_rev)
        summed by the second matmul. swap runs mamba_fwd backwards and mamba_rev forwards."""
        f, r = self.mamba_fwd, self.mamba_rev
        w_in, w_out, b_out = f.projections(flip_channels)
        xz = f.project_in(h, w_in)
        concurrent = (self.concurrent_directions and xz.is_cuda and xz.shape[-1] >= self.concurrent_min_length
                      and not gluon_fills_gpu(xz.shape[0], f.d_inner, f.d_state, xz.device))
        y_f, y_r = _both(lambda: f.mix(xz, reverse=swap), lambda: r.mix(xz, reverse=not swap), concurrent=concurrent)
        del xz
        if self.bidirectional_strategy == "add":
            out = f.project_out(y_f, w_out, None)
            del y_f
            f.project_out(y_r, w_out, None, accumulate=out)
            return out if b_out is None else out.add_(2 * b_out.to(out.dtype))
        out = f.project_out(y_f, w_out, b_out)
        del y_f
        return out.mul_(f.project_out(y_r, w_out, b_out))


_SIDE_STREAMS: dict = {}


@torch.compiler.disable  # streams and hand-written kernels: eager, a graph break under torch.compile
def _both(first, second, *, concurrent: bool):
    """(first(), second()); with concurrent, second runs on a side CUDA stream while first runs on the
    current one (the current stream then waits for it). Its result is marked as used by the current
    stream, so the allocator does not hand its memory back to the side stream while it is still read."""
    if not concurrent:
        return first(), second()
    main = torch.cuda.current_stream()
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(main.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        b = second()
    a = first()
    main.wait_stream(side)
    b.record_stream(main)
    return a, b


def _scan_in_pieces(mamba, x: torch.Tensor, piece: int, *, reverse: bool = False, flip_channels: bool = False,
                    into: torch.Tensor | None = None, combine: str = "add") -> torch.Tensor:
    """mamba over x [B, L, d] (reverse: over flip_L(x), the result flipped back), `piece` positions at a
    time with the state carried across pieces: equal to one call on the whole input. With `into`,
    the result is added to it ("add") or multiplied into it ("ew_multiply") in place."""
    L, state = x.shape[1], None
    starts = range(0, L, piece)
    for s in (reversed(starts) if reverse else starts):
        e = min(s + piece, L)
        xs = x[:, s:e].flip(1) if reverse else x[:, s:e]
        y, state = mamba(xs, state=state, return_state=True, flip_channels=flip_channels)
        if reverse:
            y = y.flip(1)
        if into is None:
            into = y.new_empty(x.shape[0], L, y.shape[-1])
            combine = "copy"
        view = into[:, s:e]
        if combine == "copy":
            view.copy_(y)
        elif combine == "add":
            view.add_(y)
        else:
            view.mul_(y)
    return into


class CaduceusEmbeddings(nn.Module):
    def __init__(self, config: CaduceusConfig):
        super().__init__()
        if config.rcps:
            self.word_embeddings = RCPSEmbedding(config.padded_vocab_size, config.d_model, config.complement_ids())
        else:
            self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def create_block(config: CaduceusConfig, layer_idx: int) -> nn.Module:
    mixer = BiMambaWrapper(
        config.d_model, bidirectional=config.bidirectional, bidirectional_strategy=config.bidirectional_strategy,
        bidirectional_weight_tie=config.bidirectional_weight_tie, layer_idx=layer_idx, **(config.ssm_cfg or {}),
    )
    norm = (RMSNorm if config.rms_norm else nn.LayerNorm)(config.d_model, eps=config.norm_epsilon)
    block_cls = RCPSMambaBlock if config.rcps else Block
    block = block_cls(config.d_model, mixer, norm, fused_add_norm=config.fused_add_norm,
                      residual_in_fp32=config.residual_in_fp32)
    block.layer_idx = layer_idx
    return block


# ----------------------------------------------------------------------------------------------
# the models


class CaduceusBackbone(nn.Module):
    """Embeddings, blocks and final norm (the reference's CaduceusMixerModel): ids -> hidden states."""

    def __init__(self, config: CaduceusConfig):
        super().__init__()
        self.config = config
        self.fused_add_norm = config.fused_add_norm
        self.rcps = config.rcps
        self.residual_in_fp32 = config.residual_in_fp32
        self.embeddings = CaduceusEmbeddings(config)
        self.layers = nn.ModuleList(create_block(config, i) for i in range(config.n_layer))
        norm_f = (RMSNorm if config.rms_norm else nn.LayerNorm)(config.d_model, eps=config.norm_epsilon)
        self.norm_f = norm_f if (config.fused_add_norm or not config.rcps) else RCPSAddNormWrapper(norm_f)

    def forward(self, input_ids=None, inputs_embeds=None, output_hidden_states: bool = False,
                lengths: torch.Tensor | None = None):
        """input_ids [B, L] (or inputs_embeds) -> hidden [B, L, d] ([B, L, 2d] for RCPS).

        With output_hidden_states also the list the reference returns: the input of every block
        (embeddings, then each block's mixer output) and, with fused_add_norm, the final hidden state.

        `lengths` [B]: the rows are right-padded beyond them (a batch of sequences of different
        lengths). A right-to-left scan (bidirectional, and the rc half of RCPS) then reverses each
        row within its own length, so it reads the row's bases before its padding, and each row's
        hidden states at positions < its length equal those of the row alone (up to float
        rounding); without `lengths`, those scans would start in the padding. A causal model needs
        nothing (the padding comes after every real position), nor a batch without padding.
        """
        if inputs_embeds is not None:
            hidden = inputs_embeds
        else:
            if input_ids is None or input_ids.dim() != 2:
                raise ValueError("input_ids must be [batch, length]")
            if input_ids.shape[1] == 0:
                raise ValueError("input_ids has length 0")
            hidden = self.embeddings(input_ids.long())
        if lengths is not None:
            lengths = lengths.to(hidden.device).long()
            if lengths.shape != hidden.shape[:1]:
                raise ValueError(f"lengths must be [batch={hidden.shape[0]}], got shape {tuple(lengths.shape)}")
            if self.is_causal or bool((lengths >= hidden.shape[1]).all()):
                lengths = None
        if self.rcps and lengths is None and not output_hidden_states and self._strand_major(hidden):
            return self._forward_strands(hidden)
        all_hidden = []
        residual = None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden, residual = layer(hidden, residual) if lengths is None else layer(hidden, residual, lengths=lengths)
        hidden = self._final_norm(hidden, residual)
        if output_hidden_states and self.fused_add_norm:
            all_hidden.append(hidden)
        return (hidden, all_hidden) if output_hidden_states else hidden

    def embed(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position features [B, L, d_model] float32: the hidden state, or for RCPS the
        strand-invariant (forward half + channel-flipped rc half) / 2 (see the module docstring)."""
        h = self(input_ids, lengths=lengths).float()
        if not self.rcps:
            return h
        d = self.config.d_model
        return 0.5 * (h[..., :d] + h[..., d:].flip(-1))

    # False: RCPS inference batches the strands layer by layer instead (RCPSWrapper), concatenating and
    # flipping activations in and out of every layer (the path _forward_strands is benchmarked against).
    strand_major: bool = True

    def _strand_major(self, hidden: torch.Tensor) -> bool:
        """RCPS inference with the two strands batched (RCPSWrapper's rule: CUDA, the Triton scan, memory to
        spare) runs the whole stack in strand-major form (_forward_strands), also where the mixers run
        in pieces (a million-token window: both strands of a piece in one scan)."""
        return (self.strand_major and not torch.is_grad_enabled()
                and self.layers[0].mixer._batch_strands(hidden, in_pieces=True))

    def _forward_strands(self, hidden: torch.Tensor) -> torch.Tensor:
        """The RCPS stack with its state in strand-major form [2B, L, d] (layers.rcps.to_strands) from
        the embeddings to the final norm: each layer is then its plain submodule on 2B rows, and the
        halves exchange of the fused blocks rides on the add + norm kernel (strands_add_norm), so no layer
        concatenates or flips activations (RCPSWrapper's strand batching did both, in and out, per layer).
        Every other layer the state is held channel-reversed, which its mixer absorbs in its projection
        weights (flip_channels), so the kernel's stores never reverse channels."""
        h, residual = to_strands(hidden), None
        flipped = False  # h (and the residual) hold flipC of the strand-major state (see strands_add_norm_ref)
        for layer in self.layers:
            if layer.fused_add_norm:
                h, residual = strands_add_norm(h, residual, layer.norm, residual_in_fp32=layer.residual_in_fp32,
                                               flip_weight=not flipped)
                flipped = not flipped
            else:
                h, residual = add_norm(h, residual, layer.norm.submodule, prenorm=True, fused=False,
                                       residual_in_fp32=layer.residual_in_fp32)
            h = layer.mixer.submodule(h, flip_channels=flipped)
        if self.fused_add_norm:
            h = add_norm(h, residual, self.norm_f, residual_in_fp32=self.residual_in_fp32, prenorm=False, fused=True,
                         flip_weight=flipped)
        else:
            h = add_norm(h, residual, self.norm_f.submodule, prenorm=False, fused=False)
        return from_strands(h, flipped)

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The last residual add + norm_f (per position), with the config's fused / unfused semantics."""
        if not self.fused_add_norm:
            if self.rcps:
                return self.norm_f(hidden, residual=residual, prenorm=False)
            return add_norm(hidden, residual, self.norm_f, prenorm=False, fused=False)
        if self.rcps:
            return rcps_fused_add_norm(hidden, residual, self.norm_f, residual_in_fp32=self.residual_in_fp32,
                                       prenorm=False, swap_halves=False)
        return add_norm(hidden, residual, self.norm_f, residual_in_fp32=self.residual_in_fp32,
                        prenorm=False, fused=True)

    # -- recurrent mode (causal models only)
    @property
    def is_causal(self) -> bool:
        """True when the output at a position depends on that position and the ones before it only."""
        return not self.config.bidirectional and not self.config.rcps

    def check_streamable(self) -> None:
        if not self.is_causal:
            kind = "bidirectional" if self.config.bidirectional else "RC-equivariant (its rc strand reads right to left)"
            raise SeqssmError(
                f"this Caduceus model is {kind}: its output at a position depends on the bases to its right, so it "
                "cannot carry a state from one window to the next; embed long sequences in overlapping windows "
                "(a stride smaller than the window) instead"
            )

    def forward_stream(self, input_ids: torch.Tensor, state: "CaduceusStreamState | None" = None):
        """One window of a longer sequence: (hidden [B, L, d], state after the window).

        `state` is the state after the previous windows (None: the sequence starts here); it is not
        modified. Feeding consecutive windows with the returned state gives the hidden states of
        one pass over their concatenation (up to float rounding): every layer's Mamba carries its
        conv inputs and SSM state, and everything else in the model is per position. Each window
        runs the parallel (chunked) scan from the carried state, not a loop over positions.
        """
        self.check_streamable()
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length >= 1], got shape {tuple(input_ids.shape)}")
        batch = input_ids.shape[0]
        if state is not None:
            if len(state.layers) != len(self.layers):
                raise ValueError(f"stream state has {len(state.layers)} layers, the model {len(self.layers)}")
            if state.layers[0][0].shape[0] != batch:
                raise ValueError(f"stream state is for batch {state.layers[0][0].shape[0]}, input batch is {batch}")
        hidden = self.embeddings(input_ids.long())
        residual = None
        new_states = []
        for i, layer in enumerate(self.layers):
            hidden, residual, st = layer(hidden, residual, state=None if state is None else state.layers[i],
                                         return_state=True)
            new_states.append(st)
        hidden = self._final_norm(hidden, residual)
        position = (0 if state is None else state.position) + input_ids.shape[1]
        return hidden, CaduceusStreamState(new_states, position)


@dataclass
class CaduceusStreamState:
    """What a causal Caduceus carries from one window to the next.

    layers[i] = (conv_state [B, d_inner, d_conv]: the last d_conv inputs of layer i's convolution,
    ssm_state [B, d_inner, d_state] float32); position = how many positions have been consumed.
    Memory is constant in the sequence length.
    """

    layers: list
    position: int = 0

    def to(self, device) -> "CaduceusStreamState":
        return CaduceusStreamState([(c.to(device), h.to(device)) for c, h in self.layers], self.position)


def rc_token_ids(input_ids: torch.Tensor, complement: torch.Tensor,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse complement of token ids [B, L] (each row within its length; padding stays at the right)."""
    complement = complement.to(input_ids.device)
    if lengths is None:
        return complement[input_ids.long().flip(-1)].to(input_ids.dtype)
    L = input_ids.shape[1]
    pos = torch.arange(L, device=input_ids.device)
    lengths = lengths.to(input_ids.device).long()
    src = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)
    rc = complement[input_ids.long().gather(1, src)]
    return torch.where(pos[None, :] < lengths[:, None], rc, input_ids.long()).to(input_ids.dtype)


def pretraining_inputs(input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids as the published Caduceus checkpoints saw them in pretraining: N (11) -> [PAD] (4)."""
    return torch.where(input_ids == N, torch.full_like(input_ids, PAD), input_ids)


def _flip_rows(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse [B, L, ...] along L within each row's length (positions beyond it are kept)."""
    if lengths is None:
        return x.flip(1)
    L = x.shape[1]
    pos = torch.arange(L, device=x.device)
    lengths = lengths.to(x.device).long()
    src = torch.where(pos[None, :] < lengths[:, None], lengths[:, None] - 1 - pos[None, :], pos[None, :])
    return x.gather(1, src[..., None].expand_as(x))


class Caduceus(nn.Module):
    """The backbone as the reference's `Caduceus` (HF AutoModel): keys `backbone.*`, plus embeddings."""

    def __init__(self, config: CaduceusConfig):
        super().__init__()
        self.config = config
        self.backbone = CaduceusBackbone(config)
        if config.complement_map is not None:
            complement = torch.tensor(config.complement_ids(), dtype=torch.long)
        else:  # Caduceus checkpoints use the ids of seqssm.tokenizers.dna (see the module docstring)
            complement = torch.arange(config.padded_vocab_size)
            known = min(config.padded_vocab_size, VOCAB_SIZE)
            complement[:known] = torch.from_numpy(COMPLEMENT_LUT[:known].astype("int64"))
        self.register_buffer("_complement", complement, persistent=False)  # for conjoin; not in the state dict

    def forward(self, input_ids=None, inputs_embeds=None, output_hidden_states: bool = False,
                lengths: torch.Tensor | None = None):
        return self.backbone(input_ids, inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
                             lengths=lengths)

    def embed(self, input_ids: torch.Tensor, *, conjoin: bool = False,
              lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position embeddings [B, L, d_model] (float32), aligned with the input (module docstring).

        RCPS models: (forward half + channel-flipped rc half) / 2, strand-invariant by construction.
        Other models: the hidden state; conjoin=True averages it with the position-reversed hidden
        state of the reverse complement (complement from config.complement_map, else the DNA
        tokenizer's). `lengths`: rows right-padded beyond them; each row is embedded as if alone
        (CaduceusBackbone.forward) and reverse-complemented within its length.
        """
        if self.config.rcps or not conjoin:
            return self.backbone.embed(input_ids, lengths=lengths)
        both = torch.cat([input_ids, rc_token_ids(input_ids, self._complement, lengths)], dim=0)
        h = self(both, lengths=None if lengths is None else torch.cat([lengths, lengths])).float()
        B = input_ids.shape[0]
        return 0.5 * (h[:B] + _flip_rows(h[B:], lengths))

    @property
    def is_causal(self) -> bool:
        return self.backbone.is_causal

    def embed_stream(self, input_ids: torch.Tensor, state: CaduceusStreamState | None = None):
        """Causal models only: (embeddings [B, L, d_model] float32, state) of one window given the
        state after the previous ones (see CaduceusBackbone.forward_stream); for any window, equal to
        `embed` of the whole prefix, restricted to the window. Bidirectional / RC-equivariant models
        raise a SeqssmError (use overlapping windows)."""
        hidden, state = self.backbone.forward_stream(input_ids, state)
        return hidden.float(), state

    def embed_pooled(self, input_ids: torch.Tensor, *, conjoin: bool = False,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of `embed` over each row's first `lengths` positions (all if None): [B, d_model]."""
        e = self.embed(input_ids, conjoin=conjoin, lengths=lengths)
        if lengths is None:
            return e.mean(dim=1)
        lengths = lengths.to(e.device).long()
        mask = torch.arange(e.shape[1], device=e.device)[None, :] < lengths[:, None]
        return (e * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None].to(e.dtype)


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """The reference's _init_weights (from mamba-ssm), applied to every module."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        # GPT-2 style: the projections that write into the residual stream start scaled by 1/sqrt(n).
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class CaduceusForMaskedLM(nn.Module):
    """Caduceus + LM head: input_ids [B, L] -> logits [B, L, padded vocab] (float32).

    Keys `caduceus.backbone.*` and `lm_head.*` as the reference's CaduceusForMaskedLM.
    """

    def __init__(self, config: CaduceusConfig):
        super().__init__()
        self.config = config
        self.caduceus = Caduceus(config)
        if config.rcps:
            self.lm_head = RCPSLMHead(config.d_model, config.padded_vocab_size, config.complement_ids())
        else:
            self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        init = dict(config.initializer_cfg or {})
        unknown = set(init) - {"initializer_range", "rescale_prenorm_residual", "n_residuals_per_layer"}
        if unknown:
            raise ValueError(f"initializer_cfg: unknown option(s) {', '.join(sorted(unknown))}")
        self.apply(lambda m: _init_weights(m, config.n_layer, **init))
        if config.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        emb = self.caduceus.backbone.embeddings.word_embeddings
        if self.config.rcps:
            self.lm_head.set_weight(emb.weight)
        else:
            self.lm_head.weight = emb.weight
        self.config.tie_word_embeddings = True

    def forward(self, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        hidden = self.caduceus(input_ids, inputs_embeds=inputs_embeds)
        return self.lm_head(hidden).float()

    def embed(self, input_ids, *, conjoin: bool = False, lengths=None) -> torch.Tensor:
        return self.caduceus.embed(input_ids, conjoin=conjoin, lengths=lengths)

    def embed_pooled(self, input_ids, *, conjoin: bool = False, lengths=None) -> torch.Tensor:
        return self.caduceus.embed_pooled(input_ids, conjoin=conjoin, lengths=lengths)

    @property
    def is_causal(self) -> bool:
        return self.caduceus.is_causal

    def embed_stream(self, input_ids, state: CaduceusStreamState | None = None):
        return self.caduceus.embed_stream(input_ids, state)

    def forward_stream(self, input_ids, state: CaduceusStreamState | None = None):
        """Causal models only: (logits [B, L, vocab] float32, state) of one window (see embed_stream)."""
        hidden, state = self.caduceus.backbone.forward_stream(input_ids, state)
        return self.lm_head(hidden).float(), state

    # -- checkpoints
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *,
                        device: str | torch.device = "cpu") -> "CaduceusForMaskedLM":
        """Load a HuggingFace-format Caduceus directory: config.json + model.safetensors or pytorch_model.bin.

        Accepts the keys of CaduceusForMaskedLM (`caduceus.backbone.*`, `lm_head.*`), of Caduceus
        (`backbone.*`: the LM head is then tied to the embeddings) and of
        CaduceusForSequenceClassification (its `score.*` head is ignored). Tied tensors may be stored
        under any of their names. .bin files are read with torch.load(weights_only=True).
        Returns the model in eval mode; `model.load_info` lists ignored keys.
        """
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise SeqssmError(f"{d}: not a directory")
        if not (d / "config.json").is_file():
            raise SeqssmError(f"{d}: no config.json")
        cfg = _read_json(d / "config.json")
        if not isinstance(cfg, dict):
            raise SeqssmError(f"{d / 'config.json'}: expected a JSON object")
        try:
            config = CaduceusConfig.from_dict(cfg)
        except (TypeError, ValueError) as e:
            raise SeqssmError(f"{d / 'config.json'}: bad Caduceus config: {e}") from None
        weights = next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)
        if weights is None:
            if any((d / f).is_file() for f in SHARDED_FILES):
                raise SeqssmError(f"{d}: sharded checkpoints are not supported")
            raise SeqssmError(f"{d}: no model.safetensors or pytorch_model.bin")
        raw = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_torch(weights)
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise SeqssmError(f"{weights}: expected a flat mapping of names to tensors")
        state, ignored = _normalize_keys(raw)
        config.tie_word_embeddings = bool(config.tie_word_embeddings) and _head_is_tied(config, state)
        model = cls(config)
        _load_state(model, state, weights)
        model.load_info = {"source": str(d), "weights": weights.name, "ignored_keys": ignored}
        return model.to(device).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json (reference format) and model.safetensors (each shared tensor once,
        under the first of its names, as HF transformers writes it)."""
        from safetensors.torch import save_file

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        save_file(unique_state_dict(self), str(d / "model.safetensors"), metadata={"format": "pt"})
        return d


# ----------------------------------------------------------------------------------------------
# checkpoint helpers


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every shared tensor once (its first name), contiguous, on the CPU."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


_PREFIXES = (("caduceus.backbone.", "caduceus.backbone."), ("backbone.", "caduceus.backbone."))
# CaduceusForSequenceClassification's head; the head of a seqssm fine-tuned model (seqssm.models.heads)
_IGNORED = ("score.", "head.")


def _normalize_keys(raw: dict) -> tuple[dict, list[str]]:
    state, ignored = {}, []
    for key, value in raw.items():
        if key.startswith(_IGNORED):
            ignored.append(key)
            continue
        for old, new in _PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    return state, ignored


def _head_is_tied(config: CaduceusConfig, state: dict) -> bool:
    """Tied unless the file holds an LM head that differs from the embedding matrix."""
    emb_key = "caduceus.backbone.embeddings.word_embeddings." + ("embedding.weight" if config.rcps else "weight")
    head = state.get("lm_head.lm_head.weight" if config.rcps else "lm_head.weight")
    emb = state.get(emb_key)
    if head is None:
        return True
    return emb is not None and head.shape == emb.shape and torch.equal(head, emb)


def _load_state(model: nn.Module, state: dict, source) -> None:
    expected = model.state_dict()
    state = dict(state)
    # Complement maps are config, stored as buffers: fill them in, or check the file's copy.
    for name, t in expected.items():
        if name.endswith("complement_map"):
            if name not in state:
                state[name] = t.clone()
            elif not torch.equal(state[name].long(), t):
                raise SeqssmError(f"{source}: {name} differs from the complement_map of config.json")
    load_matching_state(model, state, source, "a Caduceus model")
