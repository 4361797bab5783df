"""`seqssm models list|info`: what is bundled and what each model is."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from seqssm.cli.main import app, run_guarded

models_app = typer.Typer(help="Bundled models: list them, show one.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


def _describe(loaded) -> dict:
    from seqssm.models import count_parameters

    info = loaded.info or {}
    data = info.get("training_data") or {}
    if isinstance(data, dict):
        data = data.get("description") or ", ".join(f"{k}: {v}" for k, v in data.items())
    heldout = info.get("heldout") or {}
    cfg = loaded.config
    return {
        "name": loaded.name,
        "architecture": f"HyenaDNA (d_model {cfg.d_model}, {cfg.n_layer} layers, order {cfg.hyena_order})",
        "parameters": count_parameters(loaded.model),
        "max length": cfg.max_seq_len,
        "training data": str(data or "-"),
        "held-out": (info.get("training_data") or {}).get("held_out", "-") if isinstance(info.get("training_data"), dict) else "-",
        "held-out perplexity": f"{heldout['perplexity']:.4f}" if "perplexity" in heldout else "-",
        "source": str(info.get("source", "-")),
    }


@models_app.command("list")
def list_models() -> None:
    """Every bundled model with its architecture, size and held-out perplexity."""
    from seqssm.models import bundled_models, load_model

    t = Table(title="bundled models")
    for col in ("name", "architecture", "parameters", "max length", "held-out perplexity"):
        t.add_column(col, justify="right" if col in ("parameters", "max length", "held-out perplexity") else "left")
    for name in bundled_models():
        d = _describe(run_guarded(load_model, name))
        t.add_row(d["name"], d["architecture"], f"{d['parameters']:,}", str(d["max length"]), d["held-out perplexity"])
    console.print(t)


@models_app.command("info")
def info(name: str = typer.Argument(..., help="Bundled name, or a model directory.")) -> None:
    """Everything known about one model: architecture, parameters, training data, held-out metrics."""
    from seqssm.models import load_model

    loaded = run_guarded(load_model, name)
    d = _describe(loaded)
    t = Table(title=f"model {d['name']}", show_header=False, title_justify="left")
    for k, v in d.items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    extra = loaded.info or {}
    heldout = extra.get("heldout") or {}
    markov = extra.get("markov_baseline") or {}
    if "shared_perplexity" in heldout:
        t.add_row("held-out perplexity, Markov positions", f"{heldout['shared_perplexity']:.4f} ({heldout.get('shared_targets', 0):,} bases)")
    if markov:
        by_k = ", ".join(f"{k}: {v:.3f}" for k, v in markov.get("perplexity_by_k", {}).items())
        t.add_row("Markov baseline (k-mer)", f"best k={markov.get('best_k')}: {markov.get('best_perplexity', float('nan')):.4f}\nby k: {by_k}")
    training = extra.get("training") or {}
    if training:
        t.add_row("training", f"{training.get('steps', '?'):,} steps, {training.get('tokens_seen', 0):,} tokens, "
                  f"{training.get('precision', '')} on {training.get('device', '?')}")
    if "date" in extra:
        t.add_row("date", str(extra["date"]))
    console.print(t)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "\n".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
