"""Benchmark: FASTA -> token ids with seqssm.io.fasta, next to Biopython, on one genome file.

    python benchmarks/bench_fasta.py /path/to/20.fa.gz --repeats 7

The argument may be plain, gzip or BGZF FASTA.  The script writes, in a temporary directory, a plain
copy, a plain-gzip copy (zlib level 6, like `gzip`) and -- unless the input already is BGZF -- a
BGZF copy (Biopython's BgzfWriter), then times each reader on each file, after one warm-up pass (page
cache warm), and prints a Markdown table of median throughput in Mbp/s (bases per second / 1e6).

seqssm:    for name, ids in FastaFile(path).records(): ...      (uint8 token ids of each record)
Biopython: for rec in SeqIO.parse(handle, "fasta"): str(rec.seq).upper()
           (handle = open(path) or gzip.open(path, "rt"))

Before timing, the ids from seqssm are checked against Biopython's sequence, base by base.
Not a pytest test.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from seqssm.io import FastaFile
from seqssm.tokenizers.dna import ENCODE_LUT


def seqssm_records(path: Path) -> int:
    n = 0
    for _, ids in FastaFile(path).records():
        n += len(ids)
    return n


def seqssm_windows(path: Path, window: int = 1 << 16) -> int:
    n = 0
    for w in FastaFile(path).windows(window):
        n += len(w.ids)
    return n


def biopython_records(path: Path) -> int:
    from Bio import SeqIO

    n = 0
    opener = gzip.open if path.read_bytes()[:2] == b"\x1f\x8b" else open
    with opener(path, "rt") as handle:
        for rec in SeqIO.parse(handle, "fasta"):
            n += len(str(rec.seq).upper())
    return n


def check_same(path: Path) -> int:
    """seqssm's ids == Biopython's sequence mapped through the tokenizer table, for every base."""
    from Bio import SeqIO

    opener = gzip.open if FastaFile(path).compression != "none" else open
    with opener(path, "rt") as handle:
        ref = {r.id: str(r.seq) for r in SeqIO.parse(handle, "fasta")}
    total = 0
    for name, ids in FastaFile(path).records():
        expect = ENCODE_LUT[np.frombuffer(ref.pop(name).encode("ascii"), dtype=np.uint8)]
        if not np.array_equal(ids, expect):
            sys.exit(f"MISMATCH in {path}, record {name}")
        total += len(ids)
    if ref:
        sys.exit(f"MISMATCH in {path}: records missing: {list(ref)[:3]}")
    return total


def timeit(fn, path: Path, repeats: int) -> tuple[list[float], int]:
    fn(path)  # warm-up: page cache, imports
    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn(path)
        times.append(time.perf_counter() - t)
    return times, n


def prepare(src: Path, tmp: Path) -> dict[str, Path]:
    from Bio import bgzf
    from isal import igzip

    kind = FastaFile(src).compression
    plain = tmp / "genome.fa"
    if kind == "none":
        shutil.copyfile(src, plain)
    else:
        with igzip.open(src, "rb") as fin, open(plain, "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
    files = {"plain": plain}
    files["gzip"] = tmp / "genome.fa.gz"
    with open(plain, "rb") as fin, gzip.open(files["gzip"], "wb", compresslevel=6) as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
    if kind == "bgzf":
        files["bgzf"] = src
    else:
        files["bgzf"] = tmp / "genome.fa.bgz"
        with open(plain, "rb") as fin, bgzf.BgzfWriter(str(files["bgzf"]), "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
    return files


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fasta", type=Path, help="genome FASTA (plain, gzip or BGZF), e.g. human chr20")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tmpdir", type=Path, default=None, help="where to write the copies (default: system temp)")
    ap.add_argument("--skip-biopython", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-fasta-", dir=args.tmpdir) as d:
        t = time.perf_counter()
        files = prepare(args.fasta, Path(d))
        print(f"prepared copies in {time.perf_counter() - t:.1f} s: "
              + ", ".join(f"{k} {p.stat().st_size / 1e6:.1f} MB" for k, p in files.items()), file=sys.stderr)
        bases = check_same(files["plain"])
        for k in ("gzip", "bgzf"):
            if seqssm_records(files[k]) != bases:
                sys.exit(f"MISMATCH: {k} copy gives a different number of bases")
        check_same(files["bgzf"])

        rows, raw = [], {}
        for fmt in ("plain", "gzip", "bgzf"):
            p = files[fmt]
            res = {}
            for label, fn in (("seqssm records()", seqssm_records), ("seqssm windows(65536)", seqssm_windows),
                              ("Biopython SeqIO.parse + upper()", biopython_records)):
                if args.skip_biopython and label.startswith("Bio"):
                    continue
                times, n = timeit(fn, p, args.repeats)
                assert n == bases, (label, fmt, n, bases)
                res[label] = times
                print(f"{fmt:6s} {label:32s} median {statistics.median(times):.3f} s "
                      f"({bases / statistics.median(times) / 1e6:.0f} Mbp/s)  all: "
                      + " ".join(f"{x:.3f}" for x in times), file=sys.stderr)
            raw[fmt] = res
            rows.append((fmt, res))

    print(f"\n{bases:,} bases; {args.repeats} repeats after one warm-up; median throughput (Mbp/s, bases / s / 1e6)\n")
    labels = list(rows[0][1])
    print("| file | " + " | ".join(labels) + " | speed-up vs Biopython |")
    print("|---|" + "---:|" * (len(labels) + 1))
    for fmt, res in rows:
        mbps = [bases / statistics.median(res[lab]) / 1e6 for lab in labels]
        bio = mbps[-1] if labels[-1].startswith("Bio") else None
        speed = f"{mbps[0] / bio:.1f}x" if bio else "-"
        print(f"| {fmt} | " + " | ".join(f"{m:.0f}" for m in mbps) + f" | {speed} |")
    print(f"\npython {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} CPUs, {platform.machine()}")
    if args.json:
        args.json.write_text(json.dumps({"bases": bases, "timings_s": raw}, indent=1))


if __name__ == "__main__":
    main()
