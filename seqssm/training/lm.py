"""DNA language-model training: schedule, loop, evaluation, checkpoints, metrics.

The Trainer takes an objective; two exist:
* ``CausalLMObjective`` (HyenaDNA, causal Mamba): a causal model reads a window of ``seq_len`` ids
  and predicts base t from bases 0..t-1; cross-entropy over the model's whole vocabulary,
  averaged over the targets that are A, C, G or T (targets that are N or PAD are ignored).
* ``seqssm.training.mlm.MaskedLMObjective`` (Caduceus): masked language modeling (15% of the
  positions, 80/10/10), the loss averaged over the masked positions.
With gradient accumulation the loss of a step is the mean over every counted target of all its
micro-batches; under torchrun each rank divides its summed loss by the global count (see Trainer).

Optimizer: AdamW; the objective says which parameters get no weight decay (causal LM: all but
matrices, i.e. parameters with a dimension of 1 or fewer than 2 dimensions: biases, gains, the
filter's sine frequencies; MLM: the Caduceus recipe, see mlm.py). Learning rate: linear warm-up
over ``warmup_steps`` to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``.
On CUDA the forward runs under bf16 autocast (weights and optimizer state stay float32); on
CPU everything is float32.

Checkpoints: ``RUN/checkpoints/step-XXXXXXXX/`` is a seqssm model directory (config.json,
model.safetensors, tokenizer.json, training.json: ``load_model`` reads it) plus ``optimizer.pt``
(AdamW state and the torch/CUDA RNG states: plain tensors and dicts, readable with
``torch.load(weights_only=True)``) and ``trainer_state.json`` (step, tokens seen, train config,
model config, data split, last evaluation). The learning rate is a pure function of the step,
so the schedule needs no state of its own. A checkpoint is written into a temporary
directory and renamed into place, then ``RUN/checkpoints/LATEST`` is replaced atomically, so a
job cut at any instant leaves the previous complete checkpoint. Batches are a pure function of
(seed, step, micro-step), so a resumed run continues the same data stream; on CPU a run cut in
two reproduces an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from seqssm.io.atomic import atomic_write_text
from seqssm.distributed import SINGLE, Dist, Replica, lockstep_batches, seed_rank
from seqssm.errors import SeqssmError
from seqssm.training.data import DataSplit, WindowSampler, target_masks, validation_windows

IGNORE = -100
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
METRICS = "metrics.jsonl"
CURVES = "curves.png"


def config_to_dict(cfg) -> dict:
    """JSON-ready dict of a training config dataclass (tuples as lists)."""
    d = asdict(cfg)
    d["adam_betas"] = list(cfg.adam_betas)
    return d


def config_from_dict(cls, d: dict):
    """The config from a saved dict; unknown keys (from other seqssm versions) are ignored."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if "adam_betas" in kw:
        kw["adam_betas"] = tuple(kw["adam_betas"])
    return cls(**kw)


