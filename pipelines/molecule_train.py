"""`seqssm pretrain-molecules` and `seqssm finetune-molecules`: train an S4 chemical LM on SMILES.

Read the SMILES file(s) -> drop (and count) the unparsable, over-long and, when fine-tuning, those
with tokens outside the model's vocabulary -> hold out a validation set (a file, or a seeded
random fraction) -> train with checkpoints, resume and early stopping -> write the best model
(by validation loss) into OUTPUT as a model directory (config.json, model.safetensors,
vocab.json, info.json), which `generate-molecules --model OUTPUT` reads.

Pre-training builds the vocabulary from the training and validation SMILES; fine-tuning keeps
the pretrained model's vocabulary and architecture.

Under torchrun the same command trains data-parallel (DDP): ``batch_size`` is the global batch,
rank 0 reads and checks the SMILES once and hands the sets to the other ranks, and only rank 0
writes into OUTPUT (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date
from pathlib import Path

import numpy as np

from seqssm.distributed import Dist, session
from seqssm.errors import SeqssmError
from seqssm.io.atomic import atomic_write_text
from seqssm.pipelines.output import check_run_budget, prepare_run_dir
from seqssm.pipelines.progress import JobDisplay
from seqssm.training.lm import Callbacks, StopRule, latest_in, resolve_device
from seqssm.training.molecules import MolTrainConfig

MODEL_FILES = ("config.json", "model.safetensors", "vocab.json", "info.json")
PRETRAIN_DEFAULTS = MolTrainConfig(epochs=10, batch_size=512, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                                   patience=0)
FINETUNE_DEFAULTS = MolTrainConfig(epochs=100, batch_size=32, lr=1e-4, min_lr=1e-4, ssm_lr=1e-4,
                                   schedule="constant", warmup_steps=0, patience=5)
# Settings a resumed run may change.
_MUTABLE = {"epochs", "eval_every", "save_every", "patience", "eval_batch_size", "log_every", "keep_checkpoints"}


@dataclass
class MoleculeTrainOptions:
    """Everything the two commands take; ``None`` = the default, the --model's value, or the resumed run's."""

    kind: str  # "pretrain-molecules" or "finetune-molecules"
    smiles: list = field(default_factory=list)
    output: Path | str = "molecules-out"
    model: str | None = None  # finetune: the pretrained chemical LM (bundled name or directory)
    valid_file: Path | None = None
    valid_fraction: float | None = None
    column: str | None = None
    max_len: int | None = None
    canonicalize: bool = False
    randomize: int | None = None  # random SMILES forms per training molecule, one per epoch (cycled)
    given_share: float | None = None  # with randomize: chance that a molecule keeps its given SMILES in a form
    d_model: int | None = None
    n_blocks: int | None = None
    d_state: int | None = None
    dropout: float | None = None
    kernel: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    ssm_lr: float | None = None
    schedule: str | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int | None = None
    save_every: int | None = None
    patience: int | None = None
    keep_checkpoints: int | None = None
    seed: int | None = None
    split_seed: int | None = None
    device: str = "auto"
    n_jobs: int = 1
    resume: bool = False
    force: bool = False
    max_minutes: float | None = None
    max_steps_this_run: int | None = None
    compile: bool = False
    quiet: bool = False
    command: str | None = None


@dataclass
class MoleculeTrainSummary:
    output: Path
    finished: bool
    reason: str
    step: int
    max_steps: int
    epoch: int
    resumed_from: int | None
    parameters: int
    device: str
    data: dict
    best: dict | None
    seconds: float
    tokens_per_s: float | None


def _sha256(paths) -> list[dict]:
    out = []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out.append({"path": str(Path(p).resolve()), "sha256": h.hexdigest()})
    return out


def _train_config(opts: MoleculeTrainOptions, saved: dict | None) -> MolTrainConfig:
    base = FINETUNE_DEFAULTS if opts.kind == "finetune-molecules" else PRETRAIN_DEFAULTS
    if saved is not None:
        base = MolTrainConfig(**saved["train_config"])
    values = asdict(base)
    for f in fields(MolTrainConfig):
        given = getattr(opts, f.name, None)
        if given is None:
            continue
        if saved is not None and f.name not in _MUTABLE and given != values[f.name]:
            raise SeqssmError(f"cannot resume with --{f.name.replace('_', '-')} {given}: the run uses "
                              f"{values[f.name]} (only {', '.join(sorted(_MUTABLE))} may change)")
        values[f.name] = given
    cfg = MolTrainConfig(**values)
    cfg.validate()
    return cfg


def _read_sets(opts: MoleculeTrainOptions, tokenizer, max_len: int, seed: int, display) -> tuple[list, list, dict]:
    """Training and validation SMILES after the checks, and what was dropped."""
    from seqssm.chem.data import prepare_training_set, read_smiles

    smiles: list[str] = []
    for p in opts.smiles:
        smiles.extend(read_smiles(p, column=opts.column))
    if not smiles:
        raise SeqssmError(f"{', '.join(map(str, opts.smiles))}: no SMILES found")
    display.log(f"read {len(smiles):,} SMILES from {', '.join(str(p) for p in opts.smiles)}")
    prepared = prepare_training_set(smiles, tokenizer, max_tokens=max_len - 2, canonicalize=opts.canonicalize,
                                    n_jobs=opts.n_jobs)
    _report_skipped(prepared, "training", display)
    data = {"input_smiles": prepared.n_input, "unparsable": prepared.n_unparsable, "too_long": prepared.n_too_long,
            "unknown_token": getattr(prepared, "n_unknown_token", 0), "duplicates": prepared.n_duplicates}
    kept = list(prepared.smiles)
    if opts.valid_file is not None:
        vsm = read_smiles(opts.valid_file, column=opts.column)
        vprep = prepare_training_set(vsm, tokenizer, max_tokens=max_len - 2, canonicalize=opts.canonicalize,
                                     n_jobs=opts.n_jobs)
        _report_skipped(vprep, "validation", display)
        train, valid = kept, list(vprep.smiles)
        data["validation"] = {"file": str(opts.valid_file), "input_smiles": vprep.n_input,
                              "unparsable": vprep.n_unparsable, "too_long": vprep.n_too_long}
    else:
        frac = opts.valid_fraction if opts.valid_fraction is not None else (
            0.1 if opts.kind == "finetune-molecules" else 0.05)
        if not 0 < frac < 1:
            raise SeqssmError(f"--valid-fraction must be in (0, 1), not {frac}")
        order = np.random.default_rng([seed, 7]).permutation(len(kept))
        n_valid = max(1, int(round(frac * len(kept))))
        if len(kept) - n_valid < 1:
            raise SeqssmError(f"only {len(kept)} usable SMILES: too few to hold out a validation set")
        vidx = set(order[:n_valid].tolist())
        valid = [s for i, s in enumerate(kept) if i in vidx]
        train = [s for i, s in enumerate(kept) if i not in vidx]
        data["validation"] = {"fraction": frac, "seed": seed}
    if not train or not valid:
        raise SeqssmError("no usable SMILES left for training or validation after the checks")
    data["train_molecules"] = len(train)
    data["valid_molecules"] = len(valid)
    return train, valid, data


def _random_forms(opts: MoleculeTrainOptions, train: list, valid: list, tokenizer, max_len: int, seed: int,
                  data: dict, display) -> tuple[list[list[str]], list[str], set]:
    """(opts.randomize random forms of every training molecule, one form of every validation
    molecule, their tokens). Validation uses a random form too (with --given-share, the same mixture
    as training), so its loss measures what training optimises. Forms are never longer than the longest given SMILES (batches stay as narrow) and,
    when fine-tuning, use only the model's tokens; a molecule without such a form keeps its SMILES."""
    from seqssm.chem.data import mix_given, randomized_smiles
    from seqssm.chem.tokenizer import split_smiles

    t0 = time.monotonic()
    longest = max(len(split_smiles(s)) for s in train + valid)
    allowed = frozenset(tokenizer.tokens[3:]) if tokenizer is not None else None
    kw = dict(max_tokens=min(longest, max_len - 2), allowed=allowed, n_jobs=opts.n_jobs)
    tr = randomized_smiles(train, opts.randomize, seed=seed, **kw)
    va = randomized_smiles(valid, 1, seed=seed + 1, **kw)
    share = opts.given_share or 0.0
    train_forms, valid_form = tr.forms, va.forms[0]
    if share:
        train_forms = mix_given(train, tr.forms, share, seed=seed)
        valid_form = mix_given(valid, va.forms, share, seed=seed + 1)[0]
    data["random_forms"] = {"per_molecule": opts.randomize, "given_kept": tr.n_given + va.n_given,
                            "kind": "RDKit restricted random SMILES", "seed": seed, "given_share": share}
    display.log(f"{opts.randomize} random SMILES of each of {len(train):,} training molecules "
                f"(one per epoch, cycled), 1 of each validation molecule, in {time.monotonic() - t0:.0f} s"
                + (f"; {tr.n_given + va.n_given:,} forms kept the given SMILES" if tr.n_given + va.n_given else "")
                + (f"; each form replaced by the given SMILES with probability {share:g}" if share else ""))
    return train_forms, valid_form, tr.tokens | va.tokens


