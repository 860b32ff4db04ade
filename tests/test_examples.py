"""The documented FusedTokenPOLoss examples run and train (examples/*.py)."""

import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_plain_loop_example_trains():
    import fused_loss_hf_loop

    history = fused_loss_hf_loop.train(steps=6)
    # Step 0: peft starts LoRA B at zero, so policy == reference, h = 0 and −log σ(0) = log 2 exactly.
    assert history[0]["margin"] == 0.0
    assert history[0]["loss_pref"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["margin"] > 0  # the preference term pushes chosen above rejected


def test_hf_trainer_example_trains():
    import fused_loss_hf_trainer

    trainer, result = fused_loss_hf_trainer.train(steps=3)
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # the optimizer moved the adapters off zero
    assert set(trainer.last_metrics) >= {"loss_pref", "loss_barrier", "margin", "reward_accuracy"}
