"""Entry point of the `seqssm` console script.

User errors (seqssm.errors.SeqssmError) are printed as one red line on stderr with exit code 1;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from seqssm.errors import SeqssmError

stderr = Console(stderr=True)

app = typer.Typer(
    name="seqssm",
    help="Genomics and molecule sequence modeling with state-space and long-convolution models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print a one-line error and return the Exit to raise."""
    stderr.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def run_guarded(fn, *args, **kwargs):
    """Call a pipeline; turn user errors into one line on stderr and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except SeqssmError as e:
        if not getattr(e, "echo", True):  # under torchrun: the same error, printed once by rank 0
            raise typer.Exit(1) from None
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/]: partial work is kept; run again with --resume to continue")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        sys.stderr.close()
        raise typer.Exit(141) from None


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from seqssm import __version__

        typer.echo(f"seqssm {__version__}")
        raise typer.Exit()


# Commands live one per module and register themselves on `app`.
from seqssm.cli import embed as _embed  # noqa: E402,F401
from seqssm.cli import examples as _examples  # noqa: E402,F401
from seqssm.cli import models as _models  # noqa: E402,F401
from seqssm.cli import pretrain as _pretrain  # noqa: E402,F401
from seqssm.cli import finetune as _finetune  # noqa: E402,F401
from seqssm.cli import predict as _predict  # noqa: E402,F401
from seqssm.cli import molecules as _molecules  # noqa: E402,F401
