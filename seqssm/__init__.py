"""seqssm: genomics and molecule sequence modeling with state-space and long-convolution models.

The library (tokenizers, io, ops, layers, models, training) imports without the command line;
`seqssm.cli` and `seqssm.pipelines` sit on top of it.
"""

import os as _os

from seqssm.errors import SeqssmError, InputError

# In a source checkout cli/, pipelines/ and resources/ sit beside this package (an install puts them
# inside it as seqssm.cli, ...). When the checkout's seqssm/ is the one imported (the repository
# root is the working directory, as with `python -m seqssm.cli` or torchrun from there), let the
# subpackages resolve to those folders instead of failing.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "cli")) and _os.path.isfile(_os.path.join(_root, "cli", "__init__.py")):
    __path__.append(_root)  # noqa: F821 (a package's __path__)

__version__ = "0.1.0"
__all__ = ["SeqssmError", "InputError", "__version__"]
