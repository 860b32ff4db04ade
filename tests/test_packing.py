"""Prefix-tree packing: layout, mask semantics, packer policy, and exactness against separate sequences."""

from __future__ import annotations

import random
import re

import pytest
import torch

import pvfast.packing.tree as packing
from pvfast.data.roles import ROLE_SCAFFOLD
from pvfast.model.forward import packed_attention_mask, packed_forward, packed_token_logprobs
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.objectives.stats import segment_stats_reference
from pvfast.packing.tree import (
    CompletionGroup,
    assign_packs,
    build_packed_batch,
    group_tree_tokens,
    pack,
    tree_mask_mod,
)
from pvfast.testing import activate_lora, load_tiny_model

VOCAB = 97  # random token ids below this (valid for the tiny models' larger vocabulary)


# ---------------------------------------------------------------- the docstring example


def _docstring_groups():
    return [
        CompletionGroup([10, 11, 20], [[30, 31], [30, 32]], key="A"),
        CompletionGroup([10, 11, 21], [[40]], key="B"),
    ]


def test_docstring_example_is_what_pack_produces():
    (batch,) = pack(_docstring_groups(), token_budget=64)
    # Worked by hand from the trie  10-11-{20-30-{31, 32}, 21-40}.
    assert batch.input_ids.tolist() == [10, 11, 20, 30, 31, 32, 21, 40]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 4, 2, 3]
    assert batch.node_ids.tolist() == [0, 0, 1, 1, 2, 3, 4, 4]
    assert batch.subtree_end.tolist() == [8, 8, 6, 6, 5, 6, 8, 8]
    assert batch.score_positions.tolist() == [2, 3, 2, 3, 6]
    assert batch.score_targets.tolist() == [30, 31, 30, 32, 40]
    assert batch.score_segments.tolist() == [0, 0, 1, 1, 2]
    assert batch.completion_sources == ((0, 0), (0, 1), (1, 0))
    assert batch.group_keys == ("A", "A", "B")
    assert (batch.tree_tokens, batch.unshared_tokens, batch.num_tokens) == (8, 5 + 5 + 4, 8)
    assert batch.savings == pytest.approx(1 - 8 / 14)
    assert batch.compression == pytest.approx(14 / 8)
    assert batch.score_roles.tolist() == [ROLE_SCAFFOLD] * 5 and batch.score_diff.tolist() == [False] * 5

    # The docstring's table must show the same rows (so the documentation cannot drift from the code).
    doc = packing.__doc__
    for name in ("input_ids", "position_ids", "node_ids", "subtree_end", "score_positions", "score_targets",
                 "score_segments"):
        row = re.search(rf"^\s+{name}\s+((?:-?\d+\s+)+)", doc, re.MULTILINE)
        assert row is not None, name
        assert [int(v) for v in row.group(1).split()] == getattr(batch, name).tolist(), name
    grid = {}
    for line in doc.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "q" and words[1].isdigit():
            cells = [w for w in words[2:2 + batch.num_tokens] if w in ("x", ".")]
            grid[int(words[1])] = [c == "x" for c in cells] + [False] * (batch.num_tokens - len(cells))
    assert sorted(grid) == list(range(batch.num_tokens))
    mask = batch.attention_mask()[0, 0]
    assert [grid[q] for q in range(batch.num_tokens)] == mask.tolist()


# ---------------------------------------------------------------- mask semantics on a random forest


