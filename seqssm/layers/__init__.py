"""Sequence-mixing layers."""

from seqssm.layers.hyena import ExponentialModulation, HyenaFilter, HyenaOperator, PositionalEmbedding, Sin

__all__ = ["ExponentialModulation", "HyenaFilter", "HyenaOperator", "PositionalEmbedding", "Sin"]
