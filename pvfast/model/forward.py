"""The model side of a packed row: the attention mask each implementation takes, and the forward pass.

A packed row (:class:`pvfast.packing.tree.PackedBatch`) is a data structure; this module runs a Hugging Face
causal LM (optionally peft-wrapped) on it: the tree in the form the model's attention implementation takes,
explicit tree-depth position ids, and the decoder's last hidden states. Scoring the hidden states is the fused
op's job (:mod:`pvfast.objectives.fused_loss`, given :func:`lm_head_weight` and :func:`final_logit_softcap`);
:func:`packed_token_logprobs` is the plain-torch version used as a reference in tests.

Attention implementations (``model.config._attn_implementation``) and what :func:`packed_attention_mask` gives
them::

    pvfast_tree     a TreeAttentionPlan (pvfast.model.attention): exactly the attended pairs, no mask; the CPU default
    sdpa            (1, 1, L, L) bool mask, True = attend: every one of the L² scores is computed
    eager           the same as an additive float mask (0 / dtype minimum)
    flex_attention  a FlexAttention BlockMask: blocks the tree masks whole are skipped (GPU)

Models whose layers differ in their sliding window (Qwen2/3 ``use_sliding_window`` + ``max_window_layers``,
Gemma 2/3 ``layer_types``) get one mask per layer type, ``{"full_attention": ..., "sliding_attention": ...}``, as
transformers' decoders accept; a model with one window on every layer (Mistral ``sliding_window``) gets one
windowed mask; ``pvfast_tree`` takes each layer's window from the layer itself.

What the packed path supports, and refuses (:class:`UnsupportedModelError`, naming the feature, raised by
:func:`check_packed_support` before any forward; never computed silently wrong):

    supported   decoder-only causal LMs whose attention goes through transformers' attention interface:
                rotary or absolute position embeddings driven by position_ids (Llama incl. llama3 rope
                scaling, Qwen2/3, Mistral, Phi3, OLMo2, Gemma 2/3 text, ...); grouped-query attention;
                sliding windows ("full_attention"/"sliding_attention" layers); attention logit soft-capping
                (Gemma 2, eager and flex_attention); final-logit soft-capping (Gemma 2: final_logit_softcap);
                LoRA / QLoRA (peft), gradient checkpointing
    refused     other attention implementations (flash_attention_*, paged, unknown); bidirectional or
                non-causal attention; layer types other than full/sliding attention (chunked, linear,
                recurrent, ...); chunked attention (attention_chunk_size); ALiBi; relative position
                embeddings; rope types whose frequencies depend on the sequence length (dynamic, longrope);
                attention sinks; logit scaling in the head (logit_scale, logits_scaling, output_multiplier);
                a bias on lm_head; attention dropout in training and logit soft-capping under pvfast_tree
"""

from __future__ import annotations

import weakref

import torch

from pvfast.model.attention import PLAN_KWARG, TREE_ATTENTION, TreeAttentionPlan, tree_block_mask
from pvfast.model.attention import register as _register_tree_attention
from pvfast.packing.tree import PackedBatch

ATTENTION_IMPLEMENTATIONS = (TREE_ATTENTION, "sdpa", "eager", "flex_attention")  # the ones that take a tree
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' layer_types the packed path reproduces

# The measured default of the packed path per device type (bench/test_bench_attention.py,
# bench/results/tree_attention_step-cpu.md): pvfast_tree on the CPU. Devices without a measurement keep SDPA.
DEFAULT_ATTENTION = {"cpu": TREE_ATTENTION}

# Head features that change the logits after ``hidden @ lm_head.T`` (config attribute -> what it is).
_HEAD_SCALES = {
    "logit_scale": "logit scaling (Cohere logit_scale)",
    "logits_scaling": "logit scaling (Granite logits_scaling)",
    "output_multiplier": "logit scaling (output_multiplier)",
}
_LENGTH_DEPENDENT_ROPE = {"dynamic": "dynamic NTK", "longrope": "LongRoPE"}


