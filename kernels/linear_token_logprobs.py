"""Fused lm-head log-probs: ℓ_t = z'_t[y_t] − logsumexp(z'_t), z = h_t·Wᵀ (z' = c·tanh(z/c) when soft-capped),
never storing the N×V logits; optionally the per-completion statistics and dℓ/dh in the same forward.

Design (GPU-first; ``python -m bench.cost_model`` prints its FLOPs and bytes at real shapes)
--------------------------------------------------------------------------------------------
The vocabulary is swept in chunks of C columns (C from a memory budget, ``LinearConfig.chunk_bytes``). Per
chunk, three kinds of kernel run, each a plain tiled GEMM or less, so each keeps its accumulator tile on
chip for its whole K loop and reads its operands with grouped (L2-friendly) program order:

  A  ``_linear_logits_kernel``: grid (token tiles × vocabulary splits); each program computes logits tiles
     BLOCK_N × BLOCK_V = Σ_k h[:, k] W[v, k] (fp32 accumulator on chip over H), soft-caps them and, by MODE:
       0  keeps an online (max, Σexp) over its split and writes one partial per row (log-probs only);
       1  writes each tile's probabilities exp(z' − m_tile)·dz'/dz to a chunk buffer P (N × C, input dtype)
          with the tile's (m_tile, s_tile) (gradient in the forward, frozen weight);
       2  writes the logits gradient g·(1[v = y] − exp(z' − lse))·dz'/dz to P, g = dL/dℓ (backward with
          recomputation).
     The target logit is picked by the one program whose columns hold it.
  combine ``_linear_combine_kernel``: per token tile, merges the partials into the running (M, S) of the
     online log-sum-exp; in MODE 1 it turns them into the scales β_tile = exp(m_tile − M) of P's tiles and
     α = exp(M_old − M) of the accumulator. After the last chunk: lse, ℓ and the statistics epilogue
     (fused: ℓ never makes a round trip through memory before it is reduced).
  B  ``_linear_prob_matmul_kernel``: acc (N × H, fp32) = α·acc + (β ⊙ P) · W[chunk] — a GEMM with K = C:
     the BLOCK_N × BLOCK_OUT accumulator stays on chip across the chunk; acc is read and written once per
     chunk (MODE 1: the softmax-weighted Σ_v p_v s_v W_v; MODE 2: grad_hidden, unscaled). In MODE 1 the last
     chunk's epilogue writes dℓ/dh = s_y W[y] − acc / S in place of acc (FINALIZE).
  C  ``_linear_weight_grad_kernel`` (MODE 2, trainable weight only): grad_W[chunk] = Pᵀ · h, a GEMM
     with K = N, written once in the weight's dtype (no fp32 V×H buffer, no atomics).

Why not one kernel with the whole accumulator on chip: the gradient-in-forward needs Σ_v p_v W_v, a
BLOCK_N × H fp32 tile per token tile — 1 MiB at BLOCK_N = 64, H = 4096, four times an H100 SM's shared
memory plus registers. Splitting H across programs would recompute the logits H/BLOCK_OUT times. So the
probabilities are materialised, one bounded chunk at a time, in the input dtype (what torch's own bf16
backward does with its logits gradient), and consumed by an on-chip-accumulating GEMM. Cost of that
choice at N=8192, H=4096, V=128,256 with C = 16,384 (bf16): P written and read once (4·N·V bytes ≈ 4.2 GB)
plus acc read+written once per chunk (8·N·H·V/C ≈ 2.1 GB), about 1.9 ms at 3.35 TB/s against 17.4 ms of
tensor-core work; memory: acc = direction (N·H·4 = 128 MiB), P ≤ chunk_bytes (256 MiB default), partials
N·C/BLOCK_V·8 bytes (8 MiB).

FLOPs per policy step, frozen lm_head: forward 2·N·H·V (A) + 2·N·H·V (B) = 4·N·H·V, backward a scaling.
Trainable lm_head: forward 2·N·H·V (MODE 0), backward 2·N·H·V (A, MODE 2) + 2·N·H·V (B) + 2·N·H·V (C).

Precision: fp32 accumulation everywhere; bf16/fp16 inputs use tensor cores (wgmma on sm_90); fp32
inputs follow torch: TF32 when ``torch.get_float32_matmul_precision()`` is "high"/"medium", else exact
fp32 FMA (the slow path: no tensor cores; the trainer feeds bf16 under autocast). Under the interpreter
(TRITON_INTERPRET=1) bf16/fp16 tiles are upcast to fp32 before tl.dot (``UPCAST``): the interpreter
computes low-precision dots wrongly.

Out-of-range targets give ℓ = lse = NaN and a NaN dℓ/dh row, never an out-of-bounds access (see
``pvfast.kernels``). The autograd Functions are ``pvfast.ops.functions`` (via ``pvfast.ops.triton_backend``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from pvfast.kernels import check_segment_values, check_target_values, interpreting
from pvfast.kernels.segment_stats import segment_stats_epilogue
from pvfast.objectives.stats import IGNORE_INDEX, NUM_STATS

# Programs in flight when the GPU is unknown (meta tensors in the compile check): an H100/H200's SM count.
DEFAULT_SMS = 132
MODE_LSE, MODE_PROBS, MODE_DLOGITS = 0, 1, 2
# The combine kernel is elementwise over (rows × partials) tiles: small tiles keep its int64 pointer
# arithmetic and fp32 temporaries in registers (no spills at 4 warps on sm_90).
COMBINE_BLOCK_N = 128 if interpreting() else 32  # the interpreter pays per program, not per element
COMBINE_BLOCK_P = 32


@dataclasses.dataclass(frozen=True)
class LinearConfig:
    """Tile sizes of the fused linear kernels (defaults: bf16/fp16 on sm_90/sm_80, checked by the compile test).

    block_n × block_v: logits tile of kernel A (fp32, 64×128 = 32 registers/thread at 8 warps, leaving room
    for its epilogue: 128×128 spills on sm_90); block_h: its K step over H (a multiple of the MMA K of 16).
    block_m × block_out: the output tile of B (tokens × H), block_v × block_out that of C (vocabulary × H),
    128×128 fp32 accumulators; block_k: the K step of B (vocabulary, divides block_v) and C (tokens).
    group: row tiles per group of the grouped program order (L2 reuse of the column operand). chunk_bytes
    bounds the P buffer (N × C in the input dtype); chunk_v fixes C instead (tests).
    """

    block_n: int = 64
    block_v: int = 128
    block_h: int = 64
    block_m: int = 128
    block_k: int = 64
    block_out: int = 128
    group: int = 8
    num_warps: int = 8
    num_stages: int = 3
    chunk_bytes: int = 256 * 2**20
    chunk_v: int | None = None

    def __post_init__(self) -> None:
        if self.block_v % self.block_k:
            raise ValueError(f"LinearConfig: block_k ({self.block_k}) must divide block_v ({self.block_v})")
        if self.chunk_v is not None and (self.chunk_v <= 0 or self.chunk_v % self.block_v):
            raise ValueError(f"LinearConfig: chunk_v ({self.chunk_v}) must be a positive multiple of "
                             f"block_v ({self.block_v})")


# fp32 inputs without tensor cores: smaller tiles keep the FMA loops within the register file.
FP32_CONFIG = LinearConfig(block_n=32, block_v=64, block_h=32, block_m=64, block_k=32, block_out=64, num_warps=4,
                           num_stages=2)
DEFAULT_CONFIG = LinearConfig()
# Under the interpreter every tile operation costs ~0.5 ms of Python whatever its size, so CPU runs default to
# few, large tiles (the GPU tiles are exercised explicitly by tests/test_kernels_triton.py).
INTERPRETER_CONFIG = LinearConfig(block_n=128, block_v=512, block_h=128, block_m=128, block_k=512, block_out=128,
                                  num_warps=4, num_stages=1)


# ---------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_row_tiles, num_col_tiles, GROUP: tl.constexpr):
    # Triton's grouped ordering: consecutive programs walk GROUP row tiles down one column before moving
    # right, so a wave of programs shares a few column operands (W tiles) and a few row operands via L2.
    in_group = GROUP * num_col_tiles
    first_row = (pid // in_group) * GROUP
    size = tl.minimum(num_row_tiles - first_row, GROUP)
    row = first_row + (pid % in_group) % size
    col = (pid % in_group) // size
    return row, col


@triton.jit
def _logits_tile(H_ptr, W_ptr, offs_n, rows_live, offs_v, mask_v, HID, stride_hn, stride_wv, softcap,
                 SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # z[n, v] = Σ_k h[n, k] · W[v, k] in fp32 over BLOCK_H slices; soft-capped: z' = c − 2c / (exp(2z/c) + 1)
    # (= c·tanh(z/c); saturates to ±c without NaN).
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
    if SOFTCAP:
        acc = softcap - 2.0 * softcap / (tl.exp(acc * (2.0 / softcap)) + 1.0)
    return acc


@triton.jit
def _softcap_slope(z, softcap, SOFTCAP: tl.constexpr):
    # dz'/dz = 1 − (z'/c)² at capped logits z'; 1 without capping
    if SOFTCAP:
        r = z / softcap
        return 1.0 - r * r
    else:
        return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _active_rows(Targets_ptr, offs_n, N, V, IGNORE_INDEX: tl.constexpr):
    # (live, bad): live rows have a target in [0, V); bad rows an out-of-range one (never computed)
    in_range = offs_n < N
    targets = tl.load(Targets_ptr + offs_n, mask=in_range, other=IGNORE_INDEX)
    scored = in_range & (targets != IGNORE_INDEX)
    valid = (targets >= 0) & (targets < V)
    return targets, scored & valid, scored & ~valid


@triton.jit
def _linear_logits_kernel(
        H_ptr, W_ptr, Targets_ptr, Lse_ptr, GradLogp_ptr, TargetLogit_ptr, PartM_ptr, PartS_ptr, P_ptr,
        N, V, HID, v_begin, chunk_cols, num_splits, tiles_per_split, stride_hn, stride_wv, stride_pn, stride_part,
        softcap, MODE: tl.constexpr, SOFTCAP: tl.constexpr, IGNORE_INDEX: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        GROUP: tl.constexpr):
    # Program (token tile, split) covers chunk columns [split·T·BLOCK_V, (split+1)·T·BLOCK_V), T tiles:
    #   z' = cap(h·Wᵀ);  target logit z'[y] picked where v = y;  then by MODE
    #   0: m ← max(m, rowmax z'); s ← s·e^(m_old − m) + Σ e^(z' − m); one (m, s) per row and split
    #   1: P[:, tile] = e^(z' − m_tile)·dz'/dz; (m_tile, s_tile = Σ e^(z' − m_tile)) per row and tile
    #   2: P[:, tile] = g·(1[v = y] − e^(z' − lse))·dz'/dz with g = dL/dℓ (0 on dead rows)
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < N
    targets, live, bad = _active_rows(Targets_ptr, offs_n, N, V, IGNORE_INDEX)
    tile_live = tl.max(live.to(tl.int32), axis=0) > 0
    # the target's column within the chunk, int32: the per-tile compare is then 32-bit (registers)
    target_col = tl.where(live, targets - v_begin, -1).to(tl.int32)
    if MODE == 2:
        lse = tl.load(Lse_ptr + offs_n, mask=live, other=0.0)
        grad = tl.load(GradLogp_ptr + offs_n, mask=live, other=0.0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        tile = pid_s * tiles_per_split + t
        offs_c = tile * BLOCK_V + tl.arange(0, BLOCK_V)  # columns within the chunk
        mask_c = offs_c < chunk_cols
        offs_v = v_begin + offs_c
        p_ptrs = P_ptr + offs_n[:, None] * stride_pn + offs_c[None, :]
        p_mask = in_range[:, None] & mask_c[None, :]
        if tile * BLOCK_V < chunk_cols:
            if tile_live:
                z = _logits_tile(H_ptr, W_ptr, offs_n, live, offs_v, mask_c, HID, stride_hn, stride_wv, softcap,
                                 SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
                hit = offs_c[None, :] == target_col[:, None]
                has_target = tl.max(hit.to(tl.int32), axis=1) > 0
                tl.store(TargetLogit_ptr + offs_n, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=live & has_target)
                zm = tl.where(mask_c[None, :], z, float("-inf"))
                if MODE == 0:
                    m_new = tl.maximum(m, tl.max(zm, axis=1))
                    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
                    m = m_new
                elif MODE == 1:
                    m_tile = tl.max(zm, axis=1)
                    e = tl.exp(zm - m_tile[:, None])
                    part = offs_n * stride_part + tile
                    tl.store(PartM_ptr + part, m_tile, mask=live)
                    tl.store(PartS_ptr + part, tl.sum(e, axis=1), mask=live)
                    p = e * _softcap_slope(z, softcap, SOFTCAP)
                    tl.store(p_ptrs, p.to(P_ptr.dtype.element_ty), mask=p_mask)
                else:
                    onehot = tl.where(hit, 1.0, 0.0)
                    dz = (onehot - tl.exp(zm - lse[:, None])) * _softcap_slope(z, softcap, SOFTCAP)
                    dz = tl.where(live[:, None], grad[:, None] * dz, 0.0)
                    tl.store(p_ptrs, dz.to(P_ptr.dtype.element_ty), mask=p_mask)
            elif MODE == 2:  # the weight-gradient GEMM reads every row of P: dead rows must be zero
                tl.store(p_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=P_ptr.dtype.element_ty), mask=p_mask)
    if MODE == 0:
        part = offs_n * stride_part + pid_s
        tl.store(PartM_ptr + part, m, mask=live)
        tl.store(PartS_ptr + part, s, mask=live)


@triton.jit
def _linear_combine_kernel(
        Targets_ptr, PartM_ptr, PartS_ptr, StateM_ptr, StateS_ptr, Alpha_ptr, TargetLogit_ptr, Logp_ptr, Lse_ptr,
        Weights_ptr, Seg_ptr, Stats_ptr, N, V, num_parts, stride_part, num_segments, log_tau,
        FIRST: tl.constexpr, STORE_SCALES: tl.constexpr, FINAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
        IGNORE_INDEX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    # Running online log-sum-exp per row, merged with this chunk's partials (m_p, s_p):
    #   M = max(M_old, max_p m_p);  S = S_old·e^(M_old − M) + Σ_p s_p e^(m_p − M)
    # STORE_SCALES: α = e^(M_old − M) and β_p = e^(m_p − M) (in place of m_p) for the B kernel.
    # FINAL: lse = M + log S, ℓ = z'[y] − lse (0 ignored, NaN out-of-range), statistics epilogue.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = offs_n < N
    targets, live, bad = _active_rows(Targets_ptr, offs_n, N, V, IGNORE_INDEX)
    if FIRST:
        m_old = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s_old = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        m_old = tl.load(StateM_ptr + offs_n, mask=live, other=float("-inf"))
        s_old = tl.load(StateS_ptr + offs_n, mask=live, other=0.0)
    m_new = m_old
    for p0 in range(0, num_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = live[:, None] & (offs_p < num_parts)[None, :]
        part_m = tl.load(PartM_ptr + offs_n[:, None] * stride_part + offs_p[None, :], mask=mask,
                         other=float("-inf"))
        m_new = tl.maximum(m_new, tl.max(part_m, axis=1))
    m_safe = tl.where(live, m_new, 0.0)  # dead rows: keep every exponent finite
    s_new = tl.where(live, s_old * tl.exp(m_old - m_safe), 0.0)
    for p0 in range(0, num_parts, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask = live[:, None] & (offs_p < num_parts)[None, :]
        ptrs = offs_n[:, None] * stride_part + offs_p[None, :]
        part_m = tl.load(PartM_ptr + ptrs, mask=mask, other=float("-inf"))
        part_s = tl.load(PartS_ptr + ptrs, mask=mask, other=0.0)
        scale = tl.exp(part_m - m_safe[:, None])
        s_new += tl.sum(part_s * scale, axis=1)
        if STORE_SCALES:
            tl.store(PartM_ptr + ptrs, scale, mask=mask)
    if STORE_SCALES:
        tl.store(Alpha_ptr + offs_n, tl.where(live, tl.exp(m_old - m_safe), 0.0), mask=in_range)
    tl.store(StateM_ptr + offs_n, m_new, mask=in_range)
    tl.store(StateS_ptr + offs_n, s_new, mask=in_range)
    if FINAL:
        lse = tl.where(live, m_safe + tl.log(tl.where(live, s_new, 1.0)), 0.0)
        target_logit = tl.load(TargetLogit_ptr + offs_n, mask=live, other=0.0)
        logp = tl.where(live, target_logit - lse, 0.0)
        tl.store(Lse_ptr + offs_n, tl.where(bad, float("nan"), lse), mask=in_range)
        tl.store(Logp_ptr + offs_n, tl.where(bad, float("nan"), logp), mask=in_range)
        if HAS_SEGMENTS:
            seg = tl.load(Seg_ptr + offs_n, mask=in_range, other=-1)
            weight = tl.load(Weights_ptr + offs_n, mask=in_range, other=0.0)
            segment_stats_epilogue(Stats_ptr, tl.where(bad, float("nan"), logp), weight, seg, in_range,
                                   num_segments, log_tau)


@triton.jit
def _linear_prob_matmul_kernel(
        P_ptr, W_ptr, Targets_ptr, Alpha_ptr, Scale_ptr, Acc_ptr, TargetLogit_ptr, StateS_ptr, N, V, HID, v_begin,
        chunk_cols, stride_pn, stride_wv, stride_sn, stride_sp, stride_an, softcap,
        SCALED: tl.constexpr, FINALIZE: tl.constexpr, SOFTCAP: tl.constexpr, IGNORE_INDEX: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr, PART_COLS: tl.constexpr,
        GROUP: tl.constexpr):
    # SCALED: acc[n, h] = α_n · acc[n, h] + Σ_k β[n, k // PART_COLS] · P[n, k] · W[v_begin + k, h]
    # else:   acc[n, h] += Σ_k P[n, k] · W[v_begin + k, h]
    # FINALIZE (last chunk of the gradient-in-forward): store dℓ_n/dh = s_y · W[y_n, h] − acc[n, h] / S_n instead
    # (s_y = dz'/dz at the target; 0 for ignored rows, NaN for out-of-range targets).
    # The BLOCK_N × BLOCK_OUT fp32 tile accumulates on chip over the whole chunk (K = chunk columns);
    # acc in global memory is read and written once per chunk. Dead rows (no live target) add nothing.
    pid_n, pid_h = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(HID, BLOCK_OUT), GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    in_range = offs_n < N
    mask_h = offs_h < HID
    targets, live, bad = _active_rows(Targets_ptr, offs_n, N, V, IGNORE_INDEX)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=tl.float32)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        for k0 in range(0, chunk_cols, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < chunk_cols
            p = tl.load(P_ptr + offs_n[:, None] * stride_pn + offs_k[None, :],
                        mask=live[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W_ptr + (v_begin + offs_k).to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
                        mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            if SCALED:
                beta = tl.load(Scale_ptr + offs_n * stride_sn + (k0 // PART_COLS) * stride_sp, mask=live,
                               other=0.0)
                p = (p.to(tl.float32) * beta[:, None]).to(w.dtype)
            if UPCAST:
                p = p.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(p, w, acc, input_precision=DOT_PRECISION)
    acc_ptrs = Acc_ptr + offs_n[:, None] * stride_an + offs_h[None, :]
    acc_mask = in_range[:, None] & mask_h[None, :]
    old = tl.load(acc_ptrs, mask=acc_mask, other=0.0)
    if SCALED:
        alpha = tl.load(Alpha_ptr + offs_n, mask=in_range, other=0.0)
        old = old * alpha[:, None]
    acc = old + acc
    if FINALIZE:
        s = tl.load(StateS_ptr + offs_n, mask=live, other=1.0)
        target_logit = tl.load(TargetLogit_ptr + offs_n, mask=live, other=0.0)
        slope = _softcap_slope(target_logit, softcap, SOFTCAP)
        w_y = tl.load(W_ptr + tl.where(live, targets, 0).to(tl.int64)[:, None] * stride_wv + offs_h[None, :],
                      mask=live[:, None] & mask_h[None, :], other=0.0).to(tl.float32)
        acc = tl.where(live[:, None], slope[:, None] * w_y - acc / s[:, None], 0.0)
        acc = tl.where(bad[:, None], float("nan"), acc)
    tl.store(acc_ptrs, acc, mask=acc_mask)


@triton.jit
def _linear_weight_grad_kernel(
        P_ptr, H_ptr, GradW_ptr, N, HID, v_begin, chunk_cols, stride_pn, stride_hn, stride_gwv,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_OUT: tl.constexpr, GROUP: tl.constexpr):
    # grad_W[v_begin + v, h] = Σ_n P[n, v] · h[n, h]   (P = dL/dz of the chunk)
    # K = N tokens: the BLOCK_V × BLOCK_OUT tile accumulates on chip and is written once, in W's dtype.
    pid_v, pid_h = _grouped_tile(tl.program_id(0), tl.cdiv(chunk_cols, BLOCK_V), tl.cdiv(HID, BLOCK_OUT), GROUP)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    mask_c = offs_c < chunk_cols
    mask_h = offs_h < HID
    acc = tl.zeros((BLOCK_V, BLOCK_OUT), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_n = offs_n < N
        p = tl.load(P_ptr + offs_n[:, None] * stride_pn + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                    other=0.0)
        h = tl.load(H_ptr + offs_n[:, None] * stride_hn + offs_h[None, :], mask=mask_n[:, None] & mask_h[None, :],
                    other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            h = h.to(tl.float32)
        acc = tl.dot(tl.trans(p), h, acc, input_precision=DOT_PRECISION)
    out = GradW_ptr + (v_begin + offs_c).to(tl.int64)[:, None] * stride_gwv + offs_h[None, :]
    tl.store(out, acc.to(GradW_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_h[None, :])


# ---------------------------------------------------------------------------------------------------
# Launchers (inputs checked by pvfast.ops: contiguous, targets/segment ids int64, weights fp32)
# ---------------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: TF32 only where torch's own fp32 matmuls would use it; 16-bit inputs: the dot's native path."""
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit operands
    return "tf32" if torch.get_float32_matmul_precision() in ("high", "medium") else "ieee"


