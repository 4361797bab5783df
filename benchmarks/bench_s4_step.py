"""The fused S4 recurrent step alone (Triton, CUDA): time per call and effective state bandwidth for
tile settings, on the layers of a chemical LM (the sampler's inner loop).

    python benchmarks/bench_s4_step.py --model s4-chem-moses --batch 16384
    python benchmarks/bench_s4_step.py --model s4-chem-moses --batch 16384 --block-h 4 8 --rows 32 64 \\
        --num-warps 1 2 4

Each setting runs every S4 layer of the model once per "step" (as sampling does), on float16-pair
and complex64 states; median of --repeats timed groups of 20 steps after a warm-up group. GB/s
counts the state read and written once per layer (the least any step must move).
Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="s4-chem-moses")
    ap.add_argument("--batch", type=int, nargs="+", default=[16384])
    ap.add_argument("--block-h", type=int, nargs="+", default=[8])
    ap.add_argument("--rows", type=int, nargs="+", default=[32])
    ap.add_argument("--num-warps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--state", nargs="+", default=["float16", "complex64"], choices=["float16", "complex64"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    from seqssm.chem.model_dir import load_chem_model
    from seqssm.layers.s4 import S4Layer
    from seqssm.ops.s4_step import fused_step

    dev = torch.device("cuda")
    model = load_chem_model(args.model, device=dev).model.eval()
    model.setup_step()
    recs = [m.recurrence() for m in model.modules() if isinstance(m, S4Layer)]
    H, M = recs[0].tensors()["C"].shape[-2:] if "C" in recs[0].tensors() else (None, None)
    for B, kind in itertools.product(args.batch, args.state):
        states = []
        for rec in recs:
            x = torch.randn(B, H, M, dtype=torch.complex64, device=dev) * 0.1
            states.append(torch.view_as_real(x).to(torch.float16).contiguous() if kind == "float16" else x)
        u = torch.randn(B, H, device=dev)
        nbytes = sum(s.numel() * s.element_size() for s in states) * 2
        for bh, rows, nw in itertools.product(args.block_h, args.rows, args.num_warps):
            kw = dict(block_h=bh, rows=rows, num_warps=nw)

            def step():
                for rec, s in zip(recs, states):
                    fused_step(rec, u, s, **kw)

            try:
                step()
            except Exception as e:  # a setting the compiler refuses (registers, shared memory)
                print(json.dumps({"batch": B, "state": kind, **kw, "error": str(e).splitlines()[0][:200]}), flush=True)
                continue
            times = []
            for _ in range(args.repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(20):
                    step()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 20 / 1000)
            med = statistics.median(times)
            print(json.dumps({"batch": B, "state": kind, **kw, "layers": len(recs), "ms_per_step": round(med * 1e3, 3),
                              "GB_per_s": round(nbytes / med / 1e9, 1), "device": torch.cuda.get_device_name(dev)}),
                  flush=True)


if __name__ == "__main__":
    main()
