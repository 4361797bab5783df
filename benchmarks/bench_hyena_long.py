"""Million-token HyenaDNA on one GPU: the lean inference path vs the reference paths, same run.

    python benchmarks/bench_hyena_long.py [--reference DIR] [--cases all] [--json out.json]

Model: the large-1m shape (d_model 256, 8 layers, d_inner 1024, emb_dim 5, max_seq_len 1,000,002),
random weights nudged away from their initial values so that every filter matters. Variants:
  lean        seqssm's default inference path (models/hyena_lean.py)
  lean-rfft   the same with the long convolution through real-to-complex / complex-to-real cuFFT
              transforms (packed=False) instead of half-length complex ones and the fused spectral step
  plain       seqssm's reference layer-by-layer forward (model.lean = None); its float32 output is
              the accuracy reference every other variant is compared with (||a - b|| / ||b||)
  hf          the HuggingFace HyenaDNA modeling code (DIR holds modeling_hyena.py and
              configuration_hyena.py, e.g. the anticapt wheel's finetuned_hyenadna/), same weights
Cases: `1m` one 1,000,000-token window; `32k` 32,768 x 32; `train` a forward + backward step at
1,000,000 tokens (seqssm with gradient checkpointing vs the HF code, bf16 autocast).
Timing: CUDA events, warm-up, median of --repeats; peak memory from max_memory_allocated after a
reset, the weights included.
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

from seqssm.models.hyena import HyenaConfig, HyenaDNAModel

LARGE_1M = dict(d_model=256, n_layer=8, d_inner=1024, max_seq_len=1_000_002, emb_dim=5, filter_order=64,
                short_filter_order=3, activation_freq=10, vocab_size=12)


def import_reference(d: Path):
    pkg = types.ModuleType("_hf_hyena_ref")
    pkg.__path__ = [str(d)]
    sys.modules["_hf_hyena_ref"] = pkg
    return importlib.import_module("_hf_hyena_ref.modeling_hyena"), importlib.import_module("_hf_hyena_ref.configuration_hyena")


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, float, object]:
    """(median seconds, peak GiB, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
        del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        out = None
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def build(seed: int = 0) -> HyenaDNAModel:
    torch.manual_seed(seed)
    model = HyenaDNAModel(HyenaConfig(**LARGE_1M))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "filter_fn" in name or "norm" in name else 0.01
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def forward_case(model, ref, x, repeats: int, rows: list, tag: str, check_plain: bool = True) -> None:
    tokens = x.numel()
    variants = []
    for dtype in ("float32", "bfloat16"):
        variants += [("lean", dtype), ("lean-rfft", dtype)]
    if check_plain:
        variants += [("plain", "float32"), ("plain", "bfloat16")]
    if ref is not None:
        variants += [("hf", "float32"), ("hf", "bfloat16")]
    want = None
    with torch.inference_mode():
        lean = model.lean
        model.lean = None
        want = model(x).float() if check_plain else None  # fp32 reference output
        model.lean = lean
        torch.cuda.empty_cache()
        for impl, dtype in variants:
            auto = dtype == "bfloat16"

            def run():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=auto):
                    if impl == "hf":
                        return ref(x, return_dict=True).last_hidden_state
                    return model(x)

            saved = model.lean
            if impl == "plain":
                model.lean = None
            if impl == "lean-rfft":
                saved.packed = False
            try:
                s, mem, out = timed(run, repeats)
                err = rel(out.float(), want) if want is not None else float("nan")
                del out
                rows.append(dict(case=tag, impl=impl, dtype=dtype, seconds=s, Mtok_s=tokens / s / 1e6, peak_GiB=mem,
                                 rel_err=err))
            except torch.OutOfMemoryError as e:
                rows.append(dict(case=tag, impl=impl, dtype=dtype, error=f"out of memory: {str(e)[:80]}"))
            finally:
                model.lean = saved
                saved.packed = None
                torch.cuda.empty_cache()
            print(rows[-1], flush=True)


def train_case(model, ref, x, repeats: int, rows: list) -> None:
    tokens = x.numel()
    for impl in ("seqssm+ckpt", "hf"):
        if impl == "hf" and ref is None:
            continue
        net = ref if impl == "hf" else model
        net.train()
        if impl != "hf":
            model.gradient_checkpointing = True

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = net(x, return_dict=True).last_hidden_state if impl == "hf" else net(x)
            loss = h.float().square().mean()
            loss.backward()
            net.zero_grad(set_to_none=True)
            return loss.detach()

        try:
            s, mem, _ = timed(step, repeats)
            rows.append(dict(case="train-1m", impl=impl, dtype="bf16-autocast", seconds=s, Mtok_s=tokens / s / 1e6,
                             peak_GiB=mem))
        except torch.OutOfMemoryError as e:
            rows.append(dict(case="train-1m", impl=impl, dtype="bf16-autocast", error=f"out of memory: {str(e)[:80]}"))
        finally:
            net.zero_grad(set_to_none=True)
            net.eval()
            model.gradient_checkpointing = False
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)


