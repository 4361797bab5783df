"""Reading SMILES sets, canonicalising them with RDKit and preparing them for training."""

from __future__ import annotations

import csv
import gzip
import io
import multiprocessing
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rdkit import Chem, RDLogger

from seqssm.chem.tokenizer import SmilesTokenizer, split_smiles
from seqssm.errors import InputError, SeqssmError, file_error

# RDKit prints one warning per unparsable SMILES to stderr; with generated sets that is thousands of
# lines. Validity is reported as counts instead.
RDLogger.DisableLog("rdApp.*")

SMILES_COLUMNS = ("SMILES", "smiles", "canonical_smiles")
_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_WHAT = "a SMILES file (.smi, .txt, .csv, .tsv, optionally .gz, or a .zip holding one)"

# Lists shorter than this are canonicalised in the calling process: starting workers costs more.
_PARALLEL_MIN = 5000
_CHUNK = 2000


# -- reading ----------------------------------------------------------------------------------

def read_smiles(path, *, column: str | None = None) -> list[str]:
    """SMILES of a file: .smi/.txt (first field of each line), .csv/.tsv (a column), gzipped or in a .zip.

    Text files: blank lines are skipped, and so is a first line reading "smiles" or "SMILES".
    Tables: the column named `column`, else SMILES / smiles / canonical_smiles, else the first one.
    A .zip must hold exactly one file, whose own name tells its format.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".zip":
            return _read_zip(path, column)
        name = path.name
        if name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as raw:
                return _read_stream(path, name[:-3], raw, column)
        with open(path, "rb") as raw:
            return _read_stream(path, name, raw, column)
    except gzip.BadGzipFile:
        raise InputError(path, "not a gzip file (the name ends in .gz)") from None
    except EOFError:
        raise InputError(path, "the gzip stream is truncated") from None
    except OSError as e:
        raise file_error(path, e, _WHAT) from None


def _read_zip(path: Path, column: str | None) -> list[str]:
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(path, "not a zip archive (the name ends in .zip)") from None
    with z:
        members = [m for m in z.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
        if len(members) != 1:
            names = ", ".join(m.filename for m in members[:5]) or "none"
            raise InputError(path, f"a SMILES .zip must hold exactly one file, found {len(members)} ({names})")
        (member,) = members
        inner = member.filename
        label = f"{path}!{inner}"
        with z.open(member) as raw:
            if inner.lower().endswith(".gz"):
                with gzip.GzipFile(fileobj=raw) as unz:
                    return _read_stream(label, inner[:-3], unz, column)
            return _read_stream(label, inner, raw, column)


def _read_stream(label, name: str, raw, column: str | None) -> list[str]:
    """SMILES from the binary stream `raw` of a file named `name` (without .gz); errors name `label`."""
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
    suffix = Path(name).suffix.lower()
    try:
        if suffix in _TABLE_SUFFIXES:
            smiles = _read_table(label, text, _TABLE_SUFFIXES[suffix], column)
        else:
            if column is not None:
                raise SeqssmError(f"{label}: a column name applies to .csv and .tsv files only, not to a SMILES list")
            smiles = _read_lines(text)
    except UnicodeDecodeError:
        raise InputError(label, "not a text file (invalid UTF-8)") from None
    if not smiles:
        raise InputError(label, "no SMILES in the file")
    return smiles


def _read_lines(text) -> list[str]:
    smiles = []
    first = True
    for line in text:
        fields = line.split(None, 1)
        if not fields:
            continue
        if first and fields[0] in ("smiles", "SMILES"):
            first = False
            continue
        first = False
        smiles.append(fields[0])
    return smiles


def _read_table(label, text, delimiter: str, column: str | None) -> list[str]:
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(label, "empty file: no header line") from None
    except csv.Error as e:
        raise InputError(label, f"malformed header: {e}", line=1) from None
    header = [h.strip() for h in header]
    if column is not None:
        if column not in header:
            raise InputError(label, f"no column '{column}' (columns: {', '.join(header)})", line=1)
        index = header.index(column)
    else:
        index = next((header.index(c) for c in SMILES_COLUMNS if c in header), 0)
    name = header[index]
    smiles = []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if index >= len(row):
                raise InputError(label, f"{len(row)} fields, no '{name}' (field {index + 1})", line=reader.line_num)
            value = row[index].strip()
            if not value:
                raise InputError(label, f"empty SMILES in column '{name}'", line=reader.line_num)
            smiles.append(value)
    except csv.Error as e:
        raise InputError(label, f"malformed line: {e}", line=reader.line_num) from None
    return smiles


# -- canonical SMILES -------------------------------------------------------------------------

def canonical(smiles: str) -> str | None:
    """RDKit's canonical SMILES of `smiles`, or None when RDKit cannot parse it (or it is empty)."""
    if not smiles:
        return None
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    return Chem.MolToSmiles(mol)


