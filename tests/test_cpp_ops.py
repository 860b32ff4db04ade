"""The C++ CPU ops (pvfast._C) against float64 torch references, and the guarded loader.

Every reference is computed in float64 from the *same* (already rounded) inputs, so the only error
left is the kernels' fp32 arithmetic plus the rounding of a reduced-precision output.
"""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
from ops_reference import assert_within_torch_error

from pvfast.objectives.config import log_tau
from pvfast.objectives.stats import IGNORE_INDEX, NUM_STATS, segment_stats_reference
from pvfast.ops import cpp_backend as _cpp

try:
    from pvfast import _C
except ImportError as exc:  # the loader tests below still run
    _C = None
    _IMPORT_ERROR = str(exc)

needs_ext = pytest.mark.skipif(
    _C is None,
    reason="pvfast._C is not built (run `pip install --no-build-isolation -e .`; "
    "PVFAST_SKIP_CPP_BUILD=1 skips it)",
)

IGNORE = IGNORE_INDEX
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) for outputs in each dtype: fp32 arithmetic error for fp32 outputs, one rounding
# of the output (2^-8 bf16, 2^-11 fp16 relative) on top of it otherwise.
OUT_TOL = {
    torch.float32: (5e-6, 2e-5),
    torch.bfloat16: (2e-3, 1e-2),
    torch.float16: (2e-4, 2e-3),
}
# per-token outputs (logp, lse) are always float32: error of an fp32 log-sum-exp over V entries
LOGP_TOL = (2e-5, 2e-6)
# (N, V) direct logits and (N, H, V) linear shapes: one aligned, one deliberately odd
DIRECT_SHAPES = [(64, 512), (41, 1271)]
LINEAR_SHAPES = [(64, 64, 1024), (41, 96, 1271)]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float]) -> None:
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def make_targets(n: int, vocab: int, gen: torch.Generator, ignored_every: int = 5) -> torch.Tensor:
    """Random targets with every `ignored_every`-th token ignored (the first one included)."""
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::ignored_every] = IGNORE
    return targets


def upstream_grad(n: int, gen: torch.Generator) -> torch.Tensor:
    """Upstream gradient g_t: random, not all ones, with a few exact zeros."""
    g = torch.randn(n, generator=gen)
    g[1::7] = 0.0
    return g


