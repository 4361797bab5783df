"""The flatten-pooled head (a weight per position, for aligned inputs of one length) and LP-FT
(--probe-epochs: the head alone first, then everything), on the lambda GC-content task of
test_finetune (CPU, tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.errors import SeqssmError
from seqssm.models import HeadConfig, batch_examples, load_finetuned, load_model, save_finetuned
from seqssm.tokenizers.dna import DNATokenizer
from seqssm.training.finetune import FinetuneConfig
from test_finetune import RESUME_KW, files, lambda_windows, run, tiny_classifier  # noqa: F401  (files: a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the head


def test_flatten_is_a_weight_per_position(lambda_genome):
    L = 50
    model = tiny_classifier("multiclass", 3, "flatten", length=L)
    assert model.head.proj.in_features == 32 * L
    ids, lengths = batch_examples(lambda_windows(lambda_genome, [L, L, L]))
    with torch.no_grad():
        h = model.features(ids, lengths).float()  # [B, L, d]
        W = model.head.proj.weight.view(3, L, 32)
        expected = torch.einsum("bld,cld->bc", h, W) / L + model.head.proj.bias
        torch.testing.assert_close(model(ids, lengths), expected, rtol=1e-5, atol=1e-6)

        # the same weight at every position is mean pooling with that weight
        mean = tiny_classifier("multiclass", 3, "mean")
        mean.load_state_dict(model.state_dict() | {"head.proj.weight": mean.head.proj.weight}, strict=True)
        model.head.proj.weight.copy_(mean.head.proj.weight.repeat(1, L))
        torch.testing.assert_close(model(ids, lengths), mean(ids, lengths), rtol=1e-5, atol=1e-6)

    short, lengths = batch_examples(lambda_windows(lambda_genome, [L, L - 1]))
    with pytest.raises(ValueError, match=f"exactly {L} bp, got one of {L - 1}"):
        model(short, lengths)


def test_flatten_head_config_and_round_trip(tmp_path, lambda_genome):
    with pytest.raises(ValueError, match="needs the input length"):
        HeadConfig("binary", 1, "flatten")
    with pytest.raises(ValueError, match="flatten pooling only"):
        HeadConfig("binary", 1, "mean", length=81)
    model = tiny_classifier("binary", 1, "flatten", length=40)
    path = save_finetuned(model, tmp_path / "ft", tokenizer=DNATokenizer(model_max_length=256), preprocessing={})
    loaded, _tok, head, *_ = load_finetuned(path)
    assert head == model.head_config and head.length == 40
    ids, lengths = batch_examples(lambda_windows(lambda_genome, [40, 40]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(ids, lengths, rc_average=True),
                                   model.predict_proba(ids, lengths, rc_average=True), rtol=0, atol=0)
    assert load_model(path).info["finetuned_head"]["pooling"] == "flatten"  # seqssm embed still reads it


# ----------------------------------------------------------------------------- fine-tuning and predict


def test_flatten_run_then_predict(files, tmp_path):  # noqa: F811
    out = tmp_path / "flat"
    s = run(files, out, epochs=2, pooling="flatten", sequences=files["table"])
    assert s.finished
    model, _tok, head, *_ = load_finetuned(out)
    assert head.pooling == "flatten" and head.length == 64
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["auroc"] > 0.8  # GC content is position-free, but every position's weights can count it

    pred = tmp_path / "pred.tsv"
    res = CliRunner().invoke(app, ["predict", "--model", str(out), "--sequences", str(files["table"]),
                                   "-o", str(pred), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    assert '"' not in pred.read_text().splitlines()[0]  # a plain header, also for table input (empty chrom)
    got = pd.read_csv(pred, sep="\t")["prob_GC"].to_numpy()
    seqs = [line.split(",")[1] for line in files["table"].read_text().splitlines()[1:]]
    from seqssm.tokenizers.dna import encode

    ids, lengths = batch_examples([encode(x) for x in seqs])
    with torch.inference_mode():
        direct = model.predict_proba(ids, lengths).numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)

    # another length is a one-line error naming the line
    lines = files["table"].read_text().splitlines()
    odd = tmp_path / "odd.csv"
    w = lines[3].split(",")
    odd.write_text("\n".join([lines[0], lines[1], lines[2], f"{w[0]},{w[1][:60]},{w[2]}"]) + "\n")
    res = CliRunner().invoke(app, ["predict", "--model", str(out), "--sequences", str(odd), "-o",
                                   str(tmp_path / "p2.tsv"), "--device", "cpu", "--quiet"])
    assert res.exit_code != 0 and "line 4" in res.output and "exactly 64 bp" in res.output
    assert not (tmp_path / "p2.tsv").exists()


def test_flatten_needs_one_length(files, tmp_path):  # noqa: F811
    lines = files["table"].read_text().splitlines()
    mixed = tmp_path / "mixed.csv"
    w = lines[5].split(",")
    mixed.write_text("\n".join(lines[:5] + [f"{w[0]},{w[1][:50]},{w[2]}"] + lines[6:]) + "\n")
    with pytest.raises(SeqssmError, match=r"line 6: w4 is 50 bp, but .*--pooling flatten needs inputs of one length"):
        run(files, tmp_path / "x", epochs=1, pooling="flatten", sequences=mixed)
    assert run(files, tmp_path / "y", epochs=1, sequences=mixed).finished  # mean pooling takes them


# ----------------------------------------------------------------------------- LP-FT


def test_probe_epochs_train_the_head_first(files, tmp_path):  # noqa: F811
    initial = load_model(files["backbone"]).model.backbone.state_dict()
    out = tmp_path / "lpft"
    kw = dict(sequences=files["table"], epochs=3, probe_epochs=1, patience=1, early_stop_metric="loss",
              split_fractions=(0.3, 0.1, 0.6))
    part = run(files, out, max_steps_this_run=8, **kw)  # one epoch: 227 training windows, 8 steps
    assert part.step == 8 and not part.finished
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    probed = load_finetuned(ckpt)[0]
    assert all(torch.equal(initial[k], v) for k, v in probed.backbone.state_dict().items())
    assert probed.head.proj.weight.abs().sum() > 0
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    n_head = sum(1 for _ in probed.head.parameters())
    assert len(opt["optimizer"]["state"]) == n_head  # AdamW keeps no state for the backbone yet

    done = run(files, out, resume=True, **kw)
    assert done.finished and done.epoch == 3  # no early stop during the probe epoch; after it, patience 1 applies
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert hist[0]["lr"] == 0.0 and hist[0]["head_lr"] > 0 and hist[1]["lr"] > 0
    tuned = load_finetuned(ckpt.parent / sorted(p.name for p in (out / "checkpoints").glob("step-*"))[-1])[0]
    assert any(not torch.equal(initial[k], v) for k, v in tuned.backbone.state_dict().items())


def test_probe_epochs_do_not_count_towards_patience(files, tmp_path, monkeypatch):  # noqa: F811
    from seqssm.training.finetune import FinetuneTrainer

    losses = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7])  # best at epoch 1, worse ever after
    monkeypatch.setattr(FinetuneTrainer, "evaluate_valid", lambda self: {"loss": next(losses)})
    s = run(files, tmp_path / "es", sequences=files["table"], epochs=8, probe_epochs=3, patience=2,
            early_stop_metric="loss")
    # probe epochs 2 and 3 are not counted: fine-tuning gets its 2 epochs (4 and 5) before the stop
    assert s.finished and "early stopping" in s.reason and s.epoch == 5 and s.best_epoch == 1


def test_probe_epochs_resume_equals_uninterrupted(files, tmp_path):  # noqa: F811
    kw = dict(RESUME_KW, probe_epochs=1, sequences=files["table"])
    full = run(files, tmp_path / "full", **kw)
    run(files, tmp_path / "cut", max_steps_this_run=5, **kw)  # inside the probe epoch
    rest = run(files, tmp_path / "cut", resume=True, **kw)
    assert full.finished and rest.finished and rest.resumed_from == 5
    a, b = load_finetuned(tmp_path / "full")[0], load_finetuned(tmp_path / "cut")[0]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=k)


def test_probe_epochs_checks():
    FinetuneConfig(epochs=3, probe_epochs=2).validate()
    with pytest.raises(SeqssmError, match="--probe-epochs"):
        FinetuneConfig(epochs=3, probe_epochs=3).validate()
    with pytest.raises(SeqssmError, match="exclude each other"):
        FinetuneConfig(epochs=3, probe_epochs=1, freeze_backbone=True).validate()
