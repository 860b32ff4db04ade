"""The exact objectives (SPEC §3) against hand-worked values, published formulas and finite differences."""

import math

import pytest
import torch
import torch.nn.functional as F

from pvfast.objectives.config import (
    PRESETS,
    CalDpoConfig,
    ClassBalanceConfig,
    DpoConfig,
    DpoPositiveConfig,
    IpoConfig,
    SftConfig,
    SimpoConfig,
    TabpoConfig,
    TokenWeightConfig,
    default_config,
)
from pvfast.objectives.losses import (
    OBJECTIVES,
    CompletionStats,
    PairIndex,
    compute_objective,
    repeat_per_pair,
    stats_from_padded,
    tabpo_terms,
)

F64 = torch.float64
CB_ON = ClassBalanceConfig(enabled=True)


def softplus(x):
    """−log σ(−x) = log(1 + e^x), written out for the hand-worked values."""
    return math.log(1.0 + math.exp(x))


# --------------------------------------------------------------------------------------------------
# A tiny batch worked by hand: 2 prompts, one pair each; rows [chosen A, rejected A, chosen B, rejected B]
# --------------------------------------------------------------------------------------------------

TAU = 0.5  # log τ = −0.693: tokens with ℓ < −0.693 are gated

POLICY = [[-0.1, -1.0, -2.0], [-0.5, -1.5, 0.0], [-0.2, -0.3, -3.0], [-0.4, -0.6, -0.8]]
REF = [[-0.2, -1.2, -1.8], [-0.4, -1.0, 0.0], [-0.3, -0.5, -2.0], [-0.5, -0.5, -0.7]]
WEIGHTS = [[1.0, 2.0, 1.0], [1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 1.0, 2.0]]
MASK = [[True, True, True], [True, True, False], [True, True, True], [True, True, True]]

# Weighted means s = Σwℓ/Σw
S_POL = [(1 * -0.1 + 2 * -1.0 + 1 * -2.0) / 4, (-0.5 - 1.5) / 2,
         (2 * -0.2 - 0.3 - 3.0) / 4, (-0.4 - 0.6 + 2 * -0.8) / 4]  # -1.025, -1.0, -0.925, -0.65
S_REF = [(1 * -0.2 + 2 * -1.2 + 1 * -1.8) / 4, (-0.4 - 1.0) / 2,
         (2 * -0.3 - 0.5 - 2.0) / 4, (-0.5 - 0.5 + 2 * -0.7) / 4]  # -1.1, -0.7, -0.775, -0.6
H_A = (S_POL[0] - S_POL[1]) - (S_REF[0] - S_REF[1])  # 0.375
H_B = (S_POL[2] - S_POL[3]) - (S_REF[2] - S_REF[3])  # -0.1
# Barriers of the chosen rows, n = 3, Σw = 4, so w̃ = 0.75 w.
# A: gated −1.0 (w 2) and −2.0 (w 1): 0.75·(2·1.0 + 1·2.0) / max(1, 0.75·3) = 3 / 2.25
BAR_A = (0.75 * (2 * 1.0 + 1 * 2.0)) / max(1.0, 0.75 * (2 + 1))
# B: only −3.0 (w 1) is gated: 0.75·3.0 / max(1, 0.75) = 2.25 (the clamp binds)
BAR_B = (0.75 * (1 * 3.0)) / max(1.0, 0.75 * 1)
# Summed log-probs
SUM_POL = [-0.1 - 1.0 - 2.0, -0.5 - 1.5, -0.2 - 0.3 - 3.0, -0.4 - 0.6 - 0.8]  # -3.1, -2.0, -3.5, -1.8
SUM_REF = [-0.2 - 1.2 - 1.8, -0.4 - 1.0, -0.3 - 0.5 - 2.0, -0.5 - 0.5 - 0.7]  # -3.2, -1.4, -2.8, -1.7
RW_A, RL_A = SUM_POL[0] - SUM_REF[0], SUM_POL[1] - SUM_REF[1]  # 0.1, -0.6
RW_B, RL_B = SUM_POL[2] - SUM_REF[2], SUM_POL[3] - SUM_REF[3]  # -0.7, -0.1


