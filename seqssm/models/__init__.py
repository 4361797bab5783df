"""Models and their checkpoints."""

from seqssm.models.hyena import HyenaBlock, HyenaConfig, HyenaDNAForCausalLM, HyenaDNAModel
from seqssm.models.heads import (
    HeadConfig,
    SequenceClassifier,
    batch_examples,
    load_finetuned,
    reverse_complement_padded,
    save_finetuned,
)
from seqssm.models.io import LoadedModel, bundled_models, count_parameters, load_model, save_model
from seqssm.models.caduceus import CaduceusConfig, CaduceusForMaskedLM, CaduceusStreamState

__all__ = [
    "CaduceusConfig",
    "CaduceusForMaskedLM",
    "CaduceusStreamState",
    "HeadConfig",
    "HyenaBlock",
    "HyenaConfig",
    "HyenaDNAForCausalLM",
    "HyenaDNAModel",
    "LoadedModel",
    "SequenceClassifier",
    "batch_examples",
    "bundled_models",
    "count_parameters",
    "load_finetuned",
    "load_model",
    "reverse_complement_padded",
    "save_finetuned",
    "save_model",
]
