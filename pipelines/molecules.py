"""`seqssm generate-molecules`, `score-molecules` and `evaluate-molecules`.

generate: sample molecules in recurrent mode on the device (continuous batching: a slot takes the
next molecule as soon as its own has ended; seqssm.chem.sampling) -> check and canonicalise every
SMILES with RDKit -> keep what the filters ask for (--valid-only, --unique) until -n are collected ->
write .smi / .csv / .sdf atomically -> summary (validity, uniqueness, novelty when the training
set is known) and optionally a grid picture of molecules.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqssm.errors import SeqssmError
from seqssm.io.atomic import atomic_write_text

OUTPUT_KINDS = (".smi", ".csv", ".sdf")


@dataclass
class GenerateOptions:
    n: int = 1000
    model: str | None = None
    output: Path | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int | None = None
    device: str = "auto"
    valid_only: bool = False
    unique: bool = False
    grid: Path | None = None
    training_set: Path | None = None
    max_batches: int | None = None
    fast: str = "auto"  # auto | on | off: the CUDA-graph sampler
    n_jobs: int = 1
    quiet: bool = False


@dataclass
class GenerateSummary:
    output: Path | None
    model: str
    requested: int
    written: int
    sampled: int
    valid: int
    unique_valid: int
    novel: int | None
    training_set: str | None
    ended: int
    seconds: float
    sampling_seconds: float
    device: str
    sampler: str
    rows: list = field(default_factory=list)

    @property
    def validity(self) -> float:
        return self.valid / self.sampled if self.sampled else float("nan")

    @property
    def uniqueness(self) -> float:
        return self.unique_valid / self.valid if self.valid else float("nan")

    @property
    def novelty(self) -> float | None:
        return None if self.novel is None or not self.unique_valid else self.novel / self.unique_valid


def _output_kind(path: Path | None) -> str | None:
    if path is None:
        return None
    name = path.name.lower()
    for ext in OUTPUT_KINDS:
        if name.endswith(ext) or name.endswith(ext + ".gz"):
            return ext
    raise SeqssmError(f"{path}: output must end in .smi, .csv or .sdf")


def _training_set(opts_path: Path | None, info: dict, n_jobs: int = 1) -> tuple[set | None, str | None]:
    """Canonical SMILES of the training set, when known: --training-set, else the file the model
    was trained on (if still there), else the MOSES split from a local cache (never downloaded here)."""
    from seqssm.chem.data import canonicalize_many, read_smiles

    if opts_path is not None:
        smi = read_smiles(opts_path)
        can = canonicalize_many(smi, n_jobs=n_jobs)
        return {c for c in can if c}, str(opts_path)
    data = info.get("training_data") or {}
    if data.get("moses_split"):
        from seqssm.chem import moses

        try:
            smi = moses.load_split(data["moses_split"], wheel=moses.moses_wheel(download=False))
        except SeqssmError:
            return None, None
        return set(smi), f"MOSES {data['moses_split']} ({len(smi):,})"
    files = [Path(p) for p in data.get("smiles", [])]
    if files and all(p.is_file() for p in files):
        smi = []
        for p in files:
            smi.extend(read_smiles(p))
        can = canonicalize_many(smi, n_jobs=n_jobs)
        return {c for c in can if c}, ", ".join(map(str, files))
    return None, None


def run_generate(opts: GenerateOptions, console=None) -> GenerateSummary:
    from rich.console import Console

    from seqssm.chem.data import canonicalize_many
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.chem.sampling import batch_generator, check_sampling_args, make_sampler
    from seqssm.pipelines.progress import BasesProgress
    from seqssm.training.lm import resolve_device

    t0 = time.monotonic()
    console = console or Console(stderr=True)
    if opts.n < 1:
        raise SeqssmError(f"-n must be at least 1, not {opts.n}")
    check_sampling_args(opts.temperature, opts.top_k, opts.top_p)
    kind = _output_kind(opts.output)
    if opts.grid is not None and not str(opts.grid).lower().endswith(".png"):
        raise SeqssmError(f"--grid {opts.grid}: the picture must be a .png file")
    device = resolve_device(opts.device)
    loaded = load_chem_model(opts.model, device=device)
    model, tok = loaded.model, loaded.tokenizer
    batch_size = opts.batch_size or (8192 if device.type == "cuda" else 256)
    if batch_size < 1:
        raise SeqssmError(f"--batch-size must be at least 1, not {batch_size}")
    filtered = opts.valid_only or opts.unique
    batch_size = min(batch_size, max(opts.n, 1)) if not filtered else batch_size
    sampler = make_sampler(model, batch_size, device=device, temperature=opts.temperature, top_k=opts.top_k,
                           top_p=opts.top_p, fast=opts.fast)
    model.setup_step()  # discretise once, outside the timed sampling
    max_batches = opts.max_batches or max(20, 20 * -(-opts.n // batch_size))
    max_samples = max_batches * batch_size  # the limit counts batches' worth of molecules
    per_call = 32 * batch_size  # a call's slots drain at its end: long calls, but a bounded wait for the progress bar

    rows: list[dict] = []
    seen: set[str] = set()
    stats = {"sampled": 0, "valid": 0, "ended": 0}
    valid_canon: set[str] = set()
    sampling_s = 0.0
    with BasesProgress(opts.n, "generate", unit="mol", quiet=opts.quiet) as bar:
        call = 0
        while len(rows) < opts.n:
            if stats["sampled"] >= max_samples:
                raise SeqssmError(
                    f"only {len(rows):,} of {opts.n:,} molecules passed the filters after "
                    f"{stats['sampled']:,} samples ({-(-stats['sampled'] // batch_size)} batches' worth); "
                    "relax --valid-only/--unique or raise --max-batches")
            need = opts.n - len(rows)
            # with filters, at least a batch's worth, as a fixed batch drew; the molecules come in start
            # order, so taking the first ones that pass is an unbiased choice
            want = min(max(need, batch_size) if filtered else need, per_call, max_samples - stats["sampled"])
            ts = time.perf_counter()
            batch = sampler(want, batch_generator(opts.seed, call, device))
            sampling_s += time.perf_counter() - ts
            call += 1
            smiles = tok.decode_batch(batch.tokens)
            canon = canonicalize_many(smiles, n_jobs=opts.n_jobs)
            added = 0
            for i, (s, c) in enumerate(zip(smiles, canon)):
                stats["sampled"] += 1
                ended = bool(batch.ended[i])
                stats["ended"] += ended
                valid = c is not None and ended and len(s) > 0
                if valid:
                    stats["valid"] += 1
                    valid_canon.add(c)
                if opts.valid_only and not valid:
                    continue
                key = c if valid else s
                if opts.unique and key in seen:
                    continue
                seen.add(key)
                rows.append({"id": f"mol{len(rows) + 1:07d}", "smiles": s, "valid": valid,
                             "canonical_smiles": c if valid else "", "log_likelihood": float(batch.log_likelihood[i]),
                             "n_tokens": int((batch.tokens[i] != tok.pad_id).sum())})
                added += 1
                if len(rows) >= opts.n:
                    break
            bar.advance(added)
    if opts.output is not None:
        write_molecules(rows, opts.output, kind)
    # Novelty canonicalises the whole training set (minutes for MOSES): only when it will be shown
    # or was asked for, and after the molecules are safely written.
    train = train_name = None
    if not opts.quiet or opts.training_set is not None:
        train, train_name = _training_set(opts.training_set, loaded.info, n_jobs=opts.n_jobs)
    novel = len(valid_canon - train) if train is not None else None
    if opts.grid is not None:
        from seqssm.chem.plots import molecule_grid

        valid_rows = [r for r in rows if r["valid"]][:48]
        if not valid_rows:
            raise SeqssmError(f"--grid {opts.grid}: no valid molecule to draw")
        molecule_grid([r["canonical_smiles"] for r in valid_rows], opts.grid,
                      legends=[f"{r['id']}  logL {r['log_likelihood']:.1f}" for r in valid_rows])
    return GenerateSummary(opts.output, loaded.name, opts.n, len(rows), stats["sampled"], stats["valid"],
                           len(valid_canon), novel, train_name, stats["ended"], time.monotonic() - t0, sampling_s,
                           str(device), sampler.name, rows)


def write_molecules(rows: list[dict], path: Path, kind: str | None = None) -> None:
    """Write rows atomically as .smi (canonical SMILES when valid, else as sampled; then the id),
    .csv (every field) or .sdf (valid molecules only, with their fields as properties)."""
    kind = kind or _output_kind(path)
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise SeqssmError(f"{path}: the directory {path.parent} does not exist")
    if kind == ".smi":
        text = "".join(f"{r['canonical_smiles'] or r['smiles']}\t{r['id']}\n" for r in rows)
    elif kind == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = ["id", "smiles", "valid", "canonical_smiles", "log_likelihood", "n_tokens"]
        w.writerow(cols)
        for r in rows:
            w.writerow([r["id"], r["smiles"], int(r["valid"]), r["canonical_smiles"], f"{r['log_likelihood']:.6f}",
                        r["n_tokens"]])
        text = buf.getvalue()
    else:
        from rdkit import Chem

        buf = io.StringIO()
        w = Chem.SDWriter(buf)
        for r in rows:
            if not r["valid"]:
                continue
            mol = Chem.MolFromSmiles(r["canonical_smiles"])
            mol.SetProp("_Name", r["id"])
            mol.SetProp("SMILES", r["canonical_smiles"])
            mol.SetProp("log_likelihood", f"{r['log_likelihood']:.6f}")
            w.write(mol)
        w.close()
        text = buf.getvalue()
    if str(path).lower().endswith(".gz"):
        import gzip

        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with gzip.open(tmp, "wt") as f:
            f.write(text)
        os.replace(tmp, path)
    else:
        atomic_write_text(path, text)


# ----------------------------------------------------------------------------- score


@dataclass
class ScoreSummary:
    output: Path | None
    scored: int
    failed: int
    mean_log_likelihood: float
    rows: list


def run_score(smiles_file: Path, *, model: str | None, output: Path | None, device: str = "auto",
              batch_size: int = 512, column: str | None = None) -> ScoreSummary:
    """Log-likelihood of each SMILES of a file under the model; those it cannot encode get NA and a reason."""
    from seqssm.chem.data import canonical, read_smiles
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.chem.sampling import score_smiles
    from seqssm.training.lm import resolve_device

    dev = resolve_device(device)
    loaded = load_chem_model(model, device=dev)
    smiles = read_smiles(smiles_file, column=column)
    if not smiles:
        raise SeqssmError(f"{smiles_file}: no SMILES found")
    ok, notes, n_tok = [], [], []
    for s in smiles:
        try:
            ids = loaded.tokenizer.encode(s)
        except SeqssmError as e:
            notes.append(str(e).split(": ", 1)[-1])
            n_tok.append(0)
            continue
        if len(ids) > loaded.model.cfg.max_len:
            notes.append(f"{len(ids)} tokens with bos/eos, over the model's maximum {loaded.model.cfg.max_len}")
            n_tok.append(len(ids) - 2)
            continue
        ok.append(len(notes))
        notes.append("")
        n_tok.append(len(ids) - 2)
    ll = np.full(len(smiles), np.nan)
    if ok:
        ll[ok] = score_smiles(loaded.model, loaded.tokenizer, [smiles[i] for i in ok], device=dev, batch_size=batch_size)
    rows = []
    for i, s in enumerate(smiles):
        rows.append({"smiles": s, "valid": canonical(s) is not None, "log_likelihood": ll[i], "n_tokens": n_tok[i],
                     "nll_per_token": (-ll[i] / (n_tok[i] + 1)) if np.isfinite(ll[i]) else np.nan, "note": notes[i]})
    if output is not None:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if str(output).endswith((".tsv", ".txt")) else ",", lineterminator="\n")
        w.writerow(["smiles", "valid", "log_likelihood", "n_tokens", "nll_per_token", "note"])
        for r in rows:
            fin = np.isfinite(r["log_likelihood"])
            w.writerow([r["smiles"], int(r["valid"]), f"{r['log_likelihood']:.6f}" if fin else "NA", r["n_tokens"],
                        f"{r['nll_per_token']:.6f}" if fin else "NA", r["note"]])
        atomic_write_text(Path(output), buf.getvalue())
    scored = int(np.isfinite(ll).sum())
    return ScoreSummary(output, scored, len(smiles) - scored,
                        float(np.nanmean(ll)) if scored else float("nan"), rows)


# ----------------------------------------------------------------------------- evaluate


def run_evaluate(generated_file: Path, *, output: Path | None, train: str | None = "moses", reference: str = "moses",
                 device: str = "auto", plot: Path | None = None, n_jobs: int = 1, column: str | None = None,
                 limit: int | None = None, console=None) -> dict:
    """MOSES metrics of a generated set (first ``limit`` SMILES), written as JSON (and a property plot)."""
    from seqssm.chem import metrics, moses
    from seqssm.chem.data import read_smiles
    from seqssm.training.lm import resolve_device

    dev = resolve_device(device)
    gen = read_smiles(generated_file, column=column)
    if limit:
        gen = gen[:limit]
    if not gen:
        raise SeqssmError(f"{generated_file}: no SMILES found")
    train_smiles = None
    if train == "moses":
        train_smiles = moses.load_split("train")
    elif train:
        train_smiles = read_smiles(Path(train))
    if reference != "moses":
        raise SeqssmError(f"--reference {reference}: only the MOSES reference statistics are available")
    res = metrics.evaluate(gen, train=train_smiles, reference="moses", device=str(dev), n_jobs=n_jobs)
    record = {"generated_file": str(generated_file), "n": len(gen), "train": train, "reference": reference,
              "metrics": res}
    if output is not None:
        atomic_write_text(Path(output), json.dumps(record, indent=2, default=float) + "\n")
    if plot is not None:
        from seqssm.chem.plots import property_distributions

        property_distributions(gen, moses.load_split("test"), plot)
    return record
