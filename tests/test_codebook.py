"""The codebook: counts, direction rules and case/whitespace-insensitive lookup (SPEC §1)."""

import pytest

from pvfast.data import codebook as cb

# Written out from SPEC §1 independently of the module under test.
PROVIDER_CODES = {"SDOH", "SocioEmotionalBehaviour", "PartnershipProvider", "SharedDecisionProvider",
                  "CareCoordinationProvider"}
PATIENT_CODES = {"SDOH", "SocioEmotionalBehaviour", "PartnershipPatient", "SharedDecisionPatient",
                 "CareCoordinationPatient"}


def test_counts():
    assert len(cb.CODES) == 8
    assert len(cb.SUBCODE_PAIRS) == 33
    assert len(set(cb.SUBCODE_PAIRS)) == 33
    assert len(cb.SUBCODES) == 26
    assert len(cb.ANNOTATION_PAIRS) == 36  # 33 + (code, "None") for the 3 codes without sub-codes


def test_codes_without_subcodes_carry_none():
    no_sub = {c for c in cb.CODES if not cb.has_subcodes(c)}
    assert no_sub == {"SocioEmotionalBehaviour", "CareCoordinationProvider", "CareCoordinationPatient"}
    for code in no_sub:
        assert cb.valid_subcodes(code) == ("None",)
        assert cb.is_valid_pair(code, "None")
        assert not cb.is_valid_pair(code, "Clinical Care")
    assert not cb.is_valid_pair("SDOH", "None")


def test_canonical_strings_kept_verbatim():
    assert "inviteCollabration" in cb.CODEBOOK["PartnershipProvider"]  # sic, the published string
    assert "inviteCollaboration" not in cb.SUBCODES
    assert cb.is_valid_pair("PartnershipPatient", "Clinical Care")
    assert cb.is_valid_pair("PartnershipProvider", "Clinical Care")
    assert not cb.is_valid_pair("PartnershipPatient", "inviteCollabration")
    assert not cb.is_valid_pair("SharedDecisionPatient", "Approval/Reinforcement")
    assert cb.is_valid_pair("SharedDecisionProvider", "Approval/Reinforcement")


@pytest.mark.parametrize("direction,expected", [("Y", PROVIDER_CODES), ("N", PATIENT_CODES)])
def test_direction_rules(direction, expected):
    assert set(cb.codes_for_direction(direction)) == expected
    for code in cb.CODES:
        assert cb.code_allowed(code, direction) == (code in expected)


def test_bad_direction():
    with pytest.raises(ValueError, match="direction must be one of"):
        cb.codes_for_direction("yes")


@pytest.mark.parametrize("raw,canonical", [
    ("Clinical care", "Clinical Care"), ("  clinical   CARE ", "Clinical Care"), ("SIGNOFF", "signoff"),
    ("build  Trust", "build trust"), ("none", "None"), ("Appreciation / Gratitude", "Appreciation/Gratitude"),
])
def test_subcode_lookup_is_case_and_whitespace_insensitive(raw, canonical):
    assert cb.canonical_subcode(raw) == canonical


def test_code_lookup():
    assert cb.canonical_code("sdoh") == "SDOH"
    assert cb.canonical_code("Socio Emotional Behaviour") == "SocioEmotionalBehaviour"
    assert cb.canonical_code("SocioEmotionalBehavior") is None  # spelling differs, not just case/space
    assert cb.canonical_code(None) is None
    assert cb.canonical_subcode("Clinical") is None


def test_published_counts_cover_codebook():
    assert set(cb.PUBLISHED_SUBCODE_COUNTS) == set(cb.SUBCODES)
    assert sum(cb.PUBLISHED_SUBCODE_COUNTS.values()) == 4037
    assert set(cb.PUBLISHED_CODE_COUNTS) == set(cb.CODES)
