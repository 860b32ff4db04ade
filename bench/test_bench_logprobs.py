"""Fused-linear per-token log-probs: pvfast vs naive PyTorch vs peers — time and peak memory.

    python -m pytest bench/test_bench_logprobs.py            # CPU shapes here, GPU shapes on a GPU

Targets (issue 4; benchmarks, not tests):
- GPU, fused-linear forward+backward vs naive at the real heads: ≤ 0.6× the time, ≤ 5 % of the naive
  extra peak memory, faster than Liger's and CCE's kernels in the same run.
- CPU, C++ vs naive at N=2048, H=512, V=32,000: less time and ≤ 10 % of the naive extra memory.
Ratios are computed only between rows of this one session (same machine, same load).
"""

from __future__ import annotations

import pytest
import torch

from bench.cases import build_case, provider_available
from bench.harness import cuda_peak_extra_bytes, peak_extra_in_worker

SUBJECT = "linear_token_logprobs"
COLUMNS = ["device", "provider", "mode", "N", "H", "V", "dtype", "median_ms", "peak_extra_MiB",
           "time_vs_naive", "memory_vs_naive"]

CPU_SHAPES = [dict(N=2048, H=512, V=32000, dtype="fp32")]
GPU_SHAPES = [dict(N=n, H=h, V=v, dtype="bf16") for h, v in ((1536, 151936), (4096, 128256)) for n in (4096, 16384)]
CPU_PROVIDERS = ("naive", "pvfast-torch", "pvfast-cpp")
GPU_PROVIDERS = ("naive", "pvfast-triton", "liger", "cce")
MODES = ("forward", "backward", "forward+backward")

_naive: dict[tuple, dict] = {}  # (device, shape, mode) -> the naive row of this session


def _params():
    for device, shapes, providers in (("cpu", CPU_SHAPES, CPU_PROVIDERS), ("cuda", GPU_SHAPES, GPU_PROVIDERS)):
        for shape in shapes:
            for provider in providers:  # naive first: the other rows' ratios refer to it
                for mode in MODES:
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    sid = f"{device}-{provider}-{mode}-N{shape['N']}-H{shape['H']}-V{shape['V']}"
                    yield pytest.param(device, provider, mode, shape, marks=marks, id=sid)


@pytest.mark.parametrize("device,provider,mode,shape", list(_params()))
def test_linear_token_logprobs(benchmark, result_sink, device, provider, mode, shape):
    reason = provider_available(provider, device)
    if reason:
        pytest.skip(reason)
    if device == "cpu":
        torch.set_num_threads(torch.get_num_threads())  # recorded in the device name
    spec = dict(shape, provider=provider, mode=mode, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rounds = 3 if device == "cpu" else 10

    if mode == "backward":
        forward, backward = build_case(spec, split_backward=True)
        benchmark.pedantic(lambda logp: (backward(logp), sync()), setup=lambda: ((forward(),), {}),
                           rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        run = build_case(spec)
        benchmark.pedantic(lambda: (run(), sync()), rounds=rounds, iterations=1, warmup_rounds=1)
    median_ms = benchmark.stats.stats.median * 1e3

    peak = None
    if mode == "forward+backward":  # the memory that matters in training
        if device == "cuda":
            peak = cuda_peak_extra_bytes(build_case(spec))
        else:
            peak = peak_extra_in_worker(dict(spec, threads=torch.get_num_threads()))

    row = dict(device=device, provider=provider, mode=mode, **shape, median_ms=median_ms,
               peak_extra_MiB=None if peak is None else peak / 2**20)
    key = (device, tuple(sorted(shape.items())), mode)
    if provider == "naive":
        _naive[key] = row
    elif key in _naive:
        base = _naive[key]
        row["time_vs_naive"] = median_ms / base["median_ms"]
        if peak is not None and base["peak_extra_MiB"]:
            row["memory_vs_naive"] = row["peak_extra_MiB"] / base["peak_extra_MiB"]
    result_sink(SUBJECT, device, COLUMNS).add(**row)
