"""Labeled sequences for fine-tuning and prediction: BED regions on a genome, sequence tables, FASTA.

Three inputs give the same :class:`LabeledData` (a list of :class:`Example`, the task and the class
or task names):

* :func:`read_regions` -- a BED file of regions plus a genome FASTA; the label is one BED column
  (or several, for multi-task); minus-strand regions are reverse-complemented; regions can be
  resized to a fixed length around their midpoint.
* :func:`read_table` -- CSV/TSV with a sequence column and label column(s) (the DNABERT-style
  ``sequence,label`` layout).
* :func:`read_labeled_fasta` -- FASTA with the label in each header.

Labels
------
One label column gives a classification task (``binary`` or ``multiclass``; the class names are
kept and sorted: numbers numerically, ``true``/``false`` as False then True, anything else
lexicographically) or, for many distinct non-integer numbers, ``regression``.  Several label
columns give ``multilabel`` (all values 0/1) or ``regression`` (numbers).  See :func:`infer_task`.
Files read for validation, test or prediction take the training set's ``label_names`` (and
``task``) so that class indices agree; a label outside them is an error naming the line.

Numeric class labels are matched by value: ``1``, ``1.0`` and ``1e0`` are the same class, named
``"1"``.

Errors
------
Every problem with the input is an :class:`~seqssm.errors.InputError` naming the file and, where
there is one, the 1-based line: missing or unparsable labels, invalid sequence characters, regions on
unknown chromosomes or past a chromosome end, a single class.  Nothing is dropped silently: regions
are skipped only when the caller asks for it (``skip_out_of_bounds``, ``max_n_frac``), and every
skipped region is counted by reason in :attr:`LabeledData.skipped`.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import pathlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from seqssm.io.bed import parse_interval
from seqssm.errors import InputError, file_error
from seqssm.tokenizers.dna import ENCODE_TABLE, INVALID, N, encode, reverse_complement

__all__ = [
    "TASKS",
    "UNLABELED",
    "Example",
    "LabeledData",
    "read_regions",
    "read_table",
    "read_labeled_fasta",
    "read_labeled",
    "infer_task",
    "input_kind",
]

TASKS = ("binary", "multiclass", "multilabel", "regression")
UNLABELED = "unlabeled"  # the task of data read without labels (require_labels=False) and task="auto"
CLASSIFICATION = ("binary", "multiclass")

MAX_INT_CLASSES = 50  # one column of more distinct integers than this is read as regression
SEQUENCE_COLUMNS = ("sequence", "seq", "seqs", "dna")
LABEL_COLUMNS = ("label", "labels", "y", "target")
ID_COLUMNS = ("id", "name")
BED_ALIASES = {"name": 4, "score": 5, "strand": 6}
BED_HEADER_FIRST = ("chrom", "chr", "chromosome", "seqname", "seqnames", "contig")
_MISSING = {"", ".", "na", "n/a", "nan", "none", "null"}
_BOOLS = {"false": False, "true": True}
_STRANDS = ("+", "-", ".")
_WS = b"\r\n \t"


@dataclass
class Example:
    """One labeled (or, for prediction, unlabeled) sequence."""

    name: str  # "chrom:start-end(strand)" for regions (0-based half-open, after resizing), else the id / record name
    ids: np.ndarray  # uint8 token ids; reverse-complemented for '-' strand; resized if a length was given
    target: np.ndarray  # float32 [n_targets]; empty (shape [0]) when the input has no labels
    line: int  # 1-based line of the source file (for FASTA: the header line of the record)
    chrom: str | None = None
    start: int | None = None
    end: int | None = None
    strand: str = "."

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class LabeledData:
    """Examples of one file (or one split of it) with their task and label names."""

    examples: list[Example]
    task: str  # one of TASKS, or UNLABELED
    label_names: list[str]  # binary/multiclass: class names by index; multilabel/regression: task names
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of examples left out on request

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_labels(self) -> bool:
        return self.task != UNLABELED and bool(self.examples) and self.examples[0].target.size > 0

    @property
    def n_targets(self) -> int:
        """Length of each example's ``target`` vector: 1 for binary and multiclass (the class index),
        the number of tasks for multilabel and regression, 0 without labels."""
        if not self.has_labels:
            return 0
        if self.task in CLASSIFICATION:
            return 1
        return len(self.label_names)

    @property
    def n_outputs(self) -> int:
        """Width of a model head for this task: 1 for binary (one logit), the number of classes for
        multiclass, the number of tasks for multilabel and regression (0 if unknown)."""
        if self.task == "binary":
            return 1
        return len(self.label_names)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(e.ids) for e in self.examples), dtype=np.int64, count=len(self.examples))

    def targets(self) -> np.ndarray:
        """All targets as one float32 array [n_examples, n_targets]."""
        if not self.examples:
            return np.zeros((0, self.n_targets), dtype=np.float32)
        return np.stack([e.target for e in self.examples]).astype(np.float32, copy=False)

    def class_counts(self) -> dict[str, int]:
        """Examples per class (binary/multiclass, every class listed, in index order); for multilabel,
        positive examples per task; empty for regression and unlabeled data."""
        if not self.has_labels or self.task == "regression":
            return {}
        t = self.targets()
        if self.task == "multilabel":
            return {name: int(c) for name, c in zip(self.label_names, (t > 0.5).sum(axis=0))}
        counts = np.bincount(t[:, 0].astype(np.int64), minlength=len(self.label_names))
        return {name: int(c) for name, c in zip(self.label_names, counts)}

    def subset(self, indices: Iterable[int], *, source: str | None = None) -> "LabeledData":
        """The examples at ``indices`` (in that order), same task and label names, nothing skipped."""
        return LabeledData(
            [self.examples[i] for i in indices], self.task, list(self.label_names),
            self.source if source is None else source, {},
        )

    def describe(self) -> str:
        """One line: count, task, classes (with counts) or tasks, and skipped regions by reason."""
        parts = [f"{len(self.examples)} examples from {self.source}", f"task {self.task}"]
        counts = self.class_counts()
        if self.task in CLASSIFICATION and counts:
            parts.append("classes " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
        elif self.task in ("multilabel", "regression"):
            parts.append(f"{len(self.label_names)} tasks ({', '.join(self.label_names[:8])}"
                         f"{', ...' if len(self.label_names) > 8 else ''})")
        if self.skipped:
            parts.append(f"skipped {sum(self.skipped.values())}: "
                         + ", ".join(f"{v} {k}" for k, v in self.skipped.items()))
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Labels


def _is_missing(v: str) -> bool:
    return v.strip().lower() in _MISSING


def _number(v: str) -> float | None:
    """A finite number, or None."""
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _kind(values: Iterable[str]) -> str:
    """'num' if every value is a finite number, 'bool' if every value is true/false, else 'str'."""
    values = list(values)
    if values and all(_number(v) is not None for v in values):
        return "num"
    if values and all(v.lower() in _BOOLS for v in values):
        return "bool"
    return "str"


def _key(v: str, kind: str):
    """The class a label denotes under a column kind (None: not a value of that kind)."""
    if kind == "num":
        return _number(v)
    if kind == "bool":
        return _BOOLS.get(v.lower())
    return v


def _class_name(key, kind: str) -> str:
    if kind == "num":
        return str(int(key)) if float(key).is_integer() else repr(float(key))
    if kind == "bool":
        return "True" if key else "False"
    return key


def _is01(v: str) -> bool:
    x = _number(v)
    return (x is not None and x in (0.0, 1.0)) or v.lower() in _BOOLS


def _value01(v: str) -> float:
    b = _BOOLS.get(v.lower())
    return float(b) if b is not None else float(_number(v))


def _show(values: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" and {len(values) - n} more" if len(values) > n else "")


def infer_task(values_per_column, *, path="labels", columns: Sequence[str] | None = None) -> str:
    """The task of ``task="auto"`` from the raw label strings of each label column.

    One column: 2 distinct values -> ``binary``; more than 2 -> ``multiclass`` when they are not all
    numbers, or are all integers with at most 50 distinct values; other numbers -> ``regression``.
    Several columns: all values 0/1 (or true/false) -> ``multilabel``; all numbers -> ``regression``.
    InputError for a single class ("only one class: ..."), for missing labels, for several columns
    that are not all numbers, and for one text column with so many distinct values that it cannot be
    a class label (more than 50 classes and more classes than half the examples).
    """
    cols = [[str(v).strip() for v in c] for c in values_per_column]
    names = list(columns) if columns is not None else [str(i + 1) for i in range(len(cols))]
    if not cols or not cols[0]:
        raise InputError(path, "no labels")
    for name, vals in zip(names, cols):
        for v in vals:
            if _is_missing(v):
                raise InputError(path, f"missing label {v!r} in column {name!r}")
    if len(cols) == 1:
        vals = cols[0]
        kind = _kind(vals)
        keys = {_key(v, kind) for v in vals}
        k = len(keys)
        if k == 1:
            (only,) = keys
            raise InputError(
                path, f"only one class: every label in column {names[0]!r} is {_class_name(only, kind)!r} "
                f"({len(vals)} examples); a classifier needs at least two classes"
            )
        if k == 2:
            return "binary"
        if kind == "num":
            ints = all(float(x).is_integer() for x in keys)
            return "multiclass" if ints and k <= MAX_INT_CLASSES else "regression"
        if k > MAX_INT_CLASSES and k > len(vals) / 2:
            raise InputError(
                path, f"column {names[0]!r} has {k} distinct values in {len(vals)} examples: not a class "
                "label (an id or name column?); choose the label column, or set the task explicitly"
            )
        return "multiclass"
    if all(_is01(v) for vals in cols for v in vals):
        return "multilabel"
    for name, vals in zip(names, cols):
        for v in vals:
            if _number(v) is None:
                raise InputError(
                    path, f"several label columns must be all 0/1 (multilabel) or all numbers (regression); "
                    f"column {name!r} has {v!r}"
                )
    return "regression"


def _make_targets(path, lines: list[int], cols: list[list[str]], colnames: list[str], *, task: str,
                  label_names: Sequence[str] | None):
    """(task, label_names, float32 targets [n, n_targets]) from the raw label strings of each column.

    ``lines[i]`` is the source line of row i, for error messages."""
    if task != "auto" and task not in TASKS:
        raise ValueError(f"task must be 'auto' or one of {', '.join(TASKS)}, got {task!r}")
    cols = [[v.strip() for v in c] for c in cols]
    n = len(lines)
    for name, vals in zip(colnames, cols):
        for i, v in enumerate(vals):
            if _is_missing(v):
                what = "empty label" if not v else f"missing label {v!r}"
                raise InputError(path, f"{what} in column {name!r}", line=lines[i])
    given = list(label_names) if label_names is not None else None
    if task == "auto":
        if given is None:
            task = infer_task(cols, path=path, columns=colnames)
        elif len(cols) > 1:
            task = "multilabel" if all(_is01(v) for c in cols for v in c) else "regression"
        elif len(given) >= 2:
            task = "binary" if len(given) == 2 else "multiclass"
        else:
            task = "regression"

    if task in CLASSIFICATION:
        if len(cols) != 1:
            raise InputError(
                path, f"task {task} takes one label column, got {len(cols)} ({', '.join(colnames)}); "
                "several columns are multilabel or regression"
            )
        vals = cols[0]
        if given is not None:
            if task == "binary" and len(given) != 2:
                raise InputError(path, f"task binary needs 2 class names, got {len(given)}: {_show(given)}")
            kind = _kind(given)
            lookup = {_key(g, kind): i for i, g in enumerate(given)}
            idx = np.empty(n, dtype=np.float32)
            for i, v in enumerate(vals):
                j = lookup.get(_key(v, kind))
                if j is None:
                    raise InputError(
                        path, f"label {v!r} in column {colnames[0]!r} is not one of the training classes "
                        f"({', '.join(given)})", line=lines[i]
                    )
                idx[i] = j
            return task, given, idx[:, None]
        kind = _kind(vals)
        keys = [_key(v, kind) for v in vals]
        classes = sorted(set(keys))  # numbers by value, False < True, strings lexicographically
        if len(classes) == 1:
            raise InputError(
                path, f"only one class: every label in column {colnames[0]!r} is "
                f"{_class_name(classes[0], kind)!r} ({n} examples); a classifier needs at least two classes"
            )
        names = [_class_name(c, kind) for c in classes]
        if task == "binary" and len(classes) != 2:
            raise InputError(
                path, f"task binary needs exactly 2 classes, column {colnames[0]!r} has {len(classes)}: "
                f"{_show(names)}"
            )
        lookup = {c: i for i, c in enumerate(classes)}
        return task, names, np.array([lookup[k] for k in keys], dtype=np.float32)[:, None]

    # multilabel / regression: one target per column
    if given is not None:
        if len(given) != len(cols):
            raise InputError(
                path, f"{len(cols)} label column(s) ({', '.join(colnames)}) but the training data has "
                f"{len(given)} tasks ({', '.join(given)})"
            )
        if list(colnames) != given:
            raise InputError(
                path, f"label columns ({', '.join(colnames)}) differ from the training tasks ({', '.join(given)})"
            )
    out = np.empty((n, len(cols)), dtype=np.float32)
    for j, (name, vals) in enumerate(zip(colnames, cols)):
        for i, v in enumerate(vals):
            if task == "multilabel":
                if not _is01(v):
                    raise InputError(path, f"multilabel targets must be 0 or 1, got {v!r} in column {name!r}",
                                     line=lines[i])
                out[i, j] = _value01(v)
            else:
                x = _number(v)
                if x is None:
                    raise InputError(path, f"label {v!r} in column {name!r} is not a finite number", line=lines[i])
                out[i, j] = x
        if given is None and n > 1 and np.all(out[:, j] == out[0, j]):
            what = "only one class" if task == "multilabel" else "a constant target"
            raise InputError(
                path, f"{what}: every label in column {name!r} is {vals[0]!r} ({n} examples); nothing to learn"
            )
    return task, list(given) if given is not None else list(colnames), out


def _finish(path, rows: list, label_rows: list | None, colnames: list[str], *, task, label_names,
            skipped: dict, what: str) -> LabeledData:
    """Attach targets to the examples of ``rows`` (Example with empty targets) and build LabeledData."""
    if not rows:
        if skipped:
            raise InputError(path, f"no {what} left: every one was skipped ("
                             + ", ".join(f"{v} {k}" for k, v in skipped.items()) + ")")
        raise InputError(path, f"no {what} in the file")
    if label_rows is None:
        return LabeledData(rows, UNLABELED if task == "auto" else task,
                           list(label_names) if label_names is not None else [], str(path), skipped)
    cols = [list(c) for c in zip(*label_rows)]
    task, names, targets = _make_targets(path, [e.line for e in rows], cols, colnames, task=task,
                                         label_names=label_names)
    for e, t in zip(rows, targets):
        e.target = t
    return LabeledData(rows, task, names, str(path), skipped)


_NO_TARGET = np.zeros(0, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Text input


def _open_text(path: pathlib.Path, what: str):
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        if gz:
            from isal import igzip

            return io.TextIOWrapper(igzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise file_error(path, e, what) from None


def _base_suffix(path: pathlib.Path) -> str:
    name = path.name.lower()
    for z in (".gz", ".bgz", ".bgzf"):
        if name.endswith(z):
            name = name[: -len(z)]
            break
    return pathlib.PurePath(name).suffix


def _describe_char(c: str) -> str:
    if c == " ":
        return "' ' (space)"
    if c.isprintable():
        return repr(c)
    return f"character U+{ord(c):04X}"


def _encode_checked(seq: str, path, line: int, where: str) -> np.ndarray:
    ids = encode(seq)  # a non-ASCII character becomes '?' (invalid): positions stay those of `seq`
    bad = ids == INVALID
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            path, f"invalid character {_describe_char(seq[i])} at position {i + 1} of {where} "
            "(not an IUPAC nucleotide code)", line=line
        )
    return ids


# ----------------------------------------------------------------------------------------------
# BED regions


def _split_cols(line: str) -> list[str]:
    cols = line.split("\t") if "\t" in line else line.split()
    return [c.strip() for c in cols]


def _resolve_column(spec, names: dict[str, int], ncols: int, path, line, *, what: str, min_index: int = 1) -> int:
    """0-based column index of a label/sequence column given by name or 1-based number."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        idx = int(spec)
    elif isinstance(spec, str) and spec.strip().isdigit() and spec.strip() not in names:
        idx = int(spec.strip())
    elif isinstance(spec, str) and spec in names:
        idx = names[spec] + 1
    elif isinstance(spec, str) and spec.lower() in {k.lower() for k in names}:
        idx = {k.lower(): v for k, v in reversed(names.items())}[spec.lower()] + 1
    else:
        shown = ", ".join(k for k in names if not k.isdigit()) or f"{ncols} unnamed columns"
        raise InputError(path, f"no {what} column {spec!r} (columns: {shown})", line=line)
    if 1 <= idx < min_index:
        raise InputError(path, f"{what} column {spec!r} is column {idx}, one of chrom, start, end", line=line)
    if idx < 1 or idx > ncols:
        raise InputError(path, f"{what} column {idx} is out of range (the file has {ncols} columns)", line=line)
    return idx - 1


