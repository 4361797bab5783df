"""Data-parallel scaling of `seqssm pretrain` and `seqssm embed`: tokens/s per GPU at 1, 2, 4, 8 GPUs.

One command runs everything; for each process count it launches torchrun on this node:

    python benchmarks/scaling.py --fasta chr20.fa.gz --gpus 1,2,4,8 --out scaling/    # a GPU node
    python benchmarks/scaling.py --gpus 1,2 --device cpu --steps 4 --seq-len 256 --global-batch 8 \\
        --d-model 32 --n-layer 2 --embed-window 512 --out /tmp/scaling                 # CPU smoke test (gloo)

Pretraining: for every family in FAMILIES a random, dropout-free initial model is saved once
and every run starts from it (`--init`) with the same global batch, so the runs are the same
optimisation split over 1..N processes: their per-step losses are compared with the 1-process run
(bf16 autocast on GPU makes them agree to a few 1e-3, fp32 on CPU to ~1e-7). Throughput: the
median of the per-step tokens/s after --skip-steps warm-up steps (rank 0's step time, all-reduce
included). Embedding: `seqssm embed` of the whole --embed-fasta; throughput from its own timing
(sharded embedding, waiting for the slowest rank, merge), and the output is compared with the
1-process file (byte-identical, else the largest embedding difference).

Writes OUT/scaling.json (every number) and OUT/scaling.md (the tables). Scaling efficiency at N
GPUs = (tokens/s per GPU at N) / (tokens/s per GPU at the smallest count measured).
To add a model family, add one FAMILIES entry: how to build and save a small random model of
it, and the `seqssm pretrain` options that select its objective.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
LAMBDA = REPO / "resources" / "data" / "lambda_virus.fa.gz"


# ----------------------------------------------------------------------------- model families


def _hyena(d_model: int, n_layer: int, seq_len: int):
    from seqssm.models import HyenaConfig, HyenaDNAForCausalLM

    return HyenaDNAForCausalLM(HyenaConfig(d_model=d_model, n_layer=n_layer, max_seq_len=seq_len, embed_dropout=0.0))


def _save_hyena(model, path: Path) -> None:
    from seqssm.models import save_model
    from seqssm.tokenizers.dna import DNATokenizer

    save_model(model, path, tokenizer=DNATokenizer(model_max_length=model.config.max_seq_len))


def _caduceus(d_model: int, n_layer: int, seq_len: int):
    """Caduceus-PS (no dropout anywhere); the window length is the tokenizer's, see _save_caduceus."""
    from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM

    model = CaduceusForMaskedLM(CaduceusConfig.dna(d_model, n_layer, rcps=True))
    model.seq_len = seq_len
    return model


def _save_caduceus(model, path: Path) -> None:
    from seqssm.models import save_model
    from seqssm.tokenizers.dna import DNATokenizer

    save_model(model, path, tokenizer=DNATokenizer(model_max_length=getattr(model, "seq_len", 1024)))


@dataclass(frozen=True)
class Family:
    """A pretrainable family: ``build(d_model, n_layer, seq_len)`` -> a dropout-free model, ``save(model,
    dir)`` writes what `seqssm pretrain --init` reads, ``pretrain_args`` select its objective."""

    build: Callable
    save: Callable
    pretrain_args: tuple[str, ...] = ()


FAMILIES = {
    "hyena": Family(_hyena, _save_hyena),
    "caduceus": Family(_caduceus, _save_caduceus, ("--arch", "caduceus")),  # masked-LM objective
}


# ----------------------------------------------------------------------------- launching


