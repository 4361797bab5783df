"""Rich progress for long jobs, on stderr so stdout stays clean for pipes."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

stderr_console = Console(stderr=True)


def si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


class RateColumn(ProgressColumn):
    """Throughput in `unit`/s over the work done in this run (resumed work excluded)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.fields.get("rate")
        return Text(f"{si(speed, self.unit)}/s" if speed else f"-- {self.unit}/s", style="progress.data.speed")


class BasesProgress:
    """Progress over a known number of bases: bar, bases done, bases/s and ETA."""

    def __init__(self, total: int, description: str, *, unit: str = "bp", quiet: bool = False):
        self.total = total
        self.unit = unit
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[done]}"),
            RateColumn(unit),
            TextColumn("ETA"),
            TimeRemainingColumn(compact=True),
            console=stderr_console,
            disable=quiet,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, done="", rate=None)
        self._fresh = 0
        self._t0 = None

    def __enter__(self):
        import time

        self._t0 = time.perf_counter()
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int, *, resumed: bool = False) -> None:
        import time

        if not resumed:
            self._fresh += n
        done = self.progress.tasks[0].completed + n
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        rate = self._fresh / elapsed if elapsed > 0 and self._fresh else None
        self.progress.update(
            self.task, advance=n, done=f"{si(done, self.unit)}/{si(self.total, self.unit)}", rate=rate
        )


class JobDisplay:
    """Shared plumbing of a training job's display: a Rich progress bar on an interactive stderr,
    plain log lines otherwise (logs, pipes), nothing with quiet. Subclasses draw the bar."""

    def __init__(self, console, *, quiet: bool):
        self.console = console
        self.quiet = quiet
        self.progress = None
        self.task = None
        self.interactive = console.is_terminal and not quiet

    def start_bar(self, title: str, *, total: int, completed: int, fields: str, **initial) -> None:
        """Start the step bar: title, bar, steps done/total, the ``fields`` template (Rich task
        fields, e.g. "loss {task.fields[loss]}"), elapsed time and ETA."""
        from rich.progress import MofNCompleteColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn(fields),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(title, total=total, completed=completed, **initial)

    def log(self, msg: str) -> None:
        if not self.quiet:
            (self.progress.console if self.progress else self.console).print(msg, highlight=False, soft_wrap=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False