FORMS_CACHE = "random-forms.pt"


def _save_forms(out: Path, key: dict, train: list, valid, info: dict) -> None:
    """Write the encoded random forms into the run directory (atomically), trimmed to their widest."""
    import torch

    width = max(int(f.lengths.max()) for f in train + [valid])
    blob = {"key": json.dumps(key, sort_keys=True), "info": json.dumps(info),
            "train_tokens": torch.stack([f.tokens[:, :width] for f in train]),
            "train_lengths": torch.stack([f.lengths for f in train]),
            "valid_tokens": valid.tokens[:, :width].clone(), "valid_lengths": valid.lengths}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FORMS_CACHE}.tmp-{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, out / FORMS_CACHE)


def _load_forms(out: Path, key: dict):
    """(train forms, validation set, their record) from FORMS_CACHE when it was written for `key`; else None."""
    import torch

    from seqssm.training.molecules import EncodedSet

    path = out / FORMS_CACHE
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache is only a cache: draw the forms again
        return None
    if blob.get("key") != json.dumps(key, sort_keys=True):
        return None
    max_len = key["max_len"]

    def widen(t):
        return torch.nn.functional.pad(t, (0, max_len - t.shape[-1]), value=0)  # <pad> is id 0

    train = [EncodedSet(widen(t), n) for t, n in zip(blob["train_tokens"], blob["train_lengths"])]
    return train, EncodedSet(widen(blob["valid_tokens"]), blob["valid_lengths"]), json.loads(blob["info"])


