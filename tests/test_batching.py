"""Records → tree-packed LossBatches: layout, exactness against unshared float64 sequences, budgets, order.

The exactness tests run the tiny Llama with LoRA (B matrices randomised so policy ≠ reference). The
reference is the released code's layout: every (chosen, rejected_j) pair as two separate padded
sequences, with that pair's chosen diff flags and the SPEC §2 weights written out here by hand; full
logits → float64 log_softmax → gather → ``stats_from_padded`` → ``compute_objective``.
"""

import dataclasses
import random

import numpy as np
import pytest
import torch

from pvfast.data.jsonfmt import serialize
from pvfast.data.prompt import PromptTemplate, build_prompt
from pvfast.data.records import PreferenceRecord
from pvfast.data.roles import ROLE_CODE, ROLE_SCAFFOLD, ROLE_SPAN, ROLE_SUBCODE
from pvfast.data.synth import generate_corpus
from pvfast.data.tokenization import tokenize_completion, tokenize_pair_group
from pvfast.model.forward import lm_head_weight, packed_forward
from pvfast.model.reference import reference_stats
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.objectives.config import ClassBalanceConfig, DpoConfig, SftConfig, TabpoConfig, TokenWeightConfig
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.objectives.losses import PairIndex, compute_objective, stats_from_padded
from pvfast.packing.loss_batch import (
    GroupKey,
    LossBatch,
    PackingStats,
    epoch_order,
    fit_to_budget,
    make_loss_batches,
    preference_groups,
    sft_groups,
)
from pvfast.packing.tree import CompletionGroup, group_tree_tokens
from pvfast.testing import activate_lora, load_tiny_model

# Exactness does not depend on the prompt's length; a short template keeps the forwards fast.
SHORT_TEMPLATE = PromptTemplate("Extract the PV-Miner triples.\nTO_PAT_YN: {direction}\n{message}\nOUTPUT:",
                                source="test template")
BUDGET = 4096


def _examples(n, seed=3):
    return [e for e in generate_corpus(n=60, seed=seed) if len(e.annotations) >= 2][:n]


