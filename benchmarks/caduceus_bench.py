"""Caduceus embedding throughput: seqssm vs the reference implementation, same weights, same run.

    python benchmarks/caduceus_bench.py [--ref .ref/caduceus] [--device cuda|cpu]
        [--runs bf16:131072x8,fp32:131072x8,bf16:1048576x1] [--config ps|ph] [--d-model 256] [--n-layer 16]
        [--backend auto|torch|cuda|triton] [--bf16 cast|autocast] [--repeats 3] [--warmup 1] [--json OUT.json]

What is timed: the backbone's forward (token ids -> final hidden states, what embedding needs),
model.eval(), torch.inference_mode(); warm-up call(s), then the median of --repeats calls, each
closed by torch.cuda.synchronize(). Peak memory: torch.cuda.max_memory_allocated() over the
timed calls after a reset (also reported net of what was allocated before: weights and input).
bf16 "cast": both models converted to bfloat16 (bf16 end to end); "autocast": float32 weights
under torch.autocast(bfloat16).

The reference is the kuleshov-group/caduceus code checked out (never committed) in --ref; it
imports mamba-ssm (mamba_simple.Mamba, Block, the Triton RMSNorm / layer_norm_fn / rms_norm_fn)
and transformers at module level, so it runs only where those are installed (a CUDA machine).
It was written for transformers 4.x (it pins 4.38.1) and fails under 5.x; without a 4.x, a
minimal stand-in for PreTrainedModel / PretrainedConfig is used for the reference's own imports
(it only stores the config, initializes and ties weights; all computation is the reference's
modeling code and mamba-ssm's). Both models carry the same random weights (seqssm's state dict copied
into the reference, strict), and their float32 outputs are compared before anything is timed.

CPU (the torch path): --device cpu --runs fp32:131072x1 [--threads N]; the reference is skipped.
Writes a JSON (--json) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

from seqssm.models.caduceus import BiMambaWrapper, CaduceusBackbone, CaduceusConfig, CaduceusForMaskedLM

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REF = REPO / ".ref" / "caduceus"
REF_CONFIG_KEYS = ("d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                   "pad_vocab_size_multiple", "norm_epsilon", "initializer_cfg", "bidirectional",
                   "bidirectional_strategy", "bidirectional_weight_tie", "rcps", "complement_map")

# config.json of kuleshov-group/caduceus-ps_seqlen-131k_d_model-256_n_layer-16 (the fields that matter)
PS_CONFIG = {
    "d_model": 256, "n_layer": 16, "vocab_size": 16, "pad_vocab_size_multiple": 8, "rms_norm": True,
    "residual_in_fp32": False, "fused_add_norm": True, "norm_epsilon": 1e-5,
    "ssm_cfg": {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001, "dt_max": 0.1,
                "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4, "conv_bias": True, "bias": False,
                "use_fast_path": True},
    "initializer_cfg": {"initializer_range": 0.02, "rescale_prenorm_residual": True, "n_residuals_per_layer": 1},
    "bidirectional": True, "bidirectional_strategy": "add", "bidirectional_weight_tie": True, "rcps": True,
    "complement_map": {str(i): v for i, v in enumerate([0, 1, 2, 3, 4, 5, 6, 10, 9, 8, 7, 11, 12, 13, 14, 15])},
}


# ----------------------------------------------------------------------------------------------
# the reference implementation


def _transformers_stand_in() -> dict[str, types.ModuleType]:
    """`transformers` / `transformers.modeling_outputs` with just what modeling_caduceus.py uses."""
    tf = types.ModuleType("transformers")
    outputs = types.ModuleType("transformers.modeling_outputs")

    class PretrainedConfig:
        def __init__(self, **kwargs):
            self.output_hidden_states = kwargs.pop("output_hidden_states", False)
            self.use_return_dict = kwargs.pop("return_dict", True)
            self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", True)
            self.pad_token_id = kwargs.pop("pad_token_id", None)
            for k, v in kwargs.items():
                setattr(self, k, v)

    class PreTrainedModel(nn.Module):
        config_class = PretrainedConfig

        def __init__(self, config, *args, **kwargs):
            super().__init__()
            self.config = config

        def _init_weights(self, module):
            pass

        def post_init(self):  # as transformers: initialize every module, then tie
            self.apply(self._init_weights)
            self.tie_weights()

        def tie_weights(self):
            if getattr(self.config, "tie_word_embeddings", True) and hasattr(self, "get_output_embeddings"):
                self.get_output_embeddings().weight = self.get_input_embeddings().weight

    class _Output:
        def __init__(self, **kw):
            self.__dict__.update(kw)
            self._values = tuple(v for v in kw.values() if v is not None)

        def __getitem__(self, i):
            return self._values[i]

    def output(name, fields):
        def init(self, **kw):
            _Output.__init__(self, **{f: kw.get(f) for f in fields})
        return type(name, (_Output,), {"__init__": init})

    outputs.BaseModelOutputWithNoAttention = output("BaseModelOutputWithNoAttention", ("last_hidden_state",
                                                                                        "hidden_states"))
    outputs.MaskedLMOutput = output("MaskedLMOutput", ("loss", "logits", "hidden_states"))
    outputs.SequenceClassifierOutput = output("SequenceClassifierOutput", ("loss", "logits", "hidden_states"))
    tf.PretrainedConfig, tf.PreTrainedModel, tf.modeling_outputs = PretrainedConfig, PreTrainedModel, outputs
    return {"transformers": tf, "transformers.modeling_outputs": outputs}


def _transformers_4() -> bool:
    if importlib.util.find_spec("transformers") is None:
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers").split(".")[0] == "4"
    except PackageNotFoundError:
        return False


def import_reference(ref_dir: Path = DEFAULT_REF, *, stand_in: bool | None = None):
    """(modeling_caduceus, configuration_caduceus, "transformers" or "stand-in") from a reference checkout.

    The package's __init__ (which also imports the tokenizer) is skipped. stand_in None: use the
    real transformers when a 4.x is installed (the reference pins 4.38.1; 5.x calls
    tie_weights(recompute_mapping=...), which the reference's override does not take). Raises
    ImportError when mamba-ssm (or a reference file) is missing.
    """
    pkg_dir = Path(ref_dir) / "caduceus"
    if not (pkg_dir / "modeling_caduceus.py").is_file():
        raise ImportError(f"{pkg_dir}: no modeling_caduceus.py (fetch kuleshov-group/caduceus into {ref_dir})")
    if stand_in is None:
        stand_in = not _transformers_4()
    # mamba-ssm first, with the real environment (its package __init__ imports transformers.generation)
    for mod_name in ("mamba_ssm", "mamba_ssm.modules.mamba_simple"):
        importlib.import_module(mod_name)
    name = "_caduceus_reference"
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    saved = {}
    if stand_in:
        for mod_name, mod in _transformers_stand_in().items():
            saved[mod_name] = sys.modules.get(mod_name)
            sys.modules[mod_name] = mod
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(pkg_dir)]
    sys.modules[name] = pkg
    try:
        configuration = importlib.import_module(f"{name}.configuration_caduceus")
        modeling = importlib.import_module(f"{name}.modeling_caduceus")
    finally:
        for mod_name, old in saved.items():  # the reference modules keep their references
            if old is None:
                sys.modules.pop(mod_name, None)
            else:
                sys.modules[mod_name] = old
    return modeling, configuration, "stand-in" if stand_in else "transformers"


def build_reference(modeling, configuration, cfg: dict, state_dict: dict, device) -> nn.Module:
    """The reference CaduceusForMaskedLM for a config.json dict, carrying `state_dict` (strict)."""
    kwargs = {k: copy.deepcopy(cfg[k]) for k in REF_CONFIG_KEYS if k in cfg}
    ref = modeling.CaduceusForMaskedLM(configuration.CaduceusConfig(**kwargs))
    ref.load_state_dict(state_dict, strict=True)
    return ref.to(device).eval()


def reference_hidden(ref, ids, output_hidden_states: bool = False):
    """Final hidden states (and the list of block inputs) of the reference backbone."""
    hidden, all_hidden = ref.caduceus.backbone(ids, output_hidden_states=output_hidden_states)
    return (hidden, all_hidden) if output_hidden_states else hidden


def reference_logits(ref, ids):
    """What the reference CaduceusForMaskedLM.forward computes as logits (lm_head of the hidden states, float32)."""
    return ref.lm_head(ref.caduceus.backbone(ids)[0]).float()


# ----------------------------------------------------------------------------------------------
# benchmark


def make_config(kind: str, d_model: int, n_layer: int) -> dict:
    cfg = copy.deepcopy(PS_CONFIG)
    cfg.update(d_model=d_model, n_layer=n_layer)
    if kind == "ph":
        cfg["rcps"] = False
    elif kind != "ps":
        raise SystemExit(f"--config {kind!r}: choose ps or ph")
    return cfg


def random_model(cfg: dict, seed: int = 0) -> CaduceusForMaskedLM:
    """seqssm's model with its init, then every parameter perturbed (so nothing is at a special value)."""
    torch.manual_seed(seed)
    model = CaduceusForMaskedLM(CaduceusConfig.from_dict(copy.deepcopy(cfg)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if hasattr(m, "backend") and hasattr(m, "A_log"):
            m.backend = backend


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def parse_runs(text: str) -> list[tuple[str, int, int]]:
    runs = []
    for item in text.split(","):
        try:
            dtype, shape = item.strip().split(":")
            length, batch = shape.lower().split("x")
            runs.append((dtype, int(length), int(batch)))
        except ValueError:
            raise SystemExit(f"--runs: {item!r} is not DTYPE:LENGTHxBATCH (e.g. bf16:131072x8)") from None
        if dtype not in ("bf16", "fp32"):
            raise SystemExit(f"--runs: dtype {dtype!r}: choose bf16 or fp32")
    return runs


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn, ids, device, *, repeats: int, warmup: int) -> dict:
    """Median seconds of `repeats` calls after `warmup` ones, and peak memory over the timed calls."""
    for _ in range(warmup):
        fn(ids)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(ids)
        sync(device)
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times), "all_seconds": times}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_gib=peak / 2**30, activation_gib=(peak - base) / 2**30)
    return out


