"""`seqssm finetune`: labeled sequences -> train/valid/test split -> a fine-tuned classifier.

Backbones: anything `load_model` reads, HyenaDNA or Caduceus / Mamba (Caduceus-PS, -Ph, causal
Mamba; e.g. the bundled caduceus-ps-chr20); seqssm.models.heads says how each is pooled and how
padded batches stay exact. HyenaDNA inputs are bounded by its filter length; Caduceus has no
positional limit.

Inputs: BED regions on a genome (``regions`` + ``genome``), a sequence table (CSV/TSV) or a
labeled FASTA (``sequences``), split at random (seeded, stratified), by chromosome or by region;
or explicit ``train`` / ``valid`` (/ ``test``) files, each of any of those kinds.

Output directory (``-o OUT``)::

    OUT/config.json, model.safetensors, tokenizer.json, training.json
                              the best epoch's model (seqssm.models.heads.save_finetuned), written
                              when the run ends: load_finetuned(OUT) / `seqssm predict` read it,
                              load_model(OUT) / `seqssm embed` read its backbone
    OUT/metrics.json          per-epoch history, best epoch, final valid and test metrics, split,
                              class counts, skipped inputs, options (refreshed every epoch)
    OUT/learning_curves.png   train / valid loss and the selection metric per epoch
    OUT/roc.png               ROC curves on valid and test (classification), or
    OUT/regression.png        predicted vs true values on the test (else valid) split
    OUT/test_predictions.tsv  name, target, prediction (+ per-class / per-task columns) on the test split
    OUT/run.json              the run's settings and status ("running" / "finished")
    OUT/checkpoints/          the latest and the best checkpoints (model + optimizer.pt + trainer_state.json)

A run can be cut at any moment and continued with ``resume=True``; ``max_minutes`` /
``max_steps_this_run`` stop an invocation cleanly after a checkpoint. The settings that define
the run are fixed when it starts; a resumed invocation may change only ``epochs``, ``patience``,
the evaluation batch size, the device and the time budget.

Under torchrun the same command trains data-parallel (DDP): ``batch_size`` is the global batch,
every rank reads the data, only rank 0 writes into OUT (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqssm.pipelines.progress import JobDisplay
from seqssm.pipelines.output import check_run_budget, prepare_run_dir
from seqssm import __version__
from seqssm.distributed import Dist, session
from seqssm.errors import SeqssmError
from seqssm.layers.mamba import check_backend, configure_backend
from seqssm.io.atomic import atomic_write_text
from seqssm.tokenizers.dna import DNATokenizer
from seqssm.training.finetune import (
    ArrayData,
    FinetuneCallbacks,
    FinetuneConfig,
    FinetuneStop,
    FinetuneTrainer,
    TaskLoss,
    evaluate_split,
    latest_finetune_checkpoint,
    selection_metric,
    truth_for_metrics,
)
from seqssm.training.lm import resolve_device

DEFAULT_MODEL = "hyenadna-small-chr20"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CURVES_FILE = "learning_curves.png"
ROC_FILE = "roc.png"
REGRESSION_FILE = "regression.png"
PREDICTIONS_FILE = "test_predictions.tsv"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")
SPLITS = ("random", "chrom", "region")

TRAIN_DEFAULTS = FinetuneConfig()
# FinetuneConfig fields a resumed run may change; every other one must match the run being resumed.
_MUTABLE = {"epochs", "patience", "eval_batch_size"}
# FinetuneOptions fields that define the data (fixed at the start of a run).
_DATA_FIELDS = ("regions", "genome", "sequences", "train", "valid", "test", "label_columns", "sequence_column",
                "task", "length", "skip_out_of_bounds", "split", "split_fractions", "split_seed", "valid_chroms",
                "test_chroms", "valid_regions", "test_regions", "model", "from_scratch")


@dataclass
class FinetuneOptions:
    """Everything `seqssm finetune` takes. ``None`` means: the default (fresh run) or the resumed run's value."""

    output: Path | str = "finetune-out"
    # inputs
    regions: Path | str | None = None
    genome: Path | str | None = None
    sequences: Path | str | None = None
    train: Path | str | None = None
    valid: Path | str | None = None
    test: Path | str | None = None
    label_columns: list = field(default_factory=list)
    sequence_column: str | None = None
    task: str = "auto"
    length: int | None = None
    skip_out_of_bounds: bool = False  # BED regions past a chromosome end (after --length) are skipped, not an error
    # split of a single input
    split: str | None = None  # random (default) | chrom | region
    split_fractions: tuple | list | None = None  # default (0.8, 0.1, 0.1)
    split_seed: int | None = None  # default 0
    valid_chroms: list = field(default_factory=list)
    test_chroms: list = field(default_factory=list)
    valid_regions: list = field(default_factory=list)
    test_regions: list = field(default_factory=list)
    # model
    model: str | None = None  # default DEFAULT_MODEL
    from_scratch: bool = False
    # training (FinetuneConfig fields; None = default / the resumed run's)
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    min_lr_ratio: float | None = None
    warmup_fraction: float | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    seed: int | None = None
    pooling: str | None = None
    dropout: float | None = None
    freeze_backbone: bool | None = None
    probe_epochs: int | None = None
    class_weights: str | None = None
    rc_augment: bool | None = None
    rc_average: bool | None = None
    patience: int | None = None
    early_stop_metric: str | None = None
    # the invocation
    device: str = "auto"
    backend: str = "auto"  # Mamba / Caduceus kernels (seqssm.layers.mamba.configure_backend)
    resume: bool = False
    force: bool = False
    max_minutes: float | None = None
    max_steps_this_run: int | None = None
    quiet: bool = False
    command: str | None = None  # recorded in training.json; default: rebuilt from the options


