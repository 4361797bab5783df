"""`seqssm embed`: FASTA (whole genome or BED regions) -> windows -> model -> embeddings on disk.

Output, pooled (`pool="mean"`): one Parquet file, a row per window with chrom, start, end (0-based,
half-open), strand, n_frac and `embedding` (fixed-size list of float32).
Output, per token (`pool="none"`): a directory with `embeddings.npy` (float16 [total_tokens, dim],
load with `np.load(..., mmap_mode="r")`), `index.parquet` (the window columns plus `offset` and
`length`: the window's rows in embeddings.npy) and `meta.json`.

Models: anything `load_model` reads (HyenaDNA, Caduceus-PS/-Ph, causal Mamba; bundled, seqssm or
HuggingFace directories), through `LoadedModel.embed` (bf16 autocast on GPU). Each window is
embedded on its own, so positions near a window's edges see less context: a causal model (HyenaDNA,
Mamba) lacks the bases left of the window, a bidirectional one (Caduceus) those on both sides.
Overlapping windows (`stride < window`) give every position a window where it sits far from the
edges; the output keeps every window as it is (pooled: one row per window, the mean over all its
positions; per token: each window's rows, so a position covered by k windows appears k times).

`stream=True` (causal Mamba models only, `LoadedModel.can_stream`): consecutive windows of each
record (stride = window) are embedded one after the other with the model's recurrent state carried
across them (`LoadedModel.embed_stream`), so every window's embeddings are those of one pass over
the whole record prefix: exact full left context in constant memory. Batch size 1 (one record at
a time); the N filter only decides which windows are written (every window advances the state).
The state after the last committed chunk is saved with it (`stream-NNNNNN.safetensors`: per layer
the conv and SSM states), so `resume=True` continues exactly. One process only (refused under
torchrun), whole records only (no `regions`), no `rc_average`.

Work goes in chunks of whole batches, committed to `<output>.partial/` one at a time; `resume=True`
continues after the last committed chunk (see pipelines/output.py).

Under torchrun the chunks are dealt round-robin to the ranks (chunk c to rank c mod W, in genome
order); each rank commits its own shard (`<output>.part-R-of-W`, resumable on its own) and rank 0
merges them into the very file a single process writes (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from seqssm import __version__
from seqssm.distributed import session
from seqssm.errors import SeqssmError
from seqssm.io import FastaFile, count_windows
from seqssm.io.bed import check_regions, read_bed
from seqssm.layers.mamba import configure_backend
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
    stream: bool = False  # causal models: carry the state along each record (see the module docstring)
    backend: str = "auto"  # Mamba / Caduceus kernels (seqssm.layers.mamba.configure_backend)
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
    """Runs the model (LoadedModel.embed) on batches of equal-length windows; optional RC averaging:
    HyenaDNA and Caduceus-Ph average with the position-reversed pass over the reverse complement,
    Caduceus-PS is strand-invariant already (a no-op)."""

    def __init__(self, loaded, device: torch.device, rc_average: bool):
        self.loaded = loaded
        loaded.model.to(device).eval()
        self.device = device
        self.rc_average = rc_average
        # bf16 on GPU: HyenaDNA's long convolution and Mamba's scan state stay in float32 inside the model.
        self.autocast = device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, ids: np.ndarray) -> torch.Tensor:
        """ids uint8 [B, L] -> float32 embeddings [B, L, D] on the device, forward-aligned."""
        x = torch.from_numpy(ids.astype(np.int64)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.loaded.embed(x, rc_average=self.rc_average).float()


class StreamWalker:
    """Embeds the consecutive windows of each record with a causal model, carrying its recurrent state
    from one window to the next (embed --stream). A record's first window (start 0) starts afresh;
    any other window must continue exactly where the previous one ended."""

    def __init__(self, loaded, device: torch.device):
        self.loaded = loaded
        loaded.model.to(device).eval()
        self.device = device
        self.autocast = device.type == "cuda"
        self.state = None
        self.chrom: str | None = None
        self.position = 0

    @torch.inference_mode()
    def __call__(self, it: Item) -> torch.Tensor:
        """float32 embeddings [L, D] of one window, given every base of its record before it."""
        if it.start == 0:
            self.state = None
        elif (it.chrom, it.start) != (self.chrom, self.position):
            raise RuntimeError(f"stream: window {it.chrom}:{it.start} does not continue {self.chrom}:{self.position}")
        x = torch.from_numpy(it.ids.astype(np.int64))[None].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            h, self.state = self.loaded.embed_stream(x, self.state)
        self.chrom, self.position = it.chrom, it.end
        return h[0].float()

    def save(self, path: Path) -> dict:
        """Write the state (per layer: conv and SSM states) to ``path``; what resume needs to find it."""
        from safetensors.torch import save_file

        tensors = {}
        for i, (conv, ssm) in enumerate(self.state.layers if self.state is not None else []):
            tensors[f"layers.{i}.conv"] = conv.detach().cpu().contiguous()
            tensors[f"layers.{i}.ssm"] = ssm.detach().cpu().contiguous()
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
        return {"file": path.name, "chrom": self.chrom, "position": self.position,
                "layers": len(tensors) // 2}

    def restore(self, part: Path, saved: dict) -> None:
        from safetensors.torch import load_file

        from seqssm.models.caduceus import CaduceusStreamState

        tensors = load_file(str(part / saved["file"]))
        layers = [(tensors[f"layers.{i}.conv"].to(self.device), tensors[f"layers.{i}.ssm"].to(self.device))
                  for i in range(int(saved["layers"]))]
        self.state = CaduceusStreamState(layers, int(saved["position"])) if layers else None
        self.chrom, self.position = saved["chrom"], int(saved["position"])


def check_stream(opts: "EmbedOptions", loaded, window: int, dist) -> None:
    """--stream needs a causal model, whole records, consecutive windows and one process."""
    if not loaded.can_stream:
        if loaded.model_type == "caduceus":
            raise SeqssmError(
                f"--stream: model {loaded.name} is bidirectional ({loaded.architecture.split(' (')[0]}): a "
                "position's embedding depends on the bases to its right, so no state can be carried from window to "
                "window; use overlapping windows instead (--stride smaller than --window)")
        raise SeqssmError(f"--stream: model {loaded.name} is HyenaDNA, which has no recurrent mode here; --stream needs "
                          "a causal Mamba model (seqssm pretrain --arch mamba); use overlapping windows instead "
                          "(--stride smaller than --window)")
    if opts.regions is not None:
        raise SeqssmError("--stream walks whole records from their first base; it cannot be combined with --regions")
    if opts.rc_average:
        raise SeqssmError("--stream carries the left context along the forward strand; --rc-average would need each "
                          "base's right context too: drop one of them")
    if opts.stride is not None and opts.stride != window:
        raise SeqssmError(f"--stream: windows are consecutive (the state passes from one to the next), so --stride "
                          f"must equal --window ({window}); leave --stride out")
    if dist.enabled:
        raise SeqssmError("--stream runs in one process (the state passes window to window along each record); "
                          "start it without torchrun")


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
    # No barrier at the end: a rank whose shard is done leaves; rank 0 waits for the shards on disk.
    # gloo: the ranks exchange only small control messages (GPUs embed independently).
    with session(opts.device, resolve_device, final_barrier=False, backend="gloo") as dist:
        job = dist.agree(lambda: _plan(opts, dist))
        if dist.enabled:
            return _run_sharded(job, opts, dist)
        return _run_single(job, opts)


@dataclass
class _Job:
    """What one embed run needs: the window stream, the model, the output's schema."""

    output: Path
    items: Iterator[Item]
    n_items: int
    total_bases: int
    params: dict
    device: torch.device
    model_name: str
    embedder: "Embedder | StreamWalker"
    dim: int
    meta: dict
    schema: pa.Schema
    chunk_items: int
    notes: list = field(default_factory=list)  # shown by the CLI under its summary