def _tiny(requires_grad=False):
    logp = torch.tensor(POLICY, dtype=F64, requires_grad=requires_grad)
    mask = torch.tensor(MASK)
    weights = torch.tensor(WEIGHTS, dtype=F64)
    policy = stats_from_padded(logp, weights, mask, TAU)
    ref = stats_from_padded(torch.tensor(REF, dtype=F64), weights, mask, TAU)
    return logp, policy, ref, PairIndex.from_groups([1, 1])


def test_tabpo_hand_worked_with_metrics():
    _, policy, ref, pairs = _tiny()
    cfg = TabpoConfig(beta=0.5, tau=TAU, barrier_weight=0.5)
    out = compute_objective("tabpo", policy, ref, pairs, None, cfg)
    pref = (softplus(-0.5 * H_A) + softplus(-0.5 * H_B)) / 2
    bar = (BAR_A + BAR_B) / 2
    assert out.loss.item() == pytest.approx(pref + 0.5 * bar, rel=1e-12)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["loss_pref"] == pytest.approx(pref, rel=1e-12)
    assert m["loss_barrier"] == pytest.approx(bar, rel=1e-12)
    assert m["margin"] == pytest.approx((H_A + H_B) / 2, rel=1e-12)
    assert m["reward_accuracy"] == 0.5  # h_A > 0, h_B < 0
    assert m["reward_chosen"] == pytest.approx(0.5 * ((S_POL[0] - S_REF[0]) + (S_POL[2] - S_REF[2])) / 2)
    assert m["reward_rejected"] == pytest.approx(0.5 * ((S_POL[1] - S_REF[1]) + (S_POL[3] - S_REF[3])) / 2)
    assert m["gated_fraction"] == pytest.approx((2 + 1) / (3 + 3))
    assert m["chosen_logp_mean"] == pytest.approx((SUM_POL[0] + SUM_POL[2]) / 6)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())


def test_tabpo_hand_worked_switches():
    _, policy, ref, pairs = _tiny()
    c = torch.tensor([2.0, 1.0], dtype=F64)
    cb = TabpoConfig(tau=TAU, class_balance=CB_ON)
    expected = ((2 * softplus(-0.5 * H_A) + softplus(-0.5 * H_B)) / 3
                + 0.5 * (2 * BAR_A + BAR_B) / 3)
    assert compute_objective("tabpo", policy, ref, pairs, c, cb).loss.item() == pytest.approx(expected, rel=1e-12)
    # No example weights: c = 1 (class balance off is the absence of weights, not a config re-check).
    off = compute_objective("tabpo", policy, ref, pairs, None, TabpoConfig(tau=TAU)).loss.item()
    assert off == pytest.approx((softplus(-0.5 * H_A) + softplus(-0.5 * H_B)) / 2 + 0.5 * (BAR_A + BAR_B) / 2,
                                rel=1e-12)
    # CG off: the preference term alone.
    no_gate = compute_objective("tabpo", policy, ref, pairs, None, TabpoConfig(tau=TAU, confidence_gate=False))
    assert no_gate.loss.item() == pytest.approx((softplus(-0.5 * H_A) + softplus(-0.5 * H_B)) / 2, rel=1e-12)
    # No w̃ rescaling: A: (2·1 + 1·2) / max(1, 3) = 4/3; B: 3.0 / max(1, 1) = 3.
    raw = compute_objective("tabpo", policy, ref, pairs, None,
                            TabpoConfig(tau=TAU, normalize_barrier_weights=False)).metrics["loss_barrier"]
    assert raw.item() == pytest.approx(((2 * 1.0 + 1 * 2.0) / 3 + 3.0 / 1) / 2, rel=1e-12)