def _random_groups(rng: random.Random, n_groups: int, vocab: int, shared_prefix: list[int] | None = None,
                   max_rejected: int = 3, annotated: bool = True) -> list[CompletionGroup]:
    """Groups with spontaneous sharing: small vocab, optional common instruction, rejected edited from chosen."""
    groups = []
    for g in range(n_groups):
        prompt = list(shared_prefix or []) + [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
        chosen = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        comps = [chosen]
        for _ in range(rng.randint(0, max_rejected)):
            cut = rng.randint(0, len(chosen))  # shares chosen[:cut], then differs
            comps.append(chosen[:cut] + [rng.randrange(vocab) for _ in range(rng.randint(0, 4))])
        roles = [[rng.randrange(4) for _ in c] for c in comps] if annotated else None
        diffs = [[rng.random() < 0.3 for _ in c] for c in comps] if annotated else None
        groups.append(CompletionGroup(prompt, comps, roles, diffs, key=f"g{g}"))
    return groups


@pytest.mark.parametrize("seed", range(6))
def test_mask_is_ancestor_or_self_on_random_forest(seed):
    rng = random.Random(seed)
    groups = _random_groups(rng, n_groups=rng.randint(1, 5), vocab=3,
                            shared_prefix=[0, 1] if seed % 2 else None)
    batch = build_packed_batch(groups, pad_to_multiple=4 if seed % 3 == 0 else 1)
    ids, depth, length = batch.input_ids.tolist(), batch.position_ids.tolist(), batch.tree_tokens

    # Brute force, independent of subtree_end: in depth-first order the parent of a token is the nearest
    # earlier token one level up; the prefix of a token is its root path.
    parent = [next((k for k in range(q - 1, -1, -1) if depth[k] == depth[q] - 1), None) if depth[q] else None
              for q in range(length)]
    ancestors, prefix = [], []
    for q in range(length):
        chain, k = [], q
        while k is not None:
            chain.append(k)
            k = parent[k]
        ancestors.append(set(chain))
        prefix.append(tuple(ids[k] for k in reversed(chain)))

    # The trie holds every distinct prefix of every full sequence exactly once.
    expected = {tuple(s[:n]) for g in groups for s in g.sequences() for n in range(1, len(s) + 1)}
    assert len(prefix) == len(set(prefix)) == len(expected)
    assert set(prefix) == expected

    mask = batch.attention_mask()
    assert mask.shape == (1, 1, batch.num_tokens, batch.num_tokens) and mask.dtype == torch.bool
    brute = torch.zeros(batch.num_tokens, batch.num_tokens, dtype=torch.bool)
    for q in range(length):
        brute[q, sorted(ancestors[q])] = True
    for q in range(length, batch.num_tokens):  # padding: attends to itself only
        brute[q, q] = True
    assert torch.equal(mask[0, 0], brute)

    # FlexAttention's mask_mod is the same relation (evaluated on index grids; no compile needed).
    idx = torch.arange(batch.num_tokens)
    assert torch.equal(tree_mask_mod(batch.subtree_end)(0, 0, idx[:, None], idx[None, :]), brute)

    # Scoring rows: completion token t is predicted by the token whose prefix is the sequence before t.
    where = {p: q for q, p in enumerate(prefix)}
    rows = []
    for m, g in enumerate(groups):
        for j, seq in enumerate(g.sequences()):
            for t in range(len(g.prompt_ids), len(seq)):
                rows.append((where[tuple(seq[:t])], seq[t], sum(len(x.completions) for x in groups[:m]) + j,
                             g.roles[j][t - len(g.prompt_ids)], g.diffs[j][t - len(g.prompt_ids)]))
    assert batch.score_positions.tolist() == [r[0] for r in rows]
    assert batch.score_targets.tolist() == [r[1] for r in rows]
    assert batch.score_segments.tolist() == [r[2] for r in rows]
    assert batch.score_roles.tolist() == [r[3] for r in rows]
    assert batch.score_diff.tolist() == [r[4] for r in rows]
    assert batch.num_segments == sum(len(g.completions) for g in groups)


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_windowed_mask_counts_positions_along_the_root_path(window):
    rng = random.Random(window)
    groups = _random_groups(rng, n_groups=4, vocab=3, shared_prefix=[0, 1, 2, 0])
    batch = build_packed_batch(groups, pad_to_multiple=4)
    full = batch.attention_mask()[0, 0]
    windowed = batch.attention_mask(window)[0, 0]
    depth = batch.position_ids.tolist()
    # Brute force from the unwindowed relation: an ancestor-or-self k is kept iff fewer than `window` levels
    # separate it from q (transformers: kv_idx > q_idx - sliding_window on an unshared sequence, where index =
    # depth). On a root path, depths are 0..d, so q sees exactly its last min(window, d + 1) path tokens.
    brute = torch.zeros_like(full)
    for q in range(batch.num_tokens):
        for k in range(batch.num_tokens):
            brute[q, k] = bool(full[q, k]) and depth[q] - depth[k] < window
        assert int(brute[q].sum()) == min(window, depth[q] + 1)
    assert torch.equal(windowed, brute)
    idx = torch.arange(batch.num_tokens)
    mod = tree_mask_mod(batch.subtree_end, batch.position_ids, window)
    assert torch.equal(mod(0, 0, idx[:, None], idx[None, :]), brute)
    with pytest.raises(ValueError, match="sliding window must be a positive int"):
        batch.attention_mask(0)


# ---------------------------------------------------------------- packer policy


def test_ffd_hand_case_uses_marginal_cost():
    # Disjoint groups of standalone cost 6, 5, 4, 3 (given scrambled), budget 10. FFD by hand:
    # 6 -> pack 0; 5 -> pack 1 (11 > 10); 4 -> pack 0 (10); 3 -> pack 1 (8).
    g6 = CompletionGroup([100, 101, 102, 103], [[104, 105]])
    g5 = CompletionGroup([200, 201, 202], [[203, 204]])
    g4 = CompletionGroup([300, 301], [[302, 303]])
    g3 = CompletionGroup([400], [[401, 402]])
    assert assign_packs([g3, g5, g6, g4], token_budget=10) == [[2, 3], [0, 1]]

    # Marginal cost: this group costs 8 alone but shares its 5-token prompt with g_a: it adds only 3
    # tokens, so it fits next to g_a (6 + 3 = 9 <= 10) instead of opening a new pack.
    g_a = CompletionGroup([1, 2, 3, 4, 5], [[6]])
    g_b = CompletionGroup([1, 2, 3, 4, 5], [[7, 8, 9]])
    assert group_tree_tokens(g_b) == 8
    batches = pack([g_a, g_b], token_budget=10)
    assert len(batches) == 1 and batches[0].tree_tokens == 9 and batches[0].unshared_tokens == 6 + 8


def test_group_tree_tokens_shares_within_group():
    # prompt 3 + chosen [7 8 9] + rejected [7 8 5] (shares "7 8") + rejected [6]: 3 + 3 + 1 + 1.
    g = CompletionGroup([1, 2, 3], [[7, 8, 9], [7, 8, 5], [6]])
    assert group_tree_tokens(g) == 8
    assert g.unshared_tokens == 6 + 6 + 4
    (batch,) = pack([g], token_budget=8)
    assert batch.tree_tokens == 8


@pytest.mark.parametrize("budget", [24, 37, 64])
def test_budget_respected_and_deterministic(budget):
    rng = random.Random(budget)
    groups = _random_groups(rng, n_groups=30, vocab=5, shared_prefix=[0, 1, 2, 3, 4, 0])
    batches = pack(groups, token_budget=budget)
    again = pack(groups, token_budget=budget)
    assert all(b.num_tokens <= budget for b in batches)
    # Every completion lands in exactly one pack, with its metadata.
    placed = sorted(cid for b in batches for cid in b.completion_sources)
    assert placed == sorted((i, j) for i, g in enumerate(groups) for j in range(len(g.completions)))
    assert [b.completion_sources for b in batches] == [b.completion_sources for b in again]
    for b, c in zip(batches, again):
        assert torch.equal(b.input_ids, c.input_ids) and torch.equal(b.score_positions, c.score_positions)
    # Each pack's groups appear in input order.
    for b in batches:
        items = [i for i, _ in b.completion_sources]
        assert items == sorted(items)


def test_padding_and_budget_multiple():
    groups = _docstring_groups()
    (batch,) = pack(groups, token_budget=16, pad_to_multiple=16, pad_id=5)
    assert batch.num_tokens == 16 and batch.tree_tokens == 8
    assert batch.input_ids[8:].tolist() == [5] * 8 and batch.node_ids[8:].tolist() == [-1] * 8
    assert torch.equal(batch.score_positions, pack(groups, token_budget=16)[0].score_positions)
    with pytest.raises(ValueError, match="not a multiple of pad_to_multiple"):
        pack(groups, token_budget=20, pad_to_multiple=16)


def test_array_inputs_pack_like_lists():
    import numpy as np

    lists = _random_groups(random.Random(7), n_groups=4, vocab=4, shared_prefix=[1, 2, 3])
    arrays = [CompletionGroup(np.array(g.prompt_ids), [torch.tensor(c, dtype=torch.int64) for c in g.completions],
                              [np.array(r, dtype=np.int8) for r in g.roles], [np.array(d) for d in g.diffs],
                              key=g.key) for g in lists]
    (a,), (b,) = pack(lists, token_budget=256), pack(arrays, token_budget=256)
    for name in ("input_ids", "position_ids", "subtree_end", "score_positions", "score_targets", "score_roles",
                 "score_diff"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_oversize_group_error_names_it():
    groups = [CompletionGroup([1, 2], [[3]], key="small"), CompletionGroup([1, 2, 3, 4], [[5, 6]], key="rec-17")]
    with pytest.raises(ValueError, match=r"group 1 \(key 'rec-17'\) needs 6 tokens on its own but token_budget is 5"):
        pack(groups, token_budget=5)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        (CompletionGroup([], [[1]], key="r"), "prompt_ids is empty"),
        (CompletionGroup([1], [], key="r"), "no completions"),
        (CompletionGroup([1], [[2, 3]], [[0]], key="r"), "completion 0 has 2 tokens but 1 role flags"),
        (CompletionGroup([1], [[2, 3]], None, [[True, False], [True]], key="r"), "2 diff lists for 1 completions"),
        (CompletionGroup([1], [[2], [3]], [[1]], key="r"), "1 role lists for 2 completions"),
    ],
)
def test_invalid_group_errors(group, message):
    with pytest.raises(ValueError, match=re.escape(f"group 0 (key 'r'): {message}")):
        pack([group], token_budget=100)


