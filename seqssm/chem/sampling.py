"""Sampling SMILES from a chemical LM in recurrent mode, and scoring SMILES under it.

Continuous batching: ``batch_size`` slots each carry one molecule in progress, with its own
position. The recurrent steps run ``chunk`` at a time for all slots together; between chunks
(where the host looks once) the molecules that ended (eos, or max_len - 1 tokens drawn) are
filed under their id and their slots restart with the next molecules, until a call's ``n``
molecules have all been started and have all ended. A molecule that ends inside a chunk idles
(draws padding) until the chunk is over. So a slot is busy for a molecule's own length plus less
than a chunk, not for the longest molecule of a fixed batch.

Ids are given in start order (by chunk, then slot), and the returned molecules are in id order:
which molecule gets an id does not depend on what it turns out to be, so any prefix of a call's
output is an unbiased sample (harvest order would favour short molecules).

Sampling is Gumbel-max over (temperature-scaled, top-k / top-p filtered) logits, which draws
exactly from the filtered softmax. The uniform noise is one ``torch.rand(chunk, batch_size,
vocab)`` per chunk from the call's generator, so a call is reproducible for a given seed, batch
size, chunk and device; slot b at step j of a chunk uses noise[j, b]. Everything stays on the
device: tokens, positions, the finished mask and log-likelihoods are device tensors.

The reported log-likelihood of a sample is log p(tokens, eos) under the model itself
(temperature 1, no filtering): the score ``score-molecules`` gives the same string.

Two implementations of the same loop: ``sample_refill_reference`` (the model's own ``step()``,
eager; the CPU sampler) and, on CUDA, ``FastSampler`` (the chunk's steps replayed from one CUDA
graph), checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from seqssm.errors import SeqssmError


@dataclass
class SampleBatch:
    tokens: torch.Tensor  # [n, T] int64 on CPU, pad after eos (T: the longest molecule returned)
    log_likelihood: torch.Tensor  # [n] float64
    ended: torch.Tensor  # [n] bool: produced eos within max_len
    steps: int  # recurrent steps run by the call (all slots at once)
    lengths: torch.Tensor | None = None  # [n] int64: tokens drawn, eos included
    slots: int = 0  # the batch size (slots) that ran them

    @property
    def utilisation(self) -> float:
        """Slot-steps that drew a token of a returned molecule / all slot-steps run."""
        return float(self.lengths.sum()) / max(1, self.steps * self.slots)


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0 or not math.isfinite(temperature):
        raise SeqssmError(f"--temperature must be a positive number, not {temperature}")
    if top_k < 0:
        raise SeqssmError(f"--top-k must be >= 0 (0 = off), not {top_k}")
    if not 0 < top_p <= 1:
        raise SeqssmError(f"--top-p must be in (0, 1], not {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits with everything outside the top-k / nucleus set to -inf (float32)."""
    x = logits.float() / temperature
    v = x.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(srt, dim=-1)
        # keep a token if the mass before it is < top_p (so the top token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return x


def gumbel_pick(filtered: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """argmax(filtered + Gumbel noise) from uniform noise in [0, 1)."""
    u = uniform.clamp(min=1e-20, max=1.0 - 1e-7)
    return torch.argmax(filtered - torch.log(-torch.log(u)), dim=-1)


def batch_generator(seed: int, batch_no: int, device: torch.device) -> torch.Generator:
    """The noise generator of sampling call ``batch_no``: a pure function of (seed, call)."""
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(batch_no) * 7919 + 12345) % (2**63 - 1))
    return g


def _advance(logits, tok_prev_done, uniform, *, temperature, top_k, top_p, eos_id, pad_id, bos_id=None):
    """One sampling decision: next tokens, their model log-probabilities, the new finished mask.

    Padding and begin tokens are never drawn (they would vanish from the decoded SMILES)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    allowed = logits.float().clone()
    for i in (pad_id,) if bos_id is None else (pad_id, bos_id):
        allowed[..., i] = float("-inf")  # a fill kernel: no host data, safe inside CUDA-graph capture
    nxt = gumbel_pick(filter_logits(allowed, temperature, top_k, top_p), uniform)
    lp = logp.gather(-1, nxt[:, None])[:, 0]
    done = tok_prev_done
    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
    lp = torch.where(done, torch.zeros_like(lp), lp)
    return nxt, lp, done | (nxt == eos_id)


class _Slots:
    """What the slots hold between steps: device tensors, updated in place when ``static`` (the
    CUDA-graph buffers); ``state`` is the model's step state for all slots."""

    def __init__(self, model, batch_size: int, state: list, *, device, static: bool):
        cfg, B = model.cfg, batch_size
        self.T = cfg.max_len - 1  # tokens a molecule may draw
        self.state, self.static = state, static
        self.tok = torch.full((B,), cfg.pad_id, dtype=torch.long, device=device)  # the next step's input
        self.fin = torch.ones(B, dtype=torch.bool, device=device)  # finished: draws padding, nothing else
        self.eos = torch.zeros(B, dtype=torch.bool, device=device)  # drew eos
        self.ll = torch.zeros(B, dtype=torch.float64, device=device)
        self.pos = torch.zeros(B, dtype=torch.long, device=device)  # tokens drawn
        # column T takes the padding a finished full-length row writes at its position
        self.out = torch.full((B, self.T + 1), cfg.pad_id, dtype=torch.long, device=device)
        self.mol = torch.zeros(B, dtype=torch.long, device=device)  # id of the slot's molecule
        self.active = torch.zeros(B, dtype=torch.bool, device=device)  # holds a molecule of this call

    def clear(self) -> None:
        """No molecule anywhere: every slot is free at the first boundary."""
        self.active.zero_()
        self.fin.fill_(True)


