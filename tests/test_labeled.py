"""seqssm.io.labeled: BED regions + genome, sequence tables and labeled FASTA -> LabeledData.

Sequences are checked against direct string slicing of the lambda genome with a hand-written
reverse complement; tables against pandas; every error names the file and the 1-based line.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from conftest import LAMBDA_FASTA
from seqssm.errors import InputError
from seqssm.io import FastaFile, LabeledData, infer_task, read_labeled, read_labeled_fasta, read_regions, read_table
from seqssm.io.labeled import UNLABELED, input_kind

CHROM = "NC_001416.1"
LAMBDA_LEN = 48502
SHARED = Path("/work/shared/data")
ECOLI = SHARED / "ecoli_promoters_81bp.csv"
IENH = SHARED / "ienhancer_200bp.csv"

_IDS = {"A": 7, "C": 8, "G": 9, "T": 10, "N": 11}
_COMP = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}


def ids_of(seq: str) -> np.ndarray:
    return np.array([_IDS[c] for c in seq.upper()], dtype=np.uint8)


def revcomp(seq: str) -> str:
    return "".join(_COMP[c] for c in reversed(seq.upper()))


def bed(tmp_path, text: str, name: str = "r.bed") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def check_error(exc_info, path, line=None, *words):
    msg = str(exc_info.value)
    assert str(path) in msg, msg
    if line is not None:
        assert f"line {line}" in msg, msg
        assert exc_info.value.line == line
    for w in words:
        assert w in msg, msg


# ----------------------------------------------------------------------------------------------
# BED regions


def test_regions_strand_and_sequence(tmp_path, lambda_genome):
    p = bed(tmp_path, (
        "track name=x\n"
        "# plain comment\n"
        f"{CHROM}\t100\t220\tpos\t0\t+\n"           # line 3
        "\n"
        f"{CHROM}\t5000\t5123\tneg\t0\t-\n"         # line 5
        f"{CHROM}\t48400\t48502\tpos\t0\t.\n"       # line 6: up to the last base
        f"{CHROM}\t0\t37\tneg\n"                    # line 7: no strand column
    ))
    d = read_regions(p, LAMBDA_FASTA)
    assert isinstance(d, LabeledData)
    assert d.task == "binary" and d.label_names == ["neg", "pos"]
    assert [e.line for e in d.examples] == [3, 5, 6, 7]
    assert [e.strand for e in d.examples] == ["+", "-", ".", "."]
    assert [e.name for e in d.examples] == [
        f"{CHROM}:100-220(+)", f"{CHROM}:5000-5123(-)", f"{CHROM}:48400-48502(.)", f"{CHROM}:0-37(.)"
    ]
    want = [lambda_genome[100:220], revcomp(lambda_genome[5000:5123]), lambda_genome[48400:48502],
            lambda_genome[0:37]]
    for e, w in zip(d.examples, want):
        assert e.ids.dtype == np.uint8 and e.ids.flags.c_contiguous
        np.testing.assert_array_equal(e.ids, ids_of(w))
    assert [e.target.tolist() for e in d.examples] == [[1.0], [0.0], [1.0], [0.0]]
    assert all(e.target.dtype == np.float32 for e in d.examples)
    assert (d.examples[1].chrom, d.examples[1].start, d.examples[1].end) == (CHROM, 5000, 5123)
    assert d.n_targets == 1 and d.n_outputs == 1
    assert d.class_counts() == {"neg": 2, "pos": 2}
    assert d.skipped == {} and d.source == str(p)
    # the same through a FastaFile object, a gzip BED and read_labeled
    gz = tmp_path / "r.bed.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    with FastaFile(LAMBDA_FASTA) as fa:
        for d2 in (read_regions(gz, fa), read_labeled(gz, genome=fa)):
            assert [e.name for e in d2.examples] == [e.name for e in d.examples]
            for a, b in zip(d.examples, d2.examples):
                np.testing.assert_array_equal(a.ids, b.ids)


@pytest.mark.parametrize("length", [100, 101, 1])
def test_regions_resized(tmp_path, lambda_genome, length):
    rows = [(1000, 1050, "+"), (2000, 2301, "-"), (3000, 3001, "+"), (7000, 7500, ".")]
    p = bed(tmp_path, "".join(f"{CHROM}\t{s}\t{e}\tr{i % 2}\t0\t{st}\n" for i, (s, e, st) in enumerate(rows)))
    d = read_regions(p, LAMBDA_FASTA, length=length)
    for e, (s, t, st) in zip(d.examples, rows):
        s2 = (s + t) // 2 - length // 2
        assert (e.start, e.end) == (s2, s2 + length)
        assert e.name == f"{CHROM}:{s2}-{s2 + length}({st})"
        seq = lambda_genome[s2 : s2 + length]
        np.testing.assert_array_equal(e.ids, ids_of(revcomp(seq) if st == "-" else seq))
        assert len(e.ids) == length


def test_regions_out_of_bounds(tmp_path):
    p = bed(tmp_path, (
        f"{CHROM}\t100\t200\ta\n"
        f"{CHROM}\t48450\t48502\tb\n"        # line 2: fine as is, past the end once resized to 200
        f"{CHROM}\t20\t60\tb\n"              # line 3: starts before 0 once resized
        f"{CHROM}\t30000\t30100\tb\n"
    ))
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA, length=200)
    check_error(e, p, 2, "48376-48576", "outside", "48502")
    d = read_regions(p, LAMBDA_FASTA, length=200, skip_out_of_bounds=True)
    assert [e.line for e in d.examples] == [1, 4]
    assert d.skipped == {"region past chromosome end": 1, "region before chromosome start": 1}
    assert "skipped 2" in d.describe()
    # without resizing: a region past the chromosome end as written
    q = bed(tmp_path, f"{CHROM}\t100\t200\ta\n{CHROM}\t48000\t48503\tb\n", "past.bed")
    with pytest.raises(InputError) as e:
        read_regions(q, LAMBDA_FASTA)
    check_error(e, q, 2, "48000-48503")
    # everything skipped: an error, not empty data
    with pytest.raises(InputError) as e:
        read_regions(q, LAMBDA_FASTA, length=100_000, skip_out_of_bounds=True)
    check_error(e, q, None, "no regions left", "every one was skipped", "2 region before chromosome start")


def test_regions_unknown_chromosome(tmp_path):
    p = bed(tmp_path, f"{CHROM}\t100\t200\ta\n{CHROM}\t300\t400\tb\nchr7\t10\t20\ta\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, 3, "'chr7'", CHROM)


def test_regions_named_label_columns(tmp_path, lambda_genome):
    body = (
        f"{CHROM}\t100\t200\tr1\t0\t+\tpromoter\t0.5\t1\t0\n"
        f"{CHROM}\t300\t400\tr2\t0\t-\tenhancer\t-1.25\t0\t1\n"
        f"{CHROM}\t500\t600\tr3\t0\t+\tother\t3\t1\t1\n"
        f"{CHROM}\t700\t800\tr4\t0\t-\tpromoter\t2e-1\t0\t0\n"
    )
    header = "chrom\tstart\tend\tname\tscore\tstrand\tkind\tsignal\ttf1\ttf2\n"
    for text, first in (("#" + header + body, 2), (header + body, 2), ("# made by hand\n#" + header + body, 3)):
        p = bed(tmp_path, text)
        d = read_regions(p, LAMBDA_FASTA, label_columns=["kind"])
        assert d.task == "multiclass" and d.label_names == ["enhancer", "other", "promoter"]
        assert [e.target[0] for e in d.examples] == [2, 0, 1, 2]
        assert [e.line for e in d.examples] == list(range(first, first + 4))
        assert d.n_outputs == 3 and d.n_targets == 1
        np.testing.assert_array_equal(d.examples[1].ids, ids_of(revcomp(lambda_genome[300:400])))
    # several columns: multilabel (0/1) and regression; by name, number, or mixed
    d = read_regions(p, LAMBDA_FASTA, label_columns=["tf1", "tf2"])
    assert d.task == "multilabel" and d.label_names == ["tf1", "tf2"] and d.n_targets == 2
    assert d.targets().tolist() == [[1, 0], [0, 1], [1, 1], [0, 0]]
    assert d.class_counts() == {"tf1": 2, "tf2": 2}
    d = read_regions(p, LAMBDA_FASTA, label_columns=["signal", 9])
    assert d.task == "regression" and d.label_names == ["signal", "tf1"]
    np.testing.assert_allclose(d.targets(), [[0.5, 1], [-1.25, 0], [3, 1], [0.2, 0]])
    d = read_regions(p, LAMBDA_FASTA, label_columns="signal")
    assert d.task == "regression" and d.targets()[:, 0].tolist() == pytest.approx([0.5, -1.25, 3, 0.2])
    # unknown column name: error naming the header line and the columns
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA, label_columns=["tf3"])
    check_error(e, p, 2, "'tf3'", "tf1")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA, label_columns=[2])
    check_error(e, p, 2, "chrom, start, end")


def test_regions_without_header_columns_by_number(tmp_path):
    p = bed(tmp_path, f"{CHROM}\t10\t20\tx\t3\t+\t1\n{CHROM}\t30\t40\ty\t4\t-\t0\n{CHROM}\t50\t60\tz\t5\t+\t1\n")
    d = read_regions(p, LAMBDA_FASTA, label_columns=[7])
    assert d.task == "binary" and d.label_names == ["0", "1"] and d.targets()[:, 0].tolist() == [1, 0, 1]
    d = read_regions(p, LAMBDA_FASTA, label_columns=["score", "7"], task="regression")
    assert d.label_names == ["5", "7"] and d.targets().tolist() == [[3, 1], [4, 0], [5, 1]]
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA, label_columns=[9])
    check_error(e, p, 1, "column 9", "7 columns")


def test_regions_label_errors(tmp_path):
    # empty label (tab-separated empty field) and BED's '.' for "no name"
    p = bed(tmp_path, f"{CHROM}\t10\t20\ta\n{CHROM}\t30\t40\t\t0\t+\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, 2, "empty label", "column '4'")
    p = bed(tmp_path, f"{CHROM}\t10\t20\ta\n{CHROM}\t30\t40\tb\n{CHROM}\t50\t60\t.\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, 3, "missing label '.'")
    # no label column at all on a line
    p = bed(tmp_path, f"{CHROM}\t10\t20\ta\n{CHROM}\t30\t40\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, 2, "no label")
    # a single class
    p = bed(tmp_path, f"{CHROM}\t10\t20\texon\n{CHROM}\t30\t40\texon\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, None, "only one class", "'exon'")
    # unparsable regression value
    p = bed(tmp_path, f"{CHROM}\t10\t20\tx\t1.5\n{CHROM}\t30\t40\tx\thigh\n{CHROM}\t50\t60\tx\t2\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA, label_columns=["score"], task="regression")
    check_error(e, p, 2, "'high'", "not a finite number")
    # bad strand / coordinates are still reported with their line
    p = bed(tmp_path, f"{CHROM}\t10\t20\ta\t0\t+\n{CHROM}\t30\t40\tb\t0\tminus\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, 2, "strand 'minus'")
    p = bed(tmp_path, f"{CHROM}\t10\t20\ta\n{CHROM}\t40\t30\tb\n")
    with pytest.raises(InputError) as e:
        read_regions(p, LAMBDA_FASTA)
    check_error(e, p, 2, "not greater than start")


def test_regions_training_label_names(tmp_path):
    p = bed(tmp_path, f"{CHROM}\t10\t20\tpos\n{CHROM}\t30\t40\tpos\n")
    d = read_regions(p, LAMBDA_FASTA, task="binary", label_names=["neg", "pos"])  # one class is fine here
    assert d.label_names == ["neg", "pos"] and d.targets()[:, 0].tolist() == [1, 1]
    assert d.class_counts() == {"neg": 0, "pos": 2}
    q = bed(tmp_path, f"{CHROM}\t10\t20\tpos\n{CHROM}\t30\t40\tmaybe\n", "q.bed")
    with pytest.raises(InputError) as e:
        read_regions(q, LAMBDA_FASTA, task="binary", label_names=["neg", "pos"])
    check_error(e, q, 2, "'maybe'", "training classes")


def test_regions_unlabeled_and_n_filter(tmp_path):
    p = bed(tmp_path, f"{CHROM}\t10\t20\tpeak1\n{CHROM}\t30\t40\tpeak2\n")
    d = read_regions(p, LAMBDA_FASTA, require_labels=False)
    assert d.task == UNLABELED and not d.has_labels and d.n_targets == 0
    assert all(e.target.shape == (0,) for e in d.examples)
    d = read_regions(p, LAMBDA_FASTA, require_labels=False, task="binary", label_names=["a", "b"])
    assert d.task == "binary" and d.label_names == ["a", "b"] and d.examples[0].target.shape == (0,)
    # prediction with the training label columns: used when the file has them, else no labels
    h = bed(tmp_path, f"#chrom\tstart\tend\tkind\n{CHROM}\t10\t20\tb\n{CHROM}\t30\t40\ta\n", "h.bed")
    d = read_regions(h, LAMBDA_FASTA, label_columns=["kind"], require_labels=False, task="binary",
                     label_names=["a", "b"])
    assert d.has_labels and d.targets()[:, 0].tolist() == [1, 0]
    d = read_regions(p, LAMBDA_FASTA, label_columns=["kind"], require_labels=False, task="binary",
                     label_names=["a", "b"])
    assert not d.has_labels and d.task == "binary"
    with pytest.raises(InputError) as e:  # ... but a training file must have them
        read_regions(p, LAMBDA_FASTA, label_columns=["kind"])
    check_error(e, p, 1, "no label column 'kind'")
    # N-rich regions skipped on request and counted
    fa = tmp_path / "g.fa"
    fa.write_text(">g1\n" + "ACGT" * 25 + "N" * 100 + "ACGT" * 25 + "\n")
    q = bed(tmp_path, "g1\t0\t100\ta\ng1\t80\t180\tb\ng1\t110\t210\ta\ng1\t90\t110\tb\n", "n.bed")
    d = read_regions(q, fa, max_n_frac=0.5)
    assert [e.line for e in d.examples] == [1, 4]  # line 4 is exactly half N: kept
    assert d.skipped == {"N fraction > 0.5": 2}
    np.testing.assert_array_equal(d.examples[1].ids, ids_of("GTACGTACGT" + "N" * 10))


# ----------------------------------------------------------------------------------------------
# Tables


@pytest.mark.skipif(not ECOLI.exists(), reason="needs /work/shared/data/ecoli_promoters_81bp.csv")
def test_table_ecoli_promoters_against_pandas():
    pd = pytest.importorskip("pandas")
    ref = pd.read_csv(ECOLI)
    d = read_table(ECOLI)  # default columns: seqs (sequence), labels (label)
    assert len(d) == len(ref) == 5720
    assert d.task == "binary" and d.label_names == ["0", "1"]
    np.testing.assert_array_equal(d.targets()[:, 0], ref["labels"].to_numpy(np.float32))
    for i in (0, 1, 2777, 5719):
        np.testing.assert_array_equal(d.examples[i].ids, ids_of(ref["seqs"][i]))
        assert d.examples[i].line == i + 2 and d.examples[i].name == f"row{i + 1}"
    assert {len(e.ids) for e in d.examples} == {81}
    assert d.class_counts() == {"0": 2860, "1": 2860}
    # another column as the label: three directions -> multiclass
    d = read_table(ECOLI, label_columns=["directions"])
    assert d.task == "multiclass" and d.label_names == ["0", "1", "2"]
    np.testing.assert_array_equal(d.targets()[:, 0], ref["directions"].to_numpy(np.float32))
    assert d.class_counts() == {str(k): int(v) for k, v in sorted(ref["directions"].value_counts().items())}
    assert d.n_outputs == 3


@pytest.mark.skipif(not IENH.exists(), reason="needs /work/shared/data/ienhancer_200bp.csv")
def test_table_ienhancer_float_labels():
    pd = pytest.importorskip("pandas")
    ref = pd.read_csv(IENH)
    d = read_labeled(IENH)
    assert len(d) == 2968 and d.task == "binary" and d.label_names == ["0", "1"]  # 0.0/1.0 read as classes 0, 1
    np.testing.assert_array_equal(d.targets()[:, 0], ref["label"].to_numpy(np.float32))
    np.testing.assert_array_equal(d.examples[-1].ids, ids_of(ref["sequence"].iloc[-1]))
    assert d.class_counts() == {"0": 1484, "1": 1484}
    # a validation file labelled "0"/"1" maps onto the same classes
    # (label_names from the training set; numbers match by value)
    assert read_table(IENH, label_names=["0", "1"], task="binary").targets().tolist() == d.targets().tolist()


def test_table_layouts(tmp_path):
    rows = [("s1", "ACGTAC", "1"), ("s2", "ggccaa", "0"), ("s3", "ACGUNR", "1")]
    want = [ids_of("ACGTAC"), ids_of("GGCCAA"), ids_of("ACGTNN")]  # U -> T, ambiguous codes -> N
    tsv = tmp_path / "t.tsv"
    tsv.write_text("id\tsequence\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
    txt_gz = tmp_path / "t.txt.gz"
    txt_gz.write_bytes(gzip.compress(tsv.read_bytes()))
    csv_ = tmp_path / "t.csv"
    csv_.write_text('ID,Seq,Label\r\n' + "".join(f'"{a}",{b},"{c}"\r\n' for a, b, c in rows) + "\r\n")
    for p in (tsv, txt_gz, csv_):
        d = read_table(p)
        assert [e.name for e in d.examples] == ["s1", "s2", "s3"]
        assert [e.line for e in d.examples] == [2, 3, 4]
        for e, w in zip(d.examples, want):
            np.testing.assert_array_equal(e.ids, w)
        assert d.targets()[:, 0].tolist() == [1, 0, 1]
    # headerless sequence,label (the first line already holds a sequence)
    p = tmp_path / "h.csv"
    p.write_text("ACGTACGTAA,neg\nTTTTGGGGCC,pos\n")
    d = read_table(p)
    assert d.label_names == ["neg", "pos"] and [e.line for e in d.examples] == [1, 2]
    np.testing.assert_array_equal(d.examples[1].ids, ids_of("TTTTGGGGCC"))
    # explicit columns, no id column -> row<N>
    p = tmp_path / "x.csv"
    p.write_text("a,dna_seq,cls\nx,ACGT,2\ny,CCGG,10\nz,TTAA,2\nw,GGGG,3\n")
    d = read_table(p, sequence_column="dna_seq", label_columns=["cls"], id_column=None)
    assert d.task == "multiclass" and d.label_names == ["2", "3", "10"]  # numbers sort numerically
    assert d.targets()[:, 0].tolist() == [0, 2, 0, 1] and d.examples[3].name == "row4"
    d = read_table(p, sequence_column=2, label_columns=[3], id_column="a")
    assert [e.name for e in d.examples] == ["x", "y", "z", "w"]
    # without labels for prediction
    p = tmp_path / "pred.csv"
    p.write_text("sequence\nACGT\nGG\n")
    assert not read_table(p, label_columns=["cls"], require_labels=False).has_labels
    d = read_table(p, require_labels=False)
    assert d.task == UNLABELED and [len(e.ids) for e in d.examples] == [4, 2] and d.examples[0].target.size == 0


def test_label_orders_and_tasks(tmp_path):
    def one(labels, **kw):
        p = tmp_path / "l.csv"
        p.write_text("sequence,label\n" + "".join(f"ACGT,{v}\n" for v in labels))
        return read_table(p, **kw)

    d = one(["True", "false", "TRUE"])
    assert d.task == "binary" and d.label_names == ["False", "True"] and d.targets()[:, 0].tolist() == [1, 0, 1]
    d = one(["1", "0", "1.0", "0.0"])
    assert d.label_names == ["0", "1"] and d.targets()[:, 0].tolist() == [1, 0, 1, 0]
    d = one(["-1", "1", "1"])
    assert d.label_names == ["-1", "1"] and d.targets()[:, 0].tolist() == [0, 1, 1]
    d = one(["b", "a", "B", "c"])
    assert d.task == "multiclass" and d.label_names == ["B", "a", "b", "c"]
    d = one(["0.5", "1.5", "2.25", "0.5"])
    assert d.task == "regression" and d.label_names == ["label"]
    np.testing.assert_allclose(d.targets()[:, 0], [0.5, 1.5, 2.25, 0.5])
    d = one(["a", "b"], task="multiclass")
    assert d.task == "multiclass" and d.n_outputs == 2
    with pytest.raises(InputError, match="binary needs exactly 2 classes"):
        one(["a", "b", "c"], task="binary")
    with pytest.raises(InputError, match="only one class"):
        one(["1", "1.0"])


def test_infer_task():
    assert infer_task([["a", "b", "a"]]) == "binary"
    assert infer_task([["0.0", "1.0"]]) == "binary"
    assert infer_task([["x", "y", "z"]]) == "multiclass"
    assert infer_task([[str(i % 7) for i in range(70)]]) == "multiclass"
    assert infer_task([[str(i) for i in range(60)]]) == "regression"  # > 50 integer values
    assert infer_task([["0.1", "0.2", "0.3"]]) == "regression"
    assert infer_task([["0", "1", "1"], ["1", "0", "true"]]) == "multilabel"
    assert infer_task([["0", "1", "2"], ["1", "0", "1"]]) == "regression"
    with pytest.raises(InputError, match="only one class"):
        infer_task([["a", "a"]], path="x.csv")
    with pytest.raises(InputError, match="column 'b' has 'yes'"):
        infer_task([["0", "1"], ["1", "yes"]], columns=["a", "b"])
    with pytest.raises(InputError, match="not a class label"):
        infer_task([[f"id{i}" for i in range(100)]])


def test_table_errors(tmp_path):
    def write(text, name="e.csv"):
        p = tmp_path / name
        p.write_text(text)
        return p

    cases = [
        ("sequence,label\nACGT,1\nACXT,0\n", 3, "invalid character 'X' at position 3"),
        ("sequence,label\nACGT,1\nAC GT,0\n", 3, "' ' (space)"),
        ("sequence,label\nACGT,1\n,0\n", 3, "empty sequence"),
        ("sequence,label\nACGT,1\nACGT,\nACGT,0\n", 3, "empty label in column 'label'"),
        ("sequence,label\nACGT,1\nACGT,NA\nACGT,0\n", 3, "missing label 'NA'"),
        ("sequence,label\nACGT,1\nACGT,0,5\n", 3, "expected 2 fields"),
        ("sequence,label\nACGT,1\nACGT\n", 3, "expected 2 fields"),
        ("sequence,score\nACGT,1\n", 1, "no label column"),
        ("seq_x,label\nAC,1\n", 1, "no sequence column"),
        ("id,sequence,label\na,ACGT,1\na,ACGT,0\n", 3, "duplicate id 'a'"),
    ]
    for text, line, words in cases:
        p = write(text)
        with pytest.raises(InputError) as e:
            read_table(p)
        check_error(e, p, line, words)
    p = write("sequence,y\nACGT,1\nACGT,x1\nACGT,0.5\n")
    with pytest.raises(InputError) as e:
        read_table(p, task="regression")
    check_error(e, p, 3, "'x1'", "not a finite number")
    p = write("sequence,a,b\nACGT,1,0\nACGT,0,2\n")
    with pytest.raises(InputError) as e:
        read_table(p, label_columns=["a", "b"], task="multilabel")
    check_error(e, p, 3, "must be 0 or 1", "'2'")
    p = write("sequence,label\nACGT,1\nACGT,1\n")
    with pytest.raises(InputError) as e:
        read_table(p)
    check_error(e, p, None, "only one class", "'1'")
    p = write("sequence,label\nACGT,0\nACGT,3\n")
    with pytest.raises(InputError) as e:
        read_table(p, label_names=["0", "1"], task="binary")
    check_error(e, p, 3, "'3'", "training classes (0, 1)")
    with pytest.raises(InputError) as e:
        read_table(tmp_path / "missing.csv")
    check_error(e, tmp_path / "missing.csv", None, "file not found")


# ----------------------------------------------------------------------------------------------
# FASTA with labels in the headers


def test_labeled_fasta(tmp_path, lambda_genome):
    p = tmp_path / "l.fa"
    p.write_text(
        ">s1 label=enh some description\n"   # 1
        f"{lambda_genome[0:60]}\n{lambda_genome[60:90].lower()}\n"
        "\n"
        ">s2|bg\n"                            # 5
        f"{lambda_genome[100:150]}\n"
        ">s3 a description then the label enh\n"  # 7
        "ACGTN\n"
    )
    d = read_labeled_fasta(p)
    assert [e.name for e in d.examples] == ["s1", "s2", "s3"] and [e.line for e in d.examples] == [1, 5, 7]
    assert d.task == "binary" and d.label_names == ["bg", "enh"] and d.targets()[:, 0].tolist() == [1, 0, 1]
    np.testing.assert_array_equal(d.examples[0].ids, ids_of(lambda_genome[0:90]))
    np.testing.assert_array_equal(d.examples[1].ids, ids_of(lambda_genome[100:150]))
    gz = tmp_path / "l.fasta.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert read_labeled(gz).targets().tolist() == d.targets().tolist()
    # multi-task labels
    q = tmp_path / "m.fa"
    q.write_text(">a label=1,0,1\nACGT\n>b label=0,1,1\nGGCC\n>c label=1,1,0\nTTAA\n")
    d = read_labeled_fasta(q)
    assert d.task == "multilabel" and d.label_names == ["label1", "label2", "label3"]
    assert d.targets().tolist() == [[1, 0, 1], [0, 1, 1], [1, 1, 0]]
    # prediction: descriptions are not labels
    r = tmp_path / "p.fa"
    r.write_text(">x Enterobacteria phage lambda\nACGT\n>y\nGG\n")
    d = read_labeled_fasta(r, require_labels=False)
    assert d.task == UNLABELED and [e.name for e in d.examples] == ["x", "y"]


def test_labeled_fasta_errors(tmp_path):
    cases = [
        (">a 1\nACGT\n>b\nACGT\n", 3, "no label in the header"),
        (">a 1\nACGT\n>b 0\nAC\nAXGT\n", 5, "invalid character 'X'"),
        (">a 1\nACGT\n>a 0\nACGT\n", 3, "duplicate record name 'a'"),
        (">a 1\nACGT\n>b 0\n>c 1\nAC\n", 3, "no sequence"),
        (">a 1\nACGT\n>b 0,1\nAC\n", 3, "2 labels in the header"),
        ("ACGT\n>a 1\nAC\n", 1, "not a FASTA file"),
        (">a 1\nACGT\n>b 1\nAC\n", None, "only one class"),
        (">a label=0.5\nACGT\n>b label=x\nAC\n>c label=2\nA\n", 3, "'x'"),
    ]
    p = tmp_path / "bad.fa"
    for text, line, words in cases:
        p.write_text(text)
        with pytest.raises(InputError) as e:
            read_labeled_fasta(p, task="regression" if "label=0.5" in text else "auto")
        check_error(e, p, line, words)
    p.write_text(">a label=1\nACGT\n>b other\nAC\n")
    with pytest.raises(InputError) as e:
        read_labeled_fasta(p, require_labels=False)
    check_error(e, p, 3, "no 'label='")


# ----------------------------------------------------------------------------------------------
# Dispatch


def test_read_labeled_dispatch(tmp_path):
    b = bed(tmp_path, f"{CHROM}\t10\t20\ta\n{CHROM}\t30\t40\tb\n", "x.bed")
    with pytest.raises(InputError) as e:
        read_labeled(b)
    check_error(e, b, None, "genome")
    assert len(read_labeled(b, genome=LAMBDA_FASTA, length=None, label_columns=None)) == 2
    # unknown extensions: sniffed
    for name, text in (("r.regions", f"{CHROM}\t10\t20\ta\n{CHROM}\t30\t40\tb\n"),
                       ("s.dat", "sequence,label\nACGT,a\nGG,b\n"),
                       ("f.seqs", ">a x\nAC\n>b y\nGG\n")):
        p = tmp_path / name
        p.write_text(text)
        d = read_labeled(p, genome=LAMBDA_FASTA if name.endswith("regions") else None)
        assert len(d) == 2 and d.task == "binary"
    c = tmp_path / "t.csv"
    c.write_text("sequence,label\nACGT,a\nGG,b\n")
    # options for other kinds (e.g. a model's saved BED options) are ignored; input_kind tells the kind
    assert len(read_labeled(c, length=100, skip_out_of_bounds=True, id_column=None)) == 2
    assert [input_kind(tmp_path / n) for n in ("r.regions", "s.dat", "f.seqs", "t.csv")] == [
        "bed", "table", "fasta", "table"]
    with pytest.raises(TypeError):
        read_labeled(c, lenght=100)
    with pytest.raises(InputError) as e:
        read_labeled(c, genome=LAMBDA_FASTA)
    check_error(e, c, None, "only used with BED")
