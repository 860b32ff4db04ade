"""FusedTokenPOLoss in a plain PyTorch / Hugging Face training loop.

    python examples/fused_loss_hf_loop.py                 # tiny Llama + LoRA on the CPU, 10 steps

What a loop needs to use pvfast's loss:
1. the policy's final hidden states (``model.model(...)``), not its logits: the fused op applies the
   lm_head itself, one vocabulary block at a time, so the (tokens × vocabulary) logits never exist;
2. the reference statistics: the same network with the LoRA adapters disabled, under no_grad;
3. ``FusedTokenPOLoss(...)(rows, lm_head.weight, pairs, ref_stats)`` → loss and metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _pairs when run as a script

from _pairs import pair_groups  # noqa: E402

from pvfast import FusedTokenPOLoss, causal_lm_rows  # noqa: E402
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.packing.padded import collate_pair_groups  # noqa: E402
from pvfast.testing import load_tiny_model


def final_hidden(peft_model, batch):
    """(B, T, H) hidden states after the last norm: the input of the lm_head."""
    base = peft_model.get_base_model()
    return base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def train(steps: int = 10, lr: float = 5e-3, arch: str = "llama", seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    tokenizer = load_tiny_tokenizer(arch)
    model = load_tiny_model(arch, lora=True)
    lm_head = model.get_base_model().lm_head.weight  # frozen under LoRA
    batch = collate_pair_groups(pair_groups(tokenizer, seed=seed), tokenizer.pad_token_id)
    loss_fn = FusedTokenPOLoss("tabpo")  # the released preset: β 0.5, τ 0.66, λ 0.5, w_diff 1.2

    # The reference never changes: score it once (the same network, adapters off, no graph).
    with torch.no_grad(), model.disable_adapter():
        ref_stats = loss_fn.statistics(causal_lm_rows(final_hidden(model, batch), batch.labels, batch.token_roles,
                                                      batch.token_diff), lm_head)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for step in range(steps):
        rows = causal_lm_rows(final_hidden(model, batch), batch.labels, batch.token_roles, batch.token_diff)
        out = loss_fn(rows, lm_head, pairs=batch.pairs, ref_stats=ref_stats)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        history.append({"step": step, **{k: float(v) for k, v in out.metrics.items()}})
        print(f"step {step:>3}  loss {out.loss.item():.4f}  margin {out.metrics['margin'].item():+.4f}  "
              f"reward acc {out.metrics['reward_accuracy'].item():.2f}  "
              f"gated {out.metrics['gated_fraction'].item():.2f}")
    return history


if __name__ == "__main__":
    train()
