"""The run's record of itself: ``metrics.jsonl`` (rank 0 appends one JSON object per line) and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pvfast.train.layout import METRICS_FILE


class MetricsLog:
    """Rank 0 appends one JSON object per line; other ranks write nothing."""

    def __init__(self, out_dir: Path, is_main: bool, resume_step: int | None = None):
        self.path = out_dir / METRICS_FILE
        self.is_main = is_main
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.is_file():  # drop steps the resumed run redoes
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step and record.get("event") != "packing":
                        kept.append(line)
            self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.is_main:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def steps(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
