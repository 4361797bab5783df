"""`seqssm embed`: embeddings of a genome's windows (or BED regions) with their coordinates."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from seqssm.cli.main import app, run_guarded, stderr
from seqssm.distributed import is_main_process
from seqssm.pipelines.embed import DEFAULT_MODEL, EmbedOptions, run_embed
from seqssm.pipelines.progress import si


@app.command()
def embed(
    fasta: Path = typer.Argument(..., help="FASTA file: plain, gzip or BGZF (.fai/.gzi used when present)."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output",
        help="Output: a Parquet file (--pool mean) or a directory (--pool none). "
        "Default: <fasta name>.embeddings.parquet / <fasta name>.tokens",
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", "-m",
        help="Bundled model name, seqssm model directory or HuggingFace-format directory (HyenaDNA, Caduceus).",
    ),
    window: Optional[int] = typer.Option(
        None, "--window", "-w",
        help="Window length in bp. Default: the model's maximum length (Caduceus: its training window; longer is allowed).",
    ),
    stride: Optional[int] = typer.Option(
        None, "--stride", "-s",
        help="Step between window starts. Default: the window (no overlap). A smaller stride overlaps the windows, so "
        "every base has one window where it is far from the edges (bidirectional models lack context on both sides "
        "at the edges, causal ones on the left); every window is written as it is.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Windows per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    pool: str = typer.Option("mean", "--pool", help="mean: one vector per window (Parquet). none: per-token float16 arrays (.npy + index)."),
    rc_average: bool = typer.Option(
        False, "--rc-average",
        help="Average forward and reverse-complement passes, aligned to forward coordinates (Caduceus-PS: strand-"
        "invariant already, so a no-op).",
    ),
    stream: bool = typer.Option(
        False, "--stream",
        help="Causal Mamba models only: walk each record window after window carrying the model state, so every "
        "window is embedded with all of its record's bases to its left, in constant memory. Bidirectional models "
        "(Caduceus) cannot: use overlapping windows (--stride < --window).",
    ),
    regions: Optional[Path] = typer.Option(None, "--regions", help="BED file: embed only these intervals (minus-strand ones reverse-complemented). Needs an indexable FASTA."),
    max_n_frac: float = typer.Option(0.5, "--max-n-frac", help="Skip windows with a larger fraction of N (reported in the summary)."),
    backend: str = typer.Option("auto", "--backend", help="Kernels of Mamba / Caduceus models: auto (for inference on a GPU seqssm's Triton scan; for training mamba-ssm + causal-conv1d where installed; else PyTorch), torch, cuda (mamba-ssm + causal-conv1d), triton (seqssm's scan)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same command."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Embed every window of a genome (or the regions of a BED file) with a DNA model.

    Coordinates in the output are 0-based and half-open, like BED. Each window is embedded on its
    own unless --stream; with overlapping windows (--stride < --window) the pooled output has one
    row per window and the per-token output every window's rows (a base covered by k windows
    appears k times).
    """
    opts = EmbedOptions(
        fasta=fasta, output=output, model=model, window=window, stride=stride, batch_size=batch_size,
        device=device, backend=backend, pool=pool, rc_average=rc_average, regions=regions, max_n_frac=max_n_frac,
        stream=stream, resume=resume, force=force, quiet=quiet,
    )
    s = run_guarded(run_embed, opts)
    if quiet or not is_main_process():
        return
    t = Table(title="seqssm embed", show_header=False, title_justify="left")
    t.add_row("output", str(s.output))
    t.add_row("model", f"{s.model} (dim {s.dim}) on {s.device}")
    t.add_row("windows written", f"{s.windows:,}")
    t.add_row("skipped (N fraction > %.2g)" % max_n_frac, f"{s.skipped_n:,}")
    if s.resumed_from:
        t.add_row("resumed after", f"{s.resumed_from:,} windows")
    t.add_row("throughput", f"{si(s.bases, 'bp')} in {s.seconds:.1f} s = {si(s.bases_per_s, 'bp')}/s")
    stderr.print(t)
    for note in s.extra.get("notes", []):
        stderr.print(f"note: {note}", highlight=False, soft_wrap=True)
