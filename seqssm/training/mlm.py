"""Masked language modeling (the Caduceus / BERT objective) on DNA token ids.

Masking (`mask_tokens`): each eligible position (A, C, G, T or N; never [PAD], [MASK] or another
special token) is selected with probability 0.15, independently (Bernoulli, as BERT and the
Caduceus code do; so the count varies around 15%). A selected position becomes [MASK] with
probability 0.8, a random base (A/C/G/T, uniform, so it may draw the base that was there) with
probability 0.1, and stays unchanged otherwise. Targets hold the original id at selected
positions and IGNORE (-100) elsewhere; the loss is the cross-entropy over the whole vocabulary at
the selected positions only. Everything random comes from an explicit torch.Generator:
`batch_generator(seed, step, micro)` makes masks a pure function of the step, so a resumed run
masks as an uninterrupted one would.

Differences from the reference training code (kuleshov-group/caduceus, src/dataloaders): it
replaces N by [PAD] before masking and ignores [PAD] targets (so N is never a target) and draws
its random replacements from the whole vocabulary; here N is an ordinary eligible token (models
trained here see N as N; see LoadedModel.n_as_pad for the published checkpoints) and random
replacements are bases. The held-out metrics (`evaluate_mlm`) count only masked positions whose
original base is A/C/G/T, so runs of N (trivial to predict inside an N gap) do not inflate them.

RC augmentation (`rc_augment`): for models that are not RC-equivariant (Caduceus-Ph, plain
Mamba), each training window is replaced by its reverse complement with probability 0.5. It is
applied before masking. Caduceus-PS needs none: it gives the same predictions on both strands by
construction (`wants_rc_augmentation`).

Optimizer (`CaduceusOptimConfig`, `mlm_param_groups`): AdamW with the Caduceus paper's settings
(lr 8e-3, betas (0.9, 0.95), weight decay 0.1, 10% linear warm-up then cosine to 1e-4, gradient
clipping 1.0). No weight decay for parameters marked `_no_weight_decay` (A_log, D), biases,
embeddings (and an LM head tied to them) and norm weights. (The reference's hook exempts
nn.LayerNorm but not mamba-ssm's RMSNorm module, so it decays RMSNorm gains; here every norm gain
is exempt.)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.distributed import SINGLE, Dist, lockstep_batches
from seqssm.layers.norm import RMSNorm
from seqssm.tokenizers.dna import A, BOS, C, CLS, COMPLEMENT_LUT, G, MASK, N, PAD, SEP, T, VOCAB_SIZE

IGNORE = -100
BASES = (A, C, G, T)
ELIGIBLE = (A, C, G, T, N)
# Tokens that frame a window and stay where they are when it is reverse-complemented.
LEADING_SPECIALS = (CLS, BOS)
TRAILING_SPECIALS = (SEP, PAD)


@dataclass(frozen=True)
class MaskingConfig:
    """BERT-style masking: select mlm_probability of the eligible positions; of those, mask_fraction
    become [MASK], random_fraction a random base, the rest stay as they are."""

    mlm_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    eligible: tuple[int, ...] = ELIGIBLE

    def __post_init__(self):
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mask_fraction and random_fraction must be >= 0 and sum to at most 1")
        if not self.eligible or any(not 0 <= int(t) < VOCAB_SIZE for t in self.eligible):
            raise ValueError(f"eligible must be token ids of the DNA vocabulary, got {self.eligible}")
        if MASK in self.eligible or PAD in self.eligible:
            raise ValueError("[MASK] and [PAD] can never be masked")


def batch_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, micro-batch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 1_009 + int(micro))


def mask_tokens(ids: torch.Tensor, generator: torch.Generator | None = None,
                cfg: MaskingConfig = MaskingConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [..., L] (integer) -> (inputs, targets), both int64 on ids' device.

    The random draws (three tensors of ids' shape) are made on the generator's device (the CPU
    when None: torch's default generator) and always in the same amount, so the result is a
    function of the generator's state and ids only.
    """
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"mask_tokens: expected integer token ids, got {ids.dtype}")
    ids = ids.long()
    gdev = generator.device if generator is not None else torch.device("cpu")
    select_u = torch.rand(ids.shape, generator=generator, device=gdev).to(ids.device)
    action_u = torch.rand(ids.shape, generator=generator, device=gdev).to(ids.device)
    random_base = torch.randint(0, len(BASES), ids.shape, generator=generator, device=gdev).to(ids.device)
    eligible = torch.isin(ids, torch.tensor(cfg.eligible, device=ids.device))
    selected = eligible & (select_u < cfg.mlm_probability)
    to_mask = selected & (action_u < cfg.mask_fraction)
    to_random = selected & (action_u >= cfg.mask_fraction) & (action_u < cfg.mask_fraction + cfg.random_fraction)
    inputs = torch.where(to_mask, torch.full_like(ids, MASK), ids)
    inputs = torch.where(to_random, torch.tensor(BASES, device=ids.device)[random_base], inputs)
    targets = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return inputs, targets


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (float32, natural log) at the positions whose target is not IGNORE.

    reduction "mean" (over those positions; 0 when there are none), "sum", or "none" ([..., L], 0 where ignored).
    """
    lg = logits.float().reshape(-1, logits.shape[-1])
    nll = F.cross_entropy(lg, targets.reshape(-1).long(), ignore_index=IGNORE, reduction="none")
    if reduction == "none":
        return nll.view(targets.shape)
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / (targets != IGNORE).sum().clamp(min=1)
    raise ValueError(f"mlm_loss: reduction must be mean, sum or none, got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# reverse-complement augmentation


def wants_rc_augmentation(config) -> bool:
    """RC augmentation is for models that are not RC-equivariant by construction (config.rcps false)."""
    return not bool(getattr(config, "rcps", False))


def reverse_complement_windows(ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reverse complement of every row of ids [B, L], keeping the frame in place.

    A leading run of [CLS]/[BOS] and the positions from `lengths` on (default: a trailing run of
    [SEP]/[PAD]) stay where they are; the body between is reversed and its bases complemented
    (N, [MASK] and other ids are their own complement).
    """
    if ids.dim() != 2:
        raise ValueError(f"reverse_complement_windows: ids must be [batch, length], got {tuple(ids.shape)}")
    B, L = ids.shape
    x = ids.long()
    pos = torch.arange(L, device=ids.device)
    lead_tok = torch.isin(x, torch.tensor(LEADING_SPECIALS, device=ids.device))
    start = torch.cumprod(lead_tok.long(), dim=1).sum(1)  # length of the leading run
    if lengths is None:
        trail_tok = torch.isin(x, torch.tensor(TRAILING_SPECIALS, device=ids.device))
        end = L - torch.cumprod(trail_tok.flip(1).long(), dim=1).sum(1)
    else:
        end = lengths.to(ids.device).long().clamp(0, L)
    end = torch.maximum(end, start)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    src = torch.where(inside, start[:, None] + end[:, None] - 1 - pos[None, :], pos[None, :])
    lut = torch.from_numpy(COMPLEMENT_LUT.astype(np.int64)).to(ids.device)
    moved = x.gather(1, src)
    return torch.where(inside, lut[moved], x).to(ids.dtype)