def poison_heap(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Best effort: free a NaN-filled block of an output's size so that the allocator is likely to
    hand it back to the next allocation of that size; unwritten output entries then show as NaN."""
    block = torch.full(shape, float("nan"), dtype=dtype)
    del block


def reference_logp(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (ℓ_t, lse_t) with 0 for ignored tokens; logits (N, V) float64."""
    scored = targets != IGNORE
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    zero = torch.zeros_like(lse)
    return torch.where(scored, picked - lse, zero), torch.where(scored, lse, zero)


# ------------------------------------------------------------------------------------------------
# token_logprobs_fwd / token_logprobs_bwd (logits given)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=str)
def test_token_logprobs_fwd_matches_float64(dtype, shape):
    n, vocab = shape
    gen = torch.Generator().manual_seed(n * vocab)
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    targets = make_targets(n, vocab, gen)
    poison_heap((n,), torch.float32)
    logp, lse = _C.token_logprobs_fwd(logits, targets, IGNORE)
    ref_logp, ref_lse = reference_logp(logits.double(), targets)
    assert logp.dtype == lse.dtype == torch.float32
    close(logp, ref_logp, LOGP_TOL)
    close(lse, ref_lse, LOGP_TOL)
    assert torch.all(logp[targets == IGNORE] == 0) and torch.all(lse[targets == IGNORE] == 0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DIRECT_SHAPES, ids=str)
def test_token_logprobs_bwd_matches_float64_autograd(dtype, shape):
    n, vocab = shape
    gen = torch.Generator().manual_seed(n + vocab)
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    targets = make_targets(n, vocab, gen)
    g = upstream_grad(n, gen)
    _, lse = _C.token_logprobs_fwd(logits, targets, IGNORE)
    poison_heap((n, vocab), dtype)
    grad = _C.token_logprobs_bwd(logits, targets, lse, g, IGNORE)

    x = logits.double().requires_grad_()
    ref_logp, _ = reference_logp(x, targets)
    (ref_logp * g.double()).sum().backward()
    assert grad.dtype == dtype and grad.shape == (n, vocab)
    close(grad, x.grad, OUT_TOL[dtype])
    assert torch.all(grad[targets == IGNORE] == 0)


@needs_ext
def test_token_logprobs_large_vocab():
    """V > 65,536 (more than 16-bit indices; many vocabulary chunks per row)."""
    n, vocab = 5, 70_001
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(n, vocab, generator=gen) * 6
    targets = torch.tensor([vocab - 1, 65_536, IGNORE, 3, 40_000])
    g = upstream_grad(n, gen) + 0.5
    logp, lse = _C.token_logprobs_fwd(logits, targets, IGNORE)
    x = logits.double().requires_grad_()
    ref_logp, ref_lse = reference_logp(x, targets)
    close(logp, ref_logp.detach(), LOGP_TOL)
    close(lse, ref_lse.detach(), LOGP_TOL)
    (ref_logp * g.double()).sum().backward()
    close(_C.token_logprobs_bwd(logits, targets, lse, g, IGNORE), x.grad, OUT_TOL[torch.float32])


@needs_ext
def test_token_logprobs_all_ignored_and_strided_rows():
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 300, generator=gen)
    logits = wide[:, :257]  # row stride 300, unit stride along the vocabulary
    targets = torch.full((6,), IGNORE)
    logp, lse = _C.token_logprobs_fwd(logits, targets, IGNORE)
    assert torch.all(logp == 0) and torch.all(lse == 0)
    grad = _C.token_logprobs_bwd(logits, targets, lse, torch.randn(6, generator=gen), IGNORE)
    assert torch.all(grad == 0)

    targets = torch.tensor([0, 256, 5, IGNORE, 100, 7])
    logp, _ = _C.token_logprobs_fwd(logits, targets, IGNORE)
    close(logp, reference_logp(logits.double(), targets)[0], LOGP_TOL)


# ------------------------------------------------------------------------------------------------
# linear_token_logprobs_fwd / linear_token_logprobs_bwd (logits = hidden · weightᵀ, never stored)


def linear_inputs(n, hidden_size, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / math.sqrt(hidden_size) * 3).to(dtype)
    return hidden, weight, make_targets(n, vocab, gen), upstream_grad(n, gen)