def _report_skipped(prepared, what: str, display) -> None:
    for attr, label in (("n_unparsable", "unparsable by RDKit"), ("n_too_long", "longer than the model's maximum"),
                        ("n_unknown_token", "with tokens outside the model's vocabulary")):
        n = getattr(prepared, attr, 0)
        if n:
            ex = (getattr(prepared, "examples", {}) or {}).get(attr.removeprefix("n_"), [])
            shown = f" (e.g. {', '.join(ex[:3])})" if ex else ""
            display.log(f"[yellow]skipped[/] {n:,} {what} SMILES {label}{shown}")


class _Display(JobDisplay, Callbacks):
    def __init__(self, console, *, quiet: bool, title: str):
        super().__init__(console, quiet=quiet)
        self.title = title
        self._t0 = time.monotonic()
        self._tok0 = 0

    def on_start(self, tr) -> None:
        self._t0 = time.monotonic()
        self._tok0 = tr.p.tokens_seen
        if not self.interactive:
            return
        self.start_bar(self.title, total=tr.max_steps, completed=tr.step,
                       fields="epoch {task.fields[epoch]}  loss {task.fields[loss]}  {task.fields[tps]} tok/s",
                       epoch="-", loss="-", tps="-")

    def _rate(self, tr) -> float:
        el = time.monotonic() - self._t0
        return (tr.p.tokens_seen - self._tok0) / el if el > 0 else 0.0

    def on_step(self, tr, rec: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=rec["step"], epoch=f"{rec['epoch']:.2f}",
                                 loss=f"{rec['loss']:.4f}", tps=f"{self._rate(tr):,.0f}")
        elif not self.quiet and (rec["step"] % max(tr.cfg.log_every, 1) == 0 or rec["step"] == 1):
            self.log(f"step {rec['step']}/{tr.max_steps}  epoch {rec['epoch']:.2f}  loss {rec['loss']:.4f}  "
                     f"lr {rec['lr']:.3g}  {self._rate(tr):,.0f} tok/s  {time.monotonic() - self._t0:.0f} s")

    def on_eval(self, tr, rec: dict) -> None:
        mark = " [green](best)[/]" if rec.get("improved") else f" (best {tr.p.best['val_loss']:.4f})"
        self.log(f"[cyan]eval[/] step {rec['step']} epoch {rec['epoch']:.2f}: validation loss {rec['val_loss']:.4f} "
                 f"nats/token, perplexity {rec['val_ppl']:.4f}{mark}")

    def on_checkpoint(self, tr, path: Path) -> None:
        if not self.interactive:
            self.log(f"checkpoint {path}")