def test_baselines_hand_worked():
    _, policy, ref, pairs = _tiny()

    def loss(name, cfg):
        r = ref if OBJECTIVES[name].needs_reference else None
        return compute_objective(name, policy, r, pairs, None, cfg).loss.item()

    h_a, h_b = RW_A - RL_A, RW_B - RL_B  # 0.7, -0.6
    assert loss("dpo", DpoConfig(beta=0.1)) == pytest.approx(
        (softplus(-0.1 * h_a) + softplus(-0.1 * h_b)) / 2, rel=1e-12)
    assert loss("ipo", IpoConfig(beta=0.1)) == pytest.approx(((h_a - 5.0) ** 2 + (h_b - 5.0) ** 2) / 2, rel=1e-12)
    # Cal-DPO with β = 0.5: targets ±1/(2β) = ±1
    cal_a = softplus(-(RW_A - RL_A)) + (RW_A - 1.0) ** 2 + (RL_A + 1.0) ** 2
    cal_b = softplus(-(RW_B - RL_B)) + (RW_B - 1.0) ** 2 + (RL_B + 1.0) ** 2
    assert loss("cal_dpo", CalDpoConfig(beta=0.5)) == pytest.approx((cal_a + cal_b) / 2, rel=1e-12)
    # DPOP: r_w(A) = 0.1 > 0 gives no penalty; r_w(B) = −0.7 gives h − 0.7
    dpop_a = softplus(-0.1 * (h_a - 0.0))
    dpop_b = softplus(-0.1 * (h_b - 1.0 * 0.7))
    assert loss("dpo_positive", DpoPositiveConfig(beta=0.1, lambda_p=1.0)) == pytest.approx(
        (dpop_a + dpop_b) / 2, rel=1e-12)
    # SimPO (β 2, γ 0.5) on length-averaged policy log-probs
    mean_pol = [SUM_POL[0] / 3, SUM_POL[1] / 2, SUM_POL[2] / 3, SUM_POL[3] / 3]
    simpo = (softplus(-(2.0 * (mean_pol[0] - mean_pol[1]) - 0.5))
             + softplus(-(2.0 * (mean_pol[2] - mean_pol[3]) - 0.5))) / 2
    assert loss("simpo", SimpoConfig()) == pytest.approx(simpo, rel=1e-12)


def test_sft_hand_worked():
    _, policy, _, pairs = _tiny()
    wnll = [1 * 0.1 + 2 * 1.0 + 1 * 2.0, 0.5 + 1.5, 2 * 0.2 + 0.3 + 3.0, 0.4 + 0.6 + 2 * 0.8]  # 4.1 2.0 3.7 2.6
    wsum = [4.0, 2.0, 4.0, 4.0]
    token = compute_objective("sft", policy, None, None, None, SftConfig(reduction="token"))
    assert token.loss.item() == pytest.approx(sum(wnll) / sum(wsum), rel=1e-12)
    seq = compute_objective("sft", policy, None, None, None, SftConfig(reduction="sequence"))
    assert seq.loss.item() == pytest.approx(sum(n / w for n, w in zip(wnll, wsum)) / 4, rel=1e-12)
    # With pairs, the targets are the chosen rows; example weights per pair when CB is on.
    chosen = compute_objective("sft", policy, None, pairs, torch.tensor([3.0, 1.0], dtype=F64),
                               SftConfig(class_balance=CB_ON))
    assert chosen.loss.item() == pytest.approx((3 * wnll[0] + wnll[2]) / (3 * wsum[0] + wsum[2]), rel=1e-12)
    assert chosen.metrics["logp_mean"].item() == pytest.approx((SUM_POL[0] + SUM_POL[2]) / 6)


# --------------------------------------------------------------------------------------------------
# Random batches
# --------------------------------------------------------------------------------------------------


