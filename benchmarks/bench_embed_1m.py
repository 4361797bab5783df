"""`seqssm embed` of a whole chromosome with a 1,000,000-token HyenaDNA window on the GPU.

    python benchmarks/bench_embed_1m.py FASTA [--window 1000000] [--json out.json]

Builds a random-weight model of the large-1m shape (no public 1M checkpoint is reachable here; the
speed does not depend on the weights), saves it as a seqssm model directory, then measures in one
process, after a warm-up forward:
  read     the windows read and tokenised alone (the pipeline's host-side input work)
  model    the forward passes alone over the same windows (bf16 autocast, synchronised)
  embed    `run_embed` end to end (read, N filter, forward, mean-pool, Parquet write, atomic commit)
overhead = (embed - model) / model: the time the GPU would wait on the host.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seqssm.io import FastaFile
from seqssm.models.hyena import HyenaDNAForCausalLM
from seqssm.models.io import save_model
from seqssm.pipelines.embed import EmbedOptions, run_embed
from seqssm.tokenizers.dna import N, DNATokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_hyena_long import LARGE_1M, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fasta", type=Path)
    ap.add_argument("--window", type=int, default=1_000_000)
    ap.add_argument("--max-n-frac", type=float, default=0.5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cpu for a smoke test at small windows")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    tmp = Path(tempfile.mkdtemp())
    base = build()
    lm = HyenaDNAForCausalLM(base.config)
    lm.backbone.load_state_dict(base.state_dict())
    del base
    model_dir = save_model(lm, tmp / "large-1m-random", tokenizer=DNATokenizer(model_max_length=LARGE_1M["max_seq_len"], add_eos=True))
    backbone = lm.backbone.to(dev).eval()

    t = time.perf_counter()
    windows = [w.ids for w in FastaFile(args.fasta).windows(args.window)]
    read_s = time.perf_counter() - t
    keep = [ids for ids in windows if np.count_nonzero(ids == N) / len(ids) <= args.max_n_frac]
    bases = sum(len(ids) for ids in keep)

    def forward(ids):
        x = torch.from_numpy(ids.astype(np.int64))[None].to(dev, non_blocking=True)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            return backbone(x).mean(1).float().cpu()

    forward(keep[0])
    forward(keep[-1])  # the short last window: its own transform length
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    for ids in keep:
        forward(ids)
    sync()
    model_s = time.perf_counter() - t
    del windows

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = tmp / "embeddings.parquet"
    t = time.perf_counter()
    summary = run_embed(EmbedOptions(fasta=args.fasta, output=out, model=str(model_dir), window=args.window,
                                     batch_size=1, device=args.device, quiet=True, max_n_frac=args.max_n_frac))
    embed_s = time.perf_counter() - t
    res = dict(device=torch.cuda.get_device_name() if cuda else "cpu", fasta=str(args.fasta), window=args.window,
               windows_embedded=len(keep), windows_written=summary.windows, bases=bases,
               read_s=read_s, model_s=model_s, embed_s=embed_s, overhead=(embed_s - model_s) / model_s,
               embed_Mbp_s=summary.bases / embed_s / 1e6,
               peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
