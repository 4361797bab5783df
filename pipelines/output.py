"""Crash-safe, resumable output for long jobs.

A job writes into `<output>.partial/`: numbered part files, each complete before it is named, and a
`state.json` that records which parts and how much of the input are done. The state is replaced
atomically after each part, so a job killed at any point resumes from the last committed part and
never duplicates or loses rows. Only when the job finishes is the final output assembled and moved
into place with one rename; until then an existing output is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seqssm.errors import SeqssmError
from seqssm.io.atomic import atomic_write_text

STATE = "state.json"


def partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def prepare(output: Path, params: dict, *, resume: bool, force: bool) -> tuple[Path, dict]:
    """Create or reopen the partial directory for `output`; return it and the saved state.

    `params` identify the job: resuming with different ones is refused, because the committed rows
    would not match the rest.
    """
    part = partial_dir(output)
    if output.exists() and not force:
        if resume and not part.exists():
            raise SeqssmError(f"{output} is already complete; nothing to resume (use --force to redo it)")
        if not resume:
            raise SeqssmError(f"{output} exists; use --force to overwrite it")
    if part.exists():
        state_path = part / STATE
        if resume and state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("params") != params:
                changed = sorted(
                    k for k in set(params) | set(state.get("params", {}))
                    if params.get(k) != state.get("params", {}).get(k)
                )
                raise SeqssmError(
                    f"cannot resume {output}: the partial run was started with different settings "
                    f"({', '.join(changed)}); use --force to start over"
                )
            # Drop anything written after the last commit (a part the job died while writing).
            keep = set(state["parts"]) | {STATE}
            for p in part.iterdir():
                if p.name not in keep and not p.name.startswith("embeddings"):
                    p.unlink() if p.is_file() else shutil.rmtree(p)
            return part, state
        if not force and not resume:
            raise SeqssmError(
                f"an unfinished run of {output} exists ({part}); use --resume to continue it or --force to start over"
            )
        shutil.rmtree(part)
    elif resume and not output.exists():
        pass  # nothing to resume: start fresh, as a user running with --resume by habit expects
    part.mkdir(parents=True)
    state = {"params": params, "parts": [], "items_done": 0, "rows": 0, "skipped": 0, "tokens": 0}
    commit(part, state)
    return part, state


def commit(part: Path, state: dict) -> None:
    atomic_write_text(part / STATE, json.dumps(state, indent=1))


def write_part(part: Path, table: pa.Table, state: dict) -> str:
    name = f"part-{len(state['parts']):06d}.parquet"
    tmp = part / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, part / name)
    return name


def finish_parquet(part: Path, output: Path, schema: pa.Schema, state: dict) -> None:
    """Concatenate the committed parts into `output` (one rename at the end)."""
    tmp = output.with_name(f".{output.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as w:
        for name in state["parts"]:
            w.write_table(pq.read_table(part / name, schema=schema))
    os.replace(tmp, output)
    shutil.rmtree(part)


# --- per-token arrays: one float16 .npy grown in place --------------------------------------------
# The .npy header is written with room to spare and rewritten with the final shape at the end, so
# tokens stream to disk without holding them in memory and the result loads with mmap_mode="r".
NPY_HEADER_BYTES = 256


def npy_header(shape: tuple[int, ...], dtype=np.float16) -> bytes:
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    body = repr(d).encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("npy header too long")
    body = body + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


class TokenArrayWriter:
    """Appends rows of float16 [n, dim] to `<part>/embeddings.npy`; truncates to the committed size on resume."""

    def __init__(self, part: Path, dim: int, committed_rows: int):
        self.path = part / "embeddings.npy"
        self.dim = dim
        mode = "r+b" if self.path.exists() else "w+b"
        self.f = open(self.path, mode)
        if mode == "w+b":
            self.f.write(npy_header((0, dim)))
        self.rows = committed_rows
        self.f.truncate(NPY_HEADER_BYTES + committed_rows * dim * 2)
        self.f.seek(0, os.SEEK_END)

    def append(self, arr: np.ndarray) -> int:
        """Write rows; return the row offset of the first one."""
        assert arr.dtype == np.float16 and arr.ndim == 2 and arr.shape[1] == self.dim
        offset = self.rows
        self.f.write(np.ascontiguousarray(arr).tobytes())
        self.rows += arr.shape[0]
        return offset

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def finish(self) -> None:
        self.f.seek(0)
        self.f.write(npy_header((self.rows, self.dim)))
        self.sync()
        self.f.close()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def prepare_run_dir(out: Path, *, kind: str, resume: bool, force: bool, finished_hint: str,
                    run_file: str = "run.json") -> dict | None:
    """Check a training run's output directory; return its saved run.json when there is a run to resume.

    `kind` is the command that owns such directories ("pretrain", "finetune"); `finished_hint` ends the
    error for a finished run (how to train it further). A directory of something else is never removed.
    """
    if out.exists() and not out.is_dir():
        raise SeqssmError(f"{out} exists and is not a directory")
    path = out / run_file
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None and saved.get("kind", "pretrain") != kind:  # early pretrain runs wrote no kind
        raise SeqssmError(f"{out} holds a run of another command; choose a new output directory")
    if out.exists() and saved is None and any(out.iterdir()):
        raise SeqssmError(f"{out} exists, is not empty and holds no seqssm {kind} run ({run_file}); "
                          "choose a new output directory")
    if saved is None:
        return None
    if force:
        shutil.rmtree(out)
        return None
    if resume:
        return saved
    if saved.get("status") == "finished":
        raise SeqssmError(f"{out} already holds a finished model{finished_hint}")
    raise SeqssmError(f"{out} holds an unfinished run; use --resume to continue it or --force to start over")


def check_run_budget(max_minutes: float | None, max_steps_this_run: int | None) -> None:
    """Validate the options that cut a training job short (to fit a time slot)."""
    if max_minutes is not None and max_minutes <= 0:
        raise SeqssmError("--max-minutes must be > 0")
    if max_steps_this_run is not None and max_steps_this_run < 1:
        raise SeqssmError("--max-steps-this-run must be >= 1")
