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
    data = info.get("training_data") or info.get("data") or {}
    if isinstance(data, dict):
        data = ", ".join(f"{k}: {v}" for k, v in data.items()) or "-"
    heldout = info.get("heldout") or {}
    ppl = heldout.get("perplexity") if isinstance(heldout, dict) else None
    if ppl is None:
        ppl = info.get("heldout_perplexity")
    cfg = loaded.config
    return {
        "name": loaded.name,
        "architecture": f"HyenaDNA (d_model {cfg.d_model}, {cfg.n_layer} layers, order {cfg.hyena_order})",
        "parameters": count_parameters(loaded.model),
        "max length": cfg.max_seq_len,
        "training data": str(data) if data else "-",
        "held-out perplexity": f"{ppl:.4f}" if isinstance(ppl, (int, float)) else "-",
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
    for key in ("heldout", "markov_baseline", "training", "date", "command"):
        if key in extra:
            t.add_row(key, _fmt(extra[key]))
    console.print(t)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "\n".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
