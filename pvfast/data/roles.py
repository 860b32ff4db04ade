"""Token roles (SPEC §2): what part of the answer a completion token belongs to.

Every completion token gets a role from the character offsets of the serialized JSON
(:mod:`pvfast.data.tokenization`): code, subcode or span inside a field value, scaffold elsewhere. Prompt
tokens are never scored. The weight each role gets is an objective setting
(:class:`pvfast.objectives.config.TokenWeightConfig`).
"""

from __future__ import annotations

# Role ids stored per token (int8). PROMPT marks tokens that are never scored.
ROLE_PROMPT = -1
ROLE_SCAFFOLD = 0
ROLE_CODE = 1
ROLE_SUBCODE = 2
ROLE_SPAN = 3
ROLE_NAMES = {ROLE_PROMPT: "prompt", ROLE_SCAFFOLD: "scaffold", ROLE_CODE: "code",
              ROLE_SUBCODE: "subcode", ROLE_SPAN: "span"}
ROLE_BY_NAME = {name: role for role, name in ROLE_NAMES.items()}


