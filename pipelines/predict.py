"""`seqssm predict`: a fine-tuned model over regions (BED + genome), a sequence table or a FASTA.

Any backbone `seqssm finetune` trains (HyenaDNA, Caduceus / Mamba): load_finetuned rebuilds it
from the directory's config.json. Sequences are batched by length, right-padded (exact: each
output is that of the sequence alone, see seqssm.models.heads).

Writes one row per input with its name and coordinates, the model's outputs (class probabilities or
regression values) and the predicted label(s); TSV or Parquet by the output's extension. When the
input carries labels too, the metrics on it are returned (and printed by the CLI).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from seqssm.errors import SeqssmError
from seqssm.io.labeled import read_labeled
from seqssm.layers.mamba import configure_backend
from seqssm.models.heads import batch_examples, load_finetuned
from seqssm.pipelines.embed import resolve_device
from seqssm.pipelines.progress import BasesProgress
from seqssm.training.metrics import compute_metrics


@dataclass
class PredictOptions:
    model: str
    output: Path
    regions: Path | None = None
    genome: Path | None = None
    sequences: Path | None = None
    sequence_column: str | None = None
    label_columns: list | None = None  # to score against labels in the input; default: the model's
    rc_average: bool | None = None  # None: as the model was evaluated when fine-tuned
    batch_size: int = 64
    device: str = "auto"
    backend: str = "auto"  # Mamba / Caduceus kernels (seqssm.layers.mamba.configure_backend)
    force: bool = False
    quiet: bool = False


@dataclass
class PredictSummary:
    output: Path
    rows: int = 0
    seconds: float = 0.0
    task: str = ""
    label_names: list = field(default_factory=list)
    metrics: dict | None = None
    skipped: dict = field(default_factory=dict)


def output_columns(task: str, names: list[str], out: np.ndarray) -> dict[str, np.ndarray | list]:
    """Model outputs -> named columns plus the predicted label(s)."""
    cols: dict[str, np.ndarray | list] = {}
    if task == "binary":
        cols[f"prob_{names[1]}"] = out.astype(np.float32)
        cols["predicted"] = [names[int(p >= 0.5)] for p in out]
    elif task == "multiclass":
        for j, n in enumerate(names):
            cols[f"prob_{n}"] = out[:, j].astype(np.float32)
        cols["predicted"] = [names[j] for j in out.argmax(1)]
    elif task == "multilabel":
        for j, n in enumerate(names):
            cols[f"prob_{n}"] = out[:, j].astype(np.float32)
        cols["predicted"] = [",".join(n for n, p in zip(names, row) if p >= 0.5) for row in out]
    else:
        vals = out.reshape(len(out), -1)
        for j, n in enumerate(names):
            cols[f"pred_{n}"] = vals[:, j].astype(np.float32)
    return cols


def _target_columns(task: str, names: list[str], y: np.ndarray) -> dict:
    if task in ("binary", "multiclass"):
        return {"label": [names[int(v)] for v in y[:, 0]]}
    return {f"label_{n}": y[:, j].astype(np.float32) for j, n in enumerate(names)}


def _tsv_options(names: list[str], quoting: str):
    """Arrow quotes every header name unless told otherwise (quoting_header, pyarrow >= 22)."""
    kw = {"delimiter": "\t", "quoting_style": quoting}
    if quoting == "none" and not any(c in name for name in names for c in '\t\n\r"'):
        kw["quoting_header"] = "none"
    try:
        return pacsv.WriteOptions(**kw)
    except TypeError:  # an older pyarrow: quoted header names, which TSV readers accept
        kw.pop("quoting_header", None)
        return pacsv.WriteOptions(**kw)


def run_predict(opts: PredictOptions) -> PredictSummary:
    if (opts.regions is None) == (opts.sequences is None):
        raise SeqssmError("give the inputs as --regions BED --genome FASTA, or as --sequences TABLE_OR_FASTA")
    if opts.regions is not None and opts.genome is None:
        raise SeqssmError("--regions needs --genome (the FASTA the BED coordinates refer to)")
    if opts.batch_size < 1:
        raise SeqssmError("--batch-size must be at least 1")
    output = Path(opts.output)
    if output.suffix.lower() not in (".tsv", ".txt", ".parquet", ".pq"):
        raise SeqssmError(f"{output}: the output must end in .tsv or .parquet")
    if output.exists() and not opts.force:
        raise SeqssmError(f"{output} exists; use --force to overwrite it")
    device = resolve_device(opts.device)
    model, _tokenizer, head, prep, _info = load_finetuned(opts.model, device=device)
    configure_backend(model, opts.backend, device, training=False)
    rc_average = bool(prep.get("rc_average", False)) if opts.rc_average is None else opts.rc_average

    src = opts.regions if opts.regions is not None else opts.sequences
    data = read_labeled(
        src,
        genome=opts.genome,
        length=prep.get("length"),
        label_columns=opts.label_columns or prep.get("label_columns"),
        sequence_column=opts.sequence_column or prep.get("sequence_column"),
        task=head.task,
        label_names=head.label_names,
        require_labels=False,
    )
    if not data.examples:
        raise SeqssmError(f"{src}: no sequences to predict")
    max_len = model.max_length  # None: no limit (Caduceus)
    too_long = [e for e in data.examples if max_len is not None and len(e.ids) > max_len]
    if too_long:
        e = too_long[0]
        raise SeqssmError(
            f"{src}, line {e.line}: {e.name} is {len(e.ids)} bp, longer than the model's maximum "
            f"{max_len} bp (fine-tune with --length, or cut the regions)"
        )

    if head.pooling == "flatten":
        wrong = [e for e in data.examples if len(e.ids) != head.length]
        if wrong:
            e = wrong[0]
            raise SeqssmError(f"{src}, line {e.line}: {e.name} is {len(e.ids)} bp; the model's flatten-pooled head "
                              f"takes sequences of exactly {head.length} bp")

    t0 = time.perf_counter()
    order = np.argsort([len(e.ids) for e in data.examples], kind="stable")  # similar lengths batch together
    outputs: list[np.ndarray | None] = [None] * len(data.examples)
    progress = BasesProgress(len(data.examples), description=f"predict {Path(src).name}", unit="seq",
                             quiet=opts.quiet)
    autocast = device.type == "cuda"
    with progress, torch.inference_mode():
        for k in range(0, len(order), opts.batch_size):
            idx = order[k : k + opts.batch_size]
            ids, lengths = batch_examples([data.examples[i].ids for i in idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model.predict_proba(ids.to(device), lengths.to(device), rc_average=rc_average)
            out = out.float().cpu().numpy()
            for j, i in enumerate(idx):
                outputs[i] = out[j]
            progress.advance(len(idx))
    out = np.stack(outputs)

    ex = data.examples
    table = {
        "name": [e.name for e in ex],
        "chrom": [e.chrom for e in ex],
        "start": pa.array([e.start for e in ex], pa.int64()),
        "end": pa.array([e.end for e in ex], pa.int64()),
        "strand": [e.strand for e in ex],
    }
    has_labels = all(e.target.size for e in ex)
    if has_labels:
        y = np.stack([e.target for e in ex])
        table.update(_target_columns(head.task, head.label_names, y))
    table.update(output_columns(head.task, head.label_names, out))
    tbl = pa.table(table)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    if output.suffix.lower() in (".parquet", ".pq"):
        pq.write_table(tbl, tmp)
    else:
        try:  # plain TSV, header included; quotes only if a value really needs them
            pacsv.write_csv(tbl, tmp, _tsv_options(tbl.column_names, "none"))
        except pa.ArrowInvalid:
            pacsv.write_csv(tbl, tmp, _tsv_options(tbl.column_names, "needed"))
    os.replace(tmp, output)

    summary = PredictSummary(output=output, rows=len(ex), seconds=time.perf_counter() - t0, task=head.task,
                             label_names=list(head.label_names), skipped=dict(data.skipped))
    if has_labels:
        y_true = y[:, 0].astype(np.int64) if head.task in ("binary", "multiclass") else y
        if head.task == "regression" and y_true.shape[1] == 1:
            y_true = y_true[:, 0]
        summary.metrics = compute_metrics(head.task, y_true, out, head.label_names)
    return summary
