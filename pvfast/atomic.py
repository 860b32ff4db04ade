"""Atomic outputs: every file and folder pvfast writes appears whole or not at all.

A file is written to a hidden temporary beside its final name, flushed and fsynced, then renamed over it
(``os.replace`` is atomic within one filesystem on POSIX). A folder is built under a hidden temporary name
(``.tmp-<name>-<random>``) beside its final one and renamed into place when complete. A kill at any moment
leaves either the old output or the new one, plus possibly a hidden temporary that
:func:`remove_stale_temporaries` deletes at the next start.

    with atomic_dir(out_dir / "adapter", exists="replace") as tmp:
        model.save_pretrained(tmp)            # everything goes into tmp
    write_text(out_dir / "config.json", text) # also write_lines, write_bytes
    remove_stale_temporaries(out_dir)         # at the start of a run: what killed writes left behind
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"  # a write in progress, or one that was killed
TRASH_PREFIX = ".trash-"  # an old output being deleted (or whose deletion was killed)
EXISTS_MODES = ("replace", "keep", "refuse")


def fsync_path(path: Path) -> None:
    """fsync a file or (on POSIX) a directory, so its contents or entries survive a power loss."""
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (for files written by other libraries)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def discard(path: Path) -> None:
    """Delete a folder that is no longer (or never became) an output."""
    shutil.rmtree(path, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete an output folder: renamed out of its name first (atomic), then removed.

    A kill during the removal leaves a hidden ``.trash-*`` folder, never a half-deleted output.
    """
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    discard(trash)


@contextlib.contextmanager
def _replacing(path: str | os.PathLike, mode: str) -> Iterator:
    """An open hidden temporary beside ``path``; flushed, fsynced and renamed over ``path`` when the block ends
    cleanly, deleted otherwise."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Write ``lines`` (each ending in a newline where wanted) atomically, creating parent folders."""
    with _replacing(path, "w") as handle:
        for line in lines:
            handle.write(line)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8), creating parent folders."""
    return write_lines(path, [text])


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders."""
    with _replacing(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def publish_dir(tmp: Path, final: Path, exists: str = "replace") -> None:
    """Rename the finished folder ``tmp`` to ``final``.

    ``exists`` says what happens when ``final`` is already there: "replace" it (the old folder is moved
    aside first, so ``final`` is missing only between two renames, never half-written), "keep" it and
    discard ``tmp`` (a concurrent writer of identical content won), or "refuse" with FileExistsError.
    """
    if exists not in EXISTS_MODES:
        raise ValueError(f"exists must be one of {EXISTS_MODES}, got {exists!r}")
    fsync_path(tmp)
    if final.exists():
        if exists == "keep":
            discard(tmp)
            return
        if exists == "refuse":
            raise FileExistsError(f"{final}: exists already")
        old = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(final, old)
        os.rename(tmp, final)
        discard(old)
    else:
        try:
            os.rename(tmp, final)
        except OSError:
            if exists == "keep" and final.is_dir():  # another process published first
                discard(tmp)
                return
            raise
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, exists: str = "replace", mode: int = 0o755) -> Iterator[Path]:
    """A hidden temporary folder beside ``final``, published as ``final`` when the block ends cleanly.

    An exception (or a kill) inside the block leaves ``final`` as it was; the temporary is removed (or,
    after a kill, left for :func:`remove_stale_temporaries`). ``exists`` as in :func:`publish_dir`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        tmp.chmod(mode)  # mkdtemp makes it private
        publish_dir(tmp, final, exists)
    except BaseException:
        discard(tmp)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete hidden temporaries (``.tmp-*``, ``.trash-*``) left in ``folder`` by killed writes.

    ``names``: only temporaries of these output names (e.g. ``["adapter", "sft_merged"]``); None: all.
    Call it only where no other process is writing into ``folder``. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    prefixes = [TMP_PREFIX, TRASH_PREFIX]
    if names is not None:
        prefixes = [f"{p}{name}" for p in prefixes for name in names]
    removed = []
    for entry in folder.iterdir():
        if entry.name.startswith(tuple(prefixes)):
            if entry.is_dir():
                discard(entry)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