@dataclass
class FinetuneSummary:
    output: Path
    finished: bool
    reason: str
    task: str
    label_names: list
    epoch: int
    epochs: int
    step: int
    best_epoch: int | None
    metric: str
    best_value: float | None
    valid: dict | None
    test: dict | None
    seconds: float
    device: str
    parameters: int
    trainable_parameters: int
    split: str = ""
    sizes: dict = field(default_factory=dict)
    resumed_from: int | None = None


# ----------------------------------------------------------------------------- helpers


def _atomic_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _device_name(device: torch.device, dist: Dist | None = None) -> str:
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return f"{dist.world_size} x {name}" if dist is not None and dist.enabled else name


def _data_options(opts: FinetuneOptions) -> dict:
    d = {}
    for k in _DATA_FIELDS:
        v = getattr(opts, k)
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, tuple):
            v = list(v)
        d[k] = v
    return d


def _prepare_output(out: Path, *, resume: bool, force: bool) -> dict | None:
    """Check the output directory; return the saved run.json when there is a run to resume."""
    return prepare_run_dir(out, kind="finetune", resume=resume, force=force, run_file=RUN_FILE,
                           finished_hint=" (fine-tuned); use --force to overwrite it, "
                                         "or --resume with more --epochs to train it further")


def _resolve_config(opts: FinetuneOptions, saved: dict | None) -> FinetuneConfig:
    given = {k: getattr(opts, k) for k in FinetuneConfig.__dataclass_fields__ if getattr(opts, k, None) is not None}
    if saved is None:
        cfg = FinetuneConfig.from_dict({**TRAIN_DEFAULTS.to_dict(), **given})
    else:
        base = FinetuneConfig.from_dict(saved["finetune_config"])
        conflicts = [f"--{k.replace('_', '-')} {v} (the run has {getattr(base, k)})"
                     for k, v in given.items() if k not in _MUTABLE and v != getattr(base, k)]
        if conflicts:
            raise SeqssmError("cannot resume with different settings: " + "; ".join(conflicts) +
                              "; drop them, or use --force to start over")
        for k, v in given.items():
            setattr(base, k, v)
        cfg = base
    if cfg.patience == 0:
        cfg.patience = None
    cfg.validate()
    return cfg


def _merge_data_options(opts: FinetuneOptions, saved: dict | None) -> dict:
    """The data/model options of this run: the given ones, or on resume the saved ones (which must match)."""
    given = _data_options(opts)
    if saved is None:
        return given
    old = saved["data_options"]
    defaults = _data_options(FinetuneOptions())
    conflicts = []
    for k, v in given.items():
        if v in (None, [], False) or v == defaults[k]:
            continue
        if v != old.get(k):
            conflicts.append(f"{k.replace('_', '-')} {v} (the run has {old.get(k)})")
    if conflicts:
        raise SeqssmError("cannot resume with different data or model settings: " + "; ".join(conflicts) +
                          "; drop them, or use --force to start over")
    return dict(old)


def _input_kind(path) -> str:
    from seqssm.io import labeled

    p = Path(path)
    suffix = labeled._base_suffix(p)
    if suffix in labeled._BED_SUFFIXES:
        return "bed"
    if suffix in labeled._TABLE_SUFFIXES:
        return "table"
    if suffix in labeled._FASTA_SUFFIXES:
        return "fasta"
    return labeled._sniff_kind(p) if p.exists() else "table"


def _parse_fractions(v) -> tuple[float, float, float]:
    if v is None:
        return (0.8, 0.1, 0.1)
    if isinstance(v, str):
        parts = [p for p in v.replace(" ", "").split(",") if p]
    else:
        parts = list(v)
    try:
        f = [float(x) for x in parts]
    except ValueError:
        raise SeqssmError(f"--split-fractions {v!r}: expected TRAIN,VALID[,TEST] numbers, e.g. 0.8,0.1,0.1") from None
    if len(f) == 2:
        f.append(0.0)
    if len(f) != 3 or any(x < 0 for x in f) or f[0] <= 0 or f[1] <= 0:
        raise SeqssmError(f"--split-fractions {v!r}: expected TRAIN,VALID[,TEST] with TRAIN, VALID > 0")
    s = sum(f)
    if abs(s - 1.0) > 1e-6:
        raise SeqssmError(f"--split-fractions {v!r}: the fractions sum to {s:g}, not 1")
    return tuple(f)


