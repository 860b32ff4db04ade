"""The PV-Miner codebook: codes, sub-codes, direction rules and label lookup.

This module is the single source of truth for label strings (SPEC §1). Everything that reads, writes,
generates or scores labels imports it; no other module spells a label out.

Written labels are always the canonical strings below. Reading is case- and whitespace-insensitive:
``canonical_subcode("clinical  care") == "Clinical Care"``.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Mapping

#: The sub-code written for codes that have none.
NONE_SUBCODE = "None"

#: Direction values of the ``TO_PAT_YN`` field.
PROVIDER_TO_PATIENT = "Y"
PATIENT_TO_PROVIDER = "N"
DIRECTIONS = (PROVIDER_TO_PATIENT, PATIENT_TO_PROVIDER)

#: Code -> its valid sub-codes, in the published order. An empty tuple means the code has no sub-codes
#: and its annotations carry ``"Sub-code": "None"``.
CODEBOOK: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "SDOH": (
        "EconomicStability",
        "EducationAccessAndQuality",
        "HealthCareAccessAndQuality",
        "NeighborhoodAndBuiltEnvironment",
        "SocialAndCommunityContext",
    ),
    "PartnershipPatient": (
        "Appreciation/Gratitude",
        "Clinical Care",
        "activeParticipation/involvement",
        "alignment",
        "build trust",
        "connection",
        "expressOpinions",
        "salutation",
        "signoff",
        "statePreferences",
    ),
    "PartnershipProvider": (
        "Appreciation/Gratitude",
        "Clinical Care",
        "acknowledgePatientExpertiseKnowledge",
        "alignment",
        "build trust",
        "checkingUnderstanding/clarification",
        "connection",
        "inviteCollabration",  # sic: the canonical string of the published data
        "maintainCommunication",
        "requestsForOpinion",
        "salutation",
        "signoff",
    ),
    "SharedDecisionPatient": (
        "ApprovalofDecision/Reinforcement",
        "ExploreOptions",
        "SeekingApproval",
    ),
    "SharedDecisionProvider": (
        "Approval/Reinforcement",
        "MakeDecision",
        "ShareOptions",
    ),
    "SocioEmotionalBehaviour": (),
    "CareCoordinationProvider": (),
    "CareCoordinationPatient": (),
})

CODES: tuple[str, ...] = tuple(CODEBOOK)

#: The 33 valid (Code, Sub-code) pairs with a real sub-code.
SUBCODE_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c, subs in CODEBOOK.items() for s in subs)

#: The 26 distinct sub-code strings, in first-seen order.
SUBCODES: tuple[str, ...] = tuple(dict.fromkeys(s for _, s in SUBCODE_PAIRS))

#: Every label pair an annotation may carry: the 33 above plus (code, "None") for the 3 codes without
#: sub-codes.
ANNOTATION_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c, subs in CODEBOOK.items() for s in (subs or (NONE_SUBCODE,))
)

#: Codes usable in each direction. Provider-direction messages ("Y") use the *Provider codes,
#: patient-direction messages ("N") the *Patient codes; SDOH and SocioEmotionalBehaviour apply to both.
BOTH_DIRECTIONS = frozenset({"SDOH", "SocioEmotionalBehaviour"})
CODES_BY_DIRECTION: Mapping[str, tuple[str, ...]] = MappingProxyType({
    PROVIDER_TO_PATIENT: tuple(c for c in CODES if c in BOTH_DIRECTIONS or c.endswith("Provider")),
    PATIENT_TO_PROVIDER: tuple(c for c in CODES if c in BOTH_DIRECTIONS or c.endswith("Patient")),
})

#: Published label frequencies (SPEC §1), used by the synthetic generator and its tests.
PUBLISHED_SUBCODE_COUNTS: Mapping[str, int] = MappingProxyType({
    "Clinical Care": 731, "salutation": 463, "activeParticipation/involvement": 453, "signoff": 406,
    "HealthCareAccessAndQuality": 303, "expressOpinions": 177, "EconomicStability": 160,
    "Appreciation/Gratitude": 153, "SocialAndCommunityContext": 129, "inviteCollabration": 126,
    "connection": 121, "SeekingApproval": 107, "alignment": 101, "maintainCommunication": 98,
    "NeighborhoodAndBuiltEnvironment": 91, "statePreferences": 74, "MakeDecision": 73,
    "checkingUnderstanding/clarification": 61, "ExploreOptions": 61, "requestsForOpinion": 39,
    "build trust": 37, "ShareOptions": 36, "EducationAccessAndQuality": 13, "Approval/Reinforcement": 13,
    "ApprovalofDecision/Reinforcement": 10, "acknowledgePatientExpertiseKnowledge": 1,
})
PUBLISHED_CODE_COUNTS: Mapping[str, int] = MappingProxyType({
    "PartnershipPatient": 671, "SDOH": 536, "PartnershipProvider": 378, "SocioEmotionalBehaviour": 242,
    "CareCoordinationPatient": 182, "SharedDecisionPatient": 163, "CareCoordinationProvider": 162,
    "SharedDecisionProvider": 108,
})
PUBLISHED_N_MESSAGES = 1137


def _key(label: str) -> str:
    """Lookup key: lower-case with all whitespace removed ("Clinical  care" -> "clinicalcare")."""
    return re.sub(r"\s+", "", label).lower()


_CODE_BY_KEY = {_key(c): c for c in CODES}
_SUBCODE_BY_KEY = {_key(s): s for s in SUBCODES}
_SUBCODE_BY_KEY[_key(NONE_SUBCODE)] = NONE_SUBCODE


def canonical_code(label: str) -> str | None:
    """The canonical Code string for ``label`` (case/whitespace-insensitive), or None if unknown."""
    return _CODE_BY_KEY.get(_key(label)) if isinstance(label, str) else None


def canonical_subcode(label: str) -> str | None:
    """The canonical Sub-code string (``"None"`` included), or None if unknown."""
    return _SUBCODE_BY_KEY.get(_key(label)) if isinstance(label, str) else None


def has_subcodes(code: str) -> bool:
    return bool(CODEBOOK[code])


def valid_subcodes(code: str) -> tuple[str, ...]:
    """The sub-codes an annotation with ``code`` may carry (``("None",)`` for codes without any)."""
    return CODEBOOK[code] or (NONE_SUBCODE,)


def is_valid_pair(code: str, subcode: str) -> bool:
    """Whether canonical (code, subcode) is a valid annotation label pair."""
    return code in CODEBOOK and subcode in valid_subcodes(code)


def codes_for_direction(direction: str) -> tuple[str, ...]:
    """The codes allowed for a message direction ("Y" provider->patient, "N" patient->provider)."""
    try:
        return CODES_BY_DIRECTION[direction]
    except KeyError:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}") from None


def code_allowed(code: str, direction: str) -> bool:
    return code in codes_for_direction(direction)
