"""S4 chemical LM speed: sampling (molecules/s) and training (tokens/s), GPU or CPU.

    python benchmarks/bench_chem.py sample --model s4-chem-moses --device cuda --batch 4096 16384 32768 --n 30000
    python benchmarks/bench_chem.py sample --model s4-chem-moses --device cpu --batch 256 --n 2048 --samplers reference
    python benchmarks/bench_chem.py sample --device cpu --batch 4 8 --n 12 --d-model 16 --n-blocks 1  # smoke test
    python benchmarks/bench_chem.py train --device cuda --batch 2048 --length 99

Sampling: the same model and seeds through the eager refill loop (``sample_refill_reference``,
the model's own ``step()``; the convolution-history state on a CPU) and the CUDA-graph refill
sampler (fp32; bf16 matmuls; bf16 + float16 states), in the same process. Each is timed on
calls of ``--n`` molecules from ``--batch`` slots (refilled as molecules end) and on calls of
exactly ``--batch`` molecules (no refill: what a fixed batch costs, the sampler before
continuous batching), median of ``--repeats`` synchronised calls after a warm-up call. A
"molecule" is one sampled sequence, valid or not. ``utilisation``: slot-steps that drew a token
of a returned molecule / all slot-steps run.
Training: full optimizer steps (forward, backward, AdamW) on random token batches of fixed
shape (paper-size model, bf16 autocast on CUDA), tokens = batch x length positions.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
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
    from seqssm.chem.sampling import ReferenceSampler, batch_generator

    device = torch.device(args.device)
    if args.model:
        from seqssm.chem.model_dir import load_chem_model

        loaded = load_chem_model(args.model, device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM

        cfg = S4ChemConfig(vocab_size=args.vocab, d_model=args.d_model, n_blocks=args.n_blocks, max_len=args.max_len)
        model = S4ChemLM(cfg).to(device).eval()
        tokenizer = None
    for B, chunk in itertools.product(args.batch, args.chunk):
        samplers = {"reference": lambda: ReferenceSampler(model, B, device=device, chunk=chunk)}
        if device.type == "cuda":
            from seqssm.chem.fast_sampler import FastSampler

            samplers["cuda-graph"] = lambda: FastSampler(model, B, device=device, bf16=False, half_state=False,
                                                                chunk=chunk)
            samplers["cuda-graph-bf16"] = lambda: FastSampler(model, B, device=device, bf16=True, half_state=False,
                                                                     chunk=chunk)
            samplers["cuda-graph-bf16-fp16-state"] = lambda: FastSampler(model, B, device=device, bf16=True,
                                                                         half_state=True, chunk=chunk)
        for name in args.samplers or samplers:
            if name not in samplers:
                raise SystemExit(f"no sampler {name!r} on {device.type} (have: {', '.join(samplers)})")
            sampler = samplers[name]()
            sampler(min(B, 64), batch_generator(0, 0, device))  # warm-up (and capture)
            for n in dict.fromkeys([args.n, B]):  # refilled slots; one fixed batch
                times, steps, ended, used, slot_steps = [], [], [], 0, 0
                for r in range(args.repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    batch = sampler(n, batch_generator(args.seed, r, device))
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                    if args.dump and r == 0 and n == args.n and tokenizer is not None:
                        dump = pathlib.Path(args.dump) / f"{name}-B{B}-c{chunk}.smi"
                        dump.parent.mkdir(parents=True, exist_ok=True)
                        dump.write_text("".join(s + "\n" for s in tokenizer.decode_batch(batch.tokens)))
                    steps.append(batch.steps)
                    ended.append(float(batch.ended.float().mean()))
                    used += int(batch.lengths.sum())
                    slot_steps += batch.steps * B
                med = statistics.median(times)
                print(json.dumps({"what": "sample", "sampler": name, "batch": B, "chunk": chunk, "n": n, "refill": n > B,
                                  "median_s": round(med, 4), "molecules_per_s": round(n / med, 1), "steps": steps,
                                  "utilisation": round(used / slot_steps, 4), "ended": round(min(ended), 4),
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
    ap.add_argument("--d-model", type=int, default=256, help="width of a fresh sampling model")
    ap.add_argument("--n-blocks", type=int, default=4, help="blocks of a fresh sampling model")
    ap.add_argument("--max-len", type=int, default=100, help="maximum length of a fresh sampling model")
    ap.add_argument("--n", type=int, default=30000, help="molecules per timed sampling call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1024])
    ap.add_argument("--length", type=int, default=99)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--chunk", type=int, nargs="+", default=[2], help="recurrent steps between refills")
    ap.add_argument("--samplers", nargs="+", default=None,
                    help="reference, cuda-graph, cuda-graph-bf16, cuda-graph-bf16-fp16-state (default: all there are)")
    ap.add_argument("--dump", default=None, help="write the first --n call's SMILES of each sampler here (.smi)")
    args = ap.parse_args(argv)
    (bench_sample if args.what == "sample" else bench_train)(args)


if __name__ == "__main__":
    sys.exit(main())
