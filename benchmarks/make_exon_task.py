"""Build the chr20 exon-vs-background region task (BED6) from RefSeq exons and the chr20 FASTA.

    python benchmarks/make_exon_task.py EXONS.txt.gz CHR20.fa.gz OUT.bed [--chrom chr20] [--length 200] [--seed 0]

EXONS is subread-data's hg19_RefSeq_exon.txt.gz (GeneID, Chr, Start, End, Strand; 1-based inclusive),
CHR20 the GRCh37 chr20 FASTA of vt-examples (record "20"). Positives: unique exons (label "exon",
their strand), as given; `seqssm finetune --length` centres and resizes them. Negatives: as many
windows of `--length` bp drawn uniformly from the chromosome that lie at least `--margin` bp from
every exon and are at most 10% N (label "background", random strand). Nothing here is committed
data: the inputs come from Debian packages at run time.
"""

from __future__ import annotations

import argparse
import gzip

import numpy as np

from seqssm.io import FastaFile
from seqssm.tokenizers.dna import N


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exons")
    ap.add_argument("fasta")
    ap.add_argument("out")
    ap.add_argument("--chrom", default="chr20", help="chromosome name in the exon table")
    ap.add_argument("--record", default=None, help="record name in the FASTA (default: --chrom without 'chr')")
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--margin", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    record = args.record or args.chrom.removeprefix("chr")

    exons = set()
    with gzip.open(args.exons, "rt") as f:
        next(f)
        for line in f:
            _, chrom, start, end, strand = line.split()[:5]
            if chrom == args.chrom:
                exons.add((int(start) - 1, int(end), strand))  # -> 0-based half-open
    exons = sorted(exons)
    fa = FastaFile(args.fasta)
    L = fa.lengths()[record]
    seq = fa.fetch(record, 0, L)

    # Background: windows far from every exon (+/- margin) and mostly A/C/G/T.
    near = np.zeros(L + 1, np.int32)
    for s, e, _ in exons:
        near[max(0, s - args.margin)] += 1
        near[min(L, e + args.margin)] -= 1
    blocked = np.cumsum(near)[:L] > 0
    is_n = seq == N
    rng = np.random.default_rng(args.seed)
    want = len(exons)
    background = []
    cum_blocked = np.concatenate([[0], np.cumsum(blocked)])
    cum_n = np.concatenate([[0], np.cumsum(is_n)])
    while len(background) < want:
        starts = rng.integers(0, L - args.length, size=4 * want)
        ends = starts + args.length
        ok = (cum_blocked[ends] - cum_blocked[starts] == 0) & (cum_n[ends] - cum_n[starts] <= 0.1 * args.length)
        for s in starts[ok]:
            background.append((int(s), int(s) + args.length, "+-"[rng.integers(0, 2)]))
            if len(background) == want:
                break

    rows = [(s, e, "exon", st) for s, e, st in exons] + [(s, e, "background", st) for s, e, st in background]
    rows.sort()
    with open(args.out, "w") as f:
        f.write("#chrom\tstart\tend\tlabel\tscore\tstrand\n")
        for s, e, label, st in rows:
            f.write(f"{record}\t{s}\t{e}\t{label}\t0\t{st}\n")
    print(f"{args.out}: {len(exons)} exons, {len(background)} background windows on {record} ({L:,} bp)")


if __name__ == "__main__":
    main()
