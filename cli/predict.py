"""`seqssm predict`: a fine-tuned model's predictions for regions, a sequence table or a FASTA."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from seqssm.cli.main import app, run_guarded, stderr
from seqssm.pipelines.predict import PredictOptions, run_predict


@app.command()
def predict(
    model: str = typer.Option(..., "--model", "-m", help="A fine-tuned model directory (from seqssm finetune)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output table: .tsv or .parquet."),
    regions: Optional[Path] = typer.Option(None, "--regions", help="BED file of regions (with --genome)."),
    genome: Optional[Path] = typer.Option(None, "--genome", help="FASTA the BED coordinates refer to."),
    sequences: Optional[Path] = typer.Option(None, "--sequences", help="CSV/TSV table with a sequence column, or a FASTA."),
    sequence_column: Optional[str] = typer.Option(None, "--sequence-column", help="Sequence column of a table (default: as in fine-tuning, else sequence/seq/seqs)."),
    label_column: Optional[list[str]] = typer.Option(None, "--label-column", help="Label column(s) of the input to score the predictions against (BED: name or 1-based index). Default: as in fine-tuning; tables: label/labels when present."),
    rc_average: Optional[bool] = typer.Option(None, "--rc-average/--no-rc-average", help="Average forward and reverse-complement predictions. Default: as the model was evaluated."),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    backend: str = typer.Option("auto", "--backend", help="Kernels of Mamba / Caduceus models: auto (for inference on a GPU seqssm's Triton scan; for training mamba-ssm + causal-conv1d where installed; else PyTorch), torch, cuda (mamba-ssm + causal-conv1d), triton (seqssm's scan)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Predict labels or values for every input sequence, with its coordinates.

    Regions are resized as the model was fine-tuned (--length) and minus-strand regions are
    reverse-complemented. If the input has labels, metrics on it are printed too.
    """
    opts = PredictOptions(model=model, output=output, regions=regions, genome=genome, sequences=sequences,
                          sequence_column=sequence_column,
                          label_columns=[int(c) if c.isdigit() else c for c in label_column] if label_column else None,
                          rc_average=rc_average, batch_size=batch_size,
                          device=device, backend=backend, force=force, quiet=quiet)
    s = run_guarded(run_predict, opts)
    if quiet:
        return
    t = Table(title="seqssm predict", show_header=False, title_justify="left")
    t.add_row("output", str(s.output))
    t.add_row("task", f"{s.task} ({', '.join(s.label_names)})")
    t.add_row("sequences", f"{s.rows:,} in {s.seconds:.1f} s")
    for reason, n in s.skipped.items():
        t.add_row(f"skipped: {reason}", f"{n:,}")
    if s.metrics:
        from seqssm.training.metrics import CLASSIFICATION_KEYS, REGRESSION_KEYS

        for k in CLASSIFICATION_KEYS + REGRESSION_KEYS:
            v = s.metrics.get(k)
            if isinstance(v, (int, float)):
                t.add_row(k, f"{v:.4f}")
    stderr.print(t)
