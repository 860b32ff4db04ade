"""One prepared GPU pass: the gpu-marked tests and the GPU benchmarks, with a timeout per part, results as JSON.

    bash bench/gpu_pass.sh                  # on the GPU machine (run from the repository root)
    bash bench/gpu_pass.sh --dry-run        # on any machine without a GPU: checks that every part is runnable
    bash bench/gpu_pass.sh --fetch-wheels   # on a machine with a package index: the wheels the GPU machine lacks

Exactly what a (non-dry) pass does, in this order; each part is one subprocess with its own timeout, and a part
that fails or hangs is recorded and killed, and the pass goes on to the next:

  environment (inline)   GPU name, memory, SM count, driver (nvidia-smi) and the versions of python, torch, CUDA,
                         triton, transformers, peft, bitsandbytes, liger-kernel, cut-cross-entropy; git commit.
  gpu_tests       60 s   ``pytest -m gpu tests``: the CUDA correctness tests (fused linear op + statistics against
                         float64 at N=1000, V=32,003, H=512, bf16 and fp32, frozen and trainable lm_head; the
                         checkpoint test's CUDA case).
  bench_logprobs_qwen  70 s, bench_logprobs_llama 80 s
                         ``pytest -m gpu bench/test_bench_logprobs.py -k H1536`` / ``-k H4096``: fused linear
                         log-probs, pvfast (Triton) vs naive PyTorch vs Liger-Kernel vs Apple's Cut Cross-Entropy
                         (the peers run when their wheels are installed), forward / backward / forward+backward
                         with a frozen lm_head, time and peak memory, at the Qwen2.5-1.5B and Llama-3.1-8B heads
                         with N = 4096 and 16,384, bf16.
  bench_dpo_loss  50 s   ``pytest -m gpu bench/test_bench_dpo_loss.py``: DPO loss from hidden states, pvfast vs
                         Liger's fused DPO loss vs naive (same loss checked first), time and peak memory.
  bench_packing  110 s   ``pytest -m gpu bench/test_bench_packing.py``: one TAB-PO step of a randomly initialised
                         Qwen2.5-1.5B (config only, no hub) loaded as NF4 + LoRA r16 (bitsandbytes), tree-packed
                         vs the published layout: pairs/s and peak memory.
  bench_attention 50 s   ``pytest -m gpu bench/test_bench_attention.py`` (when the file exists): the tree-attention
                         helper's benchmark, dense SDPA mask vs the tree path.

The timeouts add up to 420 s; with gpu_pass.sh's installs (≤ 50 s) the pass stays under 8 minutes (480 s).
Results: for each part its exit code, duration, output tail and every JSON the benchmarks wrote under
``bench/results/`` while it ran, all in one file ``gpu_pass.json`` (plus the full output in ``gpu_pass.log``), in
``$OUT`` when it is set (the device tool brings back at most 8 files), else in ``bench/results/``.

``--dry-run`` (no GPU needed; what tests/test_gpu_pass.py runs): the environment part, then every pytest part
with ``--collect-only`` (imports, markers and parametrisation of exactly the items the pass would run; at
least one item each), and a check that the timeouts fit the budget. Nothing is installed or timed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BUDGET_S = 480  # 8 minutes for the whole pass
INSTALL_S = 50  # gpu_pass.sh's wheel install (≤ 20 s) and editable install (≤ 30 s), before this script
PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "liger_kernel",
            "cut_cross_entropy")


@dataclass(frozen=True)
class Part:
    name: str
    target: str  # test path given to pytest
    timeout_s: int
    keyword: str = ""  # pytest -k expression
    optional: bool = False  # skipped (not failed) when the target does not exist

    def argv(self, dry_run: bool) -> list[str]:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", self.target]
        cmd += ["-k", self.keyword] if self.keyword else []
        return cmd + (["--collect-only"] if dry_run else [])


PARTS = (
    Part("gpu_tests", "tests", 60),
    # one part per head: a timeout loses one head's rows, not both
    Part("bench_logprobs_qwen", "bench/test_bench_logprobs.py", 70, keyword="H1536"),
    Part("bench_logprobs_llama", "bench/test_bench_logprobs.py", 80, keyword="H4096"),
    Part("bench_dpo_loss", "bench/test_bench_dpo_loss.py", 50),
    Part("bench_packing", "bench/test_bench_packing.py", 110),
    Part("bench_attention", "bench/test_bench_attention.py", 50, optional=True),
)


def environment() -> dict:
    """Device and versions, recorded with the results."""
    import importlib

    env = {"python": platform.python_version(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for name in PACKAGES:
        try:
            env[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - not installed is a fact to record
            env[name] = f"not available ({type(exc).__name__})"
    import torch

    env["cuda_available"] = torch.cuda.is_available()
    env["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = dict(name=props.name, memory_GiB=round(props.total_memory / 2**30, 1),
                             sms=props.multi_processor_count, capability=f"{props.major}.{props.minor}")
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=20).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        env["commit"] = "unknown"
    return env


def run_part(part: Part, dry_run: bool, log) -> dict:
    target = REPO / part.target
    if not target.exists():
        return dict(name=part.name, status="skipped" if part.optional else "missing", reason=f"{part.target} absent")
    child_env = {k: v for k, v in os.environ.items() if not (k == "TRITON_INTERPRET" and not dry_run)}
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = part.argv(dry_run)
    t0 = time.time()
    log.write(f"\n===== {part.name}: {' '.join(cmd)} (timeout {part.timeout_s} s)\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env, capture_output=True, text=True, timeout=part.timeout_s)
        out, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:  # the child is killed; the pass goes on
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, timed_out = None, True
    log.write(out)
    log.flush()
    row = dict(name=part.name, command=cmd, timeout_s=part.timeout_s, seconds=round(time.time() - t0, 1), rc=rc,
               timed_out=timed_out, output_tail=out[-3000:])
    summary = re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)
    row["counts"] = {kind: int(num) for num, kind in summary}
    if not dry_run:  # the benchmark JSONs this part wrote (a later part may overwrite the same file)
        row["results"] = {path.name: json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))
                          if path.stat().st_mtime >= t0 and not path.name.startswith("gpu_pass")}
    if dry_run:
        collected = [line for line in out.splitlines() if "::" in line]
        row["collected"] = len(collected)
        row["status"] = "ok" if rc == 0 and collected else "failed"
    else:
        # pytest exit 5 = nothing ran (every item skipped/deselected): a missing GPU or peer, not a crash
        row["status"] = "ok" if rc == 0 else ("timeout" if timed_out else ("nothing ran" if rc == 5 else "failed"))
    return row


def budget_ok() -> bool:
    return INSTALL_S + sum(p.timeout_s for p in PARTS) <= BUDGET_S


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: collect every part instead of running it")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for gpu_pass.json/.log "
                    "(default: $OUT, else bench/results)")
    args = ap.parse_args(argv)
    env = environment()
    if not args.dry_run and not env["cuda_available"]:
        print("gpu_pass: no CUDA device here; use --dry-run to check the pass on a CPU machine", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_pass-dry-run" if args.dry_run else "gpu_pass"
    started = time.time()
    parts = []
    with open(out_dir / f"{stem}.log", "w") as log:
        log.write(json.dumps(env, indent=1) + "\n")
        for part in PARTS:
            row = run_part(part, args.dry_run, log)
            parts.append(row)
            print(f"gpu_pass: {row['name']:<16} {row['status']:<10} {row.get('seconds', 0):>6} s  "
                  f"{row.get('counts') or row.get('reason', '')}", flush=True)
    report = dict(mode="dry-run" if args.dry_run else "gpu", environment=env, budget_s=BUDGET_S,
                  timeouts_total_s=INSTALL_S + sum(p.timeout_s for p in PARTS), budget_ok=budget_ok(),
                  seconds=round(time.time() - started, 1), parts=parts)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"gpu_pass: wrote {out_dir / (stem + '.json')} ({report['seconds']} s)")
    failed = [p["name"] for p in parts if p["status"] not in ("ok", "skipped")]
    return 1 if failed or not budget_ok() else 0


if __name__ == "__main__":
    sys.exit(main())
