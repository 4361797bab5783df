"""Chemistry commands: pretrain-molecules, finetune-molecules, generate-molecules, score-molecules,
evaluate-molecules."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from seqssm.cli.main import app, run_guarded, stderr
from seqssm.distributed import is_main_process

_MODEL_HELP = "Chemical LM: bundled name (default s4-chem-moses) or a model directory."
# Options the two training commands share, defined once.
_RANDOMIZE = typer.Option(None, "--randomize", help="Train on K random SMILES of each molecule (RDKit, seeded), a new one each epoch (cycled); 0: off. Default off.")
_GIVEN_SHARE = typer.Option(None, "--given-share", help="With --randomize: each molecule keeps its given SMILES instead of the epoch's random form with this probability (seeded; validation mixed alike). Default 0.")
_SPLIT_SEED = typer.Option(None, "--split-seed", help="Seed of the validation hold-out alone (default: --seed), so a run with a new --seed can keep an earlier run's split.")
_KEEP_CHECKPOINTS = typer.Option(None, "--keep-checkpoints", help="Newest checkpoints kept in OUTPUT/checkpoints (each can be sampled with --model). Default 1.")


def _train(kind: str, smiles, output, **kw):
    from seqssm.pipelines.molecule_train import MoleculeTrainOptions, run_molecule_training

    opts = MoleculeTrainOptions(kind=kind, smiles=list(smiles or []), output=output, **kw)
    s = run_guarded(run_molecule_training, opts, stderr)
    if kw.get("quiet") or not is_main_process():
        return
    t = Table(title=f"seqssm {kind}", show_header=False, title_justify="left")
    t.add_row("output", str(s.output))
    t.add_row("status", "finished" if s.finished else f"stopped ({s.reason}); continue with --resume")
    if s.finished and s.reason != "finished":
        t.add_row("stopped", s.reason)
    t.add_row("steps", f"{s.step:,}/{s.max_steps:,}" + (f" (resumed at {s.resumed_from:,})" if s.resumed_from else ""))
    t.add_row("molecules", f"{s.data['train_molecules']:,} training, {s.data['valid_molecules']:,} validation")
    skipped = {k: s.data.get(k, 0) for k in ("unparsable", "too_long", "unknown_token")}
    if any(skipped.values()):
        t.add_row("skipped", ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in skipped.items() if v))
    t.add_row("model", f"S4 chemical LM, {s.parameters:,} parameters, on {s.device}")
    if s.best:
        t.add_row("best validation", f"loss {s.best['val_loss']:.4f} nats/token, perplexity {s.best['val_ppl']:.4f} "
                  f"(step {s.best['step']:,}, epoch {s.best['epoch']:.2f})")
    if s.tokens_per_s:
        t.add_row("training speed", f"{s.tokens_per_s:,.0f} tokens/s")
    t.add_row("time this run", f"{s.seconds:.1f} s")
    stderr.print(t)


@app.command("pretrain-molecules")
def pretrain_molecules(
    smiles: Optional[List[Path]] = typer.Argument(None, help="SMILES file(s): .smi/.txt/.csv/.tsv, optionally .gz or .zip. With --resume they may be left out."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory: checkpoints, metrics, curves and the final model."),
    valid_file: Optional[Path] = typer.Option(None, "--valid-file", help="Validation SMILES (default: hold out --valid-fraction)."),
    valid_fraction: Optional[float] = typer.Option(None, "--valid-fraction", help="Random share held out for validation. Default 0.05."),
    column: Optional[str] = typer.Option(None, "--column", help="CSV column holding the SMILES (default: SMILES/smiles, else the first)."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Maximum tokens per molecule with begin/end. Default 100; longer SMILES are skipped."),
    canonicalize: bool = typer.Option(False, "--canonicalize", help="Train on RDKit canonical SMILES."),
    randomize: Optional[int] = _RANDOMIZE,
    given_share: Optional[float] = _GIVEN_SHARE,
    d_model: Optional[int] = typer.Option(None, "--d-model", help="Model width. Default 256."),
    n_blocks: Optional[int] = typer.Option(None, "--n-blocks", help="Blocks of [S4, S4, feed-forward]. Default 4."),
    d_state: Optional[int] = typer.Option(None, "--d-state", help="S4 state size N. Default 64."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout. Default 0.25."),
    kernel: Optional[str] = typer.Option(None, "--kernel", help="S4 kernel: nplr (S4, HiPPO-LegS) or diag (S4D). Default nplr."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training set. Default 10."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Molecules per step. Default 512."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (AdamW). Default 1e-3."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Learning rate at the end of the cosine decay. Default 1e-4."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps. Default 100."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices. Default 0.01."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps. Default: each epoch."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after N validations without improvement (0: never). Default 0."),
    keep_checkpoints: Optional[int] = _KEEP_CHECKPOINTS,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, split, random forms and batch order. Default 0."),
    split_seed: Optional[int] = _SPLIT_SEED,
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
    n_jobs: int = typer.Option(1, "--n-jobs", help="Processes for the RDKit checks of big SMILES sets."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its latest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Delete the run in OUTPUT and start over."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly (checkpoint saved) before this many minutes."),
    max_steps_this_run: Optional[int] = typer.Option(None, "--max-steps-this-run", help="Stop cleanly after this many steps."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (GPU)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, log lines or summary."),
) -> None:
    """Pretrain an S4 chemical language model on a SMILES set (next-token objective).

    Unparsable and over-long SMILES are skipped and counted. The best model by validation loss
    is written to OUTPUT as a model directory for generate-molecules --model OUTPUT.
    """
    _train("pretrain-molecules", smiles, output, valid_file=valid_file, valid_fraction=valid_fraction, column=column,
           max_len=max_len, canonicalize=canonicalize, randomize=randomize, given_share=given_share, d_model=d_model, n_blocks=n_blocks, d_state=d_state,
           dropout=dropout, kernel=kernel, epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr,
           warmup_steps=warmup_steps, weight_decay=weight_decay, eval_every=eval_every, patience=patience, keep_checkpoints=keep_checkpoints, seed=seed, split_seed=split_seed,
           device=device, n_jobs=n_jobs, resume=resume, force=force, max_minutes=max_minutes,
           max_steps_this_run=max_steps_this_run, compile=compile, quiet=quiet)


@app.command("finetune-molecules")
def finetune_molecules(
    smiles: Optional[List[Path]] = typer.Argument(None, help="SMILES of the actives to learn from (.smi/.txt/.csv, .gz, .zip)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory; the fine-tuned model is written here."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Pretrained chemical LM: bundled name or directory."),
    valid_file: Optional[Path] = typer.Option(None, "--valid-file", help="Validation SMILES (default: hold out --valid-fraction)."),
    valid_fraction: Optional[float] = typer.Option(None, "--valid-fraction", help="Random share held out for validation. Default 0.1."),
    column: Optional[str] = typer.Option(None, "--column", help="CSV column holding the SMILES."),
    canonicalize: bool = typer.Option(False, "--canonicalize", help="Train on RDKit canonical SMILES."),
    randomize: Optional[int] = _RANDOMIZE,
    given_share: Optional[float] = _GIVEN_SHARE,
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout while fine-tuning (default: the model's)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum passes over the actives. Default 100."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Molecules per step. Default 32."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (AdamW). Default 1e-4."),
    ssm_lr: Optional[float] = typer.Option(None, "--ssm-lr", help="Cap on the learning rate of the S4 kernel parameters (A, B, C, dt), which large steps disturb. Default 1e-4."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant (default) or cosine (after the warm-up, down to --min-lr): cosine suits continuing on a large set."),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="End of the cosine decay. Default 1e-4."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps. Default 0."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices. Default 0.01."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps. Default: each epoch."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping: epochs without a better validation loss. Default 5."),
    keep_checkpoints: Optional[int] = _KEEP_CHECKPOINTS,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of split, random forms and batch order. Default 0."),
    split_seed: Optional[int] = _SPLIT_SEED,
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    n_jobs: int = typer.Option(1, "--n-jobs", help="Processes for the RDKit checks of big SMILES sets."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly (checkpoint saved) before this many minutes."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (GPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT."),
    force: bool = typer.Option(False, "--force", help="Delete the run in OUTPUT and start over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, log lines or summary."),
) -> None:
    """Fine-tune a pretrained chemical LM on a small set of actives, with early stopping on validation loss.

    SMILES with tokens outside the pretrained vocabulary are skipped and counted.
    """
    from seqssm.chem.model_dir import DEFAULT_MODEL

    _train("finetune-molecules", smiles, output, model=model or DEFAULT_MODEL, valid_file=valid_file,
           valid_fraction=valid_fraction, column=column, canonicalize=canonicalize, randomize=randomize, given_share=given_share, dropout=dropout,
           epochs=epochs,
           batch_size=batch_size, lr=lr, ssm_lr=ssm_lr, schedule=schedule, min_lr=min_lr, warmup_steps=warmup_steps,
           weight_decay=weight_decay, eval_every=eval_every, patience=patience, keep_checkpoints=keep_checkpoints, seed=seed, split_seed=split_seed, device=device,
           n_jobs=n_jobs, max_minutes=max_minutes, compile=compile, resume=resume, force=force, quiet=quiet)


@app.command("generate-molecules")
def generate_molecules(
    n: int = typer.Option(1000, "-n", "--n", help="Molecules to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help=".smi, .csv (SMILES, validity, canonical SMILES, log-likelihood) or .sdf (valid only)."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="Softmax temperature (<1: safer, >1: more diverse)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: smallest token set with this much probability (1: off)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, batch size and device give the same molecules."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Molecules in progress at once (slots refilled as molecules end). Default 8192 on GPU, 256 on CPU."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:N."),
    valid_only: bool = typer.Option(False, "--valid-only", help="Write only molecules RDKit accepts."),
    unique: bool = typer.Option(False, "--unique", help="Write each molecule (canonical SMILES) once."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="Also draw the first valid molecules into this PNG."),
    training_set: Optional[Path] = typer.Option(None, "--training-set", help="SMILES file to measure novelty against (default: the model's own, when known)."),
    fast: str = typer.Option("auto", "--fast", help="CUDA-graph sampler: auto (on GPU), on, off."),
    n_jobs: int = typer.Option(1, "--n-jobs", help="Processes for the RDKit checks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Sample SMILES from a chemical language model (recurrent mode), checked and canonicalised with RDKit."""
    from seqssm.pipelines.molecules import GenerateOptions, run_generate

    opts = GenerateOptions(n=n, model=model, output=output, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, batch_size=batch_size, device=device, valid_only=valid_only, unique=unique,
                           grid=grid, training_set=training_set, fast=fast, n_jobs=n_jobs, quiet=quiet)
    s = run_guarded(run_generate, opts, stderr)
    if output is None:
        for r in s.rows:
            typer.echo(r["canonical_smiles"] or r["smiles"])
    if quiet:
        return
    t = Table(title="seqssm generate-molecules", show_header=False, title_justify="left")
    t.add_row("model", s.model)
    t.add_row("written", f"{s.written:,}" + (f" to {s.output}" if s.output else " to stdout"))
    t.add_row("sampled", f"{s.sampled:,} ({s.ended:,} ended within the maximum length)")
    t.add_row("validity", f"{s.validity:.4f} ({s.valid:,} valid)")
    t.add_row("uniqueness", f"{s.uniqueness:.4f} ({s.unique_valid:,} unique valid)")
    if s.novelty is not None:
        t.add_row("novelty", f"{s.novelty:.4f} against {s.training_set}")
    else:
        t.add_row("novelty", "unknown (training set not available; see --training-set)")
    t.add_row("speed", f"{s.sampled / s.sampling_seconds:,.0f} molecules/s sampling ({s.sampler}, {s.device}); "
              f"{s.seconds:.1f} s in all")
    if grid:
        t.add_row("grid", str(grid))
    stderr.print(t)