def read_regions(
    bed,
    genome,
    *,
    label_columns: Sequence[str | int] | str | int | None = None,
    length: int | None = None,
    task: str = "auto",
    label_names: Sequence[str] | None = None,
    require_labels: bool = True,
    skip_out_of_bounds: bool = False,
    max_n_frac: float = 1.0,
) -> LabeledData:
    """Labeled regions of a BED file, with their sequences from ``genome`` (a FastaFile or a path to an
    indexed FASTA: uncompressed or BGZF).

    BED: tab-separated (or whitespace-separated when a line has no tab), plain or gzip; blank lines
    and ``track``/``browser`` lines are skipped, as are ``#`` comment lines.  An optional header names
    the columns: a first line whose first field is ``chrom`` (or chr, chromosome, seqnames, contig),
    or the last ``#`` line before the first region when it has as many fields as that region (e.g.
    ``#chrom<TAB>start<TAB>end<TAB>label``).  Columns can always be named by their 1-based number
    (``4``, ``5``, ...) and by the BED aliases name=4, score=5, strand=6 (unless the header uses those
    names for other columns).

    ``label_columns``: column names or 1-based numbers (one column: classification or regression;
    several: multilabel or regression); default: column 4 (name).  With ``require_labels=False``
    (prediction), labels are read only when ``label_columns`` is given and the file has those columns
    (by header name, or a first region with that many columns); otherwise targets are empty and
    ``task`` is the given task (``"unlabeled"`` for "auto").  Labels that are read are checked as usual.  The strand comes from a column named ``strand`` in the header, else
    column 6 when present ('+', '-' or '.'); '-' regions are reverse-complemented.

    ``length``: resize every region to exactly ``length`` bp centred on its midpoint
    (``start = (start + end) // 2 - length // 2``); otherwise regions keep their length.  A region
    (resized or not) that starts before 0 or ends past its chromosome is an InputError naming the line,
    unless ``skip_out_of_bounds=True``: then it is counted in ``skipped``.  Regions whose fraction of N
    bases exceeds ``max_n_frac`` are skipped and counted too.  An unknown chromosome is always an
    InputError naming the line and some of the FASTA's record names.

    ``label_names``: the training set's class names (or task names), for validation/test/prediction
    files, so that class indices agree; a label outside them is an InputError naming the line.
    """
    from seqssm.io.fasta import FastaFile

    path = pathlib.Path(bed)
    if length is not None and (isinstance(length, bool) or int(length) != length or length <= 0):
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if not (0.0 <= max_n_frac <= 1.0):
        raise ValueError(f"max_n_frac must be in [0, 1], got {max_n_frac!r}")
    if isinstance(label_columns, (str, int)):
        label_columns = [label_columns]
    read_labels = require_labels or label_columns is not None
    label_specs = list(label_columns) if label_columns is not None else [4]

    # -- parse the BED file -------------------------------------------------------------------
    records = []  # (line, chrom, start, end, strand, [label values])
    names: dict[str, int] | None = None  # column name -> 0-based index (header and aliases)
    label_idx: list[int] = []
    label_colnames: list[str] = []
    strand_idx: int | None = None
    header_line = None
    last_comment: tuple[int, str] | None = None
    f = _open_text(path, "a BED file")
    try:
        with f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip("\r\n")
                s = line.strip()
                if not s:
                    continue
                if s.startswith("#"):
                    if names is None:
                        last_comment = (lineno, line)
                    continue
                if s.split(None, 1)[0] in ("track", "browser"):
                    continue
                cols = _split_cols(line)
                if names is None:
                    header = None
                    if cols[0].lower() in BED_HEADER_FIRST and len(cols) >= 3 and not cols[1].lstrip("-").isdigit():
                        header = cols
                        header_line = lineno
                    elif last_comment is not None:
                        hcols = _split_cols(last_comment[1].strip().lstrip("#"))
                        if len(hcols) == len(cols) >= 3 and ("\t" in last_comment[1]) == ("\t" in line):
                            header = hcols
                            header_line = last_comment[0]
                        elif len(hcols) == len(cols) >= 3 and hcols[0].lower() in BED_HEADER_FIRST:
                            header = hcols
                            header_line = last_comment[0]
                    ncols = len(header) if header is not None else len(cols)
                    names = {}
                    if header is not None:
                        for i, h in enumerate(header):
                            names.setdefault(h, i)
                    for alias, i in BED_ALIASES.items():
                        if alias not in names and i <= ncols:
                            names[alias] = i - 1
                    for i in range(ncols):
                        names.setdefault(str(i + 1), i)
                    where = header_line if header_line is not None else lineno
                    if read_labels:
                        try:
                            label_idx = [
                                _resolve_column(c, names, ncols, path, where, what="label", min_index=4)
                                for c in label_specs
                            ]
                        except InputError:
                            if require_labels:
                                raise
                            read_labels = False  # prediction input without the label columns
                        label_colnames = [_bed_colname(c, header) for c in label_idx]
                    if header is None:
                        strand_idx = 5
                    else:  # with a header, only a column named "strand"
                        lower = [h.lower() for h in header]
                        strand_idx = lower.index("strand") if "strand" in lower else len(header) + 10**9
                    if header is not None and header_line == lineno:
                        continue
                chrom, start, end = parse_interval(cols, path, lineno)
                strand = cols[strand_idx] if strand_idx < len(cols) else "."
                if strand not in _STRANDS:
                    raise InputError(path, f"strand {strand!r} is not '+', '-' or '.'", line=lineno)
                labels = None
                if read_labels:
                    labels = []
                    for j, name in zip(label_idx, label_colnames):
                        if j >= len(cols):
                            raise InputError(
                                path, f"no label: label column {name!r} is column {j + 1} but the line has "
                                f"{len(cols)} columns", line=lineno
                            )
                        labels.append(cols[j])
                records.append((lineno, chrom, start, end, strand, labels))
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (is this a BED file?)") from None
    except (EOFError, OSError) as e:
        raise InputError(path, f"truncated or corrupt gzip stream ({e})") from None
    if not records:
        raise InputError(path, "no regions in the file")

    # -- sequences ------------------------------------------------------------------------------
    own = not isinstance(genome, FastaFile)
    fa = FastaFile(genome) if own else genome
    try:
        lengths = fa.lengths()
        placed = []  # (record index, chrom, start, end)
        skipped: dict[str, int] = {}
        for k, (lineno, chrom, start, end, strand, _) in enumerate(records):
            clen = lengths.get(chrom)
            if clen is None:
                known = list(lengths)
                hint = ", ".join(known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
                alt = chrom[3:] if chrom.startswith("chr") else "chr" + chrom
                also = f"; did you mean {alt!r}?" if alt in lengths else ""
                raise InputError(
                    path, f"chromosome {chrom!r} is not in the genome {fa.path.name} (it has: {hint}){also}",
                    line=lineno,
                )
            if length is not None:
                start = (start + end) // 2 - length // 2
                end = start + length
            if start < 0 or end > clen:
                reason = "region before chromosome start" if start < 0 else "region past chromosome end"
                if skip_out_of_bounds:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                resized = " (after resizing to {} bp)".format(length) if length is not None else ""
                raise InputError(
                    path, f"region {chrom}:{start}-{end}{resized} is outside {chrom} (length {clen}); "
                    "such regions can be skipped (and counted) instead", line=lineno,
                )
            placed.append((k, chrom, start, end))
        seqs = _fetch_all(fa, placed, lengths)
    finally:
        if own:
            fa.close()

    examples = []
    label_rows = [] if read_labels else None
    n_reason = f"N fraction > {max_n_frac:g}"
    for (k, chrom, start, end), ids in zip(placed, seqs):
        lineno, _, _, _, strand, labels = records[k]
        if max_n_frac < 1.0 and np.count_nonzero(ids == N) > max_n_frac * len(ids):
            skipped[n_reason] = skipped.get(n_reason, 0) + 1
            continue
        if strand == "-":
            ids = np.ascontiguousarray(reverse_complement(ids))
        name = f"{chrom}:{start}-{end}({strand})"
        examples.append(Example(name, ids, _NO_TARGET, lineno, chrom, start, end, strand))
        if label_rows is not None:
            label_rows.append(labels)
    return _finish(path, examples, label_rows, label_colnames, task=task, label_names=label_names,
                   skipped=skipped, what="regions")


def _bed_colname(idx: int, header: list[str] | None) -> str:
    if header is not None and idx < len(header) and header[idx]:
        return header[idx]
    return str(idx + 1)


def _fetch_all(fa, placed, lengths) -> list[np.ndarray]:
    """Sequences of ``placed`` (index, chrom, start, end), in order.  A chromosome with many regions is
    read once whole (one chromosome in memory at a time) instead of region by region."""
    by_chrom: dict[str, list[int]] = {}
    for i, (_, chrom, _, _) in enumerate(placed):
        by_chrom.setdefault(chrom, []).append(i)
    out: list = [None] * len(placed)
    for chrom, idx in by_chrom.items():
        bp = sum(placed[i][3] - placed[i][2] for i in idx)
        if len(idx) * 65536 + bp > lengths[chrom] and len(idx) > 8:
            whole = fa.fetch(chrom, 0, lengths[chrom])
            for i in idx:
                out[i] = whole[placed[i][2] : placed[i][3]].copy()
            del whole
        else:
            for i in idx:
                out[i] = fa.fetch(chrom, placed[i][2], placed[i][3])
    return out


# ----------------------------------------------------------------------------------------------
# Tables


def _find_column(header: list[str], candidates: Sequence[str]) -> int | None:
    lower = [h.strip().lower() for h in header]
    for c in candidates:
        if c in lower:
            return lower.index(c)
    return None


def _looks_like_dna(cell: str) -> bool:
    c = cell.strip()
    return len(c) >= 8 and not (encode(c) == INVALID).any()


def read_table(
    path,
    *,
    sequence_column: str | int | None = None,
    label_columns: Sequence[str | int] | str | int | None = None,
    id_column: str | int | None = None,
    task: str = "auto",
    label_names: Sequence[str] | None = None,
    require_labels: bool = True,
) -> LabeledData:
    """Sequences and labels of a CSV/TSV table (plain or gzip), one example per row.

    Delimiter: ``,`` for ``.csv``, tab for ``.tsv``/``.tab``, otherwise tab if the first line has a
    tab, else ``,``.  The first line is the header; a file whose first line already holds a DNA
    sequence (and no header names) is read as headerless, its columns named ``1``, ``2``, ... (with
    two columns, the other one is the label).  Columns are chosen by name (case-insensitive) or
    1-based number: the sequence column defaults to the first of sequence, seq, seqs, dna; the label
    columns to the first of label, labels, y, target; the id column (example names) to id or name
    when present, else examples are named ``row<N>`` (N = 1-based data row).

    Every row must have as many fields as the header.  Sequences: IUPAC codes in either case
    (ambiguous codes -> N, U -> T); anything else is an InputError naming the line.  With
    ``require_labels=False`` (prediction) a missing label column, default or given, is fine (empty
    targets; ``task`` is the given task, "unlabeled" for "auto"); labels present are still checked.
    """
    path = pathlib.Path(path)
    if isinstance(label_columns, (str, int)):
        label_columns = [label_columns]
    suffix = _base_suffix(path)
    f = _open_text(path, "a CSV/TSV table")
    try:
        with f:
            first = f.readline()
            if suffix == ".csv":
                delim = ","
            elif suffix in (".tsv", ".tab"):
                delim = "\t"
            else:
                delim = "\t" if "\t" in first else ","
            lines = itertools.chain([first], f)
            return _read_rows(path, lines, delim, sequence_column, label_columns, id_column, task,
                              label_names, require_labels)
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (is this a CSV/TSV table?)") from None
    except csv.Error as e:
        raise InputError(path, f"cannot parse the table: {e}") from None
    except (EOFError, OSError) as e:
        raise InputError(path, f"truncated or corrupt gzip stream ({e})") from None


def _read_rows(path, lines, delim, sequence_column, label_columns, id_column, task, label_names,
               require_labels):
    reader = csv.reader(lines, delimiter=delim)
    header = None
    header_line = 1
    prev = 0
    for row in reader:
        header_line, prev = prev + 1, reader.line_num
        if row and any(c.strip() for c in row):
            header = [c.strip() for c in row]
            break
    if header is None:
        raise InputError(path, "the file is empty")
    ncols = len(header)
    headerless = False
    if sequence_column is None and _find_column(header, SEQUENCE_COLUMNS) is None:
        dna = [i for i, c in enumerate(header) if _looks_like_dna(c)]
        if dna:
            headerless = True
            data_first = header
            header = [str(i + 1) for i in range(ncols)]
            sequence_column = dna[0] + 1
            if label_columns is None and ncols == 2:
                label_columns = [2 - dna[0]]
        else:
            raise InputError(
                path, f"no sequence column: looked for {', '.join(SEQUENCE_COLUMNS)}; the columns are "
                f"{', '.join(header)}", line=header_line
            )
    names = {}
    for i, h in enumerate(header):
        names.setdefault(h, i)
    for i in range(ncols):
        names.setdefault(str(i + 1), i)
    where = header_line
    if sequence_column is None:
        seq_idx = _find_column(header, SEQUENCE_COLUMNS)
    else:
        seq_idx = _resolve_column(sequence_column, names, ncols, path, where, what="sequence")
    if label_columns is None:
        j = _find_column(header, LABEL_COLUMNS) if not headerless else None
        if j is None and require_labels:
            raise InputError(
                path, f"no label column: looked for {', '.join(LABEL_COLUMNS)}; the columns are "
                f"{', '.join(header)}; choose one", line=where
            )
        label_idx = [j] if j is not None else []
    else:
        try:
            label_idx = [_resolve_column(c, names, ncols, path, where, what="label") for c in label_columns]
        except InputError:
            if require_labels:
                raise
            label_idx = []  # prediction input without the label columns
    if seq_idx in label_idx:
        raise InputError(path, f"column {header[seq_idx]!r} is both the sequence and a label column", line=where)
    if id_column is None:
        id_idx = _find_column(header, ID_COLUMNS) if not headerless else None
        if id_idx is not None and (id_idx == seq_idx or id_idx in label_idx):
            id_idx = None
    else:
        id_idx = _resolve_column(id_column, names, ncols, path, where, what="id")
    label_colnames = [header[j] for j in label_idx]
    seq_name = header[seq_idx]

    examples = []
    label_rows = [] if label_idx else None
    seen_ids: dict[str, int] = {}

    def add(row, lineno):
        if len(row) != ncols:
            raise InputError(path, f"expected {ncols} fields (as in the {'first line' if headerless else 'header'}), "
                             f"found {len(row)}", line=lineno)
        seq = row[seq_idx].strip()
        if not seq:
            raise InputError(path, f"empty sequence in column {seq_name!r}", line=lineno)
        ids = _encode_checked(seq, path, lineno, f"the sequence in column {seq_name!r}")
        k = len(examples) + 1
        name = row[id_idx].strip() if id_idx is not None else f"row{k}"
        if id_idx is not None:
            if not name:
                raise InputError(path, f"empty id in column {header[id_idx]!r}", line=lineno)
            if name in seen_ids:
                raise InputError(path, f"duplicate id {name!r} (also on line {seen_ids[name]})", line=lineno)
            seen_ids[name] = lineno
        examples.append(Example(name, ids, _NO_TARGET, lineno))
        if label_rows is not None:
            label_rows.append([row[j] for j in label_idx])

    if headerless:
        add(data_first, header_line)
    for row in reader:
        lineno, prev = prev + 1, reader.line_num
        if not row or not any(c.strip() for c in row):
            continue
        add(row, lineno)
    return _finish(path, examples, label_rows, label_colnames, task=task, label_names=label_names,
                   skipped={}, what="rows")


# ----------------------------------------------------------------------------------------------
# FASTA with labels in the headers


def _header_labels(header: str, require_labels: bool):
    """(name, [label values] or None) of a FASTA header line (without '>')."""
    words = header.split()
    if not words:
        return None, None
    for w in words[1:]:
        if w.lower().startswith("label="):
            return words[0], w.split("=", 1)[1].split(",")
    if not require_labels:
        return words[0], None
    if "|" in words[0]:
        name, _, value = words[0].rpartition("|")
        return name, value.split(",")
    if len(words) >= 2:
        return words[0], words[-1].split(",")
    return words[0], None


def read_labeled_fasta(
    path,
    *,
    task: str = "auto",
    label_names: Sequence[str] | None = None,
    require_labels: bool = True,
) -> LabeledData:
    """Sequences of a FASTA file (plain or gzip) with the label in each header line.

    Header forms, tried in this order:

    * ``>name label=VALUE`` -- a ``label=`` word anywhere after the name;
    * ``>name|VALUE`` -- the name (first word) holds ``|``: the label is what follows the last ``|``
      and the example name what precedes it;
    * ``>name ... VALUE`` -- the last whitespace-separated word of the header.

    Several labels (multilabel or regression) are separated by commas: ``label=0,1,1`` or
    ``>name|0.5,1.2``; every record must have the same number, and the tasks are named ``label1``,
    ``label2``, ...  Example names are the record names (unique), and ``Example.line`` is the 1-based
    line of the record's header.  With ``require_labels=False`` only the explicit ``label=`` form is
    read (other header words are descriptions): if no record has one, the data is unlabeled; if some
    have and some don't, that is an error.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        if gz:
            from isal import igzip

            fh = igzip.open(path, "rb")
        else:
            fh = open(path, "rb")
    except OSError as e:
        raise file_error(path, e, "a FASTA file") from None

    recs = []  # [name, header line, labels, parts]
    seen: dict[str, int] = {}
    try:
        with fh:
            for lineno, raw in enumerate(fh, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if raw.startswith(b">"):
                    try:
                        header = raw[1:].decode("utf-8").strip()
                    except UnicodeDecodeError:
                        raise InputError(path, "header line is not UTF-8 text", line=lineno) from None
                    name, labels = _header_labels(header, require_labels)
                    if name is None:
                        raise InputError(path, "header line '>' has no record name", line=lineno)
                    if name in seen:
                        raise InputError(path, f"duplicate record name {name!r} (also on line {seen[name]})",
                                         record=name, line=lineno)
                    seen[name] = lineno
                    if labels is None and require_labels:
                        raise InputError(
                            path, "no label in the header (expected '>name label=VALUE', '>name|VALUE' or "
                            "'>name VALUE')", record=name, line=lineno
                        )
                    recs.append([name, lineno, labels, []])
                    continue
                ids = raw.translate(ENCODE_TABLE, _WS)
                if not ids:
                    continue
                if not recs:
                    raise InputError(path, "not a FASTA file: the first non-blank line does not start with '>'",
                                     line=lineno)
                if b"\xff" in ids:
                    text = raw.decode("latin-1").rstrip("\r\n")
                    stripped = "".join(c for c in text if c not in " \t")
                    i = ids.find(b"\xff")
                    raise InputError(
                        path, f"invalid character {_describe_char(stripped[i])} in sequence "
                        "(not an IUPAC nucleotide code)", record=recs[-1][0], line=lineno
                    )
                recs[-1][3].append(ids)
    except (EOFError, OSError) as e:
        raise InputError(path, f"truncated or corrupt gzip stream ({e})") from None
    if not recs:
        raise InputError(path, "no FASTA records in the file")

    examples = []
    with_labels = [r for r in recs if r[2] is not None]
    if with_labels and len(with_labels) != len(recs):
        missing = next(r for r in recs if r[2] is None)
        raise InputError(path, "no 'label=' in the header, though other records have one", record=missing[0],
                         line=missing[1])
    label_rows = [] if with_labels else None
    n_labels = len(with_labels[0][2]) if with_labels else 0
    for name, lineno, labels, parts in recs:
        if not parts:
            raise InputError(path, "record has no sequence", record=name, line=lineno)
        ids = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
        examples.append(Example(name, ids, _NO_TARGET, lineno))
        if label_rows is not None:
            if len(labels) != n_labels:
                raise InputError(path, f"{len(labels)} labels in the header, the first record has {n_labels}",
                                 record=name, line=lineno)
            label_rows.append(labels)
    colnames = ["label"] if n_labels == 1 else [f"label{i + 1}" for i in range(n_labels)]
    return _finish(path, examples, label_rows, colnames, task=task, label_names=label_names, skipped={},
                   what="records")


# ----------------------------------------------------------------------------------------------
# Dispatch

_BED_SUFFIXES = (".bed", ".narrowpeak", ".broadpeak")
_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".tab")
_FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".ffn", ".seq")
_KWARGS = {
    "bed": {"label_columns", "length", "task", "label_names", "require_labels", "skip_out_of_bounds", "max_n_frac"},
    "table": {"sequence_column", "label_columns", "id_column", "task", "label_names", "require_labels"},
    "fasta": {"task", "label_names", "require_labels"},
}


def _sniff_kind(path: pathlib.Path) -> str:
    f = _open_text(path, "a labeled sequence file")
    try:
        with f:
            for raw in f:
                s = raw.strip()
                if not s:
                    continue
                if s.startswith(">"):
                    return "fasta"
                if s.startswith("#") or s.split(None, 1)[0] in ("track", "browser"):
                    return "bed"
                cols = _split_cols(raw.rstrip("\r\n"))
                if len(cols) >= 3 and cols[1].isdigit() and cols[2].isdigit():
                    return "bed"
                return "table"
    except (UnicodeDecodeError, EOFError, OSError):
        raise InputError(path, "not a text file (expected BED, CSV/TSV or FASTA)") from None
    raise InputError(path, "the file is empty")


def input_kind(path) -> str:
    """"bed", "table" or "fasta": from the extension (``.bed``/``.narrowPeak``/``.broadPeak``;
    ``.csv``/``.tsv``/``.txt``/``.tab``; ``.fa``/``.fasta``/``.fna``/``.fas``/``.ffn``/``.seq``; each
    optionally ``.gz``), else from the first non-blank line of the file ('>' FASTA; '#', track or
    chrom/int/int BED; anything else a table).  InputError for a missing or empty file of unknown kind."""
    path = pathlib.Path(path)
    suffix = _base_suffix(path)
    if suffix in _BED_SUFFIXES:
        return "bed"
    if suffix in _TABLE_SUFFIXES:
        return "table"
    if suffix in _FASTA_SUFFIXES:
        return "fasta"
    if not path.exists():
        raise InputError(path, "file not found")
    return _sniff_kind(path)


def read_labeled(path, *, genome=None, **kw) -> LabeledData:
    """Read labeled sequences from a BED file (needs ``genome``), a CSV/TSV table or a FASTA file.

    The kind comes from the extension (``.bed``/``.narrowPeak``, ``.csv``/``.tsv``/``.txt``/``.tab``,
    ``.fa``/``.fasta``/``.fna``..., each optionally ``.gz``), else from the first line of the file.
    ``kw`` are passed on to :func:`read_regions`, :func:`read_table` or :func:`read_labeled_fasta`;
    options that do not apply to the file's kind (``length`` for a table, ``label_columns`` for FASTA,
    ...) are ignored, so that one call (e.g. with a model's saved options) serves every kind: a
    command line that wants to reject them checks with :func:`input_kind` first.
    """
    path = pathlib.Path(path)
    kind = input_kind(path)
    unknown = set(kw) - set().union(*_KWARGS.values())
    if unknown:
        raise TypeError(f"read_labeled() got unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    kw = {k: v for k, v in kw.items() if k in _KWARGS[kind]}
    if kind == "bed":
        if genome is None:
            raise InputError(path, "BED regions need a genome FASTA to read their sequences from")
        return read_regions(path, genome, **kw)
    if genome is not None:
        raise InputError(path, "a genome is only used with BED regions; this file holds its own sequences")
    if kind == "table":
        return read_table(path, **kw)
    return read_labeled_fasta(path, **kw)
