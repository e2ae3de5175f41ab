"""Preemption: SIGTERM / SIGUSR1 ask a training loop to checkpoint at the next step boundary and exit.

SLURM sends SIGUSR1 90 s before the time limit (`--signal=B:USR1@90`) and SIGTERM on preemption. The
handler only sets a flag; the loop all-reduces it (so every rank stops at the same step), writes a
checkpoint on every rank and exits with `EXIT_PREEMPTED`, which the sbatch script answers with a
requeue. A second signal during the save only sets the flag again.
"""
from __future__ import annotations

import logging
import signal
from typing import Callable

#: exit code after a preemption signal was handled and the checkpoint written
EXIT_PREEMPTED = 124


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


class PreemptionSignals:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.flag = False
        self.previous = {}
        for sig in signals:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a test calling the loop from a worker)
                pass

    def _handler(self, signum, frame):
        self.flag = True

    def stop_if_asked(self, checkpoint: Callable[[], None], step: int, announce: bool) -> None:
        """At a step boundary: if any rank got a signal, every rank writes the checkpoint and the run
        exits with `EXIT_PREEMPTED` (the flag is all-reduced, so all ranks stop at the same step)."""
        from sdarts.distributed import all_agree
        if all_agree(self.flag):
            checkpoint()
            if announce:
                logging.getLogger("sdarts").warning(
                    "preemption signal: checkpoint at step %d written, exiting with %d", step, EXIT_PREEMPTED)
            raise Preempted()

    def restore(self) -> None:
        for sig, h in self.previous.items():
            signal.signal(sig, h)
