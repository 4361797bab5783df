"""`seqssm pretrain`: FASTA -> held-out split -> DNA language-model training -> a seqssm model directory.

Architectures (``arch``) and their objectives:
  hyena     HyenaDNA, next-base (causal LM) objective, Markov baseline on the same split (default)
  caduceus  Caduceus-PS (``rcps``, default) or Caduceus-Ph (``rcps=False``: a bidirectional Mamba
            trained with RC augmentation), masked-language-model objective (seqssm.training.mlm),
            the Caduceus AdamW recipe unless lr etc. are given; held-out masked accuracy/perplexity
  mamba     a causal Mamba stack (Caduceus config, bidirectional=False): next-base objective with
            the Mamba no-decay rule; the one kind of model ``seqssm embed --stream`` can walk
``--init`` of a model directory implies its architecture.

Output directory (``-o OUT``)::

    OUT/run.json                 the run's settings and status ("running" / "finished")
    OUT/checkpoints/step-N/      the latest checkpoint (a loadable model dir + optimizer.pt + trainer_state.json)
    OUT/checkpoints/LATEST       name of the latest complete checkpoint
    OUT/metrics.jsonl            one JSON line per step ("kind": "train") and per evaluation ("kind": "eval")
    OUT/curves.png               loss and perplexity (MLM: masked accuracy) curves, refreshed at each evaluation
    OUT/markov_baseline.json     the k-mer baseline on the same split (next-base runs, unless --no-markov-baseline)
    OUT/config.json, model.safetensors, tokenizer.json, training.json
                                 the final model (written when max_steps is reached), so
                                 ``load_model(OUT)`` works; copy those four files to bundle it.

A run can be cut at any moment and continued with ``resume=True`` (the same command plus
``--resume``); with ``max_minutes`` / ``max_steps_this_run`` an invocation stops by itself after
saving a checkpoint, which is how a long run is spread over several time-limited jobs. The
settings that define the run (model, data, split, optimisation) are fixed when it starts; a
resumed invocation may change only max_steps (which reshapes the cosine tail), the evaluation
and checkpoint intervals, the device and the time budget.

Under torchrun (docs/DISTRIBUTED.md) the same command trains data-parallel: ``batch_size`` is the
global micro-batch, split into equal contiguous slices across the processes, and the run equals the
single-process one on the same global batch; only rank 0 writes into OUT. A run may be resumed with
another number of processes (or ``fsdp``), as long as it divides the batch size.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seqssm.pipelines.progress import JobDisplay
from seqssm.pipelines.output import check_run_budget, prepare_run_dir
from seqssm.io.atomic import atomic_write_text
from seqssm import __version__
from seqssm.distributed import Dist, session
from seqssm.errors import SeqssmError
from seqssm.layers.mamba import check_backend, configure_backend
from seqssm.tokenizers.dna import DNATokenizer
from seqssm.training.data import SHARED_CONTEXT, DataSplit, load_split
from seqssm.training.lm import (
    METRICS,
    Callbacks,
    CausalLMObjective,
    StopRule,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    read_checkpoint_state,
    resolve_device,
)
from seqssm.training.mlm import CaduceusOptimConfig, MaskedLMObjective, no_weight_decay_names, wants_rc_augmentation

RUN_FILE = "run.json"
MARKOV_FILE = "markov_baseline.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "training.json")

ARCHS = ("hyena", "caduceus", "mamba")
# Defaults of a fresh run: a small HyenaDNA that trains on one GPU in tens of minutes.
MODEL_DEFAULTS = {"d_model": 256, "n_layer": 4, "d_inner": None}
# Caduceus / Mamba: a small model of the published layout (d_state 16, expand 2, d_conv 4).
SSM_MODEL_DEFAULTS = {"d_model": 128, "n_layer": 4}
TRAIN_DEFAULTS = TrainConfig(
    seq_len=1024, batch_size=64, grad_accum=1, lr=1e-3, min_lr=1e-4, warmup_steps=300, max_steps=10000,
    weight_decay=0.1, grad_clip=1.0, eval_every=500, save_every=500, seed=0,
)
# Settings a resumed run may change; every other one must match the run being resumed.
_MUTABLE = {"max_steps", "eval_every", "save_every", "eval_batch_size", "eval_max_windows", "keep_checkpoints",
            "log_every"}


@dataclass
class PretrainOptions:
    """Everything `seqssm pretrain` takes. ``None`` means: the default (fresh run), the --init
    model's value (architecture), or the resumed run's value."""

    fasta: list = field(default_factory=list)
    output: Path | str = "pretrain-out"
    arch: str | None = None  # hyena | caduceus | mamba; None: hyena, or the --init / resumed model's
    rcps: bool | None = None  # caduceus: RC-equivariant (Caduceus-PS, the default) or not (Caduceus-Ph)
    d_model: int | None = None
    n_layer: int | None = None
    d_inner: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int | None = None
    save_every: int | None = None
    seed: int | None = None
    eval_batch_size: int | None = None
    eval_max_windows: int | None = None
    keep_checkpoints: int | None = None
    valid_regions: list = field(default_factory=list)
    valid_files: list = field(default_factory=list)
    device: str = "auto"
    resume: bool = False
    force: bool = False
    max_minutes: float | None = None
    max_steps_this_run: int | None = None
    init: str | None = None
    markov_baseline: bool = True
    compile: bool = False
    backend: str = "auto"  # Mamba / Caduceus kernels (seqssm.layers.mamba.configure_backend)
    fsdp: bool = False  # under torchrun: shard the model (FSDP2) instead of replicating it (DDP)
    quiet: bool = False
    command: str | None = None  # recorded in training.json; default: sys.argv


@dataclass
class PretrainSummary:
    output: Path
    finished: bool
    reason: str
    step: int
    max_steps: int
    tokens_seen: int
    seconds: float
    device: str
    parameters: int
    resumed_from: int | None = None
    heldout: dict | None = None
    markov: dict | None = None
    split_rule: str = ""
    train_bases: int = 0
    valid_bases: int = 0
    architecture: str = ""
    objective: str = "causal"  # causal | mlm
    baseline: dict | None = None  # MLM: the no-context reference (seqssm.training.mlm.no_context_baseline)


# ----------------------------------------------------------------------------- helpers


def _atomic_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _fingerprint(paths) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        out.append({"name": p.name, "size": p.stat().st_size if p.exists() else None})
    return out


def _split_signature(split: DataSplit) -> dict:
    d = split.description
    return {"records": d["records"], "train": [s["region"] for s in d["train"]],
            "valid": [(Path(s["file"]).name, s["region"]) for s in d["valid"]], "seq_len": d["seq_len"]}


def _prepare_output(out: Path, *, resume: bool, force: bool) -> dict | None:
    """Check the output directory; return the saved run.json when there is a run to resume."""
    return prepare_run_dir(out, kind="pretrain", resume=resume, force=force, run_file=RUN_FILE,
                           finished_hint="; use --force to overwrite it, or --resume with a larger "
                                         "--max-steps to train it further")


def arch_of_config(config: dict) -> str:
    """hyena, caduceus (bidirectional and/or RC-equivariant) or mamba (causal) from a model config dict."""
    if config.get("model_type") != "caduceus":
        return "hyena"
    return "caduceus" if config.get("bidirectional", True) or config.get("rcps", False) else "mamba"


def _flag(k: str, v) -> str:
    if k == "rcps":
        return "--rcps" if v else "--no-rcps"
    return f"--{k.replace('_', '-')} {v}"


def _given_model(opts: PretrainOptions, arch: str) -> dict:
    """The architecture options given on the command line, as model-config keys."""
    if arch == "hyena":
        if opts.rcps is not None:
            raise SeqssmError(f"{_flag('rcps', opts.rcps)} is a Caduceus option; add --arch caduceus")
        return {k: getattr(opts, k) for k in MODEL_DEFAULTS if getattr(opts, k) is not None}
    if opts.d_inner is not None:
        raise SeqssmError(f"--d-inner is a HyenaDNA option; a {arch} model's inner width is 2 x --d-model")
    if arch == "mamba" and opts.rcps:
        raise SeqssmError("--rcps: a causal Mamba (--arch mamba) cannot be RC-equivariant; use --arch caduceus")
    given = {k: getattr(opts, k) for k in SSM_MODEL_DEFAULTS if getattr(opts, k) is not None}
    if opts.rcps is not None and arch == "caduceus":
        given["rcps"] = bool(opts.rcps)
    return given


def _arch(opts: PretrainOptions, saved: dict | None, init_config: dict | None) -> str:
    if opts.arch is not None and opts.arch not in ARCHS:
        raise SeqssmError(f"--arch {opts.arch!r}: choose {', '.join(ARCHS)}")
    for config, what in ((saved or {}).get("model_config"), "the run being resumed"), (init_config, "the --init model"):
        if config is not None:
            arch = arch_of_config(config)
            if opts.arch is not None and opts.arch != arch:
                raise SeqssmError(f"--arch {opts.arch} conflicts with {what} (a {arch} model); drop --arch")
            return arch
    return opts.arch or "hyena"


def train_defaults(arch: str, given_train: dict) -> TrainConfig:
    """A fresh run's TrainConfig before the given options: HyenaDNA's, or the Caduceus AdamW recipe
    (lr 8e-3 -> 1e-4, warm-up 10% of max_steps, betas 0.9/0.95, weight decay 0.1, clip 1.0)."""
    if arch == "hyena":
        return TrainConfig.from_dict(TRAIN_DEFAULTS.to_dict())
    oc = CaduceusOptimConfig()
    max_steps = int(given_train.get("max_steps", TRAIN_DEFAULTS.max_steps))
    return TrainConfig.from_dict({**TRAIN_DEFAULTS.to_dict(), "lr": oc.lr, "min_lr": oc.min_lr,
                                  "warmup_steps": oc.warmup_steps(max_steps), "weight_decay": oc.weight_decay,
                                  "adam_betas": list(oc.betas), "adam_eps": oc.eps, "grad_clip": oc.grad_clip})


def _resolve(opts: PretrainOptions, saved: dict | None, init_loaded) -> tuple[str, dict, TrainConfig]:
    """Architecture, model settings and the TrainConfig of this invocation."""
    init_config = init_loaded.config.to_dict() if init_loaded is not None else None
    arch = _arch(opts, saved, init_config)
    given_train = {k: getattr(opts, k) for k in TrainConfig.__dataclass_fields__ if getattr(opts, k, None) is not None}
    given_model = _given_model(opts, arch)
    if saved is not None:
        base = TrainConfig.from_dict(saved["train_config"])
        conflicts = [f"--{k.replace('_', '-')} {v} (the run has {getattr(base, k)})"
                     for k, v in given_train.items() if k not in _MUTABLE and v != getattr(base, k)]
        mc = saved["model_config"]
        conflicts += [f"{_flag(k, v)} (the run has {_flag(k, mc.get(k))})"
                      for k, v in given_model.items() if v != mc.get(k)]
        if conflicts:
            raise SeqssmError("cannot resume with different settings: " + "; ".join(conflicts) +
                              "; drop them, or use --force to start over")
        for k, v in given_train.items():
            setattr(base, k, v)
        return arch, dict(mc), base
    cfg = TrainConfig.from_dict({**train_defaults(arch, given_train).to_dict(), **given_train})
    if init_config is not None:
        conflicts = [f"{_flag(k, v)} (the --init model has {_flag(k, init_config.get(k))})"
                     for k, v in given_model.items() if v != init_config.get(k)]
        if conflicts:
            raise SeqssmError("architecture options conflict with --init: " + "; ".join(conflicts))
        limit = int(init_loaded.max_length)
        if opts.seq_len is None:
            cfg.seq_len = min(cfg.seq_len, limit)
        if arch == "hyena" and cfg.seq_len > limit:  # Caduceus has no positional limit
            raise SeqssmError(f"--seq-len {cfg.seq_len} exceeds the --init model's maximum length {limit}")
        return arch, dict(init_config), cfg
    if arch == "hyena":
        model = {**MODEL_DEFAULTS, **given_model}
    else:
        model = {**SSM_MODEL_DEFAULTS, **given_model}
    for k in ("d_model", "n_layer"):
        if model[k] < 1:
            raise SeqssmError(f"--{k.replace('_', '-')} must be >= 1")
    if arch != "hyena":
        from seqssm.models.caduceus import CaduceusConfig

        rcps = bool(model.get("rcps", True)) if arch == "caduceus" else False
        return arch, CaduceusConfig.dna(model["d_model"], model["n_layer"], rcps=rcps,
                                        bidirectional=arch == "caduceus").to_dict(), cfg
    if model["d_inner"] is not None and model["d_inner"] < 1:
        raise SeqssmError("--d-inner must be >= 1")
    if model["d_inner"] is None:
        model["d_inner"] = 4 * model["d_model"]
    model["max_seq_len"] = cfg.seq_len
    return arch, model, cfg


def build_model(arch: str, settings: dict, seed: int):
    """A fresh model of the architecture from its config dict, initialised from ``seed``."""
    from seqssm.models import HyenaConfig, HyenaDNAForCausalLM
    from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM

    try:
        config = HyenaConfig.from_dict(settings) if arch == "hyena" else CaduceusConfig.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise SeqssmError(f"bad model settings: {e}") from None
    torch.manual_seed(seed)
    return HyenaDNAForCausalLM(config) if arch == "hyena" else CaduceusForMaskedLM(config)


def make_objective(arch: str, model, n_as_pad: bool):
    """MLM for Caduceus (RC augmentation unless RC-equivariant), next-base for HyenaDNA and causal Mamba."""
    if arch == "caduceus":
        return MaskedLMObjective(rc_aug=wants_rc_augmentation(model.config), n_as_pad=n_as_pad)
    if arch == "mamba":
        return CausalLMObjective(no_decay=no_weight_decay_names)
    return CausalLMObjective()


def _device_name(device: torch.device, dist: Dist | None = None) -> str:
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        name = str(device)
    if dist is not None and dist.enabled:
        name = f"{dist.world_size} x {name}"
    return name


def data_parallel_info(dist: Dist, *, fsdp: bool, batch_size: int) -> dict:
    """What training.json records of a torchrun job (absent from single-process runs)."""
    return {"world_size": dist.world_size, "backend": dist.backend, "mode": "FSDP2" if fsdp else "DDP",
            "global_batch_size": batch_size, "per_rank_batch_size": batch_size // dist.world_size}


def command_line(opts: PretrainOptions) -> str:
    """The `seqssm pretrain` command equivalent to ``opts`` (options left unset are omitted)."""
    words = ["seqssm", "pretrain", *map(str, opts.fasta), "-o", str(opts.output)]
    if opts.arch is not None:
        words += ["--arch", opts.arch]
    if opts.rcps is not None:
        words.append("--rcps" if opts.rcps else "--no-rcps")
    flags = ["d_model", "n_layer", "d_inner", "seq_len", "batch_size", "grad_accum", "lr", "min_lr",
             "warmup_steps", "max_steps", "weight_decay", "grad_clip", "eval_every", "eval_max_windows",
             "save_every", "seed", "max_minutes", "max_steps_this_run", "init"]
    for name in flags:
        v = getattr(opts, name)
        if v is not None:
            words += [f"--{name.replace('_', '-')}", str(v)]
    for r in opts.valid_regions:
        words += ["--valid-region", str(r)]
    for f in opts.valid_files:
        words += ["--valid-file", str(f)]
    if opts.device != "auto":
        words += ["--device", opts.device]
    if opts.backend != "auto":
        words += ["--backend", opts.backend]
    for name, on in (("resume", opts.resume), ("force", opts.force), ("compile", opts.compile),
                     ("fsdp", opts.fsdp), ("no-markov-baseline", not opts.markov_baseline)):
        if on:
            words.append(f"--{name}")
    return " ".join(shlex.quote(w) for w in words)


# ----------------------------------------------------------------------------- UI


class _Display(JobDisplay, Callbacks):
    """Rich progress bar on stderr (interactive) or plain log lines (logs, pipes)."""

    def __init__(self, console, *, quiet: bool, baseline: dict | None):
        super().__init__(console, quiet=quiet)
        self.baseline = baseline
        self._t0 = time.monotonic()
        self._tokens0 = 0

    def on_start(self, tr: Trainer) -> None:
        self._tokens0 = tr.tokens_seen
        self._t0 = time.monotonic()
        if not self.interactive:
            return
        self.start_bar("pretrain", total=tr.cfg.max_steps, completed=tr.step,
                       fields="loss {task.fields[loss]}  ppl {task.fields[ppl]}  {task.fields[tps]} tok/s",
                       loss="-", ppl="-", tps="-")

    def on_step(self, tr: Trainer, rec: dict) -> None:
        # MLM steps report the masked positions' argmax accuracy in place of the perplexity
        second = f"acc {rec['accuracy']:.4f}" if "accuracy" in rec else f"ppl {rec['ppl']:.4f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=rec["step"], loss=f"{rec['loss']:.4f}", ppl=second,
                                 tps=f"{rec['tokens_per_s']:,.0f}")
        elif not self.quiet and (rec["step"] % max(tr.cfg.log_every, 1) == 0 or rec["step"] == 1):
            el = time.monotonic() - self._t0
            rate = (tr.tokens_seen - self._tokens0) / el if el > 0 else 0.0
            self.log(f"step {rec['step']}/{tr.cfg.max_steps}  loss {rec['loss']:.4f}  {second}  "
                     f"lr {rec['lr']:.3g}  {rate:,.0f} tok/s  {el:.0f} s")

    def on_eval(self, tr: Trainer, rec: dict) -> None:
        part = "" if rec.get("full") else f" [{rec['val_windows']} windows]"
        if "val_masked_accuracy" in rec:
            extra = ""
            if self.baseline:
                extra = f"  (no context: {self.baseline['masked_accuracy']:.4f})"
            self.log(f"[cyan]eval[/] step {rec['step']}{part}: held-out masked accuracy "
                     f"{rec['val_masked_accuracy']:.4f}{extra}, perplexity {rec['val_ppl']:.4f} "
                     f"({rec['val_targets']:,} masked A/C/G/T)")
            return
        extra = ""
        if self.baseline:
            extra = f"  (best Markov k={self.baseline['best']['k']}: {self.baseline['best']['ppl']:.4f})"
        self.log(f"[cyan]eval[/] step {rec['step']}{part}: held-out ppl {rec['val_ppl']:.4f} (ACGT targets), "
                 f"{rec['val_shared_ppl']:.4f} (shared set){extra}")

    def on_checkpoint(self, tr: Trainer, path: Path) -> None:
        if not self.interactive:
            self.log(f"checkpoint {path}")


# ----------------------------------------------------------------------------- the job


def run_pretrain(opts: PretrainOptions, console=None) -> PretrainSummary:
    """Train (or continue training) a DNA language model; see the module docstring."""
    with session(opts.device, resolve_device) as dist:
        return _run_pretrain(opts, console, dist)


def _find_run(out: Path, opts: PretrainOptions):
    """(saved run.json or None, latest checkpoint or None); with --force the old run is removed."""
    saved = _prepare_output(out, resume=opts.resume, force=opts.force)
    return saved, (latest_checkpoint(out) if saved is not None else None)


def _run_pretrain(opts: PretrainOptions, console, dist: Dist) -> PretrainSummary:
    from rich.console import Console

    from seqssm.models import count_parameters, load_model
    from seqssm.models.io import architecture_of

    t_start = time.monotonic()
    console = console or Console(stderr=True)
    out = Path(opts.output).expanduser()
    check_run_budget(opts.max_minutes, opts.max_steps_this_run)
    if opts.fsdp and not dist.enabled:
        raise SeqssmError("--fsdp shards the model across the processes of a torchrun job; start the command "
                          "with torchrun --nproc_per_node=N (see docs/DISTRIBUTED.md), or drop --fsdp")
    # Rank 0 looks at (and with --force clears) OUT; every rank then works from what it found.
    saved, ckpt = dist.on_main(lambda: _find_run(out, opts))
    device = dist.device
    check_backend(opts.backend, device, training=True)
    main = dist.is_main

    def settings():
        """Data and settings; every rank reads the data (a failure on any rank stops them all)."""
        if saved is not None:
            fasta = [Path(p) for p in (opts.fasta or saved["fasta"])]
            valid_regions = list(opts.valid_regions or saved.get("valid_regions", []))
            valid_files = [Path(p) for p in (opts.valid_files or saved.get("valid_files", []))]
            if _fingerprint(fasta) != saved["fasta_fingerprint"]:
                raise SeqssmError("cannot resume: the training FASTA files differ from the run's "
                                  f"({', '.join(f['name'] for f in saved['fasta_fingerprint'])})")
            if _fingerprint(valid_files) != saved.get("valid_files_fingerprint", []):
                raise SeqssmError("cannot resume: the --valid-file files differ from the run's")
            if opts.init and opts.init != saved.get("init"):
                raise SeqssmError("cannot resume with a different --init; use --force to start over")
            # no checkpoint yet (cut during the first interval): start again from the run's own settings
            init_loaded = load_model(saved["init"], device="cpu") if ckpt is None and saved.get("init") else None
        else:
            fasta = [Path(p) for p in opts.fasta]
            valid_regions = list(opts.valid_regions)
            valid_files = [Path(p) for p in opts.valid_files]
            if not fasta:
                raise SeqssmError("no training FASTA given")
            init_loaded = load_model(opts.init, device="cpu") if opts.init else None
        arch, model_settings, cfg = _resolve(opts, saved, init_loaded)
        cfg.validate()
        dist.check_divisible(cfg.batch_size)
        if saved is not None and saved.get("status") == "finished" and ckpt is not None \
                and cfg.max_steps <= int(saved.get("step", 0)):
            return None, cfg
        split = load_split(fasta, seq_len=cfg.seq_len, valid_regions=valid_regions, valid_files=valid_files)
        if saved is not None and saved.get("split_signature") != json.loads(json.dumps(_split_signature(split))):
            raise SeqssmError("cannot resume: the held-out split differs from the run's (same files and "
                              "--valid-region/--valid-file are needed); use --force to start over")
        return (fasta, valid_regions, valid_files, init_loaded, arch, model_settings, split), cfg

    loaded_settings, cfg = dist.agree(settings)
    if loaded_settings is None:  # already finished
        ho = saved.get("heldout")
        msg = f"{out}: already finished at step {saved.get('step')}; give a larger --max-steps to train further"
        if not opts.quiet and main:
            console.print(msg, highlight=False, soft_wrap=True)
        markov = json.loads((out / MARKOV_FILE).read_text()) if (out / MARKOV_FILE).is_file() else None
        return PretrainSummary(
            output=out, finished=True, reason="already finished", step=int(saved.get("step", 0)),
            max_steps=cfg.max_steps, tokens_seen=int(read_checkpoint_state(ckpt).get("tokens_seen", 0)),
            seconds=time.monotonic() - t_start, device="-", parameters=int(saved.get("parameters", 0)),
            resumed_from=int(saved.get("step", 0)), heldout=ho, markov=markov, split_rule=saved.get("split_rule", ""),
            architecture=saved.get("architecture", ""), objective=saved.get("objective", "causal"),
            baseline=saved.get("no_context_baseline"),
        )
    fasta, valid_regions, valid_files, init_loaded, arch, model_settings, split = loaded_settings

    # The model (the same on every rank: the same seed, or the same --init weights).
    if init_loaded is not None:
        model = init_loaded.model
        model.train()
    else:
        model = build_model(arch, model_settings, cfg.seed)
    configure_backend(model, opts.backend, device, training=True)
    # Caduceus: the window length the model was trained on (no positional limit) and whether N is fed
    # as [PAD] (published checkpoints); both fixed when the run starts.
    if saved is not None and "max_length" in saved:
        max_length, n_as_pad = int(saved["max_length"]), bool(saved.get("n_as_pad", False))
    elif arch == "hyena":
        max_length, n_as_pad = int(model.config.max_seq_len), False
    elif init_loaded is not None:
        max_length, n_as_pad = max(int(init_loaded.max_length), cfg.seq_len), bool(init_loaded.n_as_pad)
    else:
        max_length, n_as_pad = cfg.seq_len, False
    tokenizer = DNATokenizer(model_max_length=max_length)
    n_params = count_parameters(model)
    objective = make_objective(arch, model, n_as_pad)
    architecture = architecture_of(model.config)

    command = opts.command or command_line(opts)
    run = dict(saved or {})
    run.update({
        "status": "running",
        "seqssm_version": __version__,
        "fasta": [str(p) for p in fasta],
        "fasta_fingerprint": _fingerprint(fasta),
        "valid_regions": valid_regions,
        "valid_files": [str(p) for p in valid_files],
        "valid_files_fingerprint": _fingerprint(valid_files),
        "init": run.get("init", opts.init),
        "kind": "pretrain",
        "arch": arch,
        "architecture": architecture,
        "objective": objective.name,
        "max_length": max_length,
        "n_as_pad": n_as_pad,
        "model_config": model.config.to_dict(),
        "train_config": cfg.to_dict(),
        "split_signature": _split_signature(split),
        "split_rule": split.description["rule"],
        "parameters": n_params,
        "created": run.get("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
        "commands": run.get("commands", []) + [command],
    })
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_json(out / RUN_FILE, run)

    display = _Display(console, quiet=opts.quiet or not main, baseline=None)
    display.log(f"data: {split.train_bases:,} training bases in {len(split.train)} stretch(es); "
                f"{split.valid_bases:,} held-out bases ({split.description['rule']})")

    # The Markov baseline on exactly this split (cached); rank 0's alone, for its log and files. It is a
    # next-base predictor: MLM runs get the no-context (base frequency) reference instead.
    markov, no_context = None, None
    if objective.name == "causal" and opts.markov_baseline and main:
        markov = _markov_baseline(out, split, cfg.seq_len, display)
        display.baseline = markov
    elif objective.name == "mlm" and main:
        from seqssm.training.data import validation_windows
        from seqssm.training.mlm import no_context_baseline

        no_context = no_context_baseline([st.ids for st in split.train], validation_windows(split.valid, cfg.seq_len))
        display.baseline = no_context
        run["no_context_baseline"] = no_context
        display.log(f"no-context reference (the token at the position alone, training base frequencies): masked accuracy "
                    f"{no_context['masked_accuracy']:.4f}, perplexity {no_context['perplexity']:.4f}")
    if markov:
        plot_baseline = lambda: markov["best"]["ppl"]  # noqa: E731
    elif no_context:
        plot_baseline = lambda: no_context["masked_accuracy"]  # noqa: E731
    else:
        plot_baseline = None

    trainer = Trainer(model, split, cfg, run_dir=out, device=device, tokenizer=tokenizer,
                      extra_state={"init": run.get("init")}, callbacks=display, plot_baseline=plot_baseline,
                      dist=dist, fsdp=opts.fsdp, objective=objective, save_kwargs={"n_as_pad": n_as_pad})
    if opts.compile:
        trainer.compile()
    resumed_from = None
    if ckpt is not None:
        st = trainer.resume(ckpt)
        resumed_from = trainer.step
        display.log(f"resumed from {ckpt} (step {st['step']}, {st.get('tokens_seen', 0):,} tokens seen)")
    elif saved is not None:
        if main:
            (out / METRICS).unlink(missing_ok=True)  # written by an invocation cut before its first checkpoint
        display.log("no checkpoint yet: starting from step 0")
    obj = ("masked LM" + (", RC augmentation" if getattr(objective, "rc_aug", False) else "")
           if objective.name == "mlm" else "next-base LM")
    display.log(f"model: {architecture}, {n_params:,} parameters, {obj}; device {_device_name(device, dist)}"
                f"{' (bf16 autocast)' if device.type == 'cuda' else ''}")
    if dist.enabled:
        display.log(f"data parallel: {dist.world_size} processes ({dist.backend}, "
                    f"{'FSDP2' if opts.fsdp else 'DDP'}), {cfg.batch_size // dist.world_size} of the "
                    f"{cfg.batch_size} windows of each micro-batch per process")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    stop = StopRule(max_minutes=opts.max_minutes, max_steps_this_run=opts.max_steps_this_run, started=t_start)
    with display:
        outcome = trainer.fit(stop)

    heldout = None
    if outcome.finished:
        ev = outcome.last_eval or trainer.evaluate(full=True)
        heldout = objective.heldout(ev, cfg.seq_len) if objective.name == "mlm" else {
            "perplexity": ev["val_ppl"],
            "loss": ev["val_loss"],
            "targets": ev["val_targets"],
            "shared_perplexity": ev["val_shared_ppl"],
            "shared_loss": ev["val_shared_loss"],
            "shared_targets": ev["val_targets_shared"],
            "windows": ev["val_windows"],
            "definition": (f"exp(mean NLL per predicted base) over non-overlapping {cfg.seq_len} bp windows of "
                           "the held-out data; 'perplexity': every A/C/G/T target (N targets ignored); "
                           f"'shared_perplexity': A/C/G/T targets whose {SHARED_CONTEXT} preceding bases in "
                           "the window are A/C/G/T, the Markov baseline's position set"),
        }
        final_model = trainer.replica.model_to_save()  # collective under FSDP
        if main:
            info = _training_info(run, split, cfg, trainer, heldout, markov, device, n_params, command, dist,
                                  opts.fsdp, objective=objective, no_context=no_context)
            _write_final_model(out, final_model, tokenizer, info, n_as_pad=n_as_pad)
            run.update(status="finished", step=outcome.step, heldout=heldout)
            _atomic_json(out / RUN_FILE, run)
        display.log(f"[green]finished[/]: model written to {out}")
    else:
        if main:
            run.update(status="running", step=outcome.step)
            _atomic_json(out / RUN_FILE, run)
        display.log(f"[yellow]stopped[/] at step {outcome.step}/{cfg.max_steps}: {outcome.reason}; "
                    f"checkpoint {outcome.checkpoint}; run again with --resume to continue")
    return PretrainSummary(
        output=out, finished=outcome.finished, reason=outcome.reason, step=outcome.step, max_steps=cfg.max_steps,
        tokens_seen=outcome.tokens_seen, seconds=time.monotonic() - t_start, device=_device_name(device, dist),
        parameters=n_params, resumed_from=resumed_from, heldout=heldout, markov=markov,
        split_rule=split.description["rule"], train_bases=split.train_bases, valid_bases=split.valid_bases,
        architecture=architecture, objective=objective.name, baseline=no_context,
    )


def _markov_baseline(out: Path, split: DataSplit, seq_len: int, display: _Display) -> dict:
    from seqssm.training.data import target_masks, validation_windows
    from seqssm.training.markov import markov_baseline

    path = out / MARKOV_FILE
    sig = _split_signature(split)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("split_signature") == json.loads(json.dumps(sig)):
            return cached
    display.log("fitting the Markov baseline (k = 0..10) on the training bases ...")
    windows = validation_windows(split.valid, seq_len)
    _, shared = target_masks(windows)
    res = markov_baseline([s.ids for s in split.train], windows, shared)
    res["split_signature"] = sig
    _atomic_json(path, res)
    per_k = ", ".join(f"{o['k']}: {o['ppl']:.4f}" for o in res["orders"])
    display.log(f"Markov baseline held-out perplexity by order ({res['positions']:,} positions, "
                f"{res['seconds']:.1f} s): {per_k}; best k={res['best']['k']} {res['best']['ppl']:.4f}")
    return res


def _task(arch: str, architecture: str) -> str:
    kind = architecture.split(" (")[0]
    if arch == "caduceus":
        return f"masked language model ({kind}), seqssm pretrain"
    return f"next-base causal language model ({'HyenaDNA' if arch == 'hyena' else 'Mamba'}), seqssm pretrain"


def _training_info(run, split, cfg, trainer, heldout, markov, device, n_params, command, dist: Dist | None = None,
                   fsdp: bool = False, objective=None, no_context: dict | None = None) -> dict:
    desc = split.description
    names = ", ".join(f["name"] for f in run["fasta_fingerprint"])
    info = {
        "task": _task(run.get("arch", "hyena"), run.get("architecture", "")),
        "architecture": run.get("architecture"),
        "training_data": {
            "files": names,
            "held_out": desc["rule"],
            "train_bases": desc["train_bases"],
            "valid_bases": desc["valid_bases"],
        },
        "heldout": heldout,
        "training": {
            "steps": trainer.step,
            "tokens_seen": trainer.tokens_seen,
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "lr": cfg.lr,
            "min_lr": cfg.min_lr,
            "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay,
            "seed": cfg.seed,
            "device": _device_name(device, dist),
            "precision": "bf16 autocast" if device.type == "cuda" else "float32",
            "train_seconds": round(trainer.train_seconds, 1),
            "parameters": n_params,
            "init": run.get("init"),
        },
        "train_config": cfg.to_dict(),
        "split": desc,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "commands": run.get("commands", []),
        "seqssm_version": __version__,
    }
    if dist is not None and dist.enabled:
        info["training"]["data_parallel"] = data_parallel_info(dist, fsdp=fsdp, batch_size=cfg.batch_size)
    if objective is not None and objective.name == "mlm":
        m = objective.masking
        info["training"]["objective"] = (
            f"masked LM: each A/C/G/T/N position selected with probability {m.mlm_probability:g}; selected -> "
            f"[MASK] {m.mask_fraction:.0%}, random base {m.random_fraction:.0%}, unchanged "
            f"{1 - m.mask_fraction - m.random_fraction:.0%}; loss = mean NLL over the selected positions"
            + ("; N fed as [PAD] (never selected)" if objective.n_as_pad else ""))
        info["training"]["rc_augmentation"] = bool(objective.rc_aug)
    if no_context is not None:
        info["no_context_baseline"] = no_context
    if markov is not None:
        info["markov_baseline"] = {
            "best_k": markov["best"]["k"],
            "best_perplexity": markov["best"]["ppl"],
            "perplexity_by_k": {str(o["k"]): round(o["ppl"], 5) for o in markov["orders"]},
            "laplace_perplexity_by_k": {str(o["k"]): round(o["ppl_laplace"], 5) for o in markov["orders"]},
            "positions": markov["positions"],
            "position_set": markov["position_set"],
            "smoothing": markov["smoothing"],
        }
        if heldout is not None:
            info["markov_baseline"]["neural_shared_perplexity"] = heldout["shared_perplexity"]
            info["markov_baseline"]["neural_beats_best_k"] = heldout["shared_perplexity"] < markov["best"]["ppl"]
    return info


def _write_final_model(out: Path, model, tokenizer, info: dict, n_as_pad: bool = False) -> None:
    """save_model into a fresh directory beside OUT's files, then move the four files into OUT
    (training.json last: its presence marks a complete model)."""
    from seqssm.models import save_model

    tmp = out / f".final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (out / "training.json").unlink(missing_ok=True)
    save_model(model, tmp, tokenizer=tokenizer, info=info, n_as_pad=n_as_pad)
    for name in MODEL_FILES:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.glob(".final-*"):
        shutil.rmtree(stale, ignore_errors=True)
