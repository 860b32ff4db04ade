"""Every Triton entry kernel compiles for NVIDIA sm_90 (H100/H200) and sm_80 (A100) with the real Triton compiler.

CI has no GPU: ``python -m bench.triton_compile`` compiles the launches the launchers really make (captured on
meta tensors of the Llama-3.1-8B head shape) with ``triton.compile`` for a CUDA target and reads ptxas -v. It
runs in a subprocess with TRITON_INTERPRET unset (tests/conftest.py sets it for the interpreter tests). What is
compiled: every distinct bf16 launch for sm_90, and the logits GEMM (all its modes) for sm_80 — about 80 s on
two cores. The checks below read the JSON rows, independently of the script's own verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compiler_available() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - no NVIDIA backend in this Triton build
        return f"Triton's NVIDIA backend is not available: {exc}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_compiler_available() is not None, reason=str(_compiler_available()))
def test_every_kernel_compiles_for_sm90_and_sm80_with_wgmma_and_no_spills(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run([sys.executable, "-m", "bench.triton_compile", "--arch", "90", "--arch", "80",
                          "--dtypes", "bf16", "--json", str(out)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    report = run.stdout[-6000:] + run.stderr[-3000:]
    assert out.exists(), report
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["uncovered"] == [], f"entry kernels launched by no scenario: {data['uncovered']}"
    assert all(r["ok"] for r in rows), [r.get("error") for r in rows if not r["ok"]]

    sm90 = [r for r in rows if r["arch"] == 90]
    sm80 = [r for r in rows if r["arch"] == 80]
    kernels = {r["kernel"] for r in sm90}
    assert {"_linear_logits_kernel", "_linear_combine_kernel", "_linear_prob_matmul_kernel",
            "_linear_weight_grad_kernel", "_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel",
            "_segment_stats_fwd_kernel", "_segment_stats_bwd_kernel"} <= kernels
    # the three modes of the logits GEMM (log-probs, probabilities, logits gradient) are what the launchers use
    assert {r["config"].split("MODE=")[1][0] for r in sm90 if r["kernel"] == "_linear_logits_kernel"} == {"0", "1", "2"}
    for r in sm90:
        assert (r["spill_st"], r["spill_ld"]) == (0, 0), f"{r['kernel']} {r['config']} spills on sm_90"
        assert r["regs"] <= 255 and r["smem"] <= 232_448
        if r["mma"] != "-":  # a tl.dot: bf16 must run on Hopper's wgmma
            assert r["mma"] == "wgmma.bf16", f"{r['kernel']} {r['config']} uses {r['mma']} on sm_90"
    dots = {r["kernel"] for r in sm90 if r["mma"] != "-"}
    assert dots == {"_linear_logits_kernel", "_linear_prob_matmul_kernel", "_linear_weight_grad_kernel"}
    assert sm80, "no sm_80 compile"
    for r in sm80:
        assert r["mma"] == "mma.bf16" and (r["spill_st"], r["spill_ld"]) == (0, 0), r
    assert run.returncode == 0, report
