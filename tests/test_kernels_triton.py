"""Triton kernels (pvfast.kernels) against float64 PyTorch references; CPU runs go through TRITON_INTERPRET=1.

The kernels are reached through the protocol adapter ``TritonBackend`` and the autograd Functions of
``pvfast.ops.functions`` (as the public ops do), mostly with small tiles so that the interpreter stays quick
and odd shapes straddle several tiles, chunks and vocabulary splits; the default GPU tiles run once too.
Tolerances: ``tests/ops_reference.py``.
"""

from __future__ import annotations

import pytest
import torch
from ops_reference import (  # noqa: F401  (poisoned_allocations is a fixture)
    DTYPES,
    IGNORE,
    assert_close_to_fp64,
    linear_inputs,
    poisoned_allocations,
    random_targets,
    random_upstream,
    reference_logprobs,
    segment_inputs,
)

from pvfast.kernels import linear_token_logprobs as lin
from pvfast.kernels.linear_token_logprobs import LinearConfig
from pvfast.objectives.config import log_tau
from pvfast.objectives.stats import NUM_STATS, segment_stats_reference
from pvfast.ops import functions as F
from pvfast.ops.triton_backend import TritonBackend

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

# Small tiles: 32-token tiles, 128-column logits tiles, 512-column chunks (N = 41, V = 1271, H = 96: 2 token
# tiles, 10 vocabulary tiles in 3 chunks, 2 K steps over H, 2 × 2 output tiles of B and 16 × 2 of C). The
# interpreter's cost grows with the number of tile operations, so the tiles are as large as coverage allows.
SMALL = LinearConfig(block_n=32, block_v=128, block_h=64, block_m=32, block_k=64, block_out=64, group=2,
                     num_warps=4, chunk_v=512)
SMALL_BACKEND = TritonBackend(SMALL)


def linear_logprobs(backend, hidden, weight, targets, softcap=None, grad_in_forward=None):
    """ℓ through the autograd Function; gradient in the forward exactly when the public op would use it."""
    if grad_in_forward is None:
        grad_in_forward = hidden.requires_grad and not weight.requires_grad
    return F.LinearTokenLogprobs.apply(backend, hidden, weight, targets, IGNORE, float(softcap or 0.0),
                                       grad_in_forward)


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
    ours = F.TokenLogprobs.apply(TritonBackend(token_block_v=block_v), ours_in, targets, IGNORE)
    ours.backward(upstream.float())
    ref_in = logits.double().requires_grad_()
    ref = reference_logprobs(ref_in, targets)
    ref.backward(upstream)
    same_in = logits.clone().requires_grad_()
    same = reference_logprobs(same_in, targets)
    same.backward(upstream.to(dtype))

    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    # ℓ is computed in fp32 from the (exactly representable) inputs: fp32 accuracy in every dtype.
    assert_close_to_fp64(ours, ref, None, torch.float32, "logp")
    assert_close_to_fp64(ours_in.grad, ref_in.grad, same_in.grad, dtype, "grad_logits")
    ignored = targets == IGNORE
    assert (ours[ignored] == 0).all() and (ours_in.grad[ignored] == 0).all()


def test_token_logprobs_lse_matches_logsumexp():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 700, generator=gen) * 4
    targets = random_targets(9, 700, gen, ignore_every=4)
    _, lse = TritonBackend(token_block_v=128).token_logprobs_fwd(logits, targets, IGNORE)
    expected = torch.where(targets != IGNORE, torch.logsumexp(logits.double(), -1), 0.0)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-6)


def test_token_logprobs_all_ignored_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 300, generator=gen).requires_grad_()
    targets = torch.full((6,), IGNORE)
    logp = F.TokenLogprobs.apply(TritonBackend(token_block_v=128), logits, targets, IGNORE)
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
    logp = F.TokenLogprobs.apply(TritonBackend(token_block_v=16_384), logits, targets, IGNORE)
    logp.backward(upstream.float())
    ref_in = logits.detach().double().requires_grad_()
    ref = reference_logprobs(ref_in, targets)
    ref.backward(upstream)
    same_in = logits.detach().clone().requires_grad_()
    reference_logprobs(same_in, targets).backward(upstream.float())
    assert_close_to_fp64(logp, ref, None, torch.float32, "logp")
    assert_close_to_fp64(logits.grad, ref_in.grad, None, torch.float32, "grad_logits")


