"""Shared CLI plumbing: bad input becomes one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys

EXIT_BAD_INPUT = 2
#: a run stopped by a numerical fault (NaN/inf loss); the last good checkpoint is named in the message
EXIT_NUMERICAL = 3
#: a write failed (disk full, quota): the run stopped, `latest` still names the last complete checkpoint
EXIT_SAVE_FAILED = 4


def add_run_arguments(p: argparse.ArgumentParser, default_run_dir: str) -> None:
    """The options every training entry point (search, retrain) takes after its own: config overrides,
    the run directory, and what to do with one that holds a run already."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, repeatable)")
    p.add_argument("--run-dir", default=None, help=f"output directory (default {default_run_dir})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    p.add_argument("--force", action="store_true", help="discard an existing run directory")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's


def _user_errors() -> tuple[type[BaseException], ...]:
    from sdarts.errors import (CheckpointError, ConfigError, DataError, GenotypeError, HostfileError,
                               RunDirError, TableError)
    return (ConfigError, DataError, CheckpointError, GenotypeError, RunDirError, TableError, FileNotFoundError,
            HostfileError)


@contextlib.contextmanager
def fail_cleanly():
    """Turns the library's user-facing errors into `error: <one line>` and exit 2."""
    from sdarts.errors import CheckpointSaveError, NumericalFault, first_line
    try:
        yield
    except NumericalFault as e:
        print(f"error: numerical fault at {e}", file=sys.stderr)
        sys.exit(EXIT_NUMERICAL)
    except CheckpointSaveError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(EXIT_SAVE_FAILED)
    except (*_user_errors(), ValueError) as e:  # ValueError: settings the device cannot honour (precision)
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as e:  # a full disk outside checkpoints (a log line, a genotype file): one line too
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: {e.filename or 'write'}: {e.strerror}", file=sys.stderr)
        sys.exit(EXIT_SAVE_FAILED)


def setup_logging(all_ranks: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if (rank == 0 or all_ranks) else logging.WARNING
    fmt = "%(asctime)s sdarts" + (f"[{rank}]" if all_ranks else "") + " %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("sdarts").setLevel(level)
    # DeepSpeed's own INFO chatter drowns the search's lines (its logger is this one; importing deepspeed
    # here would cost every subcommand, `sdarts nb201` too, seconds and an accelerator warning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Library handlers (DeepSpeed's among them) keep the stderr of the moment they were made; an entry
    # point called again in one process (tests, notebooks) must not write to a stream closed since.
    # Plain assignment: setStream would flush the old, closed, stream first.
    loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                       if isinstance(l, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "closed", False):
                with h.lock:
                    h.stream = sys.stderr
