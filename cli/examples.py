"""`seqssm examples`: the small real data files bundled with seqssm."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from seqssm.cli.main import app, fail
from seqssm.resources import example_files

examples_app = typer.Typer(help="Bundled example data: list the files, print a path.", no_args_is_help=True)
app.add_typer(examples_app, name="examples")


@examples_app.command("list")
def list_examples() -> None:
    """Bundled example files and what they are."""
    t = Table(title="bundled example data")
    for col in ("name", "description", "path"):
        t.add_column(col)
    for name, (path, desc) in example_files().items():
        t.add_row(name, desc, str(path))
    Console().print(t)


@examples_app.command("path")
def path(name: str = typer.Argument(..., help="Example name, see `seqssm examples list`.")) -> None:
    """Print the path of one example file (for use in shell commands)."""
    files = example_files()
    if name not in files:
        raise fail(f"no bundled example named {name!r}; available: {', '.join(files)}")
    typer.echo(str(files[name][0]))
