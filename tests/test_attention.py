"""Tree attention (pvfast_tree), sliding-window tree masks, soft-capping, and the packed path's refusals.

Every value is checked against an independent computation: a float64 dense-mask attention, the same model on
each completion run alone (separate sequences, transformers' own masks), or the dense-mask (SDPA) path.
"""

from __future__ import annotations

import random

import pytest
import torch

from pvfast.model.attention import TREE_ATTENTION, TreeAttentionPlan, chains, tree_attention
from pvfast.model.forward import (
    UnsupportedModelError,
    check_packed_support,
    final_logit_softcap,
    layer_windows,
    lm_head_weight,
    packed_attention_mask,
    packed_forward,
    packed_support_problems,
    packed_token_logprobs,
    resolve_attn_implementation,
)
from pvfast.packing.tree import CompletionGroup, build_packed_batch, pack, tree_attention_mask
from pvfast.testing import activate_lora, load_tiny_model

resolve_attn_implementation(TREE_ATTENTION, "cpu")  # registers pvfast_tree with transformers


# ----------------------------------------------------------------------------------------------- workloads
def _groups(seed: int, vocab: int = 5, n_groups: int = 4, instruction: int = 20, max_rejected: int = 3,
            min_completion: int = 1) -> list[CompletionGroup]:
    """Random groups with spontaneous sharing (small vocabulary), a common instruction, rejected edited from
    chosen (so chains split at many depths)."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(instruction)]
    groups = []
    for g in range(n_groups):
        prompt = shared + [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
        chosen = [rng.randrange(vocab) for _ in range(rng.randint(max(min_completion, 1), 12))]
        comps = [chosen] + [chosen[:rng.randint(0, len(chosen))]
                            + [rng.randrange(vocab) for _ in range(rng.randint(min_completion, 6))]
                            for _ in range(rng.randint(0, max_rejected))]
        groups.append(CompletionGroup(prompt, comps, key=g))
    return groups


def _dense_attention(q, k, v, allowed, scale=None):
    """float64 reference: softmax over the allowed keys (GQA by repeating key heads, transformers' order)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.double()


# ------------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("seed", range(4))
def test_plan_covers_every_attended_pair_exactly_once(seed):
    batch = build_packed_batch(_groups(seed), pad_to_multiple=8 if seed % 2 else 1)
    allowed = tree_attention_mask(batch.subtree_end)
    for max_chain in (512, 3):
        plan = TreeAttentionPlan(batch.subtree_end, batch.position_ids, max_chain=max_chain)
        cover = torch.zeros(batch.num_tokens, batch.num_tokens, dtype=torch.int64)
        written = torch.zeros(batch.num_tokens, dtype=torch.bool)
        for p in plan.parts:
            block = torch.ones(p.q1 - p.q0, p.k1 - p.k0, dtype=torch.int64)
            cover[p.q0:p.q1, p.k0:p.k1] += block.tril() if p.causal else block
            if p.fresh:  # the forward copies a fresh part's rows: no earlier part may have written them
                assert not written[p.q0:p.q1].any()
            written[p.q0:p.q1] = True
            assert not p.causal or p.q1 - p.q0 <= max_chain
        assert torch.equal(cover, allowed.long())  # every attended pair once, nothing else
        assert plan.pairs == int(allowed.sum())  # the cost follows the tree
        assert any(p.fresh for p in plan.parts)


def test_chains_of_the_docstring_tree():
    # pvfast.packing.tree's docstring example: trie 10-11-{20-30-{31, 32}, 21-40}.
    (batch,) = pack([CompletionGroup([10, 11, 20], [[30, 31], [30, 32]]), CompletionGroup([10, 11, 21], [[40]])],
                    token_budget=64)
    assert chains(batch.subtree_end) == [(0, 2, 8), (2, 4, 6), (4, 5, 5), (5, 6, 6), (6, 8, 8)]


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (4, 4)])
@pytest.mark.parametrize("window", [None, 1, 4, 13, 10_000])
@pytest.mark.parametrize("max_chain", [512, 5])
def test_tree_attention_equals_dense_mask_float64(heads, kv_heads, window, max_chain):
    batch = build_packed_batch(_groups(7), pad_to_multiple=16)
    plan = TreeAttentionPlan(batch.subtree_end, batch.position_ids, max_chain=max_chain)
    length, dim = batch.num_tokens, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=gen, requires_grad=True)
    k = torch.randn(1, kv_heads, length, dim, generator=gen, requires_grad=True)
    v = torch.randn(1, kv_heads, length, dim, generator=gen, requires_grad=True)
    upstream = torch.randn(1, heads, length, dim, generator=gen)
    allowed = tree_attention_mask(batch.subtree_end, batch.position_ids, window)

    out = tree_attention(q, k, v, plan, scale=0.3, sliding_window=window)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref = _dense_attention(q, k, v, allowed, scale=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("seed", "block_size", "pad"), [(0, 4, 1), (1, 8, 8), (2, 16, 3), (7, 5, 1), (3, 128, 1)])
