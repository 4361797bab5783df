"""seqssm.io.fasta against a simple reference (Biopython parse + str ops) on real DNA (phage lambda).

Fixtures are derived from resources/data/lambda_virus.fa.gz and written to tmp_path in every
compression (plain, gzip, BGZF) and layout (wrap widths, CRLF, blank lines, trailing whitespace,
lowercase, IUPAC codes, U), with and without .fai/.gzi indexes.
"""

from __future__ import annotations

import gzip
import io
import random
import re
import gc
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from Bio import SeqIO, bgzf

from seqssm.errors import InputError
from seqssm.io import FastaFile, Window, count_windows, iter_windows
from seqssm.io import fasta as fasta_mod

REPO = Path(__file__).resolve().parents[1]
LAMBDA = REPO / "resources" / "data" / "lambda_virus.fa.gz"

# ---------------------------------------------------------------------------------------------
# Reference: Biopython + plain string operations, one obviously-right line each.

_REF_IDS = {"A": 7, "C": 8, "G": 9, "T": 10, "N": 11}


def ref_encode(seq: str) -> np.ndarray:
    s = seq.upper().replace("U", "T")
    s = re.sub("[RYSWKMBDHV]", "N", s)
    return np.array([_REF_IDS[c] for c in s], dtype=np.uint8)


def ref_records(text: str) -> list[tuple[str, str]]:
    """(name, raw sequence with case kept) of every record, parsed by Biopython."""
    # (Biopython refuses blank lines before the first record; ours accepts them)
    return [(r.id, str(r.seq)) for r in SeqIO.parse(io.StringIO(text.lstrip()), "fasta")]


def ref_windows(records, window, stride):
    out = []
    for name, seq in records:
        start = 0
        while start < len(seq):
            end = min(start + window, len(seq))
            out.append((name, start, end, seq[start:end]))
            if end == len(seq):
                break
            start += stride
    return out


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def lam() -> str:
    (rec,) = SeqIO.parse(gzip.open(LAMBDA, "rt"), "fasta")
    assert len(rec.seq) == 48502
    return str(rec.seq)


