"""Fine-tuning acceptance: bundled pretrained backbone vs the same architecture from scratch vs a k-mer
logistic-regression baseline, on one fixed split, in one run.

    python benchmarks/finetune_acceptance.py NAME OUTDIR [--backbone MODEL] -- FINETUNE-OPTIONS...

FINETUNE-OPTIONS are `seqssm finetune` options that define the data and split (and training knobs),
e.g. for the E. coli promoters:

    python benchmarks/finetune_acceptance.py promoters out/promoters -- \\
        --sequences ../shared/data/ecoli_promoters_81bp.csv --sequence-column seqs --label-column labels \\
        --split random --split-fractions 0.8,0.1,0.1 --split-seed 0 --epochs 10

The pretrained and scratch runs are `seqssm finetune` with `--model BACKBONE` (default
hyenadna-small-chr20) and with
`--from-scratch` added; the k-mer model gets the identical split (the pipeline's own loader) and
chooses its L2 penalty on the validation split. Writes OUTDIR/acceptance.json, OUTDIR/roc.png and
prints a Markdown table of the test metrics.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.pipelines import finetune as ft
from seqssm.training.kmer import KmerLogistic
from seqssm.training.metrics import compute_metrics, roc_curve
from seqssm.training.plots import plot_roc

KEYS = ("accuracy", "mcc", "macro_f1", "auroc", "auprc")


def _targets(data) -> np.ndarray:
    y = np.stack([e.target for e in data.examples])
    return y[:, 0].astype(np.int64) if data.task in ("binary", "multiclass") else y


def _finetune(args: list[str], out: Path) -> dict:
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["finetune", "-o", str(out), "--force", *args])
    if res.exit_code != 0:
        why = res.output or "".join(traceback.format_exception(res.exception))
        raise SystemExit(f"seqssm finetune {' '.join(args)} failed:\n{why}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics, "seconds": time.perf_counter() - t0}


def main() -> None:
    if "--" not in sys.argv or len(sys.argv) < 4:
        raise SystemExit(__doc__)
    k = sys.argv.index("--")
    name, outdir = sys.argv[1], Path(sys.argv[2])
    head = sys.argv[3:k]
    backbone = head[head.index("--backbone") + 1] if "--backbone" in head else "hyenadna-small-chr20"
    ft_args = sys.argv[k + 1 :]
    outdir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict] = {}
    curves = {}
    runs = {"pretrained": ["--model", backbone], "scratch": ["--model", backbone, "--from-scratch"]}
    for label, extra in runs.items():
        r = _finetune([*ft_args, *extra], outdir / label)
        test = r["metrics"]["test"]
        results[label] = {k2: test.get(k2) for k2 in KEYS} | {"seconds": round(r["seconds"], 1),
                                                             "best_epoch": r["metrics"].get("best_epoch")}
        print(f"{label}: {results[label]}", flush=True)

    t0 = time.perf_counter()
    split = load_split(ft_args)
    m, curve, l2 = kmer_baseline(split)
    results["k-mer logistic"] = {k2: m.get(k2) for k2 in KEYS} | {"seconds": round(time.perf_counter() - t0, 1),
                                                                 "l2": l2}
    if curve is not None:
        curves["k-mer logistic"] = curve
        for label in runs:
            pred = _read_predictions(outdir / label / "test_predictions.tsv", split.test.label_names)
            fpr, tpr, _ = roc_curve(*pred)
            curves[label] = (fpr, tpr, results[label]["auroc"])
        plot_roc(curves, outdir / "roc.png", title=f"{name}: test split")

    summary = {"task": name, "backbone": backbone, "finetune_args": ft_args, "split": split.description,
               "sizes": {"train": len(split.train.examples), "valid": len(split.valid.examples),
                         "test": len(split.test.examples)},
               "results": results}
    (outdir / "acceptance.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{name}: {split.description}")
    print("| model | accuracy | MCC | AUROC | AUPRC | time (s) |\n|---|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        f = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        print(f"| {label} | {f(r['accuracy'])} | {f(r['mcc'])} | {f(r['auroc'])} | {f(r['auprc'])} | {r['seconds']} |")


def load_split(ft_args: list[str]):
    """The train/valid/test split the pipeline's own loader makes from these `seqssm finetune` options."""
    split, *_ = ft._load_data(asdict(_options_from_cli(ft_args)))
    return split


def kmer_baseline(split):
    """(test metrics, ROC curve or None, chosen l2) of the k-mer logistic regression on ``split``."""
    km = KmerLogistic(split.train.task).fit(
        [e.ids for e in split.train.examples], _targets(split.train),
        [e.ids for e in split.valid.examples], _targets(split.valid),
    )
    p = km.predict([e.ids for e in split.test.examples])
    y = _targets(split.test)
    m = compute_metrics(split.test.task, y, p, split.test.label_names)
    curve = None
    if split.test.task == "binary":
        fpr, tpr, _ = roc_curve(y, p)
        curve = (fpr, tpr, m["auroc"])
    return m, curve, km.l2_


def _options_from_cli(args: list[str]) -> "ft.FinetuneOptions":
    """Parse the data/split options exactly as `seqssm finetune` does, without running it."""
    import typer

    from seqssm.cli import finetune as cli_ft

    captured = {}

    def fake_run(fn, opts, *_):
        captured["opts"] = opts
        raise typer.Exit(0)

    orig = cli_ft.run_guarded
    cli_ft.run_guarded = fake_run
    try:
        CliRunner().invoke(app, ["finetune", "-o", "/nonexistent", *args])
    finally:
        cli_ft.run_guarded = orig
    return captured["opts"]


def _read_predictions(path: Path, label_names: list[str]):
    """(y, P(class label_names[1])) from a binary run's test_predictions.tsv."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str)
    y = np.array([label_names.index(t) for t in df["target"]])
    return y, df[f"prob_{label_names[1]}"].to_numpy(dtype=float)


if __name__ == "__main__":
    main()