# ---------------------------------------------------------------------------------------------------
# linear_token_logprobs: gradient in the forward (frozen weight) and recomputation (trainable weight)
# ---------------------------------------------------------------------------------------------------
def check_linear(backend, n, v, h, dtype, trainable, softcap, seed, scale=1.0):
    hidden, weight, targets, upstream = linear_inputs(n, v, h, dtype, seed, scale)
    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    ours = linear_logprobs(backend, h_in, w_in, targets, softcap)
    ours.backward(upstream.float())

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference_logprobs(h64 @ w64.T, targets, softcap)
    ref.backward(upstream)
    h_same, w_same = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference_logprobs(h_same @ w_same.T, targets, softcap).backward(upstream.to(dtype))

    assert ours.dtype == torch.float32 and h_in.grad.dtype == dtype
    assert_close_to_fp64(ours, ref.detach(), None, torch.float32, "logp")
    assert_close_to_fp64(h_in.grad, h64.grad, h_same.grad, dtype, "grad_hidden")
    assert (ours[targets == IGNORE] == 0).all() and (h_in.grad[targets == IGNORE] == 0).all()
    if trainable:
        assert w_in.grad.dtype == dtype
        assert_close_to_fp64(w_in.grad, w64.grad, w_same.grad, dtype, "grad_weight")
    else:
        assert w_in.grad is None


@pytest.mark.parametrize("n,v,h,dtype_name", [(64, 512, 64, "fp32"), (64, 512, 64, "bf16"), (41, 1271, 96, "fp32"),
                                               (41, 1271, 96, "fp16"), (41, 1271, 96, "bf16")])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_linear_token_logprobs_matches_fp64(n, v, h, dtype_name, trainable):
    check_linear(SMALL_BACKEND, n, v, h, DTYPES[dtype_name], trainable, None, seed=n + v + h)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_linear_softcap_matches_fp64(dtype_name, trainable):
    # Weights scaled ×6: logits reach well past c = 5, where the cap bends them (slope 1 − (z'/c)² → 0).
    check_linear(SMALL_BACKEND, 41, 1271, 96, DTYPES[dtype_name], trainable, 5.0, seed=17, scale=6.0)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_linear_default_gpu_tiles(dtype_name):
    """The launch configuration used on the GPU (one chunk here), frozen and trainable."""
    dtype = DTYPES[dtype_name]
    backend = TritonBackend(lin.FP32_CONFIG if dtype == torch.float32 else lin.DEFAULT_CONFIG)
    check_linear(backend, 41, 1271, 96, dtype, False, None, seed=23)
    check_linear(backend, 41, 1271, 96, dtype, True, None, seed=24)


def test_linear_online_rescale_across_chunks_and_splits():
    """Logits rising along the vocabulary: every chunk raises the running max, so the accumulator is rescaled
    by α = e^(M_old − M) at every chunk (by up to e^-12 here) and each split's partials by β."""
    n, v, h = 7, 2600, 24
    gen = torch.Generator().manual_seed(13)
    hidden = torch.randn(n, h, generator=gen)
    hidden[:, 0] = hidden[:, 0].abs() + 1.0
    weight = torch.randn(v, h, generator=gen) * 0.1
    weight[:, 0] = torch.linspace(0.0, 60.0, v)  # the last logit ≥ 60 above the first
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[2], targets[3] = v - 1, 0  # the first entry: ℓ ≈ −60, still exact after all the rescaling
    upstream = random_upstream(n, gen)
    cfg = LinearConfig(block_n=16, block_v=32, block_h=16, block_m=16, block_k=32, block_out=16, num_warps=4,
                       chunk_v=320)
    h_in = hidden.clone().requires_grad_()
    ours = linear_logprobs(TritonBackend(cfg), h_in, weight, targets)
    ours.backward(upstream.float())
    h64 = hidden.double().requires_grad_()
    ref = reference_logprobs(h64 @ weight.double().T, targets)
    ref.backward(upstream)
    assert_close_to_fp64(ours, ref.detach(), None, torch.float32, "logp")
    assert_close_to_fp64(h_in.grad, h64.grad, None, torch.float32, "grad_hidden")


