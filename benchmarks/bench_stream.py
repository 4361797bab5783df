"""`seqssm embed --stream` of a whole chromosome with a causal Mamba: time and peak GPU memory.

    python benchmarks/bench_stream.py FASTA [--window 131072] [--d-model 256] [--n-layer 8] [--json out.json]

A random causal Mamba (CaduceusConfig.dna(bidirectional=False, rcps=False)) is saved as a seqssm
model directory and `run_embed(stream=True)` walks every record window by window, carrying the
conv and SSM states, so each window has its record's whole left context. "Constant memory": the
peak is measured for the first --short bases of the FASTA alone (a prefix written to a temporary
file) and for the whole FASTA; with the state carried, the two peaks must be the same.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from seqssm.io import FastaFile
from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM
from seqssm.models.io import save_model
from seqssm.pipelines.embed import EmbedOptions, run_embed
from seqssm.tokenizers.dna import DNATokenizer


def write_prefix(fasta: Path, out: Path, bases: int) -> None:
    """The first `bases` bases of the first record, as a gzip FASTA."""
    first = next(FastaFile(fasta).windows(bases))  # streamed: no random access (BGZF needs no index)
    rec, seq = first.chrom, first.ids
    letters = "".join("ACGTN"[int(i) - 7] if 7 <= int(i) <= 11 else "N" for i in seq)
    with gzip.open(out, "wt") as f:
        f.write(f">{rec}\n")
        for i in range(0, len(letters), 80):
            f.write(letters[i:i + 80] + "\n")


def run(fasta: Path, model_dir: Path, out: Path, window: int, device: str) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    s = run_embed(EmbedOptions(fasta=fasta, output=out, model=str(model_dir), window=window, batch_size=1,
                               device=device, stream=True, quiet=True, max_n_frac=1.0))
    sec = time.perf_counter() - t
    return dict(bases=s.bases, windows=s.windows, seconds=sec, Mbp_s=s.bases / sec / 1e6,
                peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fasta", type=Path)
    ap.add_argument("--window", type=int, default=131072)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--short", type=int, default=5_000_000, help="bases of the prefix run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig.dna(args.d_model, args.n_layer, rcps=False, bidirectional=False))
    model_dir = save_model(model, tmp / "mamba", tokenizer=DNATokenizer(model_max_length=args.window))
    prefix = tmp / "prefix.fa.gz"
    write_prefix(args.fasta, prefix, args.short)
    res = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "window": args.window, "d_model": args.d_model, "n_layer": args.n_layer}
    run(prefix, model_dir, tmp / "warm.parquet", args.window, args.device)  # warm-up: kernels, allocator
    res["prefix"] = run(prefix, model_dir, tmp / "prefix.parquet", args.window, args.device)
    res["whole"] = run(args.fasta, model_dir, tmp / "whole.parquet", args.window, args.device)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
