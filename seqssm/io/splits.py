"""Train / validation / test splits of labeled data.

* :func:`random_split` -- seeded, stratified by class for classification;
* :func:`chrom_split` -- hold out whole chromosomes (BED regions only);
* :func:`region_split` -- hold out coordinate ranges ("chr20:50,000,001-64,444,167"); an example
  straddling the edge of a held-out range goes to no split and is counted;
* :func:`explicit_split` -- separate train/valid/test files (checks that they agree).

Every split keeps the examples in file order.  Examples left out by a split are counted in
:attr:`Split.dropped` and named in :attr:`Split.description`; nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from seqssm.errors import InputError, SeqssmError
from seqssm.io.labeled import CLASSIFICATION, LabeledData

__all__ = ["Split", "random_split", "chrom_split", "region_split", "explicit_split", "parse_region"]

BOUNDARY = "overlaps the edge of a held-out region"


@dataclass
class Split:
    train: LabeledData
    valid: LabeledData
    test: LabeledData | None
    description: str  # human-readable, for metrics.json
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> examples in no split

    def sizes(self) -> dict[str, int]:
        out = {"train": len(self.train), "valid": len(self.valid)}
        if self.test is not None:
            out["test"] = len(self.test)
        return out


def _sizes_text(parts: dict[str, LabeledData | None]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in parts.items() if v is not None)


def _check_train_classes(train: LabeledData, source: str, how: str) -> None:
    if train.task in CLASSIFICATION and train.has_labels:
        present = [k for k, v in train.class_counts().items() if v > 0]
        if len(present) < 2:
            raise InputError(
                source, f"only one class in the training split ({present[0]!r}) after {how}; "
                "hold out different data"
            )


def _dropped_text(dropped: dict[str, int], data: LabeledData | None = None) -> str:
    out = ""
    if dropped:
        out += "; in no split: " + ", ".join(f"{v} ({k})" for k, v in dropped.items())
    if data is not None and data.skipped:
        out += "; skipped while reading: " + ", ".join(f"{v} ({k})" for k, v in data.skipped.items())
    return out


# ----------------------------------------------------------------------------------------------
# Random


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n into counts proportional to fractions (largest remainder), each >= 1 when n allows."""
    raw = [n * f for f in fractions]
    counts = [int(np.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # every split non-empty: take from the largest
        if counts[i] == 0:
            j = int(np.argmax(counts))
            counts[j] -= 1
            counts[i] += 1
    return counts


def random_split(data: LabeledData, fractions: Sequence[float] = (0.8, 0.1, 0.1), *, seed: int = 0,
                 stratify: bool = True) -> Split:
    """A seeded random split into train/valid(/test) with the given fractions (2 or 3 values summing
    to 1; a test fraction of 0, or only two fractions, gives no test split).

    With ``stratify`` (classification only: binary and multiclass) each class is spread over the
    splits in proportion; multilabel and regression data are split without stratification.  The
    split sizes are exact (largest remainder of ``n * fraction``), every split gets at least one
    example (InputError when there are too few), the result depends only on the data and ``seed``,
    and each split keeps the file order.
    """
    fr = [float(f) for f in fractions]
    if len(fr) == 3 and fr[2] == 0:
        fr = fr[:2]
    if len(fr) not in (2, 3) or any(not np.isfinite(f) or f <= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise SeqssmError(
            f"split fractions must be 2 or 3 positive numbers (train, valid[, test]) summing to 1, got "
            f"{'/'.join(f'{f:g}' for f in fractions)}"
        )
    n = len(data)
    if n < len(fr):
        roles = "/".join(("train", "valid", "test")[: len(fr)])
        raise InputError(data.source, f"{n} example(s): too few for a {roles} split")
    rng = np.random.default_rng(seed)
    strat = stratify and data.task in CLASSIFICATION and data.has_labels
    if strat:
        # Within each class, shuffled examples get evenly spaced positions in [0, 1); sorting every
        # example by position (ties at random) interleaves the classes, so that any cut of the
        # sorted list holds each class in proportion (within one example).
        cls = data.targets()[:, 0].astype(np.int64)
        pos = np.empty(n)
        for c in np.unique(cls):
            members = np.flatnonzero(cls == c)
            members = members[rng.permutation(len(members))]
            pos[members] = (np.arange(len(members)) + rng.random()) / len(members)
        order = np.lexsort((rng.random(n), pos))
    else:
        order = rng.permutation(n)
    counts = _allocate(n, fr)
    cuts = np.cumsum(counts)[:-1]
    parts = [np.sort(p) for p in np.split(order, cuts)]
    train = data.subset(parts[0])
    valid = data.subset(parts[1])
    test = data.subset(parts[2]) if len(parts) == 3 else None
    how = "stratified by class" if strat else "not stratified"
    desc = (
        f"random split of {n} examples (seed {seed}, {how}, fractions {'/'.join(f'{f:g}' for f in fr)}): "
        f"{_sizes_text({'train': train, 'valid': valid, 'test': test})}{_dropped_text({}, data)}"
    )
    return Split(train, valid, test, desc)


# ----------------------------------------------------------------------------------------------
# By position


def _coords(data: LabeledData, what: str):
    missing = next((e for e in data.examples if e.chrom is None or e.start is None or e.end is None), None)
    if missing is not None:
        raise InputError(
            data.source, f"{what} needs examples with genome coordinates (BED regions); example "
            f"{missing.name!r} has none -- use a random split or separate files", line=missing.line
        )
    chroms = np.array([e.chrom for e in data.examples], dtype=object)
    starts = np.fromiter((e.start for e in data.examples), dtype=np.int64, count=len(data))
    ends = np.fromiter((e.end for e in data.examples), dtype=np.int64, count=len(data))
    return chroms, starts, ends


def _chrom_hint(chrom: str, counts: dict[str, int]) -> str:
    shown = ", ".join(f"{c} ({k})" for c, k in list(counts.items())[:8])
    more = f" and {len(counts) - 8} more" if len(counts) > 8 else ""
    alt = chrom[3:] if chrom.startswith("chr") else "chr" + chrom
    also = f"; did you mean {alt!r}?" if alt in counts else ""
    return f"chromosomes with examples: {shown}{more}{also}"


def chrom_split(data: LabeledData, *, valid_chroms: Sequence[str], test_chroms: Sequence[str] = ()) -> Split:
    """Hold out whole chromosomes: examples on ``valid_chroms`` form the validation split, those on
    ``test_chroms`` the test split (None when no test chromosomes are given), all others train.

    InputError if the data has no coordinates, a named chromosome has no examples, a chromosome is
    named for both valid and test, or the training split ends up empty (or with one class)."""
    valid_chroms, test_chroms = list(valid_chroms), list(test_chroms or [])
    if not valid_chroms:
        raise SeqssmError("a chromosome split needs at least one validation chromosome")
    both = sorted(set(valid_chroms) & set(test_chroms))
    if both:
        raise SeqssmError(f"chromosome(s) {', '.join(both)} named for both validation and test")
    chroms, _, _ = _coords(data, "a chromosome split")
    counts: dict[str, int] = {}
    for c in chroms:
        counts[c] = counts.get(c, 0) + 1
    for role, names in (("validation", valid_chroms), ("test", test_chroms)):
        for c in names:
            if c not in counts:
                raise InputError(data.source, f"no examples on chromosome {c!r} (held out for {role}); "
                                 + _chrom_hint(c, counts))
    is_valid = np.isin(chroms, np.array(valid_chroms, dtype=object))
    is_test = np.isin(chroms, np.array(test_chroms, dtype=object)) if test_chroms else np.zeros(len(data), bool)
    train_idx = np.flatnonzero(~is_valid & ~is_test)
    if len(train_idx) == 0:
        raise InputError(data.source, "the training split is empty: every example is on a held-out chromosome")
    train = data.subset(train_idx)
    valid = data.subset(np.flatnonzero(is_valid))
    test = data.subset(np.flatnonzero(is_test)) if test_chroms else None
    _check_train_classes(train, data.source, "holding out chromosomes")
    desc = (
        f"chromosome split of {len(data)} examples: valid = {', '.join(valid_chroms)}"
        + (f"; test = {', '.join(test_chroms)}" if test_chroms else "")
        + f"; train = the other chromosomes: {_sizes_text({'train': train, 'valid': valid, 'test': test})}"
        + _dropped_text({}, data)
    )
    return Split(train, valid, test, desc)


_REGION_RE = re.compile(r"^([0-9,_]+)(?:-([0-9,_]*))?$")


def parse_region(text: str) -> tuple[str, int, int | None]:
    """A samtools-style region -> (chrom, 0-based start, 0-based exclusive end or None for "to the end
    of the chromosome").

    ``"chrom:start-end"`` is 1-based and inclusive (commas allowed in the numbers); ``"chrom:start"``
    or ``"chrom:start-"`` runs to the end of the chromosome; a bare ``"chrom"`` is all of it."""
    t = str(text).strip()
    if not t:
        raise SeqssmError("empty region: expected chrom:start-end (1-based, inclusive) or chrom")
    chrom, sep, rng = t.rpartition(":")
    m = _REGION_RE.match(rng) if sep else None
    if m is None:
        if sep and re.fullmatch(r"[0-9,_\-\s]*", rng):
            raise SeqssmError(f"region {text!r}: expected chrom:start-end (1-based, inclusive) or chrom")
        return t, 0, None
    if not chrom:
        raise SeqssmError(f"region {text!r}: no chromosome name")
    start = int(m.group(1).replace(",", "").replace("_", ""))
    end = int(m.group(2).replace(",", "").replace("_", "")) if m.group(2) else None
    if start < 1 or (end is not None and end < start):
        raise SeqssmError(f"region {text!r}: need 1 <= start <= end (1-based, inclusive)")
    return chrom, start - 1, end


def _show_region(r: tuple[str, int, int | None]) -> str:
    chrom, s, e = r
    if e is None:
        return chrom if s == 0 else f"{chrom}:{s + 1:,}-"
    return f"{chrom}:{s + 1:,}-{e:,}"


def _merge(regions, big: int) -> list[list]:
    out: list[list] = []
    for chrom, s, e in sorted(regions, key=lambda r: (r[0], r[1])):
        e = big if e is None else e
        if out and out[-1][0] == chrom and s <= out[-1][2]:
            out[-1][2] = max(out[-1][2], e)
        else:
            out.append([chrom, s, e])
    return out


def region_split(data: LabeledData, *, valid_regions: Sequence[str], test_regions: Sequence[str] = ()) -> Split:
    """Hold out coordinate ranges: an example lying wholly inside a ``valid_regions`` range goes to
    validation, wholly inside a ``test_regions`` range to test, and an example that overlaps no held-out
    range to train.  An example that straddles the edge of a held-out range (so that its midpoint may
    lie on either side) goes to no split and is counted in ``dropped``.

    Ranges are ``"chrom:start-end"``, 1-based inclusive like samtools (commas allowed), ``"chrom:start"``
    (to the chromosome end), or a bare chromosome name for all of it (see :func:`parse_region`);
    overlapping or touching ranges of one split act as one.  InputError if the data has no
    coordinates, a held-out range holds no example, validation and test ranges overlap, or the
    training split ends up empty (or with one class).  No test ranges: ``test`` is None."""
    regions = {"valid": [parse_region(r) for r in valid_regions],
               "test": [parse_region(r) for r in (test_regions or [])]}
    if not regions["valid"]:
        raise SeqssmError("a region split needs at least one validation region")
    big = np.iinfo(np.int64).max
    for a in regions["valid"]:
        for b in regions["test"]:
            a_end, b_end = (big if a[2] is None else a[2]), (big if b[2] is None else b[2])
            if a[0] == b[0] and a[1] < b_end and b[1] < a_end:
                raise SeqssmError(f"validation region {_show_region(a)} overlaps test region {_show_region(b)}")
    chroms, starts, ends = _coords(data, "a region split")
    counts: dict[str, int] = {}
    for c in chroms:
        counts[c] = counts.get(c, 0) + 1
    n = len(data)
    member = {k: np.zeros(n, dtype=bool) for k in regions}
    touched = np.zeros(n, dtype=bool)
    for role, rs in regions.items():
        for r in rs:
            chrom, s, e = r
            e = big if e is None else e
            if not ((chroms == chrom) & (starts >= s) & (ends <= e)).any():
                why = _chrom_hint(chrom, counts) if chrom not in counts else "pick a larger range"
                raise InputError(
                    data.source, f"held-out {'validation' if role == 'valid' else 'test'} region "
                    f"{_show_region(r)} contains no example; {why}"
                )
        for chrom, s, e in _merge(rs, big):  # overlapping or adjacent ranges of one split act as one
            on = chroms == chrom
            member[role] |= on & (starts >= s) & (ends <= e)
            touched |= on & (starts < e) & (ends > s)
    boundary = touched & ~member["valid"] & ~member["test"]
    train_mask = ~touched
    if not train_mask.any():
        raise InputError(data.source, "the training split is empty: every example is in or at a held-out region")
    train = data.subset(np.flatnonzero(train_mask))
    valid = data.subset(np.flatnonzero(member["valid"]))
    test = data.subset(np.flatnonzero(member["test"])) if regions["test"] else None
    _check_train_classes(train, data.source, "holding out regions")
    dropped = {BOUNDARY: int(boundary.sum())} if boundary.any() else {}
    desc = (
        f"region split of {n} examples: valid = {', '.join(map(_show_region, regions['valid']))}"
        + (f"; test = {', '.join(map(_show_region, regions['test']))}" if regions["test"] else "")
        + f"; train = outside them: {_sizes_text({'train': train, 'valid': valid, 'test': test})}"
        + _dropped_text(dropped, data)
    )
    return Split(train, valid, test, desc, dropped)


# ----------------------------------------------------------------------------------------------
# Explicit files


def explicit_split(train: LabeledData, valid: LabeledData, test: LabeledData | None = None) -> Split:
    """Separate files as the splits.  Read the valid/test files with ``task=train.task`` and
    ``label_names=train.label_names`` so that class indices agree; InputError (naming the file) when
    a split is empty, has no labels, or its task or label names differ from the training file's."""
    for role, d in (("train", train), ("valid", valid), ("test", test)):
        if d is None:
            continue
        if len(d) == 0:
            raise InputError(d.source, f"the {role} file has no examples")
        if not d.has_labels:
            raise InputError(d.source, f"the {role} file has no labels")
        if d is not train:
            if d.task != train.task:
                raise InputError(d.source, f"task {d.task} differs from the training file's ({train.task}, "
                                 f"{train.source})")
            if list(d.label_names) != list(train.label_names):
                what = "classes" if train.task in CLASSIFICATION else "tasks"
                raise InputError(
                    d.source, f"{what} ({', '.join(d.label_names)}) differ from the training file's "
                    f"({', '.join(train.label_names)}); read it with the training label names"
                )
    desc = "explicit files: " + ", ".join(
        f"{role} {d.source} ({len(d)})" for role, d in (("train", train), ("valid", valid), ("test", test))
        if d is not None
    )
    return Split(train, valid, test, desc)
