"""S4 chemical LM speed: sampling (molecules/s) and training (tokens/s), GPU or CPU.

    python benchmarks/bench_chem.py sample --model s4-chem-moses --device cuda --batch 1024 4096 16384
    python benchmarks/bench_chem.py sample --model s4-chem-moses --device cpu --batch 64 256 --reference-only
    python benchmarks/bench_chem.py train --device cuda --batch 2048 --length 99

Sampling: the same model, seed and batch through the reference loop (the model's eager
``step()``) and the CUDA-graph sampler, in the same process; median of ``--repeats`` timed
batches after a warm-up batch, synchronised. A "molecule" is one sampled sequence, valid or not;
a batch stops when every sequence has ended (eos) or at the model's maximum length.
Training: full optimizer steps (forward, backward, AdamW) on random token batches of fixed
shape (paper-size model, bf16 autocast on CUDA), tokens = batch x length positions.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def bench_sample(args) -> None:
    from seqssm.chem.fast_sampler import FastSampler
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.chem.sampling import ReferenceSampler, batch_generator

    device = torch.device(args.device)
    if args.model:
        model = load_chem_model(args.model, device=device).model
    else:
        from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM

        model = S4ChemLM(S4ChemConfig(vocab_size=args.vocab)).to(device).eval()
    for B in args.batch:
        samplers = [("reference", ReferenceSampler(model, B, device=device))]
        if device.type == "cuda" and not args.reference_only:
            samplers.append(("cuda-graph", FastSampler(model, B, device=device, bf16=False)))
            samplers.append(("cuda-graph-bf16", FastSampler(model, B, device=device, bf16=True)))
            samplers.append(("cuda-graph-bf16-fp16-state", FastSampler(model, B, device=device, bf16=True,
                                                                        half_state=True)))
        for name, sampler in samplers:
            sampler(batch_generator(0, 0, device))  # warm-up (and capture)
            times, steps, ended = [], [], []
            for r in range(args.repeats):
                _sync(device)
                t0 = time.perf_counter()
                batch = sampler(batch_generator(args.seed, r, device))
                _sync(device)
                times.append(time.perf_counter() - t0)
                steps.append(batch.steps)
                ended.append(float(batch.ended.float().mean()))
            med = statistics.median(times)
            print(json.dumps({"what": "sample", "sampler": name, "batch": B, "median_s": round(med, 4),
                              "molecules_per_s": round(B / med, 1), "steps": steps, "ended": round(min(ended), 4),
                              "device": _device_name(device), "torch": torch.__version__}), flush=True)


def bench_train(args) -> None:
    from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM
    from seqssm.training.lm import adamw, autocast_for
    from seqssm.training.molecules import MolTrainConfig, param_groups, token_nll_sum

    device = torch.device(args.device)
    model = S4ChemLM(S4ChemConfig(vocab_size=args.vocab)).to(device).train()
    fwd = torch.compile(model, dynamic=False) if args.compile else model
    opt = adamw(param_groups(model, MolTrainConfig()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, device=device)
    for B in args.batch:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(3, args.vocab, (B, args.length + 1), generator=g, device=device)
        times = []
        for r in range(args.repeats + 2):
            _sync(device)
            t0 = time.perf_counter()
            with autocast_for(device):
                logits = fwd(x[:, :-1])
            nll, n = token_nll_sum(logits, x, 0)
            (nll / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if r >= 2:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(json.dumps({"what": "train", "batch": B, "length": args.length, "compile": args.compile,
                          "median_s": round(med, 4), "tokens_per_s": round(B * args.length / med),
                          "device": _device_name(device), "torch": torch.__version__}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sample", "train"])
    ap.add_argument("--model", default=None, help="chemical LM (bundled name or dir); default: a fresh paper-size model")
    ap.add_argument("--vocab", type=int, default=30, help="vocabulary of a fresh model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1024])
    ap.add_argument("--length", type=int, default=99)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--reference-only", action="store_true")
    args = ap.parse_args(argv)
    (bench_sample if args.what == "sample" else bench_train)(args)


if __name__ == "__main__":
    sys.exit(main())
