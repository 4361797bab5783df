"""seqssm.io.bed: parsing, and errors that name the file and the 1-based BED line."""

from __future__ import annotations

import gzip

import pytest

from seqssm.errors import InputError
from seqssm.io import Region, check_regions, read_bed

GOOD = (
    "# a comment\n"
    "track name=test description='x y'\n"
    "browser position chr1:1-100\n"
    "\n"
    "chr1\t0\t100\n"  # line 5: BED3
    "chr1\t150\t300\tpeak one\t0\t+\n"  # line 6: tab-separated, name with a space
    "   \n"
    "chr2 10 20 p2 5 -\n"  # line 8: whitespace-separated
    "chr2\t20\t30\tp3\t0\t.\textra\tcols\r\n"  # line 9: BED8+, CRLF
    "chrM\t5\t6\t\t\t\n"  # line 10: trailing empty columns
)


def test_read_bed(tmp_path):
    p = tmp_path / "r.bed"
    p.write_text(GOOD)
    got = read_bed(p)
    assert got == [
        Region("chr1", 0, 100, None, ".", 5),
        Region("chr1", 150, 300, "peak one", "+", 6),
        Region("chr2", 10, 20, "p2", "-", 8),
        Region("chr2", 20, 30, "p3", ".", 9),
        Region("chrM", 5, 6, None, ".", 10),
    ]
    assert len(got[1]) == 150
    q = tmp_path / "r.bed.gz"
    q.write_bytes(gzip.compress(GOOD.encode()))
    assert read_bed(str(q)) == got


def test_empty_bed(tmp_path):
    p = tmp_path / "e.bed"
    p.write_text("# nothing\n\n")
    assert read_bed(p) == []


@pytest.mark.parametrize(
    "line,message",
    [
        ("chr1\t100", "at least 3 columns"),
        ("chr1 5", "at least 3 columns"),
        ("chr1\tx\t100", "start 'x' is not an integer"),
        ("chr1\t1.5\t100", "start '1.5' is not an integer"),
        ("chr1\t0\t1e3", "end '1e3' is not an integer"),
        ("chr1\t\t100", "is not an integer"),
        ("chr1\t-5\t100", "start -5 is negative"),
        ("chr1\t100\t100", "end 100 is not greater than start 100"),
        ("chr1\t100\t50", "end 50 is not greater than start 100"),
        ("chr1\t0\t10\tn\t0\tplus", "strand 'plus'"),
        ("chr1\t0\t10\tn\t0\t*", "strand '*'"),
        ("\t0\t10", "empty chromosome name"),
    ],
)
def test_bad_lines(tmp_path, line, message):
    p = tmp_path / "bad.bed"
    p.write_text("track x\nchr1\t0\t10\n\n" + line + "\nchr1\t0\t5\n")
    with pytest.raises(InputError) as e:
        read_bed(p)
    assert e.value.line == 4 and e.value.path == str(p)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{p}, line 4: ") and "\n" not in str(e.value)


def test_missing_and_binary(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_bed(tmp_path / "nope.bed")
    with pytest.raises(InputError, match="directory"):
        read_bed(tmp_path)
    p = tmp_path / "bin.bed"
    p.write_bytes(b"chr1\t0\t10\n\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not a text file"):
        read_bed(p)
    q = tmp_path / "t.bed.gz"
    q.write_bytes(gzip.compress(GOOD.encode())[:-20])
    with pytest.raises(InputError, match="truncated or corrupt gzip"):
        read_bed(q)


def test_check_regions(tmp_path):
    p = tmp_path / "r.bed"
    p.write_text(GOOD)
    regions = read_bed(p)
    lengths = {"chr1": 300, "chr2": 30, "chrM": 16569}
    check_regions(regions, lengths, p)  # all fine (end == length is allowed)
    with pytest.raises(InputError) as e:
        check_regions(regions, {**lengths, "chr1": 299}, p)
    assert e.value.line == 6 and "ends past the end of chr1 (length 299)" in str(e.value)
    with pytest.raises(InputError) as e:
        check_regions(regions, {"chr1": 300, "chrM": 16569}, p)
    assert e.value.line == 8 and "'chr2' is not in the FASTA file" in str(e.value)
    assert e.value.path == str(p)
