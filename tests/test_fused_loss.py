"""FusedTokenPOLoss equals the torch reference (logits → log_softmax → gather → objective) on a tiny model.

The reference runs in float64 from the model's full logits; the fused path runs from the final hidden
states through the fused-linear op in float32. Losses and LoRA gradients must agree.
"""

import dataclasses

import pytest
import torch

from pvfast import FusedTokenPOLoss, causal_lm_rows
from pvfast.data.jsonfmt import serialize
from pvfast.data.prompt import PromptTemplate, build_prompt
from pvfast.data.roles import ROLE_CODE, ROLE_SCAFFOLD, ROLE_SPAN, ROLE_SUBCODE
from pvfast.data.synth import generate_corpus
from pvfast.data.tokenization import tokenize_pair_group
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.objectives.config import ClassBalanceConfig, DpoConfig, TabpoConfig, TokenWeightConfig, default_config
from pvfast.objectives.fused_loss import ScoringRows
from pvfast.objectives.losses import PairIndex, compute_objective, stats_from_padded
from pvfast.objectives.weights import token_weights
from pvfast.packing.padded import collate_pair_groups
from pvfast.testing import activate_lora, load_tiny_model

IGNORE = -100
# Exactness does not depend on the prompt's length; a short template keeps the test fast.
SHORT_TEMPLATE = PromptTemplate("Extract the PV-Miner triples.\nINPUT: TO_PAT_YN: {direction}\nContext: {message}"
                                "\n\n\nOUTPUT:", source="test template")


def _batch(tokenizer, n_examples=2):
    """Padded rows [chosen for pair 1, rejected 1, chosen for pair 2, ...] (pvfast.packing.padded)."""
    examples = [e for e in generate_corpus(n=40, seed=3) if len(e.annotations) >= 2][:n_examples]
    groups = []
    for ex in examples:
        anns = list(ex.annotations)
        rejected = [serialize(anns[:-1]),  # one triple missing
                    serialize([dataclasses.replace(anns[0], span=anns[0].span[: max(1, len(anns[0].span) // 2)])]
                              + anns[1:])]  # a shortened span
        groups.append(tokenize_pair_group(tokenizer, build_prompt(tokenizer, ex.direction, ex.message, SHORT_TEMPLATE),
                                          serialize(anns), rejected))
    b = collate_pair_groups(groups, tokenizer.pad_token_id)
    return b.input_ids, b.attention_mask, b.labels, (b.token_roles, b.token_diff), b.pairs


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    tokenizer = load_tiny_tokenizer("llama")
    # eval: no LoRA dropout, both paths see one network; adapters off zero so policy and reference differ
    model = activate_lora(load_tiny_model("llama", lora=True).eval())
    return tokenizer, model, _batch(tokenizer)


def _reference(model, input_ids, attention, labels, roles_diff, pairs, objective, config):
    """Float64 reference: full logits, log_softmax, gather, padded stats, objective."""
    tau = config.gate_tau
    mask = labels[:, 1:] != IGNORE
    roles, diff = roles_diff
    w = token_weights(roles[:, 1:], diff[:, 1:], config).double()

    def stats(logits):
        logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
        return stats_from_padded(logp, w, mask, tau)

    ref = None
    if objective not in ("simpo", "sft"):
        with torch.no_grad(), model.disable_adapter():
            ref = stats(model(input_ids=input_ids, attention_mask=attention).logits)
    policy = stats(model(input_ids=input_ids, attention_mask=attention).logits)
    return compute_objective(objective, policy, ref, pairs, None, config)


def _fused(model, input_ids, attention, labels, roles_diff, pairs, objective, config, impl):
    loss_fn = FusedTokenPOLoss(objective, config, impl=impl)
    base = model.get_base_model()
    head = base.lm_head.weight

    def rows():
        hidden = base.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        return causal_lm_rows(hidden, labels, *roles_diff)

    ref_stats = None
    if loss_fn.needs_reference:
        with torch.no_grad(), model.disable_adapter():
            ref_stats = loss_fn.statistics(rows(), head)
    return loss_fn(rows(), head, pairs=pairs, ref_stats=ref_stats)


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CASES = [("tabpo", TabpoConfig()), ("tabpo", TabpoConfig.from_preset("paper")), ("dpo", None), ("simpo", None),
         ("sft", None)]


@pytest.mark.parametrize("impl", ["cpp", "triton", "torch"])
@pytest.mark.parametrize("objective,config", CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CASES)])
def test_fused_loss_matches_reference(setup, objective, config, impl):
    if impl == "cpp":
        pytest.importorskip("pvfast._C", reason="C++ extension not built")
    tokenizer, model, (input_ids, attention, labels, weights, pairs) = setup
    config = config or default_config(objective)
    if objective == "sft":
        pairs_arg = None  # SFT over every completion row
    else:
        pairs_arg = pairs

    model.zero_grad(set_to_none=True)
    ref = _reference(model, input_ids, attention, labels, weights, pairs_arg, objective, config)
    ref.loss.backward()
    ref_grads = _lora_grads(model)

    model.zero_grad(set_to_none=True)
    out = _fused(model, input_ids, attention, labels, weights, pairs_arg, objective, config, impl)
    out.loss.backward()
    grads = _lora_grads(model)

    assert out.loss.dtype == torch.float32
    # The fused path is fp32 and blocks the lm_head matmul differently from the model's own lm_head:
    # per-token ℓ agree to ~1e-6, and summed scores (DPO) add ~200 of them (|ℓ| ≈ 8) per pair, so the
    # loss agrees to a few 1e-5 relative; mean-based scores agree tighter.
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=5e-5, atol=1e-5)
    # Per-token ℓ agree to ~1e-6 (checked by hand: max 1.2e-6 over 790 tokens), but the Triton and torch
    # backends accumulate each completion's Σℓ (≈ −800 over ~100 tokens) in fp32, whose rounding is
    # ~1e-4 per sum; summed-score margins and rewards combine four such sums: absolute 5e-4.
    for key, value in ref.metrics.items():
        torch.testing.assert_close(out.metrics[key].double(), value.double(), rtol=1e-4, atol=5e-4,
                                   msg=lambda m, key=key: f"metric {key}: {m}")
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp(min=1e-8)
        assert (g.double() - ref_grads[name].double()).abs().max() / scale < 1e-4, name
    assert any(g.abs().max() > 0 for g in grads.values())


def test_gate_is_active_in_the_fixture(setup):
    """The TAB-PO cases above exercise the barrier: some chosen tokens fall under log τ."""
    _, model, (input_ids, attention, labels, weights, pairs) = setup
    with torch.no_grad():
        out = _fused(model, input_ids, attention, labels, weights, pairs, "tabpo", TabpoConfig(), "torch")
    assert 0 < out.metrics["gated_fraction"] <= 1
    assert out.metrics["loss_barrier"] > 0


def test_causal_lm_rows_layout():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8], [IGNORE, 5, 6, IGNORE]])
    rows = causal_lm_rows(hidden, labels)
    # Row b, position t predicts labels[b, t+1]: (0,1)->7, (0,2)->8, (1,0)->5, (1,1)->6.
    assert rows.hidden[:, 0].tolist() == [1.0, 2.0, 4.0, 5.0]
    assert rows.targets.tolist() == [7, 8, 5, 6]
    assert rows.segment_ids.tolist() == [0, 0, 1, 1]
    assert rows.num_segments == 2
    with pytest.raises(ValueError, match="labels"):
        causal_lm_rows(hidden, labels[:, :3])