class _Results:
    """Finished molecules filed by id on the device (row n takes what is not a harvest)."""

    def __init__(self, n: int, T: int, cfg, device):
        dt = torch.int16 if cfg.vocab_size <= 2**15 else torch.int32  # a quarter of the bytes of int64
        self.n = n
        self.tokens = torch.full((n + 1, T), cfg.pad_id, dtype=dt, device=device)
        self.ll = torch.zeros(n + 1, dtype=torch.float64, device=device)
        self.eos = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.len = torch.zeros(n + 1, dtype=torch.long, device=device)
        self.next = torch.zeros((), dtype=torch.long, device=device)  # id the next started molecule gets

    def batch(self, steps: int, slots: int) -> SampleBatch:
        n = self.n
        lengths = self.len[:n].cpu()
        width = max(1, int(lengths.max())) if n else 1
        return SampleBatch(self.tokens[:n, :width].long().cpu(), self.ll[:n].cpu(), self.eos[:n].cpu(), steps,
                           lengths, slots)


def draw_noise(buf: torch.Tensor, generator: torch.Generator) -> None:
    """A chunk's uniform noise [chunk, B, V], drawn the same way by both samplers."""
    torch.rand(buf.shape, generator=generator, device=buf.device, dtype=buf.dtype, out=buf)


def _slot_step(model, s: _Slots, noise: torch.Tensor, kw: dict) -> None:
    """One recurrent step of every slot: nothing here reads a host value (it is graph-captured)."""
    logits, state = model.step(s.tok, s.state)
    if s.static:
        _copy_state(s.state, state)
    else:
        s.state = state
    nxt, lp, fin = _advance(logits.float(), s.fin, noise, **kw)  # finished rows: padding, 0
    s.out.scatter_(1, s.pos[:, None], nxt[:, None])
    s.ll.add_(lp.double())
    s.eos.logical_or_(nxt == kw["eos_id"])
    s.pos.add_((~s.fin).long())
    torch.logical_or(fin, s.pos >= s.T, out=s.fin)
    s.tok.copy_(nxt)


def _boundary(s: _Slots, r: _Results, cfg) -> bool:
    """Between chunks: file the molecules that ended under their ids, start the next ids in the
    freed slots (lowest slot first), and say whether any slot still holds a molecule."""
    n = r.n
    harv = s.fin & s.active
    dst = torch.where(harv, s.mol, n)
    r.tokens.index_copy_(0, dst, s.out[:, :s.T].to(r.tokens.dtype))
    r.ll.index_copy_(0, dst, s.ll)
    r.eos.index_copy_(0, dst, s.eos)
    r.len.index_copy_(0, dst, s.pos)
    free = harv | ~s.active
    new = r.next + torch.cumsum(free, 0) - 1
    start = free & (new < n)
    s.mol.copy_(torch.where(start, new, s.mol))
    s.active.copy_(torch.where(free, start, s.active))
    r.next.add_(start.sum())
    if not bool(s.active.any()):  # the host looks here (and at the freed rows below), once per chunk
        return False
    _zero_state_rows(s.state, free.nonzero()[:, 0])  # indices: only the freed rows are written
    s.tok.masked_fill_(free, cfg.bos_id)
    s.ll.masked_fill_(free, 0.0)
    s.pos.masked_fill_(free, 0)
    s.eos.masked_fill_(free, False)
    s.fin.copy_(torch.where(free, ~start, s.fin))  # freed but not restarted: idle for good
    s.out.masked_fill_(free[:, None], cfg.pad_id)
    return True