def rc_augment(ids: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reverse-complement each row of ids [B, L] with probability p: (ids, which rows [B] bool)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(ids.shape[0], generator=generator, device=gdev) < p).to(ids.device)
    return torch.where(flip[:, None], reverse_complement_windows(ids, lengths), ids), flip


def mlm_batch(ids: torch.Tensor, generator: torch.Generator, *, masking: MaskingConfig = MaskingConfig(),
              rc_aug: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch: (RC augmentation when rc_aug, then) masking -> (inputs, targets)."""
    if rc_aug:
        ids, _ = rc_augment(ids, generator)
    return mask_tokens(ids, generator, masking)


# ----------------------------------------------------------------------------------------------
# held-out evaluation


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_mlm(
    model: nn.Module,
    windows: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    seed: int = 0,
    masking: MaskingConfig = MaskingConfig(),
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dist: Dist = SINGLE,
    lockstep: bool = False,
) -> dict:
    """Masked-token loss, perplexity and accuracy on fixed held-out windows [n, L] (uint8 ids).

    Window i is masked with batch_generator(seed, i), so the masked positions are the same at
    every evaluation and do not depend on batch_size. Counted: masked positions whose original
    id is A/C/G/T. accuracy: the argmax over the whole vocabulary equals the original base.
    `prepare` maps the ids fed to the model (e.g. LoadedModel.prepare_inputs); targets are not
    changed by it. On CUDA the forward runs under bf16 autocast (logits compared in float32).
    Under torchrun (`dist`) the batches are dealt round-robin to the ranks and the sums added up,
    so every rank returns the single-process numbers (`lockstep`: FSDP, where every rank must run
    as many forwards as the others).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    nll_sum, correct, count, excluded = 0.0, 0, 0, 0
    base_ids = torch.tensor(BASES, device=device)
    starts = range(0, len(windows), batch_size)
    mine = lockstep_batches(len(starts), dist, lockstep=lockstep) if dist.enabled else range(len(starts))
    try:
        for k in mine:
            s = starts[k if k is not None else 0]
            chunk = torch.from_numpy(np.ascontiguousarray(windows[s:s + batch_size]).astype(np.int64))
            pairs = [mask_tokens(chunk[j], batch_generator(seed, s + j), masking) for j in range(len(chunk))]
            inputs = torch.stack([p[0] for p in pairs]).to(device)
            targets = torch.stack([p[1] for p in pairs]).to(device)
            if prepare is not None:
                inputs = prepare(inputs)
            with _autocast(device):
                logits = model(inputs)
            if k is None:
                continue  # a lockstep filler: the forward only keeps the ranks together
            logits = logits.float()
            counted = torch.isin(targets, base_ids)
            excluded += int(((targets != IGNORE) & ~counted).sum())
            t = torch.where(counted, targets, torch.full_like(targets, IGNORE))
            nll_sum += float(mlm_loss(logits, t, reduction="sum").double())
            correct += int(((logits.argmax(-1) == t) & counted).sum())
            count += int(counted.sum())
    finally:
        model.train(was_training)
    if dist.enabled:
        nll_sum, correct, count, excluded = dist.all_sum([nll_sum, correct, count, excluded])
        correct, count, excluded = int(round(correct)), int(round(count)), int(round(excluded))
    loss = nll_sum / count if count else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if count else float("nan"),
        "masked_accuracy": correct / count if count else float("nan"),
        "targets": count,
        "excluded_n_targets": excluded,
        "windows": int(len(windows)),
        "definition": mlm_definition(len(windows), windows.shape[1], masking, seed),
    }


