"""How a run ends: exit codes, the exceptions that map onto them, the one-line error, SIGINT/SIGTERM handling.

Exit status (``python -m pvfast.train --help`` lists :data:`EXIT_CODES`)::

    0    done (or stopped by run.stop_after_steps with a checkpoint)
    1    the model cannot be loaded
    2    bad config or data, or an output folder the run may not touch (nothing was trained or written)
    3    non-finite loss, gradient or weights: stopped before the update was saved; the error names the last
         finite step, whose checkpoint (if one was saved) is what --run.resume continues from
    4    a checkpoint cannot be used: every checkpoint of the run is damaged (--run.resume refuses to start
         over), or it does not fit the model (the LoRA shape or target modules changed)
    5    an output cannot be written: disk full, permission denied, read-only file system, quota
    130  interrupted by SIGINT (Ctrl-C) after saving a checkpoint; 143: by SIGTERM

Every expected failure ends with ONE line on stderr, ``error: <file>: <what happened>; <what to do>``
(:func:`failure`), never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_MODEL = 1
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_CHECKPOINT = 4
EXIT_WRITE = 5
EXIT_SIGNAL_BASE = 128  # + signal number: 130 for SIGINT, 143 for SIGTERM (the shell convention)

#: Every exit status with its meaning, as ``python -m pvfast.train --help`` lists them.
EXIT_CODES = {
    EXIT_OK: "done (or stopped by run.stop_after_steps with a checkpoint)",
    EXIT_MODEL: "the model cannot be loaded",
    EXIT_BAD_INPUT: "bad config or data, or an output folder the run may not touch (nothing was written)",
    EXIT_NON_FINITE: "non-finite loss, gradient or weights (stopped before saving it; names the last finite step)",
    EXIT_CHECKPOINT: "no usable checkpoint: all damaged (--run.resume never starts over), or it does not fit "
                     "the model",
    EXIT_WRITE: "an output cannot be written (disk full, permission denied, read-only file system)",
    EXIT_SIGNAL_BASE + signal.SIGINT: "interrupted by SIGINT (Ctrl-C) after saving a checkpoint",
    EXIT_SIGNAL_BASE + signal.SIGTERM: "interrupted by SIGTERM after saving a checkpoint",
}


class BadInput(Exception):
    """Config, template, data or an output folder the run cannot use; printed as is, exit 2."""


class NonFinite(RuntimeError):
    """Training produced a NaN or infinity; exit 3. ``step`` is the step that failed, ``step - 1`` the last
    finite one."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _last_finite(step: int) -> str:
    last = step - 1
    return (f"the last finite step is {last}, its checkpoint (if saved) is what --run.resume continues from; "
            f"lower --optim.lr or set --optim.grad_clip") if last > 0 else "no step was finite; lower --optim.lr"


class NonFiniteLoss(NonFinite):
    """A micro-batch produced a NaN or infinite loss; names the step and the records (ids only)."""

    def __init__(self, step: int, record_ids: Sequence[str], value: float):
        shown = list(record_ids[:8]) + (["..."] if len(record_ids) > 8 else [])
        where = f"in the batch of records {shown}" if record_ids else "on another rank"
        super().__init__(f"non-finite loss ({value}) at optimizer step {step} {where}; stopped without applying "
                         f"it; {_last_finite(step)}", step)


class NonFiniteUpdate(NonFinite):
    """The loss was finite but the gradients or the updated weights are not: the update is never saved."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at optimizer step {step} (the loss was finite); nothing of this step "
                         f"was saved; {_last_finite(step)}", step)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model; exit 4.

    The message starts with the file or folder at fault and says what to do."""


class WriteError(OSError):
    """An output could not be written (disk full, permission denied, ...); exit 5. Built by :func:`writing`."""


_WRITE_ADVICE = {
    errno.ENOSPC: "free some space there (or choose another --run.output_dir) and rerun with --run.resume",
    errno.EDQUOT: "free some of your quota (or choose another --run.output_dir) and rerun with --run.resume",
    errno.EACCES: "make the folder writable (or choose another --run.output_dir) and rerun with --run.resume",
    errno.EPERM: "make the folder writable (or choose another --run.output_dir) and rerun with --run.resume",
    errno.EROFS: "the file system is read-only: choose another --run.output_dir",
}


