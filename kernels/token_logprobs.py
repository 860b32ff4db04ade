"""Per-token log-probabilities from materialised logits: ℓ_t = logits[t, y_t] − logsumexp(logits[t]).

One program per token row sweeps the vocabulary once with an online log-sum-exp (the row is never held
whole, so any V works). The backward recomputes the softmax blockwise from the saved lse instead of
storing it. Rows whose target is ``ignore_index`` do no vocabulary work in the forward (ℓ = 0) and get
an all-zero gradient row; a target outside [0, V) gives ℓ = lse = NaN (see ``pvfast.kernels``).

Memory-bound by nature (it reads N×V logits the caller materialised); the fused lm-head op in
``linear_token_logprobs.py`` is the path that avoids them. The autograd Function is
``pvfast.ops.functions.TokenLogprobs``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pvfast.kernels import check_target_values
from pvfast.objectives.stats import IGNORE_INDEX

# Vocabulary columns per step of the sweep. The op is memory-bound: 4096 fp32 values per step keep each
# warp streaming long contiguous runs without spilling registers; under the interpreter a larger block
# only means fewer, bigger numpy operations.
BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _token_logprobs_fwd_kernel(Logits_ptr, Targets_ptr, Logp_ptr, Lse_ptr, V, stride_lm,
                               IGNORE_INDEX: tl.constexpr, BLOCK_V: tl.constexpr):
    # Online log-sum-exp over the row, block by block:
    #   m ← max(m, max_j x_j);  s ← s·exp(m_old − m) + Σ_j exp(x_j − m);  lse = m + log s
    #   ℓ = x[y] − lse
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Targets_ptr + row)
    active = target != IGNORE_INDEX
    row_ptr = Logits_ptr + row * stride_lm
    v_end = tl.where(active, V, 0)  # ignored rows skip the sweep entirely
    m = float("-inf")
    s = 0.0
    for v0 in range(0, v_end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    in_vocab = active & (target >= 0) & (target < V)
    target_logit = tl.load(row_ptr + tl.where(in_vocab, target, 0), mask=in_vocab, other=0.0).to(tl.float32)
    lse = tl.where(active, m + tl.log(tl.where(active, s, 1.0)), 0.0)
    logp = tl.where(active, target_logit - lse, 0.0)
    bad = active & ~in_vocab  # out-of-range target: poison, never a silently wrong number
    tl.store(Lse_ptr + row, tl.where(bad, float("nan"), lse))
    tl.store(Logp_ptr + row, tl.where(bad, float("nan"), logp))


@triton.jit
def _token_logprobs_bwd_kernel(Logits_ptr, Targets_ptr, Lse_ptr, GradLogp_ptr, GradLogits_ptr, V,
                               stride_lm, stride_gm, IGNORE_INDEX: tl.constexpr, BLOCK_V: tl.constexpr):
    # dℓ/dx_j = 1[j = y] − softmax(x)_j, softmax recomputed as exp(x_j − lse):
    #   dL/dx_j = g · (1[j = y] − exp(x_j − lse))          (g = dL/dℓ; 0 for ignored rows)
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Targets_ptr + row)
    active = target != IGNORE_INDEX
    grad = tl.where(active, tl.load(GradLogp_ptr + row), 0.0)
    lse = tl.load(Lse_ptr + row)
    row_ptr = Logits_ptr + row * stride_lm
    grad_ptr = GradLogits_ptr + row * stride_gm
    v_read = tl.where(active, V, 0)  # ignored rows read nothing and write zeros
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        in_row = offs < V
        x = tl.load(row_ptr + offs, mask=offs < v_read, other=float("-inf")).to(tl.float32)
        dx = grad * (tl.where(offs == target, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(grad_ptr + offs, dx.to(GradLogits_ptr.dtype.element_ty), mask=in_row)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """Kernels take a row stride but need unit stride along the vocabulary."""
    return x if x.stride(-1) == 1 else x.contiguous()


def token_logprobs_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                           block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V), targets (N,) → (logp fp32 (N,), lse fp32 (N,)); 0 in both for ignored rows."""
    logits = _row_major(logits)
    targets = targets.contiguous()
    n, v = logits.shape
    check_target_values(targets, v, ignore_index, "token_logprobs")
    block_v = min(block_v, triton.next_power_of_2(v))
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        _token_logprobs_fwd_kernel[(n,)](
            Logits_ptr=logits, Targets_ptr=targets, Logp_ptr=logp, Lse_ptr=lse, V=v,
            stride_lm=logits.stride(0), IGNORE_INDEX=ignore_index, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return logp, lse


def token_logprobs_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                            grad_logp: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                            block_v: int = BLOCK_V) -> torch.Tensor:
    """Upstream dL/dℓ (N,) → dL/dlogits (N, V) in the dtype of logits."""
    logits = _row_major(logits)
    targets = targets.contiguous()
    grad_logp = grad_logp.float().contiguous()
    n, v = logits.shape
    block_v = min(block_v, triton.next_power_of_2(v))
    grad_logits = torch.empty_like(logits)
    if n:
        _token_logprobs_bwd_kernel[(n,)](
            Logits_ptr=logits, Targets_ptr=targets, Lse_ptr=lse, GradLogp_ptr=grad_logp,
            GradLogits_ptr=grad_logits, V=v, stride_lm=logits.stride(0), stride_gm=grad_logits.stride(0),
            IGNORE_INDEX=ignore_index, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return grad_logits