def make_records(lam: str, seed: int = 0) -> list[tuple[str, str, str]]:
    """Records cut from lambda: (name, description, sequence) with soft-masked stretches, IUPAC codes
    and U, of assorted lengths (1 base up to ~20 kb)."""
    rng = random.Random(seed)
    lengths = [1, 2, 59, 60, 61, 70, 119, 120, 121, 999, 1000, 1001, 4096, 20000]
    recs, pos = [], 0
    for i, n in enumerate(lengths):
        s = list(lam[pos : pos + n])
        pos += n
        if n > 10:
            a = rng.randrange(n - 5)  # a soft-masked stretch
            b = min(n, a + rng.randrange(1, n // 2 + 2))
            s[a:b] = [c.lower() for c in s[a:b]]
            for _ in range(max(1, n // 500)):  # ambiguity codes, U, and runs of N
                j = rng.randrange(n)
                s[j] = rng.choice("RYSWKMBDHVNUryswkmbdhvnu")
            if n >= 1000:
                j = rng.randrange(n - 100)
                s[j : j + 77] = "N" * 77
        recs.append((f"seg{i}", f"lambda part {i} len={n}" if i % 3 else "", "".join(s)))
    return recs


def to_fasta(records, width=60, newline="\n", blank_lines=False, trailing_ws=False) -> str:
    """Write records as FASTA text; width may be an int, None (unwrapped) or a list cycled per record."""
    out = []
    for k, (name, desc, seq) in enumerate(records):
        w = width[k % len(width)] if isinstance(width, list) else width
        out.append(f">{name} {desc}".rstrip() + (" \t" if trailing_ws and k % 2 else ""))
        lines = [seq] if w is None else [seq[i : i + w] for i in range(0, len(seq), w)]
        for j, line in enumerate(lines):
            out.append(line + (" " * (j % 3) + "\t" * (j % 2) if trailing_ws else ""))
        if blank_lines:
            out.append("")
            if k % 2:
                out.append("   ")
    text = newline.join(out) + newline
    if blank_lines:  # blank lines before the first record too
        text = newline + "  " + newline + text
    return text


def write(path: Path, text: str | bytes, compression: str = "none") -> Path:
    data = text.encode() if isinstance(text, str) else text
    if compression == "none":
        path.write_bytes(data)
    elif compression == "gzip":
        path.write_bytes(gzip.compress(data, compresslevel=6))
    elif compression == "bgzf":
        with bgzf.BgzfWriter(str(path), "wb") as w:
            # uneven small blocks, so that block and batch boundaries fall everywhere
            i, step = 0, 1
            while i < len(data):
                w.write(data[i : i + step])
                w.flush()
                i += step
                step = step * 3 + 7 if step < 20000 else 997
    else:
        raise ValueError(compression)
    return path


COMPRESSIONS = ["none", "gzip", "bgzf"]
SUFFIX = {"none": ".fa", "gzip": ".fa.gz", "bgzf": ".fa.bgz"}


@pytest.fixture(scope="module")
def multi(lam, tmp_path_factory):
    """The multi-record text (widths cycled, LF) and its files in each compression."""
    recs = make_records(lam)
    text = to_fasta(recs, width=[60, 70, 80, None, 1, 13])
    d = tmp_path_factory.mktemp("multi")
    files = {c: write(d / f"multi{SUFFIX[c]}", text, c) for c in COMPRESSIONS}
    return recs, text, files


def check_records(ff: FastaFile, text: str, softmask=False):
    expect = ref_records(text)
    got = list(ff.records(softmask=softmask))
    assert [g[0] for g in got] == [e[0] for e in expect]
    for g, (name, seq) in zip(got, expect):
        assert g[1].dtype == np.uint8
        np.testing.assert_array_equal(g[1], ref_encode(seq), err_msg=name)
        if softmask:
            np.testing.assert_array_equal(g[2], np.array([c.islower() for c in seq], dtype=bool), err_msg=name)
        else:
            assert len(g) == 2


# ---------------------------------------------------------------------------------------------
# Decoding: every byte against the reference


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_compression_detected(multi, compression):
    _, _, files = multi
    assert FastaFile(files[compression]).compression == compression


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("read_size", [1, 61, 4096, fasta_mod.READ_SIZE])
def test_records_match_reference(multi, compression, read_size):
    recs, text, files = multi
    if compression == "gzip" and read_size == 1:
        read_size = 3  # one queue hand-off per byte is just slow
    check_records(FastaFile(files[compression], read_size=read_size), text)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_softmask_matches_reference(multi, compression):
    _, text, files = multi
    check_records(FastaFile(files[compression], read_size=777), text, softmask=True)


@pytest.mark.parametrize(
    "layout",
    [
        dict(width=60),
        dict(width=70, newline="\r\n"),
        dict(width=[60, 1, None], newline="\r\n", blank_lines=True, trailing_ws=True),
        dict(width=80, blank_lines=True),
        dict(width=[7, 60], trailing_ws=True),
    ],
    ids=["lf60", "crlf70", "crlf-blank-ws", "blank80", "trailing-ws"],
)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_layouts(lam, tmp_path, layout, compression):
    text = to_fasta(make_records(lam, seed=1), **layout)
    if layout.get("newline") == "\r\n":
        assert "\r\n" in text
    path = write(tmp_path / f"x{SUFFIX[compression]}", text, compression)
    for rs in (5, 1 << 16):
        check_records(FastaFile(path, read_size=rs), text.replace("\r", ""), softmask=True)


def test_whole_lambda_all_compressions(lam, tmp_path):
    text = ">lambda\n" + "\n".join(lam[i : i + 70] for i in range(0, len(lam), 70)) + "\n"
    ref = ref_encode(lam)
    for c in COMPRESSIONS:
        ((name, ids),) = FastaFile(write(tmp_path / f"l{SUFFIX[c]}", text, c)).records()
        assert name == "lambda"
        np.testing.assert_array_equal(ids, ref)
    ((name, ids),) = FastaFile(LAMBDA).records()  # the committed file, as is
    assert name == "NC_001416.1"
    np.testing.assert_array_equal(ids, ref)


def test_records_arrays_are_writable_and_independent(multi):
    _, _, files = multi
    out = list(FastaFile(files["none"]).records())
    out[0][1][:] = 0  # must not raise (read-only views would) nor touch other records
    assert out[1][1].min() >= 7


def test_utf8_bom_and_leading_blank_lines(tmp_path, lam):
    p = write(tmp_path / "bom.fa", b"\xef\xbb\xbf\n\n  \n>x desc\n" + lam[:100].encode() + b"\n")
    ((name, ids),) = FastaFile(p).records()
    assert name == "x"
    np.testing.assert_array_equal(ids, ref_encode(lam[:100]))


def test_multi_member_gzip(tmp_path, lam):
    """cat a.fa.gz b.fa.gz is valid gzip; and a plain gzip member after BGZF blocks is read too."""
    a = f">a\n{lam[:5000]}\n".encode()
    b = f">b\n{lam[5000:9000]}\n".encode()
    p = tmp_path / "mm.fa.gz"
    p.write_bytes(gzip.compress(a) + gzip.compress(b))
    assert FastaFile(p).compression == "gzip"
    check_records(FastaFile(p), (a + b).decode())
    q = write(tmp_path / "mixed.fa.bgz", a, "bgzf")
    q.write_bytes(q.read_bytes() + gzip.compress(b))
    assert FastaFile(q).compression == "bgzf"
    check_records(FastaFile(q), (a + b).decode())


# ---------------------------------------------------------------------------------------------
# Windows


WINDOW_CASES = [
    (c, w, s)
    for w, s in [(1000, None), (1000, 300), (1000, 1000), (1000, 1500), (61, 1), (4096, 4095), (50000, None), (1, 1)]
    for c in COMPRESSIONS
    if c == "none" or (w, s) != (61, 1)  # heavy overlap: the plain file is enough (windowing is compression-blind)
]


@pytest.mark.parametrize("compression,window,stride", WINDOW_CASES)
def test_windows_match_reference(multi, compression, window, stride):
    recs, text, files = multi
    records = ref_records(text)
    expect = ref_windows(records, window, stride or window)
    got = list(FastaFile(files[compression], read_size=3001).windows(window, stride, softmask=True))
    assert [(w.chrom, w.start, w.end) for w in got] == [e[:3] for e in expect]
    assert all(isinstance(w, Window) and w.ids.dtype == np.uint8 and w.softmask.dtype == bool for w in got)
    ids = {name: ref_encode(seq) for name, seq in records}
    mask = {name: np.array([c.islower() for c in seq], dtype=bool) for name, seq in records}
    np.testing.assert_array_equal(np.concatenate([w.ids for w in got]),
                                  np.concatenate([ids[n][a:b] for n, a, b, _ in expect]))
    np.testing.assert_array_equal(np.concatenate([w.softmask for w in got]),
                                  np.concatenate([mask[n][a:b] for n, a, b, _ in expect]))
    # count_windows agrees with what windows() yields, record by record
    per = {}
    for w in got:
        per[w.chrom] = per.get(w.chrom, 0) + 1
    for name, seq in records:
        assert count_windows(len(seq), window, stride or window) == per[name]


def test_windows_without_softmask_and_iter_windows(multi):
    recs, text, files = multi
    a = list(FastaFile(files["bgzf"]).windows(500, 250))
    b = list(iter_windows(files["none"], 500, 250))
    assert all(w.softmask is None for w in a + b)
    assert [(w.chrom, w.start, w.end) for w in a] == [(w.chrom, w.start, w.end) for w in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.ids, y.ids)


def test_window_rules_on_short_and_exact_records():
    assert count_windows(0, 10, 10) == 0
    assert count_windows(5, 10, 3) == 1  # shorter than the window: one short window
    assert count_windows(10, 10, 3) == 1  # the first window reaches the end
    assert count_windows(11, 10, 3) == 2  # [0,10) [3,11)
    assert count_windows(15, 10, 20) == 1  # gap: no window may start at or past the end
    assert count_windows(25, 10, 20) == 2  # [0,10) [20,25)
    for L in range(0, 60):
        for w in range(1, 13):
            for s in range(1, 15):
                assert count_windows(L, w, s) == len(ref_windows([("r", "x" * L)], w, s)), (L, w, s)
    for bad in [(10, 0, 1), (10, 1, 0), (10, -1, 1), (10, 2.5, 1)]:
        with pytest.raises(ValueError):
            count_windows(*bad)


def test_window_n_frac():
    w = Window("c", 0, 4, np.array([7, 11, 11, 8], np.uint8), None)
    assert w.n_frac == 0.5
    assert Window("c", 0, 0, np.zeros(0, np.uint8), None).n_frac == 0.0


def test_windows_bad_arguments(multi):
    _, _, files = multi
    with pytest.raises(ValueError, match="window must be a positive integer"):
        FastaFile(files["none"]).windows(0)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        FastaFile(files["none"]).windows(10, -5)
    with pytest.raises(ValueError):
        iter_windows(files["none"], 10.5)


def test_pickle_after_fetch(tmp_path, lam):
    import pickle

    p = write(tmp_path / "p.fa", f">a\n{lam[:500]}\n")
    ff = FastaFile(p)
    np.testing.assert_array_equal(ff.fetch("a", 10, 20), ref_encode(lam[10:20]))
    ff2 = pickle.loads(pickle.dumps(ff))
    assert ff2.compression == "none" and ff2.path == ff.path
    np.testing.assert_array_equal(ff2.fetch("a", 10, 20), ref_encode(lam[10:20]))


@pytest.fixture(scope="module")
def big_files(lam, tmp_path_factory):
    """One 12 Mbp record, in each compression (fast compression levels)."""
    from isal import igzip

    d = tmp_path_factory.mktemp("big")
    seq = (lam * 250)[:12_000_000]
    data = (">big\n" + "\n".join(seq[i : i + 80] for i in range(0, len(seq), 80)) + "\n").encode()
    (d / "big.fa").write_bytes(data)
    (d / "big.fa.gz").write_bytes(igzip.compress(data, compresslevel=1))
    with bgzf.BgzfWriter(str(d / "big.fa.bgz"), "wb", compresslevel=1) as w:
        w.write(data)
    return {"none": d / "big.fa", "gzip": d / "big.fa.gz", "bgzf": d / "big.fa.bgz"}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_windows_memory_is_bounded(big_files, compression):
    """A 12 Mbp record read in 256 KiB blocks: windows() must hold O(window + block), not the record."""
    ff = FastaFile(big_files[compression], read_size=256 << 10)
    assert ff.compression == compression
    tracemalloc.start()
    try:
        n = last = 0
        for w in ff.windows(100_000, 70_000, softmask=True):
            n += 1
            last = w.end
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == count_windows(12_000_000, 100_000, 70_000) and last == 12_000_000
    # measured: ~1.8 MiB plain, ~2.9 gzip, ~3.2 BGZF (2 decompression threads); the record is 11.4 MiB
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB for a 12 Mbp record"


def test_records_hold_one_record(big_files):
    """records() does hold the whole record (the contrast that makes the test above meaningful)."""
    tracemalloc.start()
    try:
        ((_, ids),) = FastaFile(big_files["none"], read_size=256 << 10).records()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ids) == 12_000_000 and peak >= 12_000_000


@pytest.mark.parametrize("compression", ["gzip", "bgzf"])
def test_early_stop_leaves_no_threads(multi, compression):
    """Closing a half-read iterator stops its reader threads at once, without waiting for the GC."""
    _, _, files = multi

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith(("seqssm-fasta-reader", "seqssm-bgzf"))]

    assert not ours()
    gc.disable()
    try:
        for make in (lambda f: f.windows(10), lambda f: f.records()):
            for _ in range(3):
                it = make(FastaFile(files[compression], read_size=100))
                next(it)
                it.close()
                assert not ours()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# lengths() and fetch()


def expected_lengths(text):
    return {n: len(s) for n, s in ref_records(text)}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_lengths_streaming(multi, compression):
    _, text, files = multi
    assert list(FastaFile(files[compression]).lengths().items()) == list(expected_lengths(text).items())


def indexed(tmp_path, text, compression) -> Path:
    """A file with .fai (and .gzi for BGZF) written by pyfaidx, the way samtools would."""
    import pyfaidx

    p = write(tmp_path / f"idx{SUFFIX[compression]}", text, compression)
    pyfaidx.Faidx(str(p)).close()
    assert Path(str(p) + ".fai").exists()
    return p


@pytest.mark.parametrize("compression", ["none", "bgzf"])
def test_fetch_and_lengths_with_index(lam, tmp_path, compression):
    recs = make_records(lam, seed=2)
    text = to_fasta(recs, width=60)
    p = indexed(tmp_path, text, compression)
    if compression == "bgzf":
        assert Path(str(p) + ".gzi").exists()
    ff = FastaFile(p)
    assert list(ff.lengths().items()) == list(expected_lengths(text).items())
    rng = random.Random(5)
    for name, seq in ref_records(text):
        ref = ref_encode(seq)
        np.testing.assert_array_equal(ff.fetch(name, 0, len(seq)), ref)
        for _ in range(5):
            a = rng.randrange(len(seq))
            b = rng.randrange(a, len(seq)) + 1
            np.testing.assert_array_equal(ff.fetch(name, a, b), ref[a:b])
    assert ff.fetch("seg13", 5, 5).size == 0
    with pytest.raises(InputError, match="no such record"):
        ff.fetch("chrZ", 0, 10)
    with pytest.raises(InputError, match=r"outside the record \(length 20000\)"):
        ff.fetch("seg13", 19990, 20001)
    with pytest.raises(InputError, match="outside"):
        ff.fetch("seg13", -1, 5)
    with pytest.raises(InputError, match="outside"):
        ff.fetch("seg13", 10, 5)
    ff.close()


@pytest.mark.parametrize("compression", ["none", "bgzf"])
def test_fetch_builds_missing_index(lam, tmp_path, compression):
    text = to_fasta(make_records(lam, seed=3), width=70)
    p = write(tmp_path / f"noidx{SUFFIX[compression]}", text, compression)
    with FastaFile(p) as ff:
        assert list(ff.lengths().items()) == list(expected_lengths(text).items())  # streaming pass
        name, seq = ref_records(text)[-1]
        np.testing.assert_array_equal(ff.fetch(name, 100, 5000), ref_encode(seq)[100:5000])


@pytest.mark.parametrize("compression", ["none", "bgzf"])
def test_fetch_read_only_directory_uses_temp_index(lam, tmp_path, monkeypatch, compression):
    text = to_fasta(make_records(lam, seed=4), width=60)
    p = write(tmp_path / f"ro{SUFFIX[compression]}", text, compression)
    monkeypatch.setattr(fasta_mod.os, "access", lambda *a, **k: False)  # as if the directory were read-only
    ff = FastaFile(p)
    name, seq = ref_records(text)[5]
    np.testing.assert_array_equal(ff.fetch(name, 3, 60), ref_encode(seq)[3:60])
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]  # nothing written next to the file
    ff.close()


def test_fetch_plain_gzip_says_bgzip(multi):
    _, _, files = multi
    with pytest.raises(InputError, match="bgzip"):
        FastaFile(files["gzip"]).fetch("seg0", 0, 1)


def test_fetch_reports_invalid_character(tmp_path, lam):
    text = f">a\n{lam[:120]}\n{lam[120:180]}\n>b\n{lam[:60]}\n{lam[60:100]}x{lam[101:120]}\n"
    p = indexed(tmp_path, text, "none")
    ff = FastaFile(p)
    np.testing.assert_array_equal(ff.fetch("b", 0, 100), ref_encode(lam[:100]))
    with pytest.raises(InputError) as e:
        ff.fetch("b", 50, 110)
    assert "'x'" in str(e.value) and e.value.record == "b" and e.value.line == 6


def test_bad_or_stale_fai(tmp_path, lam):
    text = f">a\n{lam[:100]}\n>b\n{lam[100:300]}\n"
    p = write(tmp_path / "s.fa", text)
    fai = Path(str(p) + ".fai")
    fai.write_text("a\t100\t3\n")
    with pytest.raises(InputError, match="5 tab-separated columns") as e:
        FastaFile(p).lengths()
    assert e.value.path == str(fai) and e.value.line == 1
    fai.write_text("a\t100\t3\t100\t101\nb\tx\t107\t200\t201\n")
    with pytest.raises(InputError, match="non-integer") as e:
        FastaFile(p).lengths()
    assert e.value.line == 2
    fai.write_text("a\t100\t3\t100\t101\na\t200\t107\t200\t201\n")
    with pytest.raises(InputError, match="duplicate"):
        FastaFile(p).lengths()
    fai.write_text("a\t100\t3\t100\t101\nb\t900\t107\t900\t901\n")  # longer than the file
    with pytest.raises(InputError, match="stale"):
        FastaFile(p).lengths()
    fai.write_text("a\t100\t3\t100\t101\nb\t201\t107\t201\t202\n")  # one byte too long
    with pytest.raises(InputError, match="stale"):
        FastaFile(p).lengths()
    fai.write_text("zz\t100\t3\t100\t101\nb\t200\t107\t200\t201\n")  # another file's index
    with pytest.raises(InputError, match="stale"):
        FastaFile(p).lengths()
    fai.write_text("a\t100\t3\t100\t101\nb\t200\t107\t200\t201\n")
    assert FastaFile(p).lengths() == {"a": 100, "b": 200}


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming file, record and 1-based line


def err(path: Path, what="records", **kw) -> InputError:
    ff = FastaFile(path, **kw)
    with pytest.raises(InputError) as e:
        if what == "records":
            list(ff.records())
        elif what == "windows":
            list(ff.windows(100, 50))
        else:
            ff.lengths()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return e.value


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("what", ["records", "windows", "lengths"])
def test_invalid_character(lam, tmp_path, compression, what):
    lines = [">r1 first", lam[:60], lam[60:120], "", ">r2", lam[:60], lam[60:90] + "J" + lam[91:120], lam[:10]]
    text = "\r\n".join(lines) + "\r\n"
    p = write(tmp_path / f"bad{SUFFIX[compression]}", text, compression)
    e = err(p, what, read_size=50)
    assert e.record == "r2" and e.line == 7 and "'J'" in str(e) and "IUPAC" in str(e)
    assert str(e) == f"{p}, record 'r2', line 7: invalid character 'J' in sequence (not an IUPAC nucleotide code)"


@pytest.mark.parametrize(
    "bad,shown", [("-", "'-'"), ("*", "'*'"), ("X", "'X'"), ("\x00", "byte 0x00"), ("é", "byte 0xc3"), (">", "'>'")]
)
@pytest.mark.parametrize("read_size", [1, 2, 68, fasta_mod.READ_SIZE])  # 68: the bad byte starts a block
def test_invalid_character_kinds(lam, tmp_path, bad, shown, read_size):
    p = write(tmp_path / "bad.fa", f">a\n{lam[:60]}\n{lam[:3]}{bad}{lam[:20]}\n")
    e = err(p, read_size=read_size)
    assert e.line == 3 and e.record == "a" and shown in str(e)


def test_not_fasta(tmp_path, lam):
    p = write(tmp_path / "t.fa", f"\n\n{lam[:60]}\n>a\n{lam[:60]}\n")
    e = err(p)
    assert e.line == 3 and "does not start with '>'" in str(e) and "binary" not in str(e)
    p = write(tmp_path / "vcf.fa.gz", "##fileformat=VCFv4.2\n#CHROM\tPOS\n", "gzip")
    assert err(p).line == 1


def test_binary_garbage(tmp_path):
    rng = random.Random(0)
    garbage = b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(5000))
    e = err(write(tmp_path / "g.fa", garbage))
    assert "not a FASTA file" in str(e) and "binary" in str(e) and e.line == 1
    e = err(write(tmp_path / "g2.fa", b">" + garbage))  # starts like FASTA, then garbage
    assert e.line is not None and ("invalid character" in str(e) or "UTF-8" in str(e))


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_empty_file(tmp_path, compression):
    e = err(write(tmp_path / f"e{SUFFIX[compression]}", b"", compression))
    assert "file is empty" in str(e)
    e = err(write(tmp_path / f"blank{SUFFIX[compression]}", b"\n \n\r\n", compression))
    assert "no FASTA records" in str(e)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_record_without_sequence(tmp_path, lam, compression):
    p = write(tmp_path / f"nos{SUFFIX[compression]}", f">a\n{lam[:50]}\n>empty desc\n\n>c\n{lam[:50]}\n", compression)
    e = err(p)
    assert e.record == "empty" and e.line == 3 and "no sequence" in str(e)
    p = write(tmp_path / f"nos_end{SUFFIX[compression]}", f">a\n{lam[:50]}\n>last", compression)
    e = err(p, "lengths")
    assert e.record == "last" and e.line == 3


