"""HyenaDNA forward throughput: seqssm vs the HuggingFace reference modeling code, same weights, same run.

    python benchmarks/bench_hyena_gpu.py --reference DIR [--model NAME_OR_DIR] [--batch 64] [--length 1024]

DIR holds the HF reference `modeling_hyena.py` + `configuration_hyena.py` (e.g. the anticapt wheel's
finetuned_hyenadna/ folder; not part of seqssm). The reference model is built with the config of
`--model` and gets seqssm's weights, and their outputs are compared before anything is timed.
Timing: CUDA events, warm-up, median of repeats (docs/BENCHMARKS.md records the results).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import types
from pathlib import Path

import torch

from seqssm.models import load_model


def import_reference(d: Path):
    pkg = types.ModuleType("_hf_hyena_ref")
    pkg.__path__ = [str(d)]
    sys.modules["_hf_hyena_ref"] = pkg
    return importlib.import_module("_hf_hyena_ref.modeling_hyena"), importlib.import_module("_hf_hyena_ref.configuration_hyena")


def bench(fn, x, repeats=20, warmup=5) -> float:
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--model", default="hyenadna-small-chr20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    loaded = load_model(args.model)
    cfg = loaded.config
    L = args.length or cfg.max_seq_len
    ours = loaded.model.backbone.to(dev).eval()

    modeling, configuration = import_reference(args.reference)
    hf_cfg = {k: v for k, v in cfg.to_dict().items()}
    ref = modeling.HyenaDNAModel(configuration.HyenaConfig(**hf_cfg))
    state = {f"backbone.{k}": v for k, v in ours.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("freq")]  # the shared sine frequency, tied in the reference
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    ref = ref.to(dev).eval()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(7, 11, (args.batch, L), generator=g).to(dev)
    rows = []
    with torch.inference_mode():
        a = ours(x).float()
        b = ref(x, return_dict=True).last_hidden_state.float()
        rel = ((a - b).norm() / b.norm()).item()
        for dtype in (torch.float32, torch.bfloat16):
            auto = dtype is torch.bfloat16
            def plain(t):  # seqssm's layer-by-layer reference forward
                lean, ours.lean = ours.lean, None
                try:
                    return ours(t)
                finally:
                    ours.lean = lean

            for name, fn in (("seqssm", lambda t: ours(t)), ("seqssm plain", plain),
                             ("HF reference", lambda t: ref(t).last_hidden_state)):
                def run(t, fn=fn):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=auto):
                        return fn(t)
                torch.cuda.reset_peak_memory_stats()
                try:
                    s = bench(run, x)
                    mem = torch.cuda.max_memory_allocated() / 2**30
                    rows.append({"impl": name, "dtype": str(dtype).split(".")[1], "batch": args.batch, "length": L,
                                 "seconds": s, "Mtokens_per_s": args.batch * L / s / 1e6, "peak_GiB": mem})
                except Exception as e:  # the reference may not support autocast
                    rows.append({"impl": name, "dtype": str(dtype).split(".")[1], "error": f"{type(e).__name__}: {e}"[:200]})
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  model {loaded.name}  "
          f"max |rel| seqssm vs reference (fp32): {rel:.2e}")
    print(f"{'impl':14s} {'dtype':9s} {'batch x len':>12s} {'ms':>9s} {'Mtok/s':>9s} {'peak GiB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:14s} {r['dtype']:9s} error: {r['error']}")
        else:
            print(f"{r['impl']:14s} {r['dtype']:9s} {r['batch']:>5d} x {r['length']:<5d} {r['seconds']*1e3:9.2f} "
                  f"{r['Mtokens_per_s']:9.2f} {r['peak_GiB']:9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rel_diff_fp32": rel, "rows": rows, "device": torch.cuda.get_device_name()}, indent=1))


if __name__ == "__main__":
    main()
