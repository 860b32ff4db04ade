"""The model side of a packed row: the attention mask each implementation takes, and the forward pass.

A packed row (:class:`pvfast.packing.tree.PackedBatch`) is a data structure; this module runs a Hugging Face
causal LM (optionally peft-wrapped) on it: the tree mask in the form the model's attention implementation
takes, explicit tree-depth position ids, and the decoder's last hidden states. Scoring the hidden states is
the fused op's job (:mod:`pvfast.objectives.fused_loss`); :func:`packed_token_logprobs` is the plain-torch
version used as a reference in tests.
"""

from __future__ import annotations

import torch

from pvfast.packing.tree import PackedBatch

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")  # the ones that take an arbitrary mask


def lm_head_weight(model) -> torch.Tensor:
    """(V, H) output projection of a causal LM (peft-wrapped or not); the fused op takes no bias."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); pass a *ForCausalLM")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias, which the fused scoring op does not take")
    return head.weight


def _causal_lm(model):
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packed_attention_mask(model, batch: PackedBatch):
    """The mask in the form the model's attention implementation takes (see ATTENTION_IMPLEMENTATIONS)."""
    impl = getattr(_causal_lm(model).config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return batch.attention_mask()  # SDPA takes a boolean mask, True = attend
    if impl == "flex_attention":
        return batch.block_mask()
    if impl == "eager":
        # Eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere.
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        dtype = dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32
        allowed = batch.attention_mask()
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {impl!r} cannot take a tree mask; use one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")


def packed_forward(model, batch: PackedBatch, attention_mask=None) -> torch.Tensor:
    """Last hidden states (L, H) of a HF causal LM (optionally peft-wrapped) on one packed row.

    ``attention_mask``: a mask from :func:`packed_attention_mask` to reuse (the policy pass and the
    adapters-disabled reference pass of the same row need the same one); built here when None.
    """
    decoder = _causal_lm(model).get_decoder()
    out = decoder(
        input_ids=batch.input_ids[None],
        attention_mask=packed_attention_mask(model, batch) if attention_mask is None else attention_mask,
        position_ids=batch.position_ids[None],
        use_cache=False,
    )
    return out.last_hidden_state[0]


def packed_token_logprobs(model, batch: PackedBatch, attention_mask=None) -> torch.Tensor:
    """(N,) float32 log-prob of every scored token, in ``score_*`` order (plain torch, O(N·V) memory)."""
    hidden = packed_forward(model, batch, attention_mask)
    head = _causal_lm(model).get_output_embeddings()
    h = hidden[batch.score_positions].to(head.weight.dtype)
    logits = torch.nn.functional.linear(h, head.weight, head.bias).float()
    return logits.log_softmax(-1).gather(-1, batch.score_targets[:, None])[:, 0]
