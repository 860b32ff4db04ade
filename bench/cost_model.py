"""Cost model of the fused lm-head kernels on an H100: FLOPs, HBM bytes and time at peak, per kernel.

    python -m bench.cost_model                 # every shape, both designs, the target check
    python -m bench.cost_model --json out.json --check     # exit 1 if the target is missed

Judges a kernel design before a GPU is lent. For each kernel at real heads (Qwen2.5-1.5B: H = 1536,
V = 151,936; Llama-3.1-8B: H = 4096, V = 128,256) and N = 4096, 8192, 16,384 tokens it prints the tensor-core
FLOPs, the bytes moved to and from HBM, and the time each takes at H100 SXM peak (989 TFLOP/s dense bf16,
3.35 TB/s). Two designs: ``before`` (commit 3daac3e: one program per token tile sweeping the vocabulary,
recomputing backward kernels with fp32 read-modify-write accumulators in HBM) and ``after`` (the chunked
design of ``kernels/linear_token_logprobs.py`` with its default tiles). Target: every matmul kernel's memory
time ≤ its tensor-core time at N = 8192, H = 4096, V = 128,256.

The memory model (stated, simple, the same for both designs):
  * A grouped GEMM (each program one block_rows × block_cols output tile over the whole K; programs ordered in
    groups of ``group`` row tiles, Triton's tutorial order): the column operand comes from HBM once per group
    of row tiles, ceil(row_tiles / group) times in all; the row operand once in all if a group's row panels
    (group · block_rows · K) fit in half the L2, else once per wave of resident programs in the group.
  * One program per row tile sweeping every column tile (the ``before`` forward and hidden gradient): the
    column tile of a step is shared by the wave (HBM once per wave); each program re-reads its row panel every
    step, from L2 if the wave's panels fit in half the L2, else from HBM.
  * fp32 accumulators kept in HBM are read and written once per update. Outputs are written once.
  * Re-reads that hit L2 cost nothing here (L2 bandwidth is not modelled); elementwise work is not counted as
    FLOPs. Resident programs: one per SM (8-warp tiles with 74–98 KB of shared memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # dense bf16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s
    sms: int
    l2_bytes: int


H100 = Device("H100 SXM (peak: 989 TFLOP/s dense bf16, 3.35 TB/s)", 989e12, 3.35e12, 132, 50 * 2**20)
HEADS = {"Qwen2.5-1.5B": (1536, 151_936), "Llama-3.1-8B": (4096, 128_256)}
TOKENS = (4096, 8192, 16_384)
TARGET = dict(N=8192, H=4096, V=128_256)


@dataclass
class KernelCost:
    design: str
    phase: str
    kernel: str
    flops: float  # tensor-core FLOPs
    hbm_bytes: float
    matmul: bool = True  # elementwise kernels have no tensor-core time to compare with
    calls: int = 1

    def tensor_ms(self, dev: Device = H100) -> float:
        return self.flops / dev.flops * 1e3

    def memory_ms(self, dev: Device = H100) -> float:
        return self.hbm_bytes / dev.bandwidth * 1e3


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grouped_gemm_bytes(rows: int, cols: int, k: int, block_rows: int, block_cols: int, group: int,
                       row_elt: float, col_elt: float, dev: Device = H100) -> float:
    """HBM bytes of the two operands of a grouped GEMM (the first rule of the module docstring)."""
    row_tiles, col_tiles = cdiv(rows, block_rows), cdiv(cols, block_cols)
    groups = cdiv(row_tiles, group)
    col_bytes = groups * cols * k * col_elt
    rows_in_group = min(group, row_tiles)
    if rows_in_group * block_rows * k * row_elt <= dev.l2_bytes / 2:
        row_bytes = rows * k * row_elt
    else:
        row_bytes = rows * k * row_elt * cdiv(rows_in_group * col_tiles, dev.sms)
    return row_bytes + col_bytes


def sweep_bytes(rows: int, cols: int, k: int, block_rows: int, block_cols: int, row_elt: float, col_elt: float,
                dev: Device = H100) -> tuple[float, float]:
    """(row operand, column operand) HBM bytes of a one-program-per-row-tile sweep (the second rule)."""
    row_tiles = cdiv(rows, block_rows)
    resident = min(row_tiles, dev.sms)
    waves = cdiv(row_tiles, resident)
    col_bytes = waves * cols * k * col_elt
    steps = cdiv(cols, block_cols)
    panels_fit = resident * block_rows * k * row_elt <= dev.l2_bytes / 2
    row_bytes = rows * k * row_elt * (1 if panels_fit else steps)
    return row_bytes, col_bytes


# ---------------------------------------------------------------------------------------------------
# before: commit 3daac3e (BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, 8 warps, 1-D grids)
# ---------------------------------------------------------------------------------------------------
def before_design(n: int, h: int, v: int, elt: int = 2) -> list[KernelCost]:
    bn, bv = 64, 128
    h_bytes, w_bytes = sweep_bytes(n, v, h, bn, bv, elt, elt)
    logits = 2 * n * h * v
    fwd = KernelCost("before", "forward", "_linear_token_logprobs_fwd_kernel", logits, h_bytes + w_bytes + 8 * n)
    # grad_h: same sweep (the second load of each W tile in the gradient loop hits L2), plus the program's fp32
    # BLOCK_N × H slice of grad_h read and written at every vocabulary tile
    bwd_h = KernelCost("before", "backward", "_linear_token_logprobs_bwd_hidden_kernel", 2 * logits,
                       h_bytes + w_bytes + 8 * n * h * cdiv(v, bv) + 12 * n)
    # grad_W: one program per vocabulary tile sweeping the token tiles: h tile shared by the wave, the program's
    # W panel re-read at every token step, its fp32 BLOCK_V × H slice of grad_W read and written every step
    w_panel, h_shared = sweep_bytes(v, n, h, bv, bn, elt, elt)
    bwd_w = KernelCost("before", "backward (trainable lm_head)", "_linear_token_logprobs_bwd_weight_kernel",
                       2 * logits, w_panel + h_shared + 8 * v * h * cdiv(n, bn))
    return [fwd, bwd_h, bwd_w]


# ---------------------------------------------------------------------------------------------------
# after: kernels/linear_token_logprobs.py, default bf16 tiles
# ---------------------------------------------------------------------------------------------------
def after_design(n: int, h: int, v: int, elt: int = 2) -> list[KernelCost]:
    from pvfast.kernels.linear_token_logprobs import DEFAULT_CONFIG as cfg  # the tiles the launchers use

    bn, bv, bm, bo, g = cfg.block_n, cfg.block_v, cfg.block_m, cfg.block_out, cfg.group
    chunk = _chunk_columns(n, v, elt)
    chunks = cdiv(v, chunk)
    logits = 2 * n * h * v
    out = []
    # forward without gradient (reference pass; trainable-weight forward): A in MODE 0 + one combine
    a0 = grouped_gemm_bytes(n, v, h, bn, bv, g, elt, elt)
    splits = 64  # order of magnitude of the vocabulary splits (partials per row)
    out.append(KernelCost("after", "forward (no gradient)", "_linear_logits_kernel MODE=0", logits,
                          a0 + 8 * n * splits + 12 * n))
    out.append(KernelCost("after", "forward (no gradient)", "_linear_combine_kernel", 0, 8 * n * splits + 24 * n,
                          matmul=False))
    # forward with gradient (frozen lm_head), per chunk: A (MODE 1), combine, B (scaled; finalised at the end)
    parts = chunk // bv
    a1 = grouped_gemm_bytes(n, v, h, bn, bv, g, elt, elt) + chunks * (n * chunk * elt + 8 * n * parts)
    out.append(KernelCost("after", "forward + dl/dh (frozen lm_head)", "_linear_logits_kernel MODE=1", logits, a1,
                          calls=chunks))
    out.append(KernelCost("after", "forward + dl/dh (frozen lm_head)", "_linear_combine_kernel",
                          0, chunks * (12 * n * parts + 24 * n), matmul=False, calls=chunks))
    b_operands = sum(grouped_gemm_bytes(n, h, min(chunk, v - c0), bm, bo, g, elt + 4 / bv, elt)
                     for c0 in range(0, v, chunk))
    acc_traffic = (2 * chunks - 1) * 4 * n * h + elt * n * h  # read+write per chunk (first: write), W[y] rows
    out.append(KernelCost("after", "forward + dl/dh (frozen lm_head)", "_linear_prob_matmul_kernel SCALED=1",
                          2 * n * h * v, b_operands + acc_traffic, calls=chunks))
    out.append(KernelCost("after", "backward (frozen lm_head)", "grad_logp[:, None] * direction (torch)", 0,
                          4 * n * h + elt * n * h + 4 * n, matmul=False))
    # backward with recomputation (trainable lm_head), per chunk: A (MODE 2), B (unscaled), C
    out.append(KernelCost("after", "backward (trainable lm_head)", "_linear_logits_kernel MODE=2", logits,
                          grouped_gemm_bytes(n, v, h, bn, bv, g, elt, elt) + chunks * (n * chunk * elt + 8 * n),
                          calls=chunks))
    out.append(KernelCost("after", "backward (trainable lm_head)", "_linear_prob_matmul_kernel SCALED=0",
                          2 * n * h * v, sum(grouped_gemm_bytes(n, h, min(chunk, v - c0), bm, bo, g, elt, elt)
                                             for c0 in range(0, v, chunk)) + (2 * chunks - 1) * 4 * n * h,
                          calls=chunks))
    out.append(KernelCost("after", "backward (trainable lm_head)", "_linear_weight_grad_kernel", 2 * n * h * v,
                          sum(grouped_gemm_bytes(min(chunk, v - c0), h, n, bv, bo, g, elt, elt)
                              for c0 in range(0, v, chunk)) + v * h * elt, calls=chunks))
    return out


def _chunk_columns(n: int, v: int, elt: int) -> int:
    """The launchers' own chunk width (kernels/linear_token_logprobs.py ``_Plan``)."""
    import torch

    from pvfast.kernels.linear_token_logprobs import DEFAULT_CONFIG, _Plan

    dtype = {2: torch.bfloat16, 4: torch.float32}[elt]
    return _Plan(n, v, 1, dtype, torch.device("meta"), DEFAULT_CONFIG, store_chunk=True).chunk


