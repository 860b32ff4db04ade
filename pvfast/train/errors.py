"""How a run ends: exit codes and the exceptions that map onto them, and SIGINT/SIGTERM handling.

Exit status: 0 done (or stopped by ``run.stop_after_steps`` with a checkpoint), 1 model cannot be loaded,
2 bad config or data (nothing was trained), 3 non-finite loss or update (the last good checkpoint is kept),
130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_MODEL = 1
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_SIGNAL_BASE = 128  # + signal number: 130 for SIGINT, 143 for SIGTERM (the shell convention)

#: Every exit status with its meaning, as ``python -m pvfast.train --help`` lists them.
EXIT_CODES = {
    EXIT_OK: "done (or stopped by run.stop_after_steps with a checkpoint)",
    EXIT_MODEL: "the model cannot be loaded",
    EXIT_BAD_INPUT: "bad config or data (nothing was trained)",
    EXIT_NON_FINITE: "non-finite loss or update (the last good checkpoint is kept)",
    EXIT_SIGNAL_BASE + signal.SIGINT: "interrupted by SIGINT (Ctrl-C) after saving a checkpoint",
    EXIT_SIGNAL_BASE + signal.SIGTERM: "interrupted by SIGTERM after saving a checkpoint",
}


class BadInput(Exception):
    """Config, template or data the run cannot use; printed as is, exit 2."""


class NonFiniteLoss(RuntimeError):
    """A micro-batch produced a NaN or infinite loss; names the step and the records (ids only)."""

    def __init__(self, step: int, record_ids: Sequence[str], value: float):
        shown = list(record_ids[:8]) + (["..."] if len(record_ids) > 8 else [])
        where = f"in the batch of records {shown}" if record_ids else "on another rank"
        super().__init__(f"non-finite loss ({value}) at optimizer step {step} {where}; "
                         f"stopping without applying it (the last good checkpoint is kept)")
        self.step = step


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at ``step``."""

    def __init__(self, signum: int, step: int, path: Path | None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.signum = signum


# Signals: set a flag, act on it between optimizer steps (a checkpoint mid-step would be inconsistent)


class _StopFlag:
    signum: int | None = None


STOP = _StopFlag()


def _on_signal(signum, frame) -> None:
    if STOP.signum is not None:  # a second signal: the user insists, stop now without a checkpoint
        raise KeyboardInterrupt
    STOP.signum = signum


@contextlib.contextmanager
def signal_handlers():
    STOP.signum = None
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
