"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class SeqssmError(Exception):
    """Base class of every error that is the user's to fix (bad input, bad option, missing file).

    Anything else escaping to the CLI is a bug and keeps its traceback.
    """


class InputError(SeqssmError):
    """A malformed input file. The message names the file and, where known, the record and line."""

    def __init__(self, path, message: str, *, record: str | None = None, line: int | None = None):
        self.path = str(path)
        self.record = record
        self.line = line
        where = [self.path]
        if record is not None:
            where.append(f"record '{record}'")
        if line is not None:
            where.append(f"line {line}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.reason = message

    def __reduce__(self):
        # Picklable with its keyword arguments, so an error raised in a worker process reaches the caller.
        return _rebuild_input_error, (self.path, self.reason, self.record, self.line)


def _rebuild_input_error(path, message, record, line) -> InputError:
    return InputError(path, message, record=record, line=line)


def file_error(path, exc: OSError, what: str) -> InputError:
    """The one-line error for a file that cannot be opened; `what` names the expected kind ("a FASTA file")."""
    if isinstance(exc, FileNotFoundError):
        return InputError(path, "file not found")
    if isinstance(exc, IsADirectoryError):
        return InputError(path, f"is a directory, not {what}")
    if isinstance(exc, PermissionError):
        return InputError(path, "cannot read the file: permission denied")
    return InputError(path, f"cannot read the file: {exc.strerror or exc}")