def probe_half_fft(model, L: int, rows: int = 32) -> None:
    """Error and time of the long convolution with float16 transforms (cuFFT: power-of-two n only)
    against float32 ones, on a real layer-0 filter and inputs with a nonzero mean."""
    from seqssm.ops.fftconv import fft_length

    filt = model.layers[0].mixer.filter_fn
    n = fft_length(L)
    with torch.inference_mode():
        k = filt.filter_rows(filt.features(L), 0, rows)
        g = torch.Generator(device="cuda").manual_seed(0)
        v = torch.randn(rows, L, device="cuda", generator=g) * 0.5 + 0.3
        want = torch.fft.irfft(torch.fft.rfft(v.double(), n=n) * torch.fft.rfft(k.double(), n=n), n=n)[:, :L]

        def f32():
            return torch.fft.irfft(torch.fft.rfft(v, n=n) * torch.fft.rfft(k, n=n), n=n)[:, :L]

        def f16():
            # Scale both operands to unit peak; the 1/sqrt(n) keeps the spectra inside float16 range.
            sv = v.abs().amax(-1, keepdim=True)
            sk = k.abs().amax(-1, keepdim=True)
            V = torch.fft.rfft((v / (sv * n ** 0.5)).half(), n=n)
            Kf = torch.fft.rfft((k / sk).half(), n=n)
            y = torch.fft.irfft(V * Kf, n=n)[:, :L].float()
            return y * (sv * sk * n ** 0.5)

        for name, fn in (("fft float32", f32), ("fft float16", f16)):
            try:
                s, mem, out = timed(fn, 5)
                print(f"probe {name}: {s*1e3:.2f} ms for {rows} rows at n={n}, rel err {rel(out, want):.2e}, "
                      f"finite {bool(torch.isfinite(out).all())}", flush=True)
            except Exception as e:
                print(f"probe {name}: {type(e).__name__}: {str(e)[:160]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, default=None)
    ap.add_argument("--cases", default="1m,32k,train")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--length", type=int, default=1_000_000)
    ap.add_argument("--seq-chunk", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--probe-half", action="store_true", help="error and time of float16 transforms")
    ap.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of lean bf16 at --length")
    ap.add_argument("--profile-batch", type=int, default=1, help="batch of the profiled input (32 with --length 32768)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build().to(dev)
    if args.seq_chunk:
        model.lean.seq_chunk = args.seq_chunk
    if args.rows:
        model.lean.rows_per_group = args.rows
    ref = None
    if args.reference:
        modeling, configuration = import_reference(args.reference)
        ref = modeling.HyenaDNAModel(configuration.HyenaConfig(**model.config.to_dict()))
        state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
        missing, unexpected = ref.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("freq")]
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        ref = ref.to(dev).eval()
    cases = [c for c in args.cases.split(",") if c]
    if args.probe_half:
        probe_half_fft(model, args.length)
    if args.profile:
        x = torch.randint(7, 11, (args.profile_batch, args.length), device=dev)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(x)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    g = torch.Generator().manual_seed(1)
    rows: list[dict] = []
    if "1m" in cases:
        x = torch.randint(7, 11, (1, args.length), generator=g).to(dev)
        forward_case(model, ref, x, args.repeats, rows, f"1x{args.length}")
    if "32k" in cases:
        x = torch.randint(7, 11, (32, 32768), generator=g).to(dev)
        forward_case(model, ref, x, args.repeats, rows, "32x32768")
    if "train" in cases:
        x = torch.randint(7, 11, (1, args.length), generator=g).to(dev)
        train_case(model, ref, x, args.repeats, rows)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'case':10s} {'impl':12s} {'dtype':14s} {'ms':>9s} {'Mtok/s':>8s} {'peak GiB':>9s} {'rel err':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:10s} {r['impl']:12s} {r['dtype']:14s} {r['error']}")
        else:
            print(f"{r['case']:10s} {r['impl']:12s} {r['dtype']:14s} {r['seconds']*1e3:9.1f} {r['Mtok_s']:8.2f} "
                  f"{r['peak_GiB']:9.2f} {r.get('rel_err', float('nan')):9.2e}")
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