def run_molecule_training(opts: MoleculeTrainOptions, console=None) -> MoleculeTrainSummary:
    """Pretrain (or fine-tune) an S4 chemical LM; see the module docstring."""
    with session(opts.device, resolve_device) as dist:
        return _run_molecule_training(opts, console, dist)


def _run_molecule_training(opts: MoleculeTrainOptions, console, dist: Dist) -> MoleculeTrainSummary:
    import torch
    from rich.console import Console

    from seqssm.chem.model_dir import load_chem_model
    from seqssm.chem.tokenizer import SmilesTokenizer
    from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM
    from seqssm.training.molecules import MoleculeTrainer, encode_set

    t_start = time.monotonic()
    console = console or Console(stderr=True)
    out = Path(opts.output).expanduser()
    check_run_budget(opts.max_minutes, opts.max_steps_this_run)
    if opts.valid_file is not None:  # they choose a random hold-out; a validation file leaves none to choose
        given = [f"--{n.replace('_', '-')}" for n in ("valid_fraction", "split_seed") if getattr(opts, n) is not None]
        if given:
            raise SeqssmError(f"{' and '.join(given)}: there is no random hold-out to choose when --valid-file gives "
                              "the validation SMILES")
    finetune = opts.kind == "finetune-molecules"
    main = dist.is_main
    saved = dist.on_main(lambda: prepare_run_dir(
        out, kind=opts.kind, resume=opts.resume, force=opts.force,
        finished_hint="; use a new output directory (or --force to overwrite it)"))
    if saved is not None:
        opts.smiles = opts.smiles or [Path(p) for p in saved["smiles"]]
        if opts.valid_file is None and saved.get("valid_file"):
            opts.valid_file = Path(saved["valid_file"])
        if finetune and opts.model is None:
            opts.model = saved.get("model")
        for key in ("valid_fraction", "max_len", "canonicalize", "column", "randomize", "given_share"):
            if saved.get(key) is not None and getattr(opts, key) in (None, False):
                setattr(opts, key, saved[key])
        if (opts.randomize or None) != (saved.get("randomize") or None):
            raise SeqssmError(f"cannot resume with --randomize {opts.randomize}: the run uses "
                              f"{saved.get('randomize') or 'no random forms'}")
        if (opts.given_share or None) != (saved.get("given_share") or None):
            raise SeqssmError(f"cannot resume with --given-share {opts.given_share}: the run uses "
                              f"{saved.get('given_share') or 0}")
    if not opts.smiles:
        raise SeqssmError("no SMILES file given")
    if opts.randomize is not None and opts.randomize < 0:
        raise SeqssmError(f"--randomize must be 0 (off) or a number of random forms, not {opts.randomize}")
    if opts.given_share:
        if not opts.randomize:
            raise SeqssmError("--given-share mixes the given SMILES into random forms: it needs --randomize K")
        if not 0 < opts.given_share < 1:
            raise SeqssmError(f"--given-share must be in [0, 1), not {opts.given_share} (1 would be the given "
                              "SMILES alone: leave out --randomize)")
    if finetune and not opts.model:
        raise SeqssmError("finetune-molecules needs --model (a pretrained chemical LM: bundled name or directory)")
    device = dist.device
    cfg = _train_config(opts, saved)
    dist.check_divisible(cfg.batch_size)

    with _Display(console, quiet=opts.quiet or not main, title=opts.kind.split("-")[0]) as display:
        init = None
        if finetune:
            init = load_chem_model(opts.model)
            tokenizer = init.tokenizer
            model_cfg = init.model.cfg
            if opts.max_len and opts.max_len != model_cfg.max_len:
                raise SeqssmError(f"--max-len {opts.max_len}: fine-tuning keeps the model's maximum ({model_cfg.max_len})")
            max_len = model_cfg.max_len
            arch_opts = [n for n in ("d_model", "n_blocks", "d_state", "kernel") if getattr(opts, n) is not None]
            if arch_opts:
                raise SeqssmError(f"--{arch_opts[0].replace('_', '-')}: fine-tuning keeps the pretrained architecture")
        else:
            tokenizer = None
            max_len = opts.max_len or 100
            if max_len < 3:
                raise SeqssmError("--max-len must be at least 3 tokens (bos, one token, eos)")

        def read():
            fingerprint = _sha256(opts.smiles + ([opts.valid_file] if opts.valid_file else []))
            if saved is not None and fingerprint != saved["fingerprint"]:
                raise SeqssmError(f"cannot resume: the SMILES files differ from the run's "
                                  f"({saved['fingerprint'][0]['path']} ...)")
            split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
            return fingerprint, *_read_sets(opts, tokenizer, max_len, split_seed, display)

        # Rank 0 reads and checks the SMILES (RDKit is the slow part) and hands the sets to the others.
        fingerprint, train_smiles, valid_smiles, data = dist.on_main(read)

        # Random forms: rank 0 draws them (RDKit again; minutes for millions of molecules, so a resumed
        # run reads them back from FORMS_CACHE); pretraining adds their tokens to the vocabulary.
        forms = cached = None
        if opts.randomize:
            cache_key = {"fingerprint": fingerprint, "randomize": opts.randomize, "seed": cfg.seed, "max_len": max_len,
                         "train_molecules": len(train_smiles), "valid_molecules": len(valid_smiles)}
            if opts.given_share:  # only then: caches of runs without a share stay valid
                cache_key["given_share"] = opts.given_share
            if cfg.split_seed is not None:  # likewise
                cache_key["split_seed"] = cfg.split_seed
            if saved is not None:
                cached = dist.on_main(lambda: _load_forms(out, {**cache_key, "vocabulary": saved["vocabulary"]}))
            if cached is not None:
                data["random_forms"] = cached[2]
                display.log(f"read the {opts.randomize} random forms of each molecule back from {out / FORMS_CACHE}")
            else:
                forms = dist.on_main(lambda: _random_forms(opts, train_smiles, valid_smiles, tokenizer, max_len,
                                                           cfg.seed, data, display))
        if finetune:
            if opts.dropout is not None:
                model_cfg = replace(model_cfg, dropout=opts.dropout)
            model = S4ChemLM(model_cfg)
            model.load_state_dict(init.model.state_dict())
        elif saved is not None:
            tokenizer = SmilesTokenizer(saved["vocabulary"])
            model = S4ChemLM(S4ChemConfig(**saved["model_config"]))
        else:
            tokenizer = SmilesTokenizer.build(train_smiles + valid_smiles)
            if forms is not None:
                tokenizer = SmilesTokenizer(list(SmilesTokenizer.SPECIALS) + sorted(set(tokenizer.tokens[3:]) | forms[2]))
            mc = S4ChemConfig(vocab_size=len(tokenizer), max_len=max_len,
                              pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
            for name in ("d_model", "n_blocks", "d_state", "dropout", "kernel"):
                if getattr(opts, name) is not None:
                    setattr(mc, name, getattr(opts, name))
            torch.manual_seed(cfg.seed)
            model = S4ChemLM(mc)

        if cached is not None:
            train, valid = cached[0], cached[1]
        elif forms is not None:
            train = [encode_set(tokenizer, f, max_len, n_jobs=opts.n_jobs) for f in forms[0]]
            valid = encode_set(tokenizer, forms[1], max_len, n_jobs=opts.n_jobs)
            key = {**cache_key, "vocabulary": tokenizer.tokens}
            dist.on_main(lambda: _save_forms(out, key, train, valid, data["random_forms"]))
        else:
            train = encode_set(tokenizer, train_smiles, max_len, n_jobs=opts.n_jobs)
            valid = encode_set(tokenizer, valid_smiles, max_len, n_jobs=opts.n_jobs)
        # per epoch; with random forms the first form's (the others are within ~1%)
        data["train_tokens"] = (train[0] if isinstance(train, list) else train).n_targets
        data["valid_tokens"] = valid.n_targets
        n_params = sum(p.numel() for p in model.parameters())
        run = {
            "kind": opts.kind, "status": "running", "smiles": [str(Path(p).resolve()) for p in opts.smiles],
            "valid_file": str(Path(opts.valid_file).resolve()) if opts.valid_file else None,
            "valid_fraction": opts.valid_fraction, "max_len": max_len, "canonicalize": opts.canonicalize,
            "randomize": opts.randomize or None, "given_share": opts.given_share or None,
            "column": opts.column, "model": opts.model, "fingerprint": fingerprint,
            "vocabulary": tokenizer.tokens, "model_config": asdict(model.cfg), "train_config": asdict(cfg),
            "data": data, "parameters": n_params,
        }
        run["compile"] = bool(opts.compile and device.type == "cuda")
        if saved is not None:
            if bool(saved.get("compile", False)) != run["compile"]:
                raise SeqssmError("cannot resume: --compile changes the batch layout; resume with the run's setting "
                                  f"({'with' if saved.get('compile') else 'without'} --compile, on the same kind of device)")
            for key in ("train_molecules", "valid_molecules"):
                if saved["data"].get(key) != data.get(key):
                    raise SeqssmError(f"cannot resume: the data gives {data.get(key)} {key.replace('_', ' ')}, "
                                      f"the run had {saved['data'].get(key)}")
            run["started"] = saved.get("started")
        else:
            run["started"] = date.today().isoformat()
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "run.json", json.dumps(run, indent=2) + "\n")

        base_info = {"training_data": {"smiles": run["smiles"], "kind": opts.kind, **data},
                     "pretrained_from": opts.model if finetune else None}

        def save_model(m, directory, info):
            m.save_pretrained(directory, tokenizer=tokenizer, info={**base_info, **info})

        trainer = MoleculeTrainer(model, train, valid, cfg, run_dir=out, device=device, save_model=save_model,
                                  callbacks=display, compile=opts.compile and device.type == "cuda", dist=dist)
        resumed_from = None
        ckpt = dist.on_main(lambda: latest_in(out / "checkpoints") if saved is not None else None)
        if ckpt is not None:
            trainer.resume(ckpt)
            resumed_from = trainer.step
            display.log(f"resumed from {ckpt} (step {trainer.step:,}, epoch {trainer.epoch})")
        else:
            n_train = len(train[0]) if isinstance(train, list) else len(train)
            display.log(f"{opts.kind}: {n_train:,} training / {len(valid):,} validation molecules, "
                        f"{n_params:,} parameters, vocabulary {len(tokenizer)}, on "
                        f"{f'{dist.world_size} x ' if dist.enabled else ''}{device}")
        outcome = trainer.fit(StopRule(max_minutes=opts.max_minutes, max_steps_this_run=opts.max_steps_this_run))

    seconds = time.monotonic() - t_start
    rate = None
    if outcome.step and trainer.p.train_seconds > 0:
        rate = trainer.p.tokens_seen / trainer.p.train_seconds
    if outcome.finished and main:
        best_dir = out / "best"
        info = json.loads((best_dir / "info.json").read_text()) if (best_dir / "info.json").is_file() else {}
        info.update({
            "training": {"steps": outcome.step, "epochs_run": round(outcome.step / trainer.steps_per_epoch, 3),
                         "stopped": outcome.reason, "tokens_seen": trainer.p.tokens_seen,
                         "train_seconds": round(trainer.p.train_seconds, 1), "device": _device_name(device, dist),
                         "precision": "bf16 autocast" if device.type == "cuda" else "float32",
                         "train_config": asdict(cfg), "command": opts.command or " ".join(sys.argv)},
            "validation": outcome.best, "parameters": n_params, "date": date.today().isoformat(),
        })
        if dist.enabled:
            info["training"]["data_parallel"] = {"world_size": dist.world_size, "backend": dist.backend,
                                                 "mode": "DDP", "global_batch_size": cfg.batch_size}
        _publish_best(out, info)
        run["status"] = "finished"
        run["best"] = outcome.best
        atomic_write_text(out / "run.json", json.dumps(run, indent=2) + "\n")
    return MoleculeTrainSummary(out, outcome.finished, outcome.reason, outcome.step, trainer.max_steps, outcome.epoch,
                                resumed_from, n_params, _device_name(device, dist), data, outcome.best, seconds, rate)


def _device_name(device, dist: Dist | None = None) -> str:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{dist.world_size} x {name}" if dist is not None and dist.enabled else name


def _publish_best(out: Path, info: dict) -> None:
    """Copy best/ into OUTPUT's top level (info.json last: its presence marks a complete model)."""
    best = out / "best"
    if not (best / "model.safetensors").is_file():
        raise SeqssmError(f"{best}: the best model is missing; the run directory is damaged")
    (out / "info.json").unlink(missing_ok=True)
    for name in ("config.json", "model.safetensors", "vocab.json"):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(best / name, tmp)
        os.replace(tmp, out / name)
    atomic_write_text(out / "info.json", json.dumps(info, indent=2, default=str) + "\n")
