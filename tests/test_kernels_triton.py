"""Triton kernels (pvfast.kernels) against float64 PyTorch references; CPU runs go through TRITON_INTERPRET=1.

Tolerances: fp32 inputs use the absolute table below. For fp16/bf16 inputs the check is relative to
torch itself: our max error vs the fp64 reference must be ≤ 2 × the error of torch's own same-dtype
computation + atol + rtol·max|ref| (the CCE/Liger convention; forward ℓ is fp32 in both, gradients are
rounded to the input dtype).
"""

from __future__ import annotations

import math

import pytest
import torch

from pvfast.kernels.linear_token_logprobs import (
    LinearSegmentStatsFunction,
    LinearTokenLogprobsFunction,
    linear_token_logprobs_backward,
    linear_token_logprobs_forward,
)
from pvfast.kernels.segment_stats import SegmentStatsFunction
from pvfast.kernels.token_logprobs import TokenLogprobsFunction, token_logprobs_forward
from pvfast.objectives.stats import NUM_STATS, segment_stats_reference

IGNORE = -100
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol): absolute checks for fp32, the "+ tol" part of the torch-relative check for fp16/bf16.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (4e-3, 4e-3)}
# Small tiles keep the interpreter fast and make odd shapes straddle several tiles.
SMALL_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 256, "BLOCK_H": 32}


