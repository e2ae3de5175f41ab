"""Every error type of the library (`sdarts`, `retrain`, `launcher`), which the CLIs map to exit codes
(launcher/common.py `fail_cleanly`): bad input (the `ValueError`s) is exit code 2, a numerical fault 3,
a failed checkpoint write 4.

They live in one module that imports nothing, so that an entry point can install its error handling
without importing torch (`sdarts nb201` answers from a CSV and a genotype string and needs neither
torch nor DeepSpeed, and `fail_cleanly` wraps every subcommand), and so that a module raising one never
imports another module for it.
"""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, from another space or not a checkpoint; names the path."""


class NumericalFault(RuntimeError):
    """A non-finite loss in fp32/bf16: the step is refused before any parameter moves (search and
    retrain; the CLI prints it with the step and the last good checkpoint, exit code 3)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (disk full, quota, I/O error). Not bad input: the run
    stops with one line naming the failed tag and the checkpoint `latest` still names (kept intact)."""


class RunDirError(ValueError):
    """A run directory that holds an earlier run and would be clobbered: the CLI needs --resume
    (continue it) or --force (start over). Names the directory."""


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key or path."""


class DataError(ValueError):
    """Bad or missing data; the message names the file or path."""


class GenotypeError(ValueError):
    """A genotype that does not parse or does not fit its space; the message names the culprit."""


class TableError(ValueError):
    """A NAS-Bench-201 table that is missing, unreadable or lacks a column or an architecture."""


class ExportError(ValueError):
    """Bad export input (a missing or foreign run directory, an occupied output folder); names it."""


class PlanError(ValueError):
    """A job that cannot be mapped onto the given cluster; one line saying why."""


class HostfileError(ValueError):
    """A hostfile problem; the message is one line naming the file, the line and the host."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception as one line for an `error:` message: its message's first line (at most `limit`
    characters), or its type's name when it has no message."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line[:limit] if limit else line