def test_linear_direction_and_lse_of_the_forward():
    """linear_token_logprobs_fwd_with_grad: lse and dℓ/dh (upstream 1) against float64 autograd.

    The direction is fp32, but with bf16 inputs it sums bf16-rounded probabilities (the P chunk), so it is
    held to torch's own bf16 gradient error, like the gradient it becomes."""
    hidden, weight, targets, _ = linear_inputs(41, 1271, 96, torch.bfloat16, seed=113)
    logp, lse, direction = SMALL_BACKEND.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 0.0)
    h64 = hidden.double().requires_grad_()
    z64 = h64 @ weight.double().T
    reference_logprobs(z64, targets).sum().backward()
    h_same = hidden.clone().requires_grad_()
    reference_logprobs(h_same @ weight.T, targets).sum().backward()
    scored = targets != IGNORE
    assert direction.dtype == torch.float32 and direction.shape == hidden.shape
    assert_close_to_fp64(lse[scored], torch.logsumexp(z64, -1)[scored].detach(), None, torch.float32, "lse")
    assert_close_to_fp64(direction, h64.grad, h_same.grad, torch.bfloat16, "direction")
    assert torch.all(direction[~scored] == 0) and torch.all(lse[~scored] == 0)


def test_linear_all_ignored_batch():
    hidden, weight, targets, upstream = linear_inputs(18, 200, 32, torch.float32, seed=9)
    targets = torch.full_like(targets, IGNORE)
    for trainable in (False, True):
        h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        logp = linear_logprobs(SMALL_BACKEND, h_in, w_in, targets)
        logp.backward(upstream.float())
        assert (logp == 0).all() and (h_in.grad == 0).all()
        assert not trainable or (w_in.grad == 0).all()


@pytest.mark.slow
def test_linear_large_vocab():
    # V > 65,536 with a tiny batch and wide tiles to keep the interpreter quick; both gradient paths.
    n, v, h = 4, 66_000, 16
    cfg = LinearConfig(block_n=16, block_v=2048, block_h=16, block_m=16, block_k=256, block_out=16, num_warps=4,
                       chunk_v=32_768)
    hidden, weight, targets, upstream = linear_inputs(n, v, h, torch.float32, seed=11)
    targets = torch.tensor([v - 1, 65_537, IGNORE, 3])
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference_logprobs(h64 @ w64.T, targets)
    ref.backward(upstream)
    for trainable in (False, True):
        h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        logp = linear_logprobs(TritonBackend(cfg), h_in, w_in, targets)
        logp.backward(upstream.float())
        assert_close_to_fp64(logp, ref.detach(), None, torch.float32, "logp")
        assert_close_to_fp64(h_in.grad, h64.grad, None, torch.float32, "grad_hidden")
        if trainable:
            assert_close_to_fp64(w_in.grad, w64.grad, None, torch.float32, "grad_weight")


# ---------------------------------------------------------------------------------------------------
# segment statistics: standalone and fused into the linear forward
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_segment_stats_matches_reference(tau):
    n, m = 1500, 6  # more tokens than one program's block
    gen = torch.Generator().manual_seed(21)
    logp64 = -torch.rand(n, generator=gen, dtype=torch.float64) * 4
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)

    logp = logp64.float().requires_grad_()
    stats = F.SegmentStats.apply(SMALL_BACKEND, logp, weights.float(), segment_ids, m, log_tau(tau))
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
    stats = F.SegmentStats.apply(SMALL_BACKEND, logp, weights, segment_ids, 2, log_tau(0.5))
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


@pytest.mark.parametrize("dtype_name,trainable,softcap", [("fp32", True, None), ("bf16", False, None),
                                                         ("bf16", True, None), ("fp32", False, 4.0)])
