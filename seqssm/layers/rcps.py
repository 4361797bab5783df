"""Reverse-complement parameter sharing (RCPS; Zhou et al. 2022), as used by Caduceus-PS.

A hidden state of an RCPS model has 2 d channels: [forward half | reverse-complement half]. Its
reverse complement rc(h) flips both the length axis and the channel axis (so the two halves
swap, each reversed). Every layer f here satisfies f(rc(h)) = rc(f(h)) exactly, with the same
weights used on both halves:

    RCPSEmbedding   ids -> [E(ids), flipLC(E(rc(ids)))]              rc(ids): reverse + complement
    RCPSWrapper     [a, b] -> [f(a), flipLC(f(flipLC(b)))]           f: any [.., L, d] -> [.., L, d]
    RCPSAddNormWrapper   the same for residual add + norm (unfused semantics)
    rcps_fused_add_norm  the same with the fused-kernel semantics, half order as in the reference
                         (computed without reversing activations; rcps_fused_add_norm_ref: as written there)
    RCPSMambaBlock  add-norm + RCPSWrapper(mixer)
    RCPSLMHead      logits = W a + W[complement] flipC(b): complementing the logits of rc(x) flips them back

(flipLC: flip length and channels; flipC: channels only.)

Module and buffer names follow the public Caduceus code (kuleshov-group/caduceus,
caduceus/modeling_rcps.py), so checkpoints load unchanged: `embedding.weight` and a
`complement_map` buffer in the embedding and the LM head, `submodule.*` inside wrappers,
`lm_head.weight` in the LM head. The complement map is a persistent buffer (it is in the state
dict, as in the reference).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.layers.norm import (RMSNorm, _affine, _triton_suits as _norm_triton_suits, add_norm, norm_float32,
                                residual_dtype)
from seqssm.ops.add_norm_triton import add_norm_triton
from seqssm.ops.selective_scan import mixer_backend


def flip_lc(x: torch.Tensor) -> torch.Tensor:
    """Reverse complement of an RCPS hidden state [.., L, C]: flip length and channels."""
    return torch.flip(x, dims=[-2, -1])


def _complement_tensor(complement_map) -> torch.Tensor:
    """The complement map as a LongTensor of token ids (a list, or a dict in id order as in config.json)."""
    values = list(complement_map.values()) if isinstance(complement_map, dict) else list(complement_map)
    return torch.tensor([int(v) for v in values], dtype=torch.long)


class RCPSEmbedding(nn.Module):
    """Token ids [B, L] -> [B, L, 2 d]: embeddings of the sequence and, flipped, of its reverse complement."""

    def __init__(self, vocab_size: int, d_model: int, complement_map):
        super().__init__()
        cmap = _complement_tensor(complement_map)
        if cmap.numel() != vocab_size:
            raise ValueError(f"RCPSEmbedding: complement map has {cmap.numel()} ids, vocabulary {vocab_size}")
        self.register_buffer("complement_map", cmap)
        self.embedding = nn.Embedding(vocab_size, d_model)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def rc(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reverse complement of token ids [B, L]."""
        return self.complement_map[input_ids.flip(-1)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        fwd = self.embedding(input_ids)
        rc = flip_lc(self.embedding(self.rc(input_ids)))
        return torch.cat([fwd, rc], dim=-1)


class RCPSWrapper(nn.Module):
    """Makes any channel-wise-shaped module f: [.., L, d] -> [.., L, d] RC-equivariant on 2 d channels.

    A submodule with a `forward_rc(b)` method (BiMambaWrapper) computes flipLC(f(flipLC(b))) itself
    with fewer copies of the activations (flips folded into its weights); `forward_ref` is the
    plain definition, kept as the twin it is tested against.
    """

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`lengths`: right-padded rows, passed to a submodule with `forward_rc` (which then reverses
        each row within its length; see BiMambaWrapper)."""
        if kwargs or not hasattr(self.submodule, "forward_rc"):
            if lengths is not None:
                raise ValueError("RCPSWrapper: lengths needs a submodule with forward_rc")
            return self.forward_ref(x, **kwargs)
        half = x.shape[-1] // 2
        if lengths is None and self._batch_strands(x):
            # both strands through the submodule as one batch of 2B rows: half the scan calls, each
            # with twice the rows (a Triton scan at batch 16 takes 16.3 ms where two at batch 8 take
            # 22.6, H100), for a few copies of [B, L, half] activations
            batch = x.shape[0]
            out = self.submodule(torch.cat([x[..., :half], flip_lc(x[..., half:])], dim=0))
            return torch.cat([out[:batch], flip_lc(out[batch:])], dim=-1)
        if lengths is None:
            return torch.cat([self.submodule(x[..., :half]), self.submodule.forward_rc(x[..., half:])], dim=-1)
        return torch.cat([self.submodule(x[..., :half], lengths=lengths),
                          self.submodule.forward_rc(x[..., half:], lengths=lengths)], dim=-1)

    # None: batch the two strands where it pays, i.e. inference on a CUDA device with seqssm's Triton
    # scan (mamba-ssm's kernel gains nothing from bigger batches), on inputs short enough for one pass,
    # with the memory to spare; True / False force it (the tests compare both).
    batch_strands: bool | None = None

    def _batch_strands(self, x: torch.Tensor, in_pieces: bool = False) -> bool:
        """Whether both strands go through the submodule as one batch (see batch_strands). in_pieces: also
        for inputs the submodule runs in pieces (the strand-major stack, whose pieces bound the memory)."""
        if self.batch_strands is not None:
            return self.batch_strands
        sub = self.submodule
        if torch.is_grad_enabled() or not x.is_cuda:
            return False
        pieces = getattr(sub, "_in_pieces", lambda *a: True)(x, None)
        if pieces and not in_pieces:
            return False
        mixer = getattr(sub, "mamba_fwd", None)
        if mixer is None or mixer_backend(mixer.backend, x, rows=2 * x.shape[0]) != "triton":
            return False
        # Both strands' mixer intermediates are then alive at once (8 x 131,072 bf16 tokens at d_inner
        # 512: peak 18.3 GiB instead of 10.7): only where the GPU has that memory to spare, twice over.
        length = min(x.shape[1], sub.piece_length) if pieces else x.shape[1]
        extra = 8 * x.shape[0] * length * mixer.d_inner * x.element_size()
        free = torch.cuda.mem_get_info(x.device)[0] + torch.cuda.memory_reserved(x.device) \
            - torch.cuda.memory_allocated(x.device)
        return free > 2 * extra

    def forward_ref(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        half = x.shape[-1] // 2
        fwd = self.submodule(x[..., :half], **kwargs)
        rc = self.submodule(flip_lc(x[..., half:]), **kwargs)
        return torch.cat([fwd, flip_lc(rc)], dim=-1)


class RCPSAddNormWrapper(nn.Module):
    """Residual add + norm on both halves (the reference's unfused path; see norm.add_norm(fused=False)).

    forward(x, residual=None, prenorm=False): residual None means residual = x (first block).
    """

    def __init__(self, submodule: nn.Module):
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, prenorm: bool = False):
        half = x.shape[-1] // 2
        dtype = self.submodule.weight.dtype
        if residual is None:
            residual = x
            fwd = self.submodule(x[..., :half].to(dtype))
            rc = self.submodule(flip_lc(x[..., half:]).to(dtype))
            out = torch.cat([fwd, flip_lc(rc)], dim=-1)
        else:
            res_fwd = x[..., :half] + residual[..., :half]
            res_rc = flip_lc(x[..., half:]) + flip_lc(residual[..., half:])
            out = torch.cat([self.submodule(res_fwd.to(dtype)), flip_lc(self.submodule(res_rc.to(dtype)))], dim=-1)
            residual = torch.cat([res_fwd, flip_lc(res_rc)], dim=-1)
        return (out, residual) if prenorm else out


def rcps_fused_add_norm(x, residual, norm, *, residual_in_fp32: bool, prenorm: bool, swap_halves: bool):
    """rcps_fused_add_norm_ref without reversing any activation.

    flipLC(norm(flipLC(h))) = norm with the channel-reversed weight applied to h (the norm is per
    position, and its statistics do not depend on the channel order), and flipLC(flipLC(x) +
    flipLC(r)) = x + r; so each half is normalized in place, the "reverse-complement" one with the
    reversed weight. Equal to the reference up to the order of the float sum over channels.
    """
    half = x.shape[-1] // 2
    first, second = (slice(half, None), slice(None, half)) if swap_halves else (slice(None, half), slice(half, None))
    r1 = None if residual is None else residual[..., first]
    r2 = None if residual is None else residual[..., second]
    kw = dict(residual_in_fp32=residual_in_fp32, prenorm=True, fused=True)
    out1, res1 = add_norm(x[..., first], r1, norm, **kw)
    out2, res2 = add_norm(x[..., second], r2, norm, flip_weight=True, **kw)
    out = torch.cat([out1, out2], dim=-1)
    if not prenorm:
        return out
    return out, torch.cat([res1, res2], dim=-1)


def rcps_fused_add_norm_ref(x, residual, norm, *, residual_in_fp32: bool, prenorm: bool, swap_halves: bool):
    """Residual add + norm of an RCPS state with the fused-kernel semantics, as the reference computes it.

    The reference calls the fused kernel once on a "forward" half and once on the flipLC of the
    other half, and concatenates [forward result, flipLC(other result)]. In its blocks
    (RCPSMambaBlock) the "forward" half is the *second* half of the channels and the other one the
    first (swap_halves=True); in the final norm of the backbone it is the first half
    (swap_halves=False). With swap_halves the two halves of the output (and of the residual)
    are exchanged relative to the input, which is still an RC-equivariant map (swapping the
    halves commutes with flipLC) and is what the published Caduceus-PS checkpoints were trained
    with (their config has fused_add_norm true). Reproduced here, position for position.
    """
    half = x.shape[-1] // 2
    first, second = (slice(half, None), slice(None, half)) if swap_halves else (slice(None, half), slice(half, None))
    r1 = None if residual is None else residual[..., first]
    r2 = None if residual is None else flip_lc(residual[..., second])
    kw = dict(residual_in_fp32=residual_in_fp32, prenorm=True, fused=True)
    out1, res1 = add_norm(x[..., first], r1, norm, **kw)
    out2, res2 = add_norm(flip_lc(x[..., second]), r2, norm, **kw)
    out = torch.cat([out1, flip_lc(out2)], dim=-1)
    if not prenorm:
        return out
    return out, torch.cat([res1, flip_lc(res2)], dim=-1)


def to_strands(h: torch.Tensor) -> torch.Tensor:
    """An RCPS state [B, L, 2d] in strand-major form [2B, L, d]: [forward half; flipLC(rc half)].

    In this form every RCPS layer is its plain submodule applied to all 2B rows (RCPSWrapper: [f(a),
    flipLC(f(flipLC(b)))] -> f of both rows; the add + norm likewise), except the fused add + norm of
    the blocks, which exchanges the halves (strands_add_norm). RCPSEmbedding's output in this form is
    the embeddings of the sequence and of its reverse complement."""
    d = h.shape[-1] // 2
    return torch.cat([h[..., :d], flip_lc(h[..., d:])], dim=0)


def from_strands(s: torch.Tensor, flipped: bool = False) -> torch.Tensor:
    """The inverse of to_strands: [2B, L, d] -> [B, L, 2d]; flipped: s is flipC of the strand-major form."""
    B = s.shape[0] // 2
    if flipped:
        return torch.cat([s[:B].flip(-1), s[B:].flip(-2)], dim=-1)
    return torch.cat([s[:B], flip_lc(s[B:])], dim=-1)


def strands_add_norm_ref(x, residual, norm, *, residual_in_fp32: bool, flip_weight: bool):
    """rcps_fused_add_norm(swap_halves=True, prenorm=True) on a strand-major state, written out.

    The halves exchange of the reference's blocks is, in strand-major form, flipLC of each row with the
    two strands exchanged. Only the length is reversed here: both results are flipC of that form (the
    norm's statistics do not depend on the channel order; the weight is reversed instead when the
    input is in the plain form, flip_weight), so the next mixer runs with flip_channels and the next
    add + norm, reading a flipC state, brings it back to the plain form (flip_weight=False). With S =
    x + residual in float32, results: norm(flipL(S with strands exchanged)) in x's dtype, and that
    flipped S in the residual's dtype (x's, or float32 with residual_in_fp32, for the first block)."""
    s = x.float() if residual is None else x.float() + residual.float()
    B = s.shape[0] // 2
    s = torch.cat([s[B:], s[:B]], dim=0).flip(-2)
    return norm_float32(s, norm, flip_weight).to(x.dtype), s.to(residual_dtype(x, residual, residual_in_fp32))


def strands_add_norm(x, residual, norm, *, residual_in_fp32: bool, flip_weight: bool):
    """strands_add_norm_ref in one Triton pass where it runs (CUDA inference: the exchange and the length
    flip ride on the kernel's stores, ops.add_norm_triton(swap_strands=True)), else that torch twin."""
    if x.dim() == 3 and x.shape[0] % 2 == 0 and _norm_triton_suits(x, residual, norm):
        w, b = _affine(norm, flip_weight)
        return add_norm_triton(x, residual, w, b, norm.eps, isinstance(norm, RMSNorm),
                               residual_dtype(x, residual, residual_in_fp32), swap_strands=True)
    return strands_add_norm_ref(x, residual, norm, residual_in_fp32=residual_in_fp32, flip_weight=flip_weight)


class RCPSMambaBlock(nn.Module):
    """RC-equivariant block: residual add + norm on both halves, then RCPSWrapper(mixer).

    Parameters `mixer.submodule.*` and `norm.*` (fused_add_norm) or `norm.submodule.*` (unfused),
    as the reference's RCPSMambaBlock. forward(hidden, residual=None) -> (hidden, residual).
    """

    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, fused_add_norm: bool = False,
                 residual_in_fp32: bool = False):
        super().__init__()
        if not isinstance(norm, (RMSNorm, nn.LayerNorm)):
            raise TypeError(f"RCPSMambaBlock: norm must be RMSNorm or nn.LayerNorm, got {type(norm).__name__}")
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.mixer = RCPSWrapper(mixer)
        self.norm = norm if fused_add_norm else RCPSAddNormWrapper(norm)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None):
        """`lengths`: right-padded rows, for the mixer (the norm is per position)."""
        if self.fused_add_norm:
            hidden_states, residual = rcps_fused_add_norm(hidden_states, residual, self.norm,
                                                          residual_in_fp32=self.residual_in_fp32, prenorm=True,
                                                          swap_halves=True)
        else:
            hidden_states, residual = self.norm(hidden_states, residual=residual, prenorm=True)
            if self.residual_in_fp32:
                residual = residual.float()
        return self.mixer(hidden_states, lengths=lengths), residual