def _plan(opts: EmbedOptions, dist) -> _Job:
    device = dist.device
    fasta = FastaFile(opts.fasta)
    loaded = load_model(opts.model, device="cpu")
    configure_backend(loaded.model, opts.backend, device, training=False)
    max_len = int(loaded.max_length)
    window = opts.window or max_len
    stride = opts.stride or window
    if window < 1 or stride < 1:
        raise SeqssmError("--window and --stride must be positive")
    # HyenaDNA's filters end at max_len; Caduceus / Mamba have no positional limit (max_len is the
    # training window, the default here).
    if window > max_len and loaded.model_type != "caduceus":
        raise SeqssmError(f"--window {window} is longer than model {loaded.name}'s maximum length {max_len}")
    if stride > window:
        raise SeqssmError(f"--stride {stride} is larger than --window {window}: bases between windows would be skipped")
    if opts.stream:
        check_stream(opts, loaded, window, dist)

    output = Path(opts.output) if opts.output else default_output(opts)
    items, n_items, total_bases = plan_items(fasta, opts, window, stride)
    dim = int(loaded.dim)
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
    if opts.stream:
        params["stream"] = True
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
        "architecture": loaded.architecture,
    }
    if loaded.strand_invariant:
        meta["strand_invariant"] = True  # Caduceus-PS: both strands embed alike by construction
    if opts.stream:
        meta["stream"] = "each window embedded with the model state after all bases of its record before it"
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
    else:
        schema = pa.schema(coord_fields + [pa.field("offset", pa.int64()), pa.field("length", pa.int32())],
                           metadata={"seqssm": json.dumps(meta)})
    embedder = StreamWalker(loaded, device) if opts.stream else Embedder(loaded, device, opts.rc_average)
    job = _Job(output, items, n_items, total_bases, params, device, loaded.name, embedder, dim, meta, schema,
               max(opts.batch_size * 4, 64))
    if opts.rc_average and loaded.strand_invariant:
        job.notes.append(f"{loaded.name} is Caduceus-PS: its embeddings are strand-invariant by construction, so "
                         "--rc-average changes nothing but the strand column ('.')")
    return job


