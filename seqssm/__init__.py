"""seqssm: genomics and molecule sequence modeling with state-space and long-convolution models.

The library (tokenizers, io, ops, layers, models, training) imports without the command line;
`seqssm.cli` and `seqssm.pipelines` sit on top of it.
"""

from seqssm.errors import SeqssmError, InputError

__version__ = "0.1.0"
__all__ = ["SeqssmError", "InputError", "__version__"]
