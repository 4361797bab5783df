"""Streaming FASTA reader: plain, gzip and BGZF files -> uint8 token ids, whole records or fixed windows.

Design
------
* The file is read in large blocks (``read_size``, 8 MiB by default).  Header lines are found with
  ``bytes.find(b">")`` (memchr); sequence bytes are mapped to token ids *and* stripped of newlines and
  whitespace in one C pass, ``block.translate(ENCODE_TABLE, b"\\r\\n \\t")``.  Invalid bytes come out as
  255 and are detected with ``b"\\xff" in ids`` (memchr); only on that error path is the offending byte
  located and its line number computed.
* Line numbers are never counted on the fast path: an error records the byte offset (in the
  decompressed stream) and the line number is computed by re-reading the file up to that offset.
* gzip: decompressed with ``isal`` in a background thread (the inflate loop releases the GIL), so that
  decompression and the translate pass run on different cores.
* BGZF (gzip members carrying the ``BC`` extra field, as written by ``bgzip``): the compressed stream
  is cut at block boundaries into batches that are decompressed in a thread pool, in order.
* Memory: ``windows()`` holds at most a few read blocks plus one window, whatever the record length;
  ``records()`` holds one whole record (by definition).
* Random access (``fetch``) goes through pyfaidx and needs an index: for an uncompressed file pyfaidx
  builds ``<file>.fai`` when it is missing; for BGZF pyfaidx reads ``<file>.fai`` and ``<file>.gzi``
  (building them when missing).  Plain gzip cannot be read at random: ``fetch`` raises InputError
  telling the user to recompress with ``bgzip`` (no silent fall-back to a scan of the whole file).

Accepted input: ``>`` header lines (the record name is the first whitespace-delimited word after
``>``), LF or CRLF line ends, blank lines, and spaces/tabs in sequence lines (ignored, as Biopython
does).  Sequence characters: ACGT and U (read as T) in either case -- lowercase is soft-masking and is
encoded as the uppercase base, the mask being available on request -- and the IUPAC ambiguity codes
RYSWKMBDHVN, which become N.  Anything else is an :class:`~seqssm.errors.InputError` naming the file,
record and 1-based line.
"""

from __future__ import annotations

import contextlib

import os
import pathlib
import queue
import struct
import tempfile
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from isal import igzip, isal_zlib

from seqssm.errors import InputError, file_error
from seqssm.tokenizers.dna import ENCODE_TABLE, N

__all__ = ["Window", "FastaFile", "iter_windows", "count_windows"]

READ_SIZE = 8 << 20  # bytes of (decompressed) input handled per block
MAX_HEADER = 1 << 20  # a longer '>' line is not a FASTA header
_WS = b"\r\n \t"  # bytes dropped from sequence lines
_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}

# ENCODE_TABLE with whitespace mapped to a valid id: used (without deletion) only to locate the first
# invalid byte of a segment, so that its offset in the file is known.
_LOCATE_TABLE = bytearray(ENCODE_TABLE)
for _b in _WS:
    _LOCATE_TABLE[_b] = 0
_LOCATE_TABLE = bytes(_LOCATE_TABLE)
# 1 for lowercase letters (soft-masked bases), 0 otherwise; applied with the same deletions as the ids.
_MASK_TABLE = bytes(1 if 97 <= i <= 122 else 0 for i in range(256))


class _StreamError(Exception):
    """A corrupt or truncated compressed stream (turned into InputError by the parser)."""


@dataclass
class Window:
    """A window of one record: ids of bases [start, end) (0-based, end exclusive)."""

    chrom: str
    start: int
    end: int
    ids: np.ndarray
    softmask: np.ndarray | None = None

    @property
    def n_frac(self) -> float:
        """Fraction of the window's bases that are N (ambiguous)."""
        n = len(self.ids)
        return float(np.count_nonzero(self.ids == N)) / n if n else 0.0


