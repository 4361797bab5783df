"""Write the last training stage's data of the bundled s4-chem-moses: a model's own valid samples mixed
with one random form of each of N training molecules (docs/BENCHMARKS.md, session 11).

    seqssm generate-molecules -n 2000000 -m r3 -o self.csv --valid-only --seed 7 --fast off -b 16384
    python benchmarks/make_self_mix.py self.csv moses_train.csv.gz mix.csv --n-train 1000000 --n-jobs 16
    seqssm finetune-molecules mix.csv --column smiles -m r3 -o rb --epochs 1 --lr 3e-5 --ssm-lr 3e-5 --dropout 0 ...

The samples keep their sampled spellings (column `smiles` of the .csv, not the canonical column): a
random-SMILES model trained on canonical spellings of its samples drifts (session 10). Training
molecules: the file shuffled with seed `--seed`, the first N, each written as one RDKit random SMILES
(`MolToRandomSmilesVect`, random seed 1 + its position among the N). The rows are shuffled together
(seed `--seed` + 1) and written as a one-column CSV, `smiles`. The same inputs and seeds give the same
file, whatever --n-jobs.
"""

from __future__ import annotations

import argparse
import random

from seqssm.chem.data import parallel_map, read_smiles


def _random_forms(chunk: list[tuple[int, str]]) -> list[str | None]:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mols = [(i, Chem.MolFromSmiles(smiles)) for i, smiles in chunk]
    return [Chem.MolToRandomSmilesVect(m, 1, randomSeed=i + 1)[0] if m is not None else None for i, m in mols]


def make_mix(samples: list[str], train: list[str], n_train: int, *, seed: int = 11, n_jobs: int = 1) -> list[str]:
    train = list(train)
    random.Random(seed).shuffle(train)
    forms = parallel_map(_random_forms, list(enumerate(train[:n_train])), n_jobs)
    rows = list(samples) + [f for f in forms if f]
    random.Random(seed + 1).shuffle(rows)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", help="generate-molecules .csv of the model's valid samples (column smiles)")
    ap.add_argument("train", help="training SMILES (.smi/.csv, .gz)")
    ap.add_argument("out", help="output .csv (column smiles)")
    ap.add_argument("--n-train", type=int, required=True, help="training molecules to mix in")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--n-jobs", type=int, default=1)
    args = ap.parse_args(argv)
    rows = make_mix(read_smiles(args.samples, column="smiles"), read_smiles(args.train), args.n_train,
                    seed=args.seed, n_jobs=args.n_jobs)
    with open(args.out, "w") as fh:
        fh.write("smiles\n")
        fh.write("\n".join(rows) + "\n")
    print(f"{args.out}: {len(rows):,} rows")


if __name__ == "__main__":
    main()