def _write_chunk(chunk: list[Item], job: "_Job", opts: "EmbedOptions", tokens, part: Path, state: dict) -> None:
    """Embed a chunk and write its part file; the caller commits `state` (the counters updated here)."""
    table, keep = _chunk_table(chunk, job, opts, tokens)
    if tokens is not None:
        tokens.sync()
    state["parts"].append(out.write_part(part, table, state))
    state["items_done"] += len(chunk)
    state["rows"] += len(keep)
    state["skipped"] += len(chunk) - len(keep)
    state["tokens"] = tokens.rows if tokens is not None else 0


def _chunk_table(chunk: list[Item], job: _Job, opts: EmbedOptions, tokens) -> tuple[pa.Table, list[Item]]:
    """Embed one chunk: its table (the windows kept after the N filter) and those windows."""
    keep = [it for it in chunk if it.n_frac <= opts.max_n_frac]
    if isinstance(job.embedder, StreamWalker):
        rows = _embed_stream_chunk(chunk, job.embedder, opts, tokens, job.dim)
    else:
        rows = _embed_chunk(keep, job.embedder, opts, tokens, job.dim)
    table = pa.Table.from_pydict(
        {
            "chrom": [it.chrom for it in keep],
            "start": [it.start for it in keep],
            "end": [it.end for it in keep],
            "strand": [("." if opts.rc_average and it.strand == "+" else it.strand) for it in keep],
            "n_frac": [it.n_frac for it in keep],
            **rows,
        },
        schema=job.schema,
    )
    return table, keep