def _canonical_chunk(chunk: list[str]) -> list[str | None]:
    return [canonical(s) for s in chunk]


def parallel_chunks(func, items: list, n_jobs: int, chunk: int = _CHUNK) -> list:
    """[func(c) for c in chunks of `items`], in order, over `n_jobs` worker processes when worth it."""
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if n_jobs is None or n_jobs < 1:
        raise ValueError(f"n_jobs must be at least 1, got {n_jobs}")
    if n_jobs == 1 or len(items) < _PARALLEL_MIN:
        return [func(c) for c in chunks]
    with multiprocessing.get_context().Pool(min(n_jobs, len(chunks))) as pool:
        return list(pool.imap(func, chunks))


def parallel_map(func, items: list, n_jobs: int, chunk: int = _CHUNK) -> list:
    """[func(chunk) for chunks of `items`] flattened, over `n_jobs` worker processes when worth it.

    `func` maps a list to a list of the same length (one worker call per chunk keeps the
    inter-process traffic low); the result keeps the order of `items`.
    """
    return [r for part in parallel_chunks(func, items, n_jobs, chunk) for r in part]


def canonicalize_many(smiles: list[str], n_jobs: int = 1) -> list[str | None]:
    """canonical() of each SMILES, in order; `n_jobs` worker processes for big lists."""
    return parallel_map(_canonical_chunk, list(smiles), n_jobs)


# -- training sets ----------------------------------------------------------------------------

# Why a SMILES is skipped, in the order the checks run: each skipped SMILES counts once.
SKIP_REASONS = ("unparsable", "untokenizable", "unknown_token", "too_long")
_KEPT = "kept"
_EXAMPLES = 5


@dataclass
class PreparedSet:
    """A training set after parsing, optional canonicalisation and length / vocabulary checks.

    `smiles` keeps the input order and duplicates (`n_duplicates` counts the repeats); `examples`
    holds the first few skipped inputs of each reason in SKIP_REASONS.
    """

    smiles: list[str]
    n_input: int
    n_unparsable: int = 0
    n_untokenizable: int = 0
    n_unknown_token: int = 0
    n_too_long: int = 0
    n_duplicates: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return len(self.smiles)

    @property
    def n_skipped(self) -> int:
        return self.n_input - len(self.smiles)

    def warning(self) -> str | None:
        """One line naming how many were skipped, why, with examples; None when none were."""
        if not self.n_skipped:
            return None
        labels = {"unparsable": "not parsable by RDKit", "untokenizable": "with characters no SMILES token covers",
                  "unknown_token": "with tokens outside the vocabulary", "too_long": "too long"}
        parts = []
        for reason in SKIP_REASONS:
            n = getattr(self, f"n_{reason}")
            if n:
                shown = ", ".join(self.examples.get(reason, [])[:3])
                parts.append(f"{n:,} {labels[reason]} (e.g. {shown})")
        return f"skipped {self.n_skipped:,} of {self.n_input:,} SMILES: " + "; ".join(parts)


def _prepare_one(smiles: str, canonicalize: bool, max_tokens: int, vocab) -> tuple[str, str]:
    """(reason or "kept", the SMILES to keep) for one input."""
    if not smiles:
        return "unparsable", smiles
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return "unparsable", smiles
    if canonicalize:
        smiles = Chem.MolToSmiles(mol)
    tokens = split_smiles(smiles)
    if tokens is None:
        return "untokenizable", smiles
    if vocab is not None and not vocab.issuperset(tokens):
        return "unknown_token", smiles
    if len(tokens) > max_tokens:
        return "too_long", smiles
    return _KEPT, smiles


class _PrepareChunk:
    """Picklable worker: _prepare_one over a chunk."""

    def __init__(self, canonicalize: bool, max_tokens: int, vocab: frozenset | None):
        self.canonicalize, self.max_tokens, self.vocab = canonicalize, max_tokens, vocab

    def __call__(self, chunk: list[str]) -> list[tuple[str, str]]:
        return [_prepare_one(s, self.canonicalize, self.max_tokens, self.vocab) for s in chunk]


