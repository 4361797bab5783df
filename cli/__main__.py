"""`python -m seqssm.cli ...` is the `seqssm` command; torchrun starts it as `torchrun ... -m seqssm.cli ...`."""

from seqssm.cli.main import app

app(prog_name="seqssm")
