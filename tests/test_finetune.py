"""Fine-tuning: heads, the fine-tuned model directory, losses, the trainer and run_finetune (CPU, tiny model).

The tasks are built from the phage lambda genome: 64 bp windows of three "chromosomes" (thirds of
the genome), labelled by their GC content, a real property that a small model learns quickly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seqssm.errors import SeqssmError
from seqssm.models import (
    HeadConfig,
    HyenaConfig,
    HyenaDNAForCausalLM,
    SequenceClassifier,
    batch_examples,
    load_finetuned,
    load_model,
    reverse_complement_padded,
    save_finetuned,
    save_model,
)
from seqssm.tokenizers.dna import PAD, DNATokenizer, encode, reverse_complement
from seqssm.training.finetune import TaskLoss

WINDOW = 64
CHROMS = ("chrA", "chrB", "chrC")
# Training settings of the tests: a tiny backbone learns the GC label within a few epochs.
FAST = dict(batch_size=32, lr=3e-3, head_lr=1e-2, warmup_fraction=0.05, device="cpu", quiet=True, dropout=0.0)


# ----------------------------------------------------------------------------- data builders


def tiny_backbone(path: Path, *, max_seq_len: int = 256, seed: int = 0) -> Path:
    """A randomly initialised HyenaDNA (d_model 32, 2 layers) saved as a seqssm model directory."""
    torch.manual_seed(seed)
    model = HyenaDNAForCausalLM(HyenaConfig(d_model=32, n_layer=2, max_seq_len=max_seq_len))
    return save_model(model, path, tokenizer=DNATokenizer(model_max_length=max_seq_len))


def gc(seq: str) -> float:
    return (seq.count("G") + seq.count("C")) / len(seq)


def build_task_files(root: Path, genome_seq: str) -> dict:
    """A 3-record genome FASTA and labeled inputs of every kind, from the lambda genome.

    regions.bed (binary "AT"/"GC" by the median GC content, column 4; multiclass tertiles "low"/
    "mid"/"high", column 5; a 0/1 multilabel pair and the GC fraction for regression in named
    columns of multi.bed), a CSV table and a labeled FASTA of the same windows.
    """
    root.mkdir(parents=True, exist_ok=True)
    third = len(genome_seq) // 3
    records = {c: genome_seq[i * third:(i + 1) * third] for i, c in enumerate(CHROMS)}
    genome = root / "genome.fa"
    genome.write_text("".join(f">{c}\n" + "\n".join(s[i:i + 70] for i in range(0, len(s), 70)) + "\n"
                              for c, s in records.items()))
    wins = []
    for c, s in records.items():
        for k, start in enumerate(range(0, len(s) - WINDOW + 1, WINDOW)):
            wins.append((c, start, s[start:start + WINDOW], "-" if k % 5 == 0 else "+"))
    g = np.array([gc(w[2]) for w in wins])
    med = float(np.median(g))
    lo, hi = np.quantile(g, [1 / 3, 2 / 3])
    a_frac = np.array([w[2].count("A") / WINDOW for w in wins])
    a_med = float(np.median(a_frac))
    bed = root / "regions.bed"
    multi = root / "multi.bed"
    with open(bed, "w") as f, open(multi, "w") as m:
        m.write("#chrom\tstart\tend\tgc_high\ta_rich\tgc\n")
        for (c, start, seq, strand), gv, av in zip(wins, g, a_frac):
            label = "GC" if gv > med else "AT"
            cls = "low" if gv <= lo else ("mid" if gv <= hi else "high")
            f.write(f"{c}\t{start}\t{start + WINDOW}\t{label}\t{cls}\t{strand}\n")
            m.write(f"{c}\t{start}\t{start + WINDOW}\t{int(gv > med)}\t{int(av > a_med)}\t{gv:.5f}\n")
    table = root / "seqs.csv"
    with open(table, "w") as f:
        f.write("id,sequence,label\n")
        for i, ((c, start, seq, _), gv) in enumerate(zip(wins, g)):
            f.write(f"w{i},{seq},{'GC' if gv > med else 'AT'}\n")
    fasta = root / "labeled.fa"
    with open(fasta, "w") as f:
        for i, ((c, start, seq, _), gv) in enumerate(zip(wins, g)):
            f.write(f">w{i} label={'GC' if gv > med else 'AT'}\n{seq}\n")
    return {"genome": genome, "bed": bed, "multi": multi, "table": table, "fasta": fasta, "n": len(wins)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, lambda_genome):
    root = tmp_path_factory.mktemp("finetune-data")
    out = build_task_files(root, lambda_genome)
    out["backbone"] = tiny_backbone(root / "tiny")
    return out


def run(files, out: Path, **kw):
    from seqssm.pipelines.finetune import FinetuneOptions, run_finetune

    opts = dict(FAST)
    opts.update(kw)
    if "sequences" not in opts and "train" not in opts and "regions" not in opts:
        opts.update(regions=files["bed"], genome=files["genome"])
    opts.setdefault("model", str(files["backbone"]))
    return run_finetune(FinetuneOptions(output=out, **opts))


def tiny_classifier(task="binary", n_outputs=1, pooling="mean", seed=0, **kw) -> SequenceClassifier:
    torch.manual_seed(seed)
    cfg = HyenaConfig(d_model=32, n_layer=2, max_seq_len=256, embed_dropout=0.0)
    names = kw.pop("label_names", None) or ([f"c{i}" for i in range(max(n_outputs, 2))] if task != "regression"
                                            else [f"t{i}" for i in range(n_outputs)])
    if task in ("multilabel", "regression"):
        names = names[:n_outputs]
    model = SequenceClassifier(cfg, HeadConfig(task, n_outputs, pooling, names, dropout=0.0, **kw))
    with torch.no_grad():  # a head that is not ~0 everywhere, so comparisons mean something
        model.head.proj.weight.normal_(std=1.0)
    return model.eval()


def lambda_windows(lambda_genome, lengths, start=1000):
    out, pos = [], start
    for n in lengths:
        out.append(encode(lambda_genome[pos:pos + n]))
        pos += n + 17
    return out


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("pooling", ["mean", "last", "both"])
@pytest.mark.parametrize("task,n_out", [("binary", 1), ("multiclass", 3), ("multilabel", 2), ("regression", 2)])
def test_head_shapes(lambda_genome, pooling, task, n_out):
    model = tiny_classifier(task, n_out, pooling)
    ids, lengths = batch_examples(lambda_windows(lambda_genome, [40, 64, 23]))
    with torch.no_grad():
        logits = model(ids, lengths)
        proba = model.predict_proba(ids, lengths)
    assert logits.shape == (3, n_out) and logits.dtype == torch.float32
    if task == "binary":
        assert proba.shape == (3,) and ((proba > 0) & (proba < 1)).all()
    elif task == "multiclass":
        assert proba.shape == (3, 3) and torch.allclose(proba.sum(-1), torch.ones(3))
    else:
        assert proba.shape == (3, n_out)


def test_batch_examples_pads_on_the_right():
    ids, lengths = batch_examples([np.array([7, 8, 9], np.uint8), np.array([10], np.uint8)], pad_to=5)
    assert ids.dtype == torch.long and ids.tolist() == [[7, 8, 9, PAD, PAD], [10, PAD, PAD, PAD, PAD]]
    assert lengths.tolist() == [3, 1]
    with pytest.raises(ValueError):
        batch_examples([np.array([7, 8, 9], np.uint8)], pad_to=2)


def test_reverse_complement_within_each_length(lambda_genome):
    seqs = lambda_windows(lambda_genome, [10, 4, 7])
    ids, lengths = batch_examples(seqs)
    rc = reverse_complement_padded(ids, lengths)
    for row, s in zip(rc, seqs):
        n = len(s)
        assert row[:n].tolist() == reverse_complement(s).tolist()
        assert (row[n:] == PAD).all()
    assert torch.equal(reverse_complement_padded(rc, lengths), ids)


@pytest.mark.parametrize("pooling", ["mean", "last", "both"])
def test_padding_is_exact(lambda_genome, pooling):
    """An example's logits do not depend on the other sequences of its batch (or their lengths)."""
    model = tiny_classifier("multiclass", 3, pooling)
    seqs = lambda_windows(lambda_genome, [30, 250, 64, 5])
    with torch.no_grad():
        together = model(*batch_examples(seqs))
        alone = torch.cat([model(*batch_examples([s])) for s in seqs])
        padded = torch.cat([model(*batch_examples([s], pad_to=256)) for s in seqs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_both_pooling_and_rc_average_are_strand_symmetric(lambda_genome):
    seqs = lambda_windows(lambda_genome, [50, 64, 33])
    ids, lengths = batch_examples(seqs)
    rc = reverse_complement_padded(ids, lengths)
    with torch.no_grad():
        both = tiny_classifier("multiclass", 3, "both")
        torch.testing.assert_close(both(ids, lengths), both(rc, lengths), atol=1e-6, rtol=1e-6)
        for pooling in ("mean", "last"):
            m = tiny_classifier("multiclass", 3, pooling)
            a = m.predict_proba(ids, lengths, rc_average=True)
            b = m.predict_proba(rc, lengths, rc_average=True)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
            # and the single-strand outputs do differ: the symmetry is the averaging's doing
            assert not torch.allclose(m.predict_proba(ids, lengths), m.predict_proba(rc, lengths), atol=1e-4)


def test_regression_outputs_are_in_target_units(lambda_genome):
    m = tiny_classifier("regression", 2, target_mean=[10.0, -3.0], target_std=[2.0, 0.5])
    ids, lengths = batch_examples(lambda_windows(lambda_genome, [40, 41]))
    with torch.no_grad():
        z = m(ids, lengths)
        y = m.predict_proba(ids, lengths)
    torch.testing.assert_close(y, z * torch.tensor([2.0, 0.5]) + torch.tensor([10.0, -3.0]))


def test_head_config_checks():
    with pytest.raises(ValueError):
        HeadConfig("binary", 2)
    with pytest.raises(ValueError):
        HeadConfig("multiclass", 3, "max")
    cfg = HeadConfig("multiclass", 3, "both", ["a", "b", "c"], dropout=0.2)
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- the model directory


def test_save_and_load_finetuned_round_trip(tmp_path, lambda_genome):
    model = tiny_classifier("regression", 2, "both", target_mean=[1.0, 2.0], target_std=[3.0, 4.0])
    prep = {"input": "bed", "length": 64, "label_columns": ["gc", "at"], "rc_average": True}
    path = save_finetuned(model, tmp_path / "ft", tokenizer=DNATokenizer(model_max_length=256), preprocessing=prep,
                          info={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "training.json"]
    loaded, tok, head, prep2, info = load_finetuned(path)
    assert not loaded.training and head == model.head_config and prep2 == prep and info["note"] == "test"
    assert tok.model_max_length == 256
    ids, lengths = batch_examples(lambda_windows(lambda_genome, [40, 64]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(ids, lengths), model.predict_proba(ids, lengths), atol=0, rtol=0)

    # load_model (seqssm embed) reads the same directory as a plain backbone, head keys ignored
    lm = load_model(path)
    ref = model.backbone.state_dict()
    got = lm.model.backbone.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert lm.info["finetuned_head"]["task"] == "regression"

    # a plain backbone is not a fine-tuned model
    plain = tiny_backbone(tmp_path / "plain")
    with pytest.raises(SeqssmError, match="not a fine-tuned model"):
        load_finetuned(plain)


def test_save_finetuned_from_an_untied_backbone_is_loadable(tmp_path):
    torch.manual_seed(0)
    cfg = HyenaConfig(d_model=16, n_layer=1, max_seq_len=64, tie_word_embeddings=False)
    model = SequenceClassifier(cfg, HeadConfig("binary", 1, "mean", ["a", "b"]))
    path = save_finetuned(model, tmp_path / "ft", tokenizer=DNATokenizer(model_max_length=64), preprocessing={}, info={})
    assert load_model(path).config.tie_word_embeddings
    load_finetuned(path)


# ----------------------------------------------------------------------------- losses


def test_class_weights():
    t = np.array([[1], [0], [0], [0]], np.float32)
    assert TaskLoss("binary", 1, t).weights == [3.0]
    assert TaskLoss("binary", 1, t, class_weights="none").weights is None
    t = np.array([[0], [0], [0], [1], [2], [2]], np.float32)
    w = TaskLoss("multiclass", 3, t).weights
    np.testing.assert_allclose(w, [6 / 9, 6 / 3, 6 / 6])
    ml = np.array([[1, 0], [0, np.nan], [0, 1], [0, 1]], np.float32)
    loss = TaskLoss("multilabel", 2, ml)
    assert loss.weights == [3.0, 0.5]
    # a missing label adds nothing to the loss
    logits = torch.zeros(4, 2, requires_grad=True)
    value = loss(logits, torch.from_numpy(ml))
    value.backward()
    assert torch.isfinite(value) and logits.grad[1, 1] == 0
    reg = TaskLoss("regression", 1, np.array([[1.0], [3.0]], np.float32))
    assert reg.mean == [2.0] and reg.std == [1.0]
    assert float(reg(torch.zeros(2, 1), torch.tensor([[1.0], [3.0]]))) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- training runs


def test_binary_run_learns_and_writes_everything(files, tmp_path):
    out = tmp_path / "run"
    s = run(files, out, epochs=3, split="chrom", valid_chroms=["chrB"], test_chroms=["chrC"], pooling="both",
            rc_augment=True, rc_average=True, patience=0)
    assert s.finished and s.task == "binary" and s.label_names == ["AT", "GC"]
    assert s.valid["auroc"] > 0.8 and s.test["auroc"] > 0.8, (s.valid, s.test)
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and len(m["history"]) == 3 and m["selection_metric"] == "auroc"
    assert m["best_epoch"] == s.best_epoch and m["test"]["auroc"] == s.test["auroc"]
    assert set(m["class_counts"]) == {"train", "valid", "test"} and "chrB" in m["split"]
    for k in ("accuracy", "mcc", "macro_f1", "auroc", "auprc"):
        assert m["valid"][k] is not None and f"valid_{k}" in m["history"][0]
    for png in ("learning_curves.png", "roc.png"):
        assert (out / png).stat().st_size > 5000
    rows = (out / "test_predictions.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["name", "target", "prediction"] and len(rows) == s.sizes["test"] + 1
    assert rows[1].startswith("chrC:")

    model, tok, head, prep, info = load_finetuned(out)
    assert head.pooling == "both" and prep["input"] == "bed" and prep["rc_average"] is True
    assert info["best_epoch"] == s.best_epoch and info["test"]["auroc"] == s.test["auroc"]
    # the saved model is the best epoch's: it reproduces the reported validation AUROC
    from seqssm.io.labeled import read_labeled
    from seqssm.io.splits import chrom_split
    from seqssm.training.metrics import compute_metrics

    data = chrom_split(read_labeled(files["bed"], genome=files["genome"]), valid_chroms=["chrB"], test_chroms=["chrC"])
    ids, lengths = batch_examples([e.ids for e in data.test.examples])
    with torch.no_grad():
        p = model.predict_proba(ids, lengths, rc_average=True).numpy()
    y = data.test.targets()[:, 0]
    assert compute_metrics("binary", y, p)["auroc"] == pytest.approx(s.test["auroc"], abs=1e-6)
    # and the backbone is loadable for embedding
    assert load_model(out).config.d_model == 32


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "regression"])
def test_other_tasks_train_and_write_metrics(files, tmp_path, kind):
    out = tmp_path / kind
    if kind == "multiclass":
        kw = dict(regions=files["bed"], genome=files["genome"], label_columns=["5"], pooling="last")
    elif kind == "multilabel":
        kw = dict(regions=files["multi"], genome=files["genome"], label_columns=["gc_high", "a_rich"])
    else:
        kw = dict(regions=files["multi"], genome=files["genome"], label_columns=["gc"])
    s = run(files, out, epochs=2, split_fractions=(0.7, 0.15, 0.15), **kw)
    assert s.finished and s.task == kind
    m = json.loads((out / "metrics.json").read_text())
    keys = ("mse", "pearson", "spearman") if kind == "regression" else ("accuracy", "mcc", "macro_f1", "auroc", "auprc")
    for k in keys:
        assert m["test"][k] is not None and m["valid"][k] is not None
    assert (out / "learning_curves.png").is_file()
    assert (out / ("regression.png" if kind == "regression" else "roc.png")).is_file()
    head = load_finetuned(out)[2]
    if kind == "multiclass":
        assert head.label_names == ["high", "low", "mid"] and head.n_outputs == 3 and head.pooling == "last"
    elif kind == "multilabel":
        assert head.label_names == ["gc_high", "a_rich"] and head.n_outputs == 2
    else:
        assert head.n_outputs == 1 and head.target_mean[0] == pytest.approx(0.5, abs=0.05)
        assert m["test"]["pearson"] > 0.8  # the GC fraction is learnt in 2 epochs


def test_freeze_backbone_leaves_it_unchanged(files, tmp_path):
    out = tmp_path / "probe"
    s = run(files, out, epochs=1, freeze_backbone=True, sequences=files["table"])
    assert s.trainable_parameters == 32 + 1 < s.parameters
    before = load_model(files["backbone"]).model.backbone.state_dict()
    model = load_finetuned(out)[0]
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.head.proj.weight.abs().sum() > 0


def test_from_scratch_uses_the_architecture_only(files, tmp_path):
    s = run(files, tmp_path / "scratch", epochs=1, from_scratch=True, freeze_backbone=True, sequences=files["fasta"],
            seed=7)
    assert s.finished
    ref = load_model(files["backbone"]).model.backbone.state_dict()
    got = load_finetuned(tmp_path / "scratch")[0].backbone.state_dict()
    assert ref.keys() == got.keys()
    assert not torch.equal(ref["layers.0.mixer.in_proj.weight"], got["layers.0.mixer.in_proj.weight"])
    info = json.loads((tmp_path / "scratch" / "training.json").read_text())
    assert info["from_scratch"] is True


RESUME_KW = dict(split_fractions=(0.3, 0.1, 0.6), epochs=3, patience=0, rc_augment=True, dropout=0.2, batch_size=32)


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    s = run(files, out, sequences=files["table"], **RESUME_KW)
    assert s.step == 24  # 30% of 756 windows = 227 -> 8 steps per epoch
    return out


@pytest.mark.parametrize("cut", [8, 18])  # at the end of epoch 1 (8 steps per epoch), and inside epoch 3
def test_resume_equals_an_uninterrupted_run(files, uninterrupted, tmp_path, cut):
    part = run(files, tmp_path / "cut", max_steps_this_run=cut, sequences=files["table"], **RESUME_KW)
    assert not part.finished and part.step == cut
    state = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert state["status"] == "running"
    rest = run(files, tmp_path / "cut", resume=True, sequences=files["table"], **RESUME_KW)
    assert rest.finished and rest.resumed_from == cut
    a, b = load_finetuned(uninterrupted)[0], load_finetuned(tmp_path / "cut")[0]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=k)
    ha = json.loads((uninterrupted / "metrics.json").read_text())
    hb = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert len(ha["history"]) == len(hb["history"]) == 3
    for ra, rb in zip(ha["history"], hb["history"]):
        for k in ("train_loss", "valid_loss", "valid_auroc", "lr"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-6)
    assert ha["best_epoch"] == hb["best_epoch"]
    assert ha["test"]["auroc"] == pytest.approx(hb["test"]["auroc"], abs=1e-6)
    # only the latest and the best checkpoints are kept
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step-*"))) <= 2


def test_early_stopping_and_resume_of_a_finished_run(files, tmp_path):
    out = tmp_path / "es"
    # a learning rate far too high: the validation loss stops improving at once
    kw = dict(sequences=files["table"], epochs=8, patience=1, early_stop_metric="loss", head_lr=3.0, lr=0.3,
              warmup_fraction=0.0)
    s = run(files, out, **kw)
    m = json.loads((out / "metrics.json").read_text())
    assert s.finished and m["selection_metric"] == "loss" and m["direction"] == "min"
    assert s.epoch < 8 and "early stopping" in s.reason and m["stopped"] == s.reason
    assert s.epoch == s.best_epoch + 1 and len(m["history"]) == s.epoch
    again = run(files, out, resume=True, **kw)
    assert again.reason == "already finished" and again.step == s.step
    with pytest.raises(SeqssmError, match="--force"):
        run(files, out, **kw)
    with pytest.raises(SeqssmError, match="cannot resume with different settings"):
        run(files, out, resume=True, **{**kw, "pooling": "last"})


def test_too_long_inputs_ask_for_length(files, tmp_path):
    short = tiny_backbone(tmp_path / "short", max_seq_len=48)
    with pytest.raises(SeqssmError, match="--length 48"):
        run(files, tmp_path / "x", model=str(short), epochs=1)
    with pytest.raises(SeqssmError, match="cut the sequences"):
        run(files, tmp_path / "y", model=str(short), epochs=1, sequences=files["table"])
    s = run(files, tmp_path / "z", model=str(short), epochs=1, length=40)
    assert s.finished and load_finetuned(tmp_path / "z")[3]["length"] == 40


def test_time_budget_stops_cleanly_with_a_checkpoint(files, tmp_path):
    out = tmp_path / "budget"
    s = run(files, out, sequences=files["table"], epochs=2, max_minutes=1e-4)
    assert not s.finished and s.step == 1 and "--max-minutes" in s.reason
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert (out / "checkpoints" / "step-00000001" / "optimizer.pt").is_file()
    assert not (out / "config.json").exists()  # no final model yet
    with pytest.raises(SeqssmError, match="--resume"):
        run(files, out, sequences=files["table"], epochs=2)