def _distinct_prefix_count(sequences):
    """Distinct prefixes by incremental hashing (independent of the radix tree; O(total tokens))."""
    seen = set()
    for seq in sequences:
        h = 0
        for depth, tok in enumerate(seq):
            h = hash((h, tok))
            seen.add((depth, h))
    return len(seen)


def test_pv_miner_shaped_workload_shares_the_instruction():
    # ~3.5k-token shared instruction, ~55-token messages, chosen 50-300 tokens, 3 rejected each.
    rng = random.Random(0)
    vocab = 32000
    instruction = [rng.randrange(vocab) for _ in range(3500)]
    groups = []
    for i in range(24):
        message = [rng.randrange(vocab) for _ in range(rng.randint(40, 70))]
        chosen = [rng.randrange(vocab) for _ in range(rng.randint(50, 300))]
        rejected = [chosen[: rng.randint(0, len(chosen))] + [rng.randrange(vocab) for _ in range(rng.randint(5, 60))]
                    for _ in range(3)]
        groups.append(CompletionGroup(instruction + message, [chosen] + rejected, key=i))
    budget = 16384
    batches = pack(groups, token_budget=budget)
    packed = sum(b.tree_tokens for b in batches)
    unshared = sum(g.unshared_tokens for g in groups)
    assert unshared == sum(b.unshared_tokens for b in batches)
    for b in batches:
        assert b.num_tokens <= budget
        members = sorted({i for i, _ in b.completion_sources})
        assert b.tree_tokens == _distinct_prefix_count([s for i in members for s in groups[i].sequences()])
    # Unshared: 4 copies of ~3.6k prompt per example; packed: the instruction once per pack.
    assert packed < 0.15 * unshared
    # Packs are full: no two packs could merge (first fit would have used the space).
    assert len(batches) == -(-packed // budget) or all(b.tree_tokens > budget // 2 for b in batches[:-1])


# ---------------------------------------------------------------- exactness on tiny models


def _tiny_model(arch: str, lora: bool = False, quant: str = "none"):
    """The project's tiny model in eval mode; with LoRA, B matrices randomised so the adapters are active
    (peft starts B at zero, which leaves the output unchanged and every A gradient zero)."""
    model = load_tiny_model(arch, quant=quant, lora=lora).eval()
    return activate_lora(model) if lora else model


def _separate_logprobs(model, groups):
    """Reference: every completion as its own full sequence, default causal mask, in completion order."""
    out = []
    for g in groups:
        p = len(g.prompt_ids)
        for seq in g.sequences():
            logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            out.append(logits[p - 1:-1].log_softmax(-1).gather(-1, torch.tensor(seq[p:])[:, None])[:, 0])
    return torch.cat(out)


def _workload(kind: str, seed: int = 0, vocab: int = VOCAB):
    """Random ids: SFT groups sharing an instruction, or pairs with k rejected sharing starts with chosen."""
    rng = random.Random(seed)
    instruction = [rng.randrange(vocab) for _ in range(24)]
    if kind == "sft":
        return [CompletionGroup(instruction + [rng.randrange(vocab) for _ in range(rng.randint(3, 6))],
                                [[rng.randrange(vocab) for _ in range(rng.randint(4, 9))]], key=i)
                for i in range(4)]
    k = {"pairs_k1": 1, "pairs_k3": 3}[kind]
    groups = []
    for i in range(3):
        chosen = [rng.randrange(vocab) for _ in range(rng.randint(5, 9))]
        rejected = [chosen[: rng.randint(0, 4)] + [rng.randrange(vocab) for _ in range(rng.randint(3, 8))]
                    for _ in range(k)]
        groups.append(CompletionGroup(instruction + [rng.randrange(vocab) for _ in range(5)], [chosen] + rejected,
                                      key=i))
    return groups


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["sft", "pairs_k1", "pairs_k3"])
def test_tree_logprobs_equal_separate_sequences(arch, kind):
    model = _tiny_model(arch)
    groups = _workload(kind)
    (batch,) = pack(groups, token_budget=512, pad_to_multiple=8)
    assert batch.tree_tokens < batch.unshared_tokens
    with torch.no_grad():
        tree = packed_token_logprobs(model, batch)
        ref = _separate_logprobs(model, groups)
    assert tree.shape == (batch.num_scored,) == ref.shape
    torch.testing.assert_close(tree, ref, atol=1e-5, rtol=0)
    # Hidden states too: the last prompt token's state equals the separate sequence's.
    with torch.no_grad():
        hidden = packed_forward(model, batch)
        seq = groups[-1].sequences()[-1]
        alone = model.get_decoder()(input_ids=torch.tensor([seq])).last_hidden_state[0]
    assert hidden.shape == (batch.num_tokens, model.config.hidden_size)
    last_prompt_row = batch.score_positions[batch.score_segments == batch.num_segments - 1][0]
    torch.testing.assert_close(hidden[last_prompt_row], alone[len(groups[-1].prompt_ids) - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("arch", "quant"), [("llama", "none"), ("qwen2", "none"), ("llama", "nf4")])
def test_lora_logprobs_and_gradients_equal_separate_sequences(arch, quant):
    model = _tiny_model(arch, lora=True, quant=quant)
    groups = _workload("pairs_k3", seed=1)
    (batch,) = pack(groups, token_budget=512)
    # An upstream gradient that is not all ones: per-token values times a per-completion sign.
    sign = torch.tensor([1.0 if j == 0 else -0.5 for _, j in batch.completion_sources])
    coef = torch.linspace(0.5, 2.0, batch.num_scored) * sign[batch.score_segments]
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)

    tree = packed_token_logprobs(model, batch)
    tree_grads = torch.autograd.grad((coef * tree).sum(), lora_params)
    ref = _separate_logprobs(model, groups)
    ref_grads = torch.autograd.grad((coef * ref).sum(), lora_params)

    torch.testing.assert_close(tree.detach(), ref.detach(), atol=1e-5, rtol=0)
    for g_tree, g_ref in zip(tree_grads, ref_grads):
        assert g_ref.abs().max() > 0
        torch.testing.assert_close(g_tree, g_ref, atol=1e-5, rtol=1e-4)

    # The reference pass (same model, adapters disabled, no grad) reuses the policy pass's mask.
    mask = packed_attention_mask(model, batch)
    with torch.no_grad(), model.disable_adapter():
        tree_reference = packed_token_logprobs(model, batch, attention_mask=mask)
        separate_reference = _separate_logprobs(model, groups)
    torch.testing.assert_close(tree_reference, separate_reference, atol=1e-5, rtol=0)
    assert (tree_reference - tree.detach()).abs().max() > 1e-3  # the adapters did change the policy


