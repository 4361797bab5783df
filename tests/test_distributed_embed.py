"""`seqssm embed` under torchrun (2 CPU processes, gloo) on phage lambda: the shards merge into the
very file a single process writes, and a run cut on one rank resumes shard by shard."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.models import HyenaConfig, HyenaDNAForCausalLM, save_model
from seqssm.tokenizers.dna import DNATokenizer
from test_distributed_training import LAMBDA, ok, torchrun

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = HyenaDNAForCausalLM(HyenaConfig(d_model=32, n_layer=2, d_inner=64, max_seq_len=2048)).eval()
    d = tmp_path_factory.mktemp("models") / "tiny"
    return save_model(model, d, tokenizer=DNATokenizer(model_max_length=2048))


def single(*args) -> None:
    res = runner.invoke(app, ["embed", *map(str, args), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_sharded_outputs_are_the_single_process_files(tiny_model, tmp_path):
    # 379 windows (stride 128) in chunks of 64: 6 chunks, 3 per rank, the last one shorter.
    args = [LAMBDA, "--model", tiny_model, "--window", 256, "--stride", 128, "--batch-size", 2]
    single(*args, "-o", tmp_path / "one.parquet")
    single(*args, "-o", tmp_path / "one.tokens", "--pool", "none", "--rc-average")
    ok(torchrun("embed", *args, "-o", tmp_path / "two.parquet", "--device", "cpu", "-q"))
    ok(torchrun("embed", *args, "-o", tmp_path / "two.tokens", "--pool", "none", "--rc-average", "--device", "cpu",
                "-q"))
    assert (tmp_path / "two.parquet").read_bytes() == (tmp_path / "one.parquet").read_bytes()
    for name in ("embeddings.npy", "index.parquet", "meta.json"):
        assert (tmp_path / "two.tokens" / name).read_bytes() == (tmp_path / "one.tokens" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "one.tokens", "two.parquet", "two.tokens"]


def test_a_run_cut_on_one_rank_resumes_per_shard(tiny_model, tmp_path):
    args = [LAMBDA, "--model", tiny_model, "--window", 256, "--stride", 128, "--batch-size", 2]
    single(*args, "-o", tmp_path / "one.parquet")
    # Rank 1 dies after its first chunk (32 batches of 2); rank 0 is stopped by torchrun.
    script = tmp_path / "cut_rank1.py"
    script.write_text(
        "import os\n"
        "from seqssm.pipelines import embed\n"
        "real, calls = embed.Embedder.__call__, [0]\n"
        "def dying(self, ids):\n"
        "    calls[0] += 1\n"
        "    if os.environ['RANK'] == '1' and calls[0] > 40:\n"
        "        raise KeyboardInterrupt\n"
        "    return real(self, ids)\n"
        "embed.Embedder.__call__ = dying\n"
        "from seqssm.cli.main import app\n"
        "app(prog_name='seqssm')\n")
    out = tmp_path / "two.parquet"
    res = torchrun("embed", *args, "-o", out, "--device", "cpu", "-q", script=script, retry_abort=False)
    assert res.returncode != 0 and not out.exists()
    state = json.loads((tmp_path / "two.parquet.part-1-of-2.partial" / "state.json").read_text())
    assert state["items_done"] == 64 and len(state["parts"]) == 1 and not state.get("complete")
    # Without --resume, or by another number of processes, the partial run is protected.
    res = runner.invoke(app, ["embed", *map(str, args), "-o", str(out), "--resume", "--device", "cpu", "-q"])
    assert res.exit_code == 1 and "by 2 processes" in res.stderr
    res = torchrun("embed", *args, "-o", out, "--device", "cpu", "-q", retry_abort=False)
    assert res.returncode != 0 and "use --resume to continue it" in res.stderr
    ok(torchrun("embed", *args, "-o", out, "--device", "cpu", "-q", "--resume"))
    assert out.read_bytes() == (tmp_path / "one.parquet").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut_rank1.py", "one.parquet", "two.parquet"]