def _zero_state_rows(state, rows: torch.Tensor) -> None:
    from seqssm.layers.s4 import KernelHistory

    for st in state:
        if isinstance(st, KernelHistory):
            st.restart_rows(rows)
        else:
            st.index_fill_(0, rows, 0)


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    out = []
    for s in state:
        out.extend(_tensors(s))
    return out


def _copy_state(dst, src) -> None:
    """Write a step's new state into the static buffers (a no-op where the step worked in place)."""
    for d, s in zip(_tensors(dst), _tensors(src)):
        if d.data_ptr() != s.data_ptr():
            d.copy_(s)


def _advance_kw(cfg, temperature: float, top_k: int, top_p: float) -> dict:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                bos_id=cfg.bos_id)


@torch.no_grad()
def sample_refill_reference(model, n: int, batch_size: int, *, temperature: float = 1.0, top_k: int = 0,
                            top_p: float = 1.0, generator: torch.Generator, device, chunk: int = 8,
                            state_mode: str = "recurrent") -> SampleBatch:
    """``n`` molecules from ``batch_size`` refilled slots with the model's own eager ``step()``
    (the plain twin of ``FastSampler``; see the module docstring for the schedule).

    ``state_mode``: "recurrent" (SSM states) or "history" (the convolution-history step: the same
    outputs, cheaper on a CPU)."""
    if n < 0 or batch_size < 1 or chunk < 1:
        raise ValueError(f"need n >= 0, batch_size >= 1, chunk >= 1; got {n}, {batch_size}, {chunk}")
    device = torch.device(device)
    cfg = model.cfg
    model.setup_step()
    s = _Slots(model, batch_size, model.default_state(batch_size, device=device, mode=state_mode), device=device,
               static=False)
    r = _Results(n, s.T, cfg, device)
    kw = _advance_kw(cfg, temperature, top_k, top_p)
    noise = torch.empty(chunk, batch_size, cfg.vocab_size, device=device)
    steps = 0
    while _boundary(s, r, cfg):
        draw_noise(noise, generator)
        for j in range(chunk):
            _slot_step(model, s, noise[j], kw)
        steps += chunk
    return r.batch(steps, batch_size)


@torch.no_grad()
def score_smiles(model, tokenizer, smiles: list[str], *, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """log p(<bos> smiles <eos>) under the model for each SMILES (float64, natural log)."""
    from seqssm.models.s4_chem import sequence_log_likelihood

    model.eval()
    out = np.zeros(len(smiles), dtype=np.float64)
    order = sorted(range(len(smiles)), key=lambda i: len(smiles[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, lens = tokenizer.encode_batch([smiles[i] for i in idx], max_len=model.cfg.max_len)
        ll = sequence_log_likelihood(model, ids.to(device), lens.to(device))
        out[idx] = ll.double().cpu().numpy()
    return out


class ReferenceSampler:
    """``sampler(n, generator)``: n molecules with the model's own ``step()``; on a CPU by default
    with the convolution-history state (the recurrence's equal, at a fraction of the memory traffic)."""

    def __init__(self, model, batch_size: int, *, device, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, chunk: int | None = None, state_mode: str | None = None):
        self.model, self.batch_size, self.device = model, batch_size, torch.device(device)
        if chunk is None:  # the fastest measured: 8 on a 2-core CPU (boundaries cost), 2 on an H100 (idle slots cost)
            chunk = 2 if self.device.type == "cuda" else 8
        if state_mode is None:
            state_mode = "history" if self.device.type == "cpu" and model.cfg.max_len <= 256 else "recurrent"
        self.name = "convolution-history step (torch)" if state_mode == "history" else "recurrent step (torch)"
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, chunk=chunk, state_mode=state_mode)

    def __call__(self, n: int, generator: torch.Generator) -> SampleBatch:
        return sample_refill_reference(self.model, n, self.batch_size, generator=generator, device=self.device,
                                       **self.kw)


def make_sampler(model, batch_size: int, *, device, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 fast: str = "auto"):
    """The CUDA-graph sampler on CUDA (``fast`` auto/on), else the reference one; both are called
    as ``sampler(n, generator)``."""
    device = torch.device(device)
    if fast not in ("auto", "on", "off"):
        raise SeqssmError(f"--fast must be auto, on or off, not {fast!r}")
    if fast == "on" and device.type != "cuda":
        raise SeqssmError("--fast on needs a CUDA device")
    model.eval()
    if fast != "off" and device.type == "cuda":
        from seqssm.chem.fast_sampler import FastSampler

        return FastSampler(model, batch_size, device=device, temperature=temperature, top_k=top_k, top_p=top_p)
    return ReferenceSampler(model, batch_size, device=device, temperature=temperature, top_k=top_k, top_p=top_p)
