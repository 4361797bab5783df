"""`seqssm pretrain` end to end on the phage lambda genome (CPU, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seqssm.cli.main import app
from conftest import error_line
from seqssm.models import load_model

LAMBDA = str(Path(__file__).resolve().parents[1] / "resources" / "data" / "lambda_virus.fa.gz")
LAMBDA_NAME = "NC_001416.1"
TINY = ["--d-model", "32", "--n-layer", "2", "--seq-len", "256", "--batch-size", "4", "--warmup-steps", "2",
        "--lr", "3e-3", "--device", "cpu"]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["pretrain", *map(str, args)])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    res = invoke(LAMBDA, "-o", out, *TINY, "--max-steps", "6", "--eval-every", "3", "--save-every", "3")
    assert res.exit_code == 0, res.output
    return out, res


def test_pretrain_writes_a_loadable_model(finished_run):
    out, res = finished_run
    loaded = load_model(out)
    assert loaded.config.d_model == 32 and loaded.config.n_layer == 2 and loaded.config.max_seq_len == 256
    with torch.no_grad():
        logits = loaded.model(torch.randint(7, 11, (1, 64)))
    assert logits.shape[:2] == (1, 64)
    info = json.loads((out / "training.json").read_text())
    assert info["training"]["steps"] == 6
    assert info["training"]["tokens_seen"] == 6 * 4 * 256
    ho = info["heldout"]
    assert 1 < ho["perplexity"] < 16 and 1 < ho["shared_perplexity"] < 16
    assert ho["shared_targets"] <= ho["targets"]
    mk = info["markov_baseline"]
    assert set(mk["perplexity_by_k"]) == {str(k) for k in range(11)}
    assert mk["positions"] == ho["shared_targets"]  # the same held-out positions
    assert "last 5%" in info["training_data"]["held_out"]
    assert info["command"].startswith("seqssm pretrain")
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 6 and kinds.count("eval") == 2
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert "held-out perplexity" in res.stderr


def test_refuses_to_overwrite_a_finished_run(finished_run):
    out, _ = finished_run
    res = invoke(LAMBDA, "-o", out, *TINY, "--max-steps", "6")
    assert res.exit_code != 0
    assert "--force" in error_line(res)


def test_resume_finished_run_is_a_no_op_then_extends(tmp_path):
    out = tmp_path / "run"
    common = [*TINY, "--max-steps", "3", "--eval-every", "100", "--save-every", "100", "--no-markov-baseline"]
    assert invoke(LAMBDA, "-o", out, *common).exit_code == 0
    res = invoke(LAMBDA, "-o", out, *common, "--resume")
    assert res.exit_code == 0 and "already finished" in res.stderr
    res = invoke("-o", out, "--resume", "--max-steps", "5", "--device", "cpu", "--no-markov-baseline")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "training.json").read_text())["training"]["steps"] == 5


def test_stop_and_resume_across_invocations(tmp_path):
    out = tmp_path / "run"
    args = [LAMBDA, "-o", out, *TINY, "--max-steps", "4", "--save-every", "100", "--eval-every", "100",
            "--no-markov-baseline"]
    res = invoke(*args, "--max-steps-this-run", "3")
    assert res.exit_code == 0, res.output
    assert "--resume" in res.stderr
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    # a plain rerun without --resume is refused
    res = invoke(*args)
    assert res.exit_code != 0 and "--resume" in error_line(res)
    # changing a setting of the run is refused
    res = invoke(*args, "--resume", "--lr", "1e-2")
    assert res.exit_code != 0 and "--lr" in error_line(res)
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "training.json").read_text())
    assert info["training"]["steps"] == 4 and len(info["commands"]) == 2
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_init_from_an_existing_model(finished_run, tmp_path):
    src, _ = finished_run
    out = tmp_path / "ft"
    res = invoke(LAMBDA, "-o", out, "--init", src, "--batch-size", "4", "--max-steps", "2", "--device", "cpu",
                 "--no-markov-baseline", "--eval-every", "100", "--save-every", "100")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "training.json").read_text())
    assert info["training"]["init"] == str(src) and info["training"]["seq_len"] == 256
    assert load_model(out).config.d_model == 32
    res = invoke(LAMBDA, "-o", tmp_path / "bad", "--init", src, "--d-model", "64", "--device", "cpu")
    assert res.exit_code != 0 and "--init" in error_line(res)
    res = invoke(LAMBDA, "-o", tmp_path / "bad", "--init", src, "--seq-len", "512", "--device", "cpu")
    assert res.exit_code != 0 and "maximum length" in error_line(res)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--valid-region", "chr1:abc-10"], "NAME:START-END"),
        (["--valid-region", f"{LAMBDA_NAME}:48000-60000"], "outside record"),
        (["--valid-region", "chrZ:1-100"], "no record named 'chrZ'"),
        (["--valid-region", LAMBDA_NAME], "no training data left"),
        (["--seq-len", "100000"], "longer than every training stretch"),
        (["--lr", "-1"], "--lr"),
    ],
)
def test_user_errors_are_one_line(tmp_path, extra, message):
    args = [LAMBDA, "-o", tmp_path / "run", "--d-model", "32", "--n-layer", "2", "--device", "cpu",
            "--max-steps", "2", "--no-markov-baseline", *extra]
    if "--seq-len" not in extra:
        args += ["--seq-len", "256"]
    res = invoke(*args)
    assert res.exit_code != 0
    assert message in error_line(res)


def test_missing_fasta_is_one_line(tmp_path):
    res = invoke(tmp_path / "nope.fa", "-o", tmp_path / "run", "--device", "cpu")
    assert res.exit_code != 0
    assert "nope.fa" in error_line(res)


def test_output_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    res = invoke(LAMBDA, "-o", tmp_path, "--force", *TINY, "--max-steps", "1")
    assert res.exit_code != 0 and "choose a new output" in error_line(res)
    assert (tmp_path / "keep.txt").read_text() == "precious"
