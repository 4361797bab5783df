"""Random SMILES forms as training data: RDKit randomisation, encoding, the per-epoch cycling in the
trainer, and `pretrain-molecules/finetune-molecules --randomize` end to end on CPU.

Real molecules: the NCI compounds RDKit ships (conftest.nci_smiles).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CHEM, nci_smiles
from seqssm.cli.main import app

rdkit = pytest.importorskip("rdkit")

from seqssm.chem.data import canonical, mix_given, randomized_smiles  # noqa: E402
from seqssm.chem.tokenizer import SmilesTokenizer, split_smiles  # noqa: E402
from seqssm.training.molecules import (  # noqa: E402
    MolTrainConfig,
    MoleculeTrainer,
    batch_tensor,
    encode_set,
    epoch_order,
)

runner = CliRunner()
TINY = TINY_CHEM
NCI_MOLECULES = 600  # molecules in the nci_file fixture (conftest)


def test_random_forms_are_the_same_molecules_written_differently():
    smiles = nci_smiles(300)
    r = randomized_smiles(smiles, 4, seed=3, max_tokens=200)
    assert len(r.forms) == 4 and all(len(f) == len(smiles) for f in r.forms)
    assert r.n_given == 0
    for i, s in enumerate(smiles):
        want = canonical(s)
        for j in range(4):
            assert canonical(r.forms[j][i]) == want, (s, r.forms[j][i])
    # Random, not the given strings: most molecules get at least two different spellings.
    varied = sum(len({r.forms[j][i] for j in range(4)}) > 1 for i in range(len(smiles)))
    assert varied > 0.9 * len(smiles)
    assert r.tokens == {t for f in r.forms for s in f for t in split_smiles(s)}


def test_random_forms_are_reproducible_and_independent_of_the_worker_count():
    smiles = nci_smiles(2600) * 2  # over the size at which workers start
    one = randomized_smiles(smiles, 2, seed=5, max_tokens=200, n_jobs=1)
    two = randomized_smiles(smiles, 2, seed=5, max_tokens=200, n_jobs=2)
    assert one.forms == two.forms
    other = randomized_smiles(smiles[:200], 2, seed=6, max_tokens=200)
    assert other.forms[0] != one.forms[0][:200]


def test_random_forms_respect_length_and_vocabulary_limits():
    smiles = nci_smiles(200)
    longest = max(len(split_smiles(s)) for s in smiles)
    r = randomized_smiles(smiles, 3, seed=0, max_tokens=longest)
    assert max(len(split_smiles(f)) for forms in r.forms for f in forms) <= longest
    # A vocabulary without ring-closure 2 (as when fine-tuning keeps a pretrained vocabulary): the
    # given SMILES fit it (unknown tokens are skipped before this), their random forms must too.
    written = [canonical(s) for s in smiles]  # RDKit's spelling (aromatic atoms in lower case)
    allowed = frozenset(t for s in written for t in split_smiles(s)) - {"2"}
    fitting = [s for s in written if set(split_smiles(s)) <= allowed]
    r = randomized_smiles(fitting, 3, seed=0, max_tokens=200, allowed=allowed)
    assert all(set(split_smiles(f)) <= allowed for forms in r.forms for f in forms)
    unrestricted = randomized_smiles(fitting, 3, seed=0, max_tokens=200)
    assert any("2" in split_smiles(f) for forms in unrestricted.forms for f in forms)
    # No random form can do without a token outside the vocabulary: the given SMILES stands in.
    kekule = "C1=CC=CC=C1CC(=O)O"  # RDKit writes benzene rings aromatic, in lower case
    r = randomized_smiles([kekule, "CCO"], 3, seed=0, max_tokens=200, allowed=frozenset(split_smiles(kekule)))
    assert [f[0] for f in r.forms] == [kekule] * 3 and r.n_given == 3


def test_parallel_encoding_equals_serial():
    smiles = nci_smiles(2600) * 2
    tok = SmilesTokenizer.build(smiles)
    a = encode_set(tok, smiles, 100, n_jobs=1)
    b = encode_set(tok, smiles, 100, n_jobs=2)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
    ids, lens = tok.encode_batch(smiles[:50], max_len=100)
    assert torch.equal(a.tokens[:50, : ids.shape[1]].long(), ids)
    assert torch.equal(a.lengths[:50].long(), lens)


def test_mix_given_puts_the_given_smiles_back_with_the_asked_probability():
    smiles = nci_smiles(600)
    r = randomized_smiles(smiles, 3, seed=2, max_tokens=200)
    assert mix_given(smiles, r.forms, 0.0, seed=0) == r.forms
    assert mix_given(smiles, r.forms, 1.0, seed=0) == [smiles] * 3
    mixed = mix_given(smiles, r.forms, 0.3, seed=0)
    assert mixed == mix_given(smiles, r.forms, 0.3, seed=0)  # seeded
    assert mixed != mix_given(smiles, r.forms, 0.3, seed=1)
    kept = []
    for j, column in enumerate(mixed):
        given = [m == s for m, s in zip(column, smiles)]
        # Every entry is the given SMILES or that molecule's own form j, never another molecule's.
        assert all(m in (s, f) for m, s, f in zip(column, smiles, r.forms[j]))
        # Random forms that happen to equal the given SMILES count as kept, so the share is a little
        # over 0.3; the draws are independent per form (different molecules kept in each column).
        kept.append({i for i, g in enumerate(given) if g and r.forms[j][i] != smiles[i]})
        assert 0.22 < sum(given) / len(smiles) < 0.42, sum(given)
    assert kept[0] != kept[1] != kept[2]
    with pytest.raises(ValueError):
        mix_given(smiles, r.forms, 1.5, seed=0)
    with pytest.raises(ValueError):
        mix_given(smiles[:10], r.forms, 0.5, seed=0)


def test_pretrain_with_given_share_trains_on_the_mixture(tmp_path, nci_file):
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.pipelines.molecule_train import FORMS_CACHE

    out = tmp_path / "mix"
    args = ["--epochs", "2", "--randomize", "2", "--given-share", "0.5", "--lr", "3e-3", "--warmup-steps", "3", *TINY]
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(out), *args])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["given_share"] == 0.5 and run["status"] == "finished"
    assert load_chem_model(out).info["training_data"]["random_forms"]["given_share"] == 0.5
    # The encoded training forms hold about half given SMILES: compare with the given ones, encoded.
    tok = load_chem_model(out).tokenizer
    blob = torch.load(out / FORMS_CACHE, weights_only=True)
    given = [line for line in nci_file.read_text().split()]
    ids, lens = tok.encode_batch(given, max_len=100)
    given_ids = {tuple(row[:n].tolist()) for row, n in zip(ids, lens.tolist())}
    for forms, lengths in zip(blob["train_tokens"], blob["train_lengths"]):
        same = sum(tuple(t[:n].tolist()) in given_ids for t, n in zip(forms, lengths.tolist()))
        assert 0.35 < same / len(forms) < 0.75, same
    # The share is part of the run: resuming with another one is a clear error, as is a share without forms.
    r = runner.invoke(app, ["pretrain-molecules", "-o", str(out), "--resume", "--randomize", "2", "--given-share", "0.2"])
    assert r.exit_code == 1 and "--given-share" in r.output
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(tmp_path / "x"), "--given-share", "0.5", *TINY])
    assert r.exit_code == 1 and "needs --randomize" in r.output
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(tmp_path / "y"), "--randomize", "2",
                            "--given-share", "1", *TINY])
    assert r.exit_code == 1 and "--given-share must be in [0, 1)" in r.output
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(tmp_path / "z"), "--keep-checkpoints", "0", *TINY])
    assert r.exit_code == 1 and "--keep-checkpoints must be at least 1" in r.output
    assert not (tmp_path / "z" / "checkpoints").exists()


def test_trainer_cycles_through_the_forms_one_per_epoch(tmp_path):
    from seqssm.models.s4_chem import S4ChemConfig, S4ChemLM

    smiles = nci_smiles(40)
    r = randomized_smiles(smiles, 2, seed=1, max_tokens=200)
    tok = SmilesTokenizer.build(smiles + [f for forms in r.forms for f in forms])
    forms = [encode_set(tok, f, 100) for f in r.forms]
    valid = encode_set(tok, smiles[:8], 100)
    model = S4ChemLM(S4ChemConfig(vocab_size=len(tok), d_model=16, n_blocks=1, d_state=4, dropout=0.0))
    cfg = MolTrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_steps=0)
    tr = MoleculeTrainer(model, forms, valid, cfg, run_dir=tmp_path, device=torch.device("cpu"),
                         save_model=lambda m, d, info: m.save_pretrained(d, tokenizer=tok, info=info), plot=False)
    seen = []
    inner = tr.forward_model
    tr.forward_model = lambda x: (seen.append(x.clone()), inner(x))[1]
    for _ in range(tr.max_steps):
        tr.train_step()
    assert tr.steps_per_epoch == 5 and len(seen) == 15
    for step, x in enumerate(seen):
        epoch, k = divmod(step, 5)
        idx = torch.from_numpy(epoch_order(40, cfg.seed, epoch))[k * 8:(k + 1) * 8]
        want = batch_tensor(forms[epoch % 2], idx, torch.device("cpu"))
        assert torch.equal(x, want[:, :-1]), step
    assert not torch.equal(forms[0].tokens, forms[1].tokens)


def test_pretrain_with_random_forms_end_to_end_and_resume(tmp_path, nci_file):
    from safetensors.torch import load_file

    from seqssm.chem.model_dir import load_chem_model

    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--epochs", "3", "--randomize", "2", "--lr", "3e-3", "--warmup-steps", "3", *TINY]
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(a), *args])
    assert r.exit_code == 0, r.output
    run = json.loads((a / "run.json").read_text())
    assert run["randomize"] == 2 and run["status"] == "finished"
    loaded = load_chem_model(a)
    forms = loaded.info["training_data"]["random_forms"]
    assert forms["per_molecule"] == 2 and forms["given_kept"] == 0
    # The vocabulary covers the random forms: every token of the given SMILES and of their forms.
    given = [line for line in nci_file.read_text().split()]
    assert {t for s in given for t in split_smiles(s)} <= set(loaded.tokenizer.tokens)

    # Interrupted and resumed: the same weights as the uninterrupted run.
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(b), "--max-steps-this-run", "11", *args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["pretrain-molecules", "-o", str(b), "--resume", "--randomize", "3", *args[4:]])
    assert r.exit_code == 1 and "--randomize" in r.output
    assert (b / "random-forms.pt").is_file()  # the encoded forms, so a resumed run need not draw them again
    r = runner.invoke(app, ["pretrain-molecules", "-o", str(b), "--resume", "--max-steps-this-run", "5", *args[:-1]])
    assert r.exit_code == 0, r.output
    assert "read the 2 random forms of each molecule back" in r.output
    (b / "random-forms.pt").write_bytes(b"damaged")  # a damaged cache is drawn again, not trusted
    r = runner.invoke(app, ["pretrain-molecules", "-o", str(b), "--resume", *args])
    assert r.exit_code == 0, r.output
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_finetune_with_random_forms_keeps_the_vocabulary(tmp_path, nci_file):
    from seqssm.chem.model_dir import load_chem_model

    base = tmp_path / "base"
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(base), "--epochs", "1", *TINY])
    assert r.exit_code == 0, r.output
    actives = tmp_path / "actives.smi"
    actives.write_text("\n".join(nci_smiles(700)[600:700]) + "\n")
    out = tmp_path / "ft"
    r = runner.invoke(app, ["finetune-molecules", str(actives), "-o", str(out), "--model", str(base), "--epochs", "2",
                            "--randomize", "4", "--batch-size", "16", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    ft = load_chem_model(out)
    assert ft.tokenizer.tokens == load_chem_model(base).tokenizer.tokens
    assert ft.info["training_data"]["random_forms"]["per_molecule"] == 4

    # A second stage on a large set, as the bundled model's recipe runs it: cosine schedule, warm-up,
    # kernel learning-rate cap and the given SMILES mixed into the forms, all from the command line.
    out2 = tmp_path / "ft2"
    r = runner.invoke(app, ["finetune-molecules", str(actives), "-o", str(out2), "--model", str(base), "--epochs", "2",
                            "--randomize", "2", "--given-share", "0.5", "--lr", "5e-4", "--ssm-lr", "5e-4",
                            "--schedule", "cosine", "--min-lr", "1e-5", "--warmup-steps", "2", "--weight-decay", "0.02",
                            "--eval-every", "3", "--keep-checkpoints", "3", "--batch-size", "16", "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    run = json.loads((out2 / "run.json").read_text())
    tc = run["train_config"]
    assert (tc["lr"], tc["ssm_lr"], tc["schedule"], tc["min_lr"], tc["warmup_steps"], tc["weight_decay"],
            tc["eval_every"], tc["keep_checkpoints"]) == (5e-4, 5e-4, "cosine", 1e-5, 2, 0.02, 3, 3)
    assert run["given_share"] == 0.5
    # --keep-checkpoints: the three newest step checkpoints survive (the default run kept one), and
    # each is a model directory that loads.
    steps = sorted(int(d.name.split("-")[1]) for d in (out2 / "checkpoints").glob("step-*"))
    assert steps == [steps[-1] - 6, steps[-1] - 3, steps[-1]] and steps[-1] >= 9, steps
    assert len(list((out / "checkpoints").glob("step-*"))) == 1
    for st in steps:
        assert load_chem_model(out2 / "checkpoints" / f"step-{st:08d}").tokenizer.tokens == ft.tokenizer.tokens


def test_an_error_in_a_worker_process_reaches_the_caller():
    from seqssm.errors import InputError

    smiles = nci_smiles(2600) * 2
    tok = SmilesTokenizer.build(smiles[:100])
    assert any(not set(split_smiles(s)) <= set(tok.tokens) for s in smiles)  # some SMILES cannot be encoded
    with pytest.raises(InputError, match="not in the vocabulary"):
        encode_set(tok, smiles, 100, n_jobs=2)


def test_split_seed_keeps_the_validation_molecules_when_the_seed_changes(tmp_path, nci_file):
    """A continuation with a new --seed (new random forms, new batch order) must be able to keep
    the earlier run's hold-out, or its validation molecules would have been trained on."""
    from seqssm.chem.model_dir import load_chem_model
    from seqssm.pipelines.molecule_train import FORMS_CACHE

    def held_out(name, *seeds):
        out = tmp_path / name
        r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(out), "--randomize", "1",
                                "--max-steps-this-run", "1", *TINY, *seeds])
        assert r.exit_code == 0, r.output
        blob = torch.load(out / FORMS_CACHE, weights_only=True)
        tok = load_chem_model(out / "checkpoints" / "step-00000001").tokenizer
        forms = tok.decode_batch(blob["valid_tokens"])
        return forms, {canonical(f) for f in forms}

    forms0, mols0 = held_out("s0")
    forms_kept, mols_kept = held_out("s1-kept", "--seed", "1", "--split-seed", "0")
    _, mols1 = held_out("s1", "--seed", "1")
    assert mols_kept == mols0 and forms_kept != forms0  # same molecules, newly drawn forms
    assert mols1 != mols0
    assert None not in mols0 and len(mols0) == len(forms0)
    r = runner.invoke(app, ["pretrain-molecules", str(nci_file), "-o", str(tmp_path / "vf"), "--valid-file", str(nci_file),
                            "--split-seed", "3", *TINY])
    assert r.exit_code == 1 and "--split-seed: there is no random hold-out to choose" in r.output
    assert not (tmp_path / "vf").exists()  # refused before anything is written


