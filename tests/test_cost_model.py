"""bench/cost_model.py: its arithmetic on small hand-worked cases, and the design target it reports."""

from __future__ import annotations

import pytest

from bench import cost_model as cm

BIG_L2 = cm.Device("test", flops=1e12, bandwidth=1e12, sms=4, l2_bytes=2**30)
SMALL_L2 = cm.Device("test", flops=1e12, bandwidth=1e12, sms=4, l2_bytes=16_384)


def test_grouped_gemm_bytes_hand_worked():
    # 256 × 512 output, K = 64, 64 × 128 tiles: 4 row tiles, 4 column tiles, groups of 2 row tiles → 2 groups.
    # Column operand (512 × 64 × 2 B = 65,536 B) read once per group: 131,072 B.
    # A group's row panels: 2 × 64 × 64 × 2 B = 16,384 B. With a big L2 the row operand (256 × 64 × 2 B =
    # 32,768 B) is read once; with a 16 KiB L2 (half: 8 KiB) once per wave of the group: 2 × 4 tiles over 4
    # resident programs = 2 waves → 65,536 B.
    assert cm.grouped_gemm_bytes(256, 512, 64, 64, 128, 2, 2, 2, BIG_L2) == 32_768 + 131_072
    assert cm.grouped_gemm_bytes(256, 512, 64, 64, 128, 2, 2, 2, SMALL_L2) == 65_536 + 131_072


def test_sweep_bytes_hand_worked():
    # 4 row tiles, 4 resident programs → 1 wave: the column operand (65,536 B) once. Row panels of the wave:
    # 4 × 64 × 64 × 2 = 32,768 B: fit a 1 GiB L2 (row operand read once, 32,768 B) but not 8 KiB (re-read at
    # each of the 512 / 128 = 4 column steps: 131,072 B).
    assert cm.sweep_bytes(256, 512, 64, 64, 128, 2, 2, BIG_L2) == (32_768, 65_536)
    assert cm.sweep_bytes(256, 512, 64, 64, 128, 2, 2, SMALL_L2) == (131_072, 65_536)


def test_kernel_time_at_peak():
    cost = cm.KernelCost("after", "p", "k", flops=989e9, hbm_bytes=3.35e9)
    assert cost.tensor_ms() == pytest.approx(1.0) and cost.memory_ms() == pytest.approx(1.0)


def test_before_design_hand_worked_accumulator_traffic():
    # N = 128, H = 64, V = 512: the hidden-gradient kernel reads and writes its fp32 64 × 64 slice of grad_h at
    # each of the 4 vocabulary tiles: 128 × 64 × 4 B × 2 × 4 = 262,144 B on top of the sweep's operands.
    n, h, v = 128, 64, 512
    fwd, bwd_h, bwd_w = cm.before_design(n, h, v)
    assert fwd.flops == 2 * n * h * v == 8_388_608 and bwd_h.flops == bwd_w.flops == 2 * fwd.flops
    assert bwd_h.hbm_bytes - (fwd.hbm_bytes - 8 * n) == 262_144 + 12 * n


@pytest.mark.parametrize("n,h,v", [(4096, 1536, 151_936), (8192, 4096, 128_256)])
def test_after_design_flops_per_policy_step(n, h, v):
    """Frozen lm_head: 4·N·H·V per step (forward with dℓ/dh, backward a scaling); trainable: 2 + 6."""
    rows = cm.after_design(n, h, v)

    def flops(phases):
        return sum(r.flops for r in rows if r.phase in phases)

    assert flops({"forward + dl/dh (frozen lm_head)", "backward (frozen lm_head)"}) == 4 * n * h * v
    assert flops({"forward (no gradient)"}) == 2 * n * h * v
    assert flops({"backward (trainable lm_head)"}) == 6 * n * h * v


def test_target_met_and_before_design_missed_it():
    rows = cm.rows_for(8192, 4096, 128_256, "Llama-3.1-8B")
    assert cm.target_misses(rows) == []
    before = [r for r in rows if r["design"] == "before" and r["kernel"].endswith("bwd_hidden_kernel")]
    assert before[0]["memory_ms"] > 5 * before[0]["tensor_ms"]  # the issue's ~270 GB accumulator traffic
    footprint = cm.footprint(8192, 4096, 128_256)
    assert footprint["probability_chunk"] <= 256 * 2**20 and footprint["chunk_columns"] % 128 == 0


def test_cli_prints_every_shape(capsys):
    assert cm.main(["--check"]) == 0
    out = capsys.readouterr().out
    for head in cm.HEADS:
        for n in cm.TOKENS:
            assert f"## {head} head" in out and f"N={n:,} tokens" in out
    assert "memory time <= its tensor time: met" in out