def linear_reference(hidden, weight, targets, g, dtype=torch.float64, softcap=None):
    """ℓ, lse and the gradients of Σ g_t ℓ_t w.r.t. hidden and weight, by torch autograd in ``dtype`` (float64:
    the reference; float32: torch's own fp32 computation, for the error rule)."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    z = h @ w.T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp, lse = reference_logp(z, targets)
    (logp * g.to(dtype)).sum().backward()
    return logp.detach(), lse.detach(), h.grad, w.grad


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_token_logprobs_matches_float64(dtype, shape):
    n, hidden_size, vocab = shape
    hidden, weight, targets, g = linear_inputs(n, hidden_size, vocab, dtype, seed=sum(shape))
    ref_logp, ref_lse, ref_gh, ref_gw = linear_reference(hidden, weight, targets, g)

    logp, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
    close(logp, ref_logp, LOGP_TOL)
    close(lse, ref_lse, LOGP_TOL)

    poison_heap((n, hidden_size), dtype)
    grad_hidden, grad_weight = _C.linear_token_logprobs_bwd(
        hidden, weight, targets, lse, g, IGNORE, 0.0, True)
    assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
    close(grad_hidden, ref_gh, OUT_TOL[dtype])
    close(grad_weight, ref_gw, OUT_TOL[dtype])
    assert torch.all(grad_hidden[targets == IGNORE] == 0)

    grad_hidden_only, no_weight_grad = _C.linear_token_logprobs_bwd(
        hidden, weight, targets, lse, g, IGNORE, 0.0, False)
    assert no_weight_grad.numel() == 0
    close(grad_hidden_only, ref_gh, OUT_TOL[dtype])


@needs_ext
@pytest.mark.parametrize("threads", [1, 3])
def test_linear_bwd_several_tiles_and_thread_counts(threads):
    """More tokens than one token tile, more vocabulary blocks than threads or fewer: the rotating
    grad_weight schedule must cover every (tile, block) pair exactly once for any team size."""
    hidden, weight, targets, g = linear_inputs(300, 16, 1100, torch.float32, seed=11)
    ref_logp, _, ref_gh, ref_gw = linear_reference(hidden, weight, targets, g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        logp, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
        grad_hidden, grad_weight = _C.linear_token_logprobs_bwd(
            hidden, weight, targets, lse, g, IGNORE, 0.0, True)
    finally:
        torch.set_num_threads(before)
    close(logp, ref_logp, LOGP_TOL)
    close(grad_hidden, ref_gh, OUT_TOL[torch.float32])
    close(grad_weight, ref_gw, OUT_TOL[torch.float32])


@needs_ext
def test_linear_large_vocab():
    """V > 65,536: a fixed fp32 tolerance would depend on the CPU's BLAS (a sum over 70k products), so the
    rule is the STYLE one: our error ≤ 2 × torch's own fp32 error + tol, both against float64."""
    hidden, weight, targets, g = linear_inputs(6, 16, 70_001, torch.float32, seed=5)
    targets[1] = 70_000
    ref_logp, ref_lse, ref_gh, ref_gw = linear_reference(hidden, weight, targets, g)
    torch_logp, torch_lse, torch_gh, torch_gw = linear_reference(hidden, weight, targets, g, dtype=torch.float32)
    logp, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
    assert_within_torch_error(logp, ref_logp, torch_logp, "logp")
    assert_within_torch_error(lse, ref_lse, torch_lse, "lse")
    grad_hidden, grad_weight = _C.linear_token_logprobs_bwd(
        hidden, weight, targets, lse, g, IGNORE, 0.0, True)
    assert_within_torch_error(grad_hidden, ref_gh, torch_gh, "grad_hidden")
    assert_within_torch_error(grad_weight, ref_gw, torch_gw, "grad_weight")
    _, _, direction = _C.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 0.0)
    assert_within_torch_error(g[:, None] * direction, ref_gh, torch_gh, "grad_hidden (gradient in the forward)")


def _peak_rss_bytes_during(fn) -> int:
    """Peak resident-set growth while fn() runs (Linux: VmHWM reset through /proc/self/clear_refs)."""
    def rss_kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = rss_kib("VmRSS")
    fn()
    return (rss_kib("VmHWM") - before) * 1024


@needs_ext
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_linear_ops_never_hold_the_logits():
    """Forward and backward stay far below one N×V fp32 buffer (64 MiB here)."""
    n, hidden_size, vocab = 1024, 32, 16384
    hidden, weight, targets, g = linear_inputs(n, hidden_size, vocab, torch.float32, seed=4)
    logits_bytes = n * vocab * 4
    outputs_bytes = (n * hidden_size + vocab * hidden_size) * 4

    def fwd_bwd():
        _, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
        _C.linear_token_logprobs_bwd(hidden, weight, targets, lse, g, IGNORE, 0.0, True)

    try:
        growth = _peak_rss_bytes_during(fwd_bwd)
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")
    assert growth < outputs_bytes + logits_bytes // 8, (growth, logits_bytes)


@needs_ext
def test_linear_all_ignored_costs_nothing_and_returns_zeros():
    hidden, weight, _, g = linear_inputs(9, 8, 50, torch.bfloat16, seed=2)
    targets = torch.full((9,), IGNORE)
    logp, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
    assert torch.all(logp == 0) and torch.all(lse == 0)
    grad_hidden, grad_weight = _C.linear_token_logprobs_bwd(
        hidden, weight, targets, lse, g, IGNORE, 0.0, True)
    assert grad_hidden.shape == hidden.shape and torch.all(grad_hidden == 0)
    assert grad_weight.shape == weight.shape and torch.all(grad_weight == 0)


