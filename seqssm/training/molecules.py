"""Chemical language-model training: encoded SMILES sets, batches, loss, the epoch loop, checkpoints.

Objective: next-token cross-entropy over ``<bos> SMILES <eos>`` sequences; padding is never a
target, so the loss is the mean NLL per real token (the reference S4 code also scores padding,
which flatters its loss). Batches are trimmed to their longest member (rounded up to a multiple
of 8, so few kernel shapes occur), and the batch order is a pure function of (seed, epoch):
a resumed run continues the same stream.

Optimizer: AdamW. Weight decay only on matrices; the S4 state-space parameters (A, B, P, dt —
whatever a layer lists in ``ssm_parameters()``) get their own group with no weight decay and a
learning rate capped at ``ssm_lr`` (S4 convention: these are sensitive to large steps). Learning
rate: linear warm-up, then cosine to ``min_lr`` (or constant). bf16 autocast on CUDA.

Evaluation: validation NLL per token (and perplexity) on the whole held-out set. The best model by
validation loss is kept in ``RUN/best`` (a model directory); with ``patience`` the run stops after
that many evaluations without improvement (early stopping for fine-tuning on few actives).
Checkpoints as in ``seqssm.training.lm``: ``RUN/checkpoints/step-*`` (model directory +
optimizer.pt + trainer_state.json), written atomically, LATEST updated last.

Under torchrun (DDP) every rank builds the same global batch and trains on its contiguous share
of the molecules, padded to the global batch's width; the loss is normalised by the global token
count, so the averaged gradient is the single-process one. The last batch of an epoch may give a
rank fewer molecules, or none (it then runs one molecule with weight 0 to join the gradient sum).
Validation batches are dealt round-robin to the ranks and the sums added up.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqssm.distributed import SINGLE, Dist, Replica, lockstep_batches, seed_rank
from seqssm.errors import SeqssmError
from seqssm.training.lm import (
    CURVES,
    METRICS,
    Callbacks,
    MetricsLog,
    StopRule,
    adamw,
    autocast_for,
    gather_rng,
    plot_curves,
    read_checkpoint_state,
    restore_optimizer,
    warmup_cosine,
    write_checkpoint,
)

IGNORE = -100
BEST = "best"


@dataclass
class MolTrainConfig:
    """Optimisation settings of a chemical-LM run (saved in trainer_state.json)."""

    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-4
    ssm_lr: float = 1e-3
    schedule: str = "cosine"  # or "constant" (after warm-up)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 0  # optimizer steps; 0 = once per epoch
    save_every: int = 0  # optimizer steps; 0 = at every evaluation
    patience: int = 0  # evaluations without a better validation loss before stopping; 0 = never
    eval_batch_size: int = 0  # 0 = batch_size
    log_every: int = 50
    keep_checkpoints: int = 1  # newest step-* checkpoints kept (best/ is kept apart)
    seed: int = 0
    split_seed: int | None = None  # seed of the validation hold-out; None = seed (so --seed alone changes both)

    def validate(self) -> None:
        if self.epochs < 1:
            raise SeqssmError(f"--epochs must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise SeqssmError(f"--batch-size must be at least 1, not {self.batch_size}")
        if not (self.lr > 0 and self.ssm_lr > 0) or self.min_lr < 0:
            raise SeqssmError("learning rates must be positive (--min-lr may be 0)")
        if self.schedule not in ("cosine", "constant"):
            raise SeqssmError(f"--schedule must be cosine or constant, not {self.schedule!r}")
        if self.keep_checkpoints < 1:
            raise SeqssmError(f"--keep-checkpoints must be at least 1, not {self.keep_checkpoints}")
        if self.patience < 0 or self.eval_every < 0 or self.save_every < 0 or self.warmup_steps < 0:
            raise SeqssmError("--patience, --eval-every, --save-every and --warmup-steps must be >= 0")


# ----------------------------------------------------------------------------- data


@dataclass
class EncodedSet:
    """Token ids of a SMILES set, right-padded: ``tokens`` [N, max_len] (uint8, or int16 for
    vocabularies over 255) and ``lengths`` [N] counting bos and eos."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_targets(self) -> int:
        return int((self.lengths.long() - 1).sum())

    def to(self, device) -> "EncodedSet":
        return EncodedSet(self.tokens.to(device), self.lengths.to(device))