def test_eager_attention_takes_the_additive_mask():
    model = _tiny_model("llama")
    model.set_attn_implementation("eager")
    groups = _workload("pairs_k1", seed=2)
    (batch,) = pack(groups, token_budget=512)
    assert packed_attention_mask(model, batch).dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(packed_token_logprobs(model, batch), _separate_logprobs(model, groups),
                                   atol=1e-5, rtol=0)


def test_unsupported_attention_implementation_errors():
    model = _tiny_model("qwen2")
    model.config._attn_implementation = "flash_attention_2"  # no arbitrary masks there
    with pytest.raises(ValueError, match="'flash_attention_2' cannot take a tree mask"):
        packed_attention_mask(model, pack(_docstring_groups(), token_budget=64)[0])


def _real_text_groups(tokenizer, n: int, seed: int) -> list[CompletionGroup]:
    """Real prompt shape: the instruction through the chat template, a synthetic message, the canonical JSON
    answer as chosen and the answer without its last triple as rejected (both end with the EOS token)."""
    from pvfast.data.jsonfmt import serialize
    from pvfast.data.prompt import build_prompt
    from pvfast.data.synth import generate_corpus

    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    groups = []
    for ex in generate_corpus(n, seed=seed):
        chosen = ids(serialize(ex.annotations)) + [tokenizer.eos_token_id]
        rejected = ids(serialize(ex.annotations[:-1])) + [tokenizer.eos_token_id]
        groups.append(CompletionGroup(ids(build_prompt(tokenizer, ex.direction, ex.message)), [chosen, rejected],
                                      key=ex.id))
    return groups