def _read(path, d: dict, *, task="auto", label_names=None):
    from seqssm.io.labeled import read_labeled

    kind = _input_kind(path)
    kw = {"task": task, "label_names": label_names}
    if d["label_columns"]:
        kw["label_columns"] = list(d["label_columns"])
    if kind == "bed":
        if d.get("length") is not None:
            kw["length"] = int(d["length"])
        if d.get("skip_out_of_bounds"):
            kw["skip_out_of_bounds"] = True
        return read_labeled(path, genome=d.get("genome"), **kw), kind
    if d.get("length") is not None:
        raise SeqssmError(f"{path}: --length resizes BED regions (around their midpoint, from the genome); "
                          "the sequences of a table or FASTA file are used as they are")
    if kind == "table" and d.get("sequence_column"):
        kw["sequence_column"] = d["sequence_column"]
    elif d.get("sequence_column"):
        raise SeqssmError(f"{path}: --sequence-column applies to CSV/TSV tables only")
    if kind == "fasta" and d["label_columns"]:
        raise SeqssmError(f"{path}: --label-column applies to BED and CSV/TSV files (FASTA labels are in the headers)")
    return read_labeled(path, genome=d.get("genome") if kind == "bed" else None, **kw), kind


def _load_data(d: dict):
    """(Split, input kind, skipped counts, sources) from the data options."""
    from seqssm.io import splits

    single = d.get("regions") or d.get("sequences")
    explicit = d.get("train") or d.get("valid") or d.get("test")
    if d.get("regions") and d.get("sequences"):
        raise SeqssmError("give either --regions (with --genome) or --sequences, not both")
    if single and explicit:
        raise SeqssmError("give either one input to split (--regions or --sequences) or --train/--valid files, "
                          "not both")
    if not single and not explicit:
        raise SeqssmError("no input: give --regions BED --genome FASTA, --sequences FILE, or --train FILE --valid FILE")
    if d.get("regions") and not d.get("genome"):
        raise SeqssmError("--regions needs --genome (the FASTA the BED coordinates refer to)")
    if single:
        data, kind = _read(single, d, task=d["task"])
        skipped = {"all": dict(data.skipped)}
        how = d.get("split") or "random"
        if how not in SPLITS:
            raise SeqssmError(f"--split {how!r}: expected one of {', '.join(SPLITS)}")
        if how != "chrom" and (d.get("valid_chroms") or d.get("test_chroms")):
            raise SeqssmError("--valid-chroms/--test-chroms need --split chrom")
        if how != "region" and (d.get("valid_regions") or d.get("test_regions")):
            raise SeqssmError("--valid-regions/--test-regions need --split region")
        if how != "random" and d.get("split_fractions") is not None:
            raise SeqssmError("--split-fractions applies to --split random only")
        if how == "random":
            split = splits.random_split(data, _parse_fractions(d.get("split_fractions")),
                                        seed=int(d.get("split_seed") or 0), stratify=True)
        elif how == "chrom":
            if kind != "bed":
                raise SeqssmError("--split chrom needs BED regions (--regions); sequences have no chromosome")
            if not d.get("valid_chroms"):
                raise SeqssmError("--split chrom needs --valid-chroms (and optionally --test-chroms)")
            split = splits.chrom_split(data, valid_chroms=list(d["valid_chroms"]),
                                       test_chroms=list(d.get("test_chroms") or []))
        else:
            if kind != "bed":
                raise SeqssmError("--split region needs BED regions (--regions); sequences have no position")
            if not d.get("valid_regions"):
                raise SeqssmError("--split region needs --valid-regions (and optionally --test-regions)")
            split = splits.region_split(data, valid_regions=list(d["valid_regions"]),
                                        test_regions=list(d.get("test_regions") or []))
        return split, kind, skipped, {"input": str(single)}
    if not d.get("train") or not d.get("valid"):
        raise SeqssmError("explicit splits need both --train and --valid (--test is optional)")
    if d.get("split") or d.get("split_fractions") is not None or d.get("valid_chroms") or d.get("test_chroms") \
            or d.get("valid_regions") or d.get("test_regions"):
        raise SeqssmError("--split and its options apply to a single input (--regions/--sequences), not to "
                          "--train/--valid files")
    train, kind = _read(d["train"], d, task=d["task"])
    valid, _ = _read(d["valid"], d, task=train.task, label_names=train.label_names)
    test = _read(d["test"], d, task=train.task, label_names=train.label_names)[0] if d.get("test") else None
    skipped = {"train": dict(train.skipped), "valid": dict(valid.skipped)}
    if test is not None:
        skipped["test"] = dict(test.skipped)
    split = splits.explicit_split(train, valid, test)
    srcs = {"train": str(d["train"]), "valid": str(d["valid"])}
    if d.get("test"):
        srcs["test"] = str(d["test"])
    return split, kind, skipped, srcs