class UnsupportedModelError(ValueError):
    """The model does something the packed path does not reproduce; the message names the feature."""


def _causal_lm(model):
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _name(model) -> str:
    return type(_causal_lm(model)).__name__


# ------------------------------------------------------------------------------------------------- the head
def final_logit_softcap(model) -> float | None:
    """Gemma 2's ``final_logit_softcapping`` T (logits become T·tanh(logits / T)), or None when the model has none."""
    cap = getattr(_causal_lm(model).config, "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def lm_head_weight(model, allow_softcap: bool = False) -> torch.Tensor:
    """(V, H) output projection of a causal LM (peft-wrapped or not); the fused op takes no bias.

    A model with final-logit soft-capping raises unless ``allow_softcap``: the caller then passes
    ``softcap=final_logit_softcap(model)`` to the scoring op (scoring ``hidden @ W.T`` alone would be wrong).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); pass a *ForCausalLM")
    if getattr(head, "bias", None) is not None:
        raise UnsupportedModelError(f"{_name(model)}: a bias on lm_head, which the fused scoring op does not take")
    cap = final_logit_softcap(model)
    if cap is not None and not allow_softcap:
        raise UnsupportedModelError(
            f"{_name(model)}: final-logit soft-capping (final_logit_softcapping={cap}); score with "
            f"softcap=final_logit_softcap(model) and get the weight with lm_head_weight(model, allow_softcap=True)")
    return head.weight


# ------------------------------------------------------------------------------------------ support check
def layer_types(config) -> list[str] | None:
    """``config.layer_types`` for the decoder's layers, or None for a model without per-layer types."""
    types = getattr(config, "layer_types", None)
    return None if types is None else list(types)[:config.num_hidden_layers]


def layer_windows(config) -> list[int | None]:
    """The sliding window of every decoder layer (None = full attention), as transformers' masks apply it.

    With ``layer_types``: ``config.sliding_window`` on "sliding_attention" layers; without: one
    ``config.sliding_window`` (Mistral-style) on every layer, or none. Raises UnsupportedModelError for layer
    types other than full/sliding attention.
    """
    window = getattr(config, "sliding_window", None)
    types = layer_types(config)
    if types is None:
        return [_window(config, window)] * config.num_hidden_layers
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedModelError(f"{type(config).__name__}: layer types {unknown} (the packed path reproduces "
                                    f"{list(LAYER_TYPES)} only)")
    return [_window(config, window) if t == "sliding_attention" else None for t in types]


def _window(config, window) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UnsupportedModelError(f"{type(config).__name__}: sliding_window={window!r} is not a positive int")
    return window


def _rope_types(config) -> list[str]:
    """Every rope type named in the config (``rope_parameters`` may be one dict or one per layer type)."""
    found = []
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        if not isinstance(params, dict):
            continue
        dicts = [params] + [v for v in params.values() if isinstance(v, dict)]
        found += [d.get("rope_type", d.get("type")) for d in dicts if d.get("rope_type", d.get("type"))]
    return found


def packed_support_problems(model) -> list[str]:
    """The features of ``model`` the packed path does not reproduce (empty when it supports the model)."""
    lm = _causal_lm(model)
    config = lm.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    problems = []
    if impl not in ATTENTION_IMPLEMENTATIONS:
        problems.append(f"attention implementation {impl!r} cannot take a tree mask; use one of "
                        f"{ATTENTION_IMPLEMENTATIONS}")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if impl == TREE_ATTENTION and softcap is not None:
        problems.append(f"attention logit soft-capping (attn_logit_softcapping={softcap}) under {TREE_ATTENTION!r}; "
                        f"load the model with attn_implementation='eager'")
    if getattr(config, "is_causal", True) is False or getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional (non-causal) attention")
    try:
        layer_windows(config)
    except UnsupportedModelError as err:
        problems.append(str(err).split(": ", 1)[1])
    if getattr(config, "attention_chunk_size", None) is not None:
        problems.append(f"chunked attention (attention_chunk_size={config.attention_chunk_size})")
    if getattr(config, "alibi", False) or config.model_type in ("bloom", "mpt"):
        problems.append("ALiBi position biases (they follow row indices, not tree depths)")
    position_type = getattr(config, "position_embedding_type", None)
    if position_type not in (None, "absolute", "rope", "rotary"):
        problems.append(f"relative position embeddings (position_embedding_type={position_type!r})")
    for rope_type in _rope_types(config):
        if rope_type in _LENGTH_DEPENDENT_ROPE:
            problems.append(f"{_LENGTH_DEPENDENT_ROPE[rope_type]} rope scaling (rope_type={rope_type!r}): its "
                            f"frequencies depend on the longest sequence of the row, not each sequence's own")
    for attr, what in _HEAD_SCALES.items():
        value = getattr(config, attr, None)
        if value is not None and float(value) != 1.0:
            problems.append(f"{what}={value}")
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in lm.modules()):
        problems.append("attention sinks (learned per-head sink logits)")
    head = lm.get_output_embeddings()
    if head is not None and getattr(head, "bias", None) is not None:
        problems.append("a bias on lm_head")
    return problems


_SUPPORTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # causal LM -> attention impl checked


def check_packed_support(model) -> None:
    """Raise UnsupportedModelError naming every feature of ``model`` the packed path does not reproduce.

    The result is remembered per model and attention implementation (the check runs once, not per batch).
    """
    lm = _causal_lm(model)
    impl = getattr(lm.config, "_attn_implementation", None)
    if _SUPPORTED.get(lm) == impl:
        return
    problems = packed_support_problems(model)
    if problems:
        raise UnsupportedModelError(f"{type(lm).__name__} ({lm.config.model_type}) cannot run tree-packed: "
                                    + "; ".join(problems))
    _SUPPORTED[lm] = impl


def resolve_attn_implementation(requested: str, device: torch.device | str) -> str:
    """The attention implementation to load a model with for the packed path.

    ``"auto"`` and ``"sdpa"`` give the measured default of the device type (:data:`DEFAULT_ATTENTION`:
    ``pvfast_tree`` on the CPU, which *is* SDPA's flash kernel run on the tree's parts, and plain SDPA for every
    other call, e.g. generation); ``"sdpa_dense"`` forces SDPA with the dense mask; other names are returned as
    they are. ``pvfast_tree`` is registered with transformers here.
    """
    device_type = torch.device(device).type
    if requested in ("auto", "sdpa"):
        requested = DEFAULT_ATTENTION.get(device_type, "sdpa")
    elif requested == "sdpa_dense":
        requested = "sdpa"
    elif requested == "flex_attention" and device_type == "cpu":
        # transformers compiles FlexAttention with automatic dynamic shapes; on the CPU, inductor's C++ template
        # for the dynamic recompile (the second sequence length a run meets) does not compile (torch 2.13:
        # "'cur_qSplitSize8' was not declared"). Refused up front rather than failing mid-run.
        raise ValueError("attn_implementation 'flex_attention' does not run on the CPU: torch inductor's C++ "
                         "FlexAttention fails to compile once sequence lengths vary; use 'auto' (pvfast_tree, "
                         "the CPU default) or run flex_attention on a GPU")
    if requested == TREE_ATTENTION:
        _register_tree_attention()
    return requested