def torchrun(nproc: int, target: list[str], *, log: Path) -> float:
    """Run ``torchrun --standalone --nproc_per_node=nproc TARGET``; return its wall time (s)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see docs/DISTRIBUTED.md)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if res.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"torchrun with {nproc} processes failed (exit {res.returncode}); {log}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def run_pretrain(args, family: str, nproc: int, init: Path, out: Path) -> dict:
    run_dir = out / f"pretrain-{family}-{nproc}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["-m", "seqssm.cli", "pretrain", str(args.fasta), "-o", str(run_dir), "--init", str(init),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.global_batch), "--max-steps", str(args.steps),
           "--warmup-steps", str(max(1, args.steps // 10)), "--lr", str(args.lr), "--eval-every", str(args.steps),
           "--save-every", str(args.steps), "--eval-max-windows", str(args.eval_windows), "--no-markov-baseline",
           "--device", args.device, "-q", *FAMILIES[family].pretrain_args]
    if args.fsdp and nproc > 1:
        cmd.append("--fsdp")
    if args.compile:
        cmd.append("--compile")
    wall = torchrun(nproc, cmd, log=out / f"pretrain-{family}-{nproc}.log")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    timed = train[args.skip_steps:] or train
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    return {"task": "pretrain", "model": family, "processes": nproc, "global_batch": args.global_batch,
            "seq_len": args.seq_len, "steps": len(train), "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / nproc,
            "step_seconds_median": statistics.median(r["step_seconds"] for r in timed),
            "losses": [r["loss"] for r in train], "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "wall_seconds": wall}


def run_embed(args, nproc: int, out: Path) -> dict:
    target = out / f"embed-{nproc}.parquet"
    summary = out / f"embed-{nproc}.summary.json"
    for p in (target, summary):
        p.unlink(missing_ok=True)
    opts = {"fasta": str(args.embed_fasta), "output": str(target), "model": args.embed_model,
            "window": args.embed_window, "batch_size": args.embed_batch_size, "device": args.device, "quiet": True}
    wall = torchrun(nproc, [str(Path(__file__).resolve()), "embed-worker", json.dumps(opts), str(summary)],
                    log=out / f"embed-{nproc}.log")
    s = json.loads(summary.read_text())
    return {"task": "embed", "model": args.embed_model, "processes": nproc, "windows": s["windows"],
            "bases": s["bases"], "seconds": s["seconds"], "tokens_per_s": s["bases"] / s["seconds"],
            "tokens_per_s_per_gpu": s["bases"] / s["seconds"] / nproc, "wall_seconds": wall, "output": str(target)}


def embed_worker(opts_json: str, summary_path: str) -> None:
    """Under torchrun: one `seqssm embed` run; rank 0 writes its summary (timing of the job itself)."""
    from seqssm.distributed import is_main_process
    from seqssm.pipelines.embed import EmbedOptions, run_embed as _run, summary_dict

    opts = json.loads(opts_json)
    s = _run(EmbedOptions(**{**opts, "fasta": Path(opts["fasta"]), "output": Path(opts["output"])}))
    if is_main_process():
        Path(summary_path).write_text(json.dumps(summary_dict(s), indent=1))


# ----------------------------------------------------------------------------- comparing and reporting


def compare_embeddings(a: Path, b: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    if a.read_bytes() == b.read_bytes():
        return {"identical_bytes": True, "max_abs_diff": 0.0}
    ta, tb = pq.read_table(a), pq.read_table(b)
    same_rows = ta.select(["chrom", "start", "end"]).equals(tb.select(["chrom", "start", "end"]))
    ea = np.stack(ta["embedding"].to_numpy(zero_copy_only=False))
    eb = np.stack(tb["embedding"].to_numpy(zero_copy_only=False))
    diff = float(np.abs(ea - eb).max()) if ea.shape == eb.shape else float("inf")
    return {"identical_bytes": False, "same_windows": bool(same_rows), "max_abs_diff": diff}


def add_scaling(rows: list[dict]) -> None:
    """Efficiency against the smallest process count of the same task and model; loss agreement."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    for rs in groups.values():
        base = min(rs, key=lambda r: r["processes"])
        for r in rs:
            r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"]
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r["task"] == "pretrain":
                pairs = list(zip(base["losses"], r["losses"]))
                r["max_rel_loss_diff_vs_base"] = max(abs(x - y) / abs(x) for x, y in pairs)
                r["final_loss_rel_diff_vs_base"] = abs(pairs[-1][0] - pairs[-1][1]) / abs(pairs[-1][0])
            else:
                r["vs_base"] = compare_embeddings(Path(base["output"]), Path(r["output"]))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# seqssm data-parallel scaling ({meta['device']}, {meta['date']})", "",
             f"`{meta['command']}`", ""]
    pre = [r for r in rows if r["task"] == "pretrain"]
    if pre:
        lines += ["## Pretraining", "",
                  f"Global batch {pre[0]['global_batch']} x {pre[0]['seq_len']} bp, {pre[0]['steps']} steps; "
                  "tokens/s: median per step after warm-up.", "",
                  "| model | GPUs | tokens/s | tokens/s per GPU | scaling efficiency | max rel. loss diff vs 1 | "
                  "final loss rel. diff |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in pre:
            lines.append(f"| {r['model']} | {r['processes']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s_per_gpu']:,.0f} | {r['scaling_efficiency']:.3f} | "
                         f"{r['max_rel_loss_diff_vs_base']:.2e} | {r['final_loss_rel_diff_vs_base']:.2e} |")
        lines.append("")
    emb = [r for r in rows if r["task"] == "embed"]
    if emb:
        lines += ["## Embedding", "", f"{emb[0]['windows']:,} windows, {emb[0]['bases']:,} bases; model "
                  f"{emb[0]['model']}.", "",
                  "| GPUs | bases/s | bases/s per GPU | scaling efficiency | same output as 1 |",
                  "|---:|---:|---:|---:|---|"]
        for r in emb:
            v = r["vs_base"]
            same = "identical bytes" if v["identical_bytes"] else f"max abs diff {v['max_abs_diff']:.2e}"
            lines.append(f"| {r['processes']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | "
                         f"{r['scaling_efficiency']:.3f} | {same} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="1,2,4,8", help="Process counts (GPUs per run), e.g. 1,2,8.")
    p.add_argument("--tasks", default="pretrain,embed")
    p.add_argument("--models", default="hyena", help=f"Pretraining families: {', '.join(FAMILIES)}.")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (gloo).")
    p.add_argument("--fasta", type=Path, default=LAMBDA, help="Pretraining FASTA (e.g. human chr20).")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=64, help="Windows per step, split across the processes.")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--skip-steps", type=int, default=5, help="Warm-up steps left out of the throughput.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--fsdp", action="store_true", help="Pretrain with --fsdp when more than one process.")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--embed-fasta", type=Path, default=None, help="Default: --fasta.")
    p.add_argument("--embed-model", default="hyenadna-small-chr20")
    p.add_argument("--embed-window", type=int, default=None)
    p.add_argument("--embed-batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.embed_fasta = args.embed_fasta or args.fasta
    counts = sorted({int(x) for x in args.gpus.split(",")})
    tasks = [t for t in args.tasks.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in FAMILIES:
            raise SystemExit(f"--models {m}: unknown family (known: {', '.join(FAMILIES)})")
    for n in counts:
        if args.global_batch % n:
            raise SystemExit(f"--global-batch {args.global_batch} must be divisible by every process count ({n})")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and counts[-1] > torch.cuda.device_count():
        raise SystemExit(f"--gpus {args.gpus}: this node has {torch.cuda.device_count()} GPUs")
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    if "pretrain" in tasks:
        for fam in models:
            init = args.out / f"init-{fam}"
            if not init.exists():
                torch.manual_seed(0)
                FAMILIES[fam].save(FAMILIES[fam].build(args.d_model, args.n_layer, args.seq_len), init)
            for n in counts:
                rows.append(run_pretrain(args, fam, n, init, args.out))
                print(f"pretrain {fam} x{n}: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    if "embed" in tasks:
        for n in counts:
            rows.append(run_embed(args, n, args.out))
            print(f"embed x{n}: {rows[-1]['tokens_per_s']:,.0f} bases/s", flush=True)
    add_scaling(rows)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU, gloo"
    meta = {"device": device, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
            "torch": torch.__version__, "options": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "scaling.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    (args.out / "scaling.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "embed-worker":
        embed_worker(sys.argv[2], sys.argv[3])
    else:
        main()
