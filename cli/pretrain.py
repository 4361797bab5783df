"""`seqssm pretrain`: train a DNA language model (HyenaDNA, Caduceus, Mamba) on FASTA files, with a held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from seqssm.cli.main import app, run_guarded, stderr
from seqssm.distributed import is_main_process
from seqssm.pipelines.progress import si


@app.command()
def pretrain(
    fasta: Optional[List[Path]] = typer.Argument(
        None, help="Training FASTA file(s): plain, gzip or BGZF. With --resume they may be left out."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory: checkpoints, metrics, curves and the final model."),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="hyena (next-base objective; the default), caduceus (bidirectional Mamba, masked-LM "
        "objective) or mamba (causal Mamba, next-base objective: can embed --stream). --init implies it."),
    rcps: Optional[bool] = typer.Option(
        None, "--rcps/--no-rcps", help="Caduceus: RC-equivariant Caduceus-PS (default), or a plain bidirectional "
        "Caduceus (Caduceus-Ph), which is then trained with reverse-complement augmentation."),
    d_model: Optional[int] = typer.Option(None, "--d-model", help="Model width. Default 256 (caduceus, mamba: 128; or the --init model's)."),
    n_layer: Optional[int] = typer.Option(None, "--n-layer", help="Blocks (Hyena or Mamba). Default 4."),
    d_inner: Optional[int] = typer.Option(None, "--d-inner", help="HyenaDNA MLP width. Default 4 x d_model."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Window length in bp (HyenaDNA: the model's maximum length). Default 1024."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Windows per micro-batch. Default 64."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step. Default 1."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW). Default 1e-3 (caduceus, mamba: 8e-3)."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Learning rate at the end of the cosine decay. Default 1e-4."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps. Default 300 (caduceus, mamba: 10% of --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps of the whole run. Default 10000."),
    weight_decay: Optional[float] = typer.Option(
        None, "--weight-decay", help="AdamW weight decay (HyenaDNA: matrices only; Caduceus, Mamba: not on A_log, D, "
        "biases, embeddings, norms). Default 0.1."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Gradient-norm clip (0: off). Default 1.0."),
    valid_region: Optional[List[str]] = typer.Option(
        None, "--valid-region",
        help="Held-out region NAME:START-END (1-based, inclusive) or NAME; repeatable. Cut out of training."),
    valid_file: Optional[List[Path]] = typer.Option(None, "--valid-file", help="Held-out FASTA file; repeatable."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate on the held-out windows every N steps. Default 500."),
    eval_max_windows: Optional[int] = typer.Option(
        None, "--eval-max-windows", help="Periodic evaluations use this many evenly spaced held-out windows (the final one uses all)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps. Default 500."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the initialisation and of the window sampling. Default 0."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its latest checkpoint (starts it if there is none)."),
    force: bool = typer.Option(False, "--force", help="Delete the run in OUTPUT and start over."),
    max_minutes: Optional[float] = typer.Option(
        None, "--max-minutes", help="Stop cleanly (checkpoint saved) before this many minutes; continue with --resume."),
    max_steps_this_run: Optional[int] = typer.Option(
        None, "--max-steps-this-run", help="Stop cleanly (checkpoint saved) after this many steps; continue with --resume."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from an existing model: bundled name or model directory."),
    markov_baseline: bool = typer.Option(
        True, "--markov-baseline/--no-markov-baseline",
        help="Fit the order-k Markov baseline (k=0..10) on the same split and record it in training.json "
        "(next-base runs; masked-LM runs record a no-context base-frequency reference instead)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model for training (GPU)."),
    backend: str = typer.Option("auto", "--backend", help="Kernels of Mamba / Caduceus models: auto (mamba-ssm + causal-conv1d on a GPU where installed, else PyTorch; passes without gradients on a GPU scan with seqssm's Triton kernel), torch, cuda (mamba-ssm + causal-conv1d)."),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="Under torchrun: shard parameters, gradients and optimizer state across the "
        "processes (FSDP2) instead of replicating the model (DDP). For models that do not fit on one GPU."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, log lines or summary."),
) -> None:
    """Pretrain a DNA language model on FASTA files: HyenaDNA or causal Mamba (next base), Caduceus (masked LM).

    Part of the data is held out (--valid-region / --valid-file; default: the last 5% of the
    largest record). Next-base perplexity is exp(mean NLL per predicted A/C/G/T base; N targets
    are ignored). Caduceus: 15% of the positions are masked (80% [MASK], 10% random base, 10%
    unchanged); held-out masked accuracy and perplexity over the masked A/C/G/T positions, with
    fixed masks. The final model is written to OUTPUT as a seqssm model directory.
    Several GPUs: torchrun --nproc_per_node=N -m seqssm.cli pretrain ... (--batch-size is global).
    """
    from seqssm.pipelines.pretrain import PretrainOptions, run_pretrain

    opts = PretrainOptions(
        fasta=list(fasta or []), output=output, arch=arch, rcps=rcps, d_model=d_model, n_layer=n_layer, d_inner=d_inner,
        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr,
        warmup_steps=warmup_steps, max_steps=max_steps, weight_decay=weight_decay, grad_clip=grad_clip,
        eval_every=eval_every, eval_max_windows=eval_max_windows, save_every=save_every, seed=seed,
        valid_regions=list(valid_region or []), valid_files=list(valid_file or []), device=device,
        resume=resume, force=force, max_minutes=max_minutes, max_steps_this_run=max_steps_this_run, init=init,
        markov_baseline=markov_baseline, compile=compile, backend=backend, fsdp=fsdp, quiet=quiet,
    )
    s = run_guarded(run_pretrain, opts, stderr)
    if quiet or not is_main_process():
        return
    t = Table(title="seqssm pretrain", show_header=False, title_justify="left")
    t.add_row("output", str(s.output))
    t.add_row("status", "finished" if s.finished else f"stopped ({s.reason}); continue with --resume")
    t.add_row("steps", f"{s.step:,}/{s.max_steps:,}" + (f" (resumed at {s.resumed_from:,})" if s.resumed_from else ""))
    t.add_row("tokens seen", si(s.tokens_seen, "tokens"))
    t.add_row("model", f"{s.architecture or 'HyenaDNA'}, {s.parameters:,} parameters, on {s.device}")
    if s.split_rule:
        t.add_row("held-out split", s.split_rule)
    if s.heldout and s.objective == "mlm":
        t.add_row("held-out masked accuracy", f"{s.heldout['masked_accuracy']:.4f} "
                  f"({s.heldout['targets']:,} masked A/C/G/T positions)")
        t.add_row("held-out masked perplexity", f"{s.heldout['perplexity']:.4f}")
        if s.baseline:
            t.add_row("no-context reference", f"accuracy {s.baseline['masked_accuracy']:.4f}, "
                      f"perplexity {s.baseline['perplexity']:.4f} (the token at the position alone)")
    elif s.heldout:
        t.add_row("held-out perplexity", f"{s.heldout['perplexity']:.4f} (all A/C/G/T targets)")
        t.add_row("  on the shared set", f"{s.heldout['shared_perplexity']:.4f}")
    if s.markov:
        b = s.markov["best"]
        t.add_row("Markov baseline", f"best k={b['k']}: {b['ppl']:.4f} (shared set, {s.markov['positions']:,} bases)")
    t.add_row("time this run", f"{s.seconds:.1f} s")
    stderr.print(t)