def _run_single(job: _Job, opts: EmbedOptions) -> EmbedSummary:
    output, items, n_items, schema, dim = job.output, job.items, job.n_items, job.schema, job.dim
    out.refuse_shards(output, force=opts.force)
    part, state = out.prepare(output, job.params, resume=opts.resume, force=opts.force)
    summary = EmbedSummary(output=output, device=str(job.device), model=job.model_name, dim=dim)
    summary.resumed_from = state["items_done"]
    summary.extra["notes"] = list(job.notes)
    tokens = out.TokenArrayWriter(part, dim, state["tokens"]) if opts.pool == "none" else None
    walker = job.embedder if isinstance(job.embedder, StreamWalker) else None
    if walker is not None and state.get("stream"):
        walker.restore(part, state["stream"])  # the state after the last committed window

    progress = BasesProgress(job.total_bases, description=f"embed {Path(opts.fasta).name}", quiet=opts.quiet)
    t0 = time.perf_counter()
    bases_done = 0
    try:
        with progress:
            # Skip what a previous run committed: the window stream is deterministic.
            for _ in range(state["items_done"]):
                it = next(items)
                progress.advance(it.end - it.start, resumed=True)
            while True:
                chunk = [it for _, it in zip(range(job.chunk_items), items)]
                if not chunk:
                    break
                _write_chunk(chunk, job, opts, tokens, part, state)
                old_stream = (state.get("stream") or {}).get("file")
                if walker is not None:  # saved before the commit that points at it
                    state["stream"] = walker.save(part / f"stream-{len(state['parts']):06d}.safetensors")
                    state["extra_files"] = [state["stream"]["file"]]
                out.commit(part, state)
                if old_stream and old_stream != (state.get("stream") or {}).get("file"):
                    (part / old_stream).unlink(missing_ok=True)
                n = sum(it.end - it.start for it in chunk)
                bases_done += n
                progress.advance(n)
        if state["items_done"] != n_items:
            raise RuntimeError(f"embedded {state['items_done']} windows, planned {n_items}")
        for name in state.get("extra_files", []):  # the stream state: not part of the output
            (part / name).unlink(missing_ok=True)
        if opts.pool == "mean":
            out.finish_parquet(part, output, schema, state)
        else:
            _finish_tokens(part, output, schema, state, tokens, job.meta, opts.force)
    finally:
        if tokens is not None:
            tokens.close()
    summary.seconds = time.perf_counter() - t0
    summary.bases = bases_done
    summary.windows = state["rows"]
    summary.skipped_n = state["skipped"]
    return summary


# ----------------------------------------------------------------------------- under torchrun