def test_bad_header_lines(tmp_path, lam):
    e = err(write(tmp_path / "long.fa", b">" + b"x" * (1 << 20) + b" y\nACGT\n"))
    assert e.line == 1 and "longer than 1 MiB" in str(e)
    e = err(write(tmp_path / "u.fa", f">a\n{lam[:50]}\n".encode() + b">\xff\xfe\x00\nACGT\n"))
    assert e.line == 3 and "not UTF-8" in str(e)


def test_header_without_name(tmp_path, lam):
    e = err(write(tmp_path / "h.fa", f">a\n{lam[:50]}\n>\n{lam[:50]}\n"))
    assert e.line == 3 and "no record name" in str(e)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_duplicate_names(tmp_path, lam, compression):
    text = f">chr1 x\n{lam[:50]}\n>chr2\n{lam[:50]}\n>chr1 again\n{lam[:50]}\n"
    e = err(write(tmp_path / f"dup{SUFFIX[compression]}", text, compression), "windows", read_size=7)
    assert e.record == "chr1" and e.line == 5 and "duplicate" in str(e)


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.999])
def test_truncated_gzip(multi, tmp_path, cut):
    _, text, files = multi
    data = files["gzip"].read_bytes()
    p = tmp_path / "trunc.fa.gz"
    p.write_bytes(data[: int(len(data) * cut)])
    e = err(p)
    assert "truncated or corrupt gzip stream" in str(e)
    e = err(p, read_size=100)  # with small reads, the data before the break is parsed first
    assert "truncated or corrupt gzip stream" in str(e)
    assert e.record is not None and e.record.startswith("seg")