# ------------------------------------------------------------------------------------------------
# linear_token_logprobs_fwd_with_grad (frozen weight: dℓ/dhidden computed in the forward)

# The direction is an fp32 output computed in fp32 from the (rounded) inputs in every dtype.
DIRECTION_TOL = OUT_TOL[torch.float32]


def assert_direction_matches_float64(hidden, weight, targets, g, dtype):
    """logp, lse, direction against float64, and g · direction cast to dtype against dL/dhidden."""
    ref_logp, ref_lse, ref_direction, _ = linear_reference(hidden, weight, targets, torch.ones(len(targets)))
    _, _, ref_gh, _ = linear_reference(hidden, weight, targets, g)
    poison_heap((hidden.shape[0], hidden.shape[1]), torch.float32)
    logp, lse, direction = _C.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 0.0)
    assert direction.dtype == torch.float32 and direction.shape == hidden.shape
    close(logp, ref_logp, LOGP_TOL)
    close(lse, ref_lse, LOGP_TOL)
    close(direction, ref_direction, DIRECTION_TOL)
    assert torch.all(direction[targets == IGNORE] == 0)
    # the autograd backward's whole job: scale each row by the upstream gradient, round to dtype
    close((g[:, None] * direction).to(dtype), ref_gh, OUT_TOL[dtype])


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_fwd_with_grad_matches_float64(dtype, shape):
    n, hidden_size, vocab = shape
    hidden, weight, targets, g = linear_inputs(n, hidden_size, vocab, dtype, seed=sum(shape) + 1)
    assert_direction_matches_float64(hidden, weight, targets, g, dtype)


@needs_ext
@pytest.mark.parametrize("threads", [1, 3])
def test_linear_fwd_with_grad_several_tiles_and_thread_counts(threads):
    hidden, weight, targets, g = linear_inputs(300, 16, 1100, torch.float32, seed=12)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_direction_matches_float64(hidden, weight, targets, g, torch.float32)
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_linear_fwd_with_grad_rescales_when_the_row_max_grows():
    """Logits rising along the vocabulary: every block raises the running max, so the accumulated
    softmax-weighted sum is rescaled at every block (by up to e^-12 per block here)."""
    n, hidden_size, vocab = 7, 24, 2600
    gen = torch.Generator().manual_seed(13)
    hidden, _, targets, g = linear_inputs(n, hidden_size, vocab, torch.float32, seed=13)
    hidden[:, 0] = hidden[:, 0].abs() + 1.0
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.1
    weight[:, 0] = torch.linspace(0.0, 60.0, vocab)  # logit of the last entry ≥ 60 above the first
    targets[2] = vocab - 1
    targets[3] = 0  # the first entry: ℓ ≈ −60, still exact after all the rescaling
    assert_direction_matches_float64(hidden, weight, targets, g, torch.float32)


@needs_ext
def test_linear_fwd_with_grad_all_ignored_returns_zeros():
    hidden, weight, _, _ = linear_inputs(9, 8, 50, torch.bfloat16, seed=3)
    targets = torch.full((9,), IGNORE)
    logp, lse, direction = _C.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 0.0)
    assert torch.all(logp == 0) and torch.all(lse == 0)
    assert direction.shape == hidden.shape and torch.all(direction == 0)