def test_make_self_mix_writes_samples_and_random_forms_of_shuffled_training_molecules(tmp_path, monkeypatch):
    """benchmarks/make_self_mix.py (the bundled model's last-stage data): the samples as written, one
    random form each of n training molecules, shuffled together; the same file whatever --n-jobs."""
    import importlib

    # imported by name, so that its worker processes can unpickle its function
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    mod = importlib.import_module("make_self_mix")
    molecules = nci_smiles(120)
    samples, train = molecules[:40], molecules[40:]
    (tmp_path / "self.csv").write_text("smiles,valid\n" + "".join(f"{s},True\n" for s in samples))
    (tmp_path / "train.smi").write_text("\n".join(train) + "\n")
    outs = []
    for jobs in (1, 2):
        out = tmp_path / f"mix{jobs}.csv"
        mod.main([str(tmp_path / "self.csv"), str(tmp_path / "train.smi"), str(out), "--n-train", "30",
                  "--n-jobs", str(jobs)])
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    lines = outs[0].splitlines()
    assert lines[0] == "smiles" and len(lines) == 1 + 40 + 30
    rows = lines[1:]
    forms = [r for r in rows if r not in set(samples)]
    assert sorted(set(rows) & set(samples)) == sorted(samples)  # every sample, in its own spelling
    assert len(forms) == 30
    train_canonical = {canonical(s) for s in train}
    assert {canonical(f) for f in forms} <= train_canonical
    assert len({canonical(f) for f in forms}) == 30  # 30 different molecules, not one drawn twice
    assert sum(f not in set(train) for f in forms) >= 20  # random spellings, mostly not the given ones
    assert rows[:40] != samples  # shuffled together
