"""Supervised fine-tuning of a DNA backbone (HyenaDNA, or Caduceus / Mamba) with a sequence-level head.

Tasks (seqssm.models.heads): binary, multiclass, multilabel, regression. Losses:
  binary      BCE on the logit of class 1; class weighting "auto": pos_weight = negatives / positives
  multiclass  cross-entropy; "auto": class c weighs N / (C * n_c) (inverse frequency)
  multilabel  BCE per label (NaN = missing, left out); "auto": pos_weight_t = negatives_t / positives_t
  regression  MSE on targets standardised with the training mean / std (NaN = missing, left out)
The weights come from the training split only; "none" weighs everything 1.

Optimisation (the pieces of seqssm.training.lm): AdamW with two learning rates (``lr`` for the
backbone, ``head_lr`` for the head), weight decay on matrices only (a Caduceus backbone: as in its
pretraining, not on norms, embeddings, biases, A_log and D; seqssm.training.mlm.mlm_param_groups),
linear warm-up over ``warmup_fraction`` of all steps then cosine decay to ``min_lr_ratio`` x the
peak, gradient-norm clipping, bf16 autocast on CUDA. ``freeze_backbone``: a linear probe (the
backbone is not in the optimizer, runs in eval mode without dropout, and its weights never change).
``probe_epochs`` N: linear probing, then fine-tuning ("LP-FT", Kumar et al. 2022): for the first N
epochs only the head learns (the backbone runs in eval mode and its gradients are dropped before
the optimizer step, so AdamW keeps no state for it yet); from epoch N + 1 everything learns, the
backbone with its own warm-up and cosine over the remaining steps. A head that already fits the
pretrained features distorts them less than a random one, which matters with little labeled data.
Probe epochs do not count towards the early-stopping patience, so fine-tuning always gets its
``patience`` epochs.

Data order: epoch e visits the training examples in a permutation drawn from (seed, e), and
``rc_augment`` reverse-complements each example with probability 1/2, drawn from (seed, e) as
well; batches are right-padded with PAD (exact for every backbone: seqssm.models.heads). Both are
pure functions of (seed, epoch, batch), so with the model, optimizer and torch RNG state (dropout)
saved, a resumed run continues exactly: on CPU a run cut in two equals an uninterrupted one. For
a strand-invariant model (pooling "both", or a Caduceus-PS with mean pooling) ``rc_augment``
changes nothing but float rounding, and ``rc_average`` is not computed.

Evaluation after every epoch on the validation split (``rc_average``: the mean of the outputs on
each sequence and on its reverse complement); early stopping after ``patience`` epochs without
improvement of the selection metric (seqssm.training.metrics.primary_metric, or
``early_stop_metric``; "loss" is the validation loss).

Checkpoints: ``RUN/checkpoints/step-XXXXXXXX/`` = a fine-tuned model directory (save_finetuned)
+ optimizer.pt + trainer_state.json, written atomically (seqssm.training.lm.write_checkpoint) at
the end of every epoch and when a time budget stops a run mid-epoch; the latest and the best
epoch's checkpoints are kept.

Under torchrun (DDP) every rank builds the same padded global batch and trains on its contiguous
share of the examples; the loss is a sum over the rank's examples divided by the global batch's
normaliser (TaskLoss.parts), so the averaged gradient is the single-process one, class weights
and missing labels included. Evaluation batches are dealt round-robin and the outputs gathered,
so every rank computes the same metrics and takes the same early-stopping decision.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from seqssm.distributed import SINGLE, Dist, Replica, lockstep_batches, seed_rank
from seqssm.errors import SeqssmError
from seqssm.models.heads import (
    CADUCEUS,
    POOLINGS,
    TASKS,
    SequenceClassifier,
    batch_examples,
    reverse_complement_padded,
)
from seqssm.training.lm import (
    CHECKPOINTS,
    StopRule,
    config_from_dict,
    config_to_dict,
    adamw,
    autocast_for,
    gather_rng,
    latest_in,
    param_groups,
    read_checkpoint_state,
    restore_optimizer,
    warmup_cosine,
    write_checkpoint,
)
from seqssm.training.metrics import (
    CLASSIFICATION_KEYS,
    REGRESSION_KEYS,
    compute_metrics,
    is_better,
    metric_direction,
    primary_metric,
)
from seqssm.training.mlm import mlm_param_groups

CLASS_WEIGHTS = ("auto", "none")


@dataclass
class FinetuneConfig:
    """Hyperparameters of a fine-tuning run (the backbone and head configs are separate)."""

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None  # default: 2 x batch_size
    lr: float = 3e-4  # backbone peak learning rate
    head_lr: float = 1e-3  # head peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of each peak
    warmup_fraction: float = 0.1  # of all optimizer steps
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    pooling: str = "mean"
    dropout: float = 0.1
    freeze_backbone: bool = False
    probe_epochs: int = 0  # LP-FT: epochs with only the head learning before full fine-tuning
    class_weights: str = "auto"
    rc_augment: bool = False
    rc_average: bool = False
    patience: int | None = 3  # None or 0: no early stopping
    early_stop_metric: str | None = None  # default: primary_metric(task)

    to_dict = config_to_dict
    from_dict = classmethod(config_from_dict)

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.head_lr > 0, "--head-lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be within 0..1"),
            (0 <= self.warmup_fraction < 1, "--warmup-fraction must be within [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0: off)"),
            (0 <= self.dropout < 1, "--dropout must be within [0, 1)"),
            (self.pooling in POOLINGS, f"--pooling must be one of {', '.join(POOLINGS)}"),
            (0 <= self.probe_epochs < self.epochs, "--probe-epochs must be within 0..--epochs - 1"),
            (not (self.probe_epochs and self.freeze_backbone),
             "--probe-epochs and --freeze-backbone exclude each other (a frozen backbone is probed for all epochs)"),
            (self.class_weights in CLASS_WEIGHTS, f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}"),
            (self.patience is None or self.patience >= 0, "--patience must be >= 0 (0: no early stopping)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise SeqssmError(msg)
        if self.early_stop_metric is not None and self.early_stop_metric != "loss":
            try:
                metric_direction(self.early_stop_metric)
            except ValueError:
                raise SeqssmError(f"--early-stop-metric {self.early_stop_metric!r}: unknown metric (loss, accuracy, "
                                  "mcc, macro_f1, auroc, auprc, mse, pearson, spearman)") from None


def selection_metric(task: str, cfg: FinetuneConfig) -> tuple[str, str]:
    """(name, 'max' | 'min') of the validation metric that selects the best epoch."""
    if cfg.early_stop_metric == "loss":
        return "loss", "min"
    if cfg.early_stop_metric is not None:
        keys = REGRESSION_KEYS if task == "regression" else CLASSIFICATION_KEYS
        if cfg.early_stop_metric not in keys:
            raise SeqssmError(f"--early-stop-metric {cfg.early_stop_metric}: not a {task} metric "
                              f"(loss, {', '.join(keys)})")
    return primary_metric(task, cfg.early_stop_metric)


# ----------------------------------------------------------------------------- data


@dataclass
class ArrayData:
    """Examples as the trainer needs them: token ids, float32 targets [N, T], names."""

    ids: list
    targets: np.ndarray
    names: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_labeled(cls, data) -> "ArrayData":
        """From a seqssm.io.labeled.LabeledData (or anything with .examples of Example)."""
        ex = data.examples
        targets = np.stack([np.asarray(e.target, dtype=np.float32).reshape(-1) for e in ex]) if ex else \
            np.zeros((0, max(int(getattr(data, "n_targets", 1)), 1)), np.float32)
        return cls([np.asarray(e.ids) for e in ex], targets, [e.name for e in ex])

    @property
    def max_length(self) -> int:
        return max((len(a) for a in self.ids), default=0)


def truth_for_metrics(task: str, targets: np.ndarray) -> np.ndarray:
    """Targets [N, T] in the shape compute_metrics expects."""
    if task in ("binary", "multiclass"):
        y = targets[:, 0]
        return y.astype(np.int64) if task == "multiclass" else y
    return targets


# ----------------------------------------------------------------------------- loss


class TaskLoss:
    """The training objective of one task, with its class weights / target scaling (see the module)."""

    def __init__(self, task: str, n_outputs: int, train_targets: np.ndarray, *, class_weights: str = "auto"):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        self.task = task
        self.n_outputs = n_outputs
        self.mode = class_weights
        self.weights: list[float] | None = None  # multiclass: per class; binary/multilabel: pos_weight per output
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        t = np.asarray(train_targets, dtype=np.float64)
        if task == "regression":
            mean = np.nanmean(t, axis=0) if len(t) else np.zeros(n_outputs)
            std = np.nanstd(t, axis=0) if len(t) else np.ones(n_outputs)
            mean = np.where(np.isfinite(mean), mean, 0.0)
            std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
            self.mean, self.std = mean.tolist(), std.tolist()
        elif class_weights == "auto" and len(t):
            if task == "multiclass":
                counts = np.bincount(t[:, 0].astype(np.int64), minlength=n_outputs).astype(np.float64)
                w = np.where(counts > 0, len(t) / (n_outputs * np.maximum(counts, 1)), 0.0)
                self.weights = w.tolist()
            else:
                pos = np.nansum(t == 1, axis=0).astype(np.float64)
                neg = np.nansum(t == 0, axis=0).astype(np.float64)
                self.weights = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0).tolist()

    def describe(self) -> dict:
        return {"task": self.task, "class_weights": self.mode, "weights": self.weights,
                "target_mean": self.mean, "target_std": self.std}

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch (float32 scalar); targets [B, T] float32."""
        logits = logits.float()
        dev = logits.device
        if self.task == "multiclass":
            w = torch.tensor(self.weights, device=dev, dtype=torch.float32) if self.weights else None
            return F.cross_entropy(logits, targets[:, 0].long(), weight=w)
        if self.task == "regression":
            z = (targets - torch.tensor(self.mean, device=dev)) / torch.tensor(self.std, device=dev)
            mask = ~torch.isnan(z)
            err = torch.where(mask, (logits - torch.nan_to_num(z)) ** 2, torch.zeros_like(logits))
            return err.sum() / mask.sum().clamp(min=1)
        # binary / multilabel
        mask = ~torch.isnan(targets)
        pw = torch.tensor(self.weights, device=dev, dtype=torch.float32) if self.weights else None
        per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), pos_weight=pw, reduction="none")
        return torch.where(mask, per, torch.zeros_like(per)).sum() / mask.sum().clamp(min=1)

    def parts(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The numerator of the batch loss: a sum over examples (the loss is parts / normaliser)."""
        logits = logits.float()
        dev = logits.device
        if self.task == "multiclass":
            w = torch.tensor(self.weights, device=dev, dtype=torch.float32) if self.weights else None
            return F.cross_entropy(logits, targets[:, 0].long(), weight=w, reduction="sum")
        if self.task == "regression":
            z = (targets - torch.tensor(self.mean, device=dev)) / torch.tensor(self.std, device=dev)
            mask = ~torch.isnan(z)
            return torch.where(mask, (logits - torch.nan_to_num(z)) ** 2, torch.zeros_like(logits)).sum()
        mask = ~torch.isnan(targets)
        pw = torch.tensor(self.weights, device=dev, dtype=torch.float32) if self.weights else None
        per = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), pos_weight=pw, reduction="none")
        return torch.where(mask, per, torch.zeros_like(per)).sum()

    def normaliser(self, targets: torch.Tensor) -> torch.Tensor:
        """What the batch loss divides ``parts`` by: the class weights of the targets (weighted
        multiclass), the number of examples (multiclass), or of the labels present."""
        if self.task == "multiclass":
            if self.weights:
                w = torch.tensor(self.weights, device=targets.device, dtype=torch.float32)
                return w[targets[:, 0].long()].sum()
            return torch.tensor(float(targets.shape[0]), device=targets.device)
        if self.task == "regression":
            z = targets - torch.tensor(self.mean, device=targets.device)
            return (~torch.isnan(z)).sum().clamp(min=1).float()
        return (~torch.isnan(targets)).sum().clamp(min=1).float()


# ----------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(
    model: SequenceClassifier,
    data: ArrayData,
    *,
    device: torch.device,
    batch_size: int = 64,
    rc_average: bool = False,
    loss_fn: TaskLoss | None = None,
    dist: Dist = SINGLE,
) -> tuple[np.ndarray, float | None]:
    """(outputs in example order, mean loss or None): probabilities / values as predict_proba.

    Examples are batched by length (less padding); the loss is that of the forward-strand logits.
    Under torchrun the batches are dealt round-robin to the ranks and every rank gets all outputs.
    """
    was_training = model.training
    model.eval()
    n = len(data)
    order = np.argsort([len(a) for a in data.ids], kind="stable")
    outs: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    loss_sum, loss_n = 0.0, 0
    symmetric = model.strand_invariant  # rc averaging would repeat the forward outputs
    starts = range(0, n, batch_size)
    mine = lockstep_batches(len(starts), dist, lockstep=False) if dist.enabled else range(len(starts))
    try:
        for k in mine:
            i = starts[k]
            idx = order[i:i + batch_size]
            x, lengths = batch_examples([data.ids[j] for j in idx])
            x, lengths = x.to(device, non_blocking=True), lengths.to(device)
            with autocast_for(device):
                logits = model(x, lengths)
                out = model.outputs_from_logits(logits)
                if rc_average and not symmetric:
                    out = 0.5 * (out + model.outputs_from_logits(model(reverse_complement_padded(x, lengths), lengths)))
            if loss_fn is not None:
                y = torch.from_numpy(data.targets[idx]).to(device)
                loss_sum += float(loss_fn(logits, y)) * len(idx)
                loss_n += len(idx)
            out = out.float().cpu().numpy()
            for k, j in enumerate(idx):
                outs[j] = out[k]
    finally:
        model.train(was_training)
    if dist.enabled:
        done = [(j, outs[j]) for j in range(n) if outs[j] is not None]
        for part in dist.all_gather(done):
            for j, o in part:
                outs[j] = o
        loss_sum, loss_n = dist.all_sum([loss_sum, loss_n])
        loss_n = int(loss_n)
    if n == 0:
        return np.zeros((0,), np.float32), None
    return np.stack(outs), (loss_sum / loss_n if loss_n else None)


def evaluate_split(model, data: ArrayData, *, task: str, label_names, device, batch_size, rc_average,
                   loss_fn: TaskLoss | None, dist: Dist = SINGLE) -> tuple[dict, np.ndarray]:
    """(metrics incl. "loss", outputs) on one split."""
    outputs, loss = predict(model, data, device=device, batch_size=batch_size, rc_average=rc_average, loss_fn=loss_fn,
                            dist=dist)
    if len(data) == 0:
        return {"loss": None, "n": 0}, outputs
    names = label_names if task != "binary" else None
    metrics = compute_metrics(task, truth_for_metrics(task, data.targets), outputs, names)
    metrics = {"loss": loss, **metrics}
    return metrics, outputs


# ----------------------------------------------------------------------------- trainer


def flat_metrics(prefix: str, metrics: dict) -> dict:
    """Scalar entries of a metrics dict as prefix_name (per-class / per-task tables left out)."""
    return {f"{prefix}_{k}": v for k, v in metrics.items()
            if (v is None or isinstance(v, (int, float))) and k not in ("n", "positives")}


class FinetuneCallbacks:
    """Hooks for progress display; every method is optional."""

    def on_start(self, trainer: "FinetuneTrainer") -> None: ...
    def on_step(self, trainer: "FinetuneTrainer", rec: dict) -> None: ...
    def on_epoch(self, trainer: "FinetuneTrainer", rec: dict) -> None: ...
    def on_checkpoint(self, trainer: "FinetuneTrainer", path: Path) -> None: ...


@dataclass
class FinetuneOutcome:
    step: int
    epoch: int
    finished: bool
    reason: str
    best_epoch: int | None
    best_value: float | None
    best_checkpoint: Path | None
    checkpoint: Path | None
    history: list


# When this invocation stops early (the run itself is defined by FinetuneConfig.epochs).
FinetuneStop = StopRule


class FinetuneTrainer:
    """Trains one SequenceClassifier in a run directory; resumable at any checkpoint."""

    def __init__(
        self,
        model: SequenceClassifier,
        train: ArrayData,
        valid: ArrayData,
        cfg: FinetuneConfig,
        *,
        run_dir: Path,
        device: torch.device,
        tokenizer,
        preprocessing: dict,
        loss_fn: TaskLoss,
        extra_state: dict | None = None,
        callbacks: FinetuneCallbacks | None = None,
        on_history=None,
        dist: Dist = SINGLE,
    ):
        cfg.validate()
        if len(train) == 0:
            raise SeqssmError("the training split is empty")
        dist.check_divisible(cfg.batch_size)
        self.cfg = cfg
        self.dist = dist
        self.model = model.to(device)
        self.train_data = train
        self.valid_data = valid
        self.device = device
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / CHECKPOINTS
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.loss_fn = loss_fn
        self.task = model.head_config.task
        self.label_names = model.head_config.label_names
        self.metric, self.direction = selection_metric(self.task, cfg)
        self.extra_state = dict(extra_state or {})
        self.cb = callbacks or FinetuneCallbacks()
        self.on_history = on_history  # called with the history after every epoch (metrics.json, plots)

        if cfg.freeze_backbone:
            self.model.backbone.requires_grad_(False)
        self.replica = Replica(self.model, dist)  # DDP under torchrun (after freezing: frozen weights are not synced)
        self.forward_model = self.replica.train
        if cfg.freeze_backbone:
            groups = []
        else:
            backbone_groups = mlm_param_groups if model.architecture == CADUCEUS else param_groups
            groups = [dict(g, peak_lr=cfg.lr, backbone=True)
                      for g in backbone_groups(self.model.backbone, cfg.weight_decay)]
        groups += [dict(g, peak_lr=cfg.head_lr) for g in param_groups(self.model.head, cfg.weight_decay)]
        groups = [g for g in groups if g["params"]]
        self.optimizer = adamw(groups, lr=cfg.head_lr, betas=cfg.adam_betas, eps=cfg.adam_eps, device=device)
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_fraction * self.total_steps))
        # LP-FT: the backbone's schedule starts when its probe epochs end
        self.probe_steps = cfg.probe_epochs * self.steps_per_epoch
        self.backbone_warmup = int(round(cfg.warmup_fraction * (self.total_steps - self.probe_steps)))

        self.step = 0
        self.epoch = 0  # completed epochs
        self.batch = 0  # batches done in the current epoch
        self.epoch_loss = [0.0, 0]  # sum of batch-mean losses x batch sizes, examples
        self.history: list[dict] = []
        self.best: dict = {"epoch": None, "value": None, "checkpoint": None}
        self.bad_epochs = 0
        self.stopped_early = False
        self.train_seconds = 0.0
        self.last_checkpoint: Path | None = None
        self._checkpoint_step: int | None = None
        self.last_lrs: list[float] = [None, None]  # type: ignore[list-item]  # of the latest step (history)
        self._eval_seconds = 0.0
        self._save_seconds = 0.0
        if dist.enabled:
            seed_rank(cfg.seed, dist.rank)  # the same init everywhere, different dropout masks per rank

    # -- state
    def state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "batch": self.batch,
            "epoch_loss": list(self.epoch_loss), "history": self.history, "best": self.best,
            "bad_epochs": self.bad_epochs, "stopped_early": self.stopped_early,
            "train_seconds": round(self.train_seconds, 3), "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch, "finetune_config": self.cfg.to_dict(),
            "selection_metric": [self.metric, self.direction], **self.extra_state,
        }

    def resume(self, ckpt: Path) -> dict:
        from seqssm.models.heads import load_finetuned

        ckpt = Path(ckpt)
        st = read_checkpoint_state(ckpt)
        if int(st.get("steps_per_epoch", -1)) != self.steps_per_epoch:
            raise SeqssmError(f"checkpoint {ckpt} was made with {st.get('steps_per_epoch')} steps per epoch, this data "
                              f"and --batch-size give {self.steps_per_epoch}: not the same run")
        saved, *_ = load_finetuned(ckpt, device="cpu")
        try:
            self.model.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as e:
            raise SeqssmError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None
        restore_optimizer(ckpt, self.optimizer, self.device, replica=self.replica if self.dist.enabled else None,
                          seed=self.cfg.seed, step=int(st["step"]))
        self.step, self.epoch, self.batch = int(st["step"]), int(st["epoch"]), int(st["batch"])
        self.epoch_loss = [float(st["epoch_loss"][0]), int(st["epoch_loss"][1])]
        self.history = list(st.get("history", []))
        self.best = dict(st.get("best") or self.best)
        self.bad_epochs = int(st.get("bad_epochs", 0))
        # early stopping is re-decided under this invocation's --patience / --epochs
        self.stopped_early = bool(self.cfg.patience) and self.bad_epochs >= self.cfg.patience \
            and self.epoch < self.cfg.epochs
        self.train_seconds = float(st.get("train_seconds", 0.0))
        self.last_checkpoint = ckpt
        self._checkpoint_step = self.step
        return st

    def save(self) -> Path:
        from seqssm.models.heads import save_finetuned

        t0 = time.monotonic()
        name = f"step-{self.step:08d}"
        info = {"checkpoint": True, "step": self.step, "epoch": self.epoch, "batch": self.batch}

        def write_model(tmp: Path) -> None:
            save_finetuned(self.model, tmp, tokenizer=self.tokenizer, preprocessing=self.preprocessing, info=info)

        protect = (Path(self.best["checkpoint"]).name,) if self.best.get("checkpoint") else ()
        rng_ranks = gather_rng(self.dist)
        path = self.ckpt_root / name
        if self.dist.is_main:  # the other ranks wait until it is on disk
            path = write_checkpoint(self.ckpt_root, name, write_model, self.optimizer, self.state(), keep=1,
                                    protect=protect, rng_ranks=rng_ranks)
        self.dist.barrier()
        self._save_seconds = time.monotonic() - t0
        self._checkpoint_step = self.step
        self.last_checkpoint = path
        self.cb.on_checkpoint(self, path)
        return path

    # -- work
    @property
    def probing(self) -> bool:
        """In the probe epochs of LP-FT: only the head learns."""
        return self.step < self.probe_steps

    def lrs(self) -> list[float]:
        out = []
        for g in self.optimizer.param_groups:
            floor = g["peak_lr"] * self.cfg.min_lr_ratio
            if g.get("backbone") and self.probe_steps:
                out.append(0.0 if self.probing else warmup_cosine(
                    self.step - self.probe_steps, peak=g["peak_lr"], floor=floor, warmup_steps=self.backbone_warmup,
                    total_steps=self.total_steps - self.probe_steps))
            else:
                out.append(warmup_cosine(self.step, peak=g["peak_lr"], floor=floor, warmup_steps=self.warmup_steps,
                                         total_steps=self.total_steps))
        return out

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(len(self.train_data))
        flips = rng.random(len(self.train_data)) < 0.5
        return order, flips

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.cfg.freeze_backbone or self.probing:
            self.model.backbone.eval()  # a probe on fixed features: no dropout in the backbone

    def train_step(self, order: np.ndarray, flips: np.ndarray) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        lrs = self.last_lrs = self.lrs()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        idx = order[self.batch * cfg.batch_size:(self.batch + 1) * cfg.batch_size]
        x, lengths = batch_examples([self.train_data.ids[j] for j in idx])
        x, lengths = x.to(self.device, non_blocking=True), lengths.to(self.device)
        if cfg.rc_augment:
            flip = torch.from_numpy(flips[idx]).to(self.device)
            x = torch.where(flip[:, None], reverse_complement_padded(x, lengths), x)
        y = torch.from_numpy(self.train_data.targets[idx]).to(self.device)
        if self.dist.enabled:
            loss = self._shard_loss(x, lengths, y)
        else:
            with autocast_for(self.device):
                logits = self.model(x, lengths)
            loss = self.loss_fn(logits, y)
            loss.backward()
        if self.probing:  # no update and no AdamW state for the backbone yet
            for g in self.optimizer.param_groups:
                if g.get("backbone"):
                    for p in g["params"]:
                        p.grad = None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.grad_clip and cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            gnorm = float("nan")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())
        dt = time.perf_counter() - t0
        self.step += 1
        self.batch += 1
        self.epoch_loss[0] += loss_v * len(idx)
        self.epoch_loss[1] += len(idx)
        self.train_seconds += dt
        return {"step": self.step, "epoch": self.epoch + 1, "batch": self.batch, "loss": loss_v,
                "lr": lrs[0], "head_lr": lrs[-1], "grad_norm": gnorm, "step_seconds": dt,
                "examples_per_s": len(idx) / dt if dt > 0 else None}

    def _shard_loss(self, x: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward/backward of this rank's rows of the padded global batch; returns the global batch loss.

        Each rank's loss is its sum (TaskLoss.parts) x world / the global normaliser, so DDP's average
        is the single-process gradient. A rank left without rows runs one example with weight 0."""
        world = self.dist.world_size
        norm = self.loss_fn.normaliser(y)
        rows = self.dist.rows(x.shape[0])
        empty = rows.start == rows.stop
        if empty:
            rows = slice(0, 1)
        with autocast_for(self.device):
            logits = self.forward_model(x[rows], lengths[rows])
        part = self.loss_fn.parts(logits, y[rows])
        (part * (0.0 if empty else float(world)) / norm).backward()
        total = self.dist.all_sum_((part.detach() * (0.0 if empty else 1.0)).double())
        return total / norm.double()

    def evaluate_valid(self) -> dict:
        t0 = time.monotonic()
        metrics, _ = evaluate_split(self.model, self.valid_data, task=self.task, label_names=self.label_names,
                                    device=self.device, batch_size=self.cfg.eval_batch_size or 2 * self.cfg.batch_size,
                                    rc_average=self.cfg.rc_average, loss_fn=self.loss_fn, dist=self.dist)
        self._eval_seconds = time.monotonic() - t0
        return metrics

    def end_epoch(self) -> dict:
        """Evaluate, record, select, checkpoint; returns the epoch's history row."""
        metrics = self.evaluate_valid()
        self.epoch += 1
        train_loss = self.epoch_loss[0] / max(self.epoch_loss[1], 1)
        row = {"epoch": self.epoch, "step": self.step, "lr": self.last_lrs[0], "head_lr": self.last_lrs[-1],
               "train_loss": train_loss, **flat_metrics("valid", metrics),
               "train_seconds": round(self.train_seconds, 3), "eval_seconds": round(self._eval_seconds, 3)}
        self.batch = 0
        self.epoch_loss = [0.0, 0]
        value = metrics.get(self.metric)
        improved = is_better(value, self.best["value"], self.direction) or self.best["epoch"] is None
        row["selection_value"] = value
        row["improved"] = bool(improved)
        name = f"step-{self.step:08d}"
        if improved:
            self.best = {"epoch": self.epoch, "value": value, "checkpoint": name}
            self.bad_epochs = 0
        elif self.epoch > self.cfg.probe_epochs:  # probe epochs do not count towards patience
            self.bad_epochs += 1
        if self.cfg.patience and self.bad_epochs >= self.cfg.patience and self.epoch < self.cfg.epochs:
            self.stopped_early = True
        self.history.append(row)
        self.save()
        if self.on_history is not None and self.dist.is_main:
            self.on_history(self)
        self.cb.on_epoch(self, row)
        return row

    def done(self) -> bool:
        return self.stopped_early or self.epoch >= self.cfg.epochs

    def fit(self, stop: FinetuneStop | None = None) -> FinetuneOutcome:
        """Train until the last epoch, early stopping, or ``stop``; always leaves a checkpoint behind."""
        stop = stop or FinetuneStop()
        self._set_train_mode()
        self.cb.on_start(self)
        steps_this_run = 0
        step_time = 0.0
        reason = None
        while not self.done():
            order, flips = self._epoch_plan(self.epoch)
            while self.batch < self.steps_per_epoch:
                why = stop.why_stop(steps_this_run, step_time, save_seconds=self._save_seconds,
                                    eval_seconds=self._eval_seconds, eval_next=self.batch + 1 >= self.steps_per_epoch,
                                    dist=self.dist)
                if why:
                    reason = why
                    break
                rec = self.train_step(order, flips)
                steps_this_run += 1
                step_time = rec["step_seconds"] if steps_this_run == 1 else 0.9 * step_time + 0.1 * rec["step_seconds"]
                if not math.isfinite(rec["loss"]):
                    raise SeqssmError(f"training diverged at step {self.step} (loss {rec['loss']}); lower --lr / "
                                      "--head-lr and start over with --force")
                self.cb.on_step(self, rec)
            if reason is not None:
                break
            self.end_epoch()
            self._set_train_mode()
        finished = self.done()
        if finished:
            reason = (f"early stopping: no improvement of valid {self.metric} in {self.cfg.patience} epochs"
                      if self.stopped_early else "finished")
        elif self._checkpoint_step != self.step:
            self.save()
        best = self.ckpt_root / self.best["checkpoint"] if self.best.get("checkpoint") else None
        return FinetuneOutcome(self.step, self.epoch, finished, reason, self.best.get("epoch"), self.best.get("value"),
                               best, self.last_checkpoint, self.history)


def latest_finetune_checkpoint(run_dir: Path) -> Path | None:
    return latest_in(Path(run_dir) / CHECKPOINTS)