def footprint(n: int, h: int, v: int, elt: int = 2) -> dict:
    """Device memory the ``after`` gradient-in-forward allocates beyond its inputs (bytes)."""
    bv = 128
    chunk = _chunk_columns(n, v, elt)
    return {"chunk_columns": chunk, "direction_fp32": 4 * n * h, "probability_chunk": n * chunk * elt,
            "partials": 8 * n * (chunk // bv), "per_token_vectors": 7 * 4 * n}


def rows_for(n: int, h: int, v: int, head: str) -> list[dict]:
    rows = []
    for cost in before_design(n, h, v) + after_design(n, h, v):
        row = dict(head=head, N=n, H=h, V=v, **asdict(cost))
        row.update(GFLOP=cost.flops / 1e9, GB=cost.hbm_bytes / 1e9, tensor_ms=cost.tensor_ms(),
                   memory_ms=cost.memory_ms())
        rows.append(row)
    return rows


def phase_totals(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float]]:
    """(design, step kind) → (tensor ms, memory ms) of one policy step."""
    steps = {
        ("before", "frozen lm_head"): ("forward", "backward"),
        ("before", "trainable lm_head"): ("forward", "backward", "backward (trainable lm_head)"),
        ("after", "frozen lm_head"): ("forward + dl/dh (frozen lm_head)", "backward (frozen lm_head)"),
        ("after", "trainable lm_head"): ("forward (no gradient)", "backward (trainable lm_head)"),
    }
    out = {}
    for (design, kind), phases in steps.items():
        sel = [r for r in rows if r["design"] == design and r["phase"] in phases]
        out[(design, kind)] = (sum(r["tensor_ms"] for r in sel), sum(r["memory_ms"] for r in sel))
    return out


def target_misses(rows: list[dict]) -> list[str]:
    """After-design matmul kernels whose memory time exceeds their tensor time at the target shape."""
    return [f"{r['kernel']} ({r['phase']}): memory {r['memory_ms']:.2f} ms > tensor {r['tensor_ms']:.2f} ms"
            for r in rows if r["design"] == "after" and r["matmul"] and r["N"] == TARGET["N"]
            and r["H"] == TARGET["H"] and r["V"] == TARGET["V"] and r["memory_ms"] > r["tensor_ms"]]


def all_rows() -> list[dict]:
    rows = []
    for head, (h, v) in HEADS.items():
        for n in TOKENS:
            rows += rows_for(n, h, v, head)
    return rows


def render(rows: list[dict]) -> str:
    lines = [f"device: {H100.name}; L2 {H100.l2_bytes / 2**20:.0f} MiB, {H100.sms} SMs", ""]
    for head, (h, v) in HEADS.items():
        for n in TOKENS:
            sel = [r for r in rows if r["head"] == head and r["N"] == n]
            lines.append(f"## {head} head (H={h}, V={v:,}), N={n:,} tokens")
            lines.append(f"{'design':<7} {'phase':<34} {'kernel':<44} {'TFLOP':>7} {'GB':>8} {'tensor ms':>10} "
                         f"{'memory ms':>10}  bound")
            for r in sel:
                bound = ("memory" if r["memory_ms"] > r["tensor_ms"] else "compute") if r["matmul"] else "elementwise"
                lines.append(f"{r['design']:<7} {r['phase']:<34} {r['kernel']:<44} {r['flops'] / 1e12:>7.2f} "
                             f"{r['GB']:>8.2f} {r['tensor_ms']:>10.2f} {r['memory_ms']:>10.2f}  {bound}")
            for (design, kind), (t, m) in phase_totals(sel).items():
                lines.append(f"  step total, {design:<6} {kind:<18}: tensor {t:7.2f} ms, memory {m:7.2f} ms, "
                             f"max {max(t, m):7.2f} ms")
            fp = footprint(n, h, v)
            lines.append("  after, frozen lm_head, extra memory: " + ", ".join(
                f"{k} {val / 2**20:.0f} MiB" if k != "chunk_columns" else f"{k} {val}" for k, val in fp.items()))
            lines.append("")
    misses = target_misses(rows)
    lines.append(f"target (N={TARGET['N']}, H={TARGET['H']}, V={TARGET['V']:,}): every after-design matmul kernel's "
                 f"memory time <= its tensor time: {'met' if not misses else 'MISSED'}")
    lines += [f"  miss: {m}" for m in misses]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="", help="write every row to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = ap.parse_args(argv)
    rows = all_rows()
    print(render(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": asdict(H100), "rows": rows}, f, indent=1)
    return 1 if args.check and target_misses(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
