"""Workloads for the data-layout benchmark (``bench/test_bench_packing.py``): tree-packed vs the published layout.

The PV-Miner-shaped workload is the real pipeline on the synthetic corpus: the prompt builder's ~3.5k-token
instruction (tiny tokenizer), each message, the canonical JSON of its annotations as chosen and three
rejected outputs from :func:`pvfast.data.pairs.make_preference_records` (empty confusion tables: label draws are
uniform, which changes which labels are confused, not the token lengths).

Two layouts of the same pairs:

- **published** (the released recipe, SPEC §6): every pair runs its chosen and its rejected completion as two
  full sequences, each with the whole prompt; the reference runs the same two sequences again with the
  adapters disabled. Per pair: 2 · [(P + C) + (P + R)] tokens.
- **pvfast**: records packed as token tries into rows of at most ``token_budget`` tokens
  (:func:`pvfast.packing.loss_batch.make_loss_batches`); the reference is a second forward over the same row, or none
  per step with a precomputed cache (one extra pass over the data before training).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pvfast.data.codebook import CODES, SUBCODES
from pvfast.data.pairs import ConfusionTable, make_preference_records
from pvfast.data.prompt import build_prompt
from pvfast.data.records import PreferenceRecord
from pvfast.data.synth import default_corpus
from pvfast.data.tokenization import TokenizedPairGroup, tokenize_pair_group
from pvfast.model.forward import lm_head_weight, packed_attention_mask, packed_forward
from pvfast.model.reference import reference_stats
from pvfast.objectives.fused_loss import FusedTokenPOLoss, causal_lm_rows
from pvfast.packing.loss_batch import LossBatch, make_loss_batches, preference_groups
from pvfast.packing.padded import collate_pair_groups

REJECTED_PER_EXAMPLE = 3  # the default strategies: label confusion, missing and extra annotation
TOKEN_BUDGET = 16384  # tokens per packed row (the trainer's default micro-batch budget)


# ---------------------------------------------------------------------------------------------- workload
@functools.lru_cache(maxsize=4)
def pvminer_records(limit: int | None = None) -> tuple[PreferenceRecord, ...]:
    """Preference records of the synthetic corpus that got all three rejected outputs (first ``limit``)."""
    records = make_preference_records(default_corpus(), ConfusionTable.empty(CODES), ConfusionTable.empty(SUBCODES))
    full = [r for r in records if len(r.rejected) == REJECTED_PER_EXAMPLE]
    return tuple(full if limit is None else full[:limit])


def distinct_prefix_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Nodes of the token trie over ``sequences``, counted without pvfast's packer.

    A trie has one node per distinct non-empty prefix. Sorted lexicographically, a sequence shares with all
    earlier ones exactly its longest common prefix with its predecessor, so the count is
    Σ len(s) − Σ lcp(s_i, s_{i-1}).
    """
    ordered = sorted(tuple(int(t) for t in s) for s in sequences)
    total = sum(len(s) for s in ordered)
    for prev, cur in zip(ordered, ordered[1:]):
        m = min(len(prev), len(cur))
        differ = np.flatnonzero(np.asarray(prev[:m]) != np.asarray(cur[:m]))
        total -= int(differ[0]) if differ.size else m
    return total


@dataclass(frozen=True)
class LayoutTokens:
    """Token counts of one workload under both layouts (one step of every pair, i.e. one epoch)."""

    records: int
    pairs: int
    packs: int
    prompt_tokens_mean: float  # instruction + message + chat markers, per record
    completion_tokens_mean: float  # chosen and rejected completions, end-of-turn included
    published_policy: int  # Σ over pairs of (P + C) + (P + R)
    tree_policy: int  # Σ over packs of trie tokens (what pvfast's policy forward runs)

    @property
    def published_with_reference(self) -> int:
        return 2 * self.published_policy

    @property
    def tree_with_reference(self) -> int:
        return 2 * self.tree_policy


def count_layout_tokens(records: Sequence[PreferenceRecord], tokenizer, token_budget: int = TOKEN_BUDGET
                        ) -> tuple[LayoutTokens, list[LossBatch]]:
    """Both layouts' token counts of ``records``; the pvfast count is checked against an independent trie count.

    Raises AssertionError if a packed row's ``tree_tokens`` differs from :func:`distinct_prefix_tokens`
    of its sequences, or if its rows break the budget.
    """
    groups = preference_groups(records, tokenizer, token_budget=token_budget)
    batches = make_loss_batches(groups, token_budget, "po")
    published = 0
    prompt_lengths, completion_lengths = [], []
    for group in groups:  # completions are [chosen@1, rejected_1, ..., chosen@k, rejected_k]
        prompt_lengths.append(len(group.prompt_ids))
        published += sum(len(group.prompt_ids) + len(c) for c in group.completions)
        completion_lengths += [len(group.completions[0])] + [len(c) for c in group.completions[1::2]]
    tree = 0
    for batch in batches:
        packed = batch.packed
        members = sorted({item for item, _ in packed.completion_sources})
        expected = distinct_prefix_tokens([s for i in members for s in groups[i].sequences()])  # items index groups
        assert packed.tree_tokens == expected, (packed.tree_tokens, expected)
        assert packed.num_tokens <= token_budget
        tree += packed.tree_tokens
    counts = LayoutTokens(records=len(groups), pairs=sum(b.num_pairs for b in batches), packs=len(batches),
                          prompt_tokens_mean=float(np.mean(prompt_lengths)),
                          completion_tokens_mean=float(np.mean(completion_lengths)),
                          published_policy=published, tree_policy=tree)
    return counts, batches