def test_real_prompts_pack_exactly_with_the_instruction_once():
    tokenizer = load_tiny_tokenizer("llama")
    groups = _real_text_groups(tokenizer, n=2, seed=1)
    (batch,) = pack(groups, token_budget=8192)
    # Unshared: the ~3.5k-token prompt runs once per completion (4 times); packed: the common start once.
    common = min(packing._common_prefix_len(groups[0].prompt_ids, g.prompt_ids) for g in groups[1:])
    assert common > 3000
    assert batch.tree_tokens == _distinct_prefix_count([s for g in groups for s in g.sequences()])
    assert batch.tree_tokens < batch.unshared_tokens / 3
    model = _tiny_model("llama")
    with torch.no_grad():
        tree = packed_token_logprobs(model, batch)
        ref = _separate_logprobs(model, groups)
    torch.testing.assert_close(tree, ref, atol=1e-5, rtol=0)
    # What the objectives read: per-completion sums over score_segments, the same as run separately.
    weights = torch.linspace(0.5, 2.0, batch.num_scored)
    stats_tree = segment_stats_reference(tree, weights, batch.score_segments, batch.num_segments, tau=0.9)
    lengths = [len(c) for g in groups for c in g.completions]
    separate_segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    stats_ref = segment_stats_reference(ref, weights, separate_segments, len(lengths), tau=0.9)
    torch.testing.assert_close(stats_tree, stats_ref, atol=1e-4, rtol=1e-6)


@pytest.mark.slow
def test_flex_attention_block_mask_matches_separate_sequences():
    # The first FlexAttention call compiles (~20 s on the CPU): one small case only.
    from torch.nn.attention.flex_attention import BlockMask

    # A fresh compile for this one shape (a dynamic-shape recompile does not compile on the CPU; see
    # tests/test_attention.py::test_flex_attention_is_refused_on_the_cpu_before_loading).
    torch._dynamo.reset()
    model = _tiny_model("llama")
    groups = _workload("pairs_k1", seed=3)
    (batch,) = pack(groups, token_budget=512)
    with torch.no_grad():
        ref = _separate_logprobs(model, groups)
        model.set_attn_implementation("flex_attention")
        assert isinstance(packed_attention_mask(model, batch), BlockMask)
        tree = packed_token_logprobs(model, batch)
    torch.testing.assert_close(tree, ref, atol=1e-5, rtol=0)
