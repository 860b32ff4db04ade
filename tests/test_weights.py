"""Token weights from roles and diff flags (SPEC §2), made by the objective at loss time, in one place.

Hand-worked against the SPEC table; plus the property the design exists for: changing a weight setting
changes the statistics of an already-packed batch, with no re-tokenization.
"""

from __future__ import annotations

import math

import pytest
import torch

from pvfast.data.roles import ROLE_CODE, ROLE_PROMPT, ROLE_SCAFFOLD, ROLE_SPAN, ROLE_SUBCODE
from pvfast.objectives.config import DpoConfig, SftConfig, TabpoConfig, TokenWeightConfig
from pvfast.objectives.weights import token_weights

# SPEC §2 defaults written out by hand (not read from TokenWeightConfig): role -> weight.
SPEC_ROLE_WEIGHT = {ROLE_SCAFFOLD: 1.0, ROLE_CODE: 1.1, ROLE_SUBCODE: 1.2, ROLE_SPAN: 1.1}
SPEC_W_DIFF = 1.2
ROLES = torch.tensor([ROLE_SCAFFOLD, ROLE_CODE, ROLE_SUBCODE, ROLE_SPAN, ROLE_SPAN, ROLE_SCAFFOLD], dtype=torch.int8)
DIFF = torch.tensor([False, True, False, True, False, True])


def test_token_weights_match_the_spec_table():
    expected = [SPEC_ROLE_WEIGHT[int(r)] * (SPEC_W_DIFF if d else 1.0) for r, d in zip(ROLES, DIFF)]
    got = token_weights(ROLES, DIFF, TabpoConfig())
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(expected, rel=1e-7)
    # Without diff flags: the role table alone.
    assert token_weights(ROLES, None, TabpoConfig()).tolist() == pytest.approx(
        [SPEC_ROLE_WEIGHT[int(r)] for r in ROLES], rel=1e-7)


def test_a_role_weight_below_scaffold_is_lifted_to_it():
    config = TabpoConfig(token_weights=TokenWeightConfig(w_code=0.5, w_diff=2.0))
    assert token_weights(ROLES, None, config).tolist() == pytest.approx([1.0, 1.0, 1.2, 1.1, 1.1, 1.0], rel=1e-7)
    assert token_weights(ROLES, DIFF, config).tolist() == pytest.approx([1.0, 2.0, 1.2, 2.2, 1.1, 2.0], rel=1e-7)


def test_token_weighting_off_gives_ones_whatever_the_roles():
    for config in (TabpoConfig(token_weighting=False), DpoConfig(), SftConfig(token_weighting=False)):
        assert token_weights(ROLES, DIFF, config).tolist() == [1.0] * len(ROLES)


def test_prompt_role_weighs_nothing_and_bad_roles_are_refused():
    roles = torch.tensor([ROLE_PROMPT, ROLE_SPAN], dtype=torch.int8)
    assert token_weights(roles, torch.tensor([True, True]), TabpoConfig()).tolist() == pytest.approx([0.0, 1.32])
    with pytest.raises(ValueError, match="role ids must lie in"):
        token_weights(torch.tensor([7]), None, TabpoConfig())
    with pytest.raises(ValueError, match="diff flags"):
        token_weights(ROLES, DIFF[:3], TabpoConfig())


@pytest.mark.parametrize("field", ["w_scaffold", "w_code", "w_subcode", "w_span", "w_diff"])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_token_weight_config_rejects_bad_weights(field, bad):
    with pytest.raises(ValueError, match=f"TokenWeightConfig.{field} must be a finite number > 0"):
        TokenWeightConfig(**{field: bad})


def test_statistics_settings_follow_what_shapes_the_statistics():
    released = TabpoConfig().statistics_settings()
    assert released["gate_tau"] == 0.66 and released["token_weighting"] is True
    assert released["token_weights"]["w_diff"] == 1.2
    # A setting the statistics do not depend on (β) leaves them unchanged; token weights and τ do not.
    assert TabpoConfig(beta=0.1).statistics_settings() == released
    assert TabpoConfig(tau=0.5).statistics_settings() != released
    assert TabpoConfig(token_weights=TokenWeightConfig(w_span=1.5)).statistics_settings() != released
    # With token weighting off the weights are not used, so they are not part of the settings.
    off = DpoConfig().statistics_settings()
    assert off == {"gate_tau": 1.0, "token_weighting": False}
    assert DpoConfig(token_weights=TokenWeightConfig(w_span=3.0)).statistics_settings() == off


def test_token_weighting_with_an_unweighted_score_is_refused():
    """DPO-style scores "sum" and "mean" never read the weighted columns: TW on would silently do nothing."""
    with pytest.raises(ValueError, match="DpoConfig.token_weighting must be false with score 'sum'"):
        DpoConfig(token_weighting=True)
    assert DpoConfig(token_weighting=True, score="weighted_mean").token_weighting