# ------------------------------------------------------------------------------------------- step time
@dataclass
class StepCase:
    """One TAB-PO step (forward + backward of the policy, reference forward) over the same pairs, two layouts.

    ``tree_step()`` runs every pack of ``batches``; ``unshared_step()`` runs every pair as its own padded
    two-row batch (``collate_pair_groups`` of a one-rejected group, as the released recipe's per-device
    batch of 1), each pair's loss scaled by 1/P so the accumulated gradient is that of the mean. Both
    return the loss of the whole step (a float), which must agree between layouts.
    """

    model: torch.nn.Module
    loss_fn: FusedTokenPOLoss
    batches: list[LossBatch]
    pair_groups: list[TokenizedPairGroup]  # one per pair, a single rejected completion each
    pad_id: int
    autocast_dtype: torch.dtype | None = None  # bf16 on a GPU

    @property
    def num_pairs(self) -> int:
        return len(self.pair_groups)

    def _autocast(self):
        device = next(self.model.parameters()).device
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def tree_step(self) -> float:
        device = next(self.model.parameters()).device
        total = 0.0
        for batch in self.batches:
            batch = batch.to(device)
            with self._autocast():
                mask = packed_attention_mask(self.model, batch.packed)
                ref = reference_stats(self.model, batch, self.loss_fn, mask)
                hidden = packed_forward(self.model, batch.packed, mask)
                out = self.loss_fn(batch.scoring_rows(hidden), lm_head_weight(self.model), batch.pairs, ref)
            share = batch.num_pairs / self.num_pairs  # the row's loss is a mean over its pairs
            (out.loss * share).backward()
            total += out.loss.item() * share
        self.model.zero_grad(set_to_none=True)
        return total

    def unshared_step(self) -> float:
        device = next(self.model.parameters()).device
        decoder = self.model.get_base_model().get_decoder()
        head = lm_head_weight(self.model)
        total = 0.0
        for group in self.pair_groups:
            padded = collate_pair_groups([group], self.pad_id)
            ids, attn = padded.input_ids.to(device), padded.attention_mask.to(device)
            labels = padded.labels.to(device)
            roles, diff = padded.token_roles.to(device), padded.token_diff.to(device)
            with self._autocast():
                with torch.no_grad(), self.model.disable_adapter():
                    was_training = self.model.training
                    self.model.eval()  # as reference_stats: no dropout in the reference
                    ref_hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
                    ref = self.loss_fn.statistics(causal_lm_rows(ref_hidden, labels, roles, diff), head)
                    self.model.train(was_training)
                hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
                out = self.loss_fn(causal_lm_rows(hidden, labels, roles, diff), head, padded.pairs, ref)
            (out.loss / self.num_pairs).backward()
            total += out.loss.item() / self.num_pairs
        self.model.zero_grad(set_to_none=True)
        return total


def per_pair_groups(records: Sequence[PreferenceRecord], tokenizer) -> list[TokenizedPairGroup]:
    """One tokenized group per pair (chosen + one rejected), so a padded batch holds exactly one pair."""
    groups = []
    for record in records:
        prompt = build_prompt(tokenizer, record.direction, record.message)
        groups += [tokenize_pair_group(tokenizer, prompt, record.chosen, [rejected])
                   for rejected in record.rejected]
    return groups


def build_step_case(model, tokenizer, records: Sequence[PreferenceRecord], token_budget: int,
                    impl: str = "auto", autocast_dtype: torch.dtype | None = None) -> StepCase:
    """A :class:`StepCase` of ``records`` on ``model`` (a peft LoRA causal LM) in train mode."""
    groups = preference_groups(records, tokenizer, token_budget=token_budget)
    batches = make_loss_batches(groups, token_budget, "po")
    model.train()
    return StepCase(model=model, loss_fn=FusedTokenPOLoss("tabpo", impl=impl), batches=batches,
                    pair_groups=per_pair_groups(records, tokenizer), pad_id=tokenizer.pad_token_id,
                    autocast_dtype=autocast_dtype)


# ------------------------------------------------------------------------------------------ GPU model
QWEN25_15B = dict(  # Qwen2.5-1.5B-Instruct's published config.json (architecture only; weights random here)
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu",
)


def qwen25_15b_qlora(tmp_dir, seed: int = 0):
    """The Qwen2.5-1.5B architecture with random weights, loaded as the published QLoRA recipe on CUDA.

    A random bf16 model is saved to ``tmp_dir`` (safetensors) and loaded back with NF4 double-quantized
    4-bit weights and bf16 compute (bitsandbytes quantizes on load), then ``prepare_model_for_kbit_training``
    with gradient checkpointing and a LoRA r=16, α=32, dropout 0.05 on q,k,v,o,gate,up,down (SPEC §6).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config

    config = Qwen2Config(**QWEN25_15B)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_dir, safe_serialization=True)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)
