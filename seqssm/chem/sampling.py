"""Sampling SMILES from a chemical LM in recurrent mode, and scoring SMILES under it.

Sampling is Gumbel-max over (temperature-scaled, top-k / top-p filtered) logits, which draws
exactly from the filtered softmax; the uniform noise of every step comes from a generator seeded
by (seed, batch number), so a run is reproducible for a given seed, batch size and device.
Everything stays on the device: tokens, the finished mask and log-likelihoods are device
tensors, and the host looks only every ``check_every`` steps whether the whole batch has
ended (one synchronisation per chunk, none per step).

The reported log-likelihood of a sample is log p(tokens, eos) under the model itself
(temperature 1, no filtering): the score ``score-molecules`` gives the same string.

Two step implementations share this loop: the model's own ``step()`` (the reference) and, on
CUDA, a CUDA-graph replay of ``check_every`` steps (``FastSampler``), checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from seqssm.errors import SeqssmError


@dataclass
class SampleBatch:
    tokens: torch.Tensor  # [B, T] int64 on CPU, pad after eos
    log_likelihood: torch.Tensor  # [B] float64
    ended: torch.Tensor  # [B] bool: produced eos within max_len
    steps: int  # recurrent steps run for this batch


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


@torch.no_grad()
def sample_batch_reference(model, batch_size: int, *, max_len: int, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0, generator: torch.Generator, device: torch.device,
                           check_every: int = 8, state_mode: str = "recurrent") -> SampleBatch:
    """Sample ``batch_size`` sequences with the model's own ``step()`` (the reference path).

    ``state_mode``: "recurrent" (SSM states) or "history" (the convolution-history step: the same
    outputs, cheaper on a CPU)."""
    cfg = model.cfg
    model.setup_step()
    state = model.default_state(batch_size, device=device, mode=state_mode)
    tok = torch.full((batch_size,), cfg.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    ll = torch.zeros(batch_size, dtype=torch.float64, device=device)
    out = torch.full((batch_size, max_len - 1), cfg.pad_id, dtype=torch.long, device=device)
    vocab = cfg.vocab_size
    steps = 0
    total = max_len - 1
    for t in range(total):
        if t % check_every == 0:  # noise is drawn a chunk at a time, as the CUDA-graph sampler does
            noise = torch.rand(min(check_every, total - t), batch_size, vocab, generator=generator, device=device)
        logits, state = model.step(tok, state)
        tok, lp, done = _advance(logits, done, noise[t % check_every], temperature=temperature, top_k=top_k,
                                 top_p=top_p, eos_id=cfg.eos_id, pad_id=cfg.pad_id, bos_id=cfg.bos_id)
        out[:, t] = tok
        ll += lp.double()
        steps = t + 1
        if (t + 1) % check_every == 0 and bool(done.all()):
            break
    return SampleBatch(out[:, :steps].cpu(), ll.cpu(), done.cpu(), steps)


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
    """Draws one batch per call with the model's own ``step()``; on a CPU by default with the
    convolution-history state (the recurrence's equal, at a fraction of the memory traffic)."""

    def __init__(self, model, batch_size: int, *, device, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, check_every: int = 8, state_mode: str | None = None):
        self.model, self.batch_size, self.device = model, batch_size, torch.device(device)
        if state_mode is None:
            state_mode = "history" if self.device.type == "cpu" and model.cfg.max_len <= 256 else "recurrent"
        self.name = "convolution-history step (torch)" if state_mode == "history" else "recurrent step (torch)"
        self.kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, check_every=check_every,
                       state_mode=state_mode)

    def __call__(self, generator: torch.Generator) -> SampleBatch:
        return sample_batch_reference(self.model, self.batch_size, max_len=self.model.cfg.max_len,
                                      generator=generator, device=self.device, **self.kw)


def make_sampler(model, batch_size: int, *, device, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 fast: str = "auto"):
    """The CUDA-graph sampler on CUDA (``fast`` auto/on), else the reference one."""
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
