"""Selective-scan kernels on the GPU: mamba-ssm's CUDA kernel (where installed), seqssm's Gluon kernel and
seqssm's plain Triton kernel, in one process on the same inputs.

Inputs as in a Mamba mixer at inference: u, delta, z, B, C in the chosen dtype, D, delta bias,
softplus and the z gate on. CUDA events, median of --repeats after a warm-up. Each row also gives
its output's relative difference from the first row's (||a - b|| / ||b||).

    python benchmarks/bench_selective_scan.py --shapes 8x512x131072,1x512x131072 --json scan.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from seqssm.ops.selective_scan_triton import _gluon_kernel, selective_scan_triton


def _inputs(b, d, n, length, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    return dict(u=r(b, d, length).to(dtype), delta=(0.5 * r(b, d, length)).to(dtype),
                A=-torch.rand(d, n, device="cuda", generator=g) * 2, B=r(b, n, length).to(dtype),
                C=r(b, n, length).to(dtype), D=r(d), z=r(b, d, length).to(dtype), delta_bias=0.3 * r(d))


def _time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8x512x131072,1x512x131072", help="batch x channels x length, comma-separated")
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    impls = []
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        impls.append(("mamba-ssm", lambda x: selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                                                x["delta_bias"], True)))
    except Exception as exc:  # noqa: BLE001 (reported, not fatal)
        print(f"mamba-ssm not timed: {type(exc).__name__}: {exc}")
    if _gluon_kernel() is not None:
        impls.append(("seqssm gluon", lambda x: selective_scan_triton(**x, delta_softplus=True, kernel="gluon")))
    impls.append(("seqssm triton", lambda x: selective_scan_triton(**x, delta_softplus=True, kernel="triton")))
    rows = []
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, dstate {args.dstate}, {args.dtype}")
    for shape in args.shapes.split(","):
        b, d, length = (int(v) for v in shape.split("x"))
        x = _inputs(b, d, args.dstate, length, dtype)
        first = None
        for name, fn in impls:
            out = fn(x)
            first = out if first is None else first
            ms = _time(lambda: fn(x), args.repeats)
            err = float((out.float() - first.float()).norm() / first.float().norm())
            rows.append(dict(shape=shape, impl=name, ms=ms, rel_vs_first=err))
            print(f"{shape:>16}  {name:<14} {ms:8.2f} ms   rel vs {impls[0][0]}: {err:.1e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), rows=rows), indent=1))


if __name__ == "__main__":
    main()