def prepare_training_set(smiles: list[str], tokenizer: SmilesTokenizer | None, *, max_tokens: int,
                         canonicalize: bool, n_jobs: int = 1) -> PreparedSet:
    """Keep the SMILES that RDKit parses, that tokenise, whose tokens are all in `tokenizer`'s
    vocabulary (when one is given: fine-tuning keeps its vocabulary) and that have at most
    `max_tokens` tokens (without <bos>/<eos>); with `canonicalize` the kept ones are RDKit-canonical.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    smiles = list(smiles)
    vocab = frozenset(tokenizer.tokens[3:]) if tokenizer is not None else None
    results = parallel_map(_PrepareChunk(canonicalize, max_tokens, vocab), smiles, n_jobs)
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}
    kept = []
    for original, (reason, out) in zip(smiles, results):
        if reason == _KEPT:
            kept.append(out)
            continue
        counts[reason] += 1
        if len(examples[reason]) < _EXAMPLES:
            examples[reason].append(original)
    return PreparedSet(
        smiles=kept, n_input=len(smiles),
        n_unparsable=counts["unparsable"], n_untokenizable=counts["untokenizable"],
        n_unknown_token=counts["unknown_token"], n_too_long=counts["too_long"],
        n_duplicates=len(kept) - len(set(kept)),
        examples={r: e for r, e in examples.items() if e},
    )


# -- randomised SMILES (data augmentation) ----------------------------------------------------

@dataclass
class RandomizedSet:
    """`k` random SMILES of each molecule: ``forms[j][i]`` is the j-th form of molecule i.

    A form is RDKit's "restricted" random SMILES (``doRandom``: a random atom order and traversal,
    RDKit's branch rules kept; Arus-Pous et al., J. Cheminform. 11:71, 2019). A random form longer
    than `max_tokens`, or with a token outside `allowed` (a fine-tuned model's vocabulary), is drawn
    again, a few times; after that the molecule's given SMILES stands in (``n_given`` counts those).
    ``tokens``: every token of every form.
    """

    forms: list[list[str]]
    n_given: int
    tokens: set[str]


_REDRAWS = 8


def _form_seed(seed: int, index: int, attempt: int = 0) -> int:
    # RDKit takes a 31-bit seed; -1 would mean "unseeded", so the result is kept positive.
    return (seed * 1_000_003 + index * 7_919 + attempt * 104_729 + 1) % 2_147_483_647


class _RandomizeChunk:
    """Picklable worker: `k` random forms for each (index, SMILES) of a chunk."""

    def __init__(self, k: int, seed: int, max_tokens: int, allowed: frozenset | None):
        self.k, self.seed, self.max_tokens, self.allowed = k, seed, max_tokens, allowed

    def _fits(self, form: str) -> list[str] | None:
        tokens = split_smiles(form)
        if tokens is None or len(tokens) > self.max_tokens:
            return None
        if self.allowed is not None and not self.allowed.issuperset(tokens):
            return None
        return tokens

    def __call__(self, chunk: list[tuple[int, str]]) -> tuple[list[list[str]], int, set[str]]:
        rows, n_given, seen = [], 0, set()
        for index, smiles in chunk:
            mol = Chem.MolFromSmiles(smiles)
            if mol is None:
                raise InputError(f"SMILES '{smiles}'", "RDKit cannot parse it, so it has no random forms")
            forms = list(Chem.MolToRandomSmilesVect(mol, self.k, randomSeed=_form_seed(self.seed, index)))
            for j, form in enumerate(forms):
                tokens = self._fits(form)
                attempt = 0
                while tokens is None and attempt < _REDRAWS:
                    attempt += 1
                    form = Chem.MolToRandomSmilesVect(mol, 1, randomSeed=_form_seed(self.seed, index, attempt * self.k + j))[0]
                    tokens = self._fits(form)
                if tokens is None:
                    form, tokens = smiles, split_smiles(smiles)
                    n_given += 1
                forms[j] = form
                seen.update(tokens)
            rows.append(forms)
        return rows, n_given, seen


def mix_given(smiles: list[str], forms: list[list[str]], share: float, *, seed: int) -> list[list[str]]:
    """`forms` (``forms[j][i]``: the j-th random form of molecule i) with each molecule's given SMILES
    put back in place of a form with probability `share`, drawn independently per molecule and form
    (seeded). Training on the mixture keeps most of what random forms do against memorisation while
    the model still learns to write the given (typically canonical) form, which it writes validly
    more often."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = np.random.default_rng([seed, 11])
    out = []
    for column in forms:
        if len(column) != len(smiles):
            raise ValueError(f"a form column has {len(column)} entries for {len(smiles)} molecules")
        keep = rng.random(len(smiles)) < share
        out.append([s if k else f for s, f, k in zip(smiles, column, keep)])
    return out


def randomized_smiles(smiles: list[str], k: int, *, seed: int, max_tokens: int, allowed: frozenset | None = None,
                      n_jobs: int = 1) -> RandomizedSet:
    """`k` seeded random SMILES of each molecule in `smiles` (which RDKit must parse and which must
    fit `max_tokens` themselves: they are the fallback). The same (smiles, k, seed) always give the
    same forms, whatever `n_jobs`, so a resumed run trains on the same strings."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    items = list(enumerate(smiles))
    parts = parallel_chunks(_RandomizeChunk(k, seed, max_tokens, allowed), items, n_jobs)
    rows = [row for part_rows, _, _ in parts for row in part_rows]
    forms = [list(column) for column in zip(*rows)] if rows else [[] for _ in range(k)]
    return RandomizedSet(forms=forms, n_given=sum(given for _, given, _ in parts),
                         tokens=set().union(*(tokens for _, _, tokens in parts)))