def count_windows(length: int, window: int, stride: int) -> int:
    """Number of windows ``FastaFile.windows(window, stride)`` yields for a record of ``length`` bases.

    Starts are 0, stride, 2*stride, ...; the last window is the first one that reaches the end of
    the record, and no window starts at or past it.
    """
    _check_window(window, stride)
    if length <= 0:
        return 0
    if length <= window:
        return 1
    k_reach = -(-(length - window) // stride)  # first k with k*stride + window >= length
    return min(k_reach + 1, -(-length // stride))


def iter_windows(path, window: int, stride: int | None = None, *, softmask: bool = False) -> Iterator[Window]:
    """Windows of every record of the FASTA file at ``path`` (see :meth:`FastaFile.windows`).

    A missing file or bad window/stride raises here, not at the first ``next()``."""
    return FastaFile(path).windows(window, stride, softmask=softmask)


def _check_window(window, stride):
    for what, v in (("window", window), ("stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")


def _describe_byte(b: int) -> str:
    if 32 < b < 127:
        return f"'{chr(b)}'"
    if b == 32:
        return "' ' (space)"
    return f"byte 0x{b:02x}"


# ----------------------------------------------------------------------------------------------
# Decompressed block sources


def _detect_compression(path: pathlib.Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(12 + 65535)
    except OSError as e:
        raise file_error(path, e, "a FASTA file") from None
    if head[:2] == _GZIP_MAGIC:
        if (_bgzf_block_size(head) or -1) > 0:
            return "bgzf"
        return "gzip"
    for magic, name in _OTHER_COMPRESSION.items():
        if head.startswith(magic):
            raise InputError(path, f"file is {name}-compressed; only plain, gzip and BGZF FASTA are supported")
    return "none"


def _bgzf_block_size(buf, pos: int = 0) -> int | None:
    """Size of the BGZF block whose header starts at ``buf[pos]``: None if it is not a BGZF block
    header, -1 if ``buf`` ends before the header does."""
    if len(buf) - pos < 12:
        return -1 if _GZIP_MAGIC[: len(buf) - pos] == buf[pos : pos + 2] else None
    if buf[pos : pos + 3] != b"\x1f\x8b\x08" or not buf[pos + 3] & 4:
        return None
    xlen = struct.unpack_from("<H", buf, pos + 10)[0]
    if len(buf) - pos < 12 + xlen:
        return -1
    i, stop = pos + 12, pos + 12 + xlen
    while i + 4 <= stop:
        slen = struct.unpack_from("<H", buf, i + 2)[0]
        if buf[i : i + 2] == b"BC" and slen == 2 and i + 6 <= stop:
            return struct.unpack_from("<H", buf, i + 4)[0] + 1
        i += 4 + slen
    return None


def _plain_blocks(path, read_size) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while True:
            b = f.read(read_size)
            if not b:
                return
            yield b


def _gzip_reader_blocks(fileobj, read_size) -> Iterator[bytes]:
    try:
        g = igzip.IGzipFile(fileobj=fileobj, mode="rb")
        while True:
            b = g.read(read_size)
            if not b:
                return
            yield b
    except (EOFError, OSError, isal_zlib.error) as e:
        raise _StreamError(str(e)) from None


def _gzip_blocks(path, read_size) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from _prefetch(lambda: _gzip_reader_blocks(f, read_size))


def _prefetch(make_gen, depth: int = 2) -> Iterator:
    """Run the generator ``make_gen()`` in a background thread, ``depth`` items ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        gen = make_gen()
        try:
            for item in gen:
                q.put((0, item))
                if stop.is_set():
                    return
            q.put((1, None))
        except BaseException as e:  # handed to the consumer
            q.put((2, e))
        finally:
            gen.close()

    t = threading.Thread(target=produce, name="seqssm-fasta-reader", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == 0:
                yield item
            elif kind == 1:
                return
            else:
                raise item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
            t.join(0.01)


def _bgzf_jobs(f, batch_target: int, raw_read: int):
    """Cut a BGZF stream at block boundaries: yields ("batch", bytes of whole blocks) and finally,
    if the stream does not end cleanly, one of ("truncated" | "corrupt" | "gzip", compressed offset)."""
    buf = b""
    coff = 0  # compressed offset of buf[0]
    pos = 0  # next block
    first = 0  # first block of the current batch
    usize = 0  # decompressed size of the current batch
    while True:
        size = _bgzf_block_size(buf, pos)
        if size == -1 or (size is not None and len(buf) - pos < size):
            more = f.read(raw_read)
            if more:
                buf = buf[first:] + more
                coff += first
                pos -= first
                first = 0
                continue
            if first < pos:
                yield ("batch", buf[first:pos])
            if pos < len(buf):
                yield ("truncated", coff + pos)
            return
        if size is None:
            if first < pos:
                yield ("batch", buf[first:pos])
            yield ("gzip" if buf[pos : pos + 2] == _GZIP_MAGIC else "corrupt", coff + pos)
            return
        usize += struct.unpack_from("<I", buf, pos + size - 4)[0]
        pos += size
        if usize >= batch_target:
            yield ("batch", buf[first:pos])
            first = pos
            usize = 0


def _bgzf_blocks(path, read_size) -> Iterator[bytes]:
    """Decompressed data of a BGZF file: batches of whole BGZF blocks inflated in a thread pool, in order."""
    batch_target = max(1 << 16, min(read_size, 4 << 20))
    workers = max(1, min(4, os.cpu_count() or 1))
    with open(path, "rb") as f:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="seqssm-bgzf")
        pending: deque = deque()
        try:
            tail = None
            for kind, value in _bgzf_jobs(f, batch_target, max(1 << 16, batch_target // 2)):
                if kind != "batch":
                    tail = (kind, value)
                    break
                pending.append(pool.submit(_inflate, value))
                while len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if tail is None:
            return
        kind, offset = tail
        if kind == "truncated":
            raise _StreamError(f"the file ends inside the BGZF block at compressed byte {offset}")
        if kind == "corrupt":
            raise _StreamError(f"no gzip block header at compressed byte {offset}")
        f.seek(offset)  # a plain gzip member after BGZF blocks: read the rest as a gzip stream
        yield from _prefetch(lambda: _gzip_reader_blocks(f, read_size))


def _inflate(batch: bytes) -> bytes:
    try:
        return igzip.decompress(batch)
    except (EOFError, OSError, isal_zlib.error) as e:
        raise _StreamError(str(e)) from None


# ----------------------------------------------------------------------------------------------


class FastaFile:
    """A FASTA file (plain, gzip or BGZF), read as a stream or (when indexed) at random."""

    def __init__(self, path: str | os.PathLike, *, read_size: int = READ_SIZE):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise InputError(self.path, "file not found")
        self.compression = _detect_compression(self.path)
        self.read_size = int(read_size)
        self._faidx = None
        self._faidx_tmp = None

    def __getstate__(self):  # picklable (e.g. for DataLoader workers): the pyfaidx handle is reopened on demand
        state = dict(self.__dict__)
        state["_faidx"] = state["_faidx_tmp"] = None
        return state

    def __repr__(self) -> str:
        return f"FastaFile({str(self.path)!r}, compression={self.compression!r})"

    # -- streaming --------------------------------------------------------------------------

    def _blocks(self) -> Iterator[bytes]:
        if self.compression == "none":
            return _plain_blocks(self.path, self.read_size)
        if self.compression == "bgzf":
            return _bgzf_blocks(self.path, self.read_size)
        return _gzip_blocks(self.path, self.read_size)

    def _line_at(self, offset: int) -> int:
        """1-based line of the byte at ``offset`` of the decompressed file (error path only)."""
        lines = 0
        seen = 0
        blocks = self._blocks()
        try:
            for b in blocks:
                if seen + len(b) >= offset:
                    lines += b.count(b"\n", 0, offset - seen)
                    break
                lines += b.count(b"\n")
                seen += len(b)
        except _StreamError:
            pass
        finally:
            blocks.close()
        return lines + 1

    def _error(self, message, *, record=None, offset=None):
        line = self._line_at(offset) if offset is not None else None
        return InputError(self.path, message, record=record, line=line)

    def _events(self, softmask: bool):
        """Parse the file; yields ("rec", name), ("seq", ids, mask), ("end", name, length).

        ``ids`` are bytes of token ids, ``mask`` bytes of 0/1 (1 = lowercase) or None.
        """
        names: set[str] = set()
        name = None  # current record
        hdr_off = 0  # decompressed offset of the current record's '>'
        length = 0
        hdr_parts = None  # pieces of a header line being read (None: not in a header)
        hdr_len = 0
        at_bol = True  # the next byte starts a line
        off = 0  # decompressed offset of the current block
        blocks = self._blocks()
        try:
            for blk in blocks:
                n = len(blk)
                pos = 3 if off == 0 and blk.startswith(b"\xef\xbb\xbf") else 0  # UTF-8 byte-order mark
                while pos < n:
                    if hdr_parts is not None:  # inside a header line
                        nl = blk.find(b"\n", pos)
                        stop = n if nl < 0 else nl
                        hdr_parts.append(blk[pos:stop])
                        hdr_len += stop - pos
                        if hdr_len > MAX_HEADER:
                            raise self._error("header line longer than 1 MiB (is this a FASTA file?)", offset=hdr_off)
                        if nl < 0:
                            break
                        name = self._header_name(b"".join(hdr_parts), hdr_off, names)
                        hdr_parts = None
                        yield ("rec", name)
                        pos = nl + 1
                        at_bol = True
                        continue
                    # Sequence lines (blank lines only, before the first record) up to the next header.
                    h = blk.find(b">", pos)
                    header = h >= 0 and (blk[h - 1] == 10 if h > pos else at_bol)
                    end = h if header else (n if h < 0 else h + 1)  # a '>' inside a line is an invalid byte
                    if end > pos:
                        seg = blk if (pos == 0 and end == n) else blk[pos:end]
                        if name is None:
                            rest = seg.lstrip(_WS)
                            if rest:
                                raise self._not_fasta(rest, off + end - len(rest))
                        else:
                            ids = seg.translate(ENCODE_TABLE, _WS)
                            if b"\xff" in ids:
                                i = seg.translate(_LOCATE_TABLE).find(b"\xff")
                                raise self._error(
                                    f"invalid character {_describe_byte(seg[i])} in sequence "
                                    "(not an IUPAC nucleotide code)",
                                    record=name,
                                    offset=off + pos + i,
                                )
                            if ids:
                                length += len(ids)
                                yield ("seq", ids, seg.translate(_MASK_TABLE, _WS) if softmask else None)
                        at_bol = blk[end - 1] == 10
                    if not header:
                        break
                    if name is not None:
                        yield self._end_record(name, length, hdr_off)
                    hdr_off = off + h
                    hdr_parts = []
                    hdr_len = 0
                    length = 0
                    pos = h + 1
                off += n
        except _StreamError as e:
            raise InputError(self.path, f"truncated or corrupt gzip stream ({e})", record=name) from None
        finally:
            blocks.close()
        if hdr_parts is not None:  # the file ends inside a header line
            name = self._header_name(b"".join(hdr_parts), hdr_off, names)
            yield ("rec", name)
        if name is None:
            raise InputError(self.path, "file is empty" if off == 0 else "no FASTA records (only blank lines)")
        yield self._end_record(name, length, hdr_off)

    def _end_record(self, name, length, hdr_off):
        if length == 0:
            raise self._error("record has no sequence", record=name, offset=hdr_off)
        return ("end", name, length)

    def _header_name(self, header: bytes, hdr_off: int, names: set) -> str:
        words = header.split(None, 1)
        if not words:
            raise self._error("header line '>' has no record name", offset=hdr_off)
        try:
            name = words[0].decode("utf-8")
        except UnicodeDecodeError:
            raise self._error("header line is not UTF-8 text (is this a FASTA file?)", offset=hdr_off) from None
        if name in names:
            raise self._error("duplicate record name (names must be unique)", record=name, offset=hdr_off)
        names.add(name)
        return name

    def _not_fasta(self, rest: bytes, offset: int) -> InputError:
        first = rest[:200].split(b"\n", 1)[0]
        binary = b"\x00" in first or any(c < 9 or 13 < c < 32 or c == 127 for c in first)
        if not binary:
            try:
                first.decode("utf-8")
            except UnicodeDecodeError as e:
                binary = e.start < len(first) - 4  # (a character cut off by the 200-byte limit is fine)
        what = " (binary data)" if binary else ""
        return self._error(f"not a FASTA file: the first non-blank line does not start with '>'{what}", offset=offset)

    def records(self, *, softmask: bool = False) -> Iterator[tuple]:
        """Whole records, in file order: ``(name, ids)``; with ``softmask=True``, ``(name, ids, mask)``.

        ``ids`` is a uint8 array of token ids; ``mask`` a bool array, True where the base was lowercase.
        One record at a time is held in memory.
        """
        parts: list = []
        masks: list = []
        # Closed explicitly: a consumer that stops early must not leave the reader thread to the GC.
        with contextlib.closing(self._events(softmask)) as events:
            for ev in events:
                if ev[0] == "seq":
                    parts.append(ev[1])
                    if softmask:
                        masks.append(ev[2])
                elif ev[0] == "end":
                    ids = _join(parts, np.uint8)
                    if softmask:
                        yield ev[1], ids, _join(masks, np.bool_)
                    else:
                        yield ev[1], ids
                    parts, masks = [], []

    def windows(self, window: int, stride: int | None = None, *, softmask: bool = False) -> Iterator[Window]:
        """Fixed windows over every record, with bounded memory (never a whole record).

        ``stride`` defaults to ``window`` (no overlap; ``stride < window`` overlaps, ``stride > window``
        leaves gaps).  For a record of length L the windows start at 0, stride, 2*stride, ...; the
        last one is the first window reaching L (its end is min(start + window, L)), so a record shorter
        than ``window`` gives one short window and no window starts at or past L.  See
        :func:`count_windows`.  ``ValueError`` for a non-positive window or stride.
        """
        if stride is None:
            stride = window
        _check_window(window, stride)
        return self._windows(int(window), int(stride), bool(softmask))

    def _windows(self, window: int, stride: int, softmask: bool) -> Iterator[Window]:
        name = None
        buf = _EMPTY
        mbuf = None
        buf_start = 0  # record coordinate of buf[0]
        got = 0  # bases of the record seen so far
        s = 0  # start of the next window
        last_end = 0
        # Closed explicitly: a consumer that stops early must not leave the reader thread to the GC.
        with contextlib.closing(self._events(softmask)) as events:
            for ev in events:
                kind = ev[0]
                if kind == "seq":
                    arr = np.frombuffer(ev[1], dtype=np.uint8)
                    marr = np.frombuffer(ev[2], dtype=np.bool_) if softmask else None
                    got += len(arr)
                    if s >= got:  # the whole piece lies in a gap between windows
                        buf, mbuf, buf_start = _EMPTY, (_EMPTY_MASK if softmask else None), got
                        continue
                    if s > buf_start + len(buf):  # skip into the new piece
                        cut = s - (got - len(arr))
                        buf, buf_start = arr[cut:], s
                        mbuf = marr[cut:] if softmask else None
                    elif len(buf) == 0:
                        buf = arr
                        mbuf = marr
                    else:
                        buf = np.concatenate((buf, arr))
                        mbuf = np.concatenate((mbuf, marr)) if softmask else None
                    while s + window <= got:
                        i = s - buf_start
                        yield Window(
                            name, s, s + window, buf[i : i + window].copy(),
                            mbuf[i : i + window].copy() if softmask else None,
                        )
                        last_end = s + window
                        s += stride
                    cut = min(s - buf_start, len(buf))
                    if cut:  # keep only the tail, as a copy (not a view) so the block it came from can be freed
                        buf = buf[cut:].copy()
                        mbuf = mbuf[cut:].copy() if softmask else None
                        buf_start += cut
                elif kind == "rec":
                    name = ev[1]
                    buf, mbuf, buf_start, got, s, last_end = _EMPTY, (_EMPTY_MASK if softmask else None), 0, 0, 0, 0
                else:  # end of record
                    length = ev[2]
                    if last_end < length and s < length:
                        i = s - buf_start
                        e = min(s + window, length)
                        yield Window(
                            name, s, e, buf[i : i + e - s].copy(),
                            mbuf[i : i + e - s].copy() if softmask else None,
                        )
                    buf, mbuf = _EMPTY, None

    # -- index / random access ---------------------------------------------------------------

    @property
    def fai_path(self) -> pathlib.Path:
        return self.path.with_name(self.path.name + ".fai")

    def lengths(self) -> dict[str, int]:
        """Record name -> length, in file order: from ``<file>.fai`` if present (after checking it),
        else from one streaming pass over the file."""
        if self.fai_path.exists():
            return {name: length for name, length, *_ in self._read_fai()}
        out: dict[str, int] = {}
        for ev in self._events(False):
            if ev[0] == "end":
                out[ev[1]] = ev[2]
        return out

    def _read_fai(self) -> list[tuple[str, int, int, int, int]]:
        fai = self.fai_path
        try:
            text = fai.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(fai, f"cannot read the FASTA index: {e}") from None
        rows = []
        names = set()
        prev_end = 0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            cols = line.rstrip("\r").split("\t")
            if len(cols) < 5:
                raise InputError(
                    fai, f"bad .fai line: expected 5 tab-separated columns, found {len(cols)}", line=lineno
                )
            name = cols[0]
            try:
                length, offset, lbases, lwidth = (int(c) for c in cols[1:5])
            except ValueError:
                raise InputError(fai, "bad .fai line: non-integer column", record=name, line=lineno) from None
            if length <= 0 or offset <= 0 or lbases <= 0 or not (lbases < lwidth <= lbases + 2):
                raise InputError(fai, "bad .fai line: inconsistent length/offset/line widths", record=name, line=lineno)
            if name in names:
                raise InputError(fai, "duplicate record name in .fai", record=name, line=lineno)
            if offset <= prev_end:
                raise InputError(
                    fai, "record offsets out of order or overlapping (stale index?)", record=name, line=lineno
                )
            names.add(name)
            prev_end = offset + (length // lbases) * lwidth + length % lbases
            rows.append((name, length, offset, lbases, lwidth))
        if not rows:
            raise InputError(fai, "empty FASTA index")
        if self.compression == "none":
            size = self.path.stat().st_size
            if prev_end > size:
                raise InputError(
                    fai, f"index describes {prev_end} bytes but the FASTA file has {size} (stale index? "
                    "delete it or re-run `samtools faidx`)"
                )
            name, _, offset, _, _ = rows[0]
            with open(self.path, "rb") as f:
                head = f.read(offset)
            if not head.startswith(b">") or head[1:].split(None, 1)[:1] != [name.encode()]:
                raise InputError(
                    fai, f"first record '{name}' does not match the FASTA file (stale index? delete it or "
                    "re-run `samtools faidx`)"
                )
        return rows

    def _index(self):
        if self._faidx is not None:
            return self._faidx
        if self.compression == "gzip":
            raise InputError(
                self.path,
                "random access needs an uncompressed or BGZF-compressed file, this is plain gzip; recompress "
                f"it with bgzip: `zcat {self.path} | bgzip > {self.path.with_suffix('.bgz')}` "
                "(then `samtools faidx` it)",
            )
        import pyfaidx

        kwargs = {}
        gzi = self.path.with_name(self.path.name + ".gzi")
        if self.fai_path.exists():
            self._read_fai()  # validate it before trusting it
        must_build = not self.fai_path.exists() or (self.compression == "bgzf" and not gzi.exists())
        if must_build and not os.access(self.path.parent, os.W_OK):
            # pyfaidx would write <file>.fai (and .gzi) next to the file: use a private temp dir instead
            self._faidx_tmp = tempfile.TemporaryDirectory(prefix="seqssm-fai-")
            kwargs["indexname"] = os.path.join(self._faidx_tmp.name, self.path.name + ".fai")
            if self.compression == "bgzf":
                kwargs["gzi_indexname"] = os.path.join(self._faidx_tmp.name, self.path.name + ".gzi")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._faidx = pyfaidx.Faidx(str(self.path), as_raw=True, strict_bounds=True, **kwargs)
        except (pyfaidx.FastaIndexingError, ValueError, OSError, IndexError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                self.path, f"cannot index the file for random access ({msg}); records()/windows() can still "
                "stream it"
            ) from None
        return self._faidx

    def fetch(self, chrom: str, start: int, end: int) -> np.ndarray:
        """uint8 ids of bases [start, end) (0-based) of record ``chrom``, read at random through pyfaidx.

        InputError for an unknown record, a range outside the record (``0 <= start <= end <= length``),
        an invalid character in the range, or a file that cannot be read at random (plain gzip).
        """
        fa = self._index()
        rec = fa.index.get(chrom)
        if rec is None:
            raise InputError(self.path, "no such record in the file", record=chrom)
        length = rec.rlen
        start, end = int(start), int(end)
        if not (0 <= start <= end <= length):
            raise InputError(
                self.path, f"region {start}-{end} is outside the record (length {length})", record=chrom
            )
        if start == end:
            return np.empty(0, dtype=np.uint8)
        try:
            seq = fa.from_file(chrom, start + 1, end)
        except (UnicodeDecodeError, ValueError, OSError) as e:
            raise InputError(self.path, f"cannot read region {start}-{end}: {e}", record=chrom) from None
        raw = seq.encode("latin-1", errors="replace")
        ids = raw.translate(ENCODE_TABLE)
        if len(ids) != end - start or b"\xff" in ids:
            i = ids.find(b"\xff") if b"\xff" in ids else None
            p = start + (i if i is not None else len(ids))
            off = rec.offset + (p // rec.lenc) * rec.lenb + p % rec.lenc
            if i is None:
                raise self._error("index does not match the file (stale .fai?)", record=chrom, offset=off)
            raise self._error(
                f"invalid character {_describe_byte(raw[i])} in sequence (not an IUPAC nucleotide code)",
                record=chrom, offset=off,
            )
        return np.frombuffer(bytearray(ids), dtype=np.uint8)

    def close(self) -> None:
        if self._faidx is not None:
            self._faidx.close()
            self._faidx = None
        if self._faidx_tmp is not None:
            self._faidx_tmp.cleanup()
            self._faidx_tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_EMPTY = np.empty(0, dtype=np.uint8)
_EMPTY_MASK = np.empty(0, dtype=np.bool_)


def _join(parts: list, dtype) -> np.ndarray:
    """Concatenate byte strings into one new (writable) array."""
    out = np.empty(sum(len(p) for p in parts), dtype=np.uint8)
    i = 0
    for p in parts:
        out[i : i + len(p)] = np.frombuffer(p, dtype=np.uint8)
        i += len(p)
    return out.view(dtype)