class RCPSLMHead(nn.Module):
    """[B, L, 2 d] -> logits [B, L, vocab]: W fwd + W[complement] flipC(rc); RC-equivariant on the vocabulary.

    For the reverse complement of the input the logits come out reversed in position and with
    complementary tokens exchanged: logits(rc(x))[t, v] = logits(x)[L-1-t, complement[v]].
    """

    def __init__(self, true_dim: int, vocab_size: int, complement_map):
        super().__init__()
        cmap = _complement_tensor(complement_map)
        if cmap.numel() != vocab_size:
            raise ValueError(f"RCPSLMHead: complement map has {cmap.numel()} ids, vocabulary {vocab_size}")
        self.register_buffer("complement_map", cmap)
        self.true_dim = true_dim
        self.lm_head = nn.Linear(true_dim, vocab_size, bias=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.lm_head.weight

    def set_weight(self, value: nn.Parameter) -> None:
        self.lm_head.weight = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 2 * self.true_dim:
            raise ValueError(f"RCPSLMHead: expected {2 * self.true_dim} channels, got {x.shape[-1]}")
        fwd = F.linear(x[..., : self.true_dim], self.weight, self.lm_head.bias)
        rc = F.linear(x[..., self.true_dim:].flip(-1), self.weight[self.complement_map], self.lm_head.bias)
        return fwd + rc
