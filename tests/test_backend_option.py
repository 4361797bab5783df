"""`--backend auto|torch|cuda|triton` of the commands that run Mamba / Caduceus models (CPU).

What cannot work on the machine is a one-line error before any work (no output written); the value
reaches every Mamba mixer of the model; "torch" gives the results of the default on CPU; "triton" is
refused for training and, in the library, off a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from conftest import error_line
from seqssm.cli.main import app
from seqssm.errors import SeqssmError
from seqssm.layers.mamba import Mamba, configure_backend
from seqssm.models import load_model
from seqssm.ops.selective_scan import scan_backend, selective_scan

REPO = Path(__file__).resolve().parents[1]
LAMBDA = REPO / "resources" / "data" / "lambda_virus.fa.gz"
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def test_configure_backend_reaches_every_mamba_mixer():
    cad = load_model("caduceus-ps-chr20").model
    # 8 layers x (forward + reverse Mamba) in the one RC-shared submodule of each layer
    assert configure_backend(cad, "torch", torch.device("cpu"), training=True) == 16
    assert {m.backend for m in cad.modules() if isinstance(m, Mamba)} == {"torch"}
    assert configure_backend(load_model("hyenadna-small-chr20").model, "torch", "cpu", training=False) == 0


@pytest.mark.parametrize("backend,training,message", [
    ("bogus", False, "--backend 'bogus': expected one of auto, torch, cuda, triton"),
    ("triton", True, "(triton is for inference: embed, predict)"),
    ("cuda", False, "--backend cuda needs a CUDA device (--device cuda), not cpu"),
    ("triton", False, "--backend triton needs a CUDA device (--device cuda), not cpu"),
])
def test_configure_backend_refuses_what_cannot_work(backend, training, message):
    with pytest.raises(SeqssmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        configure_backend(load_model("caduceus-ps-chr20").model, backend, "cpu", training=training)


def test_embed_backend_torch_equals_the_default_and_bad_values_are_one_line_errors(tmp_path):
    common = ["--model", "caduceus-ps-chr20", "--window", "2048", "--device", "cpu", "-q"]
    assert invoke("embed", LAMBDA, "-o", tmp_path / "auto.parquet", *common).exit_code == 0
    res = invoke("embed", LAMBDA, "-o", tmp_path / "torch.parquet", *common, "--backend", "torch")
    assert res.exit_code == 0, res.output
    a, b = (pq.read_table(tmp_path / f"{n}.parquet") for n in ("auto", "torch"))
    assert a.num_rows == b.num_rows > 20
    np.testing.assert_array_equal(np.stack(a["embedding"].to_numpy(zero_copy_only=False)),
                                  np.stack(b["embedding"].to_numpy(zero_copy_only=False)))
    for value in ("cuda", "triton"):
        out = tmp_path / f"{value}.parquet"
        line = error_line(invoke("embed", LAMBDA, "-o", out, *common, "--backend", value))
        assert f"--backend {value} needs a CUDA device" in line and not out.exists()


def test_training_commands_refuse_triton_before_any_work(tmp_path):
    out = tmp_path / "run"
    line = error_line(invoke("pretrain", LAMBDA, "-o", out, "--arch", "caduceus", "--d-model", "16", "--n-layer", "1",
                             "--seq-len", "128", "-b", "4", "--max-steps", "1", "--device", "cpu", "-q",
                             "--backend", "triton"))
    assert "triton is for inference" in line and not out.exists()
    line = error_line(invoke("finetune", "-o", out, "--sequences", REPO / "resources" / "data" / "missing.csv",
                             "--device", "cpu", "-q", "--backend", "cuda"))
    assert "--backend cuda needs a CUDA device" in line and not out.exists()


def test_library_triton_backend_off_a_gpu_is_a_clear_error():
    assert scan_backend("triton", torch.zeros(1)) == "triton"
    u = torch.randn(1, 4, 8)
    args = (u, torch.rand(1, 4, 8), -torch.rand(4, 16), torch.randn(1, 16, 8), torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match="backend 'triton' needs tensors on a CUDA device"):
        selective_scan(*args, backend="triton")
    m = Mamba(8, backend="triton")
    with torch.no_grad(), pytest.raises(ValueError, match="backend 'triton'"):
        m(torch.randn(1, 10, 8))