# ------------------------------------------------------------------------------------------------
# final-logit soft-capping (Gemma 2): z' = c·tanh(z/c) in the forward and every gradient


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_softcap_matches_float64(dtype):
    n, hidden_size, vocab, cap = 41, 96, 1271, 4.0
    hidden, weight, targets, g = linear_inputs(n, hidden_size, vocab, dtype, seed=71)  # logits reach ±10
    ref_logp, ref_lse, ref_gh, ref_gw = linear_reference(hidden, weight, targets, g, softcap=cap)
    _, _, ref_direction, _ = linear_reference(hidden, weight, targets, torch.ones(n), softcap=cap)
    uncapped_logp, _, _, _ = linear_reference(hidden, weight, targets, g)
    assert (uncapped_logp - ref_logp).abs().max() > 0.5  # the cap matters at these logits

    logp, lse = _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, cap)
    close(logp, ref_logp, LOGP_TOL)
    close(lse, ref_lse, LOGP_TOL)
    grad_hidden, grad_weight = _C.linear_token_logprobs_bwd(hidden, weight, targets, lse, g, IGNORE, cap, True)
    close(grad_hidden, ref_gh, OUT_TOL[dtype])
    close(grad_weight, ref_gw, OUT_TOL[dtype])
    logp2, lse2, direction = _C.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, cap)
    close(logp2, ref_logp, LOGP_TOL)
    close(direction, ref_direction, DIRECTION_TOL)
    close((g[:, None] * direction).to(dtype), ref_gh, OUT_TOL[dtype])


@needs_ext
def test_linear_softcap_saturates_without_nan():
    """Logits far past the cap (|z| ~ 1e4 ≫ c): z' = ±c, slope 0, no overflow in the exp of the tanh."""
    hidden = torch.tensor([[100.0, -100.0], [1.0, 2.0]])
    weight = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 2])
    logp, lse, direction = _C.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 2.0)
    ref_logp, _, ref_direction, _ = linear_reference(hidden, weight, targets, torch.ones(2), softcap=2.0)
    close(logp, ref_logp, LOGP_TOL)
    close(direction, ref_direction, DIRECTION_TOL)
    assert torch.isfinite(direction).all()
    with pytest.raises(RuntimeError, match="softcap must be a finite number > 0"):
        _C.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, -1.0)


# ------------------------------------------------------------------------------------------------
# segment statistics


def segment_inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, num_segments = 97, 6
    logp = -torch.rand(n, generator=gen) * 3  # spans both sides of log τ
    weights = 0.5 + torch.rand(n, generator=gen)
    segment_ids = torch.randint(0, num_segments - 1, (n,), generator=gen)  # last segment stays empty
    segment_ids[::4] = -1
    return logp, weights, segment_ids, num_segments


@needs_ext
def test_segment_stats_fwd_matches_reference():
    logp, weights, segment_ids, num_segments = segment_inputs(seed=1)
    tau = 0.4
    poison_heap((num_segments, NUM_STATS), torch.float32)
    stats = _C.segment_stats_fwd(logp, weights, segment_ids, num_segments, log_tau(tau))
    expected = segment_stats_reference(logp.double(), weights.double(), segment_ids, num_segments, tau)
    assert stats.dtype == torch.float32 and stats.shape == (num_segments, NUM_STATS)
    close(stats, expected, (1e-5, 1e-6))
    assert torch.all(stats[-1] == 0)
    # the gate fired for some tokens and not for others, so columns 4–6 are really exercised
    assert 0 < expected[:, 6].sum() < expected[:, 3].sum()


@needs_ext
def test_segment_stats_many_tokens_use_the_threaded_path():
    """Above 2^15 tokens the sums are split across threads (per-thread partial tables)."""
    gen = torch.Generator().manual_seed(12)
    n, num_segments, tau = 40_000, 37, 0.66
    logp = -torch.rand(n, generator=gen) * 2
    weights = 0.5 + torch.rand(n, generator=gen)
    segment_ids = torch.randint(-1, num_segments, (n,), generator=gen)
    stats = _C.segment_stats_fwd(logp, weights, segment_ids, num_segments, log_tau(tau))
    expected = segment_stats_reference(logp.double(), weights.double(), segment_ids, num_segments, tau)
    close(stats, expected, (1e-4, 1e-6))
    grad_stats = torch.randn(num_segments, NUM_STATS, generator=gen)
    x = logp.double().requires_grad_()
    (segment_stats_reference(x, weights.double(), segment_ids, num_segments, tau)
     * grad_stats.double()).sum().backward()
    close(_C.segment_stats_bwd(logp, weights, segment_ids, grad_stats, log_tau(tau)), x.grad,
          (1e-6, 1e-6))


