"""Shared benchmark plumbing: environment record, peak-memory probes, JSON results and tables.

Every result row is saved with the device name, library versions and the git commit, because a time
means something only next to the machine that produced it. Ratios (pvfast vs naive) are computed from
rows measured side by side in one session.

Peak memory:
- CUDA: ``torch.cuda.max_memory_allocated`` above the memory held before the call.
- CPU: the process's peak resident set (``VmHWM``) above its resident set before the call, measured in a
  fresh worker process (``python -m bench.harness``) whose peak is reset through ``/proc/self/clear_refs``
  so that earlier allocations of the benchmark session do not hide the call's own peak.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: str) -> dict:
    """Device, versions and commit recorded beside every result."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "liger_kernel", "cut_cross_entropy"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed, or no __version__: leave it out
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"device": device_name(device), "device_kind": device, "versions": versions, "commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory that ``fn()`` adds on top of what the process holds before it (bytes)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    fn()
    return max(0, _rss_kib("VmHWM") - before) * 1024


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_extra_in_worker(case: dict, timeout: float = 600.0) -> int:
    """Run ``case`` once in a fresh worker process and return its peak extra memory (bytes, CPU)."""
    cmd = [sys.executable, "-m", "bench.harness", json.dumps(case)]
    # glibc keeps freed chunks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so buffers
    # freed by the warm-up call would be reused unseen by VmHWM; a fixed 64 KiB threshold makes every
    # sizeable allocation an mmap that is returned on free and counted again when the measured call makes it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker failed for {case}:\n{out.stderr[-2000:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


# ---------------------------------------------------------------------------------------------- results
def save_results(subject: str, device: str, rows: list[dict], columns: list[str]) -> Path:
    """Write ``bench/results/<subject>-<device>.json`` and a Markdown table beside it."""
    if not rows:
        return RESULTS_DIR
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = "gpu-" + re.sub(r"[^a-z0-9]+", "-", device_name("cuda").lower()).strip("-") if device == "cuda" else "cpu"
    stem = RESULTS_DIR / f"{subject}-{slug}"
    payload = {"subject": subject, "environment": environment(device), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render_table(payload, columns))
    return stem.with_suffix(".json")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_table(payload: dict, columns: list[str]) -> str:
    env = payload["environment"]
    lines = [f"# {payload['subject']}", "",
             f"device: {env['device']} · commit {env['commit']} · {env['date']}", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in payload["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # Worker: build one case's inputs, then measure the peak of one call (see peak_extra_in_worker).
    # spec["builder"] names the case builder as "module:function" (default: the op cases).
    import importlib

    spec = json.loads(sys.argv[1])
    module_name, func_name = spec.get("builder", "bench.cases:build_case").split(":")
    build_case = getattr(importlib.import_module(module_name), func_name)
    torch.set_num_threads(int(spec.get("threads", torch.get_num_threads())))
    run = build_case(spec)
    run()  # warm-up: one-time allocations (thread pools, kernels) are not the op's memory
    print(json.dumps({"peak_extra_bytes": cpu_peak_extra_bytes(run)}))