def test_block_mask_from_the_plan_equals_create_block_mask(seed, block_size, pad):
    from torch.nn.attention.flex_attention import create_block_mask

    from pvfast.model.attention import tree_block_mask
    from pvfast.packing.tree import tree_mask_mod

    batch = build_packed_batch(_groups(seed, n_groups=6, instruction=30), pad_to_multiple=pad)
    plan = TreeAttentionPlan(batch.subtree_end, batch.position_ids, max_chain=7)
    ours = tree_block_mask(plan, batch.subtree_end, block_size=block_size)
    length = batch.num_tokens
    ref = create_block_mask(tree_mask_mod(batch.subtree_end), None, None, length, length, device="cpu",
                            BLOCK_SIZE=block_size)

    def blocks(number, index):  # the block columns of every block row, as sets
        return [sorted(index[0, 0, i, :number[0, 0, i]].tolist()) for i in range(number.shape[-1])]

    for name in ("kv", "full_kv", "q", "full_q"):
        assert blocks(getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices")) == \
            blocks(getattr(ref, f"{name}_num_blocks"), getattr(ref, f"{name}_indices")), name
    assert torch.equal(ours.to_dense(), ref.to_dense())


@pytest.mark.parametrize("window", [None, 6])
def test_tree_attention_in_bfloat16(window):
    # bf16 inputs (autocast on the CPU): the kernel runs in bf16, the merge in fp32; error of bf16 rounding.
    batch = build_packed_batch(_groups(4), pad_to_multiple=8)
    plan = TreeAttentionPlan.from_batch(batch)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, batch.num_tokens, 16, generator=gen)
    k, v = (torch.randn(1, 2, batch.num_tokens, 16, generator=gen) for _ in range(2))
    upstream = torch.randn(1, 6, batch.num_tokens, 16, generator=gen)
    low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = tree_attention(*low, plan, sliding_window=window)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, low, upstream.bfloat16())
    high = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _dense_attention(*high, tree_attention_mask(batch.subtree_end, batch.position_ids, window))
    ref_grads = torch.autograd.grad(ref, high, upstream.double())
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=6e-2, rtol=5e-2)


def test_tree_attention_is_deterministic():
    batch = build_packed_batch(_groups(3))
    plan = TreeAttentionPlan.from_batch(batch)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, batch.num_tokens, 16, generator=gen, requires_grad=True) for _ in range(3))
    first = [out := tree_attention(q, k, v, plan), *torch.autograd.grad(out.square().sum(), (q, k, v))]
    second = [out := tree_attention(q, k, v, plan), *torch.autograd.grad(out.square().sum(), (q, k, v))]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_tree_attention_input_errors():
    batch = build_packed_batch(_groups(0))
    plan = TreeAttentionPlan.from_batch(batch)
    q = torch.zeros(1, 4, batch.num_tokens, 8)
    with pytest.raises(ValueError, match="not one row of the plan"):
        tree_attention(q[:, :, 1:], q[:, :, 1:], q[:, :, 1:], plan)
    with pytest.raises(ValueError, match="not a multiple of 3 key/value heads"):
        tree_attention(q, q[:, :3], q[:, :3], plan)
    with pytest.raises(ValueError, match="must be equal"):
        TreeAttentionPlan(batch.subtree_end, batch.position_ids[1:])