# ---------------------------------------------------------------------------------------------------
# References (float64, plain autograd) and checks
# ---------------------------------------------------------------------------------------------------
def reference_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ (N,) by log_softmax in the dtype of ``logits``; 0 where the target is ignored."""
    active = targets != IGNORE
    picked = torch.log_softmax(logits, dim=-1).gather(1, torch.where(active, targets, 0)[:, None]).squeeze(1)
    return torch.where(active, picked, torch.zeros_like(picked))


def random_targets(n: int, v: int, gen: torch.Generator, ignore_every: int = 5) -> torch.Tensor:
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::ignore_every] = IGNORE
    targets[-1] = v - 1  # the last vocabulary column sits in a partial tile
    return targets


def random_upstream(n: int, gen: torch.Generator) -> torch.Tensor:
    """Upstream dL/dℓ: mixed signs and magnitudes, never all ones, never zero."""
    return torch.rand(n, generator=gen, dtype=torch.float64) * 2 + 0.25


def assert_close_to_fp64(ours: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: torch.Tensor | None,
                         dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    assert torch.isfinite(ours).all(), f"{what}: non-finite values (unwritten output?)"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if dtype == torch.float32 or torch_same_dtype is None:
        bound = atol + rtol * scale
    else:
        torch_err = (torch_same_dtype.double() - ref64).abs().max().item()
        bound = 2 * torch_err + atol + rtol * scale
    assert err <= bound, f"{what}: max error {err:.3g} > bound {bound:.3g} ({dtype})"


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every torch.empty / empty_like the launchers allocate starts as NaN, so unwritten outputs fail."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out.fill_(-7)

    def empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out.fill_(-7)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


# ---------------------------------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n,v,block_v", [(32, 512, 128), (41, 1271, 256)])
def test_token_logprobs_matches_fp64(n, v, block_v, dtype_name):
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(n * v)
    logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    targets = random_targets(n, v, gen)
    upstream = random_upstream(n, gen)

    ours_in = logits.clone().requires_grad_()
    ours = TokenLogprobsFunction.apply(ours_in, targets, IGNORE, block_v)
    ours.backward(upstream.float())

    ref_in = logits.double().requires_grad_()
    ref = reference_logprobs(ref_in, targets)
    ref.backward(upstream)
    same_in = logits.clone().requires_grad_()
    same = reference_logprobs(same_in, targets)
    same.backward(upstream.to(dtype))

    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    assert_close_to_fp64(ours, ref, same, dtype, "logp")
    # ℓ is computed in fp32 from the (exactly representable) inputs: fp32 accuracy in every dtype.
    assert_close_to_fp64(ours, ref, None, torch.float32, "logp vs fp32 tolerance")
    assert_close_to_fp64(ours_in.grad, ref_in.grad, same_in.grad, dtype, "grad_logits")
    ignored = targets == IGNORE
    assert (ours[ignored] == 0).all() and (ours_in.grad[ignored] == 0).all()


def test_token_logprobs_lse_matches_logsumexp():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 700, generator=gen) * 4
    targets = random_targets(9, 700, gen, ignore_every=4)
    _, lse = token_logprobs_forward(logits, targets, IGNORE, 128)
    expected = torch.where(targets != IGNORE, torch.logsumexp(logits.double(), -1), 0.0)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-6)


def test_token_logprobs_all_ignored_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen).requires_grad_()
    targets = torch.full((6,), IGNORE)
    logp = TokenLogprobsFunction.apply(logits, targets, IGNORE, 128)
    logp.backward(torch.rand(6, generator=gen) + 0.5)
    assert (logp == 0).all() and (logits.grad == 0).all()


def test_token_logprobs_large_vocab_and_strided_rows():
    # V > 65,536 (past 16-bit column indices and one-block vocabularies); rows taken from a wider buffer.
    n, v = 3, 70_001
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(n, v + 5, generator=gen) * 2
    logits = wide[:, 2:v + 2].requires_grad_()  # row stride v + 5, unit column stride
    targets = torch.tensor([v - 1, IGNORE, 12_345])
    upstream = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64)
    logp = TokenLogprobsFunction.apply(logits, targets, IGNORE, 16_384)
    logp.backward(upstream.float())
    ref_in = logits.detach().double().requires_grad_()
    ref = reference_logprobs(ref_in, targets)
    ref.backward(upstream)
    torch.testing.assert_close(logp.double(), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# linear_token_logprobs
# ---------------------------------------------------------------------------------------------------
def linear_inputs(n, v, h, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) / h ** 0.25).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.25).to(dtype)
    return hidden, weight, random_targets(n, v, gen), random_upstream(n, gen)


@pytest.mark.parametrize("dtype_name", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n,v,h", [(32, 512, 64), (41, 1271, 96)])
def test_linear_token_logprobs_matches_fp64(n, v, h, dtype_name):
    dtype = DTYPES[dtype_name]
    hidden, weight, targets, upstream = linear_inputs(n, v, h, dtype, seed=n + v + h)

    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = LinearTokenLogprobsFunction.apply(h_in, w_in, targets, IGNORE, SMALL_BLOCKS)
    ours.backward(upstream.float())

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference_logprobs(h64 @ w64.T, targets)
    ref.backward(upstream)
    h_same, w_same = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    same = reference_logprobs(h_same @ w_same.T, targets)
    same.backward(upstream.to(dtype))

    assert ours.dtype == torch.float32 and h_in.grad.dtype == dtype and w_in.grad.dtype == dtype
    assert_close_to_fp64(ours, ref, same, dtype, "logp")
    # ℓ is computed in fp32 from the (exactly representable) inputs: fp32 accuracy in every dtype.
    assert_close_to_fp64(ours, ref, None, torch.float32, "logp vs fp32 tolerance")
    assert_close_to_fp64(h_in.grad, h64.grad, h_same.grad, dtype, "grad_hidden")
    assert_close_to_fp64(w_in.grad, w64.grad, w_same.grad, dtype, "grad_weight")


def test_linear_frozen_weight_skips_weight_grad():
    hidden, weight, targets, upstream = linear_inputs(20, 300, 32, torch.float32, seed=5)
    _, lse, _ = linear_token_logprobs_forward(hidden, weight, targets, IGNORE, blocks=SMALL_BLOCKS)
    grad_h, grad_w = linear_token_logprobs_backward(hidden, weight, targets, lse, upstream.float(), IGNORE,
                                                    need_weight_grad=False, blocks=SMALL_BLOCKS)
    assert grad_w is None
    h64 = hidden.double().requires_grad_()
    reference_logprobs(h64 @ weight.double().T, targets).backward(upstream)
    torch.testing.assert_close(grad_h.double(), h64.grad, atol=2e-5, rtol=2e-5)
    # Through autograd: a weight that does not require grad gets none.
    h_in = hidden.clone().requires_grad_()
    LinearTokenLogprobsFunction.apply(h_in, weight, targets, IGNORE, SMALL_BLOCKS).backward(upstream.float())
    assert weight.grad is None
    torch.testing.assert_close(h_in.grad.double(), h64.grad, atol=2e-5, rtol=2e-5)


def test_linear_all_ignored_batch():
    hidden, weight, targets, upstream = linear_inputs(18, 200, 32, torch.float32, seed=9)
    targets = torch.full_like(targets, IGNORE)
    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = LinearTokenLogprobsFunction.apply(h_in, w_in, targets, IGNORE, SMALL_BLOCKS)
    logp.backward(upstream.float())
    assert (logp == 0).all() and (h_in.grad == 0).all() and (w_in.grad == 0).all()


def test_linear_large_vocab():
    # V > 65,536 with a tiny batch and a wide vocabulary tile to keep the interpreter quick.
    n, v, h = 4, 66_000, 16
    hidden, weight, targets, upstream = linear_inputs(n, v, h, torch.float32, seed=11)
    targets = torch.tensor([v - 1, 65_537, IGNORE, 3])
    blocks = {"BLOCK_N": 16, "BLOCK_V": 8192, "BLOCK_H": 16}
    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = LinearTokenLogprobsFunction.apply(h_in, w_in, targets, IGNORE, blocks)
    logp.backward(upstream.float())
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference_logprobs(h64 @ w64.T, targets)
    ref.backward(upstream)
    torch.testing.assert_close(logp.double(), ref, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(h_in.grad.double(), h64.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w_in.grad.double(), w64.grad, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# segment statistics: standalone and fused into the linear kernel
# ---------------------------------------------------------------------------------------------------
def segment_inputs(n: int, m: int, gen: torch.Generator):
    weights = torch.rand(n, generator=gen, dtype=torch.float64) * 1.5 + 0.1
    segment_ids = torch.randint(-1, m - 1, (n,), generator=gen)  # segment m-1 stays empty
    grad_stats = torch.randn(m, NUM_STATS, generator=gen, dtype=torch.float64)
    return weights, segment_ids, grad_stats


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_segment_stats_matches_reference(tau):
    n, m = 1500, 6  # more tokens than one program's block
    gen = torch.Generator().manual_seed(21)
    logp64 = -torch.rand(n, generator=gen, dtype=torch.float64) * 4
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)

    logp = logp64.float().requires_grad_()
    stats = SegmentStatsFunction.apply(logp, weights.float(), segment_ids, m, tau)
    (stats * grad_stats.float()).sum().backward()

    ref_in = logp64.clone().requires_grad_()
    ref = segment_stats_reference(ref_in, weights, segment_ids, m, tau)
    (ref * grad_stats).sum().backward()

    assert stats.shape == (m, NUM_STATS) and stats.dtype == torch.float32
    torch.testing.assert_close(stats.double(), ref, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(logp.grad.double(), ref_in.grad, atol=1e-5, rtol=1e-5)
    assert (stats[m - 1] == 0).all() and (logp.grad[segment_ids < 0] == 0).all()


def test_segment_stats_hand_worked_case():
    # Two completions, τ = 0.5 (log τ ≈ −0.693). Token 2 is unscored.
    logp = torch.tensor([-0.1, -2.0, -5.0, -1.0], requires_grad=True)
    weights = torch.tensor([1.0, 0.5, 9.0, 2.0])
    segment_ids = torch.tensor([0, 0, -1, 1])
    stats = SegmentStatsFunction.apply(logp, weights, segment_ids, 2, 0.5)
    expected = torch.tensor([
        # Σℓ     Σwℓ            Σw   n    Σwg(−ℓ)  Σwg  Σg
        [-2.1, -0.1 - 1.0, 1.5, 2.0, 1.0, 0.5, 1.0],
        [-1.0, -2.0, 2.0, 1.0, 2.0, 2.0, 1.0],
    ])
    torch.testing.assert_close(stats, expected)
    grad_stats = torch.arange(14, dtype=torch.float32).reshape(2, 7) / 10
    (stats * grad_stats).sum().backward()
    # dℓ = G0 + w G1 − w g G4: token 0 ungated, tokens 1 and 3 gated.
    expected_grad = torch.tensor([0.0 + 1.0 * 0.1, 0.0 + 0.5 * 0.1 - 0.5 * 0.4, 0.0, 0.7 + 2.0 * 0.8 - 2.0 * 1.1])
    torch.testing.assert_close(logp.grad, expected_grad)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_segment_stats_matches_composed_reference(dtype_name, weight_grad):
    dtype = DTYPES[dtype_name]
    n, v, h, m, tau = 41, 1271, 96, 5, 0.2
    hidden, weight, targets, _ = linear_inputs(n, v, h, dtype, seed=31)
    gen = torch.Generator().manual_seed(32)
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)
    segment_ids[targets == IGNORE] = -1  # ignored targets are not scored (the trainer's convention)

    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    stats = LinearSegmentStatsFunction.apply(h_in, w_in, targets, weights.float(), segment_ids, m, tau,
                                              IGNORE, SMALL_BLOCKS)
    (stats * grad_stats.float()).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = segment_stats_reference(reference_logprobs(h64 @ w64.T, targets), weights, segment_ids, m, tau)
    (ref * grad_stats).sum().backward()
    h_same, w_same = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    same = segment_stats_reference(reference_logprobs(h_same @ w_same.T, targets), weights.to(dtype),
                                   segment_ids, m, tau)
    (same * grad_stats.to(dtype)).sum().backward()

    # Gate columns count tokens: exact unless a log-prob sits within rounding of log τ.
    assert_close_to_fp64(stats, ref.detach(), same.detach(), dtype, "stats")
    assert (stats[m - 1] == 0).all(), "the empty segment must stay zero"
    assert_close_to_fp64(h_in.grad, h64.grad, h_same.grad, dtype, "grad_hidden")
    if weight_grad:
        assert_close_to_fp64(w_in.grad, w64.grad, w_same.grad, dtype, "grad_weight")
    else:
        assert w_in.grad is None


def test_linear_segment_stats_all_unscored():
    hidden, weight, targets, _ = linear_inputs(17, 150, 32, torch.float32, seed=41)
    h_in = hidden.clone().requires_grad_()
    segment_ids = torch.full((17,), -1)
    stats = LinearSegmentStatsFunction.apply(h_in, weight, targets, torch.rand(17) + 0.1, segment_ids, 3, 0.5,
                                              IGNORE, SMALL_BLOCKS)
    (stats * torch.randn(3, NUM_STATS)).sum().backward()
    assert (stats == 0).all() and (h_in.grad == 0).all()


# ---------------------------------------------------------------------------------------------------
# On a real GPU (skipped without CUDA): default block sizes, realistic shapes, bf16.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_linear_segment_stats_cuda(dtype_name):
    dtype = DTYPES[dtype_name]
    n, v, h, m, tau = 1000, 32_003, 512, 8, 0.5
    hidden, weight, targets, _ = linear_inputs(n, v, h, dtype, seed=51)
    gen = torch.Generator().manual_seed(52)
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)
    segment_ids[targets == IGNORE] = -1
    cuda = torch.device("cuda")
    h_in = hidden.to(cuda).requires_grad_()
    w_in = weight.to(cuda).requires_grad_()
    stats = LinearSegmentStatsFunction.apply(h_in, w_in, targets.to(cuda), weights.float().to(cuda),
                                              segment_ids.to(cuda), m, tau)
    (stats * grad_stats.float().to(cuda)).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = segment_stats_reference(reference_logprobs(h64 @ w64.T, targets), weights, segment_ids, m, tau)
    (ref * grad_stats).sum().backward()
    h_same, w_same = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    same = segment_stats_reference(reference_logprobs(h_same @ w_same.T, targets), weights.to(dtype),
                                   segment_ids, m, tau)
    (same * grad_stats.to(dtype)).sum().backward()
    assert_close_to_fp64(stats.cpu(), ref.detach(), same.detach(), dtype, "stats")
    assert_close_to_fp64(h_in.grad.cpu(), h64.grad, h_same.grad, dtype, "grad_hidden")
    assert_close_to_fp64(w_in.grad.cpu(), w64.grad, w_same.grad, dtype, "grad_weight")