@pytest.mark.parametrize("cut", [0.3, 0.7, 0.999])
def test_truncated_bgzf(multi, tmp_path, cut):
    _, text, files = multi
    data = files["bgzf"].read_bytes()
    p = tmp_path / "trunc.fa.bgz"
    p.write_bytes(data[: int(len(data) * cut)])
    e = err(p, "windows")
    assert "truncated or corrupt gzip stream" in str(e)


@pytest.mark.parametrize("compression", ["gzip", "bgzf"])
def test_corrupt_compressed_data(multi, tmp_path, compression):
    _, _, files = multi
    data = bytearray(files[compression].read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    p = tmp_path / f"corrupt{SUFFIX[compression]}"
    p.write_bytes(bytes(data))
    assert "truncated or corrupt gzip stream" in str(err(p))


def test_trailing_garbage_after_bgzf(multi, tmp_path):
    _, _, files = multi
    p = tmp_path / "tail.fa.bgz"
    p.write_bytes(files["bgzf"].read_bytes() + b"\x00" * 100)
    assert "truncated or corrupt gzip stream" in str(err(p))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="file not found") as e:
        FastaFile(tmp_path / "nope.fa")
    assert e.value.path == str(tmp_path / "nope.fa")
    with pytest.raises(InputError, match="directory"):
        FastaFile(tmp_path)
    with pytest.raises(InputError, match="file not found"):
        iter_windows(tmp_path / "nope.fa", 10)  # raised at the call, not at the first next()


def test_other_compression_refused(tmp_path):
    import bz2

    p = tmp_path / "x.fa.bz2"
    p.write_bytes(bz2.compress(b">a\nACGT\n"))
    with pytest.raises(InputError, match="bzip2"):
        FastaFile(p)