def run_one(impl: str, fn, dtype: str, length: int, batch: int, device, args, vocab_ids) -> dict:
    rec = {"impl": impl, "dtype": dtype, "length": length, "batch": batch}
    g = torch.Generator().manual_seed(length + batch)
    ids = vocab_ids[torch.randint(len(vocab_ids), (batch, length), generator=g)].to(device)
    ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" and args.bf16 == "autocast"
           else contextlib.nullcontext())

    def call(x):
        with ctx:
            return fn(x)

    try:
        with torch.inference_mode():
            rec.update(time_forward(call, ids, device, repeats=args.repeats, warmup=args.warmup))
        rec["tokens_per_s"] = batch * length / rec["seconds"]
        rec["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        rec["status"] = f"out of memory: {str(e).splitlines()[0][:120]}"
    finally:
        del ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", type=Path, default=DEFAULT_REF, help="reference checkout (kuleshov-group/caduceus)")
    ap.add_argument("--no-reference", action="store_true", help="time seqssm only")
    ap.add_argument("--stand-in", action="store_true", help="use the transformers stand-in even if it is installed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", default="bf16:131072x8,fp32:131072x8,bf16:1048576x1",
                    help="comma-separated DTYPE:LENGTHxBATCH")
    ap.add_argument("--config", default="ps", help="ps (Caduceus-PS) or ph (Caduceus-Ph)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=16)
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "cuda", "triton"),
                    help="seqssm's scan/conv backend")
    ap.add_argument("--bf16", default="cast", choices=("cast", "autocast"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--parity-length", type=int, default=4096, help="fp32 output comparison length (0: skip)")
    ap.add_argument("--compare-steps", action="store_true",
                    help="also time seqssm with BiMambaWrapper.concurrent_directions off, then also "
                         "CaduceusBackbone.strand_major, then also BiMambaWrapper.share_projections "
                         "(the session-13 inference path)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="CUDA kernel profile of seqssm on the first run's shape")
    ap.add_argument("--profile-ops", action="store_true", help="with --profile: the torch operators too")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # exact float32 for the comparison and the fp32 timings
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    runs = parse_runs(args.runs)
    cfg = make_config(args.config, args.d_model, args.n_layer)
    ours32 = random_model(cfg)
    set_backend(ours32, args.backend)
    vocab_ids = torch.tensor([7, 8, 9, 10])  # A C G T

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "config": cfg, "backend": args.backend,
        "bf16_mode": args.bf16, "repeats": args.repeats, "warmup": args.warmup, "results": [],
    }
    ref32, why_not = None, None
    if args.no_reference:
        why_not = "--no-reference"
    elif device.type != "cuda":
        why_not = "the reference needs mamba-ssm's CUDA kernels"
    else:
        try:
            modeling, configuration, plumbing = import_reference(args.ref, stand_in=args.stand_in or None)
            ref32 = build_reference(modeling, configuration, cfg, ours32.state_dict(), "cpu")
            report["reference_transformers"] = plumbing
        except ImportError as e:
            why_not = f"cannot import the reference: {e}"
    report["reference"] = "kuleshov-group/caduceus" if ref32 is not None else f"skipped ({why_not})"

    ours32 = ours32.to(device)
    if ref32 is not None:
        ref32 = ref32.to(device)
        if args.parity_length:
            g = torch.Generator().manual_seed(7)
            x = vocab_ids[torch.randint(4, (2, args.parity_length), generator=g)].to(device)
            with torch.inference_mode():
                report["parity_fp32"] = {
                    "length": args.parity_length, "batch": 2,
                    "hidden_rel": rel(ours32.caduceus.backbone(x), reference_hidden(ref32, x)),
                    "logits_rel": rel(ours32(x), reference_logits(ref32, x)),
                }
            print(f"fp32 parity (2 x {args.parity_length}): hidden {report['parity_fp32']['hidden_rel']:.2e}, "
                  f"logits {report['parity_fp32']['logits_rel']:.2e} (relative to the largest value)")

    impls = [("seqssm", ours32, lambda m: m.caduceus.backbone)]
    if args.compare_steps:
        impls.append(("seqssm-one-stream", ours32, lambda m: m.caduceus.backbone))
        impls.append(("seqssm-per-layer", ours32, lambda m: m.caduceus.backbone))
        impls.append(("seqssm-s13", ours32, lambda m: m.caduceus.backbone))
    if ref32 is not None:
        impls.append(("reference", ref32, lambda m: (lambda x: reference_hidden(m, x))))
    for dtype, length, batch in runs:
        for name, model32, fn_of in impls:
            model = model32
            if dtype == "bf16" and args.bf16 == "cast":
                model = copy.deepcopy(model32).to(torch.bfloat16)
            BiMambaWrapper.share_projections = name != "seqssm-s13"
            CaduceusBackbone.strand_major = name not in ("seqssm-per-layer", "seqssm-s13")
            BiMambaWrapper.concurrent_directions = name == "seqssm"
            rec = run_one(name, fn_of(model), dtype, length, batch, device, args, vocab_ids)
            BiMambaWrapper.share_projections = CaduceusBackbone.strand_major = True
            BiMambaWrapper.concurrent_directions = True
            report["results"].append(rec)
            if model is not model32:
                del model
            _print_row(rec)
    if args.profile and device.type == "cuda":
        dtype, length, batch = runs[0]
        model = copy.deepcopy(ours32).to(torch.bfloat16) if dtype == "bf16" and args.bf16 == "cast" else ours32
        ids = vocab_ids[torch.randint(4, (batch, length))].to(device)
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bf16" and args.bf16 == "autocast"
               else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            model.caduceus.backbone(ids)
            sync(device)
            acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if args.profile_ops else [])
            with torch.profiler.profile(activities=acts) as prof:
                model.caduceus.backbone(ids)
                sync(device)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40 if args.profile_ops else 22,
                                        max_name_column_width=60))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_row(rec: dict) -> None:
    if rec.get("status") != "ok":
        print(f"{rec['impl']:>9} {rec['dtype']:>4} {rec['length']:>9} x {rec['batch']:<3} {rec['status']}")
        return
    mem = f"{rec['peak_gib']:7.2f} GiB peak ({rec['activation_gib']:.2f} above weights+input)" if "peak_gib" in rec else ""
    print(f"{rec['impl']:>9} {rec['dtype']:>4} {rec['length']:>9} x {rec['batch']:<3} "
          f"{rec['seconds'] * 1e3:10.1f} ms {rec['tokens_per_s']:12,.0f} tokens/s  {mem}", flush=True)


if __name__ == "__main__":
    main()
