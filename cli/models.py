"""`seqssm models list|info`: what is bundled and what each model is."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from seqssm.cli.main import app, run_guarded

models_app = typer.Typer(help="Bundled models: list them, show one.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


def _heldout_summary(info: dict) -> str:
    """The held-out score of models list: next-base perplexity, or masked accuracy + perplexity (MLM)."""
    heldout = info.get("heldout") or {}
    if "masked_accuracy" in heldout:
        return f"masked acc {heldout['masked_accuracy']:.4f}, ppl {heldout['perplexity']:.4f}"
    return f"{heldout['perplexity']:.4f}" if "perplexity" in heldout else "-"


def _describe(loaded) -> dict:
    from seqssm.models import count_parameters

    info = loaded.info or {}
    data = info.get("training_data") or {}
    if isinstance(data, dict):
        data = data.get("description") or ", ".join(f"{k}: {v}" for k, v in data.items())
    d = {
        "name": loaded.name,
        "architecture": loaded.architecture,
        "parameters": count_parameters(loaded.model),
        "max length": loaded.max_length,
        "training data": str(data or "-"),
        "held-out": (info.get("training_data") or {}).get("held_out", "-") if isinstance(info.get("training_data"), dict) else "-",
        "held-out perplexity": _heldout_summary(info),
        "source": str(info.get("source", "-")),
    }
    if loaded.model_type == "caduceus":
        heldout = info.get("heldout") or {}
        if "masked_accuracy" in heldout:
            source = d.pop("source")
            d["held-out perplexity"] = f"{heldout['perplexity']:.4f} (masked positions)"
            d["held-out masked accuracy"] = f"{heldout['masked_accuracy']:.4f} ({heldout.get('targets', 0):,} masked A/C/G/T)"
            d["source"] = source
        d["max length"] = f"{loaded.max_length:,} (training window; no positional limit)"
        d["strands"] = ("RC-equivariant: embeddings of both strands agree by construction" if loaded.strand_invariant
                        else "not RC-equivariant (--rc-average conjoins both strands)")
        d["embed --stream"] = ("yes: causal, carries its state across windows" if loaded.can_stream else
                               "no: bidirectional; use overlapping windows (--stride < --window)")
        if loaded.n_as_pad:
            d["N bases"] = "fed as [PAD], as in the published models' pretraining"
        if not info.get("training") and info.get("format") == "hf":
            d["training record"] = "none: a HuggingFace-format directory (no training.json)"
    return d


def _describe_chem(name: str) -> dict:
    from seqssm.chem.model_dir import load_chem_model

    m = run_guarded(load_chem_model, name)
    cfg = m.model.cfg
    val = m.info.get("validation") or {}
    quality = m.info.get("sample_quality") or {}
    return {
        "name": m.name,
        "architecture": f"S4 chemical LM (d_model {cfg.d_model}, {cfg.n_blocks} x [S4, S4, FF], "
                        f"{cfg.kernel} kernel, state {cfg.d_state})",
        "parameters": sum(p.numel() for p in m.model.parameters()),
        "max length": cfg.max_len,
        "vocabulary": f"{len(m.tokenizer)} SMILES tokens",
        "training data": str((m.info.get("training_data") or {}).get("description", "-")),
        "held-out perplexity": f"{val['val_ppl']:.4f}" if "val_ppl" in val else "-",
        "held-out loss": f"{val['val_loss']:.4f} nats/token" if "val_loss" in val else "-",
        "sample quality": ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items())
        or "-",
        "source": str(m.info.get("source", "-")),
    }


def _metrics_line(m: dict | None) -> str:
    from seqssm.training.metrics import CLASSIFICATION_KEYS, REGRESSION_KEYS

    if not m:
        return "-"
    keys = CLASSIFICATION_KEYS + REGRESSION_KEYS
    shown = ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))
    return f"{shown} (n = {m['n']:,})" if "n" in m else shown


def _finetuned_rows(info: dict) -> dict:
    """What a fine-tuned directory's training.json says: task, labels, base model, split, metrics."""
    tr = info.get("training") or {}
    sizes = info.get("sizes") or {}
    return {
        "task": str(info.get("task", "-")),
        "labels": ", ".join(map(str, info.get("label_names") or [])) or "-",
        "base model": (f"{info.get('base_model')} architecture, trained from scratch" if info.get("from_scratch")
                       else str(info.get("base_model", "-"))),
        "split": str(info.get("split") or ", ".join(f"{k} {v:,}" for k, v in sizes.items()) or "-"),
        "best epoch": f"{info.get('best_epoch', '-')} (by validation {info.get('selection_metric', '-')})",
        "validation": _metrics_line(info.get("valid")),
        "test": _metrics_line(info.get("test")),
        "training": (f"{tr.get('epochs', '?')} epochs, {tr.get('steps', '?'):,} steps, {tr.get('precision', '')} on "
                     f"{tr.get('device', '?')}; {tr.get('trainable_parameters', 0):,} parameters trained"),
    }


