"""Fused linear + per-token log-prob: ℓ_t = (h_t·W^T)[y_t] − logsumexp(h_t·W^T), never storing N×V logits.

Forward: one program per tile of BLOCK_N tokens sweeps the vocabulary in BLOCK_V tiles; each logits tile
is BLOCK_N×BLOCK_V = Σ over BLOCK_H slices of tl.dot(h, Wᵀ) in fp32 and folds into an online log-sum-exp.
With ``HAS_SEGMENTS`` the per-completion sums of ``segment_stats.py`` are added right after the sweep
(the fused epilogue), so ℓ never makes a round trip through memory before being reduced.

Backward (recomputes the logits tiles from the saved lse; nothing N×V is saved):
  * grad_hidden: one program per token tile sweeps the vocabulary, dlogits = g·(onehot − softmax),
    grad_h[tile] += dlogits · W[vtile]; the program owns its rows, so no atomics (deterministic).
  * grad_weight (only if the weight requires grad; a frozen lm_head under LoRA is the common case and
    skips this kernel): one program per vocabulary tile sweeps the tokens, grad_W[vtile] += dlogitsᵀ · h.
    This recomputes the logits a second time instead of using atomics on an N×H and V×H pair.
  Cost to know: each vocabulary tile read-modify-writes the program's fp32 BLOCK_N×H slice of grad_h
  (as a cut-cross-entropy-style atomic backward would); a larger BLOCK_V amortises that traffic.

Tile order and L2: the grid has one axis and every program sweeps the other operand in the same order,
so the programs resident at one time (one "group", the whole wave) stream the same W tile (forward,
grad_hidden) or h tile (grad_weight) at about the same moment: it comes from HBM once and from L2 for
the rest of the wave. This is the grouped ordering of Triton's matmul tutorial with the swept axis inside
the program; a 2-D grid would need a cross-program lse combine (or atomics) for no better reuse.

Block sizes: BLOCK_N=64 × BLOCK_V=128 fp32 logits tile = 32 registers/thread at 8 warps, leaving room
for the h (64×64) and W (128×64) operand tiles; BLOCK_H=64 is the K step of tl.dot (≥ 16, a multiple of
the MMA K). ``PVFAST_AUTOTUNE=1`` replaces them with an autotuned choice over a few configurations.
Under the interpreter, bf16/fp16 tiles are upcast to fp32 before tl.dot (``UPCAST``), which gives wrong
results in low precision there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pvfast.kernels import interpreting
from pvfast.kernels.segment_stats import _accumulate_segment_stats, check_segment_vectors, segment_stats_backward
from pvfast.objectives.stats import NUM_STATS
from pvfast.objectives.config import log_tau as _log_tau

IGNORE_INDEX = -100
AUTOTUNE = os.environ.get("PVFAST_AUTOTUNE", "0") == "1"
DEFAULT_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}
NUM_WARPS = 8
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _logits_tile(H_ptr, W_ptr, offs_n, rows_live, offs_v, mask_v, HID, stride_hn, stride_wv,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # logits[n, v] = Σ_k h[n, k] · W[v, k], accumulated in fp32 over BLOCK_H slices.
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, HID, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < HID
        h = tl.load(H_ptr + offs_n[:, None] * stride_hn + offs_h[None, :],
                    mask=rows_live[:, None] & mask_h[None, :], other=0.0)
        # int64 row offsets: V·H passes 2^31 for large vocabularies times wide models.
        w = tl.load(W_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_token_logprobs_fwd_kernel(
        H_ptr, W_ptr, Targets_ptr, Logp_ptr, Lse_ptr, Weights_ptr, Seg_ptr, Stats_ptr,
        N, V, HID, stride_hn, stride_wv, log_tau,
        IGNORE_INDEX: tl.constexpr, HAS_SEGMENTS: tl.constexpr, NUM_COLS: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # For the token tile, over vocabulary tiles z = h·Wᵀ:
    #   m ← max(m, rowmax z);  s ← s·exp(m_old − m) + Σ_v exp(z_v − m);  z_y picked where v = y
    #   lse = m + log s,  ℓ = z_y − lse   (ℓ = lse = 0 for ignored targets)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < N
    targets = tl.load(Targets_ptr + offs_n, mask=in_range, other=IGNORE_INDEX)
    active = in_range & (targets != IGNORE_INDEX)
    # A tile with no live target (prompt, padding) skips the sweep.
    v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, V, 0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(H_ptr, W_ptr, offs_n, active, offs_v, mask_v, HID, stride_hn, stride_wv,
                         UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        target_logit += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
    lse = tl.where(active, m + tl.log(tl.where(active, s, 1.0)), 0.0)
    logp = tl.where(active, target_logit - lse, 0.0)
    tl.store(Lse_ptr + offs_n, lse, mask=in_range)
    tl.store(Logp_ptr + offs_n, logp, mask=in_range)
    if HAS_SEGMENTS:
        seg = tl.load(Seg_ptr + offs_n, mask=in_range, other=-1)
        weight = tl.load(Weights_ptr + offs_n, mask=in_range, other=0.0)
        _accumulate_segment_stats(Stats_ptr, logp, weight, seg, seg >= 0, log_tau, NUM_COLS)


@triton.jit
def _dlogits_tile(z, offs_v, mask_v, targets, lse, grad):
    # dL/dz = g · (1[v = y] − exp(z − lse)), 0 outside the vocabulary and for rows with g = 0.
    p = tl.where(mask_v[None, :], tl.exp(z - lse[:, None]), 0.0)
    onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
    return grad[:, None] * (onehot - p)


@triton.jit
def _linear_token_logprobs_bwd_hidden_kernel(
        H_ptr, W_ptr, Targets_ptr, Lse_ptr, GradLogp_ptr, GradH_ptr,
        N, V, HID, stride_hn, stride_wv, stride_ghn,
        IGNORE_INDEX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # grad_h[n, :] = Σ_v dz[n, v] · W[v, :]   with dz from _dlogits_tile; GradH is fp32 and zeroed.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < N
    targets = tl.load(Targets_ptr + offs_n, mask=in_range, other=IGNORE_INDEX)
    active = in_range & (targets != IGNORE_INDEX)
    grad = tl.load(GradLogp_ptr + offs_n, mask=active, other=0.0)
    lse = tl.load(Lse_ptr + offs_n, mask=active, other=0.0)
    v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, V, 0)
    for v0 in range(0, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(H_ptr, W_ptr, offs_n, active, offs_v, mask_v, HID, stride_hn, stride_wv,
                         UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _dlogits_tile(z, offs_v, mask_v, targets, lse, grad)
        for h0 in range(0, HID, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < HID
            w = tl.load(W_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
                        mask=mask_v[:, None] & mask_h[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            gh_ptrs = GradH_ptr + offs_n[:, None] * stride_ghn + offs_h[None, :]
            gh_mask = in_range[:, None] & mask_h[None, :]
            gh = tl.load(gh_ptrs, mask=gh_mask, other=0.0)
            gh = tl.dot(dz.to(w.dtype), w, gh, input_precision=DOT_PRECISION)
            tl.store(gh_ptrs, gh, mask=gh_mask)


@triton.jit
def _linear_token_logprobs_bwd_weight_kernel(
        H_ptr, W_ptr, Targets_ptr, Lse_ptr, GradLogp_ptr, GradW_ptr,
        N, V, HID, stride_hn, stride_wv, stride_gwv,
        IGNORE_INDEX: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # grad_W[v, :] = Σ_n dz[n, v] · h[n, :]   with dz from _dlogits_tile; GradW is fp32 and zeroed.
    offs_v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        in_range = offs_n < N
        targets = tl.load(Targets_ptr + offs_n, mask=in_range, other=IGNORE_INDEX)
        active = in_range & (targets != IGNORE_INDEX)
        if tl.max(active.to(tl.int32), axis=0) > 0:  # token tiles with no live target add nothing
            grad = tl.load(GradLogp_ptr + offs_n, mask=active, other=0.0)
            lse = tl.load(Lse_ptr + offs_n, mask=active, other=0.0)
            z = _logits_tile(H_ptr, W_ptr, offs_n, active, offs_v, mask_v, HID, stride_hn, stride_wv,
                             UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
            dz_t = tl.trans(_dlogits_tile(z, offs_v, mask_v, targets, lse, grad))
            for h0 in range(0, HID, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < HID
                h = tl.load(H_ptr + offs_n[:, None] * stride_hn + offs_h[None, :],
                            mask=active[:, None] & mask_h[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                gw_ptrs = GradW_ptr + offs_v[:, None] * stride_gwv + offs_h[None, :]
                gw_mask = mask_v[:, None] & mask_h[None, :]
                gw = tl.load(gw_ptrs, mask=gw_mask, other=0.0)
                gw = tl.dot(dz_t.to(h.dtype), h, gw, input_precision=DOT_PRECISION)
                tl.store(gw_ptrs, gw, mask=gw_mask)


def _autotuned(kernel, reset: list[str]):
    """Wrap a kernel in triton.autotune when PVFAST_AUTOTUNE=1 (otherwise DEFAULT_BLOCKS are used).

    ``reset`` names the accumulating outputs, zeroed before each trial so the timing runs do not add up.
    """
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=nw, num_stages=ns)
               for bn, bv, bh, nw, ns in [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 256, 32, 8, 3),
                                          (128, 64, 64, 4, 4), (32, 128, 128, 4, 3)]]
    return triton.autotune(configs=configs, key=["V", "HID"], reset_to_zero=reset)(kernel)


_fwd_kernel = _linear_token_logprobs_fwd_kernel
_bwd_hidden_kernel = _linear_token_logprobs_bwd_hidden_kernel
_bwd_weight_kernel = _linear_token_logprobs_bwd_weight_kernel
if AUTOTUNE:
    _fwd_kernel = _autotuned(_fwd_kernel, ["Stats_ptr"])
    _bwd_hidden_kernel = _autotuned(_bwd_hidden_kernel, ["GradH_ptr"])
    _bwd_weight_kernel = _autotuned(_bwd_weight_kernel, ["GradW_ptr"])


def _launch_options(dtype: torch.dtype, blocks: dict | None) -> dict:
    """Constexpr flags (and block sizes unless autotuning) shared by the three kernels."""
    options = {
        # The interpreter computes bf16/fp16 tl.dot wrongly: upcast tiles there.
        "UPCAST": interpreting() and dtype != torch.float32,
        # fp32 inputs get true fp32 products (torch's default matmul), not TF32.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
    if not AUTOTUNE:
        options.update(DEFAULT_BLOCKS if blocks is None else blocks)
        options["num_warps"] = NUM_WARPS
    return options


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Shape/dtype/device checks shared by every linear_token_logprobs implementation."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_token_logprobs: hidden must be (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_token_logprobs: hidden size mismatch: hidden (N, {hidden.shape[1]}) "
                         f"vs weight (V, {weight.shape[1]})")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_token_logprobs: targets must be (N,) = ({hidden.shape[0]},), "
                         f"got {tuple(targets.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"linear_token_logprobs: hidden and weight must share a float32/float16/bfloat16 "
                        f"dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"linear_token_logprobs: targets must be int32 or int64, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"linear_token_logprobs: tensors on different devices: hidden {hidden.device}, "
                         f"weight {weight.device}, targets {targets.device}")


def linear_token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                  ignore_index: int = IGNORE_INDEX, weights: torch.Tensor | None = None,
                                  segment_ids: torch.Tensor | None = None, num_segments: int = 0,
                                  log_tau: float = 0.0, blocks: dict | None = None):
    """hidden (N, H), weight (V, H), targets (N,) → (logp (N,), lse (N,), stats (M, 7) or None), fp32.

    With ``segment_ids`` (N,) and ``weights`` (N,) the fused epilogue also returns the per-completion
    sums of :mod:`pvfast.objectives.stats`.
    """
    check_linear_inputs(hidden, weight, targets)
    has_segments = segment_ids is not None
    if has_segments:
        if weights is None:
            raise ValueError("linear_token_logprobs: segment_ids given without token weights")
        check_segment_vectors(targets.shape[0], targets.device, weights, segment_ids, num_segments,
                              "linear_segment_stats")
        weights = weights.float().contiguous()
        segment_ids = segment_ids.long().contiguous()
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    n, hid = hidden.shape
    v = weight.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    stats = (torch.zeros(num_segments, NUM_STATS, dtype=torch.float32, device=hidden.device)
             if has_segments else None)  # zeroed: the epilogue adds into it
    if n:
        options = _launch_options(hidden.dtype, blocks)
        _fwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            H_ptr=hidden, W_ptr=weight, Targets_ptr=targets, Logp_ptr=logp, Lse_ptr=lse,
            Weights_ptr=weights if has_segments else logp, Seg_ptr=segment_ids if has_segments else targets,
            Stats_ptr=stats if has_segments else logp, N=n, V=v, HID=hid,
            stride_hn=hidden.stride(0), stride_wv=weight.stride(0), log_tau=float(log_tau),
            IGNORE_INDEX=ignore_index, HAS_SEGMENTS=has_segments, NUM_COLS=NUM_STATS, **options)
    return logp, lse, stats


def linear_token_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   lse: torch.Tensor, grad_logp: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX, need_weight_grad: bool = True,
                                   blocks: dict | None = None):
    """Upstream dL/dℓ (N,) → (grad_hidden (N, H) in hidden's dtype, grad_weight (V, H) or None)."""
    check_linear_inputs(hidden, weight, targets)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    grad_logp = grad_logp.float().contiguous()
    n, hid = hidden.shape
    v = weight.shape[0]
    options = _launch_options(hidden.dtype, blocks)
    common = dict(H_ptr=hidden, W_ptr=weight, Targets_ptr=targets, Lse_ptr=lse, GradLogp_ptr=grad_logp,
                  N=n, V=v, HID=hid, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
                  IGNORE_INDEX=ignore_index, **options)
    # fp32 accumulators, zeroed: the kernels add tile products into them.
    grad_hidden = torch.zeros(n, hid, dtype=torch.float32, device=hidden.device)
    if n:
        _bwd_hidden_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            GradH_ptr=grad_hidden, stride_ghn=grad_hidden.stride(0), **common)
    grad_weight = None
    if need_weight_grad:
        grad_weight = torch.zeros(v, hid, dtype=torch.float32, device=hidden.device)
        if n:
            _bwd_weight_kernel[lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),)](
                GradW_ptr=grad_weight, stride_gwv=grad_weight.stride(0), **common)
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden.to(hidden.dtype), grad_weight


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,) → ℓ (N,) fp32.

    Saves lse (N,) fp32; the backward recomputes every logits tile and returns grad_hidden (N, H) and,
    only when ``weight`` requires grad, grad_weight (V, H), in the input dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int = IGNORE_INDEX, blocks: dict | None = None):
        logp, lse, _ = linear_token_logprobs_forward(hidden, weight, targets, ignore_index, blocks=blocks)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.ignore_index, ctx.blocks = ignore_index, blocks
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden, grad_weight = linear_token_logprobs_backward(
            hidden, weight, targets, lse, grad_logp, ctx.ignore_index, ctx.needs_input_grad[1], ctx.blocks)
        return grad_hidden, grad_weight, None, None, None


