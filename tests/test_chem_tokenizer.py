"""SMILES tokenizer: tokenisation rules, round trips on real SMILES, vocabulary files, batches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import rdkit
import torch

from seqssm.chem.tokenizer import SmilesTokenizer, split_smiles
from seqssm.errors import InputError

REPO = Path(__file__).resolve().parents[1]
NCI_SMILES = Path(rdkit.__file__).parent / "Data" / "NCI" / "first_5K.smi"
PKM2 = REPO.parent / "shared" / "data" / "chembl" / "pkm2_train.txt"


def _first_fields(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def nci() -> list[str]:
    """4,999 SMILES of the NCI set shipped with RDKit (non-canonical, charges, stereo, isotopes)."""
    return _first_fields(NCI_SMILES)


@pytest.fixture(scope="module")
def pkm2() -> list[str]:
    if not PKM2.is_file():
        pytest.skip(f"{PKM2} not present")
    return _first_fields(PKM2)


@pytest.mark.parametrize("smiles, tokens", [
    ("Clc1ccc(Br)cc1", ["Cl", "c", "1", "c", "c", "c", "(", "Br", ")", "c", "c", "1"]),
    ("C[C@@H](N)C(=O)O", ["C", "[C@@H]", "(", "N", ")", "C", "(", "=", "O", ")", "O"]),
    ("c1cc[nH]c1", ["c", "1", "c", "c", "[nH]", "c", "1"]),
    ("C%12CC%12", ["C", "%12", "C", "C", "%12"]),
    ("[O-][N+](=O)c1ccccc1", ["[O-]", "[N+]", "(", "=", "O", ")", "c", "1", "c", "c", "c", "c", "c", "1"]),
    ("[2H]C([2H])([2H])Cl", ["[2H]", "C", "(", "[2H]", ")", "(", "[2H]", ")", "Cl"]),
    ("[Na+].[Cl-]", ["[Na+]", ".", "[Cl-]"]),
    ("F/C=C\\F", ["F", "/", "C", "=", "C", "\\", "F"]),
    ("C#N", ["C", "#", "N"]),
    ("c1cc[se]c1", ["c", "1", "c", "c", "[se]", "c", "1"]),
    ("*CC$C", ["*", "C", "C", "$", "C"]),
    ("BrCBOCl", ["Br", "C", "B", "O", "Cl"]),
])
def test_tokenisation_rules(smiles, tokens):
    tok = SmilesTokenizer.build([smiles])
    assert tok.tokenize(smiles) == tokens


def test_round_trip_on_real_smiles(nci, pkm2):
    for s in nci + pkm2:
        assert "".join(split_smiles(s)) == s


def test_untokenizable_character_is_named():
    tok = SmilesTokenizer.build(["CCO"])
    with pytest.raises(InputError) as e:
        tok.tokenize("CC~O")
    msg = str(e.value)
    assert "CC~O" in msg and "'~'" in msg and "position 3" in msg
    with pytest.raises(InputError, match="'!'"):
        SmilesTokenizer.build(["CCO", "C!C"])


def test_unknown_token_error_names_smiles_and_token():
    tok = SmilesTokenizer.build(["CCO", "c1ccccc1"])
    with pytest.raises(InputError) as e:
        tok.encode("CCCl")
    msg = str(e.value)
    assert "SMILES 'CCCl'" in msg and "'Cl'" in msg and "vocabulary" in msg
    assert "\n" not in msg


def test_build_is_deterministic_and_specials_first(pkm2):
    a = SmilesTokenizer.build(pkm2)
    b = SmilesTokenizer.build(list(reversed(pkm2)))
    assert a.tokens == b.tokens
    assert a.tokens[:3] == ["<pad>", "<bos>", "<eos>"]
    assert (a.pad_id, a.bos_id, a.eos_id) == (0, 1, 2)
    assert a.tokens[3:] == sorted(a.tokens[3:])
    assert a.token_to_id("c") == a.tokens.index("c") and a.id_to_token(a.token_to_id("c")) == "c"
    with pytest.raises(KeyError):
        a.token_to_id("[Se]")


def test_encode_decode(nci):
    tok = SmilesTokenizer.build(nci)
    for s in nci[:500]:
        ids = tok.encode(s)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == s
        assert tok.encode(s, bos=False, eos=False) == ids[1:-1]
    ids = tok.encode("CCO")
    # decoding skips padding and stops at the first <eos>
    assert tok.decode([tok.pad_id] + ids + tok.encode("CCN")) == "CCO"


def test_invalid_vocabularies_are_refused():
    with pytest.raises(ValueError, match="start with"):
        SmilesTokenizer(["C", "<pad>", "<bos>", "<eos>"])
    with pytest.raises(ValueError, match="twice"):
        SmilesTokenizer(["<pad>", "<bos>", "<eos>", "C", "C"])
    with pytest.raises(ValueError, match="single SMILES token"):
        SmilesTokenizer(["<pad>", "<bos>", "<eos>", "CC"])


def test_save_load_identity(tmp_path, nci):
    tok = SmilesTokenizer.build(nci)
    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / "vocab.json"
    data = json.loads(path.read_text())
    assert data["format"] == "seqssm-smiles-vocab" and data["version"] == 1 and data["tokens"] == tok.tokens
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["vocab.json"]  # no temporary left behind
    for source in (tmp_path / "model", path):
        loaded = SmilesTokenizer.load(source)
        assert loaded == tok and loaded.tokens == tok.tokens
        assert loaded.encode(nci[7]) == tok.encode(nci[7])


def test_load_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        SmilesTokenizer.load(tmp_path / "nothing")
    bad = tmp_path / "vocab.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        SmilesTokenizer.load(tmp_path)
    bad.write_text(json.dumps({"format": "something-else", "version": 1, "tokens": []}))
    with pytest.raises(InputError, match="not a SMILES vocabulary"):
        SmilesTokenizer.load(bad)
    bad.write_text(json.dumps({"format": "seqssm-smiles-vocab", "version": 1, "tokens": ["C"]}))
    with pytest.raises(InputError, match="must start with"):
        SmilesTokenizer.load(bad)


def test_encode_batch_decode_batch_round_trip(pkm2):
    tok = SmilesTokenizer.build(pkm2)
    ids, lengths = tok.encode_batch(pkm2)
    assert ids.dtype == torch.long and ids.shape == (len(pkm2), int(lengths.max()))
    for row, s, n in zip(ids, pkm2, lengths.tolist()):
        assert row[:n].tolist() == tok.encode(s)
        assert (row[n:] == tok.pad_id).all()
    assert tok.decode_batch(ids) == pkm2
    longest = max(pkm2, key=lambda s: len(tok.encode(s)))
    with pytest.raises(InputError, match="more than the maximum") as e:
        tok.encode_batch(pkm2, max_len=int(lengths.max()) - 1)
    assert longest[:40] in str(e.value)


def test_decode_batch_stops_at_eos_and_checks_ids():
    tok = SmilesTokenizer.build(["CCO", "c1ccccc1"])
    c, o = tok.token_to_id("C"), tok.token_to_id("O")
    ids = torch.tensor([
        [1, c, c, o, 2, c, c],      # generated past <eos>: ignored
        [1, c, 0, o, 0, 0, 0],      # padding inside is skipped
        [1, c, c, c, c, c, c],      # no <eos>: the whole row
        [2, c, c, 2, 0, 0, 0],      # <eos> first: empty
    ])
    assert tok.decode_batch(ids) == ["CCO", "CO", "CCCCCC", ""]
    assert tok.decode_batch(ids) == [tok.decode(r) for r in ids]
    with pytest.raises(IndexError):
        tok.decode_batch(torch.tensor([[1, len(tok)]]))


def test_decode_batch_is_fast(pkm2):
    tok = SmilesTokenizer.build(pkm2)
    ids, _ = tok.encode_batch(pkm2)
    rows = ids[torch.randint(len(pkm2), (100_000,), generator=torch.Generator().manual_seed(0))]
    rows = torch.nn.functional.pad(rows, (0, max(0, 100 - rows.shape[1])), value=tok.pad_id)[:, :100]
    start = time.perf_counter()
    out = tok.decode_batch(rows)
    elapsed = time.perf_counter() - start
    assert len(out) == 100_000 and out[0] in pkm2
    assert elapsed < 2.0, f"decode_batch of 100k x 100 took {elapsed:.2f} s"
