"""Character-level DNA tokenizer with the ids of the published HyenaDNA and Caduceus checkpoints.

Everything is a lookup table applied with numpy or torch indexing: no Python loop per base.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLS, SEP, BOS, MASK, PAD, RESERVED, UNK = 0, 1, 2, 3, 4, 5, 6
A, C, G, T, N = 7, 8, 9, 10, 11
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
BASES = "ACGTN"
VOCAB_SIZE = 12
INVALID = 255  # marks a byte that is not an IUPAC nucleotide code

# IUPAC ambiguity codes (and U, read as T) are valid input; the ambiguous ones become N.
_IUPAC_AMBIGUOUS = "RYSWKMBDHVN"

ENCODE_LUT = np.full(256, INVALID, dtype=np.uint8)
for _case in (str.upper, str.lower):
    for _b, _i in zip("ACGT", (A, C, G, T)):
        ENCODE_LUT[ord(_case(_b))] = _i
    ENCODE_LUT[ord(_case("U"))] = T
    for _b in _IUPAC_AMBIGUOUS:
        ENCODE_LUT[ord(_case(_b))] = N
# The same table as 256 bytes, for bytes.translate (one C pass, deletes newlines in passing).
ENCODE_TABLE = ENCODE_LUT.tobytes()

# Ids -> ids of the complementary base; special tokens and N map to themselves.
COMPLEMENT_LUT = np.arange(256, dtype=np.uint8)
COMPLEMENT_LUT[[A, C, G, T]] = [T, G, C, A]

_DECODE = np.frombuffer(b"<>^*_?" + b"?" + BASES.encode(), dtype=np.uint8)  # 12 printable chars


def encode(seq: str | bytes | bytearray | memoryview) -> np.ndarray:
    """Bases -> uint8 ids. Unknown characters become INVALID (255); callers decide what that means."""
    if isinstance(seq, str):
        seq = seq.encode("ascii", errors="replace")
    return ENCODE_LUT[np.frombuffer(seq, dtype=np.uint8)]


def decode(ids) -> str:
    """Ids -> string; special tokens are shown as single punctuation characters."""
    arr = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError("decode: ids outside the DNA vocabulary")
    return _DECODE[arr].tobytes().decode("ascii")


def reverse_complement(ids):
    """Reverse complement along the last axis, for numpy arrays or torch tensors of ids."""
    if isinstance(ids, torch.Tensor):
        lut = torch.as_tensor(COMPLEMENT_LUT[:VOCAB_SIZE], dtype=ids.dtype, device=ids.device)
        return lut[ids.long()].flip(-1)
    arr = np.asarray(ids)
    return COMPLEMENT_LUT[arr][..., ::-1].astype(arr.dtype, copy=False)


@dataclass(frozen=True)
class DNATokenizer:
    """The tokenizer saved beside every seqssm DNA model (tokenizer.json)."""

    model_max_length: int = 1024
    add_bos: bool = False
    add_eos: bool = False

    vocab_size: int = VOCAB_SIZE
    pad_id: int = PAD
    mask_id: int = MASK
    bos_id: int = BOS
    eos_id: int = SEP

    def vocab(self) -> dict[str, int]:
        return {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, **{b: A + i for i, b in enumerate(BASES)}}

    def encode(self, seq, *, strict: bool = True) -> np.ndarray:
        """Encode one sequence; with strict=True a non-IUPAC character raises ValueError."""
        ids = encode(seq)
        if strict and (ids == INVALID).any():
            pos = int(np.argmax(ids == INVALID))
            ch = seq[pos] if isinstance(seq, str) else chr(bytes(seq)[pos])
            raise ValueError(f"character {ch!r} at position {pos + 1} is not an IUPAC nucleotide code")
        ids[ids == INVALID] = UNK
        if self.add_bos or self.add_eos:
            parts = ([np.array([BOS], np.uint8)] if self.add_bos else []) + [ids]
            parts += [np.array([SEP], np.uint8)] if self.add_eos else []
            ids = np.concatenate(parts)
        return ids

    decode = staticmethod(decode)
    reverse_complement = staticmethod(reverse_complement)

    def to_dict(self) -> dict:
        return {
            "type": "dna-char",
            "vocab": self.vocab(),
            "model_max_length": self.model_max_length,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "iupac_ambiguous_to": "N",
            "lowercase": "soft-masked bases, encoded as their uppercase base",
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DNATokenizer":
        if d.get("type", "dna-char") != "dna-char":
            raise ValueError(f"not a DNA character tokenizer: type {d.get('type')!r}")
        vocab = d.get("vocab")
        if vocab is not None and vocab != cls().vocab():
            raise ValueError("tokenizer vocabulary differs from the HyenaDNA/Caduceus DNA vocabulary")
        return cls(
            model_max_length=int(d.get("model_max_length", 1024)),
            add_bos=bool(d.get("add_bos", False)),
            add_eos=bool(d.get("add_eos", False)),
        )
