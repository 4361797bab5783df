"""`pretrain`, `pretrain-molecules` and `finetune` under torchrun: 2 CPU processes (gloo) against one.

Real data (phage lambda, the NCI SMILES RDKit ships, GC-labelled lambda windows) and tiny models
without dropout, so a run split over two processes must equal the single-process run on the same
global batch up to float summation order. Each torchrun launch costs a few seconds (two Python
processes importing torch), so every launch checks as much as it can.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.distributed import Dist, lockstep_batches
from seqssm.models import HyenaConfig, HyenaDNAForCausalLM, save_model
from seqssm.tokenizers.dna import DNATokenizer

REPO = Path(__file__).resolve().parents[1]
LAMBDA = REPO / "resources" / "data" / "lambda_virus.fa.gz"
runner = CliRunner()
RTOL = 1e-5  # losses: fp32 forward/backward, gradients summed in another order across 2 ranks
TORCH_ABORT = "terminate called without an active exception"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(*args, nproc: int = 2, script: Path | None = None, timeout: float = 240,
             retry_abort: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m seqssm.cli ARGS` (or a script) on CPU, one thread per rank.
    retry_abort=False for a test that checks how ranks end (the retry below would hide an abort)."""
    target = [str(script)] if script is not None else ["-m", "seqssm.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target,
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQSSM_DIST_TIMEOUT": "120", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    words = list(map(str, args))
    if (retry_abort and res.returncode != 0 and TORCH_ABORT in res.stderr and script is None
            and words[0] in ("pretrain", "pretrain-molecules", "finetune") and "--resume" not in words):
        # Seen once (session 12's CI, 2-core CPU, an FSDP2 run over gloo): a rank aborted in torch's C++
        # threads with no Python error at all, and the same test then passed 3 times in a row. Such a
        # training run (whose output is one folder) is repeated once from an empty folder; not a --resume
        # run, whose folder holds its start. Any other failure, or the abort twice, fails.
        warnings.warn(f"torchrun: a rank aborted ({TORCH_ABORT!r}); running the command once more")
        shutil.rmtree(words[words.index("-o") + 1], ignore_errors=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return res


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def dropout_free_hyena(path: Path, *, max_seq_len: int = 256, seed: int = 0) -> Path:
    """A tiny random HyenaDNA without dropout (with dropout, ranks draw other masks than one process)."""
    torch.manual_seed(seed)
    model = HyenaDNAForCausalLM(HyenaConfig(d_model=32, n_layer=2, max_seq_len=max_seq_len, embed_dropout=0.0))
    return save_model(model, path, tokenizer=DNATokenizer(model_max_length=max_seq_len))


# ----------------------------------------------------------------------------- helpers, no launch


def test_rows_split_the_global_batch_into_contiguous_slices():
    for n, world in ((8, 2), (29, 2), (1, 2), (10, 4), (3, 4)):
        slices = [Dist(rank=r, world_size=world).rows(n) for r in range(world)]
        covered = [i for s in slices for i in range(n)[s]]
        assert covered == list(range(n))  # in order, each row once
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1
    assert Dist(rank=1, world_size=2).rows(8) == slice(4, 8)


def test_evaluation_batches_are_dealt_round_robin():
    got = [lockstep_batches(5, Dist(rank=r, world_size=2), lockstep=False) for r in range(2)]
    assert got == [[0, 2, 4], [1, 3]]
    padded = [lockstep_batches(5, Dist(rank=r, world_size=2), lockstep=True) for r in range(2)]
    assert padded == [[0, 2, 4], [1, 3, None]]  # FSDP: the same number of forwards everywhere
    assert lockstep_batches(3, Dist(), lockstep=True) == [0, 1, 2]


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path):
    res = runner.invoke(app, ["pretrain", str(LAMBDA), "-o", str(tmp_path / "r"), "--fsdp", "--device", "cpu"])
    assert res.exit_code == 1
    assert "--fsdp shards the model across the processes of a torchrun job" in res.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- pretrain (HyenaDNA)

PRETRAIN = ["--seq-len", "256", "--batch-size", "8", "--grad-accum", "2", "--warmup-steps", "2", "--lr", "3e-3",
            "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--device", "cpu", "--no-markov-baseline",
            "-q"]


@pytest.fixture(scope="module")
def pretrain_single(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-pretrain")
    init = dropout_free_hyena(root / "init")
    out = root / "single"
    res = runner.invoke(app, ["pretrain", str(LAMBDA), "-o", str(out), "--init", str(init), *PRETRAIN])
    assert res.exit_code == 0, res.output
    return root, init, out


def assert_same_run(single: Path, other: Path) -> None:
    a, b = metrics(single), metrics(other)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]  # rank 0 alone wrote
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "val_shared_loss", "grad_norm", "tokens_seen", "val_targets"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=RTOL), (ra["step"], key)
    assert_same_weights(single, other)


