"""`seqssm finetune`: train a classifier / regressor on labeled regions or sequences."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from seqssm.cli.main import app, run_guarded, stderr
from seqssm.distributed import is_main_process


def _commas(values: Optional[List[str]]) -> list[str]:
    """Repeatable options that also take comma lists: ["chr1,chr2", "chr3"] -> ["chr1", "chr2", "chr3"]."""
    out = []
    for v in values or []:
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def _regions(values: Optional[List[str]]) -> list[str]:
    """Held-out ranges: repeatable; several in one value separated by ';' or by ',' between ranges
    (commas inside the numbers, as in chr1:1,000-2,000, are kept)."""
    out = []
    for v in values or []:
        for part in str(v).replace(";", " ").split():
            chunk = []
            for piece in part.split(","):
                # digits without a ':' continue a number (chr1:1,000-2,000); anything else starts a range
                if chunk and piece[:1].isdigit() and ":" not in piece:
                    chunk.append(piece)
                else:
                    if chunk:
                        out.append(",".join(chunk))
                    chunk = [piece] if piece else []
            if chunk:
                out.append(",".join(chunk))
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@app.command()
def finetune(
    output: Path = typer.Option(..., "-o", "--output", help="Run directory: the fine-tuned model, metrics, plots, checkpoints."),
    regions: Optional[Path] = typer.Option(None, "--regions", help="Labeled BED regions (needs --genome); split by --split."),
    genome: Optional[Path] = typer.Option(None, "--genome", help="Genome FASTA (indexed, plain or BGZF) of the BED coordinates."),
    sequences: Optional[Path] = typer.Option(
        None, "--sequences", help="Labeled sequences: CSV/TSV table or FASTA with labels in the headers; split by --split."),
    train: Optional[Path] = typer.Option(None, "--train", help="Training file (BED, CSV/TSV or FASTA); with --valid, instead of --split."),
    valid: Optional[Path] = typer.Option(None, "--valid", help="Validation file (same kinds as --train)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Test file (same kinds as --train); optional."),
    label_column: Optional[List[str]] = typer.Option(
        None, "--label-column", help="Label column: name or 1-based number; repeat for multi-label / multi-task. "
        "Default: label/labels/y/target (tables), column 4 (BED)."),
    sequence_column: Optional[str] = typer.Option(None, "--sequence-column", help="Sequence column of a table (name or 1-based number)."),
    task: str = typer.Option("auto", "--task", help="auto, binary, multiclass, multilabel or regression."),
    length: Optional[int] = typer.Option(None, "--length", help="Resize BED regions to this many bp around their midpoints."),
    skip_out_of_bounds: bool = typer.Option(
        False, "--skip-out-of-bounds", help="Skip (and count) BED regions that reach past a chromosome end after --length."),
    split: Optional[str] = typer.Option(None, "--split", help="random (seeded, stratified; default), chrom or region."),
    split_fractions: Optional[str] = typer.Option(None, "--split-fractions", help="TRAIN,VALID[,TEST] for --split random. Default 0.8,0.1,0.1."),
    split_seed: Optional[int] = typer.Option(None, "--split-seed", help="Seed of the random split. Default 0."),
    valid_chroms: Optional[List[str]] = typer.Option(None, "--valid-chroms", help="Validation chromosomes (comma list) for --split chrom."),
    test_chroms: Optional[List[str]] = typer.Option(None, "--test-chroms", help="Test chromosomes (comma list) for --split chrom."),
    valid_regions: Optional[List[str]] = typer.Option(
        None, "--valid-regions", help="Validation ranges chrom:start-end (1-based, inclusive; repeatable or ';'-separated) for --split region."),
    test_regions: Optional[List[str]] = typer.Option(None, "--test-regions", help="Test ranges, as --valid-regions."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Backbone: bundled name (e.g. caduceus-ps-chr20), seqssm model dir, or HuggingFace HyenaDNA / Caduceus dir. Default hyenadna-small-chr20."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="The --model architecture, randomly initialised (a baseline)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the head only (linear probe)."),
    probe_epochs: Optional[int] = typer.Option(
        None, "--probe-epochs", help="Train the head alone for this many epochs first, then everything (LP-FT). Default 0."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="mean (default), last, both (mean over both strands; for Caduceus-PS, which is strand-invariant already, the same as mean), or flatten (a weight per position, for aligned inputs of one length)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs. Default 10."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Sequences per step. Default 32."),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help="Sequences per evaluation batch. Default 2 x --batch-size."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the backbone (AdamW). Default 3e-4."),
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="Peak learning rate of the head. Default 1e-3."),
    min_lr_ratio: Optional[float] = typer.Option(None, "--min-lr-ratio", help="The cosine decays to this fraction of each peak. Default 0.1."),
    warmup_fraction: Optional[float] = typer.Option(None, "--warmup-fraction", help="Linear warm-up over this fraction of all steps. Default 0.1."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay, matrices only. Default 0.01."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient-norm clip (0: off). Default 1.0."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout before the head. Default 0.1."),
    class_weights: Optional[str] = typer.Option(
        None, "--class-weights", help="auto (default: inverse class frequency; pos_weight for binary/multilabel) or none."),
    rc_augment: bool = typer.Option(False, "--rc-augment", help="Reverse-complement each training sequence with probability 1/2."),
    rc_average: bool = typer.Option(False, "--rc-average", help="Evaluate (and predict) with outputs averaged over both strands."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after this many epochs without improvement (0: never). Default 3."),
    early_stop_metric: Optional[str] = typer.Option(
        None, "--early-stop-metric", help="Validation metric selecting the best epoch: loss, accuracy, mcc, macro_f1, auroc, "
        "auprc, mse, pearson, spearman. Default auroc (binary, multilabel), mcc (multiclass), pearson (regression)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the head initialisation, data order and dropout. Default 0."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Kernels of Mamba / Caduceus backbones: auto (mamba-ssm + causal-conv1d on a GPU where installed, else PyTorch; passes without gradients on a GPU scan with seqssm's Triton kernel), torch, cuda (mamba-ssm + causal-conv1d)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its latest checkpoint (starts it if there is none)."),
    force: bool = typer.Option(False, "--force", help="Delete the run in OUTPUT and start over."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly (checkpoint saved) before this many minutes; continue with --resume."),
    max_steps_this_run: Optional[int] = typer.Option(
        None, "--max-steps-this-run", help="Stop cleanly (checkpoint saved) after this many steps; continue with --resume."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, log lines or summary."),
) -> None:
    """Fine-tune a HyenaDNA or Caduceus / Mamba model on labeled regions or sequences (classification, multi-label, regression).

    Metrics on the validation split every epoch and on the test split at the end go to
    OUTPUT/metrics.json, with learning curves and ROC (or regression) plots; the best epoch's model
    is written to OUTPUT as a seqssm model directory for `seqssm predict` (and `seqssm embed`).
    """
    from seqssm.pipelines.finetune import FinetuneOptions, run_finetune

    opts = FinetuneOptions(
        output=output, regions=regions, genome=genome, sequences=sequences, train=train, valid=valid, test=test,
        label_columns=list(label_column or []), sequence_column=sequence_column, task=task, length=length,
        skip_out_of_bounds=skip_out_of_bounds,
        split=split, split_fractions=split_fractions, split_seed=split_seed, valid_chroms=_commas(valid_chroms),
        test_chroms=_commas(test_chroms), valid_regions=_regions(valid_regions), test_regions=_regions(test_regions),
        model=model, from_scratch=from_scratch, epochs=epochs, batch_size=batch_size, eval_batch_size=eval_batch_size,
        lr=lr, head_lr=head_lr, min_lr_ratio=min_lr_ratio, warmup_fraction=warmup_fraction, weight_decay=weight_decay,
        grad_clip=grad_clip, seed=seed, pooling=pooling, dropout=dropout,
        freeze_backbone=True if freeze_backbone else None, probe_epochs=probe_epochs, class_weights=class_weights,
        rc_augment=True if rc_augment else None, rc_average=True if rc_average else None, patience=patience,
        early_stop_metric=early_stop_metric, device=device, backend=backend, resume=resume, force=force, max_minutes=max_minutes,
        max_steps_this_run=max_steps_this_run, quiet=quiet,
    )
    s = run_guarded(run_finetune, opts, stderr)
    if quiet or not is_main_process():
        return
    t = Table(title="seqssm finetune", show_header=False, title_justify="left")
    t.add_row("output", str(s.output))
    t.add_row("status", ("finished" + (f" ({s.reason})" if s.reason != "finished" else "")) if s.finished
              else f"stopped ({s.reason}); continue with --resume")
    t.add_row("task", f"{s.task}: {', '.join(s.label_names[:10])}{', ...' if len(s.label_names) > 10 else ''}")
    t.add_row("data", f"{s.sizes.get('train', 0):,} train / {s.sizes.get('valid', 0):,} valid / "
                      f"{s.sizes.get('test', 0):,} test")
    if s.split:
        t.add_row("split", s.split)
    t.add_row("model", f"{s.trainable_parameters:,} of {s.parameters:,} parameters trained, on {s.device}")
    t.add_row("epochs", f"{s.epoch}/{s.epochs} ({s.step:,} steps)" + (f", resumed at step {s.resumed_from:,}"
                                                                      if s.resumed_from else ""))
    if s.best_epoch is not None:
        t.add_row("best epoch", f"{s.best_epoch} (valid {s.metric} {_fmt(s.best_value)})")
    from seqssm.training.metrics import CLASSIFICATION_KEYS, REGRESSION_KEYS

    keys = REGRESSION_KEYS if s.task == "regression" else CLASSIFICATION_KEYS
    for name, m in (("valid", s.valid), ("test", s.test)):
        if m:
            t.add_row(f"{name} metrics", "  ".join(f"{k} {_fmt(m.get(k))}" for k in keys))
    t.add_row("time this run", f"{s.seconds:.1f} s")
    stderr.print(t)