@dataclass
class TrainConfig:
    """Hyperparameters of the optimisation (the model's own config is separate)."""

    seq_len: int = 1024
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 200
    max_steps: int = 5000
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 500
    save_every: int = 250
    seed: int = 0
    eval_batch_size: int | None = None  # default: batch_size
    eval_max_windows: int | None = None  # periodic evals on an evenly spaced subset; the final eval is full
    keep_checkpoints: int = 1
    log_every: int = 50  # plain log lines when stderr is not a terminal

    to_dict = config_to_dict
    from_dict = classmethod(config_from_dict)

    def validate(self) -> None:
        checks = [
            (self.seq_len >= 12, "--seq-len must be >= 12"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.grad_accum >= 1, "--grad-accum must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (0 <= self.min_lr <= self.lr, "--min-lr must be within 0..--lr"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.save_every >= 1, "--save-every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SeqssmError(msg)


def warmup_cosine(step: int, *, peak: float, floor: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps`` to
    ``peak``, then cosine decay to ``floor`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    return warmup_cosine(step, peak=cfg.lr, floor=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                         total_steps=cfg.max_steps)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (every dimension > 1), none on vectors and scalars."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and min(p.shape) > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def adamw(groups: list[dict], *, lr: float, betas, eps: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over parameter groups (fused kernels on CUDA)."""
    kw = {}
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SeqssmError(f"--device {device!r}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SeqssmError(f"--device {device}: CUDA is not available on this machine")
    return dev


def next_base_targets(x: torch.Tensor) -> torch.Tensor:
    """Targets for logits[:, :-1]: x[:, 1:], with every non-ACGT id (N, PAD, specials) ignored."""
    y = x[:, 1:].long()
    return torch.where((y >= 7) & (y <= 10), y, torch.full_like(y, IGNORE))


def token_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-target NLL [B, L-1] in float32 (0 where the target is ignored)."""
    lg = logits[:, :-1].float()
    y = next_base_targets(x)
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="none")
    return nll.view(y.shape)


def matrix_decay_exempt(model: torch.nn.Module) -> set[str]:
    """Names of the parameters ``param_groups`` exempts from weight decay (all but matrices)."""
    return {n for n, p in model.named_parameters() if not (p.ndim >= 2 and min(p.shape) > 1)}


def groups_by_name(model: torch.nn.Module, exempt: set[str], weight_decay: float) -> list[dict]:
    """AdamW groups [decay, no decay] from parameter names, in named_parameters order (so the
    optimizer state of a checkpoint keeps its indices). Names are taken before any data-parallel
    wrapping: FSDP2 keeps the names but not the attributes (``_no_weight_decay``) of the parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class CausalLMObjective:
    """Next-base prediction: targets are the window shifted by one, A/C/G/T only (N, PAD ignored).

    The interface every objective of the Trainer has:
      micro_batch(ids, seed=, step=, micro=)  global micro-batch of uint8 windows -> (inputs, targets),
                                              CPU int64, a pure function of its arguments
      loss_sum(logits, inputs, targets)       (summed NLL over counted targets, correct argmax count or None)
      eval_context(windows) / evaluate(...)   held-out metrics as flat "val_*" keys
      no_decay_names(model)                   parameters without weight decay
      plot                                    plot_curves keywords
    """

    name = "causal"
    plot: dict = {}

    def __init__(self, *, no_decay: Callable[[torch.nn.Module], set[str]] = matrix_decay_exempt):
        self._no_decay = no_decay  # Mamba models: seqssm.training.mlm.no_weight_decay_names (A_log, D, ...)

    def micro_batch(self, ids: np.ndarray, *, seed: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(ids.astype(np.int64))
        return x, next_base_targets(x)

    def loss_sum(self, logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor):
        return token_nll(logits, inputs).sum(), None

    def no_decay_names(self, model: torch.nn.Module) -> set[str]:
        return self._no_decay(model)

    def eval_context(self, windows: np.ndarray) -> tuple[np.ndarray, ...]:
        return target_masks(windows)

    def evaluate(self, model, windows, context, *, device, batch_size, dist=SINGLE, lockstep=False) -> dict:
        return evaluate(model, windows, device=device, batch_size=batch_size, masks=context, dist=dist,
                        lockstep=lockstep)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 32,
    masks: tuple[np.ndarray, np.ndarray] | None = None,
    dist: Dist = SINGLE,
    lockstep: bool = False,
) -> dict:
    """Held-out NLL/perplexity on fixed windows, on the ``acgt`` and the ``shared`` target sets.

    See seqssm.training.data for the two sets; ``shared`` is the Markov baseline's. Under torchrun
    the single-process batches are dealt round-robin to the ranks and the sums added up
    (``lockstep``: FSDP, where every rank must run as many forwards as the others).
    """
    was_training = model.training
    model.eval()
    acgt, shared = masks if masks is not None else target_masks(windows)
    sums = {"acgt": 0.0, "shared": 0.0}
    counts = {"acgt": int(acgt.sum()), "shared": int(shared.sum())}
    starts = range(0, len(windows), batch_size)
    mine = lockstep_batches(len(starts), dist, lockstep=lockstep) if dist.enabled else range(len(starts))
    try:
        for k in mine:
            i = starts[k if k is not None else 0]
            x = torch.from_numpy(windows[i:i + batch_size].astype(np.int64)).to(device, non_blocking=True)
            with autocast_for(device):
                logits = model(x)
            if k is None:
                continue  # a lockstep filler: the forward only keeps the ranks together
            nll = token_nll(logits, x).double().cpu().numpy()
            sums["acgt"] += float(nll[acgt[i:i + batch_size]].sum())
            sums["shared"] += float(nll[shared[i:i + batch_size]].sum())
    finally:
        model.train(was_training)
    if dist.enabled:
        sums["acgt"], sums["shared"] = dist.all_sum([sums["acgt"], sums["shared"]])
    out = {"val_windows": int(len(windows)), "val_targets": counts["acgt"], "val_targets_shared": counts["shared"]}
    for key, prefix in (("acgt", "val"), ("shared", "val_shared")):
        loss = sums[key] / max(counts[key], 1)
        out[f"{prefix}_loss"] = loss
        out[f"{prefix}_ppl"] = math.exp(loss) if counts[key] else float("nan")
    return out


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """The torch (and CUDA) RNG states: plain tensors, saved in optimizer.pt."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    tokenizer,
    keep: int = 1,
    rng_ranks: list | None = None,
    save_kwargs: dict | None = None,
) -> Path:
    """Write RUN/checkpoints/step-XXXXXXXX atomically, point LATEST at it, prune older ones.

    The directory is a seqssm model directory (seqssm.models.save_model: config.json,
    model.safetensors, tokenizer.json, training.json) plus optimizer.pt and trainer_state.json,
    so ``load_model`` (and ``--init``) accept a checkpoint as it is. ``save_kwargs``: more keywords
    of save_model (``n_as_pad``).
    """
    from seqssm.models import save_model

    def write_model(tmp: Path) -> None:
        save_model(model, tmp, tokenizer=tokenizer, info={"checkpoint": True, "step": state["step"],
                                                            "tokens_seen": state.get("tokens_seen")},
                   **(save_kwargs or {}))

    return write_checkpoint(Path(run_dir) / CHECKPOINTS, f"step-{int(state['step']):08d}", write_model,
                            optimizer, state, keep=keep, rng_ranks=rng_ranks)


def write_checkpoint(
    root: Path,
    name: str,
    write_model: Callable[[Path], object],
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    keep: int = 1,
    protect: tuple[str, ...] = (),
    rng_ranks: list | None = None,
) -> Path:
    """Write ``root/name`` atomically, point ``root/LATEST`` at it, prune older ones.

    ``write_model(tmp)`` writes the model directory into ``tmp`` (which must not exist yet);
    optimizer.pt (optimizer + RNG states) and trainer_state.json (``state``) are added beside it.
    ``optimizer`` may be an optimizer or its state dict (data-parallel runs gather it first);
    ``rng_ranks``: the RNG states of every rank of a torchrun job (rank 0's is also saved as "rng").
    Pruning keeps the newest ``keep`` step-* directories (this one included) and those named in
    ``protect``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    write_model(tmp)
    opt_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    blob = {"optimizer": opt_state, "rng": rng_ranks[0] if rng_ranks else rng_state()}
    if rng_ranks:
        blob["rng_ranks"] = list(rng_ranks)
    torch.save(blob, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():  # the same step saved again
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    atomic_write_text(root / LATEST, name + "\n")
    steps = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != name and p.name not in protect)
    for old in steps[: max(len(steps) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint LATEST points at (or the highest complete step-* directory)."""
    return latest_in(Path(run_dir) / CHECKPOINTS)


def latest_in(root: Path) -> Path | None:
    """The checkpoint ``root/LATEST`` points at (or the highest complete step-* directory of ``root``)."""
    root = Path(root)
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        p = root / latest.read_text().strip()
        if (p / "trainer_state.json").is_file():
            return p
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def read_checkpoint_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    device: torch.device, *, replica: Replica | None = None, seed: int = 0) -> dict:
    """Restore model weights, optimizer and RNG states in place; return the trainer state.

    ``replica``: the data-parallel wrapper of ``model`` (every rank loads the same files)."""
    from seqssm.models import load_model

    ckpt = Path(ckpt)
    loaded = load_model(ckpt, device="cpu")
    try:
        if replica is not None:
            replica.load_model_state(loaded.model.state_dict())
        else:
            model.load_state_dict(loaded.model.state_dict(), strict=True)
    except RuntimeError as e:
        raise SeqssmError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None
    st = read_checkpoint_state(ckpt)
    restore_optimizer(ckpt, optimizer, device, replica=replica, seed=seed, step=int(st.get("step", 0)))
    return st


def restore_optimizer(ckpt: Path, optimizer: torch.optim.Optimizer | None, device: torch.device, *,
                      replica: Replica | None = None, seed: int = 0, step: int = 0) -> bool:
    """Load ``ckpt/optimizer.pt`` into ``optimizer`` and restore the RNG states saved with it.

    Under torchrun each rank takes its own saved RNG state when the checkpoint was written by as
    many ranks; otherwise its dropout RNG is seeded from (seed, rank, step). Returns whether the RNG
    states were restored exactly."""
    ckpt = Path(ckpt)
    try:
        blob = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise SeqssmError(f"{ckpt / 'optimizer.pt'}: cannot read optimizer state: {e}") from None
    if optimizer is not None:
        if replica is not None:
            replica.load_optimizer_state(optimizer, blob["optimizer"])
        else:
            optimizer.load_state_dict(blob["optimizer"])
    dist = replica.dist if replica is not None else SINGLE
    if not dist.enabled:
        set_rng_state(blob.get("rng", {}))
        return True
    ranks = blob.get("rng_ranks") or []
    if len(ranks) == dist.world_size:
        set_rng_state(ranks[dist.rank])
        return True
    seed_rank(seed, dist.rank, step)
    return False


def gather_rng(dist: Dist) -> list | None:
    """Every rank's RNG states (for rank 0 to save); None in a single process. Collective."""
    return dist.all_gather(rng_state()) if dist.enabled else None


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON object per training step (``kind: train``) and per evaluation."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Drop records written after ``step`` (work lost when a run was cut after its last checkpoint)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut mid-write
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def append(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out


DNA_EVAL_SERIES = [("val_loss", "val_ppl", "held-out (ACGT targets)"), (None, "val_shared_ppl", "held-out (shared set)")]


def plot_curves(metrics_path: Path, png_path: Path, *, baseline_ppl: float | None = None,
                eval_series=None, loss_unit: str = "nats per base", right: str = "perplexity",
                baseline_label: str = "best Markov") -> None:
    """Training/validation loss and perplexity (or accuracy) against step (matplotlib, Agg), written atomically.

    ``eval_series``: (loss key or None, right-panel key, label) per evaluation curve; the default is
    the DNA held-out pair. ``right="accuracy"``: the right panel shows the training records'
    "accuracy" and the series' accuracy keys instead of perplexities; ``baseline_ppl`` is then an
    accuracy (drawn as a horizontal line labelled ``baseline_label``)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    recs = MetricsLog(metrics_path).read()
    tr = [r for r in recs if r.get("kind") == "train"]
    ev = [r for r in recs if r.get("kind") == "eval"]
    if not tr and not ev:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if tr:
        s = np.array([r["step"] for r in tr])
        loss = np.array([r["loss"] for r in tr])
        k = max(1, len(loss) // 100)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if k > 1 else loss
        ax1.plot(s, loss, color="tab:blue", alpha=0.25, lw=0.8)
        ax1.plot(s[len(s) - len(smooth):], smooth, color="tab:blue", label="train")
        if right == "accuracy":
            acc = np.array([r.get("accuracy", np.nan) for r in tr], dtype=float)
            if np.isfinite(acc).any():
                acc_s = np.convolve(acc, np.ones(k) / k, mode="valid") if k > 1 else acc
                ax2.plot(s[len(s) - len(acc_s):], acc_s, color="tab:blue", label="train (batch)")
        else:
            ax2.plot(s[len(s) - len(smooth):], np.exp(smooth), color="tab:blue", label="train")
    if ev:
        s = [r["step"] for r in ev]
        styles = [("o-", "tab:orange"), ("s--", "tab:green"), ("^:", "tab:purple")]
        for (loss_key, ppl_key, label), (marker, color) in zip(eval_series or DNA_EVAL_SERIES, styles):
            if loss_key:
                ax1.plot(s, [r[loss_key] for r in ev], marker, color=color, label=label)
            ax2.plot(s, [r[ppl_key] for r in ev], marker, color=color, label=label)
    if baseline_ppl:
        ax2.axhline(baseline_ppl, color="tab:red", ls=":", label=f"{baseline_label} ({baseline_ppl:.3f})")
    ax1.set_xlabel("step")
    ax1.set_ylabel(f"loss ({loss_unit})")
    ax2.set_xlabel("step")
    ax2.set_ylabel(right)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(png_path).with_name(f".{Path(png_path).name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


# ----------------------------------------------------------------------------- trainer


@dataclass
class StopRule:
    """When this invocation stops early (the run itself is defined by TrainConfig.max_steps)."""

    max_minutes: float | None = None
    max_steps_this_run: int | None = None
    started: float = field(default_factory=time.monotonic)

    def why_stop(self, steps_this_run: int, step_time: float, *, save_seconds: float, eval_seconds: float,
                 eval_next: bool, dist) -> str | None:
        """Why this invocation must stop before its next step, or None. The time budget must hold
        the next step, its checkpoint and, when one is due after it, an evaluation; rank 0's clock
        decides for every rank (a collective: every rank calls this at the same steps)."""
        if self.max_steps_this_run is not None and steps_this_run >= self.max_steps_this_run:
            return f"--max-steps-this-run {self.max_steps_this_run} reached"
        if not steps_this_run or self.max_minutes is None:
            return None
        need = step_time * 1.5 + save_seconds + 1.0 + (eval_seconds if eval_next else 0.0)
        late = time.monotonic() + need > self.started + 60.0 * self.max_minutes
        if dist.broadcast(late):
            return f"--max-minutes {self.max_minutes:g} budget reached"
        return None


@dataclass
class TrainOutcome:
    step: int
    finished: bool
    reason: str
    tokens_seen: int
    last_eval: dict | None
    checkpoint: Path | None


class Callbacks:
    """Hooks the pipeline uses for progress display; every method is optional."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_step(self, trainer: "Trainer", rec: dict) -> None: ...
    def on_eval(self, trainer: "Trainer", rec: dict) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...


class Trainer:
    """Runs the optimisation of one run directory; resumable at any checkpoint.

    ``objective``: CausalLMObjective (default) or mlm.MaskedLMObjective; the loop, schedule,
    checkpoints and data-parallel rules are the same for both. Under torchrun (``dist``) every rank
    draws the same global batch (and, for MLM, the same masks) and trains on its contiguous 1/world
    slice; its loss is its summed target loss / the global count of counted targets x world, so
    the averaged gradient is the single-process gradient of the global batch. Evaluation batches
    are dealt round-robin and the sums all-reduced: every rank has the same metrics. Only rank 0
    writes checkpoints, metrics and plots. ``fsdp``: shard parameters, gradients and optimizer state
    (FSDP2) instead of replicating them. ``save_kwargs``: passed to save_model for checkpoints.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        split: DataSplit,
        cfg: TrainConfig,
        *,
        run_dir: Path,
        device: torch.device,
        tokenizer,
        extra_state: dict | None = None,
        callbacks: Callbacks | None = None,
        plot_baseline: Callable[[], float | None] | None = None,
        plot: bool = True,
        dist: Dist = SINGLE,
        fsdp: bool = False,
        objective=None,
        save_kwargs: dict | None = None,
    ):
        cfg.validate()
        dist.check_divisible(cfg.batch_size)
        self.cfg = cfg
        self.dist = dist
        self.objective = objective if objective is not None else CausalLMObjective()
        self.save_kwargs = dict(save_kwargs or {})
        no_decay = self.objective.no_decay_names(model)  # before wrapping (see groups_by_name)
        sharded = fsdp and dist.enabled  # FSDP moves each block to the device as it shards it: never whole
        self.model = model if sharded else model.to(device)
        self.replica = Replica(self.model, dist, fsdp=fsdp)
        if sharded:  # buffers FSDP does not manage follow the parameters
            for m in self.model.modules():
                for name, b in list(m.named_buffers(recurse=False)):
                    if b.device != device:
                        m._buffers[name] = b.to(device)
        self.forward_model = self.replica.train  # training forward (DDP wrapper, or the model); see compile()
        self.eval_model = self.model if dist.enabled else None  # None: evaluate with forward_model
        self.split = split
        self.device = device
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.model_config = model.config.to_dict() if hasattr(model, "config") else {}
        self.extra_state = dict(extra_state or {})
        self.cb = callbacks or Callbacks()
        self.plot_baseline = plot_baseline
        self.plot = plot
        self.sampler = WindowSampler(split.train, cfg.seq_len, cfg.seed)
        self.val_windows = validation_windows(split.valid, cfg.seq_len)
        if len(self.val_windows) == 0:
            raise SeqssmError("the held-out data has no window with at least half of its bases A, C, G or T")
        self.val_context = self.objective.eval_context(self.val_windows)
        self.optimizer = adamw(groups_by_name(self.model, no_decay, cfg.weight_decay), lr=cfg.lr,
                               betas=cfg.adam_betas, eps=cfg.adam_eps, device=device)
        self.metrics = MetricsLog(self.run_dir / METRICS)
        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.last_eval: dict | None = None
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None  # step of last_checkpoint
        self._eval_seconds = 0.0
        self._save_seconds = 0.0
        if dist.enabled:
            seed_rank(cfg.seed, dist.rank)  # the same init everywhere, different dropout masks per rank

    def compile(self) -> None:
        """torch.compile the training (and evaluation) forward; under DDP the DDP wrapper is compiled,
        so its gradient buckets overlap the backward (TorchDynamo's DDPOptimizer)."""
        self.forward_model = torch.compile(self.forward_model)
        if self.eval_model is not None:
            self.eval_model = torch.compile(self.eval_model) if self.replica.kind == "ddp" else self.forward_model

    # -- state
    def state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 3),
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config,
            "split": self.split.description,
            "last_eval": self.last_eval,
            **self.extra_state,
        }

    def resume(self, ckpt: Path) -> dict:
        st = load_checkpoint(ckpt, self.model, self.optimizer, self.device,
                             replica=self.replica if self.dist.enabled else None, seed=self.cfg.seed)
        self.step = int(st["step"])
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.train_seconds = float(st.get("train_seconds", 0.0))
        self.last_eval = st.get("last_eval")
        self.last_checkpoint = Path(ckpt)
        self._checkpoint_step = self.step
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
        return st

    def save(self) -> Path:
        """Checkpoint (rank 0 writes; every rank takes part: FSDP gathers the weights, the RNG states
        of all ranks are collected), then wait until it is on disk."""
        t0 = time.monotonic()
        model = self.replica.model_to_save()
        opt_state = self.replica.optimizer_state(self.optimizer) if self.dist.enabled else self.optimizer
        rng_ranks = gather_rng(self.dist)
        path = Path(self.run_dir) / CHECKPOINTS / f"step-{self.step:08d}"
        if self.dist.is_main:
            path = save_checkpoint(self.run_dir, model, opt_state, self.state(), tokenizer=self.tokenizer,
                                   keep=self.cfg.keep_checkpoints, rng_ranks=rng_ranks, save_kwargs=self.save_kwargs)
        self.dist.barrier()
        self._save_seconds = time.monotonic() - t0
        self.last_checkpoint = path
        self._checkpoint_step = self.step
        self.cb.on_checkpoint(self, path)
        return path

    # -- work
    def _eval_windows(self, full: bool) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        n = self.cfg.eval_max_windows
        if full or not n or n >= len(self.val_windows):
            return self.val_windows, self.val_context
        idx = np.unique(np.linspace(0, len(self.val_windows) - 1, n).round().astype(np.int64))
        return self.val_windows[idx], tuple(c[idx] for c in self.val_context)

    def evaluate(self, *, full: bool = True) -> dict:
        t0 = time.monotonic()
        windows, context = self._eval_windows(full)
        res = self.objective.evaluate(self.eval_model or self.forward_model, windows, context, device=self.device,
                                      batch_size=self.cfg.eval_batch_size or self.cfg.batch_size,
                                      dist=self.dist, lockstep=self.replica.lockstep)
        self._eval_seconds = time.monotonic() - t0
        rec = {"kind": "eval", "step": self.step, "tokens_seen": self.tokens_seen, "full": bool(full or
               windows is self.val_windows), **res, "eval_seconds": round(self._eval_seconds, 3)}
        self.last_eval = rec
        if self.dist.is_main:
            self.metrics.append(rec)
        self.cb.on_eval(self, rec)
        if self.plot and self.dist.is_main:
            self.plot_curves()
        return rec

    def plot_curves(self) -> None:
        with contextlib.suppress(Exception):  # a plot is a convenience; never fail a run for it
            plot_curves(self.metrics.path, self.run_dir / CURVES,
                        baseline_ppl=self.plot_baseline() if self.plot_baseline else None, **self.objective.plot)

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # Every rank draws the whole global batch (and its masks: cheap) and keeps its slice; the target
        # count that normalises the loss is the global one, so per-rank losses add up to the
        # single-process loss.
        batches = [self.objective.micro_batch(self.sampler.batch(self.step, m, cfg.batch_size), seed=cfg.seed,
                                              step=self.step, micro=m) for m in range(cfg.grad_accum)]
        n_targets = int(sum(int((t != IGNORE).sum()) for _, t in batches))
        rows = self.dist.rows(cfg.batch_size)
        world = self.dist.world_size
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed NLL, correct argmax
        has_accuracy = False
        for m, (x, y) in enumerate(batches):
            if world > 1:
                x, y = x[rows], y[rows]
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.replica.sync_grads(m == len(batches) - 1):
                with autocast_for(self.device):
                    logits = self.forward_model(x)
                nll, correct = self.objective.loss_sum(logits, x, y)
                loss = nll / max(n_targets, 1)
                (loss * world if world > 1 else loss).backward()  # DDP/FSDP average over the ranks
            total[0] += nll.detach().double()
            if correct is not None:
                total[1] += correct.double()
                has_accuracy = True
        if cfg.grad_clip and cfg.grad_clip > 0:
            gnorm = self.replica.clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        else:
            gnorm = float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dist.all_sum_(total)
        sums = total.tolist()  # syncs the device: the step is done
        loss = sums[0] / max(n_targets, 1)
        dt = time.perf_counter() - t0
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        self.step += 1
        self.tokens_seen += tokens
        self.train_seconds += dt
        rec = {"kind": "train", "step": self.step, "lr": lr, "loss": loss,
               "ppl": math.exp(min(loss, 50.0)), "grad_norm": gnorm, "tokens_per_s": tokens / dt,
               "tokens_seen": self.tokens_seen, "step_seconds": dt}
        if has_accuracy:  # MLM: argmax accuracy over this step's masked positions
            rec.update(accuracy=sums[1] / max(n_targets, 1), targets=n_targets)
        return rec

    def fit(self, stop: StopRule | None = None) -> TrainOutcome:
        """Train until max_steps or until ``stop`` says so; always leaves a checkpoint behind."""
        stop = stop or StopRule()
        cfg = self.cfg
        self.model.train()
        self.cb.on_start(self)
        steps_this_run = 0
        step_time = 0.0
        reason = "finished"
        while self.step < cfg.max_steps:
            why = stop.why_stop(steps_this_run, step_time, save_seconds=self._save_seconds,
                                eval_seconds=self._eval_seconds, eval_next=(self.step + 1) % cfg.eval_every == 0,
                                dist=self.dist)
            if why:
                reason = why
                break
            rec = self.train_step()
            steps_this_run += 1
            step_time = rec["step_seconds"] if steps_this_run == 1 else 0.9 * step_time + 0.1 * rec["step_seconds"]
            if not math.isfinite(rec["loss"]):
                raise SeqssmError(f"training diverged at step {self.step} (loss {rec['loss']}); lower --lr and "
                                  "resume from the last checkpoint or start over with --force")
            if self.dist.is_main:
                self.metrics.append(rec)
            self.cb.on_step(self, rec)
            if self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self.evaluate(full=False)
            if self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
        finished = self.step >= cfg.max_steps
        if finished:
            if not (self.last_eval and self.last_eval["step"] == self.step and self.last_eval.get("full")):
                self.evaluate(full=True)
            reason = "finished"
        elif self.plot and steps_this_run and self.dist.is_main:
            self.plot_curves()  # the training curve up to where this invocation stopped
        if self._checkpoint_step != self.step:
            self.save()
        return TrainOutcome(self.step, finished, reason, self.tokens_seen, self.last_eval, self.last_checkpoint)
