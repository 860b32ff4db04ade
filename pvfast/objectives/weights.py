"""Token roles and token weights (SPEC §2): the single definition of both.

Every completion token gets a role from the character offsets of the serialized JSON; its weight is 1.0
for scaffold and max(1.0, w_role) inside a field value, times ``w_diff`` where chosen and rejected differ
(on a token alignment). Prompt tokens are not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Role ids stored per token (int8). PROMPT marks tokens that are never scored.
ROLE_PROMPT = -1
ROLE_SCAFFOLD = 0
ROLE_CODE = 1
ROLE_SUBCODE = 2
ROLE_SPAN = 3
ROLE_NAMES = {ROLE_PROMPT: "prompt", ROLE_SCAFFOLD: "scaffold", ROLE_CODE: "code",
              ROLE_SUBCODE: "subcode", ROLE_SPAN: "span"}
ROLE_BY_NAME = {name: role for role, name in ROLE_NAMES.items()}


@dataclass(frozen=True)
class TokenWeightConfig:
    """Token weights; the defaults are the released training code's (SPEC §3)."""

    w_scaffold: float = 1.0  # everything outside a field value, end-of-turn token included
    w_code: float = 1.1  # tokens inside a Code value
    w_subcode: float = 1.2  # tokens inside a Sub-code value
    w_span: float = 1.1  # tokens inside a Span value
    w_diff: float = 1.2  # extra factor where chosen and rejected differ (token alignment)

    def __post_init__(self) -> None:
        for name in ("w_scaffold", "w_code", "w_subcode", "w_span", "w_diff"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"TokenWeightConfig.{name} must be a finite number > 0, got {value!r}")

    def role_weight(self, role: int) -> float:
        if role == ROLE_SCAFFOLD:
            return self.w_scaffold
        base = {ROLE_CODE: self.w_code, ROLE_SUBCODE: self.w_subcode, ROLE_SPAN: self.w_span}
        if role not in base:
            raise ValueError(f"no weight for role {role} ({ROLE_NAMES.get(role, 'unknown')})")
        return max(self.w_scaffold, base[role])
