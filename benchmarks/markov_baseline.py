"""Held-out perplexity of the order-k Markov (k-mer) baseline, k = 0..10, as JSON on stdout.

The split, the validation windows and the scored positions are exactly those of
`seqssm pretrain` with the same FASTA files, --valid-region/--valid-file and --seq-len, so the
numbers compare directly with a pretrained model's ``heldout.shared_perplexity`` (training.json).

    python benchmarks/markov_baseline.py resources/data/lambda_virus.fa.gz --seq-len 256
    python benchmarks/markov_baseline.py 20.fa.gz --valid-region 20:58000001-63025520 --seq-len 1024

Smoothing: see seqssm.training.markov (``ppl``: Dirichlet interpolation with the order k-1
model, strength chosen by leave-one-out on the training counts; ``ppl_laplace``: alpha = 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fasta", nargs="+", help="training FASTA file(s)")
    ap.add_argument("--valid-region", action="append", default=[], help="held-out NAME:START-END (1-based); repeatable")
    ap.add_argument("--valid-file", action="append", default=[], help="held-out FASTA file; repeatable")
    ap.add_argument("--seq-len", type=int, default=1024, help="validation window length (as in pretraining)")
    ap.add_argument("--max-order", type=int, default=10, help="highest order k (at most 10: the shared set's context)")
    ap.add_argument("--full", action="store_true", help="print every field of every order, not the summary")
    args = ap.parse_args(argv)

    from seqssm.errors import SeqssmError
    from seqssm.training.data import SHARED_CONTEXT, load_split, target_masks, validation_windows
    from seqssm.training.markov import markov_baseline

    if not 0 <= args.max_order <= SHARED_CONTEXT:
        ap.error(f"--max-order must be within 0..{SHARED_CONTEXT}")
    t0 = time.perf_counter()
    try:
        split = load_split(args.fasta, seq_len=args.seq_len, valid_regions=args.valid_region,
                           valid_files=args.valid_file)
    except SeqssmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t_load = time.perf_counter() - t0
    windows = validation_windows(split.valid, args.seq_len)
    _, shared = target_masks(windows)
    res = markov_baseline([s.ids for s in split.train], windows, shared, max_order=args.max_order)
    orders = res["orders"] if args.full else [
        {"k": o["k"], "ppl": round(o["ppl"], 5), "ppl_laplace": round(o["ppl_laplace"], 5), "beta": o["beta"]}
        for o in res["orders"]
    ]
    out = {
        "fasta": args.fasta,
        "split": split.description["rule"],
        "seq_len": args.seq_len,
        "train_bases": split.train_bases,
        "valid_bases": split.valid_bases,
        "positions": res["positions"],
        "position_set": res["position_set"],
        "smoothing": res["smoothing"],
        "orders": orders,
        "best": res["best"],
        "best_laplace": res["best_laplace"],
        "seconds": {"load": round(t_load, 2), "fit_and_score": res["seconds"], "counting": res["seconds_counting"]},
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
