"""FusedTokenPOLoss inside another trainer's ``compute_loss``: a ``transformers.Trainer`` subclass.

    python examples/fused_loss_hf_trainer.py              # tiny Llama + LoRA on the CPU, 6 steps

The trainer's collator yields padded pair rows (``pvfast.packing.padded``); ``compute_loss`` runs the model to
its final hidden states, scores the reference with the adapters disabled, and returns pvfast's loss.
The same three lines drop into TRL's ``DPOTrainer.compute_loss`` or any other trainer.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pairs import pair_groups  # noqa: E402

from pvfast import FusedTokenPOLoss, causal_lm_rows  # noqa: E402
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.packing.padded import collate_pair_groups  # noqa: E402
from pvfast.testing import load_tiny_model


class FusedPOTrainer(Trainer):
    """A Trainer whose loss is pvfast's fused TAB-PO (or any objective passed in)."""

    def __init__(self, *args, po_loss: FusedTokenPOLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.po_loss = po_loss
        self.last_metrics: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = inputs["batch"]
        base = model.get_base_model()

        def rows():
            hidden = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            return causal_lm_rows(hidden, batch.labels, batch.token_roles, batch.token_diff)

        ref_stats = None
        if self.po_loss.needs_reference:
            with torch.no_grad(), model.disable_adapter():
                ref_stats = self.po_loss.statistics(rows(), base.lm_head.weight)
        out = self.po_loss(rows(), base.lm_head.weight, pairs=batch.pairs, ref_stats=ref_stats)
        self.last_metrics = {k: float(v) for k, v in out.metrics.items()}
        return (out.loss, out) if return_outputs else out.loss


class PairGroupDataset(torch.utils.data.Dataset):
    def __init__(self, groups):
        self.groups = groups

    def __len__(self):
        return len(self.groups)

    def __getitem__(self, i):
        return self.groups[i]


def train(steps: int = 6, lr: float = 5e-3, arch: str = "llama", seed: int = 0, output_dir: str | None = None):
    torch.manual_seed(seed)
    tokenizer = load_tiny_tokenizer(arch)
    model = load_tiny_model(arch, lora=True)
    groups = pair_groups(tokenizer, n_examples=4, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=output_dir or tmp, max_steps=steps, per_device_train_batch_size=2,
                                 learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                                 save_strategy="no", use_cpu=True, seed=seed, remove_unused_columns=False,
                                 dataloader_num_workers=0)
        trainer = FusedPOTrainer(
            model=model, args=args, train_dataset=PairGroupDataset(groups),
            data_collator=lambda gs: {"batch": collate_pair_groups(gs, tokenizer.pad_token_id)},
            po_loss=FusedTokenPOLoss("tabpo"))
        result = trainer.train()
    print(f"trained {result.global_step} steps, last loss {result.training_loss:.4f}, "
          f"last metrics: { {k: round(v, 4) for k, v in trainer.last_metrics.items()} }")
    return trainer, result


if __name__ == "__main__":
    train()
