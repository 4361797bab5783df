"""SMILES tokenizer: a regular-expression split into atoms, bonds, branches and ring closures."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from seqssm.errors import InputError, file_error
from seqssm.io.atomic import atomic_write_text

VOCAB_FILE = "vocab.json"
VOCAB_FORMAT = "seqssm-smiles-vocab"
VOCAB_VERSION = 1

# One alternative per SMILES token. Order matters where alternatives share a prefix: the
# two-letter organic elements before their one-letter prefixes (Cl before C, Br before B),
# '%nn' ring closures before single digits, '->' before '-', '@@' before '@'. Anything in
# brackets is one atom token: every element, isotope, chirality, hydrogen count, charge, class.
SMILES_PATTERN = re.compile(
    r"\[[^\[\]]+\]"          # bracket atom: [nH] [C@@H] [O-] [2H] [Na+] [se]
    r"|Cl|Br"                # two-letter elements of the organic subset
    r"|[BCNOPSFI]"           # one-letter elements of the organic subset
    r"|[bcnops]"             # aromatic organic subset
    r"|%\([0-9]+\)|%[0-9]{2}|[0-9]"  # ring closures: %(nnn), %nn, n
    r"|->|<-"                # dative bonds, which RDKit writes for metal complexes
    r"|[-=#$:/\\]"           # bonds
    r"|[()]"                 # branches
    r"|\."                   # disconnected parts
    r"|\*"                   # wildcard atom
    r"|@@|@"                 # tetrahedral stereo written outside brackets
)

_SMILES_SHOWN = 120  # longer SMILES are cut in error messages to keep them one readable line


def split_smiles(smiles: str) -> list[str] | None:
    """The tokens of `smiles`, or None when some character belongs to no token."""
    tokens = SMILES_PATTERN.findall(smiles)
    # findall skips characters no alternative matches: the lengths add up only when none was.
    if sum(map(len, tokens)) != len(smiles):
        return None
    return tokens


def _shown(smiles: str) -> str:
    return smiles if len(smiles) <= _SMILES_SHOWN else smiles[:_SMILES_SHOWN] + "..."


def smiles_error(smiles: str, message: str) -> InputError:
    """A one-line InputError about one SMILES string (no file known)."""
    return InputError(f"SMILES '{_shown(smiles)}'", message)


def _untokenizable(smiles: str) -> InputError:
    pos = 0
    for m in SMILES_PATTERN.finditer(smiles):
        if m.start() != pos:
            break
        pos = m.end()
    return smiles_error(smiles, f"cannot tokenise the character {smiles[pos]!r} at position {pos + 1}")


class SmilesTokenizer:
    """Maps SMILES strings to token ids and back; ids 0, 1, 2 are <pad>, <bos>, <eos>."""

    PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
    SPECIALS = (PAD, BOS, EOS)
    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(self, tokens: list[str]):
        """`tokens` is the whole vocabulary in id order, starting with <pad>, <bos>, <eos>."""
        tokens = list(tokens)
        if tuple(tokens[:3]) != self.SPECIALS:
            raise ValueError(f"the vocabulary must start with {list(self.SPECIALS)}, not {tokens[:3]}")
        seen: set[str] = set()
        for t in tokens:
            if not isinstance(t, str):
                raise ValueError(f"vocabulary token {t!r} is not a string")
            if t in seen:
                raise ValueError(f"vocabulary token {t!r} appears twice")
            seen.add(t)
        for t in tokens[3:]:
            # Every entry must be exactly one token of the regex, else it could never be produced.
            if split_smiles(t) != [t]:
                raise ValueError(f"vocabulary entry {t!r} is not a single SMILES token")
        self._tokens = tokens
        self._ids = {t: i for i, t in enumerate(tokens)}
        # decode_batch works on bytes: all tokens concatenated, with each one's offset and length;
        # the extra last entry (length 0) stands for dropped positions.
        encoded = [t.encode("utf-8") for t in tokens] + [b""]
        self._bytes = np.frombuffer(b"".join(encoded) or b"\0", dtype=np.uint8)
        self._len = np.array([len(e) for e in encoded], dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(self._len)[:-1]])

    @classmethod
    def build(cls, smiles: Iterable[str]) -> SmilesTokenizer:
        """Vocabulary of the specials followed by every token seen, sorted (deterministic)."""
        seen: set[str] = set()
        for s in smiles:
            tokens = split_smiles(s)
            if tokens is None:
                raise _untokenizable(s)
            seen.update(tokens)
        return cls(list(cls.SPECIALS) + sorted(seen))

    @classmethod
    def load(cls, path) -> SmilesTokenizer:
        """Read a vocabulary from a model directory (its vocab.json) or from the vocab.json file."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise file_error(path, e, "a SMILES vocabulary (vocab.json)") from None
        except UnicodeDecodeError:
            raise InputError(path, "not a SMILES vocabulary: not UTF-8 text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, f"not valid JSON: {e.msg}", line=e.lineno) from None
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise InputError(path, f"not a SMILES vocabulary (expected \"format\": \"{VOCAB_FORMAT}\")")
        if data.get("version") != VOCAB_VERSION:
            raise InputError(path, f"unsupported vocabulary version {data.get('version')!r} "
                                   f"(this seqssm reads version {VOCAB_VERSION})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise InputError(path, "\"tokens\" must be a list of strings")
        try:
            return cls(tokens)
        except ValueError as e:
            raise InputError(path, str(e)) from None

    def save(self, directory) -> Path:
        """Write directory/vocab.json atomically (temporary file, then rename); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / VOCAB_FILE
        payload = {"format": VOCAB_FORMAT, "version": VOCAB_VERSION, "tokens": self._tokens}
        atomic_write_text(target, json.dumps(payload, indent=1) + "\n")
        return target

    # -- vocabulary ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, SmilesTokenizer) and self._tokens == other._tokens

    def __repr__(self) -> str:
        return f"SmilesTokenizer({len(self)} tokens)"

    @property
    def tokens(self) -> list[str]:
        """The vocabulary in id order (a copy)."""
        return list(self._tokens)

    def token_to_id(self, token: str) -> int:
        """Id of `token`; KeyError when it is not in the vocabulary."""
        return self._ids[token]

    def id_to_token(self, i: int) -> str:
        """Token of id `i`; IndexError when out of range."""
        if not 0 <= i < len(self._tokens):
            raise IndexError(f"token id {i} outside the vocabulary (0..{len(self._tokens) - 1})")
        return self._tokens[i]

    # -- strings <-> ids ----------------------------------------------------------------------

    def tokenize(self, smiles: str) -> list[str]:
        """Split `smiles` into tokens; InputError naming the SMILES for a character no token covers."""
        tokens = split_smiles(smiles)
        if tokens is None:
            raise _untokenizable(smiles)
        return tokens

    def encode(self, smiles: str, *, bos: bool = True, eos: bool = True) -> list[int]:
        """Token ids of `smiles`; InputError naming the SMILES and the token when one is not in the vocabulary."""
        ids = [self.bos_id] if bos else []
        ids_of = self._ids
        for t in self.tokenize(smiles):
            i = ids_of.get(t)
            if i is None:
                raise smiles_error(smiles, f"token '{t}' is not in the vocabulary ({len(self)} tokens)")
            ids.append(i)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        """The SMILES of `ids`: <bos> and <pad> are skipped, decoding stops at the first <eos>."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        n = len(self._tokens)
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == self.pad_id or i == self.bos_id:
                continue
            if not 0 <= i < n:
                raise IndexError(f"token id {i} outside the vocabulary (0..{n - 1})")
            out.append(self._tokens[i])
        return "".join(out)

    def encode_batch(self, smiles: list[str], *, max_len: int | None = None
                     ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Ids [B, L] with <bos> ... <eos>, right-padded with <pad> to the longest, and the lengths [B].

        `max_len` bounds L (with <bos> and <eos>); a longer SMILES is an InputError naming it.
        """
        encoded = [self.encode(s) for s in smiles]
        lengths = [len(e) for e in encoded]
        if max_len is not None:
            for s, n in zip(smiles, lengths):
                if n > max_len:
                    raise smiles_error(s, f"{n} tokens with <bos> and <eos>, more than the maximum {max_len}")
        width = max(lengths, default=0)
        out = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        for row, e in enumerate(encoded):
            out[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        return out, torch.tensor(lengths, dtype=torch.long)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """decode() of every row of `ids` [B, L], vectorised over the batch."""
        a = ids.detach().to("cpu", torch.long).numpy()
        if a.ndim != 2:
            raise ValueError(f"decode_batch expects a [batch, length] tensor, got shape {tuple(a.shape)}")
        n = len(self._tokens)
        if a.size and (a.min() < 0 or a.max() >= n):
            bad = a[(a < 0) | (a >= n)][0]
            raise IndexError(f"token id {bad} outside the vocabulary (0..{n - 1})")
        out: list[str] = []
        # Blocks of rows keep the temporaries small: fresh large arrays cost page faults that
        # take longer than the arithmetic.
        for i in range(0, a.shape[0], self._DECODE_ROWS):
            out += self._decode_block(a[i:i + self._DECODE_ROWS])
        return out

    _DECODE_ROWS = 4096

    def _decode_block(self, a: np.ndarray) -> list[str]:
        n = len(self._tokens)
        is_eos = a == self.eos_id
        # Column of the first <eos> per row (the row length when there is none).
        first_eos = np.where(is_eos.any(1), is_eos.argmax(1) if a.shape[1] else 0, a.shape[1])
        keep = (np.arange(a.shape[1])[None, :] < first_eos[:, None]) & (a != self.pad_id) & (a != self.bos_id)
        a = np.where(keep, a, n).ravel()
        lengths = self._len[a]
        # Every output byte: the token it belongs to, and its offset inside that token.
        element_start = np.cumsum(lengths) - lengths
        offset = np.arange(int(lengths.sum())) - np.repeat(element_start, lengths)
        chars = self._bytes[np.repeat(self._start[a], lengths) + offset].tobytes()
        ends = np.cumsum(lengths.reshape(keep.shape).sum(1)).tolist()
        starts = [0] + ends[:-1]
        return [chars[s:e].decode("utf-8") for s, e in zip(starts, ends)]
