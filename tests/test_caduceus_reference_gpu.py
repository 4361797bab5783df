"""seqssm's Caduceus against the reference implementation (kuleshov-group/caduceus + mamba-ssm) on a GPU.

Needs: CUDA, mamba-ssm (and causal-conv1d) importable, and the reference checkout in .ref/caduceus
(ignored by git; fetch kuleshov-group/caduceus there). Skipped otherwise. Both models carry the
same random weights (seqssm's state dict loaded into the reference with strict=True, which also
checks that the two state-dict layouts are identical); float32 logits, final hidden states and
every block input must agree within 1e-4 relative (to the largest value), on real DNA (phage
lambda, with an N run), for seqssm's CUDA backend and its torch backend.

The reference's transformers plumbing (PreTrainedModel / PretrainedConfig: init, tying) comes
from a transformers 4.x when installed, else from the stand-in of benchmarks/caduceus_bench.py.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from seqssm.tokenizers.dna import encode

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]
REF = REPO / ".ref" / "caduceus"


def _bench():
    spec = importlib.util.spec_from_file_location("_caduceus_bench", REPO / "benchmarks" / "caduceus_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not (REF / "caduceus" / "modeling_caduceus.py").is_file():
        pytest.skip(f"no reference checkout in {REF}")
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm is not installed")
    bench = _bench()
    try:
        modeling, configuration, plumbing = bench.import_reference(REF)
    except ImportError as e:
        pytest.skip(f"cannot import the reference: {e}")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield bench, modeling, configuration, plumbing
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


CONFIGS = {
    # the published Caduceus-PS layout: d_model 256, 16 layers, fused add-norm, RMSNorm
    "ps-published": ("ps", 256, 16, {}),
    # bidirectional, not RC-equivariant (Caduceus-Ph)
    "ph": ("ph", 128, 4, {}),
    # the unfused RCPS path, LayerNorm, fp32 residual
    "ps-unfused-layernorm": ("ps", 64, 3, dict(fused_add_norm=False, rms_norm=False, residual_in_fp32=True)),
    # untied directions, element-wise product
    "ph-untied-multiply": ("ph", 64, 2, dict(bidirectional_weight_tie=False, bidirectional_strategy="ew_multiply")),
}


def _inputs(lambda_genome, L=3000):
    ids = np.stack([encode(lambda_genome[s:s + L]) for s in (0, 20000)]).astype(np.int64)
    ids[1, 1000:1100] = 11  # an N run
    return torch.from_numpy(ids).cuda()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_outputs_match_the_reference(reference, lambda_genome, name, backend):
    bench, modeling, configuration, plumbing = reference
    kind, d_model, n_layer, over = CONFIGS[name]
    cfg = bench.make_config(kind, d_model, n_layer)
    cfg.update(copy.deepcopy(over))
    ours = bench.random_model(cfg, seed=len(name))
    ref = bench.build_reference(modeling, configuration, cfg, ours.state_dict(), "cuda")
    assert list(ref.state_dict()) == list(ours.state_dict())
    ours = ours.cuda().eval()
    bench.set_backend(ours, backend)
    x = _inputs(lambda_genome)
    with torch.inference_mode():
        hidden, all_hidden = ours.caduceus.backbone(x, output_hidden_states=True)
        ref_hidden, ref_all = bench.reference_hidden(ref, x, output_hidden_states=True)
        logits = ours(x)
        ref_logits = bench.reference_logits(ref, x)
    assert len(all_hidden) == len(ref_all)
    assert bench.rel(logits, ref_logits) <= 1e-4, plumbing
    assert bench.rel(hidden, ref_hidden) <= 1e-4
    for i, (a, b) in enumerate(zip(all_hidden, ref_all)):
        assert bench.rel(a, b) <= 1e-4, f"block input {i}"
    # the outputs are not trivially equal: they depend on the input
    with torch.inference_mode():
        other = ours(x.flip(1))
    assert bench.rel(other, logits) > 1e-2
