"""seqssm.tokenizers.dna: the lookup tables byte by byte, and the tokenizer object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqssm.tokenizers import dna
from seqssm.tokenizers.dna import (
    ENCODE_LUT, ENCODE_TABLE, INVALID, VOCAB_SIZE, DNATokenizer, decode, encode, reverse_complement,
)


def expected_id(byte: int) -> int:
    """The rule, spelled out: ACGT (U=T) either case -> 7..10; IUPAC ambiguity codes -> N=11; else 255."""
    c = chr(byte).upper()
    if byte < 128 and c in "ACGT":
        return 7 + "ACGT".index(c)
    if byte < 128 and c == "U":
        return 10
    if byte < 128 and c in "RYSWKMBDHVN":
        return 11
    return INVALID


def test_encode_table_every_byte():
    assert len(ENCODE_TABLE) == 256 and ENCODE_LUT.dtype == np.uint8
    for b in range(256):
        assert ENCODE_LUT[b] == expected_id(b), (b, chr(b))
        assert ENCODE_TABLE[b] == expected_id(b)


def test_translate_deletes_newlines():
    assert b"ac\r\ngT\nu".translate(ENCODE_TABLE, b"\r\n") == bytes([7, 8, 9, 10, 10])


def test_encode_decode_roundtrip():
    ids = encode("ACGTNacgtnRYU")
    assert ids.tolist() == [7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 11, 11, 10]
    assert decode(ids) == "ACGTNACGTNNNT"
    assert encode(b"AC").tolist() == [7, 8] and encode(bytearray(b"g")).tolist() == [9]
    assert encode("A-C").tolist() == [7, INVALID, 8]
    assert decode(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])) == "<>^*_??A"
    with pytest.raises(ValueError):
        decode([12])
    with pytest.raises(ValueError):
        decode([-1])


def test_reverse_complement_numpy_and_torch():
    ids = encode("AACGTN")
    rc = reverse_complement(ids)
    assert decode(rc) == "NACGTT" and rc.dtype == np.uint8
    batch = np.stack([encode("ACGT"), encode("AAAN")])
    assert [decode(r) for r in reverse_complement(batch)] == ["ACGT", "NTTT"]
    t = torch.tensor(batch, dtype=torch.long)
    rt = reverse_complement(t)
    assert rt.dtype == torch.long and rt.tolist() == reverse_complement(batch).tolist()
    special = np.array([0, 4, 11], np.uint8)
    assert reverse_complement(special).tolist() == [11, 4, 0]  # specials and N map to themselves
    rng = np.random.default_rng(0)
    x = rng.integers(7, 12, size=1000).astype(np.uint8)
    np.testing.assert_array_equal(reverse_complement(reverse_complement(x)), x)


def test_tokenizer_strict_and_special_tokens():
    tok = DNATokenizer()
    assert tok.vocab_size == VOCAB_SIZE == len(tok.vocab()) == 12
    assert tok.vocab()["A"] == 7 and tok.vocab()["[PAD]"] == 4
    with pytest.raises(ValueError, match=r"'X' at position 3"):
        tok.encode("ACXT")
    assert tok.encode("ACXT", strict=False).tolist() == [7, 8, dna.UNK, 10]
    both = DNATokenizer(add_bos=True, add_eos=True)
    assert both.encode("ac").tolist() == [dna.BOS, 7, 8, dna.SEP]


def test_tokenizer_dict_roundtrip():
    tok = DNATokenizer(model_max_length=4096, add_bos=True)
    d = tok.to_dict()
    assert DNATokenizer.from_dict(d) == tok
    with pytest.raises(ValueError, match="not a DNA character tokenizer"):
        DNATokenizer.from_dict({**d, "type": "bpe"})
    with pytest.raises(ValueError, match="vocabulary differs"):
        DNATokenizer.from_dict({**d, "vocab": {**d["vocab"], "A": 8}})
