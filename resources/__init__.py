"""Bundled models (models/<name>/) and small real example data (data/)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

EXAMPLES = {
    "lambda": ("lambda_virus.fa.gz", "Enterobacteria phage lambda genome, NC_001416.1, 48,502 bp (BGZF FASTA, .fai + .gzi)"),
}


def resource_root() -> Path:
    return Path(str(files("seqssm.resources")))


def example_files() -> dict[str, tuple[Path, str]]:
    root = resource_root() / "data"
    return {name: (root / fname, desc) for name, (fname, desc) in EXAMPLES.items()}
