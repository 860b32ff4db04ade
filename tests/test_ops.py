"""Public ops (pvfast.ops.dispatch): every backend against float64 references, the statistics contract, dispatch,
and input errors.

Backends: "torch" (chunked reference), "triton" (interpreter on the CPU, small tiles), "auto", and "cpp" when
the extension pvfast._C is built. Every backend runs the same forward and backward tests (the one-Function-
per-op design: the autograd code is shared, only the backend differs). Allocations are NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch
from ops_reference import (  # noqa: F401  (poisoned_allocations is a fixture)
    DTYPES,
    IGNORE,
    assert_close_to_fp64,
    assert_within_torch_error,
    linear_inputs,
    poisoned_allocations,
    random_targets,
    random_upstream,
    reference_logprobs,
    segment_inputs,
)

from pvfast.kernels.linear_token_logprobs import LinearConfig
from pvfast.objectives import stats as contract
from pvfast.objectives.stats import NUM_STATS, STAT_FIELDS, segment_stats_reference
from pvfast.ops import codegen, torch_backend
from pvfast.ops import dispatch as ops
from pvfast.ops.backend import BACKEND_FUNCTIONS, Backend
from pvfast.ops.triton_backend import TritonBackend

CPP_BUILT = ops._cpp_module() is not None
needs_cpp = pytest.mark.skipif(not CPP_BUILT, reason="pvfast._C is not built")
IMPLS = ["torch", "triton", "auto", pytest.param("cpp", marks=needs_cpp)]
BACKEND_IMPLS = ["torch", "triton", pytest.param("cpp", marks=needs_cpp)]
SMALL_TRITON = TritonBackend(LinearConfig(block_n=32, block_v=128, block_h=64, block_m=32, block_k=64, block_out=64,
                                          group=2, num_warps=4, chunk_v=512), token_block_v=512)

pytestmark = pytest.mark.usefixtures("poisoned_allocations")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several chunks per call: torch backend N = 41 → 3 chunks, Triton V = 1271 → 3 chunks of 512 columns."""
    monkeypatch.setattr(torch_backend, "TORCH_CHUNK_TOKENS", 16)
    monkeypatch.setattr(ops, "_TRITON", SMALL_TRITON)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_token_logprobs(impl, dtype_name):
    dtype = DTYPES[dtype_name]
    n, v = 41, 1271
    gen = torch.Generator().manual_seed(101)
    logits = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    targets = random_targets(n, v, gen)
    upstream = random_upstream(n, gen)

    ours_in = logits.clone().requires_grad_()
    ours = ops.token_logprobs(ours_in, targets, impl=impl)
    ours.backward(upstream.float())
    ref_in = logits.double().requires_grad_()
    ref = reference_logprobs(ref_in, targets)
    ref.backward(upstream)
    same_in = logits.clone().requires_grad_()
    reference_logprobs(same_in, targets).backward(upstream.to(dtype))

    assert ours.dtype == torch.float32 and ours_in.grad.dtype == dtype
    assert_close_to_fp64(ours, ref, None, torch.float32, "logp")
    assert_close_to_fp64(ours_in.grad, ref_in.grad, same_in.grad, dtype, "grad_logits")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype_name,weight_grad", [("fp32", True), ("bf16", False), ("bf16", True)])
@pytest.mark.parametrize("softcap", [None, 5.0], ids=["nocap", "softcap"])
def test_linear_token_logprobs(impl, dtype_name, weight_grad, softcap):
    dtype = DTYPES[dtype_name]
    # weights ×4: with the cap, logits reach past c = 5 where capping bends them
    hidden, weight, targets, upstream = linear_inputs(41, 1271, 96, dtype, seed=102, scale=4.0)

    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    ours = ops.linear_token_logprobs(h_in, w_in, targets, softcap=softcap, impl=impl)
    ours.backward(upstream.float())
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference_logprobs(h64 @ w64.T, targets, softcap)
    ref.backward(upstream)
    h_same, w_same = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference_logprobs(h_same @ w_same.T, targets, softcap).backward(upstream.to(dtype))

    assert_close_to_fp64(ours, ref.detach(), None, torch.float32, "logp")
    assert_close_to_fp64(h_in.grad, h64.grad, h_same.grad, dtype, "grad_hidden")
    if weight_grad:
        assert_close_to_fp64(w_in.grad, w64.grad, w_same.grad, dtype, "grad_weight")
    else:
        assert w_in.grad is None
    if softcap is not None:  # the cap changed the answer: a test that would pass without it proves nothing
        uncapped = reference_logprobs(hidden.double() @ weight.double().T, targets)
        assert (uncapped - ref.detach()).abs().max() > 0.1