@app.command("score-molecules")
def score_molecules(
    smiles: Path = typer.Argument(..., help="SMILES file (.smi/.txt/.csv, .gz, .zip)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_MODEL_HELP),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Table (.csv, or .tsv) of SMILES, log-likelihood, tokens, NLL per token. Default: stdout (TSV)."),
    column: Optional[str] = typer.Option(None, "--column", help="CSV column holding the SMILES."),
    batch_size: int = typer.Option(512, "--batch-size", "-b", help="Molecules per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
) -> None:
    """Log-likelihood (natural log, begin/end tokens included) of each SMILES under a chemical LM.

    SMILES the model cannot encode (unknown tokens, too long) get NA and the reason in `note`.
    """
    import math

    from seqssm.pipelines.molecules import run_score

    s = run_guarded(run_score, smiles, model=model, output=output, device=device, batch_size=batch_size, column=column)
    if output is None:
        typer.echo("smiles\tvalid\tlog_likelihood\tn_tokens\tnll_per_token\tnote")
        for r in s.rows:
            ok = math.isfinite(r["log_likelihood"])
            typer.echo(f"{r['smiles']}\t{int(r['valid'])}\t{r['log_likelihood']:.6f}\t{r['n_tokens']}\t"
                       f"{r['nll_per_token']:.6f}\t{r['note']}" if ok else
                       f"{r['smiles']}\t{int(r['valid'])}\tNA\t{r['n_tokens']}\tNA\t{r['note']}")
    stderr.print(f"scored {s.scored:,} SMILES, mean log-likelihood {s.mean_log_likelihood:.3f}"
                 + (f"; {s.failed:,} could not be scored (see note)" if s.failed else ""), highlight=False)


@app.command("evaluate-molecules")
def evaluate_molecules(
    generated: Path = typer.Argument(..., help="Generated SMILES (.smi/.txt/.csv; e.g. from generate-molecules)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the metrics as JSON."),
    train: Optional[str] = typer.Option("moses", "--train", help="Training set for novelty: 'moses' (MOSES train), a SMILES file, or '' to skip."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of logP, QED, MW and SA distributions, generated vs MOSES test."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N SMILES (MOSES protocol: 30,000)."),
    column: Optional[str] = typer.Option(None, "--column", help="CSV column holding the SMILES (a generate-molecules .csv: smiles)."),
    device: str = typer.Option("auto", "--device", help="Device for ChemNet (FCD) and similarity search."),
    n_jobs: int = typer.Option(1, "--n-jobs", help="Processes for RDKit work."),
) -> None:
    """MOSES distribution-learning metrics: validity, unique@1k/10k, novelty, FCD, SNN, Frag, Scaf,
    IntDiv1/2, Filters (against the MOSES test and scaffold-test sets)."""
    from seqssm.pipelines.molecules import run_evaluate

    rec = run_guarded(run_evaluate, generated, output=output, train=train or None, device=device, plot=plot,
                      n_jobs=n_jobs, column=column, limit=limit)
    t = Table(title=f"MOSES metrics of {generated} ({rec['n']:,} SMILES)", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rec["metrics"].items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    stderr.print(t)
