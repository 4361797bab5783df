"""Numerical kernels: each fast path sits next to the plain reference it is tested against."""

from seqssm.ops.fftconv import fftconv, fftconv_ref

__all__ = ["fftconv", "fftconv_ref"]
