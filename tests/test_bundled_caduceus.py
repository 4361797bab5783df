"""The bundled Caduceus-PS (pretrained on human chr20 on the GPU): it loads, its record is complete,
it is reverse-complement equivariant with its trained weights, and it has learnt DNA beyond the
no-context level on a genome it never saw (phage lambda)."""

from __future__ import annotations

import json

import numpy as np
import torch

from seqssm.io import FastaFile
from seqssm.models import load_model
from seqssm.models.caduceus import rc_token_ids
from seqssm.models.io import bundled_models
from seqssm.training.mlm import evaluate_mlm

from conftest import LAMBDA_FASTA

NAME = "caduceus-ps-chr20"


def test_bundled_record_and_architecture():
    loaded = load_model(NAME)
    assert loaded.model_type == "caduceus" and "Caduceus-PS" in loaded.architecture
    info = json.loads((bundled_models()[NAME] / "training.json").read_text())
    held = info["heldout"]
    assert held["targets"] > 500_000 and held["masked_accuracy"] > info["no_context_baseline"]["masked_accuracy"] + 0.1
    assert abs(np.exp(held["loss"]) - held["perplexity"]) < 1e-6


def test_bundled_model_is_rc_equivariant_on_real_dna():
    loaded = load_model(NAME)
    model = loaded.model.eval()
    ids = torch.from_numpy(next(FastaFile(LAMBDA_FASTA).windows(1500)).ids.astype(np.int64))[None]
    with torch.no_grad():
        logits = model(ids)
        logits_rc = model(rc_token_ids(ids, torch.tensor(model.config.complement_ids())))
    # logits of the reverse complement = the forward logits flipped in position, complemented in vocabulary
    comp = torch.tensor(model.config.complement_ids())
    want = logits.flip(1)[..., comp]
    assert ((logits_rc - want).norm() / want.norm()).item() <= 1e-5


def test_bundled_model_predicts_masked_bases_of_an_unseen_genome():
    model = load_model(NAME).model.eval()
    windows = np.stack([w.ids for w in FastaFile(LAMBDA_FASTA).windows(2048)][:12])
    res = evaluate_mlm(model, windows, device=torch.device("cpu"), batch_size=4, seed=0)
    # no-context level on lambda is about 0.33; the chr20-trained model reaches about 0.40
    assert res["targets"] > 3000 and res["masked_accuracy"] > 0.37, res