# ---------------------------------------------------------------------------------- through HF models
def _tiny(arch: str, lora: bool = False, attn: str = TREE_ATTENTION, gradient_checkpointing: bool = False):
    model = load_tiny_model(arch, lora=lora, gradient_checkpointing=gradient_checkpointing).eval()
    model.set_attn_implementation(attn)
    return activate_lora(model) if lora else model


def _separate_logprobs(model, groups):
    """Every completion as its own sequence through the model's full forward (its own masks and head)."""
    device = next(model.parameters()).device
    out = []
    for g in groups:
        p = len(g.prompt_ids)
        for seq in g.sequences():
            logits = model(input_ids=torch.tensor([seq], device=device)).logits[0].float()
            targets = torch.tensor(seq[p:], device=device)
            out.append(logits[p - 1:-1].log_softmax(-1).gather(-1, targets[:, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_logprobs_and_lora_gradients_equal_dense_mask_path(arch):
    # Both tiny models are grouped-query (4 heads, 2 key/value heads).
    groups = _groups(11, vocab=97, n_groups=3, instruction=40)
    (batch,) = pack(groups, token_budget=1024)
    results = {}
    for attn in (TREE_ATTENTION, "sdpa"):
        model = _tiny(arch, lora=True, attn=attn)
        mask = packed_attention_mask(model, batch)
        assert isinstance(mask, TreeAttentionPlan) == (attn == TREE_ATTENTION)
        logp = packed_token_logprobs(model, batch, mask)
        sign = torch.tensor([1.0 if j == 0 else -0.5 for _, j in batch.completion_sources])[batch.score_segments]
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        results[attn] = (logp.detach(), torch.autograd.grad((sign * logp).sum(), params))
        if attn == TREE_ATTENTION:
            with torch.no_grad(), model.disable_adapter():  # the reference pass reuses the plan
                tree_reference = packed_token_logprobs(model, batch, mask)
                separate_reference = _separate_logprobs(model, groups)
            torch.testing.assert_close(tree_reference, separate_reference, atol=1e-5, rtol=0)
    (tree, tree_grads), (dense, dense_grads) = results[TREE_ATTENTION], results["sdpa"]
    torch.testing.assert_close(tree, dense, atol=1e-5, rtol=0)
    for g_tree, g_dense in zip(tree_grads, dense_grads):
        assert g_dense.abs().max() > 0
        torch.testing.assert_close(g_tree, g_dense, atol=1e-5, rtol=1e-4)


def test_tree_attention_under_gradient_checkpointing_recompute():
    # The recompute in the backward must see the plan again (it rides as a keyword transformers keeps).
    groups = _groups(12, vocab=97, n_groups=2, instruction=30)
    (batch,) = pack(groups, token_budget=1024)
    grads = {}
    for checkpointing in (False, True):
        model = _tiny("llama", lora=True, gradient_checkpointing=checkpointing).train()
        mask = packed_attention_mask(model, batch)
        hidden = packed_forward(model, batch, mask)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        grads[checkpointing] = torch.autograd.grad(hidden.square().mean(), params)
        assert mask.calls == 2 * (1 + checkpointing)  # forward (+ recompute) of both layers
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_calls_without_a_plan_are_plain_sdpa():
    # Generation and evaluation run the same model: left-padded batches get SDPA with its own masks.
    tree_model, sdpa_model = _tiny("qwen2"), _tiny("qwen2", attn="sdpa")
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = tree_model(input_ids=ids, attention_mask=attn).logits
        b = sdpa_model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(a, b)


def test_resolve_attn_implementation_defaults():
    assert resolve_attn_implementation("auto", "cpu") == TREE_ATTENTION
    assert resolve_attn_implementation("sdpa", "cpu") == TREE_ATTENTION
    assert resolve_attn_implementation("sdpa_dense", "cpu") == "sdpa"
    assert resolve_attn_implementation("auto", "cuda") == "sdpa"
    assert resolve_attn_implementation("eager", "cpu") == "eager"
    assert resolve_attn_implementation("flex_attention", "cuda") == "flex_attention"


def test_flex_attention_is_refused_on_the_cpu_before_loading():
    # transformers compiles FlexAttention with automatic dynamic shapes, and inductor's CPU template cannot
    # compile the dynamic recompile: a run would fail at its second sequence length, so it is refused at load.
    from pvfast.config.sections import ModelConfig
    from pvfast.model.loading import ModelLoadError, load_base_model

    with pytest.raises(ValueError, match="'flex_attention' does not run on the CPU"):
        resolve_attn_implementation("flex_attention", "cpu")
    with pytest.raises(ModelLoadError, match="model.attn_implementation: .*use 'auto'"):
        load_base_model(ModelConfig(quant="none", attn_implementation="flex_attention"), torch.device("cpu"))


# ----------------------------------------------------------------------------------- sliding windows
def _random_model(config, attn: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights: attention patterns far from uniform, so the window matters
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("proj" in name or "embed" in name):
                p.normal_(0, 0.2)
    return model


_SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)


def _mistral(window=5):
    from transformers import MistralConfig

    return MistralConfig(**_SMALL, num_hidden_layers=2, sliding_window=window, head_dim=16)


def _qwen2_windowed(window=5):
    from transformers import Qwen2Config

    # max_window_layers=1: layer 0 full attention, layers 1-2 sliding (transformers' rule: i >= max_window_layers)
    return Qwen2Config(**_SMALL, num_hidden_layers=3, use_sliding_window=True, sliding_window=window,
                       max_window_layers=1)


def _qwen3_windowed(window=5):
    from transformers import Qwen3Config

    return Qwen3Config(**_SMALL, num_hidden_layers=3, head_dim=16, use_sliding_window=True, sliding_window=window,
                       max_window_layers=1)


def _gemma3(window=4):
    from transformers import Gemma3TextConfig

    # Local/global layers with their own rope bases (rope_parameters per layer type).
    return Gemma3TextConfig(**_SMALL, num_hidden_layers=3, head_dim=16, sliding_window=window,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                            query_pre_attn_scalar=16)


def _gemma2(window=4, final_cap=0.5, attn_cap=2.0):
    from transformers import Gemma2Config

    return Gemma2Config(**_SMALL, num_hidden_layers=2, head_dim=16, sliding_window=window,
                        final_logit_softcapping=final_cap, attn_logit_softcapping=attn_cap, query_pre_attn_scalar=16)


def _long_groups(seed=5):
    # Completions end 20-40 tokens deep: far beyond windows of 4-5 tokens.
    return _groups(seed, vocab=64, n_groups=3, instruction=12, max_rejected=2, min_completion=4)


def test_layer_windows_follow_transformers_configs():
    assert layer_windows(_mistral(5)) == [5, 5]
    assert layer_windows(_qwen2_windowed(5)) == [None, 5, 5]
    assert layer_windows(_gemma2(4)) == [4, None]
    from transformers import Qwen2Config

    assert layer_windows(Qwen2Config(**_SMALL, num_hidden_layers=2, sliding_window=5)) == [None, None]  # off


@pytest.mark.parametrize("attn", ["sdpa", TREE_ATTENTION, "eager"])
@pytest.mark.parametrize("make", [_mistral, _qwen2_windowed, _qwen3_windowed, _gemma3],
                         ids=["mistral", "qwen2", "qwen3", "gemma3"])
def test_windowed_tree_logprobs_equal_separate_sequences(make, attn):
    model = _random_model(make(5), attn)
    groups = _long_groups()
    (batch,) = pack(groups, token_budget=1024)
    assert max(len(s) for g in groups for s in g.sequences()) > 4 * 5  # the window is shorter than the sequences
    with torch.no_grad():
        separate = _separate_logprobs(model, groups)
        tree = packed_token_logprobs(model, batch)
        mask = packed_attention_mask(model, batch)
        # The test can fail: the same row with the window ignored (the bug this fixes) is far off.
        full = (packed_token_logprobs(_random_model(make(None), attn), batch)
                if attn != TREE_ATTENTION else None)
    torch.testing.assert_close(tree, separate, atol=1e-5, rtol=0)
    if make is not _mistral and attn != TREE_ATTENTION:
        assert set(mask) == {"full_attention", "sliding_attention"}  # one mask per layer type
    if full is not None:
        assert (full - separate).abs().max() > 1e-2


def test_gemma2_windows_and_soft_capping_equal_separate_sequences():
    # transformers refuses SDPA for Gemma 2: eager attention with per-layer-type additive masks.
    model = _random_model(_gemma2(), "eager")
    assert final_logit_softcap(model) == 0.5
    groups = _long_groups(6)
    (batch,) = pack(groups, token_budget=1024)
    with torch.no_grad():
        separate = _separate_logprobs(model, groups)  # the model's own head: soft-capped
        tree = packed_token_logprobs(model, batch)
        hidden = packed_forward(model, batch)
        raw = (hidden[batch.score_positions] @ model.lm_head.weight.T).float().log_softmax(-1)
        raw = raw.gather(-1, batch.score_targets[:, None])[:, 0]
    torch.testing.assert_close(tree, separate, atol=1e-5, rtol=0)
    assert (raw - separate).abs().max() > 1e-2  # soft-capping changes the log-probs: the test can fail
    mask = packed_attention_mask(model, batch)
    assert set(mask) == {"full_attention", "sliding_attention"}
    with pytest.raises(UnsupportedModelError, match=r"final-logit soft-capping \(final_logit_softcapping=0.5\)"):
        lm_head_weight(model)
    assert lm_head_weight(model, allow_softcap=True) is model.lm_head.weight


def test_gemma2_under_tree_attention_refuses_attention_softcap():
    model = _random_model(_gemma2(), "eager")
    model.set_attn_implementation(TREE_ATTENTION)
    (batch,) = pack(_long_groups(6), token_budget=1024)
    with pytest.raises(UnsupportedModelError, match=r"attention logit soft-capping \(attn_logit_softcapping=2.0\) "
                                                    r"under 'pvfast_tree'; load the model with attn_implementation"):
        packed_forward(model, batch)
    # The attention function refuses it too (a caller that skips the check still gets no silent result).
    with pytest.raises(ValueError, match=r"attention logit soft-capping \(softcap=2.0"):
        model.model(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                    pvfast_tree_plan=TreeAttentionPlan.from_batch(batch))


# ---------------------------------------------------------------------------------------------- refusals
def _llama_config(**changes):
    from transformers import LlamaConfig

    config = LlamaConfig(**_SMALL, num_hidden_layers=2)
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(("changes", "feature"), [
    ({"layer_types": ["full_attention", "chunked_attention"]}, r"layer types \['chunked_attention'\]"),
    ({"layer_types": ["full_attention", "linear_attention"]}, r"layer types \['linear_attention'\]"),
    ({"attention_chunk_size": 8}, r"chunked attention \(attention_chunk_size=8\)"),
    ({"alibi": True}, "ALiBi"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic NTK rope"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "LongRoPE rope"),
    ({"logit_scale": 0.0625}, r"logit scaling \(Cohere logit_scale\)=0.0625"),
    ({"logits_scaling": 8.0}, r"logit scaling \(Granite logits_scaling\)=8.0"),
    ({"is_causal": False}, "bidirectional"),
    ({"position_embedding_type": "relative_key"}, "relative position embeddings"),
    ({"sliding_window": 0}, "sliding_window=0 is not a positive int"),
])
def test_unsupported_config_features_are_refused_by_name(changes, feature):
    model = _random_model(_llama_config(), "sdpa")
    for name, value in changes.items():
        setattr(model.config, name, value)
    (batch,) = pack(_groups(0), token_budget=256)
    with pytest.raises(UnsupportedModelError, match=feature):
        packed_attention_mask(model, batch)
    with pytest.raises(UnsupportedModelError, match=feature):
        packed_forward(model, batch)


def test_unsupported_attention_implementation_is_refused():
    model = _random_model(_llama_config(), "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="'flash_attention_2' cannot take a tree mask"):
        check_packed_support(model)


def test_attention_sinks_and_head_bias_are_refused():
    model = _random_model(_llama_config(), "sdpa")
    model.model.layers[1].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    problems = packed_support_problems(model)
    assert any("attention sinks" in p for p in problems) and any("bias on lm_head" in p for p in problems)
    with pytest.raises(UnsupportedModelError, match="a bias on lm_head"):
        lm_head_weight(model)


def test_supported_models_pass_the_check():
    for config, attn in [(_llama_config(), "sdpa"), (_mistral(), "sdpa"), (_qwen2_windowed(), TREE_ATTENTION),
                         (_gemma2(), "eager")]:
        model = _random_model(config, attn)
        assert packed_support_problems(model) == []
    lora = _tiny("qwen2", lora=True)
    check_packed_support(lora)  # peft-wrapped: the check reads the causal LM inside


def test_attention_dropout_in_training_is_refused_by_tree_attention():
    model = _random_model(_llama_config(attention_dropout=0.1), TREE_ATTENTION).train()
    (batch,) = pack(_groups(0), token_budget=256)
    with pytest.raises(ValueError, match=r"attention dropout \(0.1\) in training"):
        packed_forward(model, batch)
    with torch.no_grad():
        packed_forward(model.eval(), batch)  # eval mode: no dropout, runs


def test_a_layer_that_bypasses_the_tree_is_detected():
    # Layer 0 runs SDPA on its own (as a model whose attention ignores the interface would): with no mask it
    # would attend causally across branches. The packed forward counts the layers that saw the plan.
    import copy

    model = _tiny("llama")
    attention = model.model.layers[0].self_attn
    attention.config = copy.copy(attention.config)
    attention.config._attn_implementation = "sdpa"
    (batch,) = pack(_groups(0), token_budget=256)
    with pytest.raises(UnsupportedModelError, match="1 of 2 attention layers ran through 'pvfast_tree'"):
        packed_forward(model, batch)


@pytest.mark.slow
def test_flex_attention_windowed_block_masks_equal_separate_sequences():
    # The first FlexAttention calls compile (~20 s each on the CPU): one small windowed case only.
    from torch.nn.attention.flex_attention import BlockMask

    # A fresh compile for this one shape: after another shape, transformers' compiled FlexAttention
    # recompiles with dynamic shapes, which inductor's CPU template cannot compile (why the trainer refuses
    # flex_attention on the CPU); the block masks checked here are the ones the GPU runs.
    torch._dynamo.reset()
    model = _random_model(_qwen2_windowed(5), "sdpa")
    groups = _long_groups(8)
    (batch,) = pack(groups, token_budget=1024)
    with torch.no_grad():
        separate = _separate_logprobs(model, groups)
        model.set_attn_implementation("flex_attention")
        mask = packed_attention_mask(model, batch)
        assert set(mask) == {"full_attention", "sliding_attention"}
        assert all(isinstance(m, BlockMask) for m in mask.values())
        tree = packed_token_logprobs(model, batch, mask)
    torch.testing.assert_close(tree, separate, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [None, _qwen2_windowed], ids=["tiny-llama", "qwen2-windowed"])
def test_flex_attention_on_cuda_equals_separate_sequences(make):
    # The GPU path: FlexAttention with the plan's block-sparse BlockMask (per layer type when windows differ).
    model = (_tiny("llama", attn="sdpa") if make is None else _random_model(make(5), "sdpa")).cuda()
    groups = _long_groups(9) if make is not None else _groups(13, vocab=97, n_groups=3, instruction=40)
    (batch,) = pack(groups, token_budget=1024)
    batch = batch.to("cuda")
    with torch.no_grad():
        separate = _separate_logprobs(model, groups)
        model.set_attn_implementation("flex_attention")
        tree = packed_token_logprobs(model, batch)
    torch.testing.assert_close(tree, separate, atol=1e-4, rtol=0)