def test_linear_aligned_shape_every_backend():
    hidden, weight, targets, upstream = linear_inputs(64, 512, 64, torch.float32, seed=120)
    h64 = hidden.double().requires_grad_()
    ref = reference_logprobs(h64 @ weight.double().T, targets)
    ref.backward(upstream)
    for impl in ["torch", "triton"] + (["cpp"] if CPP_BUILT else []):
        h_in = hidden.clone().requires_grad_()
        ours = ops.linear_token_logprobs(h_in, weight, targets, impl=impl)
        ours.backward(upstream.float())
        assert_close_to_fp64(ours, ref.detach(), None, torch.float32, f"logp ({impl})")
        assert_close_to_fp64(h_in.grad, h64.grad, None, torch.float32, f"grad_hidden ({impl})")


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_stats(impl):
    n, m, tau = 300, 7, 0.25
    gen = torch.Generator().manual_seed(103)
    logp64 = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    weights, segment_ids, grad_stats = segment_inputs(n, m, gen)

    logp = logp64.float().requires_grad_()
    stats = ops.segment_stats(logp, weights.float(), segment_ids, m, tau, impl=impl)
    (stats * grad_stats.float()).sum().backward()
    ref_in = logp64.clone().requires_grad_()
    ref = segment_stats_reference(ref_in, weights, segment_ids, m, tau)
    (ref * grad_stats).sum().backward()

    assert stats.shape == (m, NUM_STATS) and stats.dtype == torch.float32
    assert 0 < ref[:, 6].sum() < ref[:, 3].sum()  # the gate fires for some tokens only
    torch.testing.assert_close(stats.double(), ref.detach(), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(logp.grad.double(), ref_in.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("trainable,softcap", [(True, None), (False, None), (False, 6.0)])
def test_linear_segment_stats(impl, trainable, softcap):
    n, v, h, m = 41, 1271, 96, 5
    hidden, weight, targets, _ = linear_inputs(n, v, h, torch.float32, seed=104, scale=4.0)
    weights, segment_ids, grad_stats = segment_inputs(n, m, torch.Generator().manual_seed(105))
    segment_ids[targets == IGNORE] = -1
    logp64 = reference_logprobs(hidden.double() @ weight.double().T, targets, softcap)
    scored = logp64[segment_ids >= 0].sort().values
    tau = float(torch.exp((scored[len(scored) // 2 - 1] + scored[len(scored) // 2]) / 2))  # gate splits the tokens

    h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    # int32 targets and segment ids are accepted as well as int64.
    stats = ops.linear_segment_stats(h_in, w_in, targets.int(), weights.float(), segment_ids.int(), m, tau,
                                     softcap=softcap, impl=impl)
    (stats * grad_stats.float()).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = segment_stats_reference(reference_logprobs(h64 @ w64.T, targets, softcap), weights, segment_ids, m, tau)
    (ref * grad_stats).sum().backward()

    assert_close_to_fp64(stats, ref.detach(), None, torch.float32, "stats")
    assert (stats[m - 1] == 0).all()
    assert_close_to_fp64(h_in.grad, h64.grad, None, torch.float32, "grad_hidden")
    if trainable:
        assert_close_to_fp64(w_in.grad, w64.grad, None, torch.float32, "grad_weight")
    else:
        assert w_in.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_unscored(impl):
    hidden, weight, _, upstream = linear_inputs(20, 200, 32, torch.float32, seed=106)
    targets = torch.full((20,), IGNORE)
    for trainable in (False, True):
        h_in, w_in = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        logp = ops.linear_token_logprobs(h_in, w_in, targets, impl=impl)
        logp.backward(upstream.float())
        assert (logp == 0).all() and (h_in.grad == 0).all()
        assert not trainable or (w_in.grad == 0).all()

    logits = (hidden @ weight.T).requires_grad_()
    logp = ops.token_logprobs(logits, targets, impl=impl)
    logp.backward(upstream.float())
    assert (logp == 0).all() and (logits.grad == 0).all()

    live_targets = torch.randint(0, 200, (20,), generator=torch.Generator().manual_seed(107))
    h_in = hidden.clone().requires_grad_()
    stats = ops.linear_segment_stats(h_in, weight, live_targets, torch.rand(20) + 0.1,
                                     torch.full((20,), -1), 2, 0.5, impl=impl)
    (stats * torch.randn(2, NUM_STATS)).sum().backward()
    assert (stats == 0).all() and (h_in.grad == 0).all()


@pytest.mark.parametrize("impl", BACKEND_IMPLS)
def test_large_vocab_every_backend(impl):
    """V > 65,536: our fp32 error ≤ 2 × torch's own fp32 error + tol, against float64."""
    if impl == "triton":  # wide tiles keep the interpreter quick
        ops_backend = TritonBackend(LinearConfig(block_n=16, block_v=2048, block_h=16, block_m=16, block_k=256,
                                                 block_out=16, num_warps=4), token_block_v=16_384)
    else:
        ops_backend = None
    n, v, h = 4, 70_001, 16
    hidden, weight, _, upstream = linear_inputs(n, v, h, torch.float32, seed=108, scale=3.0)
    targets = torch.tensor([v - 1, IGNORE, 65_536, 3])
    with pytest.MonkeyPatch.context() as patch:
        if ops_backend is not None:
            patch.setattr(ops, "_TRITON", ops_backend)
        h_in = hidden.clone().requires_grad_()
        ours = ops.linear_token_logprobs(h_in, weight, targets, impl=impl)
        ours.backward(upstream.float())
        logits = hidden @ weight.T
        direct = ops.token_logprobs(logits, targets, impl=impl)
    h64 = hidden.double().requires_grad_()
    ref = reference_logprobs(h64 @ weight.double().T, targets)
    ref.backward(upstream)
    h32 = hidden.clone().requires_grad_()
    same = reference_logprobs(h32 @ weight.T, targets)
    same.backward(upstream.float())
    assert_within_torch_error(ours, ref.detach(), same.detach(), "logp")
    assert_within_torch_error(direct, ref.detach(), same.detach(), "logp from logits")
    assert_within_torch_error(h_in.grad, h64.grad, h32.grad, "grad_hidden")


# ---------------------------------------------------------------------------------------------------
# One Function per op over any backend: the gradient in the forward for a frozen weight
# ---------------------------------------------------------------------------------------------------
class _CallLog:
    """A backend stand-in that forwards to `backend` and records the names of the functions called."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        attr = getattr(self.backend, name)  # AttributeError for a function the backend does not have
        self.calls.append(name)
        return attr


def _spy_backend(monkeypatch, impl) -> _CallLog:
    log = _CallLog(ops._backend(impl))
    monkeypatch.setattr(ops, "_backend", lambda _impl: log)
    return log


@pytest.mark.parametrize("impl", BACKEND_IMPLS)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_frozen_weight_gradient_is_computed_in_the_forward(monkeypatch, impl, dtype_name):
    """linear_token_logprobs and linear_segment_stats with a frozen weight: the forward computes ℓ and dℓ/dhidden;
    no backward recomputation is called; the gradients still match float64 autograd."""
    dtype = DTYPES[dtype_name]
    n, v, h, m, tau = 41, 1271, 96, 5, 0.2
    hidden, weight, targets, upstream = linear_inputs(n, v, h, dtype, seed=110)
    weights, segment_ids, grad_stats = segment_inputs(n, m, torch.Generator().manual_seed(111))
    segment_ids[targets == IGNORE] = -1
    log = _spy_backend(monkeypatch, impl)

    h_tok = hidden.clone().requires_grad_()
    ours = ops.linear_token_logprobs(h_tok, weight, targets, impl=impl)
    ours.backward(upstream.float())
    h_seg = hidden.clone().requires_grad_()
    stats = ops.linear_segment_stats(h_seg, weight, targets, weights.float(), segment_ids, m, tau, impl=impl)
    (stats * grad_stats.float()).sum().backward()
    fused = impl == "triton"  # the Triton backend reduces the stats inside its linear forward
    assert log.calls.count("linear_token_logprobs_fwd_with_grad") == (1 if fused else 2)
    assert log.calls.count("linear_segment_stats_fwd") == (1 if fused else 0)
    assert "linear_token_logprobs_fwd" not in log.calls and "linear_token_logprobs_bwd" not in log.calls

    h64, w64 = hidden.double().requires_grad_(), weight.double()
    ref = reference_logprobs(h64 @ w64.T, targets)
    ref.backward(upstream)
    h64_seg = hidden.double().requires_grad_()
    ref_stats = segment_stats_reference(reference_logprobs(h64_seg @ w64.T, targets), weights, segment_ids, m, tau)
    (ref_stats * grad_stats).sum().backward()
    h_same = hidden.clone().requires_grad_()
    reference_logprobs(h_same @ weight.T, targets).backward(upstream.to(dtype))
    h_same_seg = hidden.clone().requires_grad_()
    (segment_stats_reference(reference_logprobs(h_same_seg @ weight.T, targets), weights.to(dtype), segment_ids, m,
                             tau) * grad_stats.to(dtype)).sum().backward()

    assert h_tok.grad.dtype == dtype and h_seg.grad.dtype == dtype
    assert_close_to_fp64(ours, ref.detach(), None, torch.float32, "logp")
    assert_close_to_fp64(h_tok.grad, h64.grad, h_same.grad, dtype, "grad_hidden")
    assert torch.all(h_tok.grad[targets == IGNORE] == 0)
    assert_close_to_fp64(stats, ref_stats.detach(), None, torch.float32, "stats")
    assert_close_to_fp64(h_seg.grad, h64_seg.grad, h_same_seg.grad, dtype, "grad_hidden (segments)")
    assert weight.grad is None


@pytest.mark.parametrize("impl", BACKEND_IMPLS)
def test_gradient_in_forward_only_when_hidden_needs_it_and_weight_is_frozen(monkeypatch, impl):
    hidden, weight, targets, _ = linear_inputs(9, 50, 8, torch.float32, seed=112)
    log = _spy_backend(monkeypatch, impl)
    with torch.no_grad():  # e.g. the reference model's pass
        ops.linear_token_logprobs(hidden.clone().requires_grad_(), weight, targets, impl=impl)
    ops.linear_token_logprobs(hidden, weight, targets, impl=impl)  # nothing requires grad
    ops.linear_token_logprobs(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets,
                              impl=impl).sum().backward()  # trainable weight: recompute path
    assert "linear_token_logprobs_fwd_with_grad" not in log.calls
    assert log.calls.count("linear_token_logprobs_fwd") == 3 and log.calls.count("linear_token_logprobs_bwd") == 1


def test_torch_backend_gradient_direction_matches_float64():
    """TorchBackend.linear_token_logprobs_fwd_with_grad over several chunks (16 tokens each here)."""
    hidden, weight, targets, _ = linear_inputs(41, 1271, 96, torch.bfloat16, seed=113)
    logp, lse, direction = ops.TorchBackend.linear_token_logprobs_fwd_with_grad(hidden, weight, targets, IGNORE, 0.0)
    h64 = hidden.double().requires_grad_()
    z64 = h64 @ weight.double().T
    ref = reference_logprobs(z64, targets)
    ref.sum().backward()
    scored = targets != IGNORE
    assert direction.dtype == torch.float32 and direction.shape == hidden.shape
    assert_close_to_fp64(logp, ref.detach(), None, torch.float32, "logp")
    assert_close_to_fp64(lse[scored], torch.logsumexp(z64, -1)[scored].detach(), None, torch.float32, "lse")
    assert_close_to_fp64(direction, h64.grad, None, torch.float32, "direction")
    assert torch.all(direction[~scored] == 0) and torch.all(lse[~scored] == 0)


def test_every_backend_follows_the_protocol():
    backends = [ops.TorchBackend, TritonBackend()] + ([ops._cpp_module()] if CPP_BUILT else [])
    for backend in backends:
        assert isinstance(backend, Backend), backend
        assert all(callable(getattr(backend, name)) for name in BACKEND_FUNCTIONS)


# ---------------------------------------------------------------------------------------------------
# The statistics contract: one definition, generated code current, derivatives consistent
# ---------------------------------------------------------------------------------------------------
def test_generated_stats_code_is_current():
    """csrc/pvfast_stats.h and kernels/stats_math.py are what `python -m pvfast.ops.codegen` renders now."""
    assert codegen.stale_files() == [], "run `python -m pvfast.ops.codegen` and rebuild the C++ extension"
    header = (codegen.REPO_ROOT / codegen.CPP_HEADER).read_text()
    for i, name in enumerate(STAT_FIELDS):
        assert f"{codegen.cpp_enum_name(name)} = {i}," in header


def test_stats_contract_derivatives_match_autograd_of_the_columns():
    """token_logp_grad (the backward every backend implements) is the derivative of token_stat_columns."""
    gen = torch.Generator().manual_seed(114)
    logp = (-torch.rand(50, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    weights = torch.rand(50, generator=gen, dtype=torch.float64) + 0.1
    upstream = torch.randn(50, NUM_STATS, generator=gen, dtype=torch.float64)
    lt = -1.2
    cols = contract.token_stat_columns(logp, weights, lt)
    (cols * upstream).sum().backward()
    torch.testing.assert_close(contract.token_logp_grad(upstream, logp.detach(), weights, lt), logp.grad)
    gate = contract.gate(logp, lt)
    assert 0 < gate.sum() < 50 and not gate.requires_grad
    # the documented column formulas
    expected = torch.stack([logp, weights * logp, weights, torch.ones_like(logp), -(weights * gate * logp),
                            weights * gate, gate], dim=1)
    torch.testing.assert_close(cols, expected)
    assert contract.DIFFERENTIABLE_COLUMNS == (contract.LOGP_SUM, contract.WLOGP_SUM, contract.GATED_WNLL_SUM)


# ---------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------
def test_auto_on_cpu_prefers_cpp_then_interpreter_then_torch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(ops, "_cpp_module", lambda: ops.TorchBackend)  # stands in for a built extension
    assert ops._resolve_impl("auto", cpu, "op") == "cpp"
    monkeypatch.setattr(ops, "_cpp_module", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops._resolve_impl("auto", cpu, "op") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops._resolve_impl("auto", cpu, "op") == "torch"
    assert ops._resolve_impl("auto", torch.device("cuda"), "op") == "triton"


def test_cpp_path_uses_backend_signatures(monkeypatch):
    # A stand-in with the extension's function names checks the wiring of the cpp path (grad_weight as an
    # empty tensor when not needed), whether or not the real extension is built here.
    monkeypatch.setattr(ops, "_cpp_module", lambda: ops.TorchBackend)
    hidden, weight, targets, upstream = linear_inputs(9, 50, 8, torch.float32, seed=109)
    h_in = hidden.clone().requires_grad_()
    ops.linear_token_logprobs(h_in, weight, targets, impl="cpp").backward(upstream.float())
    h64 = hidden.double().requires_grad_()
    reference_logprobs(h64 @ weight.double().T, targets).backward(upstream)
    torch.testing.assert_close(h_in.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    assert weight.grad is None


def test_unavailable_backends_raise(monkeypatch):
    logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, IGNORE])
    monkeypatch.setattr(ops, "_cpp_module", lambda: None)
    with pytest.raises(RuntimeError, match=r"pvfast\._C"):
        ops.token_logprobs(logits, targets, impl="cpp")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.token_logprobs(logits, targets, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.token_logprobs(logits, targets, impl="cuda")


# ---------------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, IGNORE])
    with pytest.raises(ValueError, match=r"logits must be \(N, V\)"):
        ops.token_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match=r"targets must be \(N,\)"):
        ops.token_logprobs(logits, targets[:3])
    with pytest.raises(TypeError, match="logits must be float32/float16/bfloat16"):
        ops.token_logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="targets must be int32 or int64"):
        ops.token_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets on meta"):
        ops.token_logprobs(logits, targets.to("meta"))

    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        ops.linear_token_logprobs(hidden, weight[:, :6], targets)
    with pytest.raises(TypeError, match="share a float32/float16/bfloat16 dtype"):
        ops.linear_token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="different devices"):
        ops.linear_token_logprobs(hidden, weight.to("meta"), targets)
    for bad_cap in (0.0, -30.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ValueError, match="softcap must be None"):
            ops.linear_token_logprobs(hidden, weight, targets, softcap=bad_cap)
    with pytest.raises(ValueError, match="linear_segment_stats: softcap"):
        ops.linear_segment_stats(hidden, weight, targets, torch.rand(4), torch.tensor([0, 0, 1, -1]), 2, 0.5,
                                 softcap=-1.0)

    logp, weights, segment_ids = -torch.rand(4), torch.rand(4), torch.tensor([0, 0, 1, -1])
    with pytest.raises(ValueError, match=r"weights and segment_ids must be \(4,\)"):
        ops.segment_stats(logp, weights[:3], segment_ids, 2, 0.5)
    with pytest.raises(TypeError, match="segment_ids must be int32 or int64"):
        ops.segment_stats(logp, weights, segment_ids.float(), 2, 0.5)
    with pytest.raises(ValueError, match=r"tau must be in \(0, 1\]"):
        ops.segment_stats(logp, weights, segment_ids, 2, 1.5)
    with pytest.raises(ValueError, match=r"weights and segment_ids must be \(4,\)"):
        ops.linear_segment_stats(hidden, weight, targets, weights, segment_ids[:2], 2, 0.5)


@pytest.mark.parametrize("impl", BACKEND_IMPLS)
def test_out_of_range_indices_are_refused_on_the_cpu(impl):
    """Every backend refuses a target outside [0, V) and a segment id ≥ M on CPU tensors, naming the argument."""
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises((ValueError, RuntimeError, IndexError), match="targets|index"):
        ops.linear_token_logprobs(hidden, weight, torch.tensor([1, 10, 3, IGNORE]), impl=impl)
    with pytest.raises((ValueError, RuntimeError, IndexError), match="segment_ids|index"):
        ops.segment_stats(-torch.rand(4), torch.rand(4), torch.tensor([0, 2, 1, -1]), 2, 0.5, impl=impl)
