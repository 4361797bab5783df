"""Sequence file input: streaming FASTA (plain, gzip, BGZF) to token ids, and BED regions."""

from seqssm.io.bed import Region, check_regions, read_bed
from seqssm.io.fasta import FastaFile, Window, count_windows, iter_windows

__all__ = ["FastaFile", "Window", "iter_windows", "count_windows", "Region", "read_bed", "check_regions"]