def test_wrong_config_type():
    with pytest.raises(TypeError, match="TabpoConfig"):
        FusedTokenPOLoss("tabpo", default_config("dpo"))
    with pytest.raises(KeyError, match="unknown objective"):
        FusedTokenPOLoss("orpo")


def _toy_rows(records=("a", "a", "b", "b")):
    g = torch.Generator().manual_seed(0)
    roles = torch.tensor([ROLE_SCAFFOLD, ROLE_SPAN, ROLE_CODE, ROLE_SUBCODE, ROLE_SPAN, ROLE_SCAFFOLD, ROLE_CODE,
                          ROLE_SPAN], dtype=torch.int8)
    return ScoringRows(hidden=torch.randn(8, 16, generator=g), targets=torch.randint(0, 32, (8,), generator=g),
                       roles=roles, diff=torch.tensor([0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool),
                       segment_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), num_segments=4, segment_records=records)


def test_weight_settings_and_class_weights_apply_at_loss_time():
    """Nothing is re-tokenized or re-packed: the same rows scored under another token-weight setting give the
    statistics of those weights, and class weights are looked up by each pair's record."""
    rows, weight = _toy_rows(), torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    pairs = PairIndex(torch.tensor([0, 2]), torch.tensor([1, 3]))
    logp = torch.log_softmax(rows.hidden.double() @ weight.double().T, -1).gather(1, rows.targets[:, None])[:, 0]
    for config in (TabpoConfig(), TabpoConfig(token_weights=TokenWeightConfig(w_span=3.0, w_diff=2.0)),
                   TabpoConfig(token_weighting=False)):
        stats = FusedTokenPOLoss("tabpo", config, impl="torch").statistics(rows, weight)
        w = token_weights(rows.roles, rows.diff, config).double()
        expected = torch.zeros(4, dtype=torch.float64).index_add_(0, rows.segment_ids, w * logp)
        torch.testing.assert_close(stats[:, 1].double(), expected, rtol=1e-5, atol=1e-5)  # Σ w ℓ
    cb = DpoConfig(class_balance=ClassBalanceConfig(enabled=True))
    ref = FusedTokenPOLoss("dpo", impl="torch").statistics(rows, weight * 0.9)
    balanced = FusedTokenPOLoss("dpo", cb, impl="torch", class_weights={"a": 2.0, "b": 0.5})
    explicit = FusedTokenPOLoss("dpo", cb, impl="torch")(rows, weight, pairs, ref,
                                                        example_weights=torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(balanced(rows, weight, pairs, ref).loss, explicit.loss)
    assert balanced(rows, weight, pairs, ref).normalizer.item() == pytest.approx(2.5)
    with pytest.raises(KeyError, match="'b'"):
        FusedTokenPOLoss("dpo", cb, impl="torch", class_weights={"a": 2.0})(rows, weight, pairs, ref)


def test_class_balance_setting_and_weights_must_agree():
    """Class balance is on exactly when weights exist: a config that asks for it without weights, or weights
    without the config asking, is an error (the published paper_b085 preset must never train with c = 1)."""
    rows, weight = _toy_rows(), torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    pairs = PairIndex(torch.tensor([0, 2]), torch.tensor([1, 3]))
    b085 = FusedTokenPOLoss("tabpo", TabpoConfig.from_preset("paper_b085"), impl="torch")
    ref = b085.statistics(rows, weight * 0.9)
    with pytest.raises(ValueError, match="class balance is enabled.*no class_weights"):
        b085(rows, weight, pairs, ref)
    with pytest.raises(ValueError, match="class balance is off"):
        FusedTokenPOLoss("dpo", impl="torch", class_weights={"a": 2.0, "b": 0.5})
    with pytest.raises(ValueError, match="class balance is off"):
        FusedTokenPOLoss("dpo", impl="torch")(rows, weight, pairs, ref, example_weights=torch.tensor([2.0, 0.5]))