def _is_chem(name: str) -> bool:
    from seqssm.chem.model_dir import bundled_chem_models, is_chem_model_dir

    return name in bundled_chem_models() or is_chem_model_dir(Path(name).expanduser())


@models_app.command("list")
def list_models() -> None:
    """Every bundled model with its architecture, size and held-out perplexity."""
    from seqssm.models import bundled_models, load_model

    t = Table(title="bundled models")
    for col in ("name", "architecture", "parameters", "max length", "held-out"):
        # The name is what users type: never truncate or wrap it; the architecture wraps instead.
        t.add_column(col, justify="right" if col in ("parameters", "max length", "held-out") else "left",
                     no_wrap=col == "name", min_width=len("caduceus-ps-chr20") if col == "name" else None)
    for name in bundled_models():
        if _is_chem(name):
            d = _describe_chem(name)
            t.add_row(d["name"], d["architecture"], f"{d['parameters']:,}", str(d["max length"]),
                      f"ppl {d['held-out perplexity']}" if d["held-out perplexity"] != "-" else "-")
            continue
        loaded = run_guarded(load_model, name)
        d = _describe(loaded)
        held = _heldout_summary(loaded.info or {})
        t.add_row(d["name"], d["architecture"], f"{d['parameters']:,}", f"{loaded.max_length:,}",
                  held if held == "-" or held.startswith("masked") else f"ppl {held}")
    console.print(t)


@models_app.command("info")
def info(name: str = typer.Argument(..., help="Bundled name, or a model directory.")) -> None:
    """Everything known about one model: architecture, parameters, training data, held-out metrics."""
    from seqssm.models import load_model

    if _is_chem(name):
        d = _describe_chem(name)
        t = Table(title=f"model {d['name']}", show_header=False, title_justify="left")
        for k, v in d.items():
            t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
        console.print(t)
        return
    loaded = run_guarded(load_model, name)
    d = _describe(loaded)
    extra = loaded.info or {}
    finetuned = "label_names" in extra and "task" in extra
    if finetuned:  # the backbone's pretraining record does not apply; the fine-tuning one does
        for k in ("training data", "held-out", "held-out perplexity"):
            d.pop(k, None)
        d.update(_finetuned_rows(extra))
    t = Table(title=f"model {d['name']}", show_header=False, title_justify="left")
    for k, v in d.items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    if finetuned:
        if "date" in extra:
            t.add_row("date", str(extra["date"]))
        console.print(t)
        return
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
    baseline = extra.get("no_context_baseline") or {}
    if "masked_accuracy" in baseline:
        t.add_row("no-context reference", f"masked accuracy {baseline['masked_accuracy']:.4f}, perplexity "
                  f"{baseline['perplexity']:.4f} (the token at the position alone)")
    if heldout.get("definition"):
        t.add_row("held-out definition", str(heldout["definition"]))
    if "date" in extra:
        t.add_row("date", str(extra["date"]))
    console.print(t)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "\n".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
