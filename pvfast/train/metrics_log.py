"""The run's record of itself: ``metrics.jsonl`` (rank 0 appends one JSON object per line) and the plot.

Reading it back (resume, plotting) tolerates exactly one kind of damage: an unparseable *last* line, which is
what a kill or a full disk during an append leaves; it is dropped with a warning naming the file. A bad line
anywhere else means the file was edited or mixed up, and is refused naming the file and the line.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import torch

from pvfast import atomic
from pvfast.train.errors import BadInput, writing
from pvfast.train.layout import METRICS_FILE


def read_metrics_lines(path: Path) -> list[str]:
    """The lines of ``path`` that hold JSON objects, in order; [] when there is no file.

    A torn last line is dropped with a warning on stderr naming the file; a bad line elsewhere is a
    :class:`BadInput` naming file and line.
    """
    if not path.is_file():
        return []
    raw = path.read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()  # the newline that ends the last complete line
    kept = []
    for number, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as err:
            if number == len(raw):
                print(f"warning: {path}: line {number} is incomplete (a write was interrupted); dropped it",
                      file=sys.stderr, flush=True)
                break
            reason = "not UTF-8" if isinstance(err, UnicodeDecodeError) else "not a JSON object"
            raise BadInput(f"{path}:{number}: {reason}; only the last line may be incomplete (an interrupted "
                           f"write), so this file was edited or mixed up: repair or delete that line") from None
        kept.append(line.decode("utf-8"))
    return kept


class MetricsLog:
    """Rank 0 appends one JSON object per line; other ranks write nothing.

    Creating one writes nothing (a refused run leaves the folder as it was): :meth:`check` reads what an
    earlier run left, :meth:`start` then opens the log for this run.
    """

    def __init__(self, out_dir: Path, is_main: bool):
        self.path = out_dir / METRICS_FILE
        self.is_main = is_main
        self._checked: list[str] | None = None  # what check() read, so start() warns about a torn line once

    def check(self) -> list[str]:
        """The existing lines, validated (:func:`read_metrics_lines`); writes nothing."""
        if self._checked is None:
            self._checked = read_metrics_lines(self.path) if self.is_main else []
        return self._checked

    def start(self, resume_step: int | None) -> None:
        """Begin this run's log: a fresh run starts it empty; a resumed one keeps the steps up to
        ``resume_step`` (not the packing line, which the run writes again). Atomic."""
        if not self.is_main:
            return
        kept = []
        if resume_step is not None:
            for line in self.check():
                record = json.loads(line)
                if record.get("step", 0) <= resume_step and record.get("event") != "packing":
                    kept.append(line)
        with writing(self.path, "metrics log"):
            atomic.write_lines(self.path, (f"{line}\n" for line in kept))
        self._checked = None

    def write(self, record: dict) -> None:
        if self.is_main:
            with writing(self.path, "metrics log"), self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def steps(self) -> list[dict]:
        records = [json.loads(line) for line in read_metrics_lines(self.path)]
        return [r for r in records if "step" in r]


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Loss, learning rate, the objective's quality metric and throughput against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("lr", "learning rate"),
              ("reward_accuracy" if any("reward_accuracy" in r for r in records) else "logp_mean", None),
              ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(label or key)
    fig.suptitle(title)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    with writing(path, "training curves"):
        atomic.write_bytes(path, image.getvalue())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