class LinearSegmentStatsFunction(torch.autograd.Function):
    """hidden (N, H), weight (V, H), targets (N,), weights (N,), segment_ids (N,) → stats (M, 7) fp32.

    One forward pass computes ℓ and reduces it into the per-completion sums (the fused epilogue).
    Backward: dL/dstats → dL/dℓ (a gather, ``segment_stats.py``), then the recomputing linear backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, segment_ids, num_segments: int, tau: float,
                ignore_index: int = IGNORE_INDEX, blocks: dict | None = None):
        lt = _log_tau(tau)
        logp, lse, stats = linear_token_logprobs_forward(
            hidden, weight, targets, ignore_index, weights, segment_ids, num_segments, lt, blocks)
        ctx.save_for_backward(hidden, weight, targets, weights, segment_ids, logp, lse)
        ctx.log_tau, ctx.ignore_index, ctx.blocks = lt, ignore_index, blocks
        return stats

    @staticmethod
    def backward(ctx, grad_stats):
        hidden, weight, targets, weights, segment_ids, logp, lse = ctx.saved_tensors
        grad_logp = segment_stats_backward(logp, weights, segment_ids, grad_stats, ctx.log_tau)
        grad_hidden, grad_weight = linear_token_logprobs_backward(
            hidden, weight, targets, lse, grad_logp, ctx.ignore_index, ctx.needs_input_grad[1], ctx.blocks)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None