def mlm_definition(n_windows: int, length: int, masking: MaskingConfig = MaskingConfig(), seed: int = 0) -> str:
    """What evaluate_mlm's numbers mean, in words (recorded with them)."""
    return (f"masked-token prediction on {n_windows} held-out windows of {length} bp, "
            f"{masking.mlm_probability:.0%} of positions masked (80/10/10, fixed seed {seed}); "
            "over the masked A/C/G/T positions: loss = mean NLL (nats), perplexity = exp(loss), "
            "masked_accuracy = argmax over the vocabulary equals the original base")


def no_context_baseline(train_ids, windows: np.ndarray, masking: MaskingConfig = MaskingConfig()) -> dict:
    """The no-context reference for the MLM metrics: the best prediction of a masked base from the
    token at its position alone (no neighbours), with the training set's base frequencies p as prior.

    At a selected position the model sees [MASK] (mask_fraction), a uniformly random base
    (random_fraction) or the true base (the rest); the Bayes posterior given the shown token is
    p(t) for [MASK] and proportional to p(t) * (keep * [t == s] + random / 4) for a shown base s.
    Scored on the held-out A/C/G/T composition q (masked positions are a uniform sample of them):
    masked_accuracy and loss (mean NLL, nats) are the expectations evaluate_mlm would report for
    this predictor. A trained model must beat it to be using the context.
    """
    k = len(BASES)
    counts = np.zeros(k, np.float64)
    for ids in train_ids:
        counts += np.bincount(np.asarray(ids).ravel(), minlength=VOCAB_SIZE)[list(BASES)]
    held = np.bincount(np.asarray(windows).ravel(), minlength=VOCAB_SIZE)[list(BASES)].astype(np.float64)
    if counts.sum() == 0 or held.sum() == 0:
        return {"masked_accuracy": float("nan"), "loss": float("nan"), "perplexity": float("nan")}
    p = np.maximum(counts / counts.sum(), 1e-12)
    q = held / held.sum()
    fm, fr = masking.mask_fraction, masking.random_fraction
    fk = 1.0 - fm - fr
    post = p[None, :] * (fk * np.eye(k) + fr / k)  # [shown s, true t]
    post /= post.sum(1, keepdims=True)
    guess = post.argmax(1)  # the prediction when base s is shown
    loss = acc = 0.0
    for t in range(k):
        shown = fk * np.eye(k)[t] + fr / k  # P(shown base s | true t, not masked)
        loss += q[t] * (fm * -np.log(p[t]) + (shown * -np.log(post[:, t])).sum())
        acc += q[t] * (fm * float(np.argmax(p) == t) + (shown * (guess == t)).sum())
    return {"masked_accuracy": float(acc), "loss": float(loss), "perplexity": math.exp(loss),
            "base_frequencies": {b: round(float(x), 5) for b, x in zip("ACGT", p)},
            "definition": "no context: each masked A/C/G/T base predicted from the token shown at its position "
                          "alone ([MASK], a random or the unchanged base), with the training base frequencies "
                          "as prior; expected held-out masked accuracy and perplexity"}


