"""Benchmark cases for the per-token log-prob ops: one builder shared by timing and memory probes.

A case is a JSON-able dict ``{"provider", "mode", "N", "H", "V", "dtype", "device"}``. ``build_case``
allocates the inputs once and returns a callable running one forward, one forward+backward, or (with
``split_backward``) a (forward, backward) pair so the backward can be timed alone.

Providers (all compute ℓ_t = log softmax(h_t Wᵀ)[y_t] and its gradient w.r.t. h):
    naive          logits = h Wᵀ → float → log_softmax → gather (what a plain trainer does)
    pvfast-torch   pvfast's chunked torch reference (impl="torch")
    pvfast-cpp     pvfast's C++ CPU op (impl="cpp")
    pvfast-triton  pvfast's Triton kernel (impl="triton", CUDA only)
    liger          Liger-Kernel's fused linear cross entropy with reduction="none" (if installed)
    cce            Apple's cut-cross-entropy ``linear_cross_entropy`` with reduction="none" (if installed)
"""

from __future__ import annotations

import functools
import importlib.util

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("naive", "pvfast-torch", "pvfast-cpp", "pvfast-triton", "liger", "cce")


def provider_available(provider: str, device: str) -> str | None:
    """None if ``provider`` can run on ``device``, else the reason it is skipped."""
    if provider == "pvfast-triton" and device != "cuda":
        return "Triton kernels need a GPU (the interpreter is a correctness tool, not a benchmark)"
    if provider == "pvfast-cpp":
        if device != "cpu":
            return "the C++ op is the CPU implementation"
        from pvfast.ops.cpp_backend import cpp_available

        if not cpp_available():
            return "pvfast._C is not built"
    if provider == "liger" and (importlib.util.find_spec("liger_kernel") is None or device != "cuda"):
        return "liger-kernel is not installed (its fused linear cross entropy is a GPU Triton kernel)"
    if provider == "cce" and (importlib.util.find_spec("cut_cross_entropy") is None or device != "cuda"):
        return "cut-cross-entropy is not installed (it needs a GPU)"
    return None


def _logprob_fn(provider: str):
    if provider == "naive":
        def naive(h, w, y):
            logits = (h @ w.T).float()
            return torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
        return naive
    if provider.startswith("pvfast-"):
        from pvfast.ops import dispatch as ops

        impl = provider.removeprefix("pvfast-")
        return lambda h, w, y: ops.linear_token_logprobs(h, w, y, impl=impl)
    if provider == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        return lambda h, w, y: -loss(w, h, y)
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none")
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


@functools.lru_cache(maxsize=2)
def _inputs(device: str, dtype_name: str, n: int, h_dim: int, v: int, seed: int):
    """(hidden, weight, targets, upstream), drawn on the device itself (a 128k × 4096 weight drawn on a CPU and
    copied takes seconds per case) and shared by the cases of one shape (every provider sees the same inputs)."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h_dim, generator=gen, device=device) / h_dim ** 0.25).to(dtype)
    weight = (torch.randn(v, h_dim, generator=gen, device=device) / h_dim ** 0.25).to(dtype)  # frozen lm_head
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    upstream = torch.rand(n, generator=gen, device=device)  # not all ones, like a real weighted loss
    return hidden, weight, targets, upstream


def build_case(spec: dict, split_backward: bool = False):
    device = spec.get("device", "cpu")
    n, h_dim, v = int(spec["N"]), int(spec["H"]), int(spec["V"])
    hidden, weight, targets, upstream = _inputs(device, spec.get("dtype", "fp32"), n, h_dim, v,
                                                int(spec.get("seed", 0)))
    hidden = hidden.detach().requires_grad_(True)  # a fresh leaf per case: gradients never accumulate across cases
    fn = _logprob_fn(spec["provider"])
    mode = spec.get("mode", "forward+backward")

    def forward():
        return fn(hidden, weight, targets)

    def backward(logp):
        (logp.float() * upstream).sum().backward()
        hidden.grad = None

    if split_backward:
        return forward, backward
    if mode == "forward":
        return forward  # a training forward: autograd records what the backward needs
    return lambda: backward(forward())
