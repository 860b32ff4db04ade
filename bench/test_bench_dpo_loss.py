"""DPO loss from hidden states: pvfast's fused loss vs Liger-Kernel's chunked DPO loss vs naive PyTorch.

    python -m pytest bench/test_bench_dpo_loss.py

All three compute the same loss (checked first, in the same run); then time and peak extra memory of
forward+backward. On the CPU Liger runs its chunked torch path (compiled=False).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import cuda_peak_extra_bytes, peak_extra_in_worker
from bench.loss_cases import LOSS_PROVIDERS, build_loss_case, loss_provider_available, loss_value

SUBJECT = "dpo_loss_from_hidden"
COLUMNS = ["device", "provider", "P", "T", "H", "V", "dtype", "loss", "median_ms", "peak_extra_MiB",
           "time_vs_naive", "memory_vs_naive"]
CPU_SHAPES = [dict(P=2, T=512, H=512, V=32000, dtype="fp32")]
GPU_SHAPES = [dict(P=4, T=2048, H=4096, V=128256, dtype="bf16")]

_naive: dict[tuple, dict] = {}


def _params():
    for device, shapes in (("cpu", CPU_SHAPES), ("cuda", GPU_SHAPES)):
        for shape in shapes:
            for provider in LOSS_PROVIDERS:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                yield pytest.param(device, provider, shape, marks=marks,
                                   id=f"{device}-{provider}-P{shape['P']}-T{shape['T']}-V{shape['V']}")


@pytest.mark.parametrize("device,provider,shape", list(_params()))
def test_dpo_loss(benchmark, result_sink, device, provider, shape):
    reason = loss_provider_available(provider)
    if reason:
        pytest.skip(reason)
    spec = dict(shape, provider=provider, device=device, builder="bench.loss_cases:build_loss_case")
    loss = loss_value(spec)
    key = (device, tuple(sorted(shape.items())))
    if provider != "naive" and key in _naive:  # same inputs, same loss: the comparison is fair
        tol = 1e-4 if shape["dtype"] == "fp32" else 2e-2
        assert loss == pytest.approx(_naive[key]["loss"], rel=tol, abs=tol)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run = build_loss_case(spec)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3 if device == "cpu" else 10, iterations=1,
                       warmup_rounds=1)
    median_ms = benchmark.stats.stats.median * 1e3
    peak = (cuda_peak_extra_bytes(build_loss_case(spec)) if device == "cuda"
            else peak_extra_in_worker(dict(spec, threads=torch.get_num_threads())))
    row = dict(device=device, provider=provider, **shape, loss=loss, median_ms=median_ms,
               peak_extra_MiB=peak / 2**20)
    if provider == "naive":
        _naive[key] = row
    elif key in _naive:
        row["time_vs_naive"] = median_ms / _naive[key]["median_ms"]
        row["memory_vs_naive"] = row["peak_extra_MiB"] / _naive[key]["peak_extra_MiB"]
    result_sink(SUBJECT, device, COLUMNS).add(**row)