@needs_ext
def test_segment_stats_bwd_matches_autograd_of_reference():
    logp, weights, segment_ids, num_segments = segment_inputs(seed=2)
    tau = 0.4
    gen = torch.Generator().manual_seed(9)
    grad_stats = torch.randn(num_segments, NUM_STATS, generator=gen)
    x = logp.double().requires_grad_()
    stats = segment_stats_reference(x, weights.double(), segment_ids, num_segments, tau)
    (stats * grad_stats.double()).sum().backward()
    grad = _C.segment_stats_bwd(logp, weights, segment_ids, grad_stats, log_tau(tau))
    assert grad.dtype == torch.float32
    close(grad, x.grad, (1e-6, 1e-6))
    assert torch.all(grad[segment_ids < 0] == 0)


# ------------------------------------------------------------------------------------------------
# argument checks name the argument


@needs_ext
def test_bad_arguments_are_named():
    logits = torch.randn(4, 10)
    targets = torch.tensor([1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="targets must be int64"):
        _C.token_logprobs_fwd(logits, targets.int(), IGNORE)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 10\).*found 10"):
        _C.token_logprobs_fwd(logits, torch.tensor([1, 10, 3, IGNORE]), IGNORE)
    with pytest.raises(RuntimeError, match="logits must be float32, bfloat16 or float16"):
        _C.token_logprobs_fwd(logits.double(), targets, IGNORE)
    with pytest.raises(RuntimeError, match="unit stride"):
        _C.token_logprobs_fwd(logits.T, targets[:1].repeat(10) * 0, IGNORE)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(4\)"):
        _C.token_logprobs_bwd(logits, targets, torch.zeros(3), torch.zeros(4), IGNORE)
    with pytest.raises(RuntimeError, match="disagree on H"):
        _C.linear_token_logprobs_fwd(torch.randn(4, 8), torch.randn(10, 9), targets, IGNORE, 0.0)
    with pytest.raises(RuntimeError, match="segment_ids must be < num_segments=2"):
        _C.segment_stats_fwd(torch.zeros(3), torch.ones(3), torch.tensor([0, 2, -1]), 2, -0.5)
    with pytest.raises(RuntimeError, match=r"grad_stats must have shape \(M, 7\)"):
        _C.segment_stats_bwd(torch.zeros(3), torch.ones(3), torch.tensor([0, 1, -1]),
                             torch.zeros(2, 6), -0.5)


# ------------------------------------------------------------------------------------------------
# the guarded loader


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as if nothing had been imported yet in this process."""
    monkeypatch.setattr(_cpp, "_module", _cpp._NOT_LOADED)
    monkeypatch.delenv(_cpp.DISABLE_ENV, raising=False)
    return _cpp


def test_loader_warns_exactly_once_when_extension_missing(fresh_loader, monkeypatch):
    # a None entry in sys.modules makes `from pvfast import _C` raise ImportError
    monkeypatch.setitem(sys.modules, "pvfast._C", None)
    if hasattr(sys.modules["pvfast"], "_C"):
        monkeypatch.delattr(sys.modules["pvfast"], "_C")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning, not only the first per location
        results = [fresh_loader.cpp_ops() for _ in range(3)] + [fresh_loader.cpp_available()]
    assert results == [None, None, None, False]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "pip install --no-build-isolation -e ." in messages[0]
    assert "falling back" in messages[0]


def test_loader_disabled_by_env_is_silent(fresh_loader, monkeypatch):
    monkeypatch.setenv(_cpp.DISABLE_ENV, "1")
    monkeypatch.setitem(sys.modules, "pvfast._C", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_loader.cpp_ops() is None
        assert fresh_loader.cpp_available() is False


@needs_ext
def test_loader_returns_built_extension(fresh_loader):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_loader.cpp_ops() is _C
        assert fresh_loader.cpp_available()
