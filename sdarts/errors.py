"""The run-stopping errors that the CLIs map to exit codes (launcher/common.py `fail_cleanly`).

They live apart from `sdarts.engine` so that an entry point can install its error handling without
importing torch: `sdarts nb201` answers from a CSV and a genotype string and needs neither torch nor
DeepSpeed, and `fail_cleanly` wraps every subcommand.
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