def test_linear_segment_stats_matches_composed_reference(dtype_name, trainable, softcap):
    dtype = DTYPES[dtype_name]
    n, v, h, m = 41, 1271, 96, 5
    hidden, weight, targets, _ = linear_inputs(n, v, h, dtype, seed=31, scale=3.0)
    gen = torch.Generator().manual_seed(32)
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)
    segment_ids[targets == IGNORE] = -1  # ignored targets are not scored (the trainer's convention)
    tau = gate_splitting_tau(reference_logprobs(hidden.double() @ weight.double().T, targets, softcap), segment_ids)

    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    stats = F.LinearSegmentStats.apply(SMALL_BACKEND, h_in, w_in, targets, weights.float(), segment_ids, m,
                                       log_tau(tau), IGNORE, float(softcap or 0.0), not trainable)
    (stats * grad_stats.float()).sum().backward()

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = segment_stats_reference(reference_logprobs(h64 @ w64.T, targets, softcap), weights, segment_ids, m, tau)
    (ref * grad_stats).sum().backward()
    h_same, w_same = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    same = segment_stats_reference(reference_logprobs(h_same @ w_same.T, targets, softcap), weights.to(dtype),
                                   segment_ids, m, tau)
    (same * grad_stats.to(dtype)).sum().backward()

    # Gate columns count tokens: exact unless a log-prob sits within rounding of log τ.
    assert 0 < ref[:, 6].sum() < ref[:, 3].sum(), "the gate must fire for some tokens and not others"
    assert_close_to_fp64(stats, ref.detach(), same.detach(), dtype, "stats")
    assert (stats[m - 1] == 0).all(), "the empty segment must stay zero"
    assert_close_to_fp64(h_in.grad, h64.grad, h_same.grad, dtype, "grad_hidden")
    if trainable:
        assert_close_to_fp64(w_in.grad, w64.grad, w_same.grad, dtype, "grad_weight")
    else:
        assert w_in.grad is None


def gate_splitting_tau(logp64: torch.Tensor, segment_ids: torch.Tensor) -> float:
    """τ with log τ halfway between two middle scored log-probs: the gate fires for about half the tokens and
    no log-prob sits within rounding of the threshold."""
    scored = logp64[segment_ids >= 0].sort().values
    k = len(scored) // 2
    return float(torch.exp((scored[k - 1] + scored[k]) / 2))


def test_linear_segment_stats_all_unscored():
    hidden, weight, targets, _ = linear_inputs(17, 150, 32, torch.float32, seed=41)
    h_in = hidden.clone().requires_grad_()
    segment_ids = torch.full((17,), -1)
    stats = F.LinearSegmentStats.apply(SMALL_BACKEND, h_in, weight, targets, torch.rand(17) + 0.1, segment_ids, 3,
                                       log_tau(0.5), IGNORE, 0.0, True)
    (stats * torch.randn(3, NUM_STATS)).sum().backward()
    assert (stats == 0).all() and (h_in.grad == 0).all()


# ---------------------------------------------------------------------------------------------------
# Out-of-range indices: refused by the host check (CPU default, or PVFAST_CHECK_INDICES=1), poisoned otherwise
# ---------------------------------------------------------------------------------------------------
def test_out_of_range_target_is_refused_or_poisoned(monkeypatch):
    hidden, weight, targets, _ = linear_inputs(20, 200, 32, torch.float32, seed=61)
    targets[1], targets[2] = 200, -3  # one past the vocabulary; a negative id other than ignore_index
    logits = hidden @ weight.T
    backend = TritonBackend(SMALL, token_block_v=128)
    for mode in ("auto", "1"):  # auto: CPU tensors are checked (no device to synchronise)
        monkeypatch.setenv("PVFAST_CHECK_INDICES", mode)
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 200\).*targets\[1\] = 200"):
            backend.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
        with pytest.raises(ValueError, match=r"targets\[1\] = 200"):
            backend.token_logprobs_fwd(logits, targets, IGNORE)

    monkeypatch.setenv("PVFAST_CHECK_INDICES", "0")  # the GPU default: no host sync, the kernels poison
    bad = torch.zeros(20, dtype=torch.bool)
    bad[1:3] = True
    good_ref = reference_logprobs(logits.double(), torch.where(bad, IGNORE, targets))[~bad]
    logp, lse, direction = backend.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 0.0)
    assert logp[bad].isnan().all() and lse[bad].isnan().all() and direction[bad].isnan().all()
    assert_close_to_fp64(logp[~bad], good_ref, None, torch.float32, "logp of the valid rows")
    assert torch.isfinite(direction[~bad]).all()
    logp0, _ = backend.linear_token_logprobs_fwd(hidden, weight, targets, IGNORE, 0.0)
    assert logp0[bad].isnan().all() and torch.isfinite(logp0[~bad]).all()
    logp_direct, _ = backend.token_logprobs_fwd(logits, targets, IGNORE)
    assert logp_direct[bad].isnan().all()
    assert_close_to_fp64(logp_direct[~bad], good_ref, None, torch.float32, "direct logp of the valid rows")


