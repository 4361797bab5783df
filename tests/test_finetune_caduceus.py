"""Fine-tuning on Caduceus / Mamba backbones (CPU, tiny models; tasks from phage lambda, as in test_finetune).

Variants: Caduceus-Ph (bidirectional BiMamba), Caduceus-PS (RC-equivariant, fused and unfused
add-norm) and a causal Mamba. A padded batch must give every example the outputs it gets alone:
the right-to-left scans of the bidirectional / RC-equivariant models must not read the padding.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.models import (
    CaduceusConfig,
    CaduceusForMaskedLM,
    HeadConfig,
    HyenaConfig,
    SequenceClassifier,
    batch_examples,
    load_finetuned,
    load_model,
    reverse_complement_padded,
    save_finetuned,
    save_model,
)
from seqssm.models.caduceus import pretraining_inputs
from seqssm.tokenizers.dna import DNATokenizer, encode
from test_finetune import build_task_files, gc, run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VARIANTS = {
    "ph": dict(rcps=False),
    "ps": dict(),
    "ps-unfused": dict(fused_add_norm=False),
    "mamba": dict(rcps=False, bidirectional=False),
}


def tiny_config(variant: str) -> CaduceusConfig:
    return CaduceusConfig.dna(d_model=16, n_layer=2, d_state=4, **VARIANTS[variant])


def tiny_caduceus(path, variant: str = "ps", *, seed: int = 0, n_as_pad: bool = False):
    """A randomly initialised tiny Caduceus saved as a seqssm model directory (what `pretrain` writes)."""
    torch.manual_seed(seed)
    model = CaduceusForMaskedLM(tiny_config(variant))
    return save_model(model, path, tokenizer=DNATokenizer(model_max_length=1024), n_as_pad=n_as_pad)


def tiny_classifier(variant: str, pooling: str = "mean", *, seed: int = 0, n_as_pad: bool = False):
    torch.manual_seed(seed)
    head = HeadConfig("multiclass", 3, pooling, ["a", "b", "c"], dropout=0.0)
    model = SequenceClassifier(tiny_config(variant), head, n_as_pad=n_as_pad)
    with torch.no_grad():  # a head that is not ~0 everywhere, so comparisons mean something
        model.head.proj.weight.normal_(std=1.0)
    return model.eval()


def random_seqs(lengths, seed: int) -> list[np.ndarray]:
    """Fresh random sequences of A, C, G, T and N (ids 7..11)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(7, 12, (n,), generator=g).numpy().astype(np.uint8) for n in lengths]


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_padded_batch_equals_each_example_alone(variant):
    # A fixed seed per variant (str hash() changes from process to process).
    seqs = random_seqs([37, 5, 64, 1, 20, 63], seed=list(VARIANTS).index(variant))
    for pooling in ("mean", "last", "both"):
        model = tiny_classifier(variant, pooling, seed=3)
        with torch.no_grad():
            together = model(*batch_examples(seqs))
            alone = torch.cat([model(*batch_examples([s])) for s in seqs])
            padded = torch.cat([model(*batch_examples([s], pad_to=80)) for s in seqs])
        # float32 to 1e-5 of the outputs' scale: batched and single products round differently, so an
        # output near zero may differ by ~1e-6 absolutely; reading the padding would differ by O(1).
        atol = 1e-5 * float(alone.abs().max())
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=atol, msg=f"{variant}, {pooling}")
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=atol, msg=f"{variant}, {pooling}")


@pytest.mark.parametrize("variant", ["ph", "ps"])
def test_without_lengths_the_reverse_scans_would_read_the_padding(variant):
    """What the lengths are for: a bidirectional / RC-equivariant backbone fed the padded rows
    as they are gives a short row other states than it gets alone."""
    backbone = tiny_classifier(variant).backbone
    seqs = random_seqs([40, 9], seed=11)
    ids, lengths = batch_examples(seqs)
    with torch.no_grad():
        alone = backbone.embed(batch_examples([seqs[1]])[0])[0]
        exact = backbone.embed(ids, lengths=lengths)[1, :9]
        naive = backbone.embed(ids)[1, :9]
    torch.testing.assert_close(exact, alone, rtol=1e-5, atol=1e-6)
    assert (naive - alone).abs().max() > 1e-3


