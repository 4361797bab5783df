"""Training data for next-base language modelling: FASTA in memory, a held-out split, windows.

The whole training set is held in memory as uint8 id arrays (one per contiguous stretch of a
record), which is what a chromosome-scale job needs (human chr20 is 63 MB).

Held-out split
  * ``valid_regions``: contiguous regions ``NAME:START-END`` (1-based, inclusive, as samtools
    writes them; ``NAME`` alone is the whole record). They are cut out of the training records:
    training windows are sampled only from the stretches around them and never overlap them.
  * ``valid_files``: whole FASTA files held out.
  * neither: the last 5% of the largest training record is held out (the split's description
    says so, and the pipeline logs it).

Windows
  Training windows of ``seq_len`` bases start at uniformly random positions of the training
  stretches; the batch of a given (seed, step, micro-step) is a pure function of those three
  numbers, so a resumed run draws exactly the batches it would have drawn. Windows whose
  bases are more than half N are redrawn. Validation windows are fixed: consecutive,
  non-overlapping windows over each held-out stretch; the last, shorter one is right-padded
  with PAD. Mostly-N validation windows are skipped.

Targets and the two held-out scores
  The model reads a window and predicts base ``t`` from bases ``0..t-1`` (t = 1..seq_len-1).
  Only targets that are A, C, G or T count: a target that is N (unknown) or PAD is ignored by
  the loss and by every perplexity. Perplexity is ``exp(mean NLL per predicted base)``.

  * ``acgt`` positions: every ACGT target with t >= 1.
  * ``shared`` positions: every ACGT target with t >= SHARED_CONTEXT whose SHARED_CONTEXT
    preceding bases in the window are all ACGT. The k-mer Markov baseline
    (seqssm.training.markov), for every order k <= SHARED_CONTEXT, is scored on exactly this
    set, so the neural and Markov perplexities on it are directly comparable (the neural model
    sees the whole window prefix, an order-k Markov model the k preceding bases).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from seqssm.errors import InputError, SeqssmError
from seqssm.tokenizers.dna import A, PAD, T

SHARED_CONTEXT = 10  # positions scored by both the neural model and every Markov order 0..10
DEFAULT_VALID_FRACTION = 0.05
MAX_N_FRACTION = 0.5  # a window with more N than this (among its real bases) is skipped
_MAX_REDRAWS = 1000


def is_acgt(ids: np.ndarray) -> np.ndarray:
    """Boolean mask of the A/C/G/T ids (7..10)."""
    return (ids >= A) & (ids <= T)


# ----------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class Region:
    """A held-out region: ``start``/``end`` are 0-based, end-exclusive (``end=None``: record end)."""

    name: str
    start: int = 0
    end: int | None = None

    def __str__(self) -> str:
        if self.start == 0 and self.end is None:
            return self.name
        end = "" if self.end is None else str(self.end)
        return f"{self.name}:{self.start + 1}-{end}"


_REGION_RE = re.compile(r"^(?P<name>.+?):(?P<start>[0-9,_]+)?-(?P<end>[0-9,_]+)?$")


def parse_region(text: str) -> Region:
    """Parse ``NAME:START-END`` (1-based, inclusive), ``NAME:START-`` or ``NAME``.

    Thousands separators (``,`` or ``_``) are allowed in the numbers.
    """
    s = text.strip()
    if not s:
        raise SeqssmError("--valid-region: empty region")
    m = _REGION_RE.match(s)
    if m is None:
        if ":" in s and "-" in s.rsplit(":", 1)[1]:  # a range that does not parse, e.g. chr1:1k-2k
            raise SeqssmError(f"--valid-region {text!r}: expected NAME:START-END (1-based, inclusive)")
        return Region(s)  # a bare record name (which may itself contain ':')
    name = m.group("name")
    try:
        start = int(m.group("start").replace(",", "").replace("_", "")) if m.group("start") else 1
        end = int(m.group("end").replace(",", "").replace("_", "")) if m.group("end") else None
    except ValueError:
        raise SeqssmError(f"--valid-region {text!r}: expected NAME:START-END (1-based, inclusive)") from None
    if start < 1:
        raise SeqssmError(f"--valid-region {text!r}: positions are 1-based; START must be >= 1")
    if end is not None and end < start:
        raise SeqssmError(f"--valid-region {text!r}: END ({end}) is before START ({start})")
    return Region(name, start - 1, end)


# ----------------------------------------------------------------------------- records


@dataclass
class Record:
    """One FASTA record in memory."""

    file: str
    name: str
    ids: np.ndarray  # uint8 ids, A=7 C=8 G=9 T=10 N=11


@dataclass
class Stretch:
    """A contiguous piece of a record (training or held-out)."""

    file: str
    name: str
    start: int  # 0-based offset in the record
    ids: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.ids)

    def describe(self) -> dict:
        return {"file": self.file, "record": self.name, "start": self.start, "end": self.end,
                "region": f"{self.name}:{self.start + 1}-{self.end}", "bases": int(len(self.ids))}


def read_fasta(path: str | Path) -> list[Record]:
    """Read every record of a FASTA file (plain or gzip) with seqssm.io.FastaFile."""
    from seqssm.io import FastaFile

    f = FastaFile(path)
    out = [Record(str(path), name, np.ascontiguousarray(ids, dtype=np.uint8)) for name, ids in f.records()]
    if not out:
        raise InputError(path, "no FASTA records")
    return out


# ----------------------------------------------------------------------------- split


@dataclass
class DataSplit:
    """Training stretches, held-out stretches, and a JSON description of how they were made."""

    train: list[Stretch]
    valid: list[Stretch]
    seq_len: int
    description: dict = field(default_factory=dict)

    @property
    def train_bases(self) -> int:
        return int(sum(len(s.ids) for s in self.train))

    @property
    def valid_bases(self) -> int:
        return int(sum(len(s.ids) for s in self.valid))


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _file_fingerprint(path: str) -> dict:
    p = Path(path)
    return {"path": str(path), "name": p.name, "size": p.stat().st_size if p.exists() else None}


def make_split(
    train_records: Sequence[Record],
    *,
    seq_len: int,
    valid_regions: Iterable[Region | str] = (),
    valid_records: Sequence[Record] = (),
    default_valid_fraction: float = DEFAULT_VALID_FRACTION,
) -> DataSplit:
    """Cut the training records around the held-out regions; see the module docstring.

    ``valid_records`` are whole held-out records (from ``--valid-file``); ``valid_regions``
    name records among ``train_records``. With neither, the last ``default_valid_fraction``
    of the largest training record is held out.
    """
    if seq_len < SHARED_CONTEXT + 2:
        raise SeqssmError(f"--seq-len {seq_len} is too short: at least {SHARED_CONTEXT + 2} bases")
    if not train_records:
        raise SeqssmError("no training records")
    regions = [parse_region(r) if isinstance(r, str) else r for r in valid_regions]

    by_name: dict[str, list[Record]] = {}
    for rec in train_records:
        by_name.setdefault(rec.name, []).append(rec)

    rule: str
    if not regions and not valid_records:
        largest = max(train_records, key=lambda r: len(r.ids))
        n = len(largest.ids)
        hold = max(int(round(n * default_valid_fraction)), 1)
        if len(by_name[largest.name]) > 1:
            raise SeqssmError(
                f"record name '{largest.name}' occurs in several training files; give --valid-region "
                "or --valid-file explicitly")
        regions = [Region(largest.name, n - hold, n)]
        rule = (f"default: last {default_valid_fraction:.0%} of the largest record "
                f"({largest.name}:{n - hold + 1}-{n}, {hold} bp)")
    else:
        parts = []
        if regions:
            parts.append("regions " + ", ".join(str(r) for r in regions))
        if valid_records:
            parts.append("files " + ", ".join(sorted({r.file for r in valid_records})))
        rule = "held out: " + "; ".join(parts)

    # Resolve regions to (record, [start, end)) and validate them.
    cuts: dict[int, list[tuple[int, int]]] = {}
    for reg in regions:
        recs = by_name.get(reg.name)
        if not recs:
            names = sorted(by_name)
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} records)" if len(names) > 8 else "")
            raise SeqssmError(f"--valid-region {reg}: no record named '{reg.name}' in the training FASTA "
                              f"(records: {shown})")
        if len(recs) > 1:
            raise SeqssmError(f"--valid-region {reg}: record name '{reg.name}' occurs in several training "
                              "files; the region is ambiguous")
        rec = recs[0]
        n = len(rec.ids)
        end = n if reg.end is None else reg.end
        if reg.start >= n or end > n:
            raise SeqssmError(f"--valid-region {reg}: outside record '{reg.name}' ({n} bp; positions 1-{n})")
        cuts.setdefault(id(rec), []).append((reg.start, end))

    train: list[Stretch] = []
    valid: list[Stretch] = []
    short_dropped = 0
    for rec in train_records:
        held = _merge(cuts.get(id(rec), []))
        pos = 0
        for s, e in held:
            if s > pos:
                train.append(Stretch(rec.file, rec.name, pos, rec.ids[pos:s]))
            valid.append(Stretch(rec.file, rec.name, s, rec.ids[s:e]))
            pos = e
        if pos < len(rec.ids):
            train.append(Stretch(rec.file, rec.name, pos, rec.ids[pos:]))
    for rec in valid_records:
        valid.append(Stretch(rec.file, rec.name, 0, rec.ids))

    usable = [s for s in train if len(s.ids) >= seq_len]
    short_dropped = sum(len(s.ids) for s in train if len(s.ids) < seq_len)
    if not usable:
        longest = max((len(s.ids) for s in train), default=0)
        if longest == 0:
            raise SeqssmError("no training data left: the held-out regions cover every training record")
        raise SeqssmError(f"no training data left: --seq-len {seq_len} is longer than every training stretch "
                          f"(longest {longest} bp after removing the held-out regions)")
    split = DataSplit(usable, valid, seq_len)
    n_acgt_train = int(sum(int(is_acgt(s.ids).sum()) for s in usable))
    n_acgt_valid = int(sum(int(is_acgt(s.ids).sum()) for s in valid))
    if n_acgt_train == 0:
        raise SeqssmError("no training data left: the training stretches contain no A, C, G or T")
    if n_acgt_valid == 0:
        raise SeqssmError("the held-out data contains no A, C, G or T bases to score")
    split.description = {
        "rule": rule,
        "seq_len": seq_len,
        "train_files": [_file_fingerprint(f) for f in dict.fromkeys(r.file for r in train_records)],
        "valid_files": [_file_fingerprint(f) for f in dict.fromkeys(r.file for r in valid_records)],
        "valid_regions": [str(r) for r in regions],
        "records": {r.name: int(len(r.ids)) for r in train_records},
        "train": [s.describe() for s in usable],
        "valid": [s.describe() for s in valid],
        "train_bases": split.train_bases,
        "train_acgt_bases": n_acgt_train,
        "train_bases_dropped_short": int(short_dropped),
        "valid_bases": split.valid_bases,
        "valid_acgt_bases": n_acgt_valid,
        "targets": "next base; targets that are N or PAD are ignored",
        "shared_context": SHARED_CONTEXT,
    }
    return split


def load_split(
    fasta: Sequence[str | Path],
    *,
    seq_len: int,
    valid_regions: Iterable[Region | str] = (),
    valid_files: Sequence[str | Path] = (),
    default_valid_fraction: float = DEFAULT_VALID_FRACTION,
) -> DataSplit:
    """Read the FASTA files and make the split (see make_split)."""
    if not fasta:
        raise SeqssmError("no training FASTA given")
    train_paths = [str(p) for p in fasta]
    valid_paths = [str(p) for p in valid_files]
    both = {str(Path(p).resolve()) for p in train_paths} & {str(Path(p).resolve()) for p in valid_paths}
    if both:
        raise SeqssmError(f"{sorted(both)[0]} is given both as training FASTA and as --valid-file")
    regions = [parse_region(r) if isinstance(r, str) else r for r in valid_regions]
    train_records = [rec for p in train_paths for rec in read_fasta(p)]
    valid_records = [rec for p in valid_paths for rec in read_fasta(p)]
    return make_split(train_records, seq_len=seq_len, valid_regions=regions, valid_records=valid_records,
                      default_valid_fraction=default_valid_fraction)


# ----------------------------------------------------------------------------- windows


class WindowSampler:
    """Uniformly random training windows; batch (seed, step, micro) is reproducible on its own."""

    def __init__(self, stretches: Sequence[Stretch], seq_len: int, seed: int):
        self.stretches = list(stretches)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        starts = np.array([len(s.ids) - self.seq_len + 1 for s in self.stretches], dtype=np.int64)
        if (starts <= 0).any():
            raise SeqssmError("a training stretch is shorter than --seq-len")
        self._cum = np.cumsum(starts)
        self.n_starts = int(self._cum[-1])

    def _window(self, rng: np.random.Generator) -> np.ndarray:
        L = self.seq_len
        for _ in range(_MAX_REDRAWS):
            g = int(rng.integers(0, self.n_starts))
            i = int(np.searchsorted(self._cum, g, side="right"))
            start = g - (int(self._cum[i - 1]) if i else 0)
            w = self.stretches[i].ids[start:start + L]
            if (~is_acgt(w)).sum() <= MAX_N_FRACTION * L:
                return w
        raise SeqssmError(f"training data is mostly N: {_MAX_REDRAWS} random windows in a row were more than "
                          f"{MAX_N_FRACTION:.0%} N")

    def batch(self, step: int, micro: int, batch_size: int) -> np.ndarray:
        """uint8 [batch_size, seq_len] for optimizer step ``step`` (0-based), micro-batch ``micro``."""
        rng = np.random.default_rng([self.seed, int(step), int(micro)])
        return np.stack([self._window(rng) for _ in range(batch_size)])


def validation_windows(stretches: Sequence[Stretch], seq_len: int) -> np.ndarray:
    """Fixed non-overlapping windows over the held-out stretches, uint8 [W, seq_len].

    The last window of a stretch may be shorter and is right-padded with PAD (the model is
    causal, so padding after a base cannot change its prediction; PAD targets are ignored).
    Windows with more than half N among their real bases, or with fewer than 2 real bases, are
    skipped.
    """
    L = int(seq_len)
    out = []
    for s in stretches:
        ids = s.ids
        n = len(ids)
        full = n // L
        if full:
            w = ids[: full * L].reshape(full, L)
            nonacgt = (~is_acgt(w)).sum(axis=1)
            out.append(w[nonacgt <= MAX_N_FRACTION * L])
        tail = ids[full * L:]
        if len(tail) >= 2 and (~is_acgt(tail)).sum() <= MAX_N_FRACTION * len(tail):
            pad = np.full(L, PAD, dtype=np.uint8)
            pad[: len(tail)] = tail
            out.append(pad[None])
    if not out:
        return np.zeros((0, L), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.uint8)


def target_masks(windows: np.ndarray, context: int = SHARED_CONTEXT) -> tuple[np.ndarray, np.ndarray]:
    """(acgt, shared) boolean masks [W, L-1] over targets ``windows[:, 1:]``.

    acgt[w, t-1]: target t is A/C/G/T. shared[w, t-1]: additionally t >= context and the
    ``context`` bases before t are all A/C/G/T (the Markov baseline's position set).
    """
    ok = is_acgt(np.asarray(windows))
    W, L = ok.shape
    acgt = ok[:, 1:].copy()
    if context <= 0:
        return acgt, acgt.copy()
    # bad[w, t] = number of non-ACGT bases in windows[w, :t]; target t is shared when t >= context
    # and windows[w, t-context : t+1] holds no non-ACGT base.
    bad = np.zeros((W, L + 1), dtype=np.int32)
    np.cumsum(~ok, axis=1, out=bad[:, 1:])
    shared = np.zeros((W, L - 1), dtype=bool)
    if L > context:
        t = np.arange(context, L)
        shared[:, context - 1:] = (bad[:, t + 1] - bad[:, t - context]) == 0
    return acgt, shared
