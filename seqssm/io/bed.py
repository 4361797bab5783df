"""BED regions (BED3 and more columns), checked line by line with errors that name the BED line."""

from __future__ import annotations

import io
import os
import pathlib
from dataclasses import dataclass

from seqssm.errors import InputError, file_error

__all__ = ["Region", "read_bed", "check_regions"]

_STRANDS = ("+", "-", ".")


@dataclass
class Region:
    """One BED line: 0-based half-open [start, end) on ``chrom``."""

    chrom: str
    start: int
    end: int
    name: str | None
    strand: str  # "+", "-" or "."
    line: int  # 1-based line number in the BED file

    def __len__(self) -> int:
        return self.end - self.start


def _open_text(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:
            from isal import igzip

            return io.TextIOWrapper(igzip.open(path, "rb"), encoding="utf-8", newline=None)
        return open(path, encoding="utf-8", newline=None)
    except OSError as e:
        raise file_error(path, e, "a BED file") from None


def _int(text: str, what: str, path, lineno: int) -> int:
    t = text.strip()
    if not t or not (t.isdigit() or (t[0] == "-" and t[1:].isdigit())):
        raise InputError(path, f"{what} {text!r} is not an integer", line=lineno)
    return int(t)


def parse_interval(cols: list[str], path, lineno: int) -> tuple[str, int, int]:
    """(chrom, start, end) of a BED line's columns; InputError naming the line if they are not valid."""
    if len(cols) < 3:
        raise InputError(path, f"expected at least 3 columns (chrom, start, end), found {len(cols)}", line=lineno)
    chrom = cols[0]
    if not chrom:
        raise InputError(path, "empty chromosome name", line=lineno)
    start = _int(cols[1], "start", path, lineno)
    end = _int(cols[2], "end", path, lineno)
    if start < 0:
        raise InputError(path, f"start {start} is negative", line=lineno)
    if end <= start:
        raise InputError(path, f"end {end} is not greater than start {start}", line=lineno)
    return chrom, start, end


def read_bed(path: str | os.PathLike) -> list[Region]:
    """Regions of a BED file (plain or gzip), in file order.

    Columns are separated by tabs (if the line has any) or else by runs of whitespace.  Column 4 is
    the name (None if absent), column 6 the strand ("." if absent).  Blank lines and lines starting
    with ``track``, ``browser`` or ``#`` are skipped.  InputError (naming file and line) for fewer
    than 3 columns, non-integer coordinates, start < 0, end <= start, or a strand other than +, -, '.'.
    """
    path = pathlib.Path(path)
    regions: list[Region] = []
    f = _open_text(path)
    try:
        with f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                s = line.strip()
                if not s or s.startswith("#") or s.split(None, 1)[0] in ("track", "browser"):
                    continue
                cols = line.split("\t") if "\t" in line else line.split()
                cols = [c.strip() for c in cols]
                while cols and cols[-1] == "":  # trailing tabs
                    cols.pop()
                chrom, start, end = parse_interval(cols, path, lineno)
                name = cols[3] if len(cols) > 3 else None
                strand = cols[5] if len(cols) > 5 else "."
                if strand not in _STRANDS:
                    raise InputError(path, f"strand {strand!r} is not '+', '-' or '.'", line=lineno)
                regions.append(Region(chrom, start, end, name, strand, lineno))
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (is this a BED file?)") from None
    except (EOFError, OSError) as e:
        raise InputError(path, f"truncated or corrupt gzip stream ({e})") from None
    return regions


def check_regions(regions, lengths: dict[str, int], path) -> None:
    """InputError naming the BED line of the first region on an unknown chromosome or past its end."""
    for r in regions:
        length = lengths.get(r.chrom)
        if length is None:
            names = list(lengths)
            hint = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise InputError(path, f"chromosome {r.chrom!r} is not in the FASTA file (it has: {hint})", line=r.line)
        if r.end > length:
            raise InputError(
                path, f"region {r.chrom}:{r.start}-{r.end} ends past the end of {r.chrom} (length {length})",
                line=r.line,
            )
