"""Sequence file input: streaming FASTA (plain, gzip, BGZF) to token ids, and BED regions."""

from seqssm.io.bed import Region, check_regions, read_bed
from seqssm.io.fasta import FastaFile, Window, count_windows, iter_windows

__all__ = ["FastaFile", "Window", "iter_windows", "count_windows", "Region", "read_bed", "check_regions"]
from seqssm.io.labeled import (  # noqa: E402
    TASKS,
    Example,
    LabeledData,
    infer_task,
    input_kind,
    read_labeled,
    read_labeled_fasta,
    read_regions,
    read_table,
)
from seqssm.io.splits import Split, chrom_split, explicit_split, random_split, region_split  # noqa: E402

__all__ += [
    "TASKS", "Example", "LabeledData", "infer_task", "input_kind", "read_labeled", "read_labeled_fasta",
    "read_regions", "read_table", "Split", "chrom_split", "explicit_split", "random_split", "region_split",
]
