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
import re
import shutil
import time
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
            keep = set(state["parts"]) | {STATE} | set(state.get("extra_files", []))
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


# --- shards of a torchrun job (seqssm embed) -------------------------------------------------------
# Rank R of W commits its chunks to `<output>.part-R-of-W.partial/` (the layout above) and renames
# it to `<output>.part-R-of-W` when done; rank 0 merges the shards into `output`.


def shard_path(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}-of-{world}")


def _shards(output: Path) -> list[tuple[Path, int]]:
    """Shard directories (complete or partial) of any world size beside `output`: (path, world)."""
    pat = re.compile(re.escape(output.name) + r"\.part-(\d+)-of-(\d+)(\.partial)?$")
    found = []
    for p in output.parent.glob(f"{glob_escape(output.name)}.part-*-of-*"):
        m = pat.match(p.name)
        if m:
            found.append((p, int(m.group(2))))
    return sorted(found)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def prepare_shards(output: Path, world: int, *, resume: bool, force: bool) -> None:
    """The checks of `prepare` for a whole torchrun job (rank 0, before the ranks open their shards).

    A partial run can only be resumed by as many processes as started it: the chunks of each shard
    depend on the world size."""
    shards = _shards(output)
    single = partial_dir(output)
    if force:
        for p, _ in shards:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if single.exists():
            shutil.rmtree(single)
        return
    if output.exists():
        if resume and not shards:
            raise SeqssmError(f"{output} is already complete; nothing to resume (use --force to redo it)")
        if not resume:
            raise SeqssmError(f"{output} exists; use --force to overwrite it")
    if single.exists():
        raise SeqssmError(f"an unfinished single-process run of {output} exists ({single}); resume it without "
                          "torchrun, or use --force to start over")
    other = sorted({w for _, w in shards if w != world})
    if other:
        raise SeqssmError(f"an unfinished run of {output} by {other[0]} processes exists; resume it with "
                          f"{other[0]} processes (torchrun --nproc_per_node ...), or use --force to start over")
    if shards and not resume:
        raise SeqssmError(f"an unfinished run of {output} exists ({shards[0][0].name}, ...); use --resume to "
                          "continue it or --force to start over")


def refuse_shards(output: Path, *, force: bool) -> None:
    """A single-process run: shards of an unfinished torchrun run are removed with --force, else refused."""
    shards = _shards(output)
    if not shards:
        return
    if force:
        for p, _ in shards:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    world = shards[0][1]
    raise SeqssmError(f"an unfinished run of {output} by {world} processes exists ({shards[0][0].name}, ...); "
                      f"resume it with {world} processes (torchrun --nproc_per_node ...), or use --force to start over")


def shard_complete(shard: Path, params: dict) -> bool:
    """Whether `shard` (renamed into place when done) holds this job's finished shard."""
    state_path = shard / STATE
    if not state_path.is_file():
        return False
    state = json.loads(state_path.read_text())
    if state.get("params") != params:
        changed = sorted(k for k in set(params) | set(state.get("params", {}))
                         if params.get(k) != state.get("params", {}).get(k))
        raise SeqssmError(f"cannot resume {shard}: it was made with different settings ({', '.join(changed)}); "
                          "use --force to start over")
    return bool(state.get("complete"))


def wait_for_shards(output: Path, world: int, *, log=None, poll: float = 0.5) -> list[dict]:
    """Rank 0: wait until every rank's shard is complete on disk; return their states in rank order.

    Through the files, not a collective: ranks finish at different times (a resumed shard may have
    little left), and a rank that dies ends the whole job through torchrun."""
    waited = 0.0
    said = False
    while True:
        states = []
        for r in range(world):
            st = shard_path(output, r, world) / STATE
            if not st.is_file():
                break
            states.append(json.loads(st.read_text()))
        if len(states) == world and all(s.get("complete") for s in states):
            return states
        if log is not None and not said and waited >= 5.0:
            log(f"waiting for the shards of ranks {len(states)}..{world - 1} ...")
            said = True
        time.sleep(poll)
        waited += poll


def _shard_part(output: Path, world: int, states: list[dict], chunk: int) -> Path:
    r, k = chunk % world, chunk // world
    parts = states[r]["parts"]
    if k >= len(parts):
        raise RuntimeError(f"shard {r} of {world} holds {len(parts)} chunks; chunk {chunk} is missing")
    return shard_path(output, r, world) / parts[k]


def _remove_shards(output: Path, world: int) -> None:
    for r in range(world):
        shutil.rmtree(shard_path(output, r, world), ignore_errors=True)


def merge_parquet_shards(output: Path, world: int, states: list[dict], schema: pa.Schema, n_chunks: int) -> None:
    """The chunks of all shards, in stream order, into `output`: what finish_parquet writes in one process."""
    tmp = output.with_name(f".{output.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as w:
        for c in range(n_chunks):
            w.write_table(pq.read_table(_shard_part(output, world, states, c), schema=schema))
    os.replace(tmp, output)
    _remove_shards(output, world)


def merge_token_shards(output: Path, world: int, states: list[dict], schema: pa.Schema, n_chunks: int, dim: int,
                       meta: dict, *, force: bool) -> None:
    """Per-token shards into one output directory: the rows of embeddings.npy concatenated in stream
    order and the index offsets moved accordingly (the single-process files, byte for byte)."""
    merged = output.with_name(f"{output.name}.merging")
    if merged.exists():
        shutil.rmtree(merged)
    merged.mkdir(parents=True)
    total = sum(int(s["tokens"]) for s in states)
    row_bytes = dim * 2
    srcs = [open(shard_path(output, r, world) / "embeddings.npy", "rb") for r in range(world)]
    try:
        with open(merged / "embeddings.npy", "wb") as f, pq.ParquetWriter(merged / "index.parquet", schema) as w:
            f.write(npy_header((total, dim)))
            row = 0
            for c in range(n_chunks):
                t = pq.read_table(_shard_part(output, world, states, c), schema=schema)
                offsets = t.column("offset").to_numpy()
                n = int(t.column("length").to_numpy().sum())
                if len(t):
                    src = srcs[c % world]
                    src.seek(NPY_HEADER_BYTES + int(offsets[0]) * row_bytes)
                    left = n * row_bytes
                    while left:
                        buf = src.read(min(left, 1 << 24))
                        if not buf:
                            raise RuntimeError(f"shard {c % world} of {world}: embeddings.npy is shorter than its index")
                        f.write(buf)
                        left -= len(buf)
                i = schema.get_field_index("offset")
                t = t.set_column(i, schema.field("offset"), pa.array(offsets - (offsets[0] if len(t) else 0) + row,
                                                                     type=pa.int64()))
                w.write_table(t)
                row += n
            f.flush()
            os.fsync(f.fileno())
    finally:
        for src in srcs:
            src.close()
    if row != total:
        raise RuntimeError(f"merged {row} token rows, the shards hold {total}")
    atomic_write_text(merged / "meta.json", json.dumps({**meta, "rows": total}, indent=1))
    move_into_place(merged, output, force=force)
    _remove_shards(output, world)


def move_into_place(done: Path, output: Path, *, force: bool) -> None:
    """Rename a finished output directory to its final name; with force, over an existing output
    (moved aside first, so a crash leaves one of the two whole, never a mixture)."""
    if output.exists() and force:
        trash = output.with_name(f".{output.name}.old")
        if trash.exists():
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        os.replace(output, trash)
        os.replace(done, output)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    else:
        os.replace(done, output)


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
