"""`seqssm predict` end to end: a tiny model fine-tuned on lambda GC-content regions, then predictions
on BED regions (with strand), a table and a FASTA, checked against the model computed directly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.models import batch_examples, load_finetuned
from seqssm.tokenizers.dna import encode, reverse_complement
from test_finetune import build_task_files, run, tiny_backbone

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lambda_genome):
    root = tmp_path_factory.mktemp("predict")
    files = build_task_files(root / "data", lambda_genome)
    files["backbone"] = tiny_backbone(root / "tiny")
    out = root / "model"
    run(files, out, split="chrom", valid_chroms=["chrB"], test_chroms=["chrC"], epochs=2)
    return files, out


def predict(*args):
    return runner.invoke(app, ["predict", *map(str, args), "--device", "cpu", "--quiet"])


def direct(model_dir, ids_list, rc_average=False) -> np.ndarray:
    model, *_ = load_finetuned(model_dir)
    ids, lengths = batch_examples(ids_list)
    with torch.inference_mode():
        return model.predict_proba(ids, lengths, rc_average=rc_average).numpy()


def genome_records(path) -> dict[str, str]:
    recs, name = {}, None
    for line in open(path):
        line = line.strip()
        if line.startswith(">"):
            name = line[1:]
            recs[name] = []
        elif line:
            recs[name].append(line)
    return {k: "".join(v) for k, v in recs.items()}


def test_regions_with_coordinates_strand_and_metrics(trained, tmp_path):
    files, model = trained
    out = tmp_path / "pred.tsv"
    res = runner.invoke(app, ["predict", "--model", str(model), "--regions", str(files["bed"]),
                              "--genome", str(files["genome"]), "-o", str(out), "--device", "cpu",
                              "--label-column", "4"])
    assert res.exit_code == 0, res.output
    assert "auroc" in res.output  # the BED has labels: metrics are printed
    df = pd.read_csv(out, sep="\t", dtype={"chrom": str})
    bed = pd.read_csv(files["bed"], sep="\t", header=None, names=["chrom", "start", "end", "label", "cls", "strand"])
    assert len(df) == len(bed) == files["n"]
    assert list(df.columns) == ["name", "chrom", "start", "end", "strand", "label", "prob_GC", "predicted"]
    assert (df[["chrom", "start", "end", "strand"]].values == bed[["chrom", "start", "end", "strand"]].values).all()
    assert (df["label"] == bed["label"]).all()
    assert set(df["predicted"]) <= {"AT", "GC"}
    assert (df["predicted"] == np.where(df["prob_GC"] >= 0.5, "GC", "AT")).all()
    # Values equal the model computed directly, minus-strand regions reverse-complemented.
    genome = genome_records(files["genome"])
    ids = []
    for _, r in bed.iterrows():
        x = encode(genome[r.chrom][r.start : r.end])
        ids.append(reverse_complement(x) if r.strand == "-" else x)
    assert (bed["strand"] == "-").any()
    np.testing.assert_allclose(df["prob_GC"], direct(model, ids), rtol=1e-4, atol=1e-6)
    # The model learned the task: better than chance on all regions.
    y = (df["label"] == "GC").to_numpy()
    assert ((df["prob_GC"] >= 0.5) == y).mean() > 0.7


def test_table_and_fasta_inputs_parquet(trained, tmp_path):
    files, model = trained
    a, b = tmp_path / "t.parquet", tmp_path / "f.parquet"
    assert predict("--model", model, "--sequences", files["table"], "-o", a).exit_code == 0
    res = predict("--model", model, "--sequences", files["fasta"], "-o", b)
    assert res.exit_code == 0, res.output
    ta, tb = pq.read_table(a).to_pandas(), pq.read_table(b).to_pandas()
    assert list(ta["name"][:3]) == ["w0", "w1", "w2"] and ta["chrom"].isna().all()
    np.testing.assert_allclose(ta["prob_GC"], tb["prob_GC"], rtol=1e-6)
    seqs = pd.read_csv(files["table"])["sequence"]
    np.testing.assert_allclose(ta["prob_GC"], direct(model, [encode(s) for s in seqs]), rtol=1e-4, atol=1e-6)


def test_rc_average_is_strand_symmetric(trained, tmp_path):
    files, model = trained
    seqs = pd.read_csv(files["table"])["sequence"][:20]
    rc = {"A": "T", "C": "G", "G": "C", "T": "A"}
    fwd, rev = tmp_path / "fwd.fa", tmp_path / "rev.fa"
    fwd.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    rev.write_text("".join(f">s{i}\n{''.join(rc[c] for c in reversed(s))}\n" for i, s in enumerate(seqs)))
    outs = []
    for fa in (fwd, rev):
        o = tmp_path / f"{fa.stem}.tsv"
        assert predict("--model", model, "--sequences", fa, "-o", o, "--rc-average").exit_code == 0
        outs.append(pd.read_csv(o, sep="\t")["prob_GC"].to_numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_errors_are_one_line(trained, tmp_path):
    files, model = trained
    out = tmp_path / "x.tsv"
    out.write_text("keep me")
    res = predict("--model", model, "--sequences", files["table"], "-o", out)
    assert res.exit_code == 1 and "--force" in res.output and out.read_text() == "keep me"
    res = predict("--model", files["backbone"], "--sequences", files["table"], "-o", tmp_path / "y.tsv")
    assert res.exit_code == 1 and "not a fine-tuned model" in res.output
    bad = tmp_path / "bad.bed"
    bad.write_text("chrA\t0\t64\nchrZ\t0\t64\n")
    res = predict("--model", model, "--regions", bad, "--genome", files["genome"], "-o", tmp_path / "z.tsv")
    assert res.exit_code == 1 and "line 2" in res.output and "chrZ" in res.output
    assert not (tmp_path / "z.tsv").exists()
    res = predict("--model", model, "--regions", bad, "-o", tmp_path / "z.tsv")
    assert res.exit_code == 1 and "--genome" in res.output
    for r in (res,):
        assert "Traceback" not in r.output