def _random_batch(groups=(3, 1, 2), length=6, tau=0.66, seed=0):
    """Per-token inputs for prompts with ``groups`` rejected each (rows [c, r_1..r_k] per prompt)."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(1 + k for k in groups)
    logp = -torch.rand(rows, length, generator=g, dtype=F64) * 2.5
    # Keep every token clear of the gate threshold so finite differences never cross it.
    near = (logp - math.log(tau)).abs() < 0.05
    logp = torch.where(near, logp - 0.1, logp)
    ref = logp + 0.3 * torch.randn(rows, length, generator=g, dtype=F64)
    ref = ref.clamp_max(-1e-3)
    weights = 1.0 + torch.rand(rows, length, generator=g, dtype=F64)
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    pairs = PairIndex.from_groups(list(groups))
    c = 0.5 + torch.rand(pairs.num_pairs, generator=g, dtype=F64)
    return logp, ref, weights, mask, pairs, c


def _config(name, **kwargs):
    return type(default_config(name))(**kwargs)


def test_tabpo_without_weights_gate_or_balance_is_dpo_on_mean_logps():
    logp, ref_logp, weights, mask, pairs, _ = _random_batch()
    cfg = TabpoConfig(token_weighting=False, confidence_gate=False)
    policy = stats_from_padded(logp, None, mask, cfg.tau)  # token weighting off: every weight is 1
    ref = stats_from_padded(ref_logp, None, mask, cfg.tau)
    got = compute_objective("tabpo", policy, ref, pairs, None, cfg).loss

    m = mask.to(F64)
    mean_pol = (logp * m).sum(-1) / m.sum(-1)
    mean_ref = (ref_logp * m).sum(-1) / m.sum(-1)
    c, r = pairs.chosen, pairs.rejected
    logits = (mean_pol[c] - mean_pol[r]) - (mean_ref[c] - mean_ref[r])
    expected = -F.logsigmoid(cfg.beta * logits).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    dpo_mean = compute_objective("dpo", policy, ref, pairs, None, DpoConfig(beta=cfg.beta, score="mean")).loss
    torch.testing.assert_close(got, dpo_mean, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_matches_trl_sigmoid_formula(seed):
    logp, ref_logp, weights, mask, pairs, _ = _random_batch(seed=seed)
    beta = 0.1
    policy = stats_from_padded(logp, weights, mask, 0.66)
    ref = stats_from_padded(ref_logp, weights, mask, 0.66)
    got = compute_objective("dpo", policy, ref, pairs, None, DpoConfig(beta=beta)).loss
    # TRL DPOTrainer, loss_type="sigmoid", label_smoothing=0: −logsigmoid(β((π_c − π_r) − (ref_c − ref_r)))
    m = mask.to(F64)
    pi, rf = (logp * m).sum(-1), (ref_logp * m).sum(-1)
    c, r = pairs.chosen, pairs.rejected
    expected = -F.logsigmoid(beta * ((pi[c] - pi[r]) - (rf[c] - rf[r]))).mean()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_gate_gradient_is_exactly_zero_and_barrier_touches_only_gated_chosen_tokens():
    tau = 0.66
    logp, ref_logp, weights, mask, pairs, _ = _random_batch(tau=tau)
    logp[pairs.chosen, 0] = -0.05  # a confident token in every chosen completion: above the threshold
    logp.requires_grad_(True)
    cfg = TabpoConfig(tau=tau)
    policy = stats_from_padded(logp, weights, mask, tau)
    ref = stats_from_padded(ref_logp, weights, mask, tau)
    terms = tabpo_terms(CompletionStats(policy), CompletionStats(ref), pairs, cfg)
    (grad,) = torch.autograd.grad(terms.barrier.sum(), logp)

    chosen_rows = torch.zeros(logp.shape[0], dtype=torch.bool)
    chosen_rows[pairs.chosen] = True
    gated = mask & (logp.detach() < math.log(tau))
    assert gated[chosen_rows].any() and (mask & ~gated)[chosen_rows].any()
    # Rejected rows, ungated chosen tokens and padding get exactly zero barrier gradient.
    assert torch.all(grad[~chosen_rows] == 0)
    assert torch.all(grad[chosen_rows & ~gated.any(1)] == 0)
    assert torch.all(grad[~gated] == 0)
    # Gated chosen tokens: d/dℓ_t Σ_pairs L_bar = −(#pairs sharing the row) · w̃_t / max(1, Σ w̃ g)
    for row in pairs.chosen.unique().tolist():
        k = int((pairs.chosen == row).sum())
        w = weights[row][mask[row]]
        g = gated[row][mask[row]]
        scale = w.numel() / w.sum()
        den = max(1.0, float((scale * w * g).sum()))
        expected = -k * scale * w / den
        torch.testing.assert_close(grad[row][mask[row]][g], expected[g], rtol=1e-12, atol=0)

    # The full loss: rejected tokens see the same gradient with and without the barrier.
    def full_grad(config):
        return torch.autograd.grad(compute_objective("tabpo", stats_from_padded(logp, weights, mask, tau), ref,
                                                     pairs, None, config).loss, logp)[0]

    with_gate, without_gate = full_grad(cfg), full_grad(TabpoConfig(tau=tau, confidence_gate=False))
    torch.testing.assert_close(with_gate[~chosen_rows], without_gate[~chosen_rows], rtol=1e-13, atol=0)
    assert not torch.allclose(with_gate[chosen_rows], without_gate[chosen_rows])


GRAD_CONFIGS = {
    "tabpo": TabpoConfig(class_balance=CB_ON),
    "dpo": DpoConfig(class_balance=CB_ON),
    "ipo": IpoConfig(class_balance=CB_ON),
    "cal_dpo": CalDpoConfig(class_balance=CB_ON),
    "dpo_positive": DpoPositiveConfig(class_balance=CB_ON),
    "simpo": SimpoConfig(class_balance=CB_ON),
    "sft": SftConfig(class_balance=CB_ON),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradcheck_wrt_token_logps(name):
    logp, ref_logp, weights, mask, pairs, c = _random_batch()
    cfg = GRAD_CONFIGS[name]
    ref = stats_from_padded(ref_logp, weights, mask, 0.66) if OBJECTIVES[name].needs_reference else None

    def loss(lp):
        return compute_objective(name, stats_from_padded(lp, weights, mask, 0.66), ref, pairs, c, cfg).loss

    assert torch.autograd.gradcheck(loss, (logp.clone().requires_grad_(True),))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradcheck_wrt_stats(name):
    logp, ref_logp, weights, mask, pairs, c = _random_batch(seed=3)
    cfg = GRAD_CONFIGS[name]
    stats = stats_from_padded(logp, weights, mask, 0.66)
    ref = stats_from_padded(ref_logp, weights, mask, 0.66) if OBJECTIVES[name].needs_reference else None
    scale = stats[:, 3] / stats[:, 2]
    assert ((scale * stats[:, 5] - 1).abs() > 1e-3).all()  # clear of the max(1, ·) kink

    def loss(s):
        return compute_objective(name, s, ref, pairs, c, cfg).loss

    assert torch.autograd.gradcheck(loss, (stats.clone().requires_grad_(True),))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_shared_chosen_equals_duplicated_chosen(name):
    logp, ref_logp, weights, mask, _, _ = _random_batch(groups=(3,), seed=4)
    logp.requires_grad_(True)
    cfg = GRAD_CONFIGS[name]
    c = torch.tensor([0.7, 1.3, 1.0], dtype=F64)
    needs_ref = OBJECTIVES[name].needs_reference
    # Shared: rows [c, r1, r2, r3]; duplicated: rows [c, r1, c, r2, c, r3], three separate prompts.
    dup = torch.tensor([0, 1, 0, 2, 0, 3])

    def run(rows, pairs):
        policy = stats_from_padded(logp[rows], weights[rows], mask[rows], 0.66)
        ref = stats_from_padded(ref_logp[rows], weights[rows], mask[rows], 0.66) if needs_ref else None
        out = compute_objective(name, policy, ref, pairs, c, cfg)
        return out, torch.autograd.grad(out.loss, logp)[0]

    shared, g_shared = run(torch.arange(4), PairIndex.from_groups([3]))
    separate, g_separate = run(dup, PairIndex.from_groups([1, 1, 1]))
    torch.testing.assert_close(shared.loss, separate.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_shared, g_separate, rtol=1e-12, atol=1e-15)
    for key in shared.metrics:
        torch.testing.assert_close(shared.metrics[key], separate.metrics[key], rtol=1e-12, atol=1e-15)


def test_half_precision_stats_are_upcast():
    logp, ref_logp, weights, mask, pairs, _ = _random_batch()
    policy = stats_from_padded(logp, weights, mask, 0.66)
    ref = stats_from_padded(ref_logp, weights, mask, 0.66)
    exact = compute_objective("tabpo", policy, ref, pairs).loss
    low = compute_objective("tabpo", policy.bfloat16(), ref.bfloat16(), pairs).loss
    assert low.dtype == torch.float32
    # Only the bf16 rounding of the inputs remains (8 mantissa bits on sums of a few tokens).
    assert abs(low.item() - exact.item()) < 2e-2 * abs(exact.item())


def test_completion_without_scored_tokens_scores_zero():
    logp, ref_logp, weights, mask, pairs, _ = _random_batch(groups=(1, 1))
    mask = mask.clone()
    mask[1] = False  # the first rejected completion has no scored token
    lp = logp.clone().requires_grad_(True)
    policy = stats_from_padded(lp, weights, mask, 0.66)
    ref = stats_from_padded(ref_logp, weights, mask, 0.66)
    view = CompletionStats.from_tensor(policy)
    assert view.weighted_mean()[1].item() == 0.0 and view.length_averaged()[1].item() == 0.0
    for name in sorted(OBJECTIVES):
        out = compute_objective(name, policy, ref if OBJECTIVES[name].needs_reference else None, pairs)
        (grad,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), name


def test_completion_stats_view_and_scores():
    logp, _, weights, mask, _, _ = _random_batch()
    stats = stats_from_padded(logp, weights, mask, 0.66)
    view = CompletionStats.from_tensor(stats)
    m = mask.to(F64)
    torch.testing.assert_close(view.summed(), (logp * m).sum(-1))
    torch.testing.assert_close(view.length_averaged(), (logp * m).sum(-1) / m.sum(-1))
    torch.testing.assert_close(view.weighted_mean(), (logp * weights * m).sum(-1) / (weights * m).sum(-1))
    gated = m * (logp < math.log(0.66))
    torch.testing.assert_close(view.gated_count, gated.sum(-1))
    torch.testing.assert_close(view.gated_wnll_sum, (weights * gated * -logp).sum(-1))
    torch.testing.assert_close(view.score("weighted_mean"), view.weighted_mean())
    assert len(view) == logp.shape[0]


def test_repeat_per_pair_and_groups():
    pairs = PairIndex.from_groups([2, 1])
    assert pairs.chosen.tolist() == [0, 0, 3] and pairs.rejected.tolist() == [1, 2, 4]
    assert repeat_per_pair(torch.tensor([2.0, 5.0]), [2, 1]).tolist() == [2.0, 2.0, 5.0]
    with pytest.raises(ValueError, match="2 prompts"):
        repeat_per_pair(torch.tensor([1.0, 2.0, 3.0]), [2, 1])


def test_presets():
    released, paper = TabpoConfig.from_preset("released"), TabpoConfig.from_preset("paper")
    # SPEC §3 defaults of the released code and the paper's constants.
    assert (released.beta, released.tau, released.barrier_weight) == (0.5, 0.66, 0.5)
    assert released.token_weights.w_diff == 1.2 and not released.class_balance.enabled
    assert released == TabpoConfig() and PRESETS["released"] is not None
    assert (paper.tau, paper.barrier_weight, paper.token_weights.w_diff) == (0.66, 0.85, 2.0)
    assert paper.normalize_barrier_weights and not paper.class_balance.enabled
    alt = TabpoConfig.from_preset("paper_b085")
    assert alt.class_balance.enabled and alt.class_balance.b == 0.85 and alt.barrier_weight == 0.5
    assert TabpoConfig.from_preset("paper", beta=0.1).beta == 0.1
    assert isinstance(paper.token_weights, TokenWeightConfig)
    with pytest.raises(KeyError, match="unknown TAB-PO preset 'papr'"):
        TabpoConfig.from_preset("papr")
    with pytest.raises(TypeError, match="no field"):
        TabpoConfig.from_preset("paper", lambda_=0.3)


def test_input_errors():
    _, policy, ref, pairs = _tiny()
    with pytest.raises(KeyError, match="unknown objective 'orpo'"):
        compute_objective("orpo", policy, ref, pairs)
    with pytest.raises(ValueError, match=r"policy_stats: expected shape \(M, 7\)"):
        compute_objective("dpo", policy[:, :6], ref, pairs)
    with pytest.raises(ValueError, match="needs reference"):
        compute_objective("tabpo", policy, None, pairs)
    with pytest.raises(ValueError, match="reference-free"):
        compute_objective("simpo", policy, ref, pairs)
    with pytest.raises(ValueError, match="differs from policy_stats"):
        compute_objective("dpo", policy, ref[:3], pairs)
    with pytest.raises(IndexError, match="4 completions"):
        compute_objective("dpo", policy, ref, PairIndex.from_groups([1, 2]))
    with pytest.raises(ValueError, match="needs a PairIndex"):
        compute_objective("ipo", policy, ref, None)
    with pytest.raises(TypeError, match="takes a DpoConfig"):
        compute_objective("dpo", policy, ref, pairs, config=TabpoConfig())
    with pytest.raises(ValueError, match="class balance is enabled in the config but no example_weights"):
        compute_objective("dpo", policy, ref, pairs, None, DpoConfig(class_balance=CB_ON))
    with pytest.raises(ValueError, match="class balance is off"):
        compute_objective("dpo", policy, ref, pairs, torch.ones(2, dtype=F64), DpoConfig())
    with pytest.raises(ValueError, match=r"example_weights: expected shape \(2,\)"):
        compute_objective("dpo", policy, ref, pairs, torch.ones(3, dtype=F64), DpoConfig(class_balance=CB_ON))
    with pytest.raises(TypeError, match="int64"):
        PairIndex(torch.tensor([0], dtype=torch.int32), torch.tensor([1]))
    with pytest.raises(ValueError, match="differ in length"):
        PairIndex(torch.tensor([0, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="no pairs"):
        PairIndex(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="prompt 1 has 0"):
        PairIndex.from_groups([1, 0])
    with pytest.raises(TypeError, match="bool"):
        stats_from_padded(torch.zeros(2, 3), None, torch.ones(2, 3), 0.5)


@pytest.mark.parametrize("make, match", [
    (lambda: TabpoConfig(beta=0.0), "beta must be > 0"),
    (lambda: TabpoConfig(tau=1.5), "tau must be in"),
    (lambda: TabpoConfig(barrier_weight=-1.0), "barrier_weight"),
    (lambda: DpoConfig(score="max"), "score must be one of"),
    (lambda: SimpoConfig(beta=-2.0), "beta must be > 0"),
    (lambda: DpoPositiveConfig(lambda_p=-1.0), "lambda_p"),
    (lambda: SftConfig(reduction="batch"), "reduction"),
])
def test_config_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_field_types_are_checked():
    with pytest.raises(TypeError, match="token_weights"):
        TabpoConfig(token_weights={"w_diff": 2.0})
    with pytest.raises(TypeError, match="class_balance"):
        DpoConfig(class_balance=True)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_sum_and_normalizer_add_over_any_split_of_the_units(name):
    """loss = loss_sum / normalizer, and both sums add over a split of the pairs (SFT: targets), so the loss
    of several micro-batches together is Σ loss_sum / Σ normalizer (what the trainer's step computes)."""
    logp, ref_logp, weights, mask, pairs, c = _random_batch(seed=5)
    cfg = GRAD_CONFIGS[name]
    policy = stats_from_padded(logp, weights, mask, 0.66)
    ref = stats_from_padded(ref_logp, weights, mask, 0.66) if OBJECTIVES[name].needs_reference else None
    whole = compute_objective(name, policy, ref, pairs, c, cfg)
    torch.testing.assert_close(whole.loss, whole.loss_sum / whole.normalizer, rtol=1e-14, atol=0)
    first, second = slice(0, 3), slice(3, None)
    parts = [compute_objective(name, policy, ref, PairIndex(pairs.chosen[s], pairs.rejected[s]), c[s], cfg)
             for s in (first, second)]
    torch.testing.assert_close(parts[0].loss_sum + parts[1].loss_sum, whole.loss_sum, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts[0].normalizer + parts[1].normalizer, whole.normalizer, rtol=1e-12, atol=0)
    assert not whole.normalizer.requires_grad
    # Each metric mean recombines exactly from its parts with its count.
    for key, count in whole.metric_counts.items():
        if count is None:
            continue
        combined = sum(p.metrics[key] * p.metric_counts[key] for p in parts) / sum(p.metric_counts[key] for p in parts)
        torch.testing.assert_close(combined, whole.metrics[key], rtol=1e-12, atol=1e-15)