def test_pretrain_ddp_cut_and_resumed_equals_single_process(pretrain_single):
    root, init, single = pretrain_single
    out = root / "ddp"
    ok(torchrun("pretrain", LAMBDA, "-o", out, "--init", init, *PRETRAIN, "--max-steps-this-run", "2"))
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step-00000002"
    blob = torch.load(out / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    assert len(blob["rng_ranks"]) == 2  # every rank's dropout RNG, for an exact resume
    res = ok(torchrun("pretrain", "-o", out, "--resume", "--device", "cpu", "--no-markov-baseline"))
    assert res.stderr.count("seqssm pretrain") == 1  # the summary table, printed by rank 0 only
    assert_same_run(single, out)
    info = json.loads((out / "training.json").read_text())
    assert info["training"]["data_parallel"] == {"world_size": 2, "backend": "gloo", "mode": "DDP",
                                                 "global_batch_size": 8, "per_rank_batch_size": 4}
    assert "data_parallel" not in json.loads((single / "training.json").read_text())["training"]


def test_pretrain_fsdp_equals_single_process_and_writes_the_same_checkpoints(pretrain_single):
    root, init, single = pretrain_single
    out = root / "fsdp"
    ok(torchrun("pretrain", LAMBDA, "-o", out, "--init", init, *PRETRAIN, "--fsdp"))
    assert_same_run(single, out)
    assert json.loads((out / "training.json").read_text())["training"]["data_parallel"]["mode"] == "FSDP2"
    # The full optimizer state, keyed by parameter index as a single process writes it: resumable anywhere.
    a = torch.load(single / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)["optimizer"]
    b = torch.load(out / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)["optimizer"]
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    assert sorted(a["state"]) == sorted(b["state"])
    for i in a["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["state"][i][key], b["state"][i][key], rtol=1e-4, atol=1e-7)


def test_batch_not_divisible_by_the_processes_is_one_error_line(tmp_path):
    res = torchrun("pretrain", LAMBDA, "-o", tmp_path / "r", "--batch-size", "5", "--seq-len", "256", "--d-model",
                   "16", "--n-layer", "1", "--device", "cpu", "--no-markov-baseline", retry_abort=False)
    assert res.returncode != 0
    msg = "--batch-size 5 is the global batch and must be divisible by the number of processes (2)"
    assert res.stderr.count(msg) == 1, res.stderr[-3000:]  # rank 0 prints it; rank 1 exits quietly
    # The first rank to finish exits with status 1 (no abort, no traceback of ours); torchrun then stops
    # the other one and adds its own report.
    assert "failed (exitcode: 1)" in res.stderr and "SIGABRT" not in res.stderr
    assert not [ln for ln in res.stderr.splitlines() if ln.strip().startswith("File ") and "seqssm" in ln]
    assert not (tmp_path / "r" / "run.json").exists()


# ----------------------------------------------------------------------------- pretrain (Caduceus, masked LM)

CADUCEUS = ["--arch", "caduceus", "--d-model", "16", "--n-layer", "2", "--seq-len", "128", "--batch-size", "8",
            "--grad-accum", "2", "--warmup-steps", "1", "--max-steps", "3", "--eval-every", "2", "--save-every", "100",
            "--valid-region", "NC_001416.1:44001-48502", "--device", "cpu", "-q"]


def test_caduceus_mlm_ddp_equals_single_process(tmp_path):
    """Masks are drawn for the global batch on every rank and each rank divides its summed masked loss by the
    global count of masked positions, so a 2-process run is the single-process run; the held-out masked
    metrics are dealt round-robin (5 batches of 8 windows: 3 / 2) and summed."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = runner.invoke(app, ["pretrain", str(LAMBDA), "-o", str(single), *CADUCEUS])
    assert res.exit_code == 0, res.output
    ok(torchrun("pretrain", LAMBDA, "-o", ddp, *CADUCEUS))
    a, b = metrics(single), metrics(ddp)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    for ra, rb in zip(a, b):
        for key in ("targets", "val_targets", "val_windows"):
            if key in ra:
                assert rb[key] == ra[key], (ra["step"], key)
        for key in ("loss", "accuracy", "grad_norm", "val_loss", "val_masked_accuracy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=RTOL), (ra["step"], key)
    assert a[-1]["val_windows"] == 36 and a[-1]["val_targets"] > 500
    assert_same_weights(single, ddp)
    ha, hb = (json.loads((d / "training.json").read_text())["heldout"] for d in (single, ddp))
    assert hb["targets"] == ha["targets"] and hb["masked_accuracy"] == pytest.approx(ha["masked_accuracy"], rel=RTOL)
    # FSDP2 drops the parameters' _no_weight_decay marks (A_log, D): the groups are chosen by name before
    # sharding, so the sharded run decays exactly the same parameters
    fsdp = tmp_path / "fsdp"
    ok(torchrun("pretrain", LAMBDA, "-o", fsdp, *CADUCEUS, "--fsdp"))
    assert_same_weights(single, fsdp)


# ----------------------------------------------------------------------------- molecules (S4 chemical LM)


def test_pretrain_molecules_ddp_equals_single_process(tmp_path):
    from rdkit import Chem, RDConfig

    smiles = []
    for line in (Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi").read_text().splitlines():
        s = line.split()[0] if line.strip() else ""
        if s and len(s) < 60 and Chem.MolFromSmiles(s) is not None:
            smiles.append(s)
        if len(smiles) == 300:
            break
    data = tmp_path / "nci.smi"
    data.write_text("\n".join(smiles) + "\n")
    # 285 training molecules in batches of 64: the last batch of each epoch (29) splits 14 / 15.
    args = ["--d-model", "32", "--n-blocks", "1", "--d-state", "8", "--dropout", "0.0", "--batch-size", "64",
            "--epochs", "2", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "5", "--device", "cpu", "-q"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = runner.invoke(app, ["pretrain-molecules", str(data), "-o", str(single), *args])
    assert res.exit_code == 0, res.output
    ok(torchrun("pretrain-molecules", data, "-o", ddp, *args))
    a, b = metrics(single), metrics(ddp)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        key = "loss" if ra["kind"] == "train" else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=RTOL)
        if ra["kind"] == "train":
            assert (rb["tokens"], rb["positions"]) == (ra["tokens"], ra["positions"])
        else:
            assert rb["val_tokens"] == ra["val_tokens"]
    assert_same_weights(single, ddp)
    assert json.loads((ddp / "run.json").read_text())["best"]["step"] == json.loads(
        (single / "run.json").read_text())["best"]["step"]


# ----------------------------------------------------------------------------- finetune (HyenaDNA classifier)


def test_finetune_ddp_equals_single_process(tmp_path, lambda_genome):
    from test_finetune import build_task_files

    files = build_task_files(tmp_path / "data", lambda_genome)
    backbone = dropout_free_hyena(tmp_path / "backbone")
    # 605 training windows in batches of 32: 19 steps, the last one (29 examples) split 14 / 15.
    args = ["--regions", files["bed"], "--genome", files["genome"], "--model", backbone, "--epochs", "1",
            "--batch-size", "32", "--lr", "3e-3", "--head-lr", "1e-2", "--dropout", "0", "--device", "cpu", "-q"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = runner.invoke(app, ["finetune", "-o", str(single), *map(str, args)])
    assert res.exit_code == 0, res.output
    ok(torchrun("finetune", "-o", ddp, *args))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    assert a["sizes"] == b["sizes"] and a["sizes"]["train"] == 605
    for key in ("train_loss", "valid_loss", "valid_auroc", "valid_accuracy"):
        assert b["history"][0][key] == pytest.approx(a["history"][0][key], rel=RTOL), key
    for split in ("valid", "test"):
        for key in ("loss", "auroc", "auprc", "mcc"):
            assert b[split][key] == pytest.approx(a[split][key], rel=RTOL, abs=1e-9), (split, key)
    assert_same_weights(single, ddp)
    pa_, pb = ((d / "test_predictions.tsv").read_text().splitlines() for d in (single, ddp))
    assert len(pa_) == len(pb) == a["sizes"]["test"] + 1
    prob = lambda rows: np.array([float(r.split("\t")[3]) for r in rows[1:]])  # noqa: E731
    np.testing.assert_allclose(prob(pb), prob(pa_), rtol=1e-4, atol=1e-6)