def _rejected_texts(annotations, k):
    """k distinct wrong answers: a triple missing, a span shortened, the first triple missing."""
    anns = list(annotations)
    short = dataclasses.replace(anns[0], span=anns[0].span[: max(1, len(anns[0].span) // 2)])
    return [serialize(anns[:-1]), serialize([short] + anns[1:]), serialize(anns[1:])][:k]


def _records(k, n=2, seed=3):
    return [PreferenceRecord(ex.id, serialize(ex.annotations), tuple(_rejected_texts(ex.annotations, k)),
                             ex.direction, ex.message) for ex in _examples(n, seed)]


def _spec_weights(roles, diff, config):
    """SPEC §2 by hand: w = max(w_scaffold, w_role), times w_diff where the token differs; 1 with TW off."""
    if not config.token_weighting:
        return [1.0] * len(roles)
    cfg = config.token_weights
    by_role = {ROLE_SCAFFOLD: cfg.w_scaffold, ROLE_CODE: max(cfg.w_scaffold, cfg.w_code),
               ROLE_SUBCODE: max(cfg.w_scaffold, cfg.w_subcode), ROLE_SPAN: max(cfg.w_scaffold, cfg.w_span)}
    return [by_role[int(r)] * (cfg.w_diff if d else 1.0) for r, d in zip(roles, diff)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def model():
    return activate_lora(load_tiny_model("llama", lora=True).eval())


# ---------------------------------------------------------------- float64 unshared reference


def _pair_rows(tokenizer, records, record_weights=None, union=False):
    """Rows [chosen for pair 1, rejected 1, chosen for pair 2, ...] as (ids, n_prompt, roles, diff), straight
    from tokenize_pair_group; ``union``: the chosen carries the union of its diff masks in every pair."""
    rows, example_weights = [], []
    for record in records:
        prompt = build_prompt(tokenizer, record.direction, record.message, SHORT_TEMPLATE)
        group = tokenize_pair_group(tokenizer, prompt, record.chosen, record.rejected)
        union_mask = np.logical_or.reduce(group.chosen_diff_masks)
        for j, rejected in enumerate(group.rejected):
            chosen_diff = union_mask if union else group.chosen_diff_masks[j]
            rows.append((group.chosen.input_ids, len(group.prompt_ids), group.chosen.roles, chosen_diff))
            rows.append((rejected.input_ids, len(rejected.prompt_ids), rejected.roles, group.rejected_diff_masks[j]))
            if record_weights is not None:
                example_weights.append(record_weights[record.id])
    return rows, (torch.tensor(example_weights, dtype=torch.float64) if record_weights is not None else None)


def _padded_stats(model, rows, config):
    """(B, 7) float64 statistics of each row run alone (right padding, default causal mask)."""
    length = max(len(ids) for ids, *_ in rows)
    input_ids = torch.zeros((len(rows), length), dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    weights = torch.zeros((len(rows), length), dtype=torch.float64)
    for b, (ids, n_prompt, roles, diff) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n] = torch.as_tensor(ids)
        attention[b, :n] = 1
        # position t predicts token t+1: the completion tokens are predicted at n_prompt-1 .. n-2
        targets[b, n_prompt - 1: n - 1] = torch.as_tensor(ids[n_prompt:])
        mask[b, n_prompt - 1: n - 1] = True
        weights[b, n_prompt - 1: n - 1] = torch.as_tensor(_spec_weights(roles, diff, config), dtype=torch.float64)
    logits = model(input_ids=input_ids, attention_mask=attention).logits.double()
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return stats_from_padded(logp, weights, mask, config.gate_tau)


def _unshared_objective(model, rows, example_weights, objective, config, pairs):
    ref = None
    if objective not in ("simpo", "sft"):
        with torch.no_grad(), model.disable_adapter():
            ref = _padded_stats(model, rows, config)
    policy = _padded_stats(model, rows, config)
    return compute_objective(objective, policy, ref, pairs, example_weights, config)


def _tree_objective(model, batch: LossBatch, loss_fn: FusedTokenPOLoss):
    ref = reference_stats(model, batch, loss_fn) if loss_fn.needs_reference else None
    rows = batch.scoring_rows(packed_forward(model, batch.packed))
    return loss_fn(rows, lm_head_weight(model), batch.pairs, ref)


def _lora_grads(model, loss):
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def _assert_same(model, tree_out, ref_out):
    # The tree path is fp32 end to end (fused op over fp32 hidden states); the reference takes the same
    # fp32 logits into float64. Per-token ℓ agree to ~1e-6; weighted-mean scores average them, and summed
    # scores (DPO) add ~100–200 of them in fp32 (rounding ~1e-4 per sum), hence rtol 5e-5 on the loss.
    torch.testing.assert_close(tree_out.loss.double(), ref_out.loss, rtol=5e-5, atol=1e-5)
    tree_grads = _lora_grads(model, tree_out.loss)
    ref_grads = _lora_grads(model, ref_out.loss)
    assert any(g.abs().max() > 0 for g in ref_grads)
    for g_tree, g_ref in zip(tree_grads, ref_grads):
        scale = g_ref.abs().max().clamp(min=1e-8)
        assert (g_tree.double() - g_ref.double()).abs().max() / scale < 1e-4


PO_CASES = {
    "tabpo-k1": (1, "tabpo", TabpoConfig(), None),
    # class balance on: a record's weight must reach every pair of that record
    "tabpo-k3-cb": (3, "tabpo", TabpoConfig(class_balance=ClassBalanceConfig(enabled=True)), [0.4, 1.6]),
    "dpo-k3": (3, "dpo", DpoConfig(), None),
}


@pytest.mark.parametrize("case", list(PO_CASES))
def test_tree_packed_po_loss_and_lora_grads_equal_unshared_float64(tokenizer, model, case):
    k, objective, config, record_weights = PO_CASES[case]
    records = _records(k)
    table = None if record_weights is None else {r.id: w for r, w in zip(records, record_weights)}
    groups = preference_groups(records, tokenizer, SHORT_TEMPLATE)
    (batch,) = make_loss_batches(groups, BUDGET, "po")
    assert batch.num_pairs == k * len(records)
    assert batch.packed.tree_tokens < batch.packed.unshared_tokens

    tree = _tree_objective(model, batch, FusedTokenPOLoss(objective, config, class_weights=table))
    rows, example_weights = _pair_rows(tokenizer, records, table)
    pairs = PairIndex(torch.arange(0, len(rows), 2), torch.arange(1, len(rows), 2))
    ref = _unshared_objective(model, rows, example_weights, objective, config, pairs)
    _assert_same(model, tree, ref)
    for key in ("margin", "reward_accuracy", "loss_pref"):
        torch.testing.assert_close(tree.metrics[key].double(), ref.metrics[key].double(), rtol=1e-4, atol=5e-4)


def test_tree_packed_sft_loss_and_lora_grads_equal_unshared_float64(tokenizer, model):
    examples = _examples(3)
    example_weights = [0.5, 1.0, 2.0]
    config = SftConfig(class_balance=ClassBalanceConfig(enabled=True))
    groups = sft_groups(examples, tokenizer, SHORT_TEMPLATE)
    (batch,) = make_loss_batches(groups, BUDGET, "sft")
    assert batch.pairs is None and batch.segment_records == tuple(ex.id for ex in examples)

    table = {ex.id: w for ex, w in zip(examples, example_weights)}
    tree = _tree_objective(model, batch, FusedTokenPOLoss("sft", config, class_weights=table))
    rows = []
    for ex in examples:
        prompt = build_prompt(tokenizer, ex.direction, ex.message, SHORT_TEMPLATE)
        tc = tokenize_completion(tokenizer, prompt, serialize(ex.annotations))
        rows.append((tc.input_ids, len(tc.prompt_ids), tc.roles, [False] * len(tc.roles)))
    ref = _unshared_objective(model, rows, torch.tensor(example_weights, dtype=torch.float64), "sft", config, None)
    _assert_same(model, tree, ref)


def test_per_pair_chosen_weights_not_union(tokenizer, model):
    """Each pair scores the chosen with its own diff weights (released code), not the union over pairs."""
    weight_cfg = TokenWeightConfig(w_diff=2.0)  # a large diff factor makes the two readings far apart
    config = TabpoConfig(token_weights=weight_cfg)
    records = _records(2, n=1)
    (group,) = preference_groups(records, tokenizer, SHORT_TEMPLATE)
    # The two pairs differ in different places, so their chosen diff flags (hence weights) differ.
    assert group.completions[0].tolist() == group.completions[2].tolist()
    assert group.diffs[0].tolist() != group.diffs[2].tolist()
    (batch,) = make_loss_batches([group], BUDGET, "po")

    tree = _tree_objective(model, batch, FusedTokenPOLoss("tabpo", config))
    pairs = PairIndex(torch.tensor([0, 2]), torch.tensor([1, 3]))
    per_pair_rows, ew = _pair_rows(tokenizer, records)
    union_rows, _ = _pair_rows(tokenizer, records, union=True)
    with torch.no_grad():
        tree_loss = tree.loss.detach().double()
        per_pair = _unshared_objective(model, per_pair_rows, ew, "tabpo", config, pairs).loss
        union = _unshared_objective(model, union_rows, ew, "tabpo", config, pairs).loss
    torch.testing.assert_close(tree_loss, per_pair, rtol=5e-5, atol=1e-5)
    # Measured: tree vs per-pair ~1e-7, per-pair vs union ~7e-4; the union reading fails the tolerance above.
    assert (per_pair - union).abs() > 100 * (tree_loss - per_pair).abs().clamp(min=1e-6)
    assert not torch.allclose(tree_loss, union, rtol=5e-5, atol=1e-5)


# ---------------------------------------------------------------- layout (no model)


def _distinct_prefixes(sequences):
    """Trie size of a set of sequences: the number of distinct non-empty prefixes."""
    return len({tuple(s[:n]) for s in sequences for n in range(1, len(s) + 1)})


def test_segment_layout_pairs_and_record_ids(tokenizer):
    records = [_records(3, n=1)[0], _records(1, n=2)[1]]
    groups = preference_groups(records, tokenizer, SHORT_TEMPLATE)
    for record, group in zip(records, groups):
        prompt = build_prompt(tokenizer, record.direction, record.message, SHORT_TEMPLATE)
        expected = tokenize_pair_group(tokenizer, prompt, record.chosen, record.rejected)
        assert group.key == GroupKey(record.id, "po")
        assert group.prompt_ids.tolist() == expected.prompt_ids.tolist()
        for j, rejected in enumerate(expected.rejected):
            assert group.completions[2 * j].tolist() == expected.chosen.completion_ids.tolist()
            assert group.roles[2 * j].tolist() == expected.chosen.roles.tolist()
            assert group.diffs[2 * j].tolist() == expected.chosen_diff_masks[j].tolist()
            assert group.completions[2 * j + 1].tolist() == rejected.completion_ids.tolist()
            assert group.roles[2 * j + 1].tolist() == rejected.roles.tolist()
            assert group.diffs[2 * j + 1].tolist() == expected.rejected_diff_masks[j].tolist()

    (batch,) = make_loss_batches(groups, BUDGET, "po")
    # Record 0 (k=3) holds segments 0..5, record 1 (k=1) segments 6, 7; pairs written out by hand.
    assert batch.pairs.chosen.tolist() == [0, 2, 4, 6]
    assert batch.pairs.rejected.tolist() == [1, 3, 5, 7]
    assert batch.segment_records == (records[0].id,) * 6 + (records[1].id,) * 2
    assert batch.record_ids == (records[0].id, records[1].id)
    # The chosen copies are one trie path: the row holds each distinct prefix once.
    sequences = [s for g in groups for s in g.sequences()]
    assert batch.packed.tree_tokens == _distinct_prefixes(sequences)
    # Scored rows: each completion in full, in segment order, with its own roles and diff flags.
    for m, (item, j) in enumerate(batch.packed.completion_sources):
        rows = batch.packed.score_segments == m
        assert batch.packed.score_targets[rows].tolist() == list(groups[item].completions[j])
        assert batch.packed.score_roles[rows].tolist() == list(groups[item].roles[j])
        assert batch.packed.score_diff[rows].tolist() == list(groups[item].diffs[j])

    stats = PackingStats.from_batches([batch], BUDGET)
    assert stats.unshared_tokens == sum(len(s) for s in sequences)
    assert stats.pairs == 4 and stats.completions == 8
    assert stats.compression == stats.unshared_tokens / stats.tree_tokens > 1


def test_many_packs_cover_every_pair_once_deterministically(tokenizer):
    records = _records(3, n=6)
    groups = preference_groups(records, tokenizer, SHORT_TEMPLATE)
    budget = 2 * max(group_tree_tokens(g) for g in groups)
    batches = make_loss_batches(groups, budget, "po")
    again = make_loss_batches(groups, budget, "po")
    assert len(batches) > 1
    seen = []
    for batch, twin in zip(batches, again):
        assert batch.packed.tree_tokens <= budget
        assert torch.equal(batch.packed.input_ids, twin.packed.input_ids)
        assert torch.equal(batch.pairs.chosen, twin.pairs.chosen)
        # every pair belongs to one record, named by both of its segments
        for c, r in zip(batch.pairs.chosen.tolist(), batch.pairs.rejected.tolist()):
            key_c, key_r = batch.packed.group_keys[c], batch.packed.group_keys[r]
            assert key_c == key_r and batch.segment_records[c] == key_c.record_id
            (_, j_c), (_, j_r) = batch.packed.completion_sources[c], batch.packed.completion_sources[r]
            assert j_c % 2 == 0 and j_r == j_c + 1
            seen.append((key_c.record_id, j_c))
    assert sorted(seen) == sorted((r.id, 2 * j) for r in records for j in range(3))
    stats = PackingStats.from_batches(batches, budget)
    assert stats.unshared_tokens == sum(len(s) for g in groups for s in g.sequences())
    assert stats.pairs == 18 and stats.batches == len(batches) and 0 < stats.fill <= 1


def test_sft_groups_layout(tokenizer):
    examples = _examples(2)
    groups = sft_groups(examples, tokenizer, SHORT_TEMPLATE)
    for ex, group in zip(examples, groups):
        assert group.key == GroupKey(ex.id, "sft")
        (completion,) = group.completions
        assert tokenizer.decode(completion) == serialize(ex.annotations) + tokenizer.eos_token
        prompt = build_prompt(tokenizer, ex.direction, ex.message, SHORT_TEMPLATE)
        roles = tokenize_completion(tokenizer, prompt, serialize(ex.annotations)).roles
        assert group.roles[0].tolist() == roles.tolist() and group.diffs is None  # no rejected: no diff flags
    batches = make_loss_batches(groups, BUDGET, "sft")
    assert [b.segment_records for b in batches] == [tuple(ex.id for ex in examples)]
    assert not batches[0].packed.score_diff.any()


def test_prompt_field_and_default_template(tokenizer):
    ex = _examples(1)[0]
    ready = "<|im_start|>user\nlabel this<|im_end|>\n<|im_start|>assistant\n"
    records = [PreferenceRecord("ready", serialize(ex.annotations), tuple(_rejected_texts(ex.annotations, 1)),
                                prompt=ready),
               PreferenceRecord("built", serialize(ex.annotations), tuple(_rejected_texts(ex.annotations, 1)),
                                ex.direction, ex.message)]
    ready_group, built_group = preference_groups(records, tokenizer)  # default template
    assert ready_group.prompt_ids.tolist() == tokenizer(ready, add_special_tokens=False)["input_ids"]
    full_prompt = build_prompt(tokenizer, ex.direction, ex.message)
    assert built_group.prompt_ids.tolist() == tokenizer(full_prompt, add_special_tokens=False)["input_ids"]
    assert len(built_group.prompt_ids) > 1000  # the real instruction is in it


def test_kind_mismatch_and_odd_groups_are_errors(tokenizer):
    po = preference_groups(_records(1, n=1), tokenizer, SHORT_TEMPLATE)
    with pytest.raises(ValueError, match="built for kind 'po'"):
        make_loss_batches(po, BUDGET, "sft")
    odd = CompletionGroup([1, 2], [[3], [4], [5]], key="x")
    with pytest.raises(ValueError, match="even number"):
        make_loss_batches([odd], BUDGET, "po")
    with pytest.raises(ValueError, match="kind must be one of"):
        make_loss_batches(po, BUDGET, "dpo")
    (batch,) = make_loss_batches(po, BUDGET, "po")
    with pytest.raises(ValueError, match="scoring_rows"):
        batch.scoring_rows(torch.zeros(batch.packed.num_tokens + 1, 8))


# ---------------------------------------------------------------- over-long groups


def test_over_long_group_error_names_record_and_lengths(tokenizer):
    (record,) = _records(2, n=1)
    (group,) = preference_groups([record], tokenizer, SHORT_TEMPLATE)
    cost = _distinct_prefixes(group.sequences())
    lengths = [len(c) for c in group.completions]
    with pytest.raises(ValueError) as err:
        preference_groups([record], tokenizer, SHORT_TEMPLATE, token_budget=cost - 1)
    message = str(err.value)
    assert repr(record.id) in message
    assert f"prompt {len(group.prompt_ids)} tokens" in message
    assert f"chosen {lengths[0]} tokens, rejected {lengths[1::2]} tokens" in message
    assert f"need {cost} tree tokens" in message and "truncate=True" in message
    # exactly at the budget is fine
    (fits,) = preference_groups([record], tokenizer, SHORT_TEMPLATE, token_budget=cost)
    assert fits.completions[0].tolist() == group.completions[0].tolist()


def test_truncate_cuts_completion_tails_to_the_longest_fitting_length(tokenizer):
    (record,) = _records(2, n=1)
    (group,) = preference_groups([record], tokenizer, SHORT_TEMPLATE)
    budget = len(group.prompt_ids) + 40
    (cut,) = preference_groups([record], tokenizer, SHORT_TEMPLATE, token_budget=budget, truncate=True)
    assert cut.prompt_ids.tolist() == group.prompt_ids.tolist()  # the prompt is never cut
    cap = max(len(c) for c in cut.completions)
    for j, (full, short) in enumerate(zip(group.completions, cut.completions)):
        assert short.tolist() == full[:cap].tolist()
        assert cut.roles[j].tolist() == group.roles[j][:cap].tolist()
        assert cut.diffs[j].tolist() == group.diffs[j][:cap].tolist()
    assert _distinct_prefixes(cut.sequences()) <= budget
    # the longest cap: one more token per completion would not fit
    longer = [list(group.prompt_ids) + list(c[:cap + 1]) for c in group.completions]
    assert _distinct_prefixes(longer) > budget
    (batch,) = make_loss_batches([cut], budget, "po")
    assert batch.packed.tree_tokens <= budget


def test_truncate_never_cuts_the_prompt():
    group = CompletionGroup(list(range(10)), [[20, 21], [22, 23]], key=GroupKey("rec-long-prompt", "po"))
    with pytest.raises(ValueError, match=r"record 'rec-long-prompt'.*prompt 10 tokens.*never truncated"):
        fit_to_budget(group, token_budget=11, truncate=True)
    # a hand-worked case: prompt 10 + two branches of 1 token = 12 tokens
    cut = fit_to_budget(group, token_budget=13, truncate=True)
    assert [list(c) for c in cut.completions] == [[20], [22]]


# ---------------------------------------------------------------- epoch order


def test_epoch_order_is_a_deterministic_permutation_per_epoch():
    n = 40
    orders = [epoch_order(n, seed=7, epoch=e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert orders[0] != orders[1] != orders[2]
    assert epoch_order(n, seed=8, epoch=0) != orders[0]
    random.seed(123)  # the global RNG plays no part: a resumed process gets the same order
    torch.manual_seed(123)
    assert epoch_order(n, seed=7, epoch=1) == orders[1]
    assert epoch_order(0, seed=7, epoch=0) == []
