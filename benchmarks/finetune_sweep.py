"""Fine-tuning settings x seeds on one task, run in parallel, with the k-mer baseline on the same split.

    python benchmarks/finetune_sweep.py OUT --seeds 0,1,2 --jobs 6 \
        --config "pre=--model hyenadna-small-chr20" --config "scratch=--model hyenadna-small-chr20 --from-scratch" \
        -- <seqssm finetune data, split and shared options>

Each --config is NAME=EXTRA_OPTIONS; every (config, seed) pair is one `seqssm finetune` process with
the shared options, the extra ones and --seed (GPU runs share the device: these are small models).
Prints a table of test metrics, mean +/- sample standard deviation over the seeds, beside the k-mer
logistic regression (benchmarks/finetune_acceptance.py's baseline, on the identical split; it has
no seed); writes OUT/sweep.json with every run's test metrics and best epoch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_acceptance import KEYS, kmer_baseline, load_split  # noqa: E402


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    k = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--config", action="append", required=True, help="NAME=EXTRA seqssm finetune options")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=4)
    a = p.parse_args(sys.argv[1:k])
    shared = sys.argv[k + 1:]
    seeds = [int(s) for s in a.seeds.split(",")]
    configs = dict(c.split("=", 1) for c in a.config)
    a.out.mkdir(parents=True, exist_ok=True)

    def one(job):
        name, seed = job
        out = a.out / f"{name}-seed{seed}"
        cmd = [sys.executable, "-c", "from seqssm.cli.main import app; app()", "finetune", *shared,
               *shlex.split(configs[name]), "--seed", str(seed), "-o", str(out), "--force", "-q"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name} seed {seed} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}", flush=True)
            return name, seed, None
        m = json.loads((out / "metrics.json").read_text())
        res = {k2: m["test"].get(k2) for k2 in KEYS} | {"best_epoch": m.get("best_epoch"),
                                                         "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name} seed {seed}: {res}", flush=True)
        return name, seed, res

    jobs = [(n, s) for n in configs for s in seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(one, jobs))
    km, _curve, l2 = kmer_baseline(load_split(shared))

    print("\n| setting | runs | accuracy | MCC | AUROC | AUPRC | best epochs |\n|---|---:|---:|---:|---:|---:|---|")
    summary = {}
    for name in configs:
        runs = [r for n, _s, r in results if n == name and r is not None]
        row = {}
        for key in ("accuracy", "mcc", "auroc", "auprc"):
            v = [r[key] for r in runs]
            row[key] = (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else (None, None)
        summary[name] = {"options": configs[name], "runs": {s: r for n, s, r in results if n == name}, "mean_sd": row}
        cell = lambda m: "-" if m[0] is None else f"{m[0]:.4f} +/- {m[1]:.4f}"  # noqa: E731
        print(f"| {name} | {len(runs)} | " + " | ".join(cell(row[k2]) for k2 in ("accuracy", "mcc", "auroc", "auprc"))
              + f" | {', '.join(str(r['best_epoch']) for r in runs)} |")
    print("| k-mer logistic | 1 | " + " | ".join(f"{km[k2]:.4f}" for k2 in ("accuracy", "mcc", "auroc", "auprc"))
          + " | - |")
    (a.out / "sweep.json").write_text(json.dumps({"shared": shared, "seeds": seeds, "settings": summary,
                                                   "kmer": km | {"l2": l2}}, indent=1, default=str))


if __name__ == "__main__":
    main()
