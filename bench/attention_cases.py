"""Workloads of the tree-attention benchmark (``bench/test_bench_attention.py``): one TAB-PO step on one 8k pack.

The pack is the PV-Miner-shaped workload of ``bench/packing_cases.py`` (the prompt builder's ~3.5k-token
instruction through the tiny tokenizer, synthetic messages, chosen + three rejected outputs), packed into rows
of ``TOKEN_BUDGET`` tokens; the step is the trainer's: the tree in the attention implementation's form, the
reference statistics (same model, adapters disabled, no grad), the policy forward, the fused TAB-PO loss and
its backward. Two models:

- ``tiny``: the embedded tiny Qwen2 (2 layers, width 128, LoRA r8), the trainer's default model;
- ``smollm2``: SmolLM2-135M's architecture (LlamaConfig below, 30 layers, width 576, 9 heads / 3 key-value
  heads, 49,152-token vocabulary, tied embeddings), random init in fp32, LoRA r16 α32 on the 7 projections.

LoRA dropout is 0 and every LoRA B matrix random (``activate_lora``): both attention paths then compute the same
loss (checked), and the policy differs from the reference as it does mid-training.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from bench.packing_cases import pvminer_records
from pvfast.config.sections import LORA_TARGETS
from pvfast.model.attention import TREE_ATTENTION, register
from pvfast.model.forward import lm_head_weight, packed_attention_mask, packed_forward
from pvfast.model.reference import reference_stats
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import LossBatch, make_loss_batches, preference_groups

TOKEN_BUDGET = 8192
RECORDS = 40  # enough PV-Miner records for a full first pack at the budget

SMOLLM2_135M = dict(  # HuggingFaceTB/SmolLM2-135M's config.json (architecture only; weights random here)
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_theta=100000.0, hidden_act="silu",
)
MODELS = ("tiny", "smollm2")


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from pvfast.model.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()


@functools.lru_cache(maxsize=2)
def one_pack(token_budget: int = TOKEN_BUDGET) -> LossBatch:
    """The first (full) pack of the PV-Miner-shaped workload at ``token_budget``."""
    groups = preference_groups(pvminer_records(RECORDS), tiny_tokenizer(),
                               token_budget=token_budget)
    batch = make_loss_batches(groups, token_budget, "po")[0]
    assert batch.packed.num_tokens > 0.9 * token_budget, batch.packed.num_tokens  # a full row
    return batch


def build_model(name: str, num_layers: int | None = None):
    """The benchmark's peft LoRA model ``name`` (see the module docstring), in train mode, fp32 on the CPU."""
    from peft import LoraConfig, get_peft_model

    from pvfast.testing import activate_lora, load_tiny_model

    register()
    if name == "tiny":
        model = load_tiny_model("qwen2", lora=True)
        if num_layers is not None and num_layers != model.config.num_hidden_layers:
            from pvfast.model.tiny import DEFAULT_RECIPE

            recipe = dataclasses.replace(DEFAULT_RECIPE, num_hidden_layers=num_layers)
            model = load_tiny_model("qwen2", lora=True, recipe=recipe)
    elif name == "smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = dict(SMOLLM2_135M, **({} if num_layers is None else {"num_hidden_layers": num_layers}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = LlamaForCausalLM(LlamaConfig(**config)).float()
            lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                              task_type="CAUSAL_LM")
            model = get_peft_model(base, lora)
        model.config.use_cache = False
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return activate_lora(model).train()


def set_variant(model, attention: str, checkpointing: bool) -> None:
    """Switch the attention implementation (``pvfast_tree`` or ``sdpa`` = dense mask) and checkpointing."""
    model.set_attn_implementation(attention)
    base = model.get_base_model()
    if checkpointing:
        # Non-reentrant, as pvfast.model.loading does: gradients reach the LoRA weights without input grads.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def po_step(model, batch: LossBatch, loss_fn: FusedTokenPOLoss, cached_reference: torch.Tensor | None = None
            ) -> float:
    """One TAB-PO step on one pack, as the trainer runs it (reference pass, policy pass, backward); the loss.

    ``cached_reference``: the pack's (M, 7) reference statistics, precomputed (``--po.precompute_ref``): no
    reference forward in the step.
    """
    mask = packed_attention_mask(model, batch.packed)  # shared by the reference and policy passes
    ref = reference_stats(model, batch, loss_fn, mask) if cached_reference is None else cached_reference
    hidden = packed_forward(model, batch.packed, mask)
    out = loss_fn(batch.scoring_rows(hidden), lm_head_weight(model), batch.pairs, ref)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return float(out.loss)


def build_memory_case(spec: dict):
    """``bench.harness`` worker builder: one PO step of ``spec`` (model, attention, checkpointing, budget)."""
    model = build_model(spec["model"], spec.get("num_layers"))
    set_variant(model, spec["attention"], spec["checkpointing"])
    batch = one_pack(spec.get("token_budget", TOKEN_BUDGET))
    loss_fn = FusedTokenPOLoss("tabpo")
    return lambda: po_step(model, batch, loss_fn)


ATTENTIONS = ("sdpa", TREE_ATTENTION)  # dense mask first: the tree rows' ratios refer to it
REFERENCES = ("per step", "cached")  # a reference forward in every step, or precomputed statistics
