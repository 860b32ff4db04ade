"""The prepared GPU pass (bench/gpu_pass.sh) in its dry mode: every part runnable, the timeouts within 8 minutes.

No GPU here: ``bash bench/gpu_pass.sh --dry-run`` collects (pytest --collect-only) exactly the items each part would
run on the GPU machine, records the environment, and writes gpu_pass-dry-run.json. ~60 s on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_pass

REPO = Path(__file__).resolve().parents[1]


def test_parts_fit_the_budget_and_name_real_targets():
    assert gpu_pass.budget_ok() and gpu_pass.INSTALL_S + sum(p.timeout_s for p in gpu_pass.PARTS) <= 480
    for part in gpu_pass.PARTS:
        assert (REPO / part.target).exists() or part.optional, part
        assert part.argv(dry_run=False)[-1] != "--collect-only" and part.argv(dry_run=True)[-1] == "--collect-only"
        assert "-m" in part.argv(False) and "gpu" in part.argv(False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_collects_every_part(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run = subprocess.run(["bash", "bench/gpu_pass.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_pass-dry-run.json").read_text())
    assert report["mode"] == "dry-run" and report["budget_ok"] and report["timeouts_total_s"] <= 480
    assert (tmp_path / "gpu_pass-dry-run.log").exists()
    assert report["environment"]["torch"] and "cuda_available" in report["environment"]
    parts = {p["name"]: p for p in report["parts"]}
    assert set(parts) == {p.name for p in gpu_pass.PARTS}
    for name, part in parts.items():
        if part["status"] == "skipped":
            assert next(p for p in gpu_pass.PARTS if p.name == name).optional
            continue
        assert part["status"] == "ok" and part["rc"] == 0 and part["collected"] >= 1, part
    # what the pass runs: the CUDA correctness tests and, per head, every provider and mode
    assert parts["gpu_tests"]["collected"] >= 4
    assert parts["bench_logprobs_qwen"]["collected"] == parts["bench_logprobs_llama"]["collected"] == 24