def default_config(dtype: torch.dtype) -> LinearConfig:
    if interpreting():
        return INTERPRETER_CONFIG
    return FP32_CONFIG if dtype == torch.float32 else DEFAULT_CONFIG


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1 if interpreting() else DEFAULT_SMS  # the interpreter runs programs one at a time


class _Plan:
    """Sizes of one call: chunks of the vocabulary and the split of each chunk over programs."""

    def __init__(self, n: int, v: int, hid: int, dtype: torch.dtype, device: torch.device, cfg: LinearConfig,
                 store_chunk: bool):
        self.n, self.v, self.hid, self.cfg = n, v, hid, cfg
        self.token_tiles = triton.cdiv(n, cfg.block_n)
        v_padded = triton.cdiv(v, cfg.block_v) * cfg.block_v
        if not store_chunk:
            chunk = v_padded  # MODE 0 keeps nothing per column: one chunk
        elif cfg.chunk_v is not None:
            chunk = cfg.chunk_v
        else:
            per_col = max(1, n) * torch.tensor([], dtype=dtype).element_size()
            chunk = max(cfg.block_v, cfg.chunk_bytes // per_col // cfg.block_v * cfg.block_v)
        self.chunk = min(chunk, v_padded)
        self.chunk_tiles = triton.cdiv(self.chunk, cfg.block_v)
        # enough programs to fill the GPU a few times over; each sweeps tiles_per_split vocabulary tiles
        splits_wanted = max(1, triton.cdiv(4 * _sm_count(device), self.token_tiles))
        self.tiles_per_split = triton.cdiv(self.chunk_tiles, min(splits_wanted, self.chunk_tiles))
        self.splits = triton.cdiv(self.chunk_tiles, self.tiles_per_split)

    def chunks(self):
        for begin in range(0, self.v, self.chunk):
            yield begin, min(self.chunk, self.v - begin)


def _options(dtype: torch.dtype, cfg: LinearConfig) -> dict:
    # The interpreter computes 16-bit dots wrongly: tiles are upcast there, and multiplied exactly.
    return {"UPCAST": interpreting() and dtype != torch.float32,
            "DOT_PRECISION": "ieee" if interpreting() else _dot_precision(dtype),
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   softcap: float = 0.0, *, with_grad: bool = False, weights: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, num_segments: int = 0, log_tau: float = 0.0,
                   config: LinearConfig | None = None):
    """hidden (N, H), weight (V, H), targets (N,) → (logp (N,), lse (N,), stats (M, 7) or None, direction or None).

    ``with_grad``: also dℓ/dhidden (N, H) fp32 (MODE 1 + B + direction kernels). With ``segment_ids`` and
    ``weights`` the statistics are reduced in the final combine (the fused epilogue). All outputs fp32.
    """
    n, hid = hidden.shape
    v = weight.shape[0]
    check_target_values(targets, v, ignore_index, "linear_token_logprobs")
    has_segments = segment_ids is not None
    if has_segments:
        check_segment_values(segment_ids, num_segments, "linear_segment_stats")
    cfg = config or default_config(hidden.dtype)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.zeros(n, **f32), torch.zeros(n, **f32)
    stats = torch.zeros(num_segments, NUM_STATS, **f32) if has_segments else None  # the epilogue adds into it
    direction = torch.zeros(n, hid, **f32) if with_grad else None  # acc, then dℓ/dh in place
    if n == 0:
        return logp, lse, stats, direction
    plan = _Plan(n, v, hid, hidden.dtype, dev, cfg, store_chunk=with_grad)
    opts = _options(hidden.dtype, cfg)
    mode = MODE_PROBS if with_grad else MODE_LSE
    parts = plan.chunk_tiles if with_grad else plan.splits
    part_m, part_s = torch.empty(n, parts, **f32), torch.empty(n, parts, **f32)
    state_m, state_s = torch.empty(n, **f32), torch.empty(n, **f32)
    alpha = torch.empty(n, **f32) if with_grad else state_m
    target_logit = torch.zeros(n, **f32)
    probs = torch.empty(n, plan.chunk, dtype=hidden.dtype, device=dev) if with_grad else part_m
    cap = float(softcap)
    chunks = list(plan.chunks())
    for index, (begin, cols) in enumerate(chunks):
        _linear_logits_kernel[(plan.token_tiles * plan.splits,)](
            H_ptr=hidden, W_ptr=weight, Targets_ptr=targets, Lse_ptr=lse, GradLogp_ptr=lse,
            TargetLogit_ptr=target_logit,
            PartM_ptr=part_m, PartS_ptr=part_s, P_ptr=probs, N=n, V=v, HID=hid, v_begin=begin, chunk_cols=cols,
            num_splits=plan.splits, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
            stride_pn=probs.stride(0), stride_part=part_m.stride(0), softcap=cap, MODE=mode, SOFTCAP=cap > 0,
            IGNORE_INDEX=ignore_index, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            tiles_per_split=plan.tiles_per_split, GROUP=cfg.group, **opts)
        final = index == len(chunks) - 1
        _linear_combine_kernel[(triton.cdiv(n, COMBINE_BLOCK_N),)](
            Targets_ptr=targets, PartM_ptr=part_m, PartS_ptr=part_s, StateM_ptr=state_m, StateS_ptr=state_s,
            Alpha_ptr=alpha, TargetLogit_ptr=target_logit, Logp_ptr=logp, Lse_ptr=lse,
            Weights_ptr=weights if has_segments else logp, Seg_ptr=segment_ids if has_segments else targets,
            Stats_ptr=stats if has_segments else logp, N=n, V=v,
            num_parts=triton.cdiv(cols, cfg.block_v) if with_grad else plan.splits, stride_part=part_m.stride(0),
            num_segments=num_segments, log_tau=float(log_tau), FIRST=index == 0, STORE_SCALES=with_grad,
            FINAL=final, HAS_SEGMENTS=has_segments, IGNORE_INDEX=ignore_index, BLOCK_N=COMBINE_BLOCK_N,
            BLOCK_P=COMBINE_BLOCK_P, num_warps=4)
        if with_grad:  # the last chunk's GEMM also turns the accumulator into dℓ/dh (FINALIZE)
            _prob_matmul(probs, weight, targets, alpha, part_m, direction, begin, cols, ignore_index, cfg, opts,
                         scaled=True, finalize=final, target_logit=target_logit, state_s=state_s, softcap=cap)
    return logp, lse, stats, direction


def _prob_matmul(probs, weight, targets, alpha, scale, acc, begin, cols, ignore_index, cfg, opts, scaled,
                 finalize=False, target_logit=None, state_s=None, softcap=0.0):
    n, hid = acc.shape
    # The finalising epilogue holds W[y] beside the accumulator: half-width tiles keep it in registers (the
    # full 128 × 128 tile spills on sm_80); it runs for the last chunk only.
    block_out = max(16, cfg.block_out // 2) if finalize else cfg.block_out
    _linear_prob_matmul_kernel[(triton.cdiv(n, cfg.block_m) * triton.cdiv(hid, block_out),)](
        P_ptr=probs, W_ptr=weight, Targets_ptr=targets, Alpha_ptr=alpha, Scale_ptr=scale, Acc_ptr=acc,
        TargetLogit_ptr=alpha if target_logit is None else target_logit,
        StateS_ptr=alpha if state_s is None else state_s, N=n, V=weight.shape[0], HID=hid, v_begin=begin,
        chunk_cols=cols, stride_pn=probs.stride(0), stride_wv=weight.stride(0), stride_sn=scale.stride(0),
        stride_sp=scale.stride(1), stride_an=acc.stride(0), softcap=float(softcap), SCALED=scaled,
        FINALIZE=finalize, SOFTCAP=softcap > 0, IGNORE_INDEX=ignore_index, BLOCK_N=cfg.block_m,
        BLOCK_K=cfg.block_k, BLOCK_OUT=block_out, PART_COLS=cfg.block_v, GROUP=cfg.group, **opts)


def linear_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    grad_logp: torch.Tensor, ignore_index: int = IGNORE_INDEX, softcap: float = 0.0, *,
                    need_hidden_grad: bool = True, need_weight_grad: bool = False,
                    config: LinearConfig | None = None):
    """dL/dℓ (N,) fp32 → (grad_hidden (N, H) in hidden's dtype or None, grad_weight (V, H) in W's dtype or None).

    Recomputes the logits chunk by chunk and writes dL/dz = g ⊙ dℓ/dz (A in MODE 2, one rounding to the input
    dtype), then grad_hidden += dL/dz·W[chunk] (B) and grad_W[chunk] = dL/dzᵀ·h (C).
    """
    n, hid = hidden.shape
    v = weight.shape[0]
    cfg = config or default_config(hidden.dtype)
    dev = hidden.device
    grad_hidden32 = torch.zeros(n, hid, dtype=torch.float32, device=dev) if need_hidden_grad else None
    grad_weight = torch.zeros_like(weight) if need_weight_grad else None  # rows are written chunk by chunk
    if n == 0 or not (need_hidden_grad or need_weight_grad):
        return (None if grad_hidden32 is None else grad_hidden32.to(hidden.dtype)), grad_weight
    plan = _Plan(n, v, hid, hidden.dtype, dev, cfg, store_chunk=True)
    opts = _options(hidden.dtype, cfg)
    cap = float(softcap)
    dlogits = torch.empty(n, plan.chunk, dtype=hidden.dtype, device=dev)
    scratch = torch.empty(n, dtype=torch.float32, device=dev)  # the target logit (not needed here)
    grad_logp = grad_logp.float().contiguous()
    for begin, cols in plan.chunks():
        _linear_logits_kernel[(plan.token_tiles * plan.splits,)](
            H_ptr=hidden, W_ptr=weight, Targets_ptr=targets, Lse_ptr=lse, GradLogp_ptr=grad_logp,
            TargetLogit_ptr=scratch,
            PartM_ptr=scratch, PartS_ptr=scratch, P_ptr=dlogits, N=n, V=v, HID=hid, v_begin=begin, chunk_cols=cols,
            num_splits=plan.splits, stride_hn=hidden.stride(0), stride_wv=weight.stride(0),
            stride_pn=dlogits.stride(0), stride_part=0, softcap=cap, MODE=MODE_DLOGITS, SOFTCAP=cap > 0,
            IGNORE_INDEX=ignore_index, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
            tiles_per_split=plan.tiles_per_split, GROUP=cfg.group, **opts)
        if need_hidden_grad:
            _prob_matmul(dlogits, weight, targets, scratch, scratch[:, None], grad_hidden32, begin, cols,
                         ignore_index, cfg, opts, scaled=False)
        if need_weight_grad:
            _linear_weight_grad_kernel[(triton.cdiv(cols, cfg.block_v) * triton.cdiv(hid, cfg.block_out),)](
                P_ptr=dlogits, H_ptr=hidden, GradW_ptr=grad_weight, N=n, HID=hid,
                v_begin=begin, chunk_cols=cols, stride_pn=dlogits.stride(0), stride_hn=hidden.stride(0),
                stride_gwv=grad_weight.stride(0), BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                BLOCK_OUT=cfg.block_out, GROUP=cfg.group, **opts)
    return (None if grad_hidden32 is None else grad_hidden32.to(hidden.dtype)), grad_weight
