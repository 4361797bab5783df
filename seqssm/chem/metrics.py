"""Distribution-learning metrics of generated molecules, with the definitions of MOSES
(Polykovskiy et al. 2020, molsets 0.3.1), computed batched: Tanimoto similarities as chunked
matrix products on the chosen torch device, RDKit work per unique molecule over worker processes.

Definitions (as MOSES computes them, including its quirks):
  valid       fraction of generated SMILES RDKit parses (an empty string is invalid);
  unique@k    distinct canonical SMILES among the first k valid ones, over their number;
  novelty     distinct valid canonical SMILES not in the training set, over all distinct valid ones;
  FCD         Fréchet distance between Gaussians fitted to ChemNet activations;
  SNN         mean over generated molecules of the highest Tanimoto similarity (Morgan r=2,
              1024 bits) to a reference molecule;
  Frag, Scaf  cosine similarity of BRICS-fragment / Bemis-Murcko-scaffold (two rings or more)
              count vectors;
  IntDiv(p)   1 - mean_i (mean_j T_ij^p)^(1/p) over all pairs of generated molecules, self-pairs
              included (IntDiv2 is p = 2);
  Filters     fraction passing MOSES's MCF and PAINS SMARTS, with no charge, no ring of 8 atoms or
              more, only C N S O F Cl Br H;
  logP, SA, QED, weight   1-D Wasserstein distance to the test set's values.
Every metric after `valid` is computed on the valid molecules, duplicates included.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem, DataStructs, RDConfig, RDLogger
from rdkit.Chem import Crippen, Descriptors, rdFingerprintGenerator
from rdkit.Chem import QED as _QED
from rdkit.Chem.Scaffolds import MurckoScaffold

from seqssm.chem import moses
from seqssm.chem.data import canonical, canonicalize_many, parallel_map
from seqssm.errors import SeqssmError

RDLogger.DisableLog("rdApp.*")

FP_RADIUS = 2
FP_BITS = 1024
SCAFFOLD_MIN_RINGS = 2
FILTER_ATOMS = frozenset({"C", "N", "S", "O", "F", "Cl", "Br", "H"})
PROPERTIES = ("logP", "SA", "QED", "weight")
CHEMNET_PAD = 350  # ChemNet reads one-hot SMILES padded to 350 positions (fcd_torch's SmilesDataset)

_morgan = rdFingerprintGenerator.GetMorganGenerator(radius=FP_RADIUS, fpSize=FP_BITS)


# -- molecules ----------------------------------------------------------------------------

def get_mol(smiles_or_mol) -> Chem.Mol | None:
    """RDKit molecule of a SMILES (None when unparsable or empty); a Mol is returned as it is."""
    if not isinstance(smiles_or_mol, str):
        return smiles_or_mol
    if not smiles_or_mol:
        return None
    mol = Chem.MolFromSmiles(smiles_or_mol)
    if mol is None:
        return None
    try:
        Chem.SanitizeMol(mol)
    except ValueError:
        return None
    return mol


def _mol(smiles_or_mol) -> Chem.Mol:
    mol = get_mol(smiles_or_mol)
    if mol is None:
        raise ValueError(f"invalid molecule {smiles_or_mol!r}: metrics other than validity take valid ones")
    return mol


def logP(mol) -> float:
    """Wildman-Crippen logP (RDKit)."""
    return Crippen.MolLogP(_mol(mol))


def QED(mol) -> float:
    """Quantitative estimate of drug-likeness (RDKit, default weights)."""
    return _QED.qed(_mol(mol))


def weight(mol) -> float:
    """Average molecular weight (RDKit MolWt)."""
    return Descriptors.MolWt(_mol(mol))


@functools.lru_cache(maxsize=1)
def _sascorer():
    path = Path(RDConfig.RDContribDir) / "SA_Score" / "sascorer.py"
    if not path.is_file():
        raise SeqssmError(f"the SA score needs RDKit's Contrib SA_Score ({path} is missing); "
                          f"install RDKit from PyPI, which ships it")
    spec = importlib.util.spec_from_file_location("_rdkit_contrib_sascorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def SA(mol) -> float:
    """Synthetic accessibility score, 1 (easy) to 10 (Ertl & Schuffenhauer 2009; RDKit Contrib)."""
    return _sascorer().calculateScore(_mol(mol))


_PROPERTY_FUNCS = {"logP": logP, "SA": SA, "QED": QED, "weight": weight}


def fragments(mol) -> list[str]:
    """SMILES of the BRICS fragments of a molecule (with their [n*] attachment points)."""
    return Chem.MolToSmiles(Chem.FragmentOnBRICSBonds(_mol(mol))).split(".")


def scaffold(mol, min_rings: int = SCAFFOLD_MIN_RINGS) -> str | None:
    """Bemis-Murcko scaffold SMILES, or None when it has fewer than `min_rings` rings."""
    try:
        scaf = MurckoScaffold.GetScaffoldForMol(_mol(mol))
    except (ValueError, RuntimeError):
        return None
    smiles = Chem.MolToSmiles(scaf)
    if not smiles or scaf.GetRingInfo().NumRings() < min_rings:
        return None
    return smiles


def fingerprint_bits(mol) -> np.ndarray:
    """On-bit indices of the Morgan fingerprint (radius 2, 1024 bits)."""
    return np.flatnonzero(_morgan.GetFingerprintAsNumPy(_mol(mol))).astype(np.int16)


def fingerprints(mols: Sequence) -> np.ndarray:
    """Morgan fingerprints (radius 2, 1024 bits) as a uint8 0/1 matrix [n, 1024]."""
    return _bit_matrix([fingerprint_bits(m) for m in mols])


def _bit_matrix(bits: Sequence[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(bits), FP_BITS), dtype=np.uint8)
    if bits:
        rows = np.repeat(np.arange(len(bits)), [len(b) for b in bits])
        out[rows, np.concatenate(bits).astype(np.int64)] = 1
    return out


# -- structural filters -------------------------------------------------------------------

class _Filters:
    """MOSES's MCF + PAINS SMARTS, with a pattern-fingerprint screen in front of the matching.

    Substructure matching of ~500 SMARTS against each molecule dominates the cost of the whole
    evaluation; a SMARTS whose pattern-fingerprint bits are not all set in the molecule's cannot
    match (RDKit's substructure screen), so only the few left are matched.
    """

    FP_SIZE = 2048

    def __init__(self, smarts: Sequence[str]):
        self.patterns = []
        for s in smarts:
            q = Chem.MolFromSmarts(s)
            if q is None:
                raise SeqssmError(f"MOSES filter SMARTS does not parse: {s}")
            self.patterns.append(q)
        self.screens = np.stack([self._packed(Chem.PatternFingerprint(q, fpSize=self.FP_SIZE))
                                 for q in self.patterns])

    @staticmethod
    def _packed(fp) -> np.ndarray:
        a = np.zeros((fp.GetNumBits(),), dtype=np.uint8)
        DataStructs.ConvertToNumpyArray(fp, a)
        return np.packbits(a)

    def matches_any(self, mol_h: Chem.Mol) -> bool:
        m = self._packed(Chem.PatternFingerprint(mol_h, fpSize=self.FP_SIZE))
        candidates = np.flatnonzero(~(self.screens & ~m).any(1))
        return any(mol_h.HasSubstructMatch(self.patterns[i]) for i in candidates)

    def passes(self, mol: Chem.Mol) -> bool:
        """MOSES mol_passes_filters: cheap structural rules first, then the SMARTS."""
        if any(len(ring) >= 8 for ring in mol.GetRingInfo().AtomRings()):
            return False
        if any(a.GetFormalCharge() != 0 for a in mol.GetAtoms()):
            return False
        if any(a.GetSymbol() not in FILTER_ATOMS for a in mol.GetAtoms()):
            return False
        # The SMARTS name hydrogens explicitly, so they are matched against the H-added molecule.
        if self.matches_any(Chem.AddHs(mol)):
            return False
        smiles = Chem.MolToSmiles(mol, isomericSmiles=False)
        return bool(smiles) and Chem.MolFromSmiles(smiles) is not None


_filters_by_smarts: dict[tuple[str, ...], _Filters] = {}


def _filter_smarts() -> tuple[str, ...]:
    data = moses.filters_data()
    return tuple(s for _, s in data.mcf + data.pains)


def _filters(smarts: tuple[str, ...]) -> _Filters:
    # One compiled set per process (worker processes compile their own once).
    f = _filters_by_smarts.get(smarts)
    if f is None:
        f = _filters_by_smarts[smarts] = _Filters(smarts)
    return f


def mol_passes_filters(mol) -> bool:
    """True when the molecule passes MOSES's filters (MCF, PAINS, atoms, charge, ring size)."""
    return _filters(_filter_smarts()).passes(_mol(mol))


class _PassesChunk:
    def __init__(self, smarts):
        self.smarts = smarts

    def __call__(self, chunk):
        f = _filters(self.smarts)
        return [f.passes(_mol(s)) for s in chunk]


def fraction_passes_filters(mols: Sequence, n_jobs: int = 1) -> float:
    """Fraction of (valid) molecules passing MOSES's filters."""
    mols = list(mols)
    if all(isinstance(m, str) for m in mols):
        passes = parallel_map(_PassesChunk(_filter_smarts()), mols, n_jobs, chunk=500)
    else:
        f = _filters(_filter_smarts())
        passes = [f.passes(_mol(m)) for m in mols]
    return float(np.mean(passes))


# -- validity, uniqueness, novelty --------------------------------------------------------

def fraction_valid(smiles: Sequence[str], n_jobs: int = 1) -> float:
    """Fraction of SMILES RDKit parses."""
    smiles = list(smiles)
    if not smiles:
        raise ValueError("no SMILES given")
    return 1 - canonicalize_many(smiles, n_jobs).count(None) / len(smiles)


def fraction_unique(smiles: Sequence[str], k: int | None = None, *, check_validity: bool = True) -> float:
    """Distinct canonical SMILES among the first k (all when k is None) over their number.

    With fewer than k SMILES, warns and uses them all (as MOSES does). An invalid SMILES is a
    ValueError unless check_validity is False (then all invalid ones count as one).
    """
    smiles = list(smiles)
    if k is not None:
        if len(smiles) < k:
            warnings.warn(f"unique@{k}: only {len(smiles)} molecules, computed on all of them", stacklevel=2)
        smiles = smiles[:k]
    if not smiles:
        raise ValueError("no SMILES given")
    canon = {canonical(s) for s in smiles}
    if None in canon and check_validity:
        raise ValueError("invalid molecule passed to unique@k")
    return len(canon) / len(smiles)


def novelty(generated: Sequence[str], train: Sequence[str], *, n_jobs: int = 1,
            train_canonical: bool = False) -> float:
    """Fraction of the distinct valid canonical generated SMILES absent from the training set.

    The training SMILES are canonicalised first (RDKit versions write some molecules
    differently, and a training set need not be canonical) unless `train_canonical` says they
    already are canonical with this RDKit, which saves a pass over a large set.
    """
    gen = set(canonicalize_many(list(generated), n_jobs)) - {None}
    return _novelty(gen, train, n_jobs=n_jobs, train_canonical=train_canonical)


def _novelty(gen: set[str], train: Sequence[str], *, n_jobs: int, train_canonical: bool) -> float:
    if not gen:
        return float("nan")
    train_set = set(train) if train_canonical else set(canonicalize_many(list(train), n_jobs))
    return len(gen - train_set) / len(gen)


# -- Tanimoto similarity on a device ------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _cpu_int_mm() -> bool:
    # torch._int_mm (int8 x int8 -> int32 products) is exact for 0/1 bits and several times
    # faster than float32 on CPUs with VNNI; it is private API, so check that it works here.
    try:
        a = torch.ones((3, 16), dtype=torch.int8)
        return bool((torch._int_mm(a, a.T.contiguous()) == 16).all())
    except (AttributeError, RuntimeError):
        return False


def _operand(bits: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return bits.to(torch.int8) if _cpu_int_mm() else bits.float()
    # float16 holds every integer up to 2048 exactly, so intersections of <= 2048 bits are exact.
    return bits.to(device=device, dtype=torch.float16)


def _intersections(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Bit intersection counts of the rows of a [m, bits] and the columns of b_t [bits, n]."""
    if a.dtype == torch.int8:
        return torch._int_mm(a, b_t)
    return (a @ b_t).float()  # float16 counts are exact; the ratios need float32


def tanimoto_aggregate(gen_fps, ref_fps, *, agg: str = "max", p: float = 1, ref_weights=None,
                       device: str | torch.device = "cpu") -> np.ndarray:
    """Per generated fingerprint, the max over reference fingerprints of the Tanimoto similarity
    (agg="max"), or the (weighted) mean of its p-th power (agg="mean"); float64 [n_gen].

    Fingerprints are 0/1 matrices [n, bits]; two empty fingerprints have similarity 1 (MOSES).
    """
    if agg not in ("max", "mean"):
        raise ValueError(f"agg must be 'max' or 'mean', not {agg!r}")
    device = torch.device(device)
    gen = torch.as_tensor(np.ascontiguousarray(gen_fps))
    ref = torch.as_tensor(np.ascontiguousarray(ref_fps))
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1] or gen.shape[1] > 2048:
        raise ValueError(f"fingerprint matrices {tuple(gen.shape)} and {tuple(ref.shape)}: equal widths <= 2048")
    w = torch.ones(len(ref)) if ref_weights is None else torch.as_tensor(np.asarray(ref_weights), dtype=torch.float32)
    # On the CPU small blocks win: fresh large temporaries cost more in page faults than they save.
    gen_block, ref_block = (512, 2048) if device.type == "cpu" else (2048, 32768)
    gen_count = gen.sum(1, dtype=torch.int32).to(device)
    ref_count = ref.sum(1, dtype=torch.int32).to(device)
    w = w.to(device)
    out = torch.zeros(len(gen), dtype=torch.float64, device=device)
    for r0 in range(0, len(ref), ref_block):
        rb_t = _operand(ref[r0:r0 + ref_block], device).T.contiguous()
        rc = ref_count[r0:r0 + ref_block]
        rw = w[r0:r0 + ref_block]
        empty_ref = rc == 0
        for g0 in range(0, len(gen), gen_block):
            gb = _operand(gen[g0:g0 + gen_block], device)
            gc = gen_count[g0:g0 + gen_block]
            inter = _intersections(gb, rb_t)
            union = (gc[:, None] + rc[None, :]).to(inter.dtype) - inter
            empty_gen = gc == 0
            if bool(empty_gen.any()):
                union.clamp_min_(1)  # 0/0 only for two empty fingerprints, patched below
            sim = torch.div(inter, union).float()
            sl = slice(g0, g0 + len(gb))
            if agg == "max":
                best = sim.amax(1)
                best[empty_gen] = 1.0 if bool(empty_ref.any()) else 0.0
                out[sl] = torch.maximum(out[sl], best.double())
            else:
                if p != 1:
                    sim.pow_(p)
                total = sim @ rw
                total[empty_gen] = rw[empty_ref].sum()
                out[sl] += total.double()
    if agg == "mean":
        out /= float(w.double().sum())
    return out.cpu().numpy()


def _fps_of(molecules) -> np.ndarray:
    if isinstance(molecules, np.ndarray):
        return molecules
    return fingerprints(list(molecules))


def snn(generated, reference, *, device: str = "cpu") -> float:
    """Mean over generated molecules of the highest Tanimoto similarity to a reference molecule.

    Either argument may be molecules (SMILES / Mol) or a fingerprint matrix from fingerprints().
    """
    return float(tanimoto_aggregate(_fps_of(generated), _fps_of(reference), agg="max", device=device).mean())


def internal_diversity(molecules, *, p: float = 1, device: str = "cpu", weights=None) -> float:
    """1 - mean_i (mean_j T_ij^p)^(1/p) over all pairs, self-pairs included (MOSES IntDiv_p).

    `weights` are multiplicities of the rows (a fingerprint matrix of distinct molecules).
    """
    fps = _fps_of(molecules)
    w = np.ones(len(fps)) if weights is None else np.asarray(weights, dtype=np.float64)
    inner = tanimoto_aggregate(fps, fps, agg="mean", p=p, ref_weights=w, device=device)
    return float(1 - np.sum(w * inner ** (1 / p)) / w.sum())


# -- fragment and scaffold similarity -----------------------------------------------------

def cos_similarity(ref_counts: Counter, gen_counts: Counter) -> float:
    """Cosine similarity of two count dictionaries (missing keys count 0); NaN when one is empty."""
    if not ref_counts or not gen_counts:
        return float("nan")
    keys = list(set(ref_counts) | set(gen_counts))
    r = np.array([ref_counts.get(k, 0) for k in keys], dtype=np.float64)
    g = np.array([gen_counts.get(k, 0) for k in keys], dtype=np.float64)
    return float(r @ g / (np.linalg.norm(r) * np.linalg.norm(g)))


def fragment_counts(molecules) -> Counter:
    """Counter of BRICS fragments over the molecules."""
    c: Counter = Counter()
    for m in molecules:
        c.update(fragments(m))
    return c


def scaffold_counts(molecules) -> Counter:
    """Counter of scaffolds (two rings or more) over the molecules."""
    return Counter(s for s in map(scaffold, molecules) if s is not None)


def frag_similarity(generated, reference) -> float:
    """Cosine similarity of BRICS fragment counts; `reference` may be molecules or a Counter."""
    ref = reference if isinstance(reference, Counter) else fragment_counts(reference)
    return cos_similarity(ref, fragment_counts(generated))


def scaf_similarity(generated, reference) -> float:
    """Cosine similarity of scaffold counts; `reference` may be molecules or a Counter."""
    ref = reference if isinstance(reference, Counter) else scaffold_counts(reference)
    return cos_similarity(ref, scaffold_counts(generated))


# -- property distributions ---------------------------------------------------------------

def wasserstein_distance(u, v, u_weights=None, v_weights=None) -> float:
    """1-D Wasserstein-1 distance between two samples: the integral of |F_u - F_v|."""
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    uw = np.ones(len(u)) if u_weights is None else np.asarray(u_weights, dtype=np.float64)
    vw = np.ones(len(v)) if v_weights is None else np.asarray(v_weights, dtype=np.float64)
    if not len(u) or not len(v):
        return float("nan")
    iu, iv = np.argsort(u), np.argsort(v)
    u, uw, v, vw = u[iu], uw[iu], v[iv], vw[iv]
    points = np.sort(np.concatenate([u, v]))
    deltas = np.diff(points)
    cu = np.concatenate([[0.0], np.cumsum(uw)])[np.searchsorted(u, points[:-1], side="right")] / uw.sum()
    cv = np.concatenate([[0.0], np.cumsum(vw)])[np.searchsorted(v, points[:-1], side="right")] / vw.sum()
    return float(np.sum(np.abs(cu - cv) * deltas))


# -- FCD ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _chemnet() -> torch.nn.Module:
    import fcd_torch
    from fcd_torch.utils import load_imported_model

    path = Path(fcd_torch.__file__).parent / "ChemNet_v0.13_pretrained.pt"
    # weights_only: the file holds layer configurations and tensors, nothing needs unpickling code.
    config = torch.load(path, map_location="cpu", weights_only=True)
    return load_imported_model(config).eval()


def chemnet_activations(smiles: Sequence[str], *, canonize: bool = True, device: str = "cpu",
                        batch_size: int = 512) -> np.ndarray:
    """ChemNet's penultimate activations [n, 512] (float32) of SMILES, as fcd_torch computes them."""
    from fcd_torch.utils import get_one_hot

    smiles = list(smiles)
    if canonize:
        canon = []
        for s in smiles:
            c = canonical(s)
            if c is None:
                raise ValueError(f"invalid SMILES {s!r} given to ChemNet")
            canon.append(c)
        smiles = canon
    model = _chemnet().to(device)  # moved back to the CPU below, as fcd_torch does
    out = []
    with torch.no_grad():
        for i in range(0, len(smiles), batch_size):
            # get_one_hot gives [350, 35] per SMILES; fcd_torch divides it by its width (35).
            x = np.stack([get_one_hot(s, CHEMNET_PAD) for s in smiles[i:i + batch_size]]) / 35.0
            x = torch.from_numpy(x).float().transpose(1, 2).to(device)
            out.append(model(x).float().cpu().numpy())
    _chemnet().to("cpu")
    return np.concatenate(out) if out else np.zeros((0, 512), dtype=np.float32)


def gaussian_stats(activations: np.ndarray, weights=None) -> dict:
    """{'mu', 'sigma'}: mean and covariance (n - 1 normalised) of rows with multiplicities `weights`."""
    x = np.asarray(activations, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.int64)
    n = len(x) if w is None else int(w.sum())
    if n < 2:
        raise ValueError(f"FCD needs at least 2 molecules, got {n}")
    return {"mu": np.average(x, axis=0, weights=w), "sigma": np.cov(x, rowvar=False, fweights=w)}


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) for covariance matrices S1, S2."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    # S1 S2 has the eigenvalues of the symmetric positive semi-definite S1^½ S2 S1^½, so the trace
    # of its square root is the sum of their square roots: stabler than a general matrix sqrt.
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fcd(generated, reference, *, device: str = "cpu", batch_size: int = 512) -> float:
    """Fréchet ChemNet Distance between SMILES and reference SMILES or reference {'mu', 'sigma'}."""
    ref = reference if isinstance(reference, dict) else gaussian_stats(
        chemnet_activations(list(reference), device=device, batch_size=batch_size))
    gen = gaussian_stats(chemnet_activations(list(generated), device=device, batch_size=batch_size))
    return frechet_distance(gen["mu"], gen["sigma"], ref["mu"], ref["sigma"])


# -- all features of a molecule at once ----------------------------------------------------

class _FeatureChunk:
    """Worker: for each SMILES, (its canonical SMILES, every per-molecule feature), or (None, None)
    when RDKit cannot parse it."""

    def __init__(self, smarts: tuple[str, ...]):
        self.smarts = smarts

    def __call__(self, chunk: list[str]) -> list[tuple]:
        filters = _filters(self.smarts)
        out = []
        for c in chunk:
            mol = get_mol(c)
            if mol is None:
                out.append((None, None))
                continue
            out.append((Chem.MolToSmiles(mol), (
                fingerprint_bits(mol), fragments(mol), scaffold(mol), filters.passes(mol),
                Crippen.MolLogP(mol), _sascorer().calculateScore(mol), _QED.qed(mol), Descriptors.MolWt(mol),
            )))
        return out


class _Features:
    """Features of the distinct parsable molecules of a list of SMILES, with their multiplicities.

    `canonical[s]` is the canonical SMILES of the molecule parsed from s. MOSES computes the
    generated set's metrics on molecules re-parsed from canonical SMILES, and uniqueness, novelty
    and FCD on the canonical SMILES of those: canonicalising twice differs in rare cases.
    """

    def __init__(self, smiles: list[str], n_jobs: int, progress):
        counts = Counter(smiles)
        distinct = list(counts)
        if progress:
            progress(f"features of {len(distinct):,} distinct molecules")
        _sascorer()  # load the fragment scores once, before worker processes start
        rows = parallel_map(_FeatureChunk(_filter_smarts()), distinct, n_jobs, chunk=250)
        self.canonical = {s: r[0] for s, r in zip(distinct, rows) if r[0] is not None}
        self.invalid = sum(counts[s] for s, r in zip(distinct, rows) if r[0] is None)
        feats = [r[1] for r in rows if r[1] is not None]
        self.weights = np.array([counts[s] for s, r in zip(distinct, rows) if r[1] is not None], dtype=np.int64)
        self.fps = _bit_matrix([f[0] for f in feats])
        self.frag: Counter = Counter()
        self.scaf: Counter = Counter()
        for f, w in zip(feats, self.weights):
            for frag in f[1]:
                self.frag[frag] += int(w)
            if f[2] is not None:
                self.scaf[f[2]] += int(w)
        self.passes = np.array([f[3] for f in feats], dtype=bool)
        self.props = {name: np.array([f[4 + j] for f in feats]) for j, name in enumerate(PROPERTIES)}


def reference_stats(smiles: Sequence[str], *, device: str = "cpu", n_jobs: int = 1,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Statistics of a reference set in the layout of MOSES's test_stats (see moses.load_stats).

    As in MOSES, the structural statistics are of the molecules as given and FCD is of their
    canonical SMILES; unparsable SMILES are left out with a warning.
    """
    smiles = list(smiles)
    f = _Features(smiles, n_jobs, progress)
    if f.invalid:
        warnings.warn(f"{f.invalid} reference SMILES are not parsable; left out", stacklevel=2)
    if progress:
        progress("ChemNet activations of the reference")
    canon = [f.canonical[s] for s in smiles if s in f.canonical]
    return {
        "FCD": gaussian_stats(chemnet_activations(canon, canonize=False, device=device)),
        "SNN": {"fps": np.repeat(f.fps, f.weights, axis=0)},
        "Frag": {"frag": f.frag},
        "Scaf": {"scaf": f.scaf},
        **{name: {"values": list(np.repeat(v, f.weights))} for name, v in f.props.items()},
    }


# -- everything ---------------------------------------------------------------------------

def evaluate(generated: Sequence[str], *, train: Sequence[str] | None, reference="moses",
             device: str = "cpu", n_jobs: int = 1, ks: Sequence[int] = (1000, 10000),
             progress: Callable[[str], None] | None = None, test_scaffolds: bool = True,
             train_canonical: bool = False) -> dict:
    """All MOSES metrics of generated SMILES.

    reference: "moses" (MOSES test set, and its scaffold test set unless `test_scaffolds` is
    False; suffixes /Test and /TestSF), or SMILES of a custom test set, or its reference_stats()
    (suffix /Test). `train`: the training SMILES for novelty (left out when None; see novelty()
    for `train_canonical`). `progress(stage)` is called as each stage starts.
    Keys: valid, unique@k for each k, novelty, FCD/, SNN/, Frag/, Scaf/ per reference, IntDiv,
    IntDiv2, Filters, logP, SA, QED, weight.
    """
    def step(message: str) -> None:
        if progress is not None:
            progress(message)

    generated = list(generated)
    if not generated:
        raise ValueError("no generated SMILES to evaluate")
    if isinstance(reference, str):
        if reference != "moses":
            raise SeqssmError(f"unknown reference '{reference}' (\"moses\", or a list of SMILES)")
        splits = ("test", "test_scaffolds") if test_scaffolds else ("test",)
        refs = {"Test" if s == "test" else "TestSF": moses.load_stats(s) for s in splits}
    elif isinstance(reference, dict):
        refs = {"Test": reference}
    else:
        step("reference statistics")
        refs = {"Test": reference_stats(reference, device=device, n_jobs=n_jobs, progress=progress)}
    prop_ref = refs["Test"]

    step(f"parsing {len(generated):,} SMILES")
    canon_all = canonicalize_many(generated, n_jobs)
    canon = [c for c in canon_all if c is not None]
    metrics: dict = {"valid": len(canon) / len(generated)}
    names = [f"unique@{k}" for k in ks]
    if train is not None:
        names.append("novelty")
    for suffix in refs:
        names += [f"{m}/{suffix}" for m in ("FCD", "SNN", "Frag", "Scaf")]
    names += ["IntDiv", "IntDiv2", "Filters", *PROPERTIES]
    if not canon:
        warnings.warn("no valid molecule among the generated SMILES", stacklevel=2)
        return metrics | {name: float("nan") for name in names}

    f = _Features(canon, n_jobs, progress)
    if f.invalid:  # canonical SMILES that RDKit cannot read back (rare); MOSES would stop here
        warnings.warn(f"{f.invalid} canonical SMILES could not be parsed again by RDKit; left out of the "
                      f"metrics after validity", stacklevel=2)
    second = [f.canonical[c] for c in canon if c in f.canonical]
    for k in ks:
        if len(second) < k:
            warnings.warn(f"unique@{k}: only {len(second)} valid molecules, computed on all of them",
                          stacklevel=2)
        first = second[:k]
        metrics[f"unique@{k}"] = len(set(first)) / len(first)
    if train is not None:
        step("novelty")
        metrics["novelty"] = _novelty(set(second), train, n_jobs=n_jobs, train_canonical=train_canonical)

    step("ChemNet activations (FCD)")
    distinct = list(dict.fromkeys(second))
    multiplicity = Counter(second)
    gen_fcd = gaussian_stats(chemnet_activations(distinct, canonize=False, device=device),
                             [multiplicity[s] for s in distinct]) if len(second) > 1 else None
    for suffix, ref in refs.items():
        metrics[f"FCD/{suffix}"] = (frechet_distance(gen_fcd["mu"], gen_fcd["sigma"], ref["FCD"]["mu"],
                                                     ref["FCD"]["sigma"]) if gen_fcd else float("nan"))
        step(f"SNN/{suffix}")
        nearest = tanimoto_aggregate(f.fps, ref["SNN"]["fps"], agg="max", device=device)
        metrics[f"SNN/{suffix}"] = float(np.sum(nearest * f.weights) / f.weights.sum())
        metrics[f"Frag/{suffix}"] = cos_similarity(ref["Frag"]["frag"], f.frag)
        metrics[f"Scaf/{suffix}"] = cos_similarity(ref["Scaf"]["scaf"], f.scaf)
    step("internal diversity")
    metrics["IntDiv"] = internal_diversity(f.fps, p=1, device=device, weights=f.weights)
    metrics["IntDiv2"] = internal_diversity(f.fps, p=2, device=device, weights=f.weights)
    metrics["Filters"] = float(np.sum(f.passes * f.weights) / f.weights.sum())
    for name in PROPERTIES:
        metrics[name] = wasserstein_distance(prop_ref[name]["values"], f.props[name], v_weights=f.weights)
    return {name: metrics[name] for name in ["valid", *names]}