def encode_set(tokenizer, smiles: list[str], max_len: int, *, n_jobs: int = 1) -> EncodedSet:
    """Encode SMILES (already checked to fit) into a compact padded tensor; `n_jobs` worker
    processes for big sets (tens of millions of random forms take minutes in one process)."""
    from seqssm.chem.data import parallel_chunks

    dtype = np.uint8 if len(tokenizer) <= 256 else np.int16
    parts = parallel_chunks(_EncodeChunk(tokenizer.tokens, max_len, dtype), list(smiles), n_jobs, chunk=20_000)
    if not parts:
        return EncodedSet(torch.from_numpy(np.zeros((0, max_len), dtype)), torch.zeros(0, dtype=torch.int16))
    tokens = np.concatenate([t for t, _ in parts])
    lengths = np.concatenate([n for _, n in parts])
    return EncodedSet(torch.from_numpy(tokens), torch.from_numpy(lengths))


class _EncodeChunk:
    """Picklable worker: ids [n, max_len] (pad-filled) and lengths [n] of a chunk of SMILES."""

    def __init__(self, vocabulary: list[str], max_len: int, dtype):
        self.vocabulary, self.max_len, self.dtype = list(vocabulary), max_len, dtype

    def __call__(self, chunk: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from seqssm.chem.tokenizer import SmilesTokenizer, smiles_error

        tok = SmilesTokenizer(self.vocabulary)
        ids = np.full((len(chunk), self.max_len), tok.pad_id, dtype=self.dtype)
        lengths = np.zeros(len(chunk), dtype=np.int16)
        for row, smi in enumerate(chunk):
            e = tok.encode(smi)
            if len(e) > self.max_len:
                raise smiles_error(smi, f"{len(e)} tokens with <bos> and <eos>, more than the maximum {self.max_len}")
            ids[row, : len(e)] = e
            lengths[row] = len(e)
        return ids, lengths


def padded_length(longest: int, max_len: int) -> int:
    """Batch width: the longest member rounded up to a multiple of 8, at most ``max_len``."""
    return min(max_len, -(-longest // 8) * 8)


def batch_tensor(data: EncodedSet, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of ``data`` as int64 on ``device``, trimmed to the batch's padded length."""
    width = padded_length(int(data.lengths[idx].max()), data.tokens.shape[1])
    return data.tokens[idx, :width].to(device, non_blocking=True).long()


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch`` (pure function of seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def token_nll_sum(logits: torch.Tensor, x: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (float32) of predicting x[:, 1:] from logits[:, :-1], padding ignored; and the target count."""
    y = x[:, 1:]
    y = torch.where(y == pad_id, torch.full_like(y, IGNORE), y)
    lg = logits[:, : y.shape[1]].float()
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return nll, (y != IGNORE).sum()


@torch.no_grad()
def evaluate_set(model, data: EncodedSet, *, device: torch.device, batch_size: int, pad_id: int,
                 dist: Dist = SINGLE) -> dict:
    """Mean NLL per token and perplexity over the whole set (in length order, to pad little)."""
    was = model.training
    model.eval()
    order = torch.argsort(data.lengths.cpu(), stable=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    starts = range(0, len(data), batch_size)
    mine = lockstep_batches(len(starts), dist, lockstep=False) if dist.enabled else range(len(starts))
    try:
        for k in mine:
            s = starts[k]
            idx = order[s:s + batch_size].to(data.tokens.device)
            x = batch_tensor(data, idx, device)
            with autocast_for(device):
                logits = model(x[:, :-1])
            nll, n = token_nll_sum(logits, x, pad_id)
            total += nll.double()
            count += int(n)
    finally:
        model.train(was)
    if dist.enabled:
        total, count = dist.all_sum([float(total), count])
        count = int(count)
    loss = float(total) / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count,
            "val_molecules": len(data)}


def param_groups(model: torch.nn.Module, cfg: MolTrainConfig) -> list[dict]:
    """Three groups: decayed matrices, undecayed vectors, and the S4 state-space parameters."""
    ssm: list[torch.nn.Parameter] = []
    for m in model.modules():
        fn = getattr(m, "ssm_parameters", None)
        if callable(fn) and m is not model:
            ssm.extend(p for p in fn() if p.requires_grad)
    ssm_ids = {id(p) for p in ssm}
    decay, no_decay, seen = [], [], set(ssm_ids)
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and min(p.shape) > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr}]
    if ssm:
        groups.append({"params": list({id(p): p for p in ssm}.values()), "weight_decay": 0.0,
                       "base_lr": min(cfg.ssm_lr, cfg.lr)})
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- trainer


@dataclass
class MolTrainOutcome:
    step: int
    epoch: int
    finished: bool
    reason: str
    best: dict | None
    last_eval: dict | None
    checkpoint: Path | None


@dataclass
class _Progress:
    """Where a run stands; saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best: dict | None = None  # the evaluation record of the best model so far
    evals_since_best: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


class MoleculeTrainer:
    """Trains an S4 chemical LM on an encoded SMILES set; resumable at any checkpoint.

    ``save_model(model, directory, info)`` writes a model directory (the pipeline passes one that
    also writes the vocabulary), so checkpoints and ``best/`` load like any model.
    """

    def __init__(self, model, train: EncodedSet | list[EncodedSet], valid: EncodedSet, cfg: MolTrainConfig, *,
                 run_dir: Path,
                 device: torch.device, save_model, extra_state: dict | None = None,
                 callbacks: Callbacks | None = None, compile: bool = False, plot: bool = True,
                 dist: Dist = SINGLE):
        cfg.validate()
        # A list holds the same molecules written differently (random SMILES): epoch e trains on
        # form e mod k, so every epoch sees each molecule once, in a new spelling.
        forms = list(train) if isinstance(train, (list, tuple)) else [train]
        if not forms or len({len(f) for f in forms}) != 1:
            raise SeqssmError("the training forms must be one or more encoded sets of the same molecules")
        train = forms[0]
        if len(train) == 0 or len(valid) == 0:
            raise SeqssmError("training and validation sets must each hold at least one molecule")
        self.cfg = cfg
        self.device = device
        self.dist = dist
        self.model = model.to(device)
        self.replica = Replica(self.model, dist)
        train_fwd = self.replica.train  # the DDP wrapper under torchrun
        self.forward_model = torch.compile(train_fwd, dynamic=False) if compile else train_fwd
        self.pad_id = int(model.cfg.pad_id)
        # Keep the data where the model is: a batch is then one gather, no host round trip.
        self.train_forms = [f.to(device) for f in forms] if device.type == "cuda" else forms
        self.valid = valid.to(device) if device.type == "cuda" else valid
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.save_model = save_model
        self.extra_state = dict(extra_state or {})
        self.cb = callbacks or Callbacks()
        self.plot = plot
        # torch.compile wants one shape: then every batch is full and padded to the set's widest
        # molecule (the last partial batch of each shuffled epoch is left out).
        widest = max(int(f.lengths.max()) for f in forms)
        self.fixed_width = padded_length(widest, train.tokens.shape[1]) if compile else None
        if compile and len(train) < cfg.batch_size:
            raise SeqssmError(f"--compile needs at least --batch-size ({cfg.batch_size}) training molecules")
        self.steps_per_epoch = len(train) // cfg.batch_size if compile else -(-len(train) // cfg.batch_size)
        self.max_steps = cfg.epochs * self.steps_per_epoch
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.save_every = cfg.save_every or self.eval_every
        self.optimizer = adamw(param_groups(self.model, cfg), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, device=device)
        self.metrics = MetricsLog(self.run_dir / METRICS)
        self.p = _Progress()
        self.last_eval: dict | None = None
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None
        self._order: tuple[int, torch.Tensor] | None = None
        self._pending: list = []
        self._window_start: float | None = None
        self._eval_seconds = 0.0
        self._save_seconds = 0.0
        if dist.enabled:
            seed_rank(cfg.seed, dist.rank)  # the same init everywhere, different dropout masks per rank

    # -- bookkeeping
    @property
    def step(self) -> int:
        return self.p.step

    @property
    def epoch(self) -> int:
        return self.p.step // self.steps_per_epoch

    def state(self) -> dict:
        return {"step": self.p.step, "epoch": self.epoch, "tokens_seen": self.p.tokens_seen,
                "train_seconds": round(self.p.train_seconds, 3), "best": self.p.best,
                "evals_since_best": self.p.evals_since_best, "stopped_early": self.p.stopped_early,
                "train_config": asdict(self.cfg), "model_config": asdict(self.model.cfg),
                "last_eval": self.last_eval, **self.extra_state}

    def resume(self, ckpt: Path) -> dict:
        from seqssm.models.s4_chem import S4ChemLM

        ckpt = Path(ckpt)
        loaded = S4ChemLM.from_pretrained(ckpt)
        try:
            self.model.load_state_dict(loaded.state_dict(), strict=True)
        except RuntimeError as e:
            raise SeqssmError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None
        st = read_checkpoint_state(ckpt)
        restore_optimizer(ckpt, self.optimizer, self.device, replica=self.replica if self.dist.enabled else None,
                          seed=self.cfg.seed, step=int(st["step"]))
        self.p = _Progress(step=int(st["step"]), tokens_seen=int(st.get("tokens_seen", 0)),
                           train_seconds=float(st.get("train_seconds", 0.0)), best=st.get("best"),
                           evals_since_best=int(st.get("evals_since_best", 0)),
                           stopped_early=bool(st.get("stopped_early", False)))
        self.last_eval = st.get("last_eval")
        self.last_checkpoint = ckpt
        self._checkpoint_step = self.p.step
        if self.dist.is_main:
            self.metrics.truncate_after(self.p.step)
        return st

    def save(self) -> Path:
        """Rank 0 writes the checkpoint (with every rank's RNG state); all ranks wait until it is on disk."""
        t0 = time.monotonic()
        info = {"checkpoint": True, "step": self.p.step, "epoch": self.epoch}
        rng_ranks = gather_rng(self.dist)
        path = self.run_dir / "checkpoints" / f"step-{self.p.step:08d}"
        if self.dist.is_main:
            path = write_checkpoint(self.run_dir / "checkpoints", f"step-{self.p.step:08d}",
                                    lambda tmp: self.save_model(self.model, tmp, info), self.optimizer, self.state(),
                                    keep=self.cfg.keep_checkpoints, rng_ranks=rng_ranks)
        self.dist.barrier()
        self._save_seconds = time.monotonic() - t0
        self._checkpoint_step = self.p.step
        self.last_checkpoint = path
        self.cb.on_checkpoint(self, path)
        return path

    def _save_best(self, rec: dict) -> None:
        final = self.run_dir / BEST
        tmp = self.run_dir / f".tmp-{BEST}"
        if tmp.exists():
            shutil.rmtree(tmp)
        self.save_model(self.model, tmp, {"best": True, "step": rec["step"], "epoch": rec["epoch"],
                                          "val_loss": rec["val_loss"], "val_ppl": rec["val_ppl"]})
        if final.exists():
            old = self.run_dir / f".old-{BEST}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)

    # -- work
    def lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.schedule == "constant":
            return min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return warmup_cosine(step, peak=1.0, floor=cfg.min_lr / cfg.lr, warmup_steps=cfg.warmup_steps,
                             total_steps=self.max_steps)

    def _batch_index(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            perm = torch.from_numpy(epoch_order(len(self.train_forms[0]), self.cfg.seed, epoch))
            self._order = (epoch, perm.to(self.train_forms[0].tokens.device))
        return self._order[1][k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]

    def train_step(self) -> None:
        """One optimizer step, queued on the device: nothing here waits for the GPU, so the host
        runs ahead and keeps it busy; ``flush()`` collects the losses every few steps."""
        if self._window_start is None:
            self._window_start = time.perf_counter()
        factor = self.lr_factor(self.p.step)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        idx = self._batch_index(self.p.step)
        data = self.train_forms[(self.p.step // self.steps_per_epoch) % len(self.train_forms)]
        if self.fixed_width:
            x = data.tokens[idx, : self.fixed_width].to(self.device, non_blocking=True).long()
        else:
            x = batch_tensor(data, idx, self.device)
        positions = x.numel() - x.shape[0]
        if self.dist.enabled:
            nll, n = self._shard_loss(x)
        else:
            with autocast_for(self.device):
                logits = self.forward_model(x[:, :-1])
            nll, n = token_nll_sum(logits, x, self.pad_id)
            (nll / n.clamp(min=1)).backward()
        if self.cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            gnorm = torch.full((), float("nan"), device=nll.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.p.step += 1
        self._pending.append((nll.detach(), n, gnorm.detach(), positions, self.cfg.lr * factor))

    def _shard_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward of this rank's rows of the global batch ``x``; (summed NLL, targets) of those rows.

        The loss is scaled by world / (global target count): DDP's average over the ranks is then the
        single-process mean over the global batch. A rank left without rows runs the first molecule
        with weight 0, so that it still joins the gradient all-reduce."""
        world = self.dist.world_size
        n_global = (x[:, 1:] != self.pad_id).sum()
        rows = self.dist.rows(x.shape[0])
        empty = rows.start == rows.stop
        xr = x[:1] if empty else x[rows]
        with autocast_for(self.device):
            logits = self.forward_model(xr[:, :-1])
        nll, n = token_nll_sum(logits, xr, self.pad_id)
        weight = 0.0 if empty else float(world)
        (nll * weight / n_global.clamp(min=1)).backward()
        if empty:
            return torch.zeros_like(nll), torch.zeros_like(n)
        return nll, n

    def flush(self) -> dict | None:
        """Wait for the queued steps; account for them and return the record of the window."""
        if not self._pending:
            return None
        vals = torch.stack([torch.stack([a.double(), b.double(), c.double()]) for a, b, c, _, _ in self._pending])
        if self.dist.enabled:  # every rank's NLL and target counts: the global batch's
            sums = self.dist.all_sum_(vals[:, :2].contiguous())
            vals = torch.cat([sums, vals[:, 2:]], dim=1)
        vals = vals.cpu()
        dt = time.perf_counter() - self._window_start
        k = len(self._pending)
        n_targets = int(vals[:, 1].sum())
        loss = float(vals[:, 0].sum()) / max(n_targets, 1)
        positions = sum(p for _, _, _, p, _ in self._pending)
        lr = self._pending[-1][4]
        self._pending.clear()
        self._window_start = None
        self.p.tokens_seen += n_targets
        self.p.train_seconds += dt
        return {"kind": "train", "step": self.p.step, "epoch": self.p.step / self.steps_per_epoch, "lr": lr,
                "loss": loss, "ppl": math.exp(min(loss, 50.0)), "grad_norm": float(vals[-1, 2]),
                "steps": k, "tokens": n_targets, "positions": positions, "tokens_per_s": n_targets / dt,
                "step_seconds": dt / k}

    def evaluate(self) -> dict:
        t0 = time.monotonic()
        res = evaluate_set(self.model, self.valid, device=self.device,
                           batch_size=self.cfg.eval_batch_size or self.cfg.batch_size, pad_id=self.pad_id,
                           dist=self.dist)
        self._eval_seconds = time.monotonic() - t0
        rec = {"kind": "eval", "step": self.p.step, "epoch": round(self.p.step / self.steps_per_epoch, 4), **res,
               "eval_seconds": round(self._eval_seconds, 3)}
        best = self.p.best
        rec["improved"] = best is None or rec["val_loss"] < best["val_loss"]
        if rec["improved"]:
            self.p.best = {k: rec[k] for k in ("step", "epoch", "val_loss", "val_ppl")}
            self.p.evals_since_best = 0
            if self.dist.is_main:
                self._save_best(rec)
        else:
            self.p.evals_since_best += 1
        self.last_eval = rec
        if self.dist.is_main:
            self.metrics.append(rec)
        self.cb.on_eval(self, rec)
        if self.plot and self.dist.is_main:
            self.plot_curves()
        return rec

    def plot_curves(self) -> None:
        with contextlib.suppress(Exception):  # a plot is a convenience; never fail a run for it
            plot_curves(self.metrics.path, self.run_dir / CURVES, eval_series=[("val_loss", "val_ppl", "validation")],
                        loss_unit="nats per token")

    def fit(self, stop: StopRule | None = None) -> MolTrainOutcome:
        """Train to the last epoch, early stop, or ``stop``; always leaves a checkpoint behind."""
        stop = stop or StopRule()
        self.model.train()
        self.cb.on_start(self)
        steps_this_run, step_time = 0, 0.0
        reason = "finished"
        sync_every = max(1, min(self.cfg.log_every, 10))
        while self.p.step < self.max_steps and not self.p.stopped_early:
            why = stop.why_stop(steps_this_run, step_time, save_seconds=self._save_seconds,
                                eval_seconds=self._eval_seconds, eval_next=(self.p.step + 1) % self.eval_every == 0,
                                dist=self.dist)
            if why:
                reason = why
                break
            self.train_step()
            steps_this_run += 1
            at_end = self.p.step >= self.max_steps
            boundary = self.p.step % self.eval_every == 0 or self.p.step % self.save_every == 0
            last_of_run = stop.max_steps_this_run is not None and steps_this_run >= stop.max_steps_this_run
            if steps_this_run == 1 or self.p.step % sync_every == 0 or at_end or boundary or last_of_run:
                rec = self.flush()
                step_time = rec["step_seconds"] if steps_this_run == 1 else 0.7 * step_time + 0.3 * rec["step_seconds"]
                if not math.isfinite(rec["loss"]):
                    raise SeqssmError(f"training diverged by step {self.p.step} (loss {rec['loss']}); lower --lr and "
                                      "resume from the last checkpoint or start over with --force")
                if (self.p.step % max(self.cfg.log_every, 1) < rec["steps"] or self.p.step == 1) and self.dist.is_main:
                    self.metrics.append(rec)
                self.cb.on_step(self, rec)
            if self.p.step % self.eval_every == 0 or at_end:
                self.evaluate()
                if self.cfg.patience and self.p.evals_since_best >= self.cfg.patience:
                    self.p.stopped_early = True
            if (self.p.step % self.save_every == 0 and not at_end) or self.p.stopped_early:
                self.save()
        rec = self.flush()  # steps queued since the last window (a stop between two syncs)
        if rec is not None and self.dist.is_main:
            self.metrics.append(rec)
        finished = self.p.step >= self.max_steps or self.p.stopped_early
        if finished:
            reason = ("early stop: no better validation loss in the last "
                      f"{self.cfg.patience} evaluations" if self.p.stopped_early else "finished")
            if self.p.best is None:
                self.evaluate()
        if self._checkpoint_step != self.p.step:
            self.save()
        return MolTrainOutcome(self.p.step, self.epoch, finished, reason, self.p.best, self.last_eval,
                               self.last_checkpoint)