# ------------------------------------------------------------------------------------ masks and forward
def _dense_mask(batch: PackedBatch, impl: str, window: int | None, dtype: torch.dtype):
    if impl == "sdpa":
        return batch.attention_mask(window)  # SDPA takes a boolean mask, True = attend
    if impl == "flex_attention":
        if window is None:  # block classes from the plan's parts: no L x L evaluation of the mask function
            return tree_block_mask(TreeAttentionPlan.from_batch(batch), batch.subtree_end)
        return batch.block_mask(window=window)
    # Eager attention adds the mask to the scores: 0 where allowed, the dtype's minimum elsewhere.
    allowed = batch.attention_mask(window)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def packed_attention_mask(model, batch: PackedBatch):
    """The tree in the form the model's attention implementation takes (see the module docstring).

    Raises UnsupportedModelError (after :func:`check_packed_support`) for a model the packed path does not
    reproduce.
    """
    check_packed_support(model)
    config = _causal_lm(model).config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    windows = layer_windows(config)
    if impl == TREE_ATTENTION:
        plan = TreeAttentionPlan.from_batch(batch)
        plan.layer_windows = windows
        return plan
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    dtype = dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32
    if len(set(windows)) == 1:
        return _dense_mask(batch, impl, windows[0], dtype)
    # Layers differ in their window: one mask per layer type, which transformers' decoders index by
    # config.layer_types[i] (layer_windows guarantees the types exist and are full/sliding).
    by_type = dict(zip(layer_types(config), windows))
    return {t: _dense_mask(batch, impl, w, dtype) for t, w in by_type.items()}


def packed_forward(model, batch: PackedBatch, attention_mask=None) -> torch.Tensor:
    """Last hidden states (L, H) of a HF causal LM (optionally peft-wrapped) on one packed row.

    ``attention_mask``: what :func:`packed_attention_mask` returned, to reuse (the policy pass and the
    adapters-disabled reference pass of the same row need the same one); built here when None.
    """
    mask = packed_attention_mask(model, batch) if attention_mask is None else attention_mask
    lm = _causal_lm(model)
    decoder = lm.get_decoder()
    if not isinstance(mask, TreeAttentionPlan):
        out = decoder(input_ids=batch.input_ids[None], attention_mask=mask, position_ids=batch.position_ids[None],
                      use_cache=False)
        return out.last_hidden_state[0]
    if lm.config._attn_implementation != TREE_ATTENTION:
        raise ValueError(f"a TreeAttentionPlan was given but the model's attention implementation is "
                         f"{lm.config._attn_implementation!r}; build the mask with packed_attention_mask(model, ...)")
    # The plan rides to every attention layer as a keyword (kept by gradient checkpointing's recompute); the
    # all-True padding mask tells transformers' mask builder that no mask is needed.
    mask.calls = 0
    out = decoder(input_ids=batch.input_ids[None], attention_mask=mask.row_mask,
                  position_ids=batch.position_ids[None], use_cache=False, **{PLAN_KWARG: mask})
    layers = lm.config.num_hidden_layers
    if mask.calls != layers:
        raise UnsupportedModelError(
            f"{type(lm).__name__}: {mask.calls} of {layers} attention layers ran through {TREE_ATTENTION!r} (the "
            f"others do not use transformers' attention interface, so they did not see the tree); load the model "
            f"with attn_implementation='sdpa_dense' or 'eager'")
    return out.last_hidden_state[0]


def packed_token_logprobs(model, batch: PackedBatch, attention_mask=None) -> torch.Tensor:
    """(N,) float32 log-prob of every scored token, in ``score_*`` order (plain torch, O(N·V) memory).

    Applies the head as the model does: ``hidden @ W.T + b``, then final-logit soft-capping when the model has it.
    """
    hidden = packed_forward(model, batch, attention_mask)
    head = _causal_lm(model).get_output_embeddings()
    # index_select, not hidden[positions]: its backward (index_add_) is deterministic on the CPU even though
    # branch points are gathered several times.
    h = hidden.index_select(0, batch.score_positions).to(head.weight.dtype)
    logits = torch.nn.functional.linear(h, head.weight, head.bias).float()
    cap = final_logit_softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1).gather(-1, batch.score_targets[:, None])[:, 0]
