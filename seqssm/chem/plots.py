"""Pictures of molecule sets: a grid of structures, and property distributions against a reference."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rdkit.Chem import Draw

from seqssm.chem import metrics
from seqssm.chem.data import parallel_map
from seqssm.errors import SeqssmError

PANELS = (("logP", "logP (Crippen)"), ("QED", "QED"), ("weight", "Molecular weight (Da)"), ("SA", "SA score"))


def _atomic_save(path, write) -> Path:
    """Call write(temporary path) for a file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def molecule_grid(smiles: Sequence[str], path, *, legends: Sequence[str] | None = None, per_row: int = 6,
                  size: int = 250, max_mols: int = 48) -> Path:
    """PNG grid of the first `max_mols` valid molecules (invalid SMILES are skipped with their legends)."""
    if legends is not None and len(legends) != len(smiles):
        raise ValueError(f"{len(legends)} legends for {len(smiles)} SMILES")
    mols, labels = [], []
    for i, s in enumerate(smiles):
        mol = metrics.get_mol(s)
        if mol is None:
            continue
        mols.append(mol)
        labels.append(legends[i] if legends is not None else "")
        if len(mols) == max_mols:
            break
    if not mols:
        raise SeqssmError(f"{path}: no valid molecule to draw among {len(smiles)} SMILES")
    image = Draw.MolsToGridImage(mols, molsPerRow=per_row, subImgSize=(size, size), legends=labels)
    return _atomic_save(path, lambda tmp: image.save(tmp, format="PNG"))


def _properties_chunk(chunk: list[str]) -> list[tuple[float, ...] | None]:
    out = []
    for s in chunk:
        mol = metrics.get_mol(s)
        out.append(None if mol is None else tuple(getattr(metrics, name)(mol) for name, _ in PANELS))
    return out


def _properties(smiles: Sequence[str], max_mols: int, n_jobs: int) -> dict[str, np.ndarray]:
    smiles = list(smiles)
    if len(smiles) > max_mols:  # a fixed random subset: the histograms do not need more
        smiles = random.Random(0).sample(smiles, max_mols)
    rows = [r for r in parallel_map(_properties_chunk, smiles, n_jobs, chunk=250) if r is not None]
    values = np.array(rows, dtype=np.float64).reshape(len(rows), len(PANELS))
    return {name: values[:, j] for j, (name, _) in enumerate(PANELS)}


def property_distributions(generated: Sequence[str], reference: Sequence[str], path, *,
                           labels: tuple[str, str] = ("generated", "reference"), max_mols: int = 10_000,
                           n_jobs: int = 1) -> Path:
    """PNG of 2x2 histograms (logP, QED, molecular weight, SA) of two sets of valid molecules.

    Each panel's title gives the Wasserstein-1 distance between the two samples; sets larger
    than `max_mols` are drawn from a fixed random subset.
    """
    gen = _properties(generated, max_mols, n_jobs)
    ref = _properties(reference, max_mols, n_jobs)
    for name, values in (("generated", gen), ("reference", ref)):
        if not len(values["logP"]):
            raise SeqssmError(f"{path}: no valid molecule in the {name} set")
    fig = Figure(figsize=(10, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    for ax, (name, title) in zip(axes, PANELS):
        g, r = gen[name], ref[name]
        lo, hi = np.percentile(np.concatenate([g, r]), [0.5, 99.5])
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 50)
        ax.hist(r, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color="tab:gray",
                label=f"{labels[1]} (n={len(r):,})")
        ax.hist(g, bins=bins, density=True, histtype="step", linewidth=1.8, color="tab:blue",
                label=f"{labels[0]} (n={len(g):,})")
        ax.set_title(f"{title}   W1 = {metrics.wasserstein_distance(r, g):.3g}")
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    return _atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
