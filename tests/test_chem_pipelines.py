"""Chemical LM training, sampling, scoring and the molecule commands, end to end on CPU.

Real molecules: the 4,999 NCI compounds RDKit ships (rdkit/Data/NCI/first_5K.smi). A tiny S4
model trained on them for a few epochs is shared by the module (it is not meant to be good, only
real); the bundled model is used where quality matters.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CHEM, nci_smiles
from seqssm.cli.main import app
from seqssm.errors import SeqssmError

rdkit = pytest.importorskip("rdkit")
from rdkit import Chem  # noqa: E402

runner = CliRunner()
TINY = TINY_CHEM


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, nci_file) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(out), "--epochs", "3", "--lr", "3e-3",
                            "--warmup-steps", "5", *TINY])
    assert r.exit_code == 0, r.output
    return out


def test_pretrain_writes_a_loadable_model_and_learns(tiny_model):
    from seqssm.chem.model_dir import load_chem_model

    run = json.loads((tiny_model / "run.json").read_text())
    assert run["status"] == "finished"
    evals = [json.loads(l) for l in (tiny_model / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert len(evals) == 3
    # a uniform guess over the vocabulary costs log(V) nats per token; three epochs must do far better
    v = len(run["vocabulary"])
    assert evals[-1]["val_loss"] < 0.6 * np.log(v)
    loaded = load_chem_model(tiny_model)
    info = loaded.info
    assert info["validation"]["val_loss"] == min(e["val_loss"] for e in evals)
    assert info["training_data"]["train_molecules"] + info["training_data"]["valid_molecules"] == 1200
    assert (tiny_model / "curves.png").stat().st_size > 1000


def test_resume_reproduces_an_uninterrupted_run(tmp_path, nci_file):
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--epochs", "2", "--max-len", "80", *TINY]
    assert runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(a), *args]).exit_code == 0
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(b), "--max-steps-this-run", "7", *args])
    assert r.exit_code == 0, r.output
    assert json.loads((b / "run.json").read_text())["status"] == "running"
    r = runner.invoke(app, ["pretrain-molecules", "-o", str(b), "--resume", *args])
    assert r.exit_code == 0, r.output
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_refuses_changed_data_or_settings(tmp_path, nci_file):
    out = tmp_path / "r"
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(out), "--epochs", "2",
                            "--max-steps-this-run", "2", *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["pretrain-molecules", "-o", str(out), "--resume", "--epochs", "2", *TINY[:-3],
                            "--lr", "0.5", "-q"])
    assert r.exit_code == 1 and "--lr" in r.output
    other = tmp_path / "other.smi"
    other.write_text("\n".join(nci_smiles(300)) + "\n")
    r = runner.invoke(app, ["pretrain-molecules", str(other), "-o", str(out), "--resume", "--epochs", "2", *TINY])
    assert r.exit_code == 1 and "differ" in r.output
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(out), "--epochs", "2", *TINY])
    assert r.exit_code == 1 and "--resume" in r.output


def test_early_stopping_keeps_the_best_model(tmp_path, nci_file, monkeypatch):
    """Validation losses 3, 2, 2.5, 2.6: patience 2 stops after the fourth evaluation, best = second."""
    import seqssm.training.molecules as tm

    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])

    def fake_eval(model, data, **kw):
        loss = next(losses)
        return {"val_loss": loss, "val_ppl": float(np.exp(loss)), "val_tokens": 1, "val_molecules": len(data)}

    monkeypatch.setattr(tm, "evaluate_set", fake_eval)
    out = tmp_path / "es"
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(out), "--epochs", "10", "--patience", "2",
                            *TINY])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "info.json").read_text())
    assert info["training"]["stopped"].startswith("early stop")
    assert info["validation"]["val_loss"] == 2.0
    best_step = json.loads((out / "best" / "info.json").read_text())["step"]  # end of epoch 2
    assert info["training"]["steps"] == 2 * best_step  # end of epoch 4


def test_finetune_keeps_vocabulary_and_skips_unknown_tokens(tmp_path, tiny_model):
    from seqssm.chem.model_dir import load_chem_model

    base = load_chem_model(tiny_model)
    actives = nci_smiles(1300)[1200:1300] + ["[Pt]Cl", "C[Se]C"]  # tokens the small vocabulary may lack
    f = tmp_path / "actives.smi"
    f.write_text("\n".join(actives) + "\n")
    out = tmp_path / "ft"
    r = runner.invoke(app, ["finetune-molecules", str(f), "-o", str(out), "--model", str(tiny_model), "--epochs", "3",
                            "--batch-size", "16", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    ft = load_chem_model(out)
    assert ft.tokenizer.tokens == base.tokenizer.tokens
    data = ft.info["training_data"]
    unknown = sum(1 for s in actives if _unknown(base.tokenizer, s))
    assert data["unknown_token"] == unknown >= 1
    assert ft.info["pretrained_from"] == str(tiny_model)
    # the weights moved
    assert any(not torch.equal(p, q) for p, q in zip(ft.model.state_dict().values(), base.model.state_dict().values()))


def _unknown(tok, s) -> bool:
    try:
        tok.encode(s)
        return False
    except SeqssmError:
        return True


# ----------------------------------------------------------------------------- sampling


def test_filter_logits_top_k_and_top_p():
    from seqssm.chem.sampling import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isfinite(k2).sum() == 2 and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, 1.0, 0, 0.8)  # 0.5 + 0.2 < 0.8 <= 0.5 + 0.2 + 0.15
    assert torch.isfinite(p[0]).tolist() == [True, True, True, False, False]
    p1 = filter_logits(logits, 1.0, 0, 0.3)  # the top token alone
    assert torch.isfinite(p1[0]).tolist() == [True, False, False, False, False]
    t = filter_logits(logits, 2.0, 0, 1.0)
    assert torch.allclose(t, logits / 2)


def test_gumbel_max_draws_from_the_softmax():
    from seqssm.chem.sampling import gumbel_pick

    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).expand(200_000, 3)
    picks = gumbel_pick(logits, torch.rand(200_000, 3, generator=g))
    freq = torch.bincount(picks, minlength=3).double() / 200_000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.005)


def test_sampling_is_reproducible_and_scores_match(tiny_model):
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.chem.sampling import ReferenceSampler, batch_generator, score_smiles

    m = load_chem_model(tiny_model)
    s = ReferenceSampler(m.model, 64, device="cpu")  # 150 molecules from 64 refilled slots
    a = s(150, batch_generator(3, 0, torch.device("cpu")))
    b = s(150, batch_generator(3, 0, torch.device("cpu")))
    c = s(150, batch_generator(4, 0, torch.device("cpu")))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_likelihood, b.log_likelihood)
    assert not torch.equal(a.tokens, c.tokens)
    smiles = m.tokenizer.decode_batch(a.tokens)
    ended = [i for i in range(150) if a.ended[i] and smiles[i]]
    assert len(ended) > 25
    # the log-likelihood gathered while sampling step by step == a convolution-mode forward pass
    scored = score_smiles(m.model, m.tokenizer, [smiles[i] for i in ended], device=torch.device("cpu"))
    np.testing.assert_allclose(a.log_likelihood[ended].numpy(), scored, rtol=1e-4, atol=1e-4)


def test_generate_outputs(tmp_path, tiny_model):
    for ext in ("smi", "csv", "sdf"):
        out = tmp_path / f"g.{ext}"
        r = runner.invoke(app, ["generate-molecules", "-n", "40", "--model", str(tiny_model), "-o", str(out),
                                "--device", "cpu", "--seed", "1", "--batch-size", "32", "--valid-only", "-q"])
        assert r.exit_code == 0, r.output
        if ext == "smi":
            lines = out.read_text().splitlines()
            assert len(lines) == 40
            assert all(Chem.MolFromSmiles(l.split("\t")[0]) is not None for l in lines)
            assert lines[0].split("\t")[1] == "mol0000001"
        elif ext == "csv":
            rows = list(csv.DictReader(out.open()))
            assert len(rows) == 40 and all(r["valid"] == "1" for r in rows)
            assert all(Chem.CanonSmiles(r["smiles"]) == r["canonical_smiles"] for r in rows)
            assert all(float(r["log_likelihood"]) < 0 for r in rows)
        else:
            mols = [m for m in Chem.SDMolSupplier(str(out))]
            assert len(mols) == 40 and all(m is not None for m in mols)
            assert mols[0].GetProp("_Name") == "mol0000001"


def test_generate_unique_and_same_seed_same_molecules(tmp_path, tiny_model):
    outs = []
    for i in range(2):
        out = tmp_path / f"u{i}.csv"
        r = runner.invoke(app, ["generate-molecules", "-n", "30", "--model", str(tiny_model), "-o", str(out),
                                "--device", "cpu", "--seed", "5", "--batch-size", "16", "--unique", "--valid-only",
                                "-q"])
        assert r.exit_code == 0, r.output
        outs.append([row["canonical_smiles"] for row in csv.DictReader(out.open())])
    assert outs[0] == outs[1]
    assert len(set(outs[0])) == 30


def test_generate_grid_and_summary(tmp_path, tiny_model, nci_file):
    png = tmp_path / "grid.png"
    r = runner.invoke(app, ["generate-molecules", "-n", "12", "--model", str(tiny_model), "--device", "cpu",
                            "--grid", str(png), "--valid-only", "--training-set", str(nci_file)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 5000
    assert "validity" in r.output and "uniqueness" in r.output and "novelty" in r.output
    assert "unknown" not in r.output


def test_generate_errors(tmp_path, tiny_model):
    cases = [
        (["-n", "0"], "-n"),
        (["--temperature", "0"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["-o", str(tmp_path / "x.txt")], ".smi, .csv or .sdf"),
        (["--grid", str(tmp_path / "g.jpg")], ".png"),
        (["--model", str(tmp_path / "nope")], "no chemical model"),
    ]
    for extra, msg in cases:
        args = ["generate-molecules", "--device", "cpu", "-q", "--model", str(tiny_model), *extra]
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (extra, r.output)
        assert msg in r.output, (extra, r.output)
        assert "Traceback" not in r.output


def test_score_molecules(tmp_path, tiny_model):
    f = tmp_path / "s.smi"
    good = nci_smiles(5)
    f.write_text("\n".join(good + ["C[Xe]C"]) + "\n")
    out = tmp_path / "scores.csv"
    r = runner.invoke(app, ["score-molecules", str(f), "--model", str(tiny_model), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert [row["smiles"] for row in rows] == good + ["C[Xe]C"]
    assert rows[-1]["log_likelihood"] == "NA" and "[Xe]" in rows[-1]["note"]
    assert all(float(row["log_likelihood"]) < 0 for row in rows[:-1])
    assert "1 could not be scored" in r.output


def test_models_dir_of_other_kind_is_refused(tmp_path):
    from seqssm.chem.model_dir import load_chem_model

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "hyenadna"}))
    with pytest.raises(SeqssmError, match="not a chemical language model"):
        load_chem_model(d)


def test_quiet_generate_skips_the_training_set_scan(tmp_path, tiny_model, monkeypatch):
    """Novelty canonicalises the whole training set (minutes for MOSES): only when it is shown or asked for."""
    import seqssm.pipelines.molecules as pm

    calls = []
    real = pm._training_set
    monkeypatch.setattr(pm, "_training_set", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    out = tmp_path / "q.smi"
    base = ["generate-molecules", "-n", "20", "--model", str(tiny_model), "--device", "cpu", "-o", str(out)]
    r = runner.invoke(app, [*base, "-q"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and not calls
    r = runner.invoke(app, base)
    assert r.exit_code == 0 and len(calls) == 1 and "novelty" in r.output