def atomic_temporary_free(path: str | os.PathLike) -> bool:
    """Whether ``path`` is not inside a hidden temporary of :mod:`pvfast.atomic` (``.tmp-*``, ``.trash-*``)."""
    return not any(part.startswith((".tmp-", ".trash-")) for part in Path(path).parts)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or its cause/context chain); libraries wrap them."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        if "No space left on device" in str(err):  # e.g. safetensors' Rust errors carry only the text
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn an OS failure while writing ``path`` into a :class:`WriteError` naming it and saying what to do.

    ``what`` describes the output ("checkpoint step-000004"); whatever was complete before stays as it was
    (every output is written atomically: :mod:`pvfast.atomic`).
    """
    try:
        yield
    except (WriteError, CheckpointError, BadInput, NonFinite):
        raise
    except Exception as err:
        cause = _os_error_in(err)
        if cause is None:
            raise
        # name the output, not the hidden temporary it was being written into
        target = cause.filename if cause.filename and atomic_temporary_free(cause.filename) else path
        advice = _WRITE_ADVICE.get(cause.errno, "check the folder and rerun with --run.resume")
        label = f" ({what})" if what else ""
        raise WriteError(cause.errno, f"{target}: cannot write{label}: {os.strerror(cause.errno)}; {advice}; "
                                      f"outputs written before are intact") from err


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: in training, after a checkpoint was saved at ``step``; elsewhere (pair mining,
    evaluation, merging) at once, with every finished output complete (``step`` None)."""

    def __init__(self, signum: int, step: int | None, path: Path | None):
        name = signal.Signals(signum).name
        if step is None:
            super().__init__(f"{name} outside a training step; finished outputs are complete, rerun with "
                             f"--run.resume to continue")
        else:
            super().__init__(f"{name} at step {step}; checkpoint {path}")
        self.signum = signum


# Signals: in the training loop, set a flag and act on it between optimizer steps (a checkpoint mid-step
# would be inconsistent); anywhere else (generation, merging) stop at once: there is nothing to save.


class _StopFlag:
    signum: int | None = None
    deferred: bool = False  # inside the training loop: the loop checks the flag between steps


STOP = _StopFlag()


def _on_signal(signum, frame) -> None:
    if STOP.signum is not None:  # a second signal: the user insists, stop now without a checkpoint
        raise KeyboardInterrupt
    STOP.signum = signum
    if not STOP.deferred:
        raise Interrupted(signum, None, None)


@contextlib.contextmanager
def signal_handlers():
    STOP.signum, STOP.deferred = None, False
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred_signals():
    """Within the block (the training loop) a signal only sets :data:`STOP`; the loop saves, then stops."""
    STOP.deferred = True
    try:
        yield
    finally:
        STOP.deferred = False


def failure(err: BaseException) -> tuple[int, str] | None:
    """``(exit status, one line)`` for an expected failure, None for anything else (a bug: keep the traceback).

    The line starts with ``error:`` (``interrupted:`` for a signal) and names the file or setting at fault.
    """
    from pvfast.model.forward import UnsupportedModelError  # lazy: this module stays import-light
    from pvfast.model.loading import ModelLoadError

    def line(text: str) -> str:
        return " ".join(str(text).split())  # one line, whatever the message held

    if isinstance(err, Interrupted):
        return EXIT_SIGNAL_BASE + err.signum, f"interrupted: {line(err)}"
    if isinstance(err, BadInput):
        return EXIT_BAD_INPUT, f"error: {err}"  # data problems are one line per problem, by design
    if isinstance(err, (ModelLoadError, UnsupportedModelError)):
        return EXIT_MODEL, f"error: {line(err)}"
    if isinstance(err, NonFinite):
        return EXIT_NON_FINITE, f"error: {line(err)}"
    if isinstance(err, CheckpointError):
        return EXIT_CHECKPOINT, f"error: {line(err)}"
    if isinstance(err, WriteError):
        return EXIT_WRITE, f"error: {line(err.strerror)}"
    cause = _os_error_in(err)
    if cause is not None:  # an OS failure outside a known write: name the file, say what to check
        target = cause.filename or "(unknown file)"
        return EXIT_WRITE, (f"error: {target}: {os.strerror(cause.errno) if cause.errno else line(cause)}; check "
                            f"the path, its permissions and free space, then rerun (with --run.resume to continue)")
    return None
