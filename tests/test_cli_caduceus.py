"""Caduceus through the commands, on phage lambda (CPU, tiny models):

* `seqssm pretrain --arch caduceus`: masked-LM training, training.json's held-out metrics equal an
  independent evaluate_mlm of the final model, a run cut in two equals an uninterrupted one, --init;
* `seqssm models info` shows the masked accuracy;
* `seqssm embed` with Caduceus directories (seqssm and HuggingFace format): Caduceus-PS embeds a
  sequence and its reverse complement alike by construction;
* `seqssm embed --stream` with a causal Mamba: every window equals one pass over the whole record
  prefix, resume continues the carried state exactly, bidirectional models are refused.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import error_line
from seqssm.cli.main import app
from seqssm.models import load_model, save_model
from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM, pretraining_inputs
from seqssm.tokenizers.dna import DNATokenizer, encode
from seqssm.training.data import load_split, validation_windows
from seqssm.training.mlm import evaluate_mlm

REPO = Path(__file__).resolve().parents[1]
LAMBDA = REPO / "resources" / "data" / "lambda_virus.fa.gz"
LAMBDA_NAME = "NC_001416.1"
VALID = f"{LAMBDA_NAME}:40001-48502"  # 8.5 kbp held out: ~1,300 masked bases per evaluation
TINY = ["--arch", "caduceus", "--d-model", "32", "--n-layer", "2", "--seq-len", "256", "--batch-size", "8",
        "--valid-region", VALID, "--device", "cpu"]
COMP = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def revcomp(seq: str) -> str:
    return "".join(COMP[b] for b in reversed(seq))


def write_fasta(path: Path, records: dict[str, str], width: int = 60) -> Path:
    with open(path, "w") as f:
        for name, seq in records.items():
            f.write(f">{name}\n" + "".join(seq[i:i + width] + "\n" for i in range(0, len(seq), width)))
    return path


def perturbed(cfg: CaduceusConfig, seed: int) -> CaduceusForMaskedLM:
    """A model with every parameter moved off its initial value (no check may pass thanks to an init)."""
    torch.manual_seed(seed)
    model = CaduceusForMaskedLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def pooled(path: Path) -> np.ndarray:
    return np.stack(pq.read_table(path)["embedding"].to_numpy(zero_copy_only=False))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------- pretrain


@pytest.fixture(scope="module")
def ps_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cad") / "run"
    res = invoke("pretrain", LAMBDA, "-o", out, *TINY, "--max-steps", 6, "--eval-every", 3, "--save-every", 3)
    assert res.exit_code == 0, res.output
    return out, res


def test_pretrain_caduceus_records_the_masked_metrics_of_the_final_model(ps_run):
    out, res = ps_run
    loaded = load_model(out)
    assert loaded.model_type == "caduceus" and loaded.strand_invariant and loaded.max_length == 256
    info = json.loads((out / "training.json").read_text())
    assert info["task"] == "masked language model (Caduceus-PS), seqssm pretrain"
    assert info["training"]["rc_augmentation"] is False  # PS is RC-equivariant by construction
    assert info["training"]["lr"] == 8e-3 and info["train_config"]["warmup_steps"] == 1  # 10% of 6 steps
    assert info["train_config"]["adam_betas"] == [0.9, 0.95]
    for key in ("task", "training_data", "heldout", "training", "train_config", "split", "date", "command",
                "seqssm_version"):
        assert key in info, key
    ho = info["heldout"]
    # The recorded numbers are evaluate_mlm's on the held-out windows, recomputed here independently.
    split = load_split([LAMBDA], seq_len=256, valid_regions=[VALID])
    ref = evaluate_mlm(loaded.model, validation_windows(split.valid, 256), batch_size=8, seed=0)
    assert set(ho) == set(ref)
    assert ho["targets"] == ref["targets"] > 1000
    assert ho["masked_accuracy"] == pytest.approx(ref["masked_accuracy"], abs=1e-12)
    assert ho["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert 0 < ho["masked_accuracy"] < 1 and ho["perplexity"] > 1
    assert 0.25 < info["no_context_baseline"]["masked_accuracy"] < 0.4
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 6 and all(0 <= r["accuracy"] <= 1 and r["targets"] > 0 for r in train)
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [3, 6]
    assert not (out / "markov_baseline.json").exists()
    assert (out / "curves.png").stat().st_size > 1000
    assert "held-out masked accuracy" in res.stderr


def test_models_info_shows_the_masked_accuracy(ps_run):
    out, _ = ps_run
    ho = json.loads((out / "training.json").read_text())["heldout"]
    res = runner.invoke(app, ["models", "info", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "Caduceus-PS" in res.output
    assert f"held-out masked accuracy │ {ho['masked_accuracy']:.4f}" in res.output
    assert f"{ho['perplexity']:.4f} (masked positions)" in res.output
    assert "no: bidirectional" in res.output  # embed --stream


def test_cut_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # Caduceus-Ph: masks and reverse-complement flips are both drawn per step
    args = [*TINY, "--no-rcps", "--max-steps", 4, "--eval-every", 2, "--save-every", 100]
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("pretrain", LAMBDA, "-o", one, *args).exit_code == 0
    res = invoke("pretrain", LAMBDA, "-o", two, *args, "--max-steps-this-run", 3)
    assert res.exit_code == 0 and not (two / "training.json").exists()
    res = invoke("pretrain", "-o", two, "--resume", "--device", "cpu")
    assert res.exit_code == 0, res.output
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = ((d / "metrics.jsonl").read_text().splitlines() for d in (one, two))
    drop = ("tokens_per_s", "step_seconds", "eval_seconds")
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]  # noqa: E731
    assert strip(ma) == strip(mb)
    info = json.loads((two / "training.json").read_text())
    assert info["training"]["rc_augmentation"] is True and "Caduceus-Ph" in info["task"]
    assert load_model(two).architecture.startswith("Caduceus-Ph")


def test_init_from_a_caduceus_directory_implies_the_architecture(ps_run, tmp_path):
    src, _ = ps_run
    out = tmp_path / "cont"
    res = invoke("pretrain", LAMBDA, "-o", out, "--init", src, "--batch-size", 4, "--max-steps", 2,
                 "--eval-every", 100, "--device", "cpu", "-q")
    assert res.exit_code == 0, res.output
    info = json.loads((out / "training.json").read_text())
    assert info["task"].startswith("masked language model") and info["training"]["init"] == str(src)
    assert info["training"]["seq_len"] == 256 and load_model(out).config.rcps
    res = invoke("pretrain", LAMBDA, "-o", tmp_path / "bad", "--init", src, "--no-rcps", "--device", "cpu")
    assert "--no-rcps (the --init model has --rcps)" in error_line(res)


@pytest.mark.parametrize("extra, message", [
    (["--rcps"], "--rcps is a Caduceus option"),
    (["--arch", "caduceus", "--d-inner", "64"], "--d-inner is a HyenaDNA option"),
    (["--arch", "mamba", "--rcps"], "cannot be RC-equivariant"),
    (["--arch", "transformer"], "--arch 'transformer': choose hyena, caduceus, mamba"),
])
def test_architecture_errors_are_one_line(tmp_path, extra, message):
    res = invoke("pretrain", LAMBDA, "-o", tmp_path / "r", "--device", "cpu", *extra)
    assert message in error_line(res)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cad-models")
    tok = DNATokenizer(model_max_length=1024)
    small = dict(d_state=8)
    out = {}
    for name, kw in (("ps", dict(rcps=True)), ("ph", dict(rcps=False)), ("causal", dict(rcps=False, bidirectional=False))):
        out[name] = save_model(perturbed(CaduceusConfig.dna(32, 2, **kw, **small), seed=len(out)), root / name,
                               tokenizer=tok)
    hf = perturbed(CaduceusConfig.dna(32, 2, rcps=True, **small), seed=5)
    out["hf"] = hf.save_pretrained(root / "hf")  # config.json + model.safetensors only, as on the Hub
    return out


@pytest.fixture(scope="module")
def genome() -> str:
    with gzip.open(LAMBDA, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">"))


def embed(*args):
    return invoke("embed", *args, "--device", "cpu", "--quiet")


def test_ps_embeds_a_sequence_and_its_reverse_complement_alike(models, genome, tmp_path):
    seq = genome[10_000:12_000]
    fa = write_fasta(tmp_path / "pair.fa", {"fwd": seq, "rev": revcomp(seq)})
    for name in ("ps", "ph"):
        res = embed(fa, "-o", tmp_path / f"{name}.tokens", "--model", models[name], "--window", 2000, "--pool", "none")
        assert res.exit_code == 0, res.output
        res = embed(fa, "-o", tmp_path / f"{name}.parquet", "--model", models[name], "--window", 2000)
        assert res.exit_code == 0, res.output
    tok = np.load(tmp_path / "ps.tokens" / "embeddings.npy").astype(np.float32)
    assert tok.shape == (4000, 32)
    # per position: embed(rc(x)) is embed(x) reversed, without --rc-average (float16 output)
    np.testing.assert_allclose(tok[2000:][::-1], tok[:2000], rtol=2e-3, atol=2e-3)
    emb = pooled(tmp_path / "ps.parquet")
    assert rel(emb[1], emb[0]) < 1e-5
    # ... and the values are the model's (independent computation), not a degenerate constant
    m = load_model(models["ps"]).model
    with torch.no_grad():
        ref = m.embed(torch.from_numpy(encode(seq).astype(np.int64))[None])[0].mean(0).numpy()
    assert rel(emb[0], ref) < 1e-5
    # Caduceus-Ph is not RC-equivariant: its two strands differ unless --rc-average conjoins them
    ph = pooled(tmp_path / "ph.parquet")
    assert rel(ph[1], ph[0]) > 1e-2
    res = embed(fa, "-o", tmp_path / "ph-rc.parquet", "--model", models["ph"], "--window", 2000, "--rc-average")
    assert res.exit_code == 0, res.output
    ph_rc = pooled(tmp_path / "ph-rc.parquet")
    assert rel(ph_rc[1], ph_rc[0]) < 1e-5


def test_ps_rc_average_is_a_no_op_and_says_so(models, genome, tmp_path):
    fa = write_fasta(tmp_path / "x.fa", {"x": genome[:3000]})
    assert embed(fa, "-o", tmp_path / "a.parquet", "--model", models["ps"]).exit_code == 0
    res = invoke("embed", fa, "-o", tmp_path / "b.parquet", "--model", models["ps"], "--rc-average", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "strand-invariant by construction" in res.stderr
    np.testing.assert_array_equal(pooled(tmp_path / "a.parquet"), pooled(tmp_path / "b.parquet"))
    t = pq.read_table(tmp_path / "a.parquet")
    assert json.loads(t.schema.metadata[b"seqssm"])["strand_invariant"] is True
    assert set(pq.read_table(tmp_path / "b.parquet")["strand"].to_pylist()) == {"."}


def test_hf_directory_embeds_with_n_as_pad_in_its_training_window(models, genome, tmp_path):
    seq = genome[5_000:5_600] + "N" * 50 + genome[9_000:9_350]  # 1,000 bp with an N gap
    fa = write_fasta(tmp_path / "gap.fa", {"gap": seq})
    out = tmp_path / "gap.parquet"
    res = embed(fa, "-o", out, "--model", models["hf"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out)
    meta = json.loads(t.schema.metadata[b"seqssm"])
    assert meta["window"] == 131072 and t.num_rows == 1  # default window: the published training length
    m = CaduceusForMaskedLM.from_pretrained(models["hf"])
    ids = torch.from_numpy(encode(seq).astype(np.int64))[None]
    with torch.no_grad():
        as_pad = m.embed(pretraining_inputs(ids))[0].mean(0).numpy()
        as_n = m.embed(ids)[0].mean(0).numpy()
    emb = pooled(out)[0]
    assert rel(emb, as_pad) < 1e-5 and rel(emb, as_n) > 1e-3


# ----------------------------------------------------------------------------- embed --stream


@pytest.fixture(scope="module")
def stream_fasta(genome, tmp_path_factory):
    """Two records; the second has a 300-bp N run, so two 128-bp windows are skipped by the N filter."""
    rec2 = genome[20_000:21_000] + "N" * 300 + genome[21_300:22_300]
    return write_fasta(tmp_path_factory.mktemp("stream") / "two.fa", {"a": genome[:6_000], "b": rec2}), \
        {"a": genome[:6_000], "b": rec2}


def test_stream_windows_equal_one_pass_over_the_whole_prefix(models, stream_fasta, tmp_path):
    fa, records = stream_fasta
    args = ["--model", models["causal"], "--window", 128, "--stream"]
    assert embed(fa, "-o", tmp_path / "s.parquet", *args).exit_code == 0
    res = embed(fa, "-o", tmp_path / "s.tokens", *args, "--pool", "none")
    assert res.exit_code == 0, res.output
    assert embed(fa, "-o", tmp_path / "w.parquet", "--model", models["causal"], "--window", 128).exit_code == 0
    t = pq.read_table(tmp_path / "s.parquet").to_pandas()
    emb, windowed = pooled(tmp_path / "s.parquet"), pooled(tmp_path / "w.parquet")
    idx = pq.read_table(tmp_path / "s.tokens" / "index.parquet").to_pandas()
    tok = np.load(tmp_path / "s.tokens" / "embeddings.npy")
    m = load_model(models["causal"]).model
    n_rows = 0
    for chrom, seq in records.items():
        with torch.no_grad():  # one pass over the whole record: every window's full left context
            full = m.embed(torch.from_numpy(encode(seq).astype(np.int64))[None])[0].numpy()
        rows = np.flatnonzero(t["chrom"] == chrom)
        starts = list(t["start"][rows])
        assert starts == [s for s in range(0, len(seq), 128) if not (1000 <= s and s + 128 <= 1300 and chrom == "b")]
        for r in rows:
            s, e = int(t["start"][r]), int(t["end"][r])
            assert rel(emb[r], full[s:e].mean(0)) <= 1e-5, (chrom, s)
            np.testing.assert_allclose(tok[idx["offset"][r]:idx["offset"][r] + idx["length"][r]].astype(np.float32),
                                       full[s:e], rtol=2e-3, atol=2e-3)
        n_rows += len(rows)
        # without the carried state the windows after the first differ: the test is not vacuous
        assert rel(windowed[rows[0]], emb[rows[0]]) <= 1e-5 and rel(windowed[rows[-1]], emb[rows[-1]]) > 1e-3
    assert n_rows == len(t) == 47 + 16  # record b: 18 windows, two of them all N (skipped, but streamed through)
    assert json.loads(pq.read_schema(tmp_path / "s.parquet").metadata[b"seqssm"])["stream"]


def test_stream_resume_continues_the_saved_state(models, stream_fasta, tmp_path, monkeypatch):
    from seqssm.pipelines import embed as embed_mod

    fa, _ = stream_fasta
    args = ["--model", models["causal"], "--window", 64, "--stream", "--batch-size", 2]  # chunks of 64 windows
    assert embed(fa, "-o", tmp_path / "full.parquet", *args).exit_code == 0
    real, calls = embed_mod.StreamWalker.__call__, [0]

    def dying(self, it):
        calls[0] += 1
        if calls[0] > 70:  # in the second chunk, within record a (94 windows)
            raise KeyboardInterrupt
        return real(self, it)

    monkeypatch.setattr(embed_mod.StreamWalker, "__call__", dying)
    res = embed(fa, "-o", tmp_path / "cut.parquet", *args)
    assert res.exit_code == 130
    part = tmp_path / "cut.parquet.partial"
    state = json.loads((part / "state.json").read_text())
    assert state["items_done"] == 64 and state["stream"]["chrom"] == "a" and state["stream"]["position"] == 64 * 64
    assert (part / state["stream"]["file"]).is_file()
    monkeypatch.setattr(embed_mod.StreamWalker, "__call__", real)
    res = embed(fa, "-o", tmp_path / "cut.parquet", *args, "--resume")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(pooled(tmp_path / "cut.parquet"), pooled(tmp_path / "full.parquet"))
    assert not part.exists()


@pytest.mark.parametrize("model, extra, message", [
    ("ps", [], "is bidirectional (Caduceus-PS)"),
    ("ph", [], "use overlapping windows"),
    ("causal", ["--stride", "64"], "--stride must equal --window"),
    ("causal", ["--rc-average"], "--rc-average"),
    ("causal", ["--regions", LAMBDA], "--regions"),
])
def test_stream_refusals_are_one_line(models, tmp_path, model, extra, message):
    res = invoke("embed", LAMBDA, "-o", tmp_path / "o.parquet", "--model", models[model], "--window", 128,
                 "--stream", "--device", "cpu", *extra)
    assert message in error_line(res)
    assert not (tmp_path / "o.parquet").exists()


def test_hyenadna_cannot_stream(tmp_path):
    res = invoke("embed", LAMBDA, "-o", tmp_path / "o.parquet", "--stream", "--device", "cpu")
    assert "HyenaDNA, which has no recurrent mode" in error_line(res)
