"""Named fault points: a test (or a user reproducing a crash) makes the trainer fail at an exact moment.

The trainer calls :func:`fault_point` at the moments worth testing; it does nothing unless the environment
variable ``PVFAST_FAULT`` names that point::

    PVFAST_FAULT="<point>[@<n>]:<action>[,<point>[@<n>]:<action> ...]"

    PVFAST_FAULT="checkpoint.write@2:kill"      SIGKILL this process the 2nd time a checkpoint is half-written
    PVFAST_FAULT="sft.step@3:kill"              SIGKILL inside SFT step 3 (after its backward, before the update)
    PVFAST_FAULT="checkpoint.write:enospc"      the first checkpoint write fails with "No space left on device"

``n`` counts the calls of that point in this process (default 1). Actions: ``kill`` (SIGKILL: no handler,
no cleanup, as the OOM killer or a lost node does), ``enospc`` / ``eacces`` (an OSError as a full disk or a
permission problem raises it, naming the file being written). The points:

    <stage>.step        sft.step, po.step: after a micro-batch's backward, before the optimizer update
    checkpoint.write    between the checkpoint's files and its COMPLETE manifest (inside the temporary folder)
    adapter.write       between the final adapter's weights and its tokenizer files (inside the temporary)
    merge.write         between the merged model's weights and its tokenizer (sft_merged/, merged/)
    pairs.generate      after the SFT model's validation predictions, before any pair file is written

Reading the variable costs a dictionary lookup per call; the points sit outside the per-token hot path.
"""

from __future__ import annotations

import errno
import os
import signal
from collections import Counter
from pathlib import Path

ENV_VAR = "PVFAST_FAULT"
ACTIONS = ("kill", "enospc", "eacces")

_calls: Counter[str] = Counter()


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, action = item.rpartition(":")
        name, _, count = where.partition("@")
        if not name or action not in ACTIONS or (count and not count.isdigit()):
            raise ValueError(f"{ENV_VAR}={spec!r}: expected <point>[@<n>]:<action> with action in {ACTIONS}")
        plan[name] = (int(count or 1), action)
    return plan


def fault_point(name: str, path: str | os.PathLike | None = None) -> None:
    """Fail here if ``PVFAST_FAULT`` asks for it (module docstring); ``path``: the file being written."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    plan = _parse(spec)
    if name not in plan:
        return
    _calls[name] += 1
    count, action = plan[name]
    if _calls[name] != count:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = errno.ENOSPC if action == "enospc" else errno.EACCES
    raise OSError(code, os.strerror(code), str(Path(path)) if path is not None else None)