def _signature(parts: dict[str, ArrayData]) -> dict:
    """Sizes and a digest of every split's names, ids and targets (a resumed run must see the same data)."""
    out = {}
    for key, data in parts.items():
        if data is None:
            continue
        h = hashlib.sha256()
        for name, ids in zip(data.names, data.ids):
            h.update(name.encode("utf-8", "replace") + b"\0")
            h.update(np.ascontiguousarray(ids, dtype=np.uint8).tobytes() + b"\0")
        h.update(np.ascontiguousarray(data.targets, dtype=np.float32).tobytes())
        out[key] = {"n": len(data), "sha256": h.hexdigest()}
    return out


def _check_lengths(parts: dict, max_len: int | None, kind: str) -> None:
    """Inputs longer than the model takes (None: no limit) are an error naming the line."""
    for labeled in parts.values():
        if labeled is None or max_len is None:
            continue
        for e in labeled.examples:
            if len(e.ids) > max_len:
                hint = (f"use --length {max_len} (or less) to resize the regions around their midpoints"
                        if kind == "bed" else f"cut the sequences to at most {max_len} bp")
                raise SeqssmError(f"{labeled.source}, line {e.line}: {e.name} is {len(e.ids)} bp, longer than the "
                                  f"model's maximum length {max_len}; {hint}")


def _flatten_length(parts: dict, kind: str) -> int:
    """The one length of every input, which --pooling flatten needs; else an error naming the line."""
    first = None
    for labeled in parts.values():
        if labeled is None:
            continue
        for e in labeled.examples:
            if first is None:
                first = (labeled.source, e)
            elif len(e.ids) != len(first[1].ids):
                src, e0 = first
                hint = "resize the regions with --length" if kind == "bed" else "cut or pad them to one length"
                raise SeqssmError(f"{labeled.source}, line {e.line}: {e.name} is {len(e.ids)} bp, but {src}, line "
                                  f"{e0.line} ({e0.name}) is {len(e0.ids)} bp; --pooling flatten needs inputs of one "
                                  f"length ({hint}, or use --pooling mean)")
    return len(first[1].ids)


def command_line(opts: FinetuneOptions) -> str:
    """The `seqssm finetune` command equivalent to ``opts`` (options left unset are omitted)."""
    words = ["seqssm", "finetune", "-o", str(opts.output)]
    for name in ("regions", "genome", "sequences", "train", "valid", "test", "sequence_column", "length", "split",
                 "split_seed", "model", "epochs", "batch_size", "eval_batch_size", "lr", "head_lr", "min_lr_ratio",
                 "warmup_fraction", "weight_decay", "grad_clip", "seed", "pooling", "dropout", "probe_epochs", "class_weights",
                 "patience", "early_stop_metric", "max_minutes", "max_steps_this_run"):
        v = getattr(opts, name)
        if v is not None:
            words += [f"--{name.replace('_', '-')}", str(v)]
    if opts.task != "auto":
        words += ["--task", opts.task]
    if opts.skip_out_of_bounds:
        words.append("--skip-out-of-bounds")
    if opts.split_fractions is not None:
        f = opts.split_fractions
        words += ["--split-fractions", f if isinstance(f, str) else ",".join(f"{x:g}" for x in f)]
    for c in opts.label_columns:
        words += ["--label-column", str(c)]
    for name in ("valid_chroms", "test_chroms", "valid_regions", "test_regions"):
        v = getattr(opts, name)
        if v:
            words += [f"--{name.replace('_', '-')}", ",".join(map(str, v))]
    if opts.device != "auto":
        words += ["--device", opts.device]
    if opts.backend != "auto":
        words += ["--backend", opts.backend]
    for name, on in (("from-scratch", opts.from_scratch), ("freeze-backbone", opts.freeze_backbone),
                     ("rc-augment", opts.rc_augment), ("rc-average", opts.rc_average),
                     ("resume", opts.resume), ("force", opts.force)):
        if on:
            words.append(f"--{name}")
    return " ".join(shlex.quote(w) for w in words)


# ----------------------------------------------------------------------------- UI


class _Display(JobDisplay, FinetuneCallbacks):
    """Rich progress bar with live loss / validation metric on stderr, or plain log lines."""

    def __init__(self, console, *, quiet: bool):
        super().__init__(console, quiet=quiet)
        self.valid_text = "-"

    def on_start(self, tr: FinetuneTrainer) -> None:
        if tr.history:
            last = tr.history[-1]
            self.valid_text = _fmt(last.get(f"valid_{tr.metric}"))
        if not self.interactive:
            return
        self.start_bar("finetune", total=tr.total_steps, completed=tr.step,
                       fields="epoch {task.fields[epoch]}  loss {task.fields[loss]}  valid " f"{tr.metric} "
                              "{task.fields[valid]}",
                       epoch=f"{tr.epoch + 1}/{tr.cfg.epochs}", loss="-", valid=self.valid_text)

    def on_step(self, tr: FinetuneTrainer, rec: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=rec["step"], epoch=f"{rec['epoch']}/{tr.cfg.epochs}",
                                 loss=f"{rec['loss']:.4f}", valid=self.valid_text)

    def on_epoch(self, tr: FinetuneTrainer, row: dict) -> None:
        self.valid_text = _fmt(row.get(f"valid_{tr.metric}"))
        star = " [green]*best[/]" if row.get("improved") else ""
        shown = [f"{k[6:]} {_fmt(row.get(k))}" for k in
                 ("valid_accuracy", "valid_mcc", "valid_auroc", "valid_auprc", "valid_mse", "valid_pearson",
                  "valid_spearman") if k in row]
        self.log(f"[cyan]epoch {row['epoch']}/{tr.cfg.epochs}[/] step {row['step']}: train loss "
                 f"{row['train_loss']:.4f}, valid loss {_fmt(row.get('valid_loss'))}; " + ", ".join(shown) + star)
        if self.progress is not None:
            self.progress.update(self.task, valid=self.valid_text)

    def on_checkpoint(self, tr: FinetuneTrainer, path: Path) -> None:
        if not self.interactive:
            self.log(f"checkpoint {path}")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