def _run_sharded(job: _Job, opts: EmbedOptions, dist) -> EmbedSummary:
    """Embed this rank's chunks into its own shard; rank 0 then merges the shards into the output.

    Chunk c of the window stream (the single-process chunks: ``chunk_items`` consecutive windows in
    genome order) belongs to rank c mod W. A shard is a partial directory like the single-process
    one (``<output>.part-R-of-W.partial``: a part file per chunk and its resume state), renamed to
    ``<output>.part-R-of-W`` when complete. Merging writes the chunks in stream order exactly as
    the single-process run would, so the output is the same file.
    """
    t0 = time.perf_counter()
    output, W, r = job.output, dist.world_size, dist.rank
    dist.on_main(lambda: out.prepare_shards(output, W, resume=opts.resume, force=opts.force))
    if opts.regions is not None:  # pyfaidx builds missing .fai/.gzi files: once, on rank 0, before the others read
        dist.on_main(lambda: _touch_index(opts))
    run_id = dist.broadcast(uuid.uuid4().hex)  # marks the shards this invocation worked on
    params = {**job.params, "shard": [r, W], "chunk_items": job.chunk_items}
    shard = out.shard_path(output, r, W)

    def open_shard():
        if out.shard_complete(shard, params):
            return None, None
        return out.prepare(shard, params, resume=opts.resume, force=opts.force)

    part, state = dist.agree(open_shard)
    summary = EmbedSummary(output=output, device=f"{W} x {job.device.type}", model=job.model_name, dim=job.dim)
    summary.extra["notes"] = list(job.notes)
    if part is not None:
        state.update(run_id=run_id, bases_this_run=0, items_this_run=0)
        summary.resumed_from = state["items_done"]
        _embed_shard(job, opts, dist, part, state)
        os.replace(part, shard)  # the shard is complete: one rename
    if not dist.is_main:
        summary.seconds = time.perf_counter() - t0
        return summary
    states = out.wait_for_shards(output, W, log=None if opts.quiet else _log)
    n_chunks = -(-job.n_items // job.chunk_items)
    if opts.pool == "mean":
        out.merge_parquet_shards(output, W, states, job.schema, n_chunks)
    else:
        out.merge_token_shards(output, W, states, job.schema, n_chunks, job.dim, job.meta, force=opts.force)
    summary.seconds = time.perf_counter() - t0
    summary.windows = sum(s["rows"] for s in states)
    summary.skipped_n = sum(s["skipped"] for s in states)
    this_run = [s for s in states if s.get("run_id") == run_id]
    summary.bases = sum(s["bases_this_run"] for s in this_run)
    summary.resumed_from = sum(s["items_done"] for s in states) - sum(s["items_this_run"] for s in this_run)
    return summary


def _touch_index(opts: EmbedOptions) -> None:
    regions = read_bed(opts.regions)
    if regions:
        FastaFile(opts.fasta).fetch(regions[0].chrom, regions[0].start, regions[0].start)


def _log(msg: str) -> None:
    from seqssm.pipelines.progress import stderr_console

    stderr_console.print(msg, highlight=False, soft_wrap=True)


def _embed_shard(job: _Job, opts: EmbedOptions, dist, part: Path, state: dict) -> None:
    """Embed the chunks c with c mod W == rank, skipping those a previous run committed."""
    W, r = dist.world_size, dist.rank
    tokens = out.TokenArrayWriter(part, job.dim, state["tokens"]) if opts.pool == "none" else None
    quiet = opts.quiet or not dist.is_main
    # Rank 0's bar: its own share of the bases (about 1/W of them).
    progress = BasesProgress(-(-job.total_bases // W), description=f"embed {Path(opts.fasta).name} (rank 0 of {W})",
                             quiet=quiet)
    done = len(state["parts"])  # chunks of this shard already committed
    try:
        with progress:
            c = 0
            while True:
                chunk = [it for _, it in zip(range(job.chunk_items), job.items)]
                if not chunk:
                    break
                mine, k = c % W == r, c // W
                c += 1
                if not mine:
                    continue
                n = sum(it.end - it.start for it in chunk)
                if k < done:
                    progress.advance(n, resumed=True)
                    continue
                _write_chunk(chunk, job, opts, tokens, part, state)
                state["items_this_run"] += len(chunk)
                state["bases_this_run"] += n
                out.commit(part, state)
                progress.advance(n)
        state["complete"] = True
        out.commit(part, state)
    finally:
        if tokens is not None:
            tokens.close()


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


def _embed_stream_chunk(chunk: list[Item], walker: StreamWalker, opts: EmbedOptions, tokens, dim: int) -> dict:
    """Stream mode: every window of the chunk goes through the model in order (the state must pass
    through all of them); the rows are those of the windows the N filter keeps."""
    pooled, offsets, lengths = [], [], []
    for it in chunk:
        h = walker(it)
        if it.n_frac > opts.max_n_frac:
            continue
        if opts.pool == "mean":
            pooled.append(h.mean(dim=0).cpu().numpy())
        else:
            offsets.append(tokens.append(h.to(torch.float16).cpu().numpy()))
            lengths.append(len(it.ids))
    if opts.pool == "mean":
        emb = np.stack(pooled).astype(np.float32) if pooled else np.zeros((0, dim), np.float32)
        return {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)}
    return {"offset": np.array(offsets, np.int64), "length": np.array(lengths, np.int32)}


def _finish_tokens(part: Path, output: Path, schema, state: dict, tokens, meta: dict, force: bool) -> None:
    import pyarrow.parquet as pq

    tokens.finish()
    with pq.ParquetWriter(part / "index.parquet", schema) as w:
        for name in state["parts"]:
            w.write_table(pq.read_table(part / name, schema=schema))
    for name in state["parts"]:
        (part / name).unlink()
    out.atomic_write_text(part / "meta.json", json.dumps({**meta, "rows": tokens.rows}, indent=1))
    (part / out.STATE).unlink()
    out.move_into_place(part, output, force=force)


def summary_dict(s: EmbedSummary) -> dict:
    d = asdict(s)
    d["output"] = str(s.output)
    d["bases_per_s"] = s.bases_per_s if math.isfinite(s.bases_per_s) else None
    return d
