"""seqssm.io.splits: seeded stratified random splits, chromosome and coordinate-range hold-outs,
explicit files.  Real data: the E. coli promoter and iEnhancer tables, regions on the lambda genome."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import LAMBDA_FASTA
from seqssm.errors import InputError, SeqssmError
from seqssm.io import chrom_split, explicit_split, random_split, read_regions, read_table, region_split
from seqssm.io.splits import BOUNDARY, parse_region

CHROM = "NC_001416.1"
SHARED = Path("/work/shared/data")
ECOLI = SHARED / "ecoli_promoters_81bp.csv"
IENH = SHARED / "ienhancer_200bp.csv"
needs_ecoli = pytest.mark.skipif(not ECOLI.exists(), reason="needs /work/shared/data/ecoli_promoters_81bp.csv")
needs_ienh = pytest.mark.skipif(not IENH.exists(), reason="needs /work/shared/data/ienhancer_200bp.csv")


@pytest.fixture(scope="module")
def ecoli():
    if not ECOLI.exists():
        pytest.skip("needs /work/shared/data/ecoli_promoters_81bp.csv")
    return read_table(ECOLI)


def names(d):
    return [e.name for e in d.examples]


def check_partition(data, split, dropped=0):
    parts = [split.train, split.valid] + ([split.test] if split.test is not None else [])
    seen = [n for p in parts for n in names(p)]
    assert len(seen) == len(set(seen)) == len(data) - dropped
    for p in parts:
        lines = [e.line for e in p.examples]
        assert lines == sorted(lines)  # file order kept
        assert p.task == data.task and p.label_names == data.label_names


# ----------------------------------------------------------------------------------------------
# Random


@needs_ecoli
def test_random_split_stratified_ecoli(ecoli):
    s = random_split(ecoli, (0.8, 0.1, 0.1), seed=0)
    assert (len(s.train), len(s.valid), len(s.test)) == (4576, 572, 572)
    check_partition(ecoli, s)
    # 2,860 of each class: exactly half of every split
    assert s.train.class_counts() == {"0": 2288, "1": 2288}
    assert s.valid.class_counts() == {"0": 286, "1": 286}
    assert s.test.class_counts() == {"0": 286, "1": 286}
    assert "seed 0" in s.description and "stratified" in s.description and "train 4576" in s.description
    # deterministic given the seed, different for another seed
    again = random_split(ecoli, (0.8, 0.1, 0.1), seed=0)
    assert names(again.valid) == names(s.valid) and names(again.test) == names(s.test)
    other = random_split(ecoli, (0.8, 0.1, 0.1), seed=1)
    assert names(other.valid) != names(s.valid)
    # unstratified: same sizes, class balance only approximate
    u = random_split(ecoli, seed=0, stratify=False)
    assert (len(u.train), len(u.valid), len(u.test)) == (4576, 572, 572)
    assert "not stratified" in u.description
    check_partition(ecoli, u)


@needs_ecoli
def test_random_split_stratified_multiclass():
    d = read_table(ECOLI, label_columns=["directions"])  # 1361 / 2890 / 1469
    s = random_split(d, (0.7, 0.15, 0.15), seed=3)
    check_partition(d, s)
    total = d.class_counts()
    for part, f in ((s.train, 0.7), (s.valid, 0.15), (s.test, 0.15)):
        for c, n in part.class_counts().items():
            assert abs(n - f * total[c]) <= 1.0, (c, n, f * total[c])


@needs_ienh
def test_random_split_two_way_ienhancer():
    d = read_table(IENH)
    s = random_split(d, (0.75, 0.25), seed=7)
    assert s.test is None and (len(s.train), len(s.valid)) == (2226, 742)
    assert s.valid.class_counts() == {"0": 371, "1": 371}
    check_partition(d, s)
    s0 = random_split(d, (0.75, 0.25, 0.0), seed=7)
    assert s0.test is None and names(s0.valid) == names(s.valid)


def test_random_split_small_and_bad_fractions(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("sequence,label\nACGT,a\nACGT,b\nACGT,a\n")
    d = read_table(p)
    s = random_split(d, (0.8, 0.1, 0.1), seed=0)  # every split gets one example
    assert (len(s.train), len(s.valid), len(s.test)) == (1, 1, 1)
    s = random_split(d, (0.5, 0.5), seed=0, stratify=False)
    assert (len(s.train), len(s.valid)) == (2, 1) or (len(s.train), len(s.valid)) == (1, 2)
    p.write_text("sequence,label\nACGT,a\nACGT,b\n")
    with pytest.raises(InputError) as e:
        random_split(read_table(p), (0.8, 0.1, 0.1))
    assert str(p) in str(e.value) and "too few" in str(e.value)
    for bad in ((0.8, 0.3), (1.0,), (0.5, 0.5, 0.5, -0.5), (0.0, 1.0)):
        with pytest.raises(SeqssmError, match="fractions"):
            random_split(d, bad)


def test_random_split_regression_not_stratified(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("sequence,y\n" + "".join(f"ACGT,{i * 0.37:.2f}\n" for i in range(40)))
    d = read_table(p, label_columns=["y"])
    assert d.task == "regression"
    s = random_split(d, (0.5, 0.25, 0.25), seed=0)
    assert (len(s.train), len(s.valid), len(s.test)) == (20, 10, 10) and "not stratified" in s.description
    check_partition(d, s)


# ----------------------------------------------------------------------------------------------
# Chromosomes


@pytest.fixture(scope="module")
def three_chrom(tmp_path_factory, lambda_genome):
    """Lambda cut into three records (chrA, chrB, chrC) and 200 bp windows every 300 bp on each."""
    root = tmp_path_factory.mktemp("chroms")
    fa = root / "g.fa"
    cuts = {"chrA": (0, 15000), "chrB": (15000, 30000), "chrC": (30000, 48502)}
    fa.write_text("".join(f">{c}\n{lambda_genome[s:e]}\n" for c, (s, e) in cuts.items()))
    rows = []
    for c, (s, e) in cuts.items():
        for i, start in enumerate(range(0, e - s - 200, 300)):
            rows.append(f"{c}\t{start}\t{start + 200}\t{'exon' if i % 3 == 0 else 'bg'}\t0\t{'+-'[i % 2]}\n")
    bed = root / "w.bed"
    bed.write_text("".join(rows))
    return fa, bed


def test_chrom_split(three_chrom, lambda_genome):
    fa, bed = three_chrom
    d = read_regions(bed, fa)
    by_chrom = Counter(e.chrom for e in d.examples)
    s = chrom_split(d, valid_chroms=["chrB"], test_chroms=["chrC"])
    check_partition(d, s)
    assert {e.chrom for e in s.train.examples} == {"chrA"} and len(s.train) == by_chrom["chrA"]
    assert {e.chrom for e in s.valid.examples} == {"chrB"} and len(s.valid) == by_chrom["chrB"]
    assert {e.chrom for e in s.test.examples} == {"chrC"} and len(s.test) == by_chrom["chrC"]
    assert "valid = chrB" in s.description and "test = chrC" in s.description
    # sequences survive the split (chrB starts at lambda position 15000)
    e = s.valid.examples[1]
    assert e.strand == "-"
    comp = {7: 10, 8: 9, 9: 8, 10: 7}
    fwd = lambda_genome[15000 + e.start : 15000 + e.end]
    assert [comp[int(x)] for x in e.ids[::-1]] == [{"A": 7, "C": 8, "G": 9, "T": 10}[c] for c in fwd]
    s2 = chrom_split(d, valid_chroms=["chrC"], test_chroms=[])
    assert s2.test is None and len(s2.train) == by_chrom["chrA"] + by_chrom["chrB"]


def test_chrom_split_errors(three_chrom, tmp_path):
    fa, bed = three_chrom
    d = read_regions(bed, fa)
    with pytest.raises(InputError) as e:
        chrom_split(d, valid_chroms=["chrB"], test_chroms=["chrZ"])
    assert str(bed) in str(e.value) and "'chrZ'" in str(e.value) and "chrA" in str(e.value)
    with pytest.raises(InputError, match="training split is empty"):
        chrom_split(d, valid_chroms=["chrA", "chrB"], test_chroms=["chrC"])
    with pytest.raises(SeqssmError, match="both validation and test"):
        chrom_split(d, valid_chroms=["chrB"], test_chroms=["chrB"])
    # the training chromosome holds one class only
    one = tmp_path / "one.bed"
    one.write_text("chrA\t0\t100\tbg\nchrA\t200\t300\tbg\nchrB\t0\t100\texon\nchrC\t0\t100\tbg\n")
    with pytest.raises(InputError, match="only one class in the training split"):
        chrom_split(read_regions(one, fa), valid_chroms=["chrB"], test_chroms=["chrC"])
    # a table has no coordinates
    t = tmp_path / "t.csv"
    t.write_text("sequence,label\nACGT,a\nACGT,b\n")
    with pytest.raises(InputError) as e:
        chrom_split(read_table(t), valid_chroms=["chr1"], test_chroms=[])
    assert str(t) in str(e.value) and "line 2" in str(e.value) and "coordinates" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Coordinate ranges


@pytest.fixture(scope="module")
def lambda_windows(tmp_path_factory):
    """Overlapping 200 bp windows every 150 bp along lambda, labelled by position."""
    bed = tmp_path_factory.mktemp("win") / "w.bed"
    bed.write_text("".join(
        f"{CHROM}\t{s}\t{s + 200}\t{'exon' if (s // 150) % 4 == 0 else 'bg'}\n" for s in range(0, 48300, 150)
    ))
    return read_regions(bed, LAMBDA_FASTA)


def test_region_split_against_reference(lambda_windows):
    d = lambda_windows
    valid_r, test_r = "NC_001416.1:10,001-20,000", f"{CHROM}:30001-40000"
    s = region_split(d, valid_regions=[valid_r], test_regions=[test_r])

    def ref(lo, hi):  # 1-based inclusive [lo, hi]; example 0-based [s, e) is 1-based [s+1, e]
        inside = [e.name for e in d.examples if e.start + 1 >= lo and e.end <= hi]
        overlap = [e.name for e in d.examples if e.start + 1 <= hi and e.end >= lo]
        return inside, overlap

    v_in, v_ov = ref(10001, 20000)
    t_in, t_ov = ref(30001, 40000)
    assert names(s.valid) == v_in and names(s.test) == t_in
    assert names(s.train) == [e.name for e in d.examples if e.name not in set(v_ov) | set(t_ov)]
    n_boundary = len(set(v_ov) - set(v_in)) + len(set(t_ov) - set(t_in))
    assert n_boundary > 0 and s.dropped == {BOUNDARY: n_boundary}
    assert f"{n_boundary} ({BOUNDARY})" in s.description
    check_partition(d, s, dropped=n_boundary)
    for e in s.valid.examples:  # midpoints inside the held-out range
        assert 10000 <= (e.start + e.end) // 2 < 20000
    # no test ranges -> no test split
    s2 = region_split(d, valid_regions=["NC_001416.1:1-5000"], test_regions=[])
    assert s2.test is None and len(s2.valid) == len(ref(1, 5000)[0])
    # touching ranges of one split act as one range: nothing is lost at their junction
    s4 = region_split(d, valid_regions=[f"{CHROM}:10001-15000", f"{CHROM}:15001-20000"], test_regions=[test_r])
    assert names(s4.valid) == v_in and s4.dropped == s.dropped
    s3 = region_split(d, valid_regions=[f"{CHROM}:10001-20000"], test_regions=[f"{CHROM}:40001"])
    assert names(s3.test) == ref(40001, 48502)[0] and f"test = {CHROM}:40,001-" in s3.description


def test_region_split_errors(lambda_windows):
    d = lambda_windows
    with pytest.raises(InputError, match="contains no example"):
        region_split(d, valid_regions=[f"{CHROM}:10001-10100"], test_regions=[])
    with pytest.raises(InputError) as e:
        region_split(d, valid_regions=["chr20:1-1000000"], test_regions=[])
    assert d.source in str(e.value) and CHROM in str(e.value)
    with pytest.raises(InputError, match="training split is empty"):
        region_split(d, valid_regions=[CHROM], test_regions=[])
    with pytest.raises(SeqssmError, match="overlaps test region"):
        region_split(d, valid_regions=[f"{CHROM}:1-10000"], test_regions=[f"{CHROM}:9000-20000"])
    for bad in ("chr1:", "chr1:100-50", "chr1:0-10", ":1-10", "chr1:1-2-3"):
        with pytest.raises(SeqssmError):
            parse_region(bad)
    assert parse_region("chr20:1,000,001-2,000,000") == ("chr20", 1_000_000, 2_000_000)
    assert parse_region("chr20") == ("chr20", 0, None)
    assert parse_region("chr20:30,000,001") == ("chr20", 30_000_000, None)  # to the chromosome end
    assert parse_region("chr20:30000001-") == ("chr20", 30_000_000, None)
    assert parse_region("HLA-A*01:01:x") == ("HLA-A*01:01:x", 0, None)


# ----------------------------------------------------------------------------------------------
# Explicit files


def test_explicit_split(tmp_path):
    tr, va, te = (tmp_path / f"{n}.csv" for n in ("train", "valid", "test"))
    tr.write_text("sequence,label\nACGT,neg\nGGCC,pos\nTTAA,neg\n")
    va.write_text("sequence,label\nACGT,pos\nGGCA,pos\n")
    te.write_text("sequence,label\nACGT,neg\n")
    train = read_table(tr)
    valid = read_table(va, task=train.task, label_names=train.label_names)
    test = read_table(te, task=train.task, label_names=train.label_names)
    s = explicit_split(train, valid, test)
    assert (len(s.train), len(s.valid), len(s.test)) == (3, 2, 1)
    assert str(tr) in s.description and str(te) in s.description
    assert explicit_split(train, valid).test is None
    # read on its own, a one-class file cannot be a training set ...
    with pytest.raises(InputError, match="only one class"):
        read_table(va)
    # ... and files whose classes differ are refused
    va.write_text("sequence,label\nACGT,pos\nGGCA,other\nAAAA,neg\n")
    odd = read_table(va)
    with pytest.raises(InputError) as e:
        explicit_split(train, odd)
    assert str(va) in str(e.value) and "multiclass" in str(e.value)
    va.write_text("sequence,label\nACGT,yes\nGGCA,no\n")
    with pytest.raises(InputError) as e:
        explicit_split(train, read_table(va))
    assert str(va) in str(e.value) and "(no, yes) differ" in str(e.value)


def test_split_descriptions_report_reading_skips(tmp_path):
    bed = tmp_path / "s.bed"
    bed.write_text("".join(f"{CHROM}\t{s}\t{s + 100}\t{'ab'[i % 2]}\n" for i, s in enumerate(range(0, 48500, 500))))
    d = read_regions(bed, LAMBDA_FASTA, length=400, skip_out_of_bounds=True)
    assert d.skipped == {"region before chromosome start": 1}  # the first region, centred at 50
    s = random_split(d, (0.5, 0.5), seed=0)
    assert "skipped while reading: 1 (region before chromosome start)" in s.description
    s = region_split(d, valid_regions=[f"{CHROM}:20001-30000"], test_regions=[])
    assert "skipped while reading" in s.description