def test_out_of_range_segment_id_is_refused_or_poisoned(monkeypatch):
    hidden, weight, targets, _ = linear_inputs(20, 200, 32, torch.float32, seed=62)
    weights = torch.rand(20) + 0.1
    segment_ids = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(63))
    segment_ids[5] = 3  # == num_segments
    logp = -torch.rand(20)
    backend = TritonBackend(SMALL)
    monkeypatch.setenv("PVFAST_CHECK_INDICES", "auto")
    with pytest.raises(ValueError, match=r"segment_ids must be < num_segments=3.*segment_ids\[5\] = 3"):
        backend.segment_stats_fwd(logp, weights, segment_ids, 3, -0.5)
    with pytest.raises(ValueError, match=r"segment_ids\[5\] = 3"):
        backend.linear_segment_stats_fwd(hidden, weight, targets, weights, segment_ids, 3, -0.5, IGNORE, 0.0, False)

    monkeypatch.setenv("PVFAST_CHECK_INDICES", "0")
    stats = backend.segment_stats_fwd(logp, weights, segment_ids, 3, -0.5)
    assert stats[0].isnan().all() and torch.isfinite(stats[1:]).all()
    _, _, fused, _ = backend.linear_segment_stats_fwd(hidden, weight, targets, weights, segment_ids, 3, -0.5,
                                                      IGNORE, 0.0, True)
    assert fused[0].isnan().all()
    grad = backend.segment_stats_bwd(logp, weights, segment_ids, torch.ones(3, NUM_STATS), -0.5)
    assert grad[5].isnan() and torch.isfinite(grad[segment_ids < 3]).all()


def test_index_check_flag_values(monkeypatch):
    from pvfast.kernels import index_checks_enabled

    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    expected = {"auto": (True, False), "1": (True, True), "0": (False, False)}
    for mode, (on_cpu, on_cuda) in expected.items():
        monkeypatch.setenv("PVFAST_CHECK_INDICES", mode)
        assert (index_checks_enabled(cpu), index_checks_enabled(cuda), index_checks_enabled(meta)) == \
            (on_cpu, on_cuda, False)
    monkeypatch.setenv("PVFAST_CHECK_INDICES", "yes")
    with pytest.raises(ValueError, match="PVFAST_CHECK_INDICES must be auto, 0 or 1"):
        index_checks_enabled(cpu)


def test_chunk_plan_bounds_the_probability_buffer():
    """The P buffer (N × C, input dtype) stays within chunk_bytes; C is a multiple of the logits tile."""
    cfg = LinearConfig(chunk_bytes=64 * 2**20)
    plan = lin._Plan(8192, 128_256, 4096, torch.bfloat16, torch.device("meta"), cfg, store_chunk=True)
    assert plan.chunk % cfg.block_v == 0 and 8192 * plan.chunk * 2 <= cfg.chunk_bytes
    assert plan.chunk == 4096 and sum(cols for _, cols in plan.chunks()) == 128_256
    assert plan.splits * plan.tiles_per_split >= plan.chunk_tiles
    small = lin._Plan(41, 1271, 96, torch.float32, torch.device("meta"), cfg, store_chunk=True)
    assert small.chunk == 1280  # the whole (padded) vocabulary fits the budget: one chunk


# ---------------------------------------------------------------------------------------------------
# On a real GPU (skipped without CUDA): default tiles, realistic shapes, bf16 and fp32, both gradient paths.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_linear_segment_stats_cuda(dtype_name, trainable):
    dtype = DTYPES[dtype_name]
    n, v, h, m, tau = 1000, 32_003, 512, 8, 0.5
    hidden, weight, targets, _ = linear_inputs(n, v, h, dtype, seed=51)
    gen = torch.Generator().manual_seed(52)
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)
    segment_ids[targets == IGNORE] = -1
    cuda = torch.device("cuda")
    h_in = hidden.to(cuda).requires_grad_()
    w_in = weight.to(cuda).requires_grad_(trainable)
    stats = F.LinearSegmentStats.apply(TritonBackend(), h_in, w_in, targets.to(cuda), weights.float().to(cuda),
                                       segment_ids.to(cuda), m, log_tau(tau), IGNORE, 0.0, not trainable)
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
    if trainable:
        assert_close_to_fp64(w_in.grad.cpu(), w64.grad, w_same.grad, dtype, "grad_weight")