class MaskedLMObjective:
    """The MLM objective for the Trainer (see seqssm.training.lm.CausalLMObjective for the interface).

    Micro-batch m of step s: RC augmentation when `rc_aug`, (N -> [PAD] when `n_as_pad`,) then
    masking, all drawn from batch_generator(seed, s, m): a pure function of the step, so every rank
    of a torchrun job masks the global batch as one process does and a resumed run continues the
    same stream. Training loss: mean NLL over every masked position (N included unless n_as_pad);
    held-out metrics: evaluate_mlm (masked A/C/G/T positions, fixed masks, seed `eval_seed`).
    """

    name = "mlm"
    plot = {"eval_series": [("val_loss", "val_masked_accuracy", "held-out (masked A/C/G/T)")],
            "right": "accuracy", "loss_unit": "nats per masked base", "baseline_label": "no-context baseline"}

    def __init__(self, *, rc_aug: bool = False, n_as_pad: bool = False, masking: MaskingConfig = MaskingConfig(),
                 eval_seed: int = 0):
        self.rc_aug = rc_aug
        self.n_as_pad = n_as_pad
        self.masking = masking
        self.eval_seed = eval_seed

    def _prepare(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids == N, torch.full_like(ids, PAD), ids) if self.n_as_pad else ids

    def micro_batch(self, ids: np.ndarray, *, seed: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """mlm_batch, with N -> [PAD] (n_as_pad) after the RC flip, so an N run stays where it belongs."""
        g = batch_generator(seed, step, micro)
        x = torch.from_numpy(ids.astype(np.int64))
        if self.rc_aug:
            x, _ = rc_augment(x, g)
        return mask_tokens(self._prepare(x), g, self.masking)

    def loss_sum(self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor):
        nll = mlm_loss(logits, targets, "sum")
        correct = ((logits.detach().argmax(-1) == targets) & (targets != IGNORE)).sum()
        return nll, correct

    def no_decay_names(self, model: nn.Module) -> set[str]:
        return no_weight_decay_names(model)

    def eval_context(self, windows: np.ndarray) -> tuple:
        return ()

    def evaluate(self, model, windows, context, *, device, batch_size, dist=SINGLE, lockstep=False) -> dict:
        r = evaluate_mlm(model, windows, device=device, batch_size=batch_size, seed=self.eval_seed,
                         masking=self.masking, prepare=self._prepare if self.n_as_pad else None, dist=dist,
                         lockstep=lockstep)
        return {"val_windows": r["windows"], "val_targets": r["targets"],
                "val_excluded_n_targets": r["excluded_n_targets"], "val_loss": r["loss"], "val_ppl": r["perplexity"],
                "val_masked_accuracy": r["masked_accuracy"]}

    def heldout(self, rec: dict, seq_len: int) -> dict:
        """training.json's "heldout" (evaluate_mlm's dict) from an evaluation record."""
        return {"loss": rec["val_loss"], "perplexity": rec["val_ppl"], "masked_accuracy": rec["val_masked_accuracy"],
                "targets": rec["val_targets"], "excluded_n_targets": rec["val_excluded_n_targets"],
                "windows": rec["val_windows"],
                "definition": mlm_definition(rec["val_windows"], seq_len, self.masking, self.eval_seed)}


# ----------------------------------------------------------------------------------------------
# optimizer


@dataclass(frozen=True)
class CaduceusOptimConfig:
    """AdamW and schedule of the Caduceus paper's pretraining (Schiff et al. 2024, appendix / configs)."""

    lr: float = 8e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    min_lr: float = 1e-4
    warmup_fraction: float = 0.1  # of max_steps, linear from ~0, then cosine to min_lr
    grad_clip: float = 1.0

    def warmup_steps(self, max_steps: int) -> int:
        return int(round(self.warmup_fraction * max_steps))


_NORMS = (RMSNorm, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (as in named_parameters) of the parameters that get no weight decay."""
    exempt_ids: set[int] = set()
    for _, module in model.named_modules():
        blanket = isinstance(module, _NORMS + (nn.Embedding,))
        for pname, p in module.named_parameters(recurse=False):
            if blanket or pname.endswith("bias") or getattr(p, "_no_weight_decay", False):
                exempt_ids.add(id(p))
    return {name for name, p in model.named_parameters() if id(p) in exempt_ids}


def mlm_param_groups(model: nn.Module, weight_decay: float = CaduceusOptimConfig.weight_decay) -> list[dict]:
    """Two AdamW groups: decay (every other trainable parameter) and no decay (see no_weight_decay_names).

    A parameter shared by several modules (tied embeddings / LM head, tied in/out projections)
    appears once, exempt if any of its owners exempts it.
    """
    exempt = no_weight_decay_names(model)
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if name in exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_mlm_optimizer(model: nn.Module, cfg: CaduceusOptimConfig = CaduceusOptimConfig(),
                       device: torch.device | str | None = None) -> torch.optim.AdamW:
    """AdamW over mlm_param_groups (fused kernels on CUDA)."""
    kw = {"fused": True} if device is not None and torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(mlm_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **kw)
