"""`seqssm embed`: FASTA (whole genome or BED regions) -> windows -> model -> embeddings on disk.

Output, pooled (`pool="mean"`): one Parquet file, a row per window with chrom, start, end (0-based,
half-open), strand, n_frac and `embedding` (fixed-size list of float32).
Output, per token (`pool="none"`): a directory with `embeddings.npy` (float16 [total_tokens, dim],
load with `np.load(..., mmap_mode="r")`), `index.parquet` (the window columns plus `offset` and
`length`: the window's rows in embeddings.npy) and `meta.json`.

Work goes in chunks of whole batches, committed to `<output>.partial/` one at a time; `resume=True`
continues after the last committed chunk (see pipelines/output.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from seqssm import __version__
from seqssm.errors import SeqssmError
from seqssm.io import FastaFile, count_windows
from seqssm.io.bed import check_regions, read_bed
from seqssm.models import load_model
from seqssm.tokenizers.dna import N, reverse_complement
from seqssm.pipelines import output as out
from seqssm.pipelines.progress import BasesProgress

DEFAULT_MODEL = "hyenadna-small-chr20"


@dataclass
class EmbedOptions:
    fasta: Path
    output: Path | None = None
    model: str = DEFAULT_MODEL
    window: int | None = None  # default: the model's max length
    stride: int | None = None  # default: the window (no overlap)
    batch_size: int = 8
    device: str = "auto"
    pool: str = "mean"  # mean | none
    rc_average: bool = False
    regions: Path | None = None
    max_n_frac: float = 0.5
    resume: bool = False
    force: bool = False
    quiet: bool = False


@dataclass
class EmbedSummary:
    output: Path
    windows: int = 0
    skipped_n: int = 0
    bases: int = 0
    seconds: float = 0.0
    device: str = ""
    model: str = ""
    dim: int = 0
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def bases_per_s(self) -> float:
        return self.bases / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class Item:
    """One window to embed. For '-' strand regions `ids` is already reverse-complemented."""

    chrom: str
    start: int
    end: int
    strand: str
    ids: np.ndarray

    @property
    def n_frac(self) -> float:
        return float(np.count_nonzero(self.ids == N)) / max(len(self.ids), 1)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SeqssmError(f"--device {device}: no CUDA GPU is available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SeqssmError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from None


def default_output(opts: EmbedOptions) -> Path:
    name = opts.fasta.name
    for suffix in (".gz", ".bgz", ".fa", ".fasta", ".fna", ".fas"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path(name + (".embeddings.parquet" if opts.pool == "mean" else ".tokens"))


def plan_items(fasta: FastaFile, opts: EmbedOptions, window: int, stride: int) -> tuple[Iterator[Item], int, int]:
    """The deterministic stream of windows, with the number of windows and bases it will cover."""
    if opts.regions is None:
        lengths = fasta.lengths()
        n_items = sum(count_windows(L, window, stride) for L in lengths.values())

        def gen():
            for w in fasta.windows(window, stride):
                yield Item(w.chrom, w.start, w.end, "+", w.ids)

        return gen(), n_items, sum(lengths.values())

    regions = read_bed(opts.regions)
    if not regions:
        raise SeqssmError(f"{opts.regions}: no regions in the BED file")
    check_regions(regions, fasta.lengths(), opts.regions)
    n_items = sum(count_windows(r.end - r.start, window, stride) for r in regions)

    def gen_regions():
        for r in regions:
            ids = fasta.fetch(r.chrom, r.start, r.end)
            L = r.end - r.start
            for k in range(count_windows(L, window, stride)):
                s = k * stride
                e = min(s + window, L)
                piece = ids[s:e]
                strand = r.strand if r.strand in "+-" else "+"
                if strand == "-":
                    piece = reverse_complement(piece)
                yield Item(r.chrom, r.start + s, r.start + e, strand, piece)

    return gen_regions(), n_items, sum(r.end - r.start for r in regions)


class Embedder:
    """Runs the backbone on batches of equal-length windows; optional reverse-complement averaging."""

    def __init__(self, model, device: torch.device, rc_average: bool):
        self.backbone = model.backbone.to(device).eval()
        self.device = device
        self.rc_average = rc_average
        # bf16 on GPU: the long convolution itself stays in float32 inside the model.
        self.autocast = device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray) -> torch.Tensor:
        """ids uint8 [B, L] -> float32 hidden states [B, L, D] on the device, forward-aligned."""
        x = torch.from_numpy(ids.astype(np.int64)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            h = self.backbone(x).float()
            if self.rc_average:
                h_rc = self.backbone(reverse_complement(x)).float()
                # Position i of the reverse complement is position L-1-i of the forward strand.
                h = 0.5 * (h + h_rc.flip(1))
        return h


def _batches(items: list[Item], batch_size: int) -> Iterator[list[int]]:
    """Indices of `items` grouped into batches of equal length (models see no padding)."""
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(len(it.ids), []).append(i)
    for idx in by_len.values():
        for k in range(0, len(idx), batch_size):
            yield idx[k : k + batch_size]


def run_embed(opts: EmbedOptions) -> EmbedSummary:
    if opts.pool not in ("mean", "none"):
        raise SeqssmError(f"--pool {opts.pool!r}: choose mean or none")
    if not 0.0 <= opts.max_n_frac <= 1.0:
        raise SeqssmError(f"--max-n-frac {opts.max_n_frac}: must be between 0 and 1")
    if opts.batch_size < 1:
        raise SeqssmError("--batch-size must be at least 1")
    device = resolve_device(opts.device)
    fasta = FastaFile(opts.fasta)
    loaded = load_model(opts.model, device="cpu")
    max_len = int(loaded.config.max_seq_len)
    window = opts.window or max_len
    stride = opts.stride or window
    if window < 1 or stride < 1:
        raise SeqssmError("--window and --stride must be positive")
    if window > max_len:
        raise SeqssmError(f"--window {window} is longer than model {loaded.name}'s maximum length {max_len}")
    if stride > window:
        raise SeqssmError(f"--stride {stride} is larger than --window {window}: bases between windows would be skipped")

    output = Path(opts.output) if opts.output else default_output(opts)
    items, n_items, total_bases = plan_items(fasta, opts, window, stride)
    dim = int(loaded.config.d_model)
    params = {
        "fasta": str(Path(opts.fasta).resolve()),
        "fasta_size": Path(opts.fasta).stat().st_size,
        "regions": str(Path(opts.regions).resolve()) if opts.regions else None,
        "model": str(loaded.info.get("source", opts.model)),
        "window": window,
        "stride": stride,
        "pool": opts.pool,
        "rc_average": opts.rc_average,
        "max_n_frac": opts.max_n_frac,
    }
    part, state = out.prepare(output, params, resume=opts.resume, force=opts.force)
    summary = EmbedSummary(output=output, device=str(device), model=loaded.name, dim=dim)
    summary.resumed_from = state["items_done"]

    embedder = Embedder(loaded.model, device, opts.rc_average)
    meta = {
        "seqssm_version": __version__,
        "model": loaded.name,
        "model_source": str(loaded.info.get("source", opts.model)),
        "window": window,
        "stride": stride,
        "pool": opts.pool,
        "rc_average": opts.rc_average,
        "coordinates": "0-based, half-open",
        "dim": dim,
    }
    coord_fields = [
        pa.field("chrom", pa.string()),
        pa.field("start", pa.int64()),
        pa.field("end", pa.int64()),
        pa.field("strand", pa.string()),
        pa.field("n_frac", pa.float32()),
    ]
    if opts.pool == "mean":
        schema = pa.schema(coord_fields + [pa.field("embedding", pa.list_(pa.float32(), dim))],
                           metadata={"seqssm": json.dumps(meta)})
        tokens = None
    else:
        schema = pa.schema(coord_fields + [pa.field("offset", pa.int64()), pa.field("length", pa.int32())],
                           metadata={"seqssm": json.dumps(meta)})
        tokens = out.TokenArrayWriter(part, dim, state["tokens"])

    chunk_items = max(opts.batch_size * 4, 64)
    progress = BasesProgress(total_bases, description=f"embed {Path(opts.fasta).name}", quiet=opts.quiet)
    t0 = time.perf_counter()
    bases_done = 0
    try:
        with progress:
            # Skip what a previous run committed: the window stream is deterministic.
            for _ in range(state["items_done"]):
                it = next(items)
                progress.advance(it.end - it.start, resumed=True)
            while True:
                chunk = [it for _, it in zip(range(chunk_items), items)]
                if not chunk:
                    break
                keep = [it for it in chunk if it.n_frac <= opts.max_n_frac]
                rows = _embed_chunk(keep, embedder, opts, tokens, dim)
                table = pa.Table.from_pydict(
                    {
                        "chrom": [it.chrom for it in keep],
                        "start": [it.start for it in keep],
                        "end": [it.end for it in keep],
                        "strand": [("." if opts.rc_average and it.strand == "+" else it.strand) for it in keep],
                        "n_frac": [it.n_frac for it in keep],
                        **rows,
                    },
                    schema=schema,
                )
                if tokens is not None:
                    tokens.sync()
                state["parts"].append(out.write_part(part, table, state))
                state["items_done"] += len(chunk)
                state["rows"] += len(keep)
                state["skipped"] += len(chunk) - len(keep)
                state["tokens"] = tokens.rows if tokens is not None else 0
                out.commit(part, state)
                n = sum(it.end - it.start for it in chunk)
                bases_done += n
                progress.advance(n)
        if state["items_done"] != n_items:
            raise RuntimeError(f"embedded {state['items_done']} windows, planned {n_items}")
        if opts.pool == "mean":
            out.finish_parquet(part, output, schema, state)
        else:
            _finish_tokens(part, output, schema, state, tokens, meta, opts.force)
    finally:
        if tokens is not None:
            tokens.close()
    summary.seconds = time.perf_counter() - t0
    summary.bases = bases_done
    summary.windows = state["rows"]
    summary.skipped_n = state["skipped"]
    return summary


def _embed_chunk(keep: list[Item], embedder: Embedder, opts: EmbedOptions, tokens, dim: int) -> dict:
    if opts.pool == "mean":
        emb = np.zeros((len(keep), dim), np.float32)
    else:
        offsets = np.zeros(len(keep), np.int64)
        lengths = np.array([len(it.ids) for it in keep], np.int32)
        per_item: list[np.ndarray | None] = [None] * len(keep)
    for idx in _batches(keep, opts.batch_size):
        h = embedder(np.stack([keep[i].ids for i in idx]))
        if opts.pool == "mean":
            emb[idx] = h.mean(dim=1).cpu().numpy()
        else:
            h16 = h.to(torch.float16).cpu().numpy()
            for j, i in enumerate(idx):
                per_item[i] = h16[j]
    if opts.pool == "mean":
        return {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)}
    # Write in input order so offsets increase along the index.
    for i, arr in enumerate(per_item):
        offsets[i] = tokens.append(arr)
    return {"offset": offsets, "length": lengths}


def _finish_tokens(part: Path, output: Path, schema, state: dict, tokens, meta: dict, force: bool) -> None:
    import os
    import shutil

    import pyarrow.parquet as pq

    tokens.finish()
    with pq.ParquetWriter(part / "index.parquet", schema) as w:
        for name in state["parts"]:
            w.write_table(pq.read_table(part / name, schema=schema))
    for name in state["parts"]:
        (part / name).unlink()
    out.atomic_write_text(part / "meta.json", json.dumps({**meta, "rows": tokens.rows}, indent=1))
    (part / out.STATE).unlink()
    if output.exists() and force:
        trash = output.with_name(f".{output.name}.old")
        if trash.exists():
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        os.replace(output, trash)
        os.replace(part, output)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    else:
        os.replace(part, output)


def summary_dict(s: EmbedSummary) -> dict:
    d = asdict(s)
    d["output"] = str(s.output)
    d["bases_per_s"] = s.bases_per_s if math.isfinite(s.bases_per_s) else None
    return d
