"""The bundled Caduceus-PS models (pretrained on the GPU: on human chr20, and on four bacterial
genomes): each loads, its record is complete, it is reverse-complement equivariant with its trained
weights, and it has learnt DNA beyond the no-context level on a genome it never saw (phage lambda)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seqssm.io import FastaFile
from seqssm.models import load_model
from seqssm.models.caduceus import rc_token_ids
from seqssm.models.io import bundled_models
from seqssm.training.mlm import evaluate_mlm

from conftest import LAMBDA_FASTA

# name, held-out masked positions in its record, masked accuracy it must reach on lambda (no context: ~0.33)
MODELS = [("caduceus-ps-chr20", 500_000, 0.37), ("caduceus-ps-bacteria", 30_000, 0.44)]
NAMES = [m[0] for m in MODELS]


@pytest.mark.parametrize("name,min_targets,_", MODELS)
def test_bundled_record_and_architecture(name, min_targets, _):
    loaded = load_model(name)
    assert loaded.model_type == "caduceus" and "Caduceus-PS" in loaded.architecture
    info = json.loads((bundled_models()[name] / "training.json").read_text())
    held = info["heldout"]
    assert held["targets"] > min_targets and held["masked_accuracy"] > info["no_context_baseline"]["masked_accuracy"] + 0.1
    assert abs(np.exp(held["loss"]) - held["perplexity"]) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_bundled_model_is_rc_equivariant_on_real_dna(name):
    loaded = load_model(name)
    model = loaded.model.eval()
    ids = torch.from_numpy(next(FastaFile(LAMBDA_FASTA).windows(1500)).ids.astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids)
        logits_rc = model(rc_token_ids(ids, torch.tensor(model.config.complement_ids())))
    # logits of the reverse complement = the forward logits flipped in position, complemented in vocabulary
    comp = torch.tensor(model.config.complement_ids())
    want = logits.flip(1)[..., comp]
    assert ((logits_rc - want).norm() / want.norm()).item() <= 1e-5


@pytest.mark.parametrize("name,_,min_accuracy", MODELS)
def test_bundled_model_predicts_masked_bases_of_an_unseen_genome(name, _, min_accuracy):
    model = load_model(name).model.eval()
    windows = np.stack([w.ids for w in FastaFile(LAMBDA_FASTA).windows(2048)][:12])
    res = evaluate_mlm(model, windows, device=torch.device("cpu"), batch_size=4, seed=0)
    # no-context level on lambda is about 0.33; the chr20 model reaches about 0.40, the bacterial one
    # (whose genomes include E. coli, lambda's host) about 0.47
    assert res["targets"] > 3000 and res["masked_accuracy"] > min_accuracy, res