# ----------------------------------------------------------------------------- the job


def run_finetune(opts: FinetuneOptions, console=None) -> FinetuneSummary:
    """Fine-tune (or continue fine-tuning) a classifier on a DNA backbone; see the module docstring."""
    with session(opts.device, resolve_device) as dist:
        return _run_finetune(opts, console, dist)


def _find_run(out: Path, opts: FinetuneOptions):
    saved = _prepare_output(out, resume=opts.resume, force=opts.force)
    return saved, (latest_finetune_checkpoint(out) if saved is not None else None)


def _run_finetune(opts: FinetuneOptions, console, dist: Dist) -> FinetuneSummary:
    from rich.console import Console

    from seqssm.models import count_parameters, load_model
    from seqssm.models.heads import HeadConfig, SequenceClassifier, lm_backbone, new_backbone
    from seqssm.models.io import architecture_of

    t_start = time.monotonic()
    console = console or Console(stderr=True)
    out = Path(opts.output).expanduser()
    check_run_budget(opts.max_minutes, opts.max_steps_this_run)
    if opts.task not in ("auto", "binary", "multiclass", "multilabel", "regression"):
        raise SeqssmError(f"--task {opts.task!r}: expected auto, binary, multiclass, multilabel or regression")
    if opts.length is not None and opts.length < 1:
        raise SeqssmError("--length must be >= 1")
    main = dist.is_main
    saved, ckpt = dist.on_main(lambda: _find_run(out, opts))
    device = dist.device
    check_backend(opts.backend, device, training=True)
    cfg = _resolve_config(opts, saved)
    dist.check_divisible(cfg.batch_size)
    d = _merge_data_options(opts, saved)
    d["model"] = d.get("model") or DEFAULT_MODEL

    def load():
        """The backbone and the data; every rank reads them (a failure on any rank stops them all)."""
        # The backbone first (its maximum length bounds --length), then the data.
        loaded = load_model(d["model"], device="cpu")
        config = loaded.config
        max_len = None if loaded.model_type == "caduceus" else int(loaded.max_length)  # Caduceus: no limit
        if d.get("length") is not None and max_len is not None and int(d["length"]) > max_len:
            raise SeqssmError(f"--length {d['length']} exceeds the model's maximum length {max_len}")
        split, kind, skipped, sources = _load_data(d)
        if split.dropped:
            skipped["in_no_split"] = dict(split.dropped)
        train_l, valid_l, test_l = split.train, split.valid, split.test
        task, label_names = train_l.task, list(train_l.label_names)
        if task not in ("binary", "multiclass", "multilabel", "regression"):
            raise SeqssmError(f"{train_l.source}: no labels to fine-tune on (task {task})")
        selection_metric(task, cfg)  # an --early-stop-metric of another task is an error before anything is written
        if len(train_l) == 0:
            raise SeqssmError("the training split is empty")
        if len(valid_l) == 0:
            raise SeqssmError("the validation split is empty; choose other --valid-chroms/--valid-regions or fractions")
        if task in ("binary", "multiclass"):
            counts = train_l.class_counts()
            present = [k for k, v in counts.items() if v > 0]
            if len(present) < 2:
                raise SeqssmError(f"the training split has a single class ({', '.join(present)}); a classifier needs "
                                  "at least two")
        train, valid = ArrayData.from_labeled(train_l), ArrayData.from_labeled(valid_l)
        test = ArrayData.from_labeled(test_l) if test_l is not None and len(test_l) else None
        signature = _signature({"train": train, "valid": valid, "test": test})
        if saved is not None and saved.get("data_signature") != signature:
            raise SeqssmError("cannot resume: the data or its split differ from the run's (same files and split "
                              "options are needed); use --force to start over")
        return loaded, config, max_len, split, kind, skipped, sources, train_l, valid_l, test_l, task, label_names, \
            train, valid, test, signature

    (loaded, config, max_len, split, kind, skipped, sources, train_l, valid_l, test_l, task, label_names, train, valid,
     test, signature) = dist.agree(load)

    # The model.
    parts = {"train": train_l, "valid": valid_l, "test": test_l}
    _check_lengths(parts, max_len, kind)
    flat_len = _flatten_length(parts, kind) if cfg.pooling == "flatten" else None
    loss_fn = TaskLoss(task, train_l.n_outputs, train.targets, class_weights=cfg.class_weights)
    head_cfg = HeadConfig(task=task, n_outputs=train_l.n_outputs, pooling=cfg.pooling, label_names=label_names,
                          dropout=cfg.dropout, target_mean=loss_fn.mean, target_std=loss_fn.std, length=flat_len)
    torch.manual_seed(cfg.seed)
    # --from-scratch: the same architecture, randomly initialised (and fed the same inputs: n_as_pad)
    backbone = new_backbone(config) if d.get("from_scratch") else lm_backbone(loaded.model)
    model = SequenceClassifier(config, head_cfg, backbone=backbone, n_as_pad=loaded.n_as_pad)
    configure_backend(model, opts.backend, device, training=True)
    tokenizer = DNATokenizer(model_max_length=int(loaded.max_length))
    del loaded
    architecture = architecture_of(config)
    n_params = count_parameters(model)
    n_trainable = count_parameters(model.head) if cfg.freeze_backbone else n_params

    preprocessing = {
        "input": kind,
        "length": d.get("length") if kind == "bed" else None,
        "label_columns": list(d["label_columns"]) or None,
        "sequence_column": d.get("sequence_column"),
        "strand": "minus-strand BED regions are reverse-complemented" if kind == "bed" else None,
        "tokens": "base ids only (no BOS/EOS), right-padded with PAD" +
                  ("; N fed as [PAD], as the backbone was pretrained" if model.n_as_pad else ""),
        "max_length": max_len,
        "train_max_length": train.max_length,
        "rc_average": bool(cfg.rc_average),
        "task": task,
        "label_names": label_names,
    }

    command = opts.command or command_line(opts)
    run = dict(saved or {})
    run.update({
        "kind": "finetune",
        "status": "running",
        "seqssm_version": __version__,
        "data_options": d,
        "data_signature": signature,
        "finetune_config": cfg.to_dict(),
        "model_config": config.to_dict(),
        "head_config": head_cfg.to_dict(),
        "parameters": n_params,
        "created": run.get("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        "commands": run.get("commands", []) + [command],
    })
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / RUN_FILE, run)

    display = _Display(console, quiet=opts.quiet or not main)
    sizes = {"train": len(train), "valid": len(valid), "test": len(test) if test is not None else 0}
    display.log(f"data: {task} task ({', '.join(label_names[:8])}{', ...' if len(label_names) > 8 else ''}); "
                f"{sizes['train']:,} train / {sizes['valid']:,} valid / {sizes['test']:,} test examples; "
                f"{split.description}")
    class_counts = {"train": train_l.class_counts(), "valid": valid_l.class_counts()}
    if test_l is not None:
        class_counts["test"] = test_l.class_counts()

    def base_metrics(tr: FinetuneTrainer) -> dict:
        return {
            "task": task, "label_names": label_names, "selection_metric": tr.metric, "direction": tr.direction,
            "history": tr.history, "best_epoch": tr.best.get("epoch"), "best_value": tr.best.get("value"),
            "epochs_done": tr.epoch, "steps": tr.step, "split": split.description, "sizes": sizes,
            "sources": sources, "class_counts": class_counts, "skipped": skipped,
            "loss": loss_fn.describe(), "options": {**cfg.to_dict(), **d}, "seqssm_version": __version__,
        }

    def on_history(tr: FinetuneTrainer) -> None:
        _atomic_json(out / METRICS_FILE, {**base_metrics(tr), "status": "running", "valid": None, "test": None})
        _plot_curves(out, tr)

    trainer = FinetuneTrainer(model, train, valid, cfg, run_dir=out, device=device, tokenizer=tokenizer,
                              preprocessing=preprocessing, loss_fn=loss_fn, callbacks=display,
                              on_history=on_history, extra_state={"model": d["model"]}, dist=dist)
    resumed_from = None
    if ckpt is not None:
        st = trainer.resume(ckpt)
        resumed_from = trainer.step
        display.log(f"resumed from {ckpt} (epoch {st['epoch']}, step {st['step']})")
    elif saved is not None:
        display.log("no checkpoint yet: starting from step 0")
    display.log(f"model: {'randomly initialised ' if d.get('from_scratch') else ''}{d['model']}, {architecture}"
                f" + {cfg.pooling}-pooled linear head; "
                f"{n_trainable:,} of {n_params:,} parameters trained"
                f"{f' (the head alone for the first {cfg.probe_epochs} epochs)' if cfg.probe_epochs else ''}; "
                f"device {_device_name(device, dist)}{' (bf16 autocast)' if device.type == 'cuda' else ''}")
    if model.strand_invariant and (cfg.rc_average or cfg.rc_augment):
        why = "--pooling both" if cfg.pooling == "both" else "a Caduceus-PS (RC-equivariant) with mean pooling"
        display.log(f"note: {why} is strand-symmetric by construction: --rc-augment changes nothing but float "
                    "rounding, and --rc-average is a no-op (not computed)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if saved is not None and saved.get("status") == "finished" and trainer.done():
        display.log(f"{out}: already finished (epoch {trainer.epoch}); give more --epochs to train further")
        final = json.loads((out / METRICS_FILE).read_text()) if (out / METRICS_FILE).is_file() else {}
        return _summary(out, trainer, True, "already finished", final.get("valid"), final.get("test"), t_start,
                        device, n_params, n_trainable, split, sizes, resumed_from, task, label_names)

    stop = FinetuneStop(max_minutes=opts.max_minutes, max_steps_this_run=opts.max_steps_this_run, started=t_start)
    with display:
        outcome = trainer.fit(stop)

    valid_m = test_m = None
    if outcome.finished:
        from seqssm.models.heads import load_finetuned

        best_model, *_ = load_finetuned(outcome.best_checkpoint, device="cpu")
        model.load_state_dict(best_model.state_dict(), strict=True)
        del best_model
        bs = cfg.eval_batch_size or 2 * cfg.batch_size
        kw = dict(task=task, label_names=label_names, device=device, batch_size=bs, rc_average=cfg.rc_average,
                  loss_fn=loss_fn, dist=dist)
        valid_m, valid_out = evaluate_split(model, valid, **kw)
        test_out = None
        if test is not None:
            test_m, test_out = evaluate_split(model, test, **kw)
        if not main:  # rank 0 writes the files; the others return the same summary
            return _summary(out, trainer, outcome.finished, outcome.reason, valid_m, test_m, t_start, device, n_params,
                            n_trainable, split, sizes, resumed_from, task, label_names, dist)
        if test is not None:
            _write_predictions(out / PREDICTIONS_FILE, task, label_names, test, test_out)
        _plot_final(out, task, label_names, valid, valid_out, test, test_out)
        final = {**base_metrics(trainer), "status": "finished", "stopped": outcome.reason,
                 "valid": valid_m, "test": test_m,
                 "evaluation": ("best epoch's model; outputs averaged over both strands" if cfg.rc_average
                                else "best epoch's model; forward strand")}
        _atomic_json(out / METRICS_FILE, final)
        info = {
            "task": (f"fine-tuned {architecture.split(' (')[0]} {task} classifier" if task != "regression"
                     else f"fine-tuned {architecture.split(' (')[0]} regression"),
            "architecture": architecture,
            "base_model": d["model"], "from_scratch": bool(d.get("from_scratch")),
            "label_names": label_names, "best_epoch": outcome.best_epoch, "selection_metric": trainer.metric,
            "valid": valid_m, "test": test_m, "split": split.description, "sizes": sizes, "sources": sources,
            "finetune_config": cfg.to_dict(), "loss": loss_fn.describe(),
            "training": {"epochs": trainer.epoch, "steps": trainer.step, "stopped": outcome.reason,
                         "device": _device_name(device, dist),
                         "precision": "bf16 autocast" if device.type == "cuda" else "float32",
                         "train_seconds": round(trainer.train_seconds, 1), "parameters": n_params,
                         "trainable_parameters": n_trainable},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "commands": run.get("commands", []), "seqssm_version": __version__,
        }
        if dist.enabled:
            info["training"]["data_parallel"] = {"world_size": dist.world_size, "backend": dist.backend,
                                                 "mode": "DDP", "global_batch_size": cfg.batch_size}
        _write_final_model(out, model, tokenizer, preprocessing, info)
        run.update(status="finished", epoch=trainer.epoch, step=trainer.step)
        _atomic_json(out / RUN_FILE, run)
        why = "" if outcome.reason == "finished" else f" ({outcome.reason})"
        display.log(f"[green]finished[/]{why}: best epoch {outcome.best_epoch}; model written to {out}")
    else:
        if main:
            run.update(status="running", epoch=trainer.epoch, step=trainer.step)
            _atomic_json(out / RUN_FILE, run)
        display.log(f"[yellow]stopped[/] at step {outcome.step}/{trainer.total_steps}: {outcome.reason}; "
                    f"checkpoint {outcome.checkpoint}; run again with --resume to continue")
    return _summary(out, trainer, outcome.finished, outcome.reason, valid_m, test_m, t_start, device, n_params,
                    n_trainable, split, sizes, resumed_from, task, label_names, dist)


def _summary(out, trainer, finished, reason, valid_m, test_m, t_start, device, n_params, n_trainable, split, sizes,
             resumed_from, task, label_names, dist: Dist | None = None) -> FinetuneSummary:
    return FinetuneSummary(
        output=out, finished=finished, reason=reason, task=task, label_names=label_names, epoch=trainer.epoch,
        epochs=trainer.cfg.epochs, step=trainer.step, best_epoch=trainer.best.get("epoch"), metric=trainer.metric,
        best_value=trainer.best.get("value"), valid=valid_m, test=test_m, seconds=time.monotonic() - t_start,
        device=_device_name(device, dist), parameters=n_params, trainable_parameters=n_trainable,
        split=split.description, sizes=sizes, resumed_from=resumed_from,
    )


def _plot_curves(out: Path, tr: FinetuneTrainer) -> None:
    from seqssm.training.plots import plot_learning_curves

    try:  # a plot is a convenience; never fail a run for it
        plot_learning_curves(tr.history, out / CURVES_FILE, metric=tr.metric,
                             title=f"seqssm finetune ({tr.task})")
    except Exception:  # noqa: BLE001
        pass


def _plot_final(out: Path, task: str, names: list, valid: ArrayData, valid_out, test: ArrayData | None,
                test_out) -> None:
    from seqssm.training.metrics import compute_metrics, roc_curve
    from seqssm.training.plots import plot_regression, plot_roc

    try:
        if task == "regression":
            data, outp, which = (test, test_out, "test") if test is not None else (valid, valid_out, "valid")
            plot_regression(data.targets, np.asarray(outp).reshape(data.targets.shape), out / REGRESSION_FILE,
                            title=f"{which} split: predicted vs true", task_names=names)
            return
        curves = {}
        for which, data, outp in (("valid", valid, valid_out), ("test", test, test_out)):
            if data is None:
                continue
            y = truth_for_metrics(task, data.targets)
            outp = np.asarray(outp)
            if task == "binary":
                cols = [(which, y, outp)]
            elif task == "multiclass":
                cols = [(f"{which} {n}", (y == j).astype(np.int64), outp[:, j]) for j, n in enumerate(names)]
            else:
                cols = [(f"{which} {n}", y[:, j], outp[:, j]) for j, n in enumerate(names)]
            for label, yy, ss in cols[:10]:
                keep = ~np.isnan(np.asarray(yy, dtype=np.float64))
                yy, ss = np.asarray(yy)[keep], np.asarray(ss)[keep]
                if len(np.unique(yy)) < 2:
                    curves[label] = None
                    continue
                fpr, tpr, _ = roc_curve(yy, ss)
                curves[label] = (fpr, tpr, compute_metrics("binary", yy, ss)["auroc"])
        title = "ROC" if task == "binary" else ("ROC, one class vs rest" if task == "multiclass" else "ROC per label")
        plot_roc(curves, out / ROC_FILE, title=title)
    except Exception:  # noqa: BLE001
        pass


def _write_predictions(path: Path, task: str, names: list, data: ArrayData, outputs: np.ndarray) -> None:
    """TSV: name, target, prediction, then per-class probabilities / per-task values."""
    outputs = np.asarray(outputs)
    lines = []
    if task == "binary":
        head = ["name", "target", "prediction", f"prob_{names[1]}"]
        for n, t, p in zip(data.names, data.targets[:, 0], outputs):
            lines.append([n, names[int(t)], names[int(p >= 0.5)], f"{p:.6g}"])
    elif task == "multiclass":
        head = ["name", "target", "prediction"] + [f"prob_{c}" for c in names]
        for n, t, p in zip(data.names, data.targets[:, 0], outputs):
            lines.append([n, names[int(t)], names[int(np.argmax(p))]] + [f"{x:.6g}" for x in p])
    elif task == "multilabel":
        head = ["name", "target", "prediction"] + [f"prob_{c}" for c in names]
        for n, t, p in zip(data.names, data.targets, outputs):
            tl = ",".join(c for c, v in zip(names, t) if v == 1)
            pl = ",".join(c for c, v in zip(names, p) if v >= 0.5)
            lines.append([n, tl, pl] + [f"{x:.6g}" for x in p])
    else:
        vals = outputs.reshape(len(data), -1)
        if len(names) == 1:
            head = ["name", "target", "prediction"]
            for n, t, p in zip(data.names, data.targets[:, 0], vals[:, 0]):
                lines.append([n, f"{t:.6g}", f"{p:.6g}"])
        else:
            head = ["name"] + [f"target_{c}" for c in names] + [f"prediction_{c}" for c in names]
            for n, t, p in zip(data.names, data.targets, vals):
                lines.append([n] + [f"{x:.6g}" for x in t] + [f"{x:.6g}" for x in p])
    text = "\t".join(head) + "\n" + "".join("\t".join(r) + "\n" for r in lines)
    atomic_write_text(path, text)


def _write_final_model(out: Path, model, tokenizer, preprocessing: dict, info: dict) -> None:
    """save_finetuned into a fresh directory inside OUT, then move the four files into OUT
    (training.json last: its presence marks a complete model)."""
    from seqssm.models.heads import save_finetuned

    tmp = out / f".final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (out / "training.json").unlink(missing_ok=True)
    save_finetuned(model, tmp, tokenizer=tokenizer, preprocessing=preprocessing, info=info)
    for name in MODEL_FILES:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.glob(".final-*"):
        shutil.rmtree(stale, ignore_errors=True)


__all__ = ["FinetuneOptions", "FinetuneSummary", "run_finetune", "command_line", "DEFAULT_MODEL"]