def test_strand_symmetry_and_rc_average():
    seqs = random_seqs([30, 12, 47], seed=5)
    ids, lengths = batch_examples(seqs)
    rc = reverse_complement_padded(ids, lengths)
    with torch.no_grad():
        # Caduceus-PS, mean pooling: strand-invariant by construction; rc averaging is not computed
        ps = tiny_classifier("ps", "mean")
        assert ps.strand_invariant
        torch.testing.assert_close(ps(ids, lengths), ps(rc, lengths), rtol=1e-5, atol=1e-6)
        p = ps.predict_proba(ids, lengths)
        assert torch.equal(ps.predict_proba(ids, lengths, rc_average=True), p)
        ps.head_config.pooling = "both"  # the same as mean for an RC-equivariant model
        assert torch.equal(ps.predict_proba(ids, lengths), p)
        ps.head_config.pooling = "last"  # the last base of x is the first of rc(x): not symmetric
        assert not ps.strand_invariant
        torch.testing.assert_close(ps.predict_proba(ids, lengths, rc_average=True),
                                   ps.predict_proba(rc, lengths, rc_average=True), rtol=1e-5, atol=1e-6)
        # Caduceus-Ph: not symmetric alone; rc averaging and "both" pooling make it so
        ph = tiny_classifier("ph", "mean")
        assert not ph.strand_invariant
        assert not torch.allclose(ph.predict_proba(ids, lengths), ph.predict_proba(rc, lengths), atol=1e-4)
        torch.testing.assert_close(ph.predict_proba(ids, lengths, rc_average=True),
                                   ph.predict_proba(rc, lengths, rc_average=True), rtol=1e-5, atol=1e-6)
        both = tiny_classifier("ph", "both")
        torch.testing.assert_close(both(ids, lengths), both(rc, lengths), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the model directory


@pytest.mark.parametrize("variant,n_as_pad", [("ps", True), ("mamba", False)])
def test_save_and_load_round_trip(tmp_path, monkeypatch, variant, n_as_pad):
    model = tiny_classifier(variant, "last", n_as_pad=n_as_pad)
    prep = {"input": "table", "length": None, "rc_average": False}
    path = save_finetuned(model, tmp_path / "ft", tokenizer=DNATokenizer(model_max_length=1024), preprocessing=prep,
                          info={"note": "test"})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "caduceus" and cfg["rcps"] == (variant == "ps") and cfg["head"]["pooling"] == "last"
    assert cfg["seqssm_n_as_pad"] is n_as_pad and cfg["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert all(k.startswith(("backbone.", "head.")) for k in f.keys())

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded, tok, head, prep2, info = load_finetuned(path)
    assert loaded.architecture == "caduceus" and loaded.n_as_pad is n_as_pad and not loaded.training
    assert head == model.head_config and prep2 == prep and info["note"] == "test" and tok.model_max_length == 1024
    ids, lengths = batch_examples(random_seqs([50, 21, 3], seed=2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(ids, lengths), model.predict_proba(ids, lengths),
                                   atol=0, rtol=0)

    # load_model (seqssm embed) reads the backbone of the same directory, head ignored
    lm = load_model(path)
    assert lm.model_type == "caduceus" and lm.n_as_pad is n_as_pad and lm.info["finetuned_head"]["task"] == "multiclass"
    assert "ignored_keys" not in lm.info
    ref, got = model.backbone.state_dict(), lm.model.caduceus.backbone.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    full = batch_examples(random_seqs([33, 33], seed=4))[0]
    with torch.no_grad():
        expected = model.backbone.embed(pretraining_inputs(full) if n_as_pad else full)
        torch.testing.assert_close(lm.embed(full), expected, atol=0, rtol=0)


def test_hyenadna_directories_keep_their_format(tmp_path, lambda_genome):
    """A fine-tuned HyenaDNA directory as seqssm always wrote it (written by hand here) loads unchanged,
    and save_finetuned still writes exactly that config.json."""
    from safetensors.torch import save_file

    from seqssm.models.io import _unique_tensors

    torch.manual_seed(0)
    cfg = HyenaConfig(d_model=16, n_layer=1, max_seq_len=128)
    model = SequenceClassifier(cfg, HeadConfig("binary", 1, "both", ["x", "y"])).eval()
    old = tmp_path / "old"
    old.mkdir()
    config = {"model_type": "hyenadna", "seqssm_version": "0.1.0", **cfg.to_dict(), "tie_word_embeddings": True,
              "head": model.head_config.to_dict(), "preprocessing": {"input": "bed", "rc_average": True}}
    (old / "config.json").write_text(json.dumps(config))
    save_file(_unique_tensors(model), str(old / "model.safetensors"))  # backbone.* and head.*, shared tensors once
    (old / "tokenizer.json").write_text(json.dumps(DNATokenizer(model_max_length=128).to_dict()))
    loaded, _, head, prep, _ = load_finetuned(old)
    assert loaded.architecture == "hyenadna" and head == model.head_config and prep["rc_average"] is True
    ids, lengths = batch_examples([encode(lambda_genome[100:160]), encode(lambda_genome[500:530])])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, lengths), model(ids, lengths), atol=0, rtol=0)
    assert load_model(old).config.d_model == 16

    new = save_finetuned(model, tmp_path / "new", tokenizer=DNATokenizer(model_max_length=128),
                         preprocessing=config["preprocessing"])
    written = json.loads((new / "config.json").read_text())
    assert list(written) == list(config) and {**written, "seqssm_version": "0.1.0"} == config


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def files(tmp_path_factory, lambda_genome):
    root = tmp_path_factory.mktemp("finetune-caduceus")
    out = build_task_files(root / "data", lambda_genome)
    out["backbone"] = tiny_caduceus(root / "tiny-ps", "ps")
    # a table of windows of mixed lengths (30..64 bp): padded batches in training and evaluation
    rows, pos = [], 0
    for i in range(300):
        n = 30 + (i * 7) % 35
        rows.append((f"v{i}", lambda_genome[pos:pos + n]))
        pos += n
    med = float(np.median([gc(s) for _, s in rows]))
    table = root / "mixed.csv"
    table.write_text("id,sequence,label\n" + "".join(f"{k},{s},{'GC' if gc(s) > med else 'AT'}\n" for k, s in rows))
    out["mixed"] = table
    return out


@pytest.fixture(scope="module")
def cli_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ps"
    args = ["finetune", "-o", out, "--regions", files["bed"], "--genome", files["genome"], "--split", "chrom",
            "--valid-chroms", "chrB", "--test-chroms", "chrC", "--model", files["backbone"], "--epochs", "2",
            "--rc-augment", "--rc-average", "--batch-size", "32", "--lr", "3e-3", "--head-lr", "1e-2",
            "--dropout", "0", "--device", "cpu"]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return out, res


def test_finetune_then_predict_reproduces_the_test_metrics(cli_run, files, tmp_path):
    from seqssm.pipelines.predict import PredictOptions, run_predict

    out, res = cli_run
    assert "strand-symmetric by construction" in res.output  # --rc-augment / --rc-average are said to be moot
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished" and m["test"]["auroc"] > 0.8, m["test"]
    info = json.loads((out / "training.json").read_text())
    assert info["architecture"].startswith("Caduceus-PS") and info["task"] == "fine-tuned Caduceus-PS binary classifier"
    assert json.loads((out / "config.json").read_text())["model_type"] == "caduceus"

    # predict on the test chromosome: the same outputs, hence the same metrics, as the run's evaluation
    test_bed = tmp_path / "test.bed"
    test_bed.write_text("".join(line for line in open(files["bed"]) if line.startswith("chrC\t")))
    pred = tmp_path / "pred.tsv"
    s = run_predict(PredictOptions(model=str(out), output=pred, regions=test_bed, genome=files["genome"],
                                   label_columns=[4], batch_size=64, device="cpu", quiet=True))
    assert s.metrics is not None
    for k in ("accuracy", "mcc", "macro_f1", "auroc", "auprc"):
        assert s.metrics[k] == m["test"][k], k
    ours = pd.read_csv(pred, sep="\t")
    theirs = pd.read_csv(out / "test_predictions.tsv", sep="\t", dtype=str)
    assert list(ours["name"]) == list(theirs["name"])
    assert [f"{p:.6g}" for p in ours["prob_GC"].astype(np.float32)] == list(theirs["prob_GC"])

    # the CLI too
    res = runner.invoke(app, ["predict", "--model", str(out), "--regions", str(test_bed), "--genome",
                              str(files["genome"]), "-o", str(tmp_path / "cli.tsv"), "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(pd.read_csv(tmp_path / "cli.tsv", sep="\t")["prob_GC"], ours["prob_GC"])


def test_embed_and_models_info_read_the_finetuned_backbone(cli_run, files, tmp_path, lambda_genome):
    out, _ = cli_run
    emb = tmp_path / "emb.parquet"
    res = runner.invoke(app, ["embed", str(files["genome"]), "--model", str(out), "--window", "64", "-o", str(emb),
                              "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(emb).to_pandas()
    model = load_finetuned(out)[0]
    ids, lengths = batch_examples([encode(lambda_genome[0:64])])  # the first window of chrA
    with torch.no_grad():
        pooled = model.pool(ids, lengths)[0].numpy()  # mean pooling of the classifier = embed's mean
    np.testing.assert_allclose(t["embedding"][0], pooled, rtol=1e-5, atol=1e-6)

    res = runner.invoke(app, ["models", "info", str(out)], terminal_width=400)
    assert res.exit_code == 0, res.output
    assert "Caduceus-PS" in res.output
    # the fine-tuning record, not the backbone's pretraining one: task, base model, the run's test metrics
    m = json.loads((out / "metrics.json").read_text())
    assert "fine-tuned Caduceus-PS binary classifier" in res.output and str(files["backbone"]) in res.output
    assert f"auroc {m['test']['auroc']:.4f}" in res.output and f"mcc {m['test']['mcc']:.4f}" in res.output
    assert "held-out perplexity" not in res.output


def test_resume_with_padded_batches_equals_an_uninterrupted_run(files, tmp_path):
    """A bidirectional backbone on sequences of mixed lengths, last-base pooling, RC augmentation."""
    bb = tiny_caduceus(tmp_path / "ph", "ph", seed=1)
    kw = dict(sequences=files["mixed"], model=str(bb), split_fractions=(0.6, 0.2, 0.2), epochs=2, patience=0,
              rc_augment=True, dropout=0.2, pooling="last")
    full = run(files, tmp_path / "full", **kw)
    assert full.finished and full.step == 12  # 180 training sequences, 6 steps per epoch
    part = run(files, tmp_path / "cut", max_steps_this_run=4, **kw)
    assert not part.finished and part.step == 4
    rest = run(files, tmp_path / "cut", resume=True, **kw)
    assert rest.finished and rest.resumed_from == 4
    a, b = load_finetuned(tmp_path / "full")[0], load_finetuned(tmp_path / "cut")[0]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=k)
    assert rest.test["auroc"] == pytest.approx(full.test["auroc"], abs=1e-6)


def test_freeze_backbone_and_from_scratch(files, tmp_path):
    bb = tiny_caduceus(tmp_path / "mamba", "mamba", seed=2)
    kw = dict(sequences=files["mixed"], model=str(bb), epochs=1, freeze_backbone=True)
    s = run(files, tmp_path / "probe", **kw)
    assert s.finished and s.trainable_parameters == 16 + 1 < s.parameters
    before = load_model(bb).model.caduceus.backbone.state_dict()
    after = load_finetuned(tmp_path / "probe")[0].backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    s = run(files, tmp_path / "scratch", from_scratch=True, seed=7, **kw)
    assert s.finished
    got = load_finetuned(tmp_path / "scratch")[0].backbone.state_dict()
    key = "layers.0.mixer.mamba_fwd.in_proj.weight"
    assert before.keys() == got.keys() and not torch.equal(before[key], got[key])
    assert json.loads((tmp_path / "scratch" / "training.json").read_text())["from_scratch"] is True


def test_the_bundled_caduceus_ps_as_a_frozen_backbone(files, tmp_path):
    """`--model caduceus-ps-chr20` (d_model 128, 8 layers): a linear probe, cheap on CPU (no backward
    through the backbone), on 80 lambda sequences of mixed lengths."""
    small = tmp_path / "small.csv"
    small.write_text("".join(files["mixed"].read_text().splitlines(keepends=True)[:81]))
    out = tmp_path / "probe"
    s = run(files, out, sequences=small, model="caduceus-ps-chr20", epochs=1, freeze_backbone=True,
            split_fractions=(0.6, 0.2, 0.2), rc_average=True)
    assert s.finished and s.sizes == {"train": 48, "valid": 16, "test": 16} and s.trainable_parameters == 129
    model, _, head, prep, info = load_finetuned(out)
    assert model.rc_equivariant and model.strand_invariant and not model.n_as_pad and head.pooling == "mean"
    assert info["base_model"] == "caduceus-ps-chr20" and prep["max_length"] is None
    bundled = load_model("caduceus-ps-chr20").model.caduceus.backbone.state_dict()
    got = model.backbone.state_dict()
    assert bundled.keys() == got.keys() and all(torch.equal(bundled[k], got[k]) for k in bundled)
