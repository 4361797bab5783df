"""Reading SMILES files (text, tables, gzip, zip), canonicalisation and training-set preparation."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pytest
import rdkit
from rdkit import Chem

import seqssm.chem.data as chem_data
from seqssm.chem.data import (
    PreparedSet,
    canonical,
    canonicalize_many,
    prepare_training_set,
    read_smiles,
)
from seqssm.chem.tokenizer import SmilesTokenizer, split_smiles
from seqssm.errors import InputError, SeqssmError

REPO = Path(__file__).resolve().parents[1]
NCI_SMILES = Path(rdkit.__file__).parent / "Data" / "NCI" / "first_5K.smi"
CHEMBL = REPO.parent / "shared" / "data" / "chembl"


@pytest.fixture(scope="module")
def pkm2() -> list[str]:
    path = CHEMBL / "pkm2_train.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def test_read_smi_with_names_and_header(tmp_path):
    # first_5K.smi: "SMILES<tab>id" lines
    smiles = read_smiles(NCI_SMILES)
    assert len(smiles) == 4999
    assert smiles[0] == "CC1=CC(=O)C=CC1=O"
    assert all("\t" not in s and " " not in s for s in smiles)
    p = tmp_path / "set.smi"
    p.write_text("SMILES name\n\nCCO ethanol\n  c1ccccc1   benzene\n\n")
    assert read_smiles(p) == ["CCO", "c1ccccc1"]


def test_read_real_chembl_sets(pkm2):
    assert len(pkm2) == 436 and read_smiles(CHEMBL / "pkm2_train.txt") == pkm2
    zipped = CHEMBL / "chemblv31_mini_train.zip"
    if not zipped.is_file():
        pytest.skip(f"{zipped} not present")
    smiles = read_smiles(zipped)
    with zipfile.ZipFile(zipped) as z:
        (name,) = z.namelist()
        expected = [ln.split()[0] for ln in z.read(name).decode().splitlines() if ln.strip()]
    assert smiles == expected and len(smiles) == 50_000


def test_read_csv_tsv_gz_zip(tmp_path, pkm2):
    rows = pkm2[:20]
    csv_text = "id,canonical_smiles,activity\n" + "".join(f"m{i},{s},{i / 10}\n" for i, s in enumerate(rows))
    (tmp_path / "a.csv").write_text(csv_text)
    assert read_smiles(tmp_path / "a.csv") == rows
    # an explicit column wins; without a SMILES-like name the first column is taken
    assert read_smiles(tmp_path / "a.csv", column="id") == [f"m{i}" for i in range(20)]
    (tmp_path / "b.tsv").write_text("structure\tx\n" + "".join(f"{s}\t1\n" for s in rows))
    assert read_smiles(tmp_path / "b.tsv") == rows
    # quoted fields with the delimiter inside are handled by the csv module
    (tmp_path / "q.csv").write_text('name,SMILES\n"a, b",CCO\n"c",CCN\n')
    assert read_smiles(tmp_path / "q.csv") == ["CCO", "CCN"]
    with gzip.open(tmp_path / "c.csv.gz", "wt") as f:
        f.write(csv_text)
    assert read_smiles(tmp_path / "c.csv.gz") == rows
    with gzip.open(tmp_path / "d.smi.gz", "wt") as f:
        f.write("smiles\n" + "\n".join(rows) + "\n")
    assert read_smiles(tmp_path / "d.smi.gz") == rows
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as z:
        z.writestr("inner/e.csv", csv_text)
    assert read_smiles(tmp_path / "e.zip") == rows
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
        z.writestr("f.txt", "\n".join(rows))
    assert read_smiles(tmp_path / "f.zip") == rows


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_smiles(tmp_path / "missing.smi")
    (tmp_path / "bad.csv").write_text("SMILES,y\nCCO,1\n\nCCN,2\n,3\n")
    with pytest.raises(InputError) as e:
        read_smiles(tmp_path / "bad.csv")
    assert "bad.csv" in str(e.value) and "line 5" in str(e.value) and "empty SMILES" in str(e.value)
    (tmp_path / "short.tsv").write_text("id\tSMILES\nm1\tCCO\nm2\n")
    with pytest.raises(InputError, match="line 3"):
        read_smiles(tmp_path / "short.tsv")
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="no column 'SMILES'"):
        read_smiles(tmp_path / "c.csv", column="SMILES")
    with pytest.raises(SeqssmError, match="column"):
        read_smiles(NCI_SMILES, column="SMILES")
    (tmp_path / "empty.smi").write_text("\n\n")
    with pytest.raises(InputError, match="no SMILES"):
        read_smiles(tmp_path / "empty.smi")
    (tmp_path / "bin.smi").write_bytes(b"CCO\n\xff\xfe\x00\x81\n")
    with pytest.raises(InputError, match="not a text file"):
        read_smiles(tmp_path / "bin.smi")
    (tmp_path / "fake.smi.gz").write_text("CCO\n")
    with pytest.raises(InputError, match="not a gzip file"):
        read_smiles(tmp_path / "fake.smi.gz")
    (tmp_path / "fake.zip").write_text("CCO\n")
    with pytest.raises(InputError, match="not a zip archive"):
        read_smiles(tmp_path / "fake.zip")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.writestr("a.smi", "CCO\n")
        z.writestr("b.smi", "CCN\n")
    with pytest.raises(InputError, match="exactly one file, found 2"):
        read_smiles(tmp_path / "two.zip")


def test_canonical():
    assert canonical("OCC") == canonical("C(O)C") == "CCO"
    assert canonical("c1ccccc1") == "c1ccccc1"
    assert canonical("C1CC") is None          # unclosed ring
    assert canonical("c1cccc1") is None       # cannot be kekulised
    assert canonical("") is None
    mixed = ["OCC", "nonsense", "C1=CC=CC=C1", ""]
    assert canonicalize_many(mixed) == ["CCO", None, "c1ccccc1", None]


@pytest.fixture
def workers_for_small_lists(monkeypatch):
    """Worker processes even for short lists, and small chunks, so that tests stay quick."""
    monkeypatch.setattr(chem_data, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(chem_data, "_CHUNK", 97)


def test_canonicalize_many_in_worker_processes_keeps_order(pkm2, workers_for_small_lists):
    smiles = pkm2 + ["nonsense"] + pkm2[::-1]
    expected = [canonical(s) for s in smiles]
    assert expected[len(pkm2)] is None
    assert canonicalize_many(smiles, n_jobs=2) == expected


def test_prepare_training_set_counts(pkm2):
    nci = read_smiles(NCI_SMILES)
    prepared = prepare_training_set(nci, None, max_tokens=60, canonicalize=True)
    assert isinstance(prepared, PreparedSet) and prepared.n_input == 4999
    # recount every category independently
    mols = [Chem.MolFromSmiles(s) for s in nci]
    unparsable = [s for s, m in zip(nci, mols) if m is None]
    canon = [Chem.MolToSmiles(m) for m in mols if m is not None]
    untokenizable = [c for c in canon if split_smiles(c) is None]
    lengths = [len(split_smiles(c)) for c in canon if split_smiles(c) is not None]
    kept = [c for c in canon if split_smiles(c) is not None and len(split_smiles(c)) <= 60]
    assert prepared.n_unparsable == len(unparsable) > 0
    assert prepared.n_untokenizable == len(untokenizable)
    assert prepared.n_too_long == sum(n > 60 for n in lengths) > 0
    assert prepared.n_unknown_token == 0
    assert prepared.smiles == kept
    assert prepared.n_duplicates == len(kept) - len(set(kept)) > 0  # duplicates are kept, and counted
    assert prepared.examples["unparsable"] == unparsable[:5]
    warning = prepared.warning()
    assert f"skipped {prepared.n_skipped:,} of 4,999" in warning and "too long" in warning
    # without canonicalisation the inputs are kept as written
    raw = prepare_training_set(pkm2, None, max_tokens=200, canonicalize=False)
    assert raw.smiles == pkm2 and raw.n_skipped == 0 and raw.warning() is None


def test_prepare_training_set_with_a_vocabulary(pkm2):
    tok = SmilesTokenizer.build(["CCO", "c1ccccc1", "CC(=O)N"])
    smiles = ["OCC", "CCCl", "c1ccccc1C(=O)N", "c1ccncc1", "C1CC"]
    prepared = prepare_training_set(smiles, tok, max_tokens=50, canonicalize=True)
    assert prepared.smiles == ["CCO", "NC(=O)c1ccccc1"]
    assert prepared.n_unknown_token == 2 and prepared.examples["unknown_token"] == ["CCCl", "c1ccncc1"]
    assert prepared.n_unparsable == 1
    for s in prepared.smiles:
        tok.encode(s)  # every kept SMILES encodes with the given vocabulary


def test_prepare_training_set_parallel_matches_serial(workers_for_small_lists):
    nci = read_smiles(NCI_SMILES)[:1500] + ["C1CC", "nonsense"]
    tok = SmilesTokenizer.build(read_smiles(NCI_SMILES)[:300])
    serial = prepare_training_set(nci, tok, max_tokens=50, canonicalize=True)
    parallel = prepare_training_set(nci, tok, max_tokens=50, canonicalize=True, n_jobs=2)
    assert parallel == serial
    assert serial.n_unparsable and serial.n_unknown_token and serial.n_too_long
