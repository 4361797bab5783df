"""Pretraining library: held-out split, windows, schedule, the training loop, checkpoints and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from seqssm.errors import SeqssmError
from seqssm.models import HyenaConfig, HyenaDNAForCausalLM, load_model
from seqssm.tokenizers.dna import PAD, DNATokenizer, encode
from seqssm.training.data import (
    Record,
    Region,
    WindowSampler,
    is_acgt,
    load_split,
    make_split,
    parse_region,
    target_masks,
    validation_windows,
)
from seqssm.training.lm import (
    CURVES,
    METRICS,
    StopRule,
    TrainConfig,
    Trainer,
    latest_checkpoint,
    lr_at,
    param_groups,
)

LAMBDA = Path(__file__).resolve().parents[1] / "resources" / "data" / "lambda_virus.fa.gz"
SEQ = 256


@pytest.fixture(scope="module")
def lambda_split():
    return load_split([LAMBDA], seq_len=SEQ)


def tiny_model(seed: int = 0) -> HyenaDNAForCausalLM:
    torch.manual_seed(seed)
    return HyenaDNAForCausalLM(HyenaConfig(d_model=32, n_layer=2, max_seq_len=SEQ))


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(seq_len=SEQ, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=4, max_steps=30,
                eval_every=1000, save_every=1000, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(split, cfg, run_dir, model=None, plot=False) -> Trainer:
    return Trainer(model or tiny_model(), split, cfg, run_dir=run_dir, device=torch.device("cpu"),
                   tokenizer=DNATokenizer(model_max_length=SEQ), plot=plot)


# ----------------------------------------------------------------------------- regions and split


def test_parse_region():
    assert parse_region("chr20:58000000-63025520") == Region("chr20", 57999999, 63025520)
    assert parse_region("chr1:1,000-2,000") == Region("chr1", 999, 2000)
    assert parse_region("chrM") == Region("chrM")
    assert parse_region("chr2:101-") == Region("chr2", 100, None)
    assert str(parse_region("chr20:11-20")) == "chr20:11-20"
    for bad in ("chr1:0-10", "chr1:20-10", "chr1:abc-10", ""):
        with pytest.raises(SeqssmError):
            parse_region(bad)


def rec(name: str, seq: str, file: str = "x.fa") -> Record:
    return Record(file, name, encode(seq))


def test_split_cuts_training_around_the_held_out_region():
    rng = np.random.default_rng(0)
    s1 = "".join(rng.choice(list("ACGT"), size=400))
    s2 = "".join(rng.choice(list("ACGT"), size=100))
    sp = make_split([rec("a", s1), rec("b", s2)], seq_len=20, valid_regions=["a:101-200"])
    assert [(s.name, s.start, s.end) for s in sp.train] == [("a", 0, 100), ("a", 200, 400), ("b", 0, 100)]
    assert [(s.name, s.start, s.end) for s in sp.valid] == [("a", 100, 200)]
    assert sp.train_bases + sp.valid_bases == 500
    # training never sees a held-out base
    held = set(range(100, 200))
    for s in sp.train:
        if s.name == "a":
            assert held.isdisjoint(range(s.start, s.end))
    json.dumps(sp.description)  # JSON-able


def test_default_split_is_last_5_percent_of_largest_record(lambda_split):
    n = 48502
    hold = round(n * 0.05)
    assert lambda_split.valid_bases == hold
    assert lambda_split.valid[0].end == n and lambda_split.train[0].end == n - hold
    assert "last 5%" in lambda_split.description["rule"]


def test_split_errors():
    recs = [rec("a", "ACGT" * 50)]
    with pytest.raises(SeqssmError, match="no record named 'zz'"):
        make_split(recs, seq_len=16, valid_regions=["zz:1-10"])
    with pytest.raises(SeqssmError, match="outside record 'a'"):
        make_split(recs, seq_len=16, valid_regions=["a:150-300"])
    with pytest.raises(SeqssmError, match="longer than every training stretch"):
        make_split(recs, seq_len=500, valid_regions=["a:1-10"])
    with pytest.raises(SeqssmError, match="no training data left"):
        make_split(recs, seq_len=16, valid_regions=["a"])


def test_validation_windows_pad_tail_and_skip_mostly_n():
    L = 16
    ids = encode("ACGT" * 4 + "N" * 16 + "ACGTA")  # full window, an all-N window, a 5 bp tail
    from seqssm.training.data import Stretch

    w = validation_windows([Stretch("f", "r", 0, ids)], L)
    assert w.shape == (2, L)
    assert np.array_equal(w[0], ids[:L])
    assert np.array_equal(w[1, :5], encode("ACGTA")) and (w[1, 5:] == PAD).all()


def test_target_masks_by_hand():
    w = encode("ACGTACGTACGTNACGTACGTACGTACGT")[None]  # N at position 12
    acgt, shared = target_masks(w, context=4)
    assert acgt.shape == (1, w.shape[1] - 1)
    t = np.arange(1, w.shape[1])
    assert np.array_equal(acgt[0], t != 12)
    # shared: t >= 4 and positions t-4..t all ACGT -> not t in 12..16
    expect = (t >= 4) & ~((t >= 12) & (t <= 16))
    assert np.array_equal(shared[0], expect)


def test_sampler_is_reproducible_and_avoids_mostly_n():
    seq = "ACGT" * 100 + "N" * 400 + "GATC" * 100
    from seqssm.training.data import Stretch

    s = WindowSampler([Stretch("f", "r", 0, encode(seq))], 64, seed=3)
    a = s.batch(5, 0, 16)
    assert np.array_equal(a, s.batch(5, 0, 16))
    assert not np.array_equal(a, s.batch(6, 0, 16))
    assert not np.array_equal(a, s.batch(5, 1, 16))
    assert all((~is_acgt(row)).sum() <= 32 for row in np.concatenate([s.batch(i, 0, 16) for i in range(20)]))


# ----------------------------------------------------------------------------- schedule and optimizer


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_on_matrices_only():
    m = tiny_model()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and min(p.shape) > 1 for p in decay["params"])
    assert all(p.ndim < 2 or min(p.shape) == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- training


def test_loss_decreases_on_lambda(lambda_split, tmp_path):
    tr = make_trainer(lambda_split, tiny_cfg(max_steps=20, eval_every=10, lr=5e-3), tmp_path, plot=True)
    out = tr.fit()
    assert out.finished and out.step == 20
    recs = [r for r in tr.metrics.read() if r["kind"] == "train"]
    losses = [r["loss"] for r in recs]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert recs[0]["loss"] == pytest.approx(math.log(16), abs=0.2)  # 16 = padded vocabulary
    evals = [r for r in tr.metrics.read() if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20]
    assert evals[-1]["val_ppl"] < evals[0]["val_ppl"] < 16
    assert (tmp_path / CURVES).stat().st_size > 1000
    for r in recs:
        assert set(r) >= {"step", "lr", "loss", "ppl", "tokens_per_s"}


def test_n_targets_are_ignored(tmp_path):
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACGT"), size=3000))
    seq = seq[:2800] + "NNNNN" + seq[2805:]
    sp = make_split([rec("r", seq)], seq_len=SEQ, valid_regions=["r:2601-3000"])
    tr = make_trainer(sp, tiny_cfg(max_steps=1), tmp_path)
    ev = tr.evaluate()
    w = tr.val_windows
    assert ev["val_targets"] == int(is_acgt(w[:, 1:]).sum())
    assert ev["val_targets"] < int((w[:, 1:] != PAD).sum())  # the five N targets are not scored
    assert ev["val_targets_shared"] < ev["val_targets"]
    assert math.isfinite(ev["val_loss"]) and math.isfinite(ev["val_shared_loss"])


def run_in_pieces(split, run_dir: Path, pieces: list[int | None], cfg: TrainConfig) -> Trainer:
    tr = None
    for n in pieces:
        tr = make_trainer(split, cfg, run_dir, model=tiny_model(seed=0))
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            tr.resume(ckpt)
        tr.fit(StopRule(max_steps_this_run=n))
    return tr


def test_resume_reproduces_an_uninterrupted_run(lambda_split, tmp_path):
    # embed dropout (0.1 by default) makes the torch RNG part of the state, as in real training
    cfg = tiny_cfg(max_steps=6, save_every=4, eval_every=3, grad_accum=2, batch_size=2)
    one = run_in_pieces(lambda_split, tmp_path / "one", [None], cfg)
    cut = run_in_pieces(lambda_split, tmp_path / "cut", [4, 1, None], cfg)
    assert cut.step == one.step == 6
    sa, sb = one.model.state_dict(), cut.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = [r["loss"] for r in one.metrics.read() if r["kind"] == "train"]
    lb = [r["loss"] for r in cut.metrics.read() if r["kind"] == "train"]
    assert la == lb and len(la) == 6
    assert one.last_eval["val_loss"] == cut.last_eval["val_loss"]


def test_cut_after_last_checkpoint_loses_only_that_interval(lambda_split, tmp_path):
    cfg = tiny_cfg(max_steps=6, save_every=3, batch_size=2)
    tr = make_trainer(lambda_split, cfg, tmp_path)
    # simulate a job killed at step 5: checkpoint at 3, metrics written up to 5, no final save
    for _ in range(5):
        tr.metrics.append(tr.train_step())
        if tr.step % 3 == 0:
            tr.save()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-00000003"
    tr2 = make_trainer(lambda_split, cfg, tmp_path)
    tr2.resume(ckpt)
    assert tr2.step == 3
    assert max(r["step"] for r in tr2.metrics.read()) == 3  # steps 4-5 dropped from the log
    tr2.fit()
    steps = [r["step"] for r in tr2.metrics.read() if r["kind"] == "train"]
    assert steps == list(range(1, 7))


def test_checkpoint_files_are_plain(lambda_split, tmp_path):
    tr = make_trainer(lambda_split, tiny_cfg(max_steps=2, save_every=1, keep_checkpoints=1), tmp_path)
    tr.fit()
    ckpts = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000002"]  # older ones pruned
    ck = ckpts[0]
    blob = torch.load(ck / "optimizer.pt", weights_only=True)
    assert set(blob) == {"optimizer", "rng"}
    assert isinstance(blob["rng"]["torch"], torch.Tensor)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["tokens_seen"] == 2 * 8 * SEQ
    assert state["split"]["valid"][0]["bases"] == 2425
    loaded = load_model(ck)  # a checkpoint is a loadable model directory
    for k, v in tr.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_time_budget_stops_cleanly(lambda_split, tmp_path):
    tr = make_trainer(lambda_split, tiny_cfg(max_steps=1000), tmp_path)
    out = tr.fit(StopRule(max_minutes=1e-6))
    assert not out.finished and out.step == 1 and "max-minutes" in out.reason
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert (tmp_path / METRICS).exists()


def test_mostly_n_training_data_is_an_error():
    seq = "N" * 900 + "ACGT" * 5 + "N" * 30 + "ACGT" * 25  # no 64 bp training window is half ACGT
    with pytest.raises(SeqssmError, match="mostly N"):
        sp = make_split([rec("r", seq)], seq_len=64, valid_regions=["r:951-1050"])
        WindowSampler(sp.train, 64, 0).batch(0, 0, 4)
