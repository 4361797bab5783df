"""`seqssm embed` end to end on real DNA (phage lambda), with a small random HyenaDNA saved to disk."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from seqssm.cli.main import app
from seqssm.io import count_windows
from seqssm.models import HyenaConfig, HyenaDNAForCausalLM, load_model, save_model
from seqssm.resources import example_files
from seqssm.tokenizers.dna import DNATokenizer, encode, reverse_complement

LAMBDA = example_files()["lambda"][0]
runner = CliRunner()


def lambda_seq() -> str:
    with gzip.open(LAMBDA, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    cfg = HyenaConfig(d_model=32, n_layer=2, d_inner=64, max_seq_len=2048)
    model = HyenaDNAForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("models") / "tiny"
    save_model(model, d, tokenizer=DNATokenizer(model_max_length=2048), info={"training_data": "random init (test)"})
    return d


def embed(*args, device="cpu"):
    """Run `seqssm embed`; on CPU by default, where results are exact float32."""
    return runner.invoke(app, ["embed", *map(str, args), "--quiet", "--device", device])


def write_fasta(path, records: dict[str, str], width=60):
    with open(path, "w") as f:
        for name, seq in records.items():
            f.write(f">{name}\n")
            for i in range(0, len(seq), width):
                f.write(seq[i : i + width] + "\n")
    return path


def hidden(model_dir, seq: str) -> np.ndarray:
    m = load_model(model_dir).model.eval()
    with torch.inference_mode():
        return m.backbone(torch.from_numpy(encode(seq).astype(np.int64))[None])[0].numpy()


def test_windows_coordinates_and_values(tiny_model, tmp_path):
    out = tmp_path / "lambda.parquet"
    res = embed(LAMBDA, "-o", out, "--model", tiny_model, "--window", 1000, "--stride", 500)
    assert res.exit_code == 0, res.output
    t = pq.read_table(out).to_pandas()
    L = 48502
    assert len(t) == count_windows(L, 1000, 500) == len(range(0, L - 1000, 500)) + 1
    assert (t["chrom"] == "NC_001416.1").all()
    assert list(t["start"][:3]) == [0, 500, 1000]
    assert (t["end"] - t["start"]).iloc[:-1].eq(1000).all()
    assert t["end"].iloc[-1] == L and t["start"].iloc[-1] < L
    assert (t["strand"] == "+").all()
    meta = json.loads(pq.read_schema(out).metadata[b"seqssm"])
    assert meta["window"] == 1000 and meta["stride"] == 500 and meta["dim"] == 32
    # Values: the mean of the backbone's hidden states over each window, computed independently.
    seq = lambda_seq()
    for row in (0, 7, len(t) - 1):
        s, e = int(t["start"][row]), int(t["end"][row])
        ref = hidden(tiny_model, seq[s:e]).mean(0)
        np.testing.assert_allclose(t["embedding"][row], ref, rtol=1e-5, atol=1e-6)


def test_rc_average_is_strand_symmetric(tiny_model, tmp_path):
    seq = lambda_seq()[10_000:11_500]
    rc = "".join({"A": "T", "C": "G", "G": "C", "T": "A"}[b] for b in reversed(seq))
    fa = write_fasta(tmp_path / "pair.fa", {"fwd": seq, "rev": rc})
    out = tmp_path / "pair.parquet"
    res = embed(fa, "-o", out, "--model", tiny_model, "--window", 2000, "--rc-average")
    assert res.exit_code == 0, res.output
    t = pq.read_table(out).to_pandas()
    assert list(t["chrom"]) == ["fwd", "rev"] and (t["strand"] == ".").all()
    np.testing.assert_allclose(t["embedding"][0], t["embedding"][1], rtol=1e-5, atol=1e-6)
    # ... and it is not the forward-only embedding (the test would pass vacuously otherwise).
    fwd_only = hidden(tiny_model, seq).mean(0)
    assert np.abs(t["embedding"][0] - fwd_only).max() > 1e-4


def test_per_token_output_aligned_to_forward(tiny_model, tmp_path):
    seq = lambda_seq()[:3000]
    fa = write_fasta(tmp_path / "x.fa", {"x": seq})
    out = tmp_path / "x.tokens"
    res = embed(fa, "-o", out, "--model", tiny_model, "--window", 1024, "--pool", "none", "--rc-average")
    assert res.exit_code == 0, res.output
    arr = np.load(out / "embeddings.npy", mmap_mode="r")
    idx = pq.read_table(out / "index.parquet").to_pandas()
    assert arr.dtype == np.float16 and arr.shape == (3000, 32)
    assert list(idx["offset"]) == [0, 1024, 2048] and list(idx["length"]) == [1024, 1024, 952]
    s = seq[1024:2048]
    h_f = hidden(tiny_model, s)
    h_r = hidden(tiny_model, "".join({"A": "T", "C": "G", "G": "C", "T": "A"}[b] for b in reversed(s)))
    ref = 0.5 * (h_f + h_r[::-1])
    np.testing.assert_allclose(arr[1024:2048].astype(np.float32), ref, rtol=1e-2, atol=2e-3)
    assert json.loads((out / "meta.json").read_text())["rows"] == 3000


def test_regions_with_strand(tiny_model, tmp_path):
    seq = lambda_seq()
    fa = write_fasta(tmp_path / "lambda.fa", {"lambda": seq})
    bed = tmp_path / "r.bed"
    bed.write_text("track name=test\nlambda\t100\t700\tgeneA\t0\t+\nlambda\t5000\t5900\tgeneB\t0\t-\n")
    out = tmp_path / "r.parquet"
    res = embed(fa, "-o", out, "--model", tiny_model, "--regions", bed, "--window", 1024)
    assert res.exit_code == 0, res.output
    t = pq.read_table(out).to_pandas()
    assert list(zip(t["start"], t["end"], t["strand"])) == [(100, 700, "+"), (5000, 5900, "-")]
    np.testing.assert_allclose(t["embedding"][0], hidden(tiny_model, seq[100:700]).mean(0), rtol=1e-5, atol=1e-6)
    minus = reverse_complement(encode(seq[5000:5900]))
    m = load_model(tiny_model).model
    with torch.inference_mode():
        ref = m.backbone(torch.from_numpy(minus.astype(np.int64))[None])[0].mean(0).numpy()
    np.testing.assert_allclose(t["embedding"][1], ref, rtol=1e-5, atol=1e-6)


def test_region_past_chromosome_end_is_a_clear_error(tiny_model, tmp_path):
    fa = write_fasta(tmp_path / "lambda.fa", {"lambda": lambda_seq()})
    bed = tmp_path / "bad.bed"
    bed.write_text("lambda\t100\t700\nlambda\t48000\t49000\n")
    res = embed(fa, "-o", tmp_path / "o.parquet", "--model", tiny_model, "--regions", bed)
    assert res.exit_code != 0
    assert "line 2" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.parquet").exists()


def test_resume_after_interruption_equals_one_run(tiny_model, tmp_path, monkeypatch):
    full = tmp_path / "full.parquet"
    args = ["--model", tiny_model, "--window", 512, "--batch-size", 2]  # 95 windows, chunks of 64
    assert embed(LAMBDA, "-o", full, *args).exit_code == 0

    from seqssm.pipelines import embed as embed_mod

    calls = {"n": 0}
    real_call = embed_mod.Embedder.__call__

    def dying(self, ids):
        calls["n"] += 1
        if calls["n"] > 40:  # past the first committed chunk (32 batches of 2)
            raise KeyboardInterrupt
        return real_call(self, ids)

    part = tmp_path / "cut.parquet"
    monkeypatch.setattr(embed_mod.Embedder, "__call__", dying)
    res = embed(LAMBDA, "-o", part, *args)
    assert res.exit_code == 130 and not part.exists()
    state = json.loads((tmp_path / "cut.parquet.partial" / "state.json").read_text())
    assert state["items_done"] == 64
    # Without --resume the partial run is protected.
    monkeypatch.setattr(embed_mod.Embedder, "__call__", real_call)
    res = embed(LAMBDA, "-o", part, *args)
    assert res.exit_code != 0 and "--resume" in res.output
    # Resuming with different settings is refused, and leaves the partial run intact.
    res = embed(LAMBDA, "-o", part, "--model", tiny_model, "--window", 256, "--resume")
    assert res.exit_code != 0 and "different settings" in res.output
    res = embed(LAMBDA, "-o", part, *args, "--resume")
    assert res.exit_code == 0, res.output
    a, b = pq.read_table(full).to_pandas(), pq.read_table(part).to_pandas()
    assert a[["chrom", "start", "end"]].equals(b[["chrom", "start", "end"]])
    np.testing.assert_array_equal(np.stack(a["embedding"]), np.stack(b["embedding"]))
    assert not (tmp_path / "cut.parquet.partial").exists()


def test_existing_output_not_overwritten(tiny_model, tmp_path):
    out = tmp_path / "o.parquet"
    out.write_bytes(b"precious")
    res = embed(LAMBDA, "-o", out, "--model", tiny_model)
    assert res.exit_code != 0 and "--force" in res.output
    assert out.read_bytes() == b"precious"
    assert embed(LAMBDA, "-o", out, "--model", tiny_model, "--force").exit_code == 0
    assert pq.read_table(out).num_rows == count_windows(48502, 2048, 2048)


def test_mostly_n_windows_skipped_and_counted(tiny_model, tmp_path):
    seq = lambda_seq()[:2000] + "N" * 1500 + lambda_seq()[2000:2500]
    fa = write_fasta(tmp_path / "gap.fa", {"gap": seq})
    out = tmp_path / "gap.parquet"
    res = runner.invoke(app, ["embed", str(fa), "-o", str(out), "--model", str(tiny_model), "--window", "500", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out).to_pandas()
    assert len(t) == 8 - 3  # windows 4000..? : [2000,3500) is all N: 3 windows of 500 skipped
    assert not ((t["start"] >= 2000) & (t["end"] <= 3500)).any()
    assert "skipped" in res.output


@pytest.mark.parametrize(
    "content, words",
    [
        (b"this is not a fasta file\n", ["not.fa", "line 1"]),
        (b">a\nACGT\n>a\nACGT\n", ["not.fa", "duplicate"]),
        (b">a\nACGTXACGT\n", ["not.fa", "line 2"]),
    ],
)
def test_bad_fasta_one_line_error(tiny_model, tmp_path, content, words):
    fa = tmp_path / "not.fa"
    fa.write_bytes(content)
    res = embed(fa, "-o", tmp_path / "o.parquet", "--model", tiny_model)
    assert res.exit_code == 1
    msg = res.output.strip()
    assert "Traceback" not in msg and len(msg.splitlines()) == 1, msg
    for w in words:
        assert w in msg
    assert not (tmp_path / "o.parquet").exists()


def test_window_longer_than_model(tiny_model, tmp_path):
    res = embed(LAMBDA, "-o", tmp_path / "o.parquet", "--model", tiny_model, "--window", 4096)
    assert res.exit_code == 1 and "maximum length" in res.output


def test_unknown_model_lists_bundled(tmp_path):
    res = embed(LAMBDA, "-o", tmp_path / "o.parquet", "--model", "no-such-model")
    assert res.exit_code == 1 and "no-such-model" in res.output


@pytest.mark.gpu
def test_gpu_bf16_matches_cpu_float32(tmp_path):
    """The default model on cuda (bf16 autocast) against CPU float32, per window, 1e-2 relative."""
    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = tmp_path / f"{dev}.parquet"
        res = embed(LAMBDA, "-o", outs[dev], "--rc-average", "--batch-size", 16, device=dev)
        assert res.exit_code == 0, res.output
    a = np.stack(pq.read_table(outs["cpu"])["embedding"].to_numpy(zero_copy_only=False))
    b = np.stack(pq.read_table(outs["cuda"])["embedding"].to_numpy(zero_copy_only=False))
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    assert a.shape == b.shape and rel.max() <= 1e-2, rel.max()
