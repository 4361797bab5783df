"""MOSES benchmark data (splits, precomputed test statistics, structural filters), read from the
PyPI wheel molsets==0.3.1 as a zip archive: the `moses` package itself is not imported (it does
not work with current RDKit and pandas), only its data files are used.

The wheel is looked up in $SEQSSM_MOSES_WHEEL, then in the cache directory ($SEQSSM_CACHE, else
~/.cache/seqssm), and otherwise downloaded there with `pip download`. Its sha256 is checked
before any file inside it is read.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqssm.errors import SeqssmError

MOSES_REQUIREMENT = "molsets==0.3.1"
MOSES_WHEEL_NAME = "molsets-0.3.1-py3-none-any.whl"
MOSES_WHEEL_SHA256 = "7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34"
SPLITS = ("train", "test", "test_scaffolds")
STATS_SPLITS = ("test", "test_scaffolds")

_DATA = "moses/dataset/data/"
_METRICS = "moses/metrics/"


def default_cache_dir() -> Path:
    """Where downloads are kept: $SEQSSM_CACHE, else ~/.cache/seqssm."""
    return Path(os.environ.get("SEQSSM_CACHE") or Path.home() / ".cache" / "seqssm").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# (path, size, mtime) of wheels whose hash has been checked in this process: hashing 52 MB
# costs a fraction of a second, every load_* call would pay it again.
_verified: set[tuple[str, int, int]] = set()


def _verify(path: Path, origin: str) -> Path:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _verified:
        return path
    digest = _sha256(path)
    if digest != MOSES_WHEEL_SHA256:
        raise SeqssmError(f"{path} ({origin}): sha256 {digest}, expected {MOSES_WHEEL_SHA256} for "
                          f"{MOSES_WHEEL_NAME}; not using it (delete it, or point SEQSSM_MOSES_WHEEL "
                          f"at the right file)")
    _verified.add(key)
    return path


def moses_wheel(cache_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of the verified molsets 0.3.1 wheel: $SEQSSM_MOSES_WHEEL, the cached copy, or a fresh download."""
    env = os.environ.get("SEQSSM_MOSES_WHEEL")
    if env:
        path = Path(env).expanduser()
        if path.is_dir():
            path = path / MOSES_WHEEL_NAME
        if not path.is_file():
            raise SeqssmError(f"SEQSSM_MOSES_WHEEL={env}: no such file ({MOSES_WHEEL_NAME} expected)")
        return _verify(path, "SEQSSM_MOSES_WHEEL")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = root / "wheels" / MOSES_WHEEL_NAME
    if cached.is_file():
        return _verify(cached, "cached copy")
    if not download:
        raise SeqssmError(f"the MOSES data ({MOSES_WHEEL_NAME}) is not in {cached.parent}; run once with "
                          f"network access, or set SEQSSM_MOSES_WHEEL to a copy of the wheel")
    return _download(cached)


def _download(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", "30", "--retries", "2", "-d", str(tmp),
               MOSES_REQUIREMENT]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SeqssmError(f"cannot download {MOSES_REQUIREMENT} (the MOSES data): {e}; set "
                              f"SEQSSM_MOSES_WHEEL to a copy of {MOSES_WHEEL_NAME}") from None
        got = tmp / MOSES_WHEEL_NAME
        if res.returncode != 0 or not got.is_file():
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SeqssmError(f"cannot download {MOSES_REQUIREMENT} (the MOSES data; offline?): {tail[0]}; "
                              f"set SEQSSM_MOSES_WHEEL to a copy of {MOSES_WHEEL_NAME}")
        _verify(got, f"downloaded {MOSES_REQUIREMENT}")
        os.replace(got, target)
        return _verify(target, "cached copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_member(member: str, wheel: Path | None) -> bytes:
    wheel = wheel if wheel is not None else moses_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except (KeyError, zipfile.BadZipFile) as e:
        raise SeqssmError(f"{wheel}: cannot read {member}: {e}") from None


@functools.lru_cache(maxsize=3)
def _split(name: str, wheel: Path | None) -> tuple[str, ...]:
    data = gzip.decompress(_read_member(f"{_DATA}{name}.csv.gz", wheel))
    rows = csv.reader(io.StringIO(data.decode("utf-8")))
    header = next(rows)
    col = header.index("SMILES")
    return tuple(r[col] for r in rows if r)


def load_split(name: str, *, wheel: Path | None = None) -> list[str]:
    """SMILES of the MOSES split `name` (train 1,584,663; test 176,074; test_scaffolds 176,225)."""
    if name not in SPLITS:
        raise SeqssmError(f"unknown MOSES split '{name}' (one of {', '.join(SPLITS)})")
    return list(_split(name, wheel))


@functools.lru_cache(maxsize=2)
def load_stats(name: str, *, wheel: Path | None = None) -> dict:
    """Precomputed statistics of a MOSES test split, as MOSES computed them.

    Keys: FCD {mu [512], sigma [512, 512]}, SNN {fps: uint8 [n, 1024] Morgan r=2 bits},
    Frag {frag: Counter of BRICS fragments}, Scaf {scaf: Counter of scaffolds},
    logP / SA / QED / weight {values: list}. The dict is cached and shared: do not modify it.
    """
    if name not in STATS_SPLITS:
        raise SeqssmError(f"no MOSES statistics for '{name}' (one of {', '.join(STATS_SPLITS)})")
    raw = _read_member(f"{_DATA}{name}_stats.npz", wheel)
    # The statistics are a pickled dict (numpy arrays and Counters), so allow_pickle is needed.
    # Unpickling runs code chosen by the file's author; that is acceptable here only because the
    # bytes come from a wheel whose sha256 is pinned (MOSES_WHEEL_SHA256) and checked by
    # moses_wheel() before anything in it is read.
    with np.load(io.BytesIO(raw), allow_pickle=True) as npz:
        return npz["stats"].item()


@dataclass(frozen=True)
class FilterData:
    """The SMARTS MOSES screens molecules with: (name, SMARTS) of its MCF and of the PAINS set."""

    mcf: tuple[tuple[str, str], ...]
    pains: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=1)
def filters_data(*, wheel: Path | None = None) -> FilterData:
    """MCF (mcf.csv) and PAINS (wehi_pains.csv) SMARTS from the MOSES wheel."""
    mcf_rows = list(csv.reader(io.StringIO(_read_member(f"{_METRICS}mcf.csv", wheel).decode("utf-8"))))
    header = [h.strip() for h in mcf_rows[0]]
    i_name, i_smarts = header.index("names"), header.index("smarts")
    mcf = tuple((r[i_name].strip(), r[i_smarts].strip()) for r in mcf_rows[1:] if r)
    # wehi_pains.csv has no header: SMARTS, then the name; fields are padded with spaces.
    pains_rows = csv.reader(io.StringIO(_read_member(f"{_METRICS}wehi_pains.csv", wheel).decode("utf-8")))
    pains = tuple((r[1].strip(), r[0].strip()) for r in pains_rows if r)
    return FilterData(mcf=mcf, pains=pains)
