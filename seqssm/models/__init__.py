"""Models and their checkpoints."""

from seqssm.models.hyena import HyenaBlock, HyenaConfig, HyenaDNAForCausalLM, HyenaDNAModel
from seqssm.models.io import LoadedModel, bundled_models, count_parameters, load_model, save_model

__all__ = [
    "HyenaBlock",
    "HyenaConfig",
    "HyenaDNAForCausalLM",
    "HyenaDNAModel",
    "LoadedModel",
    "bundled_models",
    "count_parameters",
    "load_model",
    "save_model",
]
