"""`seqssm finetune` end to end through the CLI (CPU, tiny backbone, tasks built from phage lambda)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from seqssm.cli.main import app
from conftest import error_line
from seqssm.models import load_finetuned, load_model
from test_finetune import build_task_files, tiny_backbone

runner = CliRunner()
FAST = ["--batch-size", "32", "--lr", "3e-3", "--head-lr", "1e-2", "--dropout", "0", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, lambda_genome):
    root = tmp_path_factory.mktemp("cli-finetune")
    out = build_task_files(root, lambda_genome)
    out["backbone"] = tiny_backbone(root / "tiny")
    return out


def invoke(*args):
    return runner.invoke(app, ["finetune", *map(str, args)])


@pytest.fixture(scope="module")
def chrom_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "chrom"
    res = invoke("-o", out, "--regions", files["bed"], "--genome", files["genome"], "--split", "chrom",
                 "--valid-chroms", "chrB", "--test-chroms", "chrC", "--model", files["backbone"], "--epochs", "2",
                 "--pooling", "both", "--rc-average", *FAST)
    assert res.exit_code == 0, res.output
    return out, res


def test_regions_with_a_chromosome_split(chrom_run):
    out, res = chrom_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "binary" and m["label_names"] == ["AT", "GC"]
    assert "valid = chrB" in m["split"] and "test = chrC" in m["split"]
    assert m["test"]["auroc"] > 0.8 and len(m["history"]) == 2
    for name in ("learning_curves.png", "roc.png", "test_predictions.tsv", "config.json", "model.safetensors",
                 "tokenizer.json", "training.json"):
        assert (out / name).is_file(), name
    model, _, head, prep, info = load_finetuned(out)
    assert head.pooling == "both" and prep["rc_average"] is True and prep["input"] == "bed"
    assert info["command"].startswith("seqssm finetune")
    # the summary table
    assert "best epoch" in res.stderr and "test metrics" in res.stderr
    # the backbone serves `seqssm embed`
    lm = load_model(out)
    ref = model.backbone.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in lm.model.backbone.state_dict().items())


def test_refuses_to_overwrite_a_finished_run(chrom_run, files):
    out, _ = chrom_run
    res = invoke("-o", out, "--regions", files["bed"], "--genome", files["genome"], "--model", files["backbone"])
    assert "--force" in error_line(res)


def test_sequences_table_with_a_random_split_and_explicit_files(files, tmp_path):
    out = tmp_path / "table"
    res = invoke("-o", out, "--sequences", files["table"], "--split-fractions", "0.6,0.2,0.2", "--split-seed", "3",
                 "--model", files["backbone"], "--epochs", "1", "--freeze-backbone", "-q", *FAST)
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    n = files["n"]
    assert "seed 3" in m["split"] and sum(m["sizes"].values()) == n
    assert abs(m["sizes"]["valid"] - 0.2 * n) <= 1 and abs(m["sizes"]["test"] - 0.2 * n) <= 1

    # the same windows as separate FASTA files: train / valid / test
    lines = files["fasta"].read_text().splitlines()
    recs = [lines[i:i + 2] for i in range(0, len(lines), 2)]
    parts = {"train": recs[::3] + recs[1::3], "valid": recs[2::6], "test": recs[5::6]}
    for k, rr in parts.items():
        (tmp_path / f"{k}.fa").write_text("".join(f"{h}\n{s}\n" for h, s in rr))
    out2 = tmp_path / "explicit"
    res = invoke("-o", out2, "--train", tmp_path / "train.fa", "--valid", tmp_path / "valid.fa", "--test",
                 tmp_path / "test.fa", "--model", files["backbone"], "--epochs", "1", "-q", *FAST)
    assert res.exit_code == 0, res.output
    m = json.loads((out2 / "metrics.json").read_text())
    assert m["sizes"] == {"train": len(parts["train"]), "valid": len(parts["valid"]), "test": len(parts["test"])}
    assert m["split"].startswith("explicit files") and m["test"]["auroc"] is not None


def test_single_class_label_column(files, tmp_path):
    bed = tmp_path / "one.bed"
    bed.write_text("".join(f"chrA\t{i * 64}\t{i * 64 + 64}\tGC\n" for i in range(20)))
    line = error_line(invoke("-o", tmp_path / "o", "--regions", bed, "--genome", files["genome"],
                             "--model", files["backbone"]))
    assert "one class" in line


def test_unknown_split_chromosome(files, tmp_path):
    line = error_line(invoke("-o", tmp_path / "o", "--regions", files["bed"], "--genome", files["genome"],
                             "--split", "chrom", "--valid-chroms", "chr7", "--model", files["backbone"]))
    assert "chr7" in line and "chrA" in line


def test_length_beyond_the_model_maximum(files, tmp_path):
    line = error_line(invoke("-o", tmp_path / "o", "--regions", files["bed"], "--genome", files["genome"],
                             "--length", "300", "--model", files["backbone"]))
    assert "--length 300" in line and "maximum length 256" in line
    # resized regions past a chromosome end: an error naming the line, or skipped and counted on request
    assert "line 1" in error_line(invoke("-o", tmp_path / "q", "--regions", files["bed"], "--genome", files["genome"],
                                         "--length", "200", "--model", files["backbone"]))
    res = invoke("-o", tmp_path / "r", "--regions", files["bed"], "--genome", files["genome"], "--length", "200",
                 "--skip-out-of-bounds", "--model", files["backbone"], "--epochs", "1", "--freeze-backbone", "-q", *FAST)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert sum(m["skipped"]["all"].values()) >= 3  # the first and last windows of each chromosome
    assert sum(m["sizes"].values()) + sum(m["skipped"]["all"].values()) == files["n"]
    assert load_finetuned(tmp_path / "r")[3]["length"] == 200
    short = tiny_backbone(tmp_path / "short", max_seq_len=32)
    line = error_line(invoke("-o", tmp_path / "p", "--regions", files["bed"], "--genome", files["genome"],
                             "--model", short))
    assert "--length 32" in line


@pytest.mark.parametrize("args,words", [
    (["--split", "chrom"], "--valid-chroms"),
    (["--valid-chroms", "chrB"], "--split chrom"),
    (["--split-fractions", "0.5,0.2"], "sum"),
    (["--pooling", "max"], "--pooling"),
    (["--task", "ranking"], "--task"),
    (["--early-stop-metric", "pearson"], "not a binary metric"),
    (["--length", "0"], "--length"),
    (["--probe-epochs", "3", "--epochs", "3"], "--probe-epochs"),
    (["--probe-epochs", "1", "--freeze-backbone"], "exclude each other"),
])
def test_bad_options_are_one_line_errors(files, tmp_path, args, words):
    line = error_line(invoke("-o", tmp_path / "o", "--regions", files["bed"], "--genome", files["genome"],
                             "--model", files["backbone"], *args))
    assert words in line


def test_input_combinations(files, tmp_path):
    assert "--genome" in error_line(invoke("-o", tmp_path / "a", "--regions", files["bed"]))
    assert "no input" in error_line(invoke("-o", tmp_path / "b"))
    assert "--valid" in error_line(invoke("-o", tmp_path / "c", "--train", files["table"]))
    assert "not both" in error_line(invoke("-o", tmp_path / "d", "--sequences", files["table"],
                                           "--train", files["table"], "--valid", files["table"]))
