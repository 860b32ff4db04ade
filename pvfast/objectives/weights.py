"""Token weights (SPEC §2) from token roles and diff flags: the one place an objective's weights are made.

Batches carry what each scored token *is* (its role: scaffold, code, sub-code or span; and whether it
differs from the other side of its pair on a token alignment), never a weight. The objective turns that
into w_t here, at loss time:

    w_t = 1                                                  token weighting off (the TW switch)
    w_t = max(w_scaffold, w_role(t)) · (w_diff if diff_t)    token weighting on (scaffold: w_scaffold)

so changing a weight setting takes effect without tokenizing or packing again, and the statistics of the
policy and the reference are always computed with the same weights.
"""

from __future__ import annotations

import torch

from pvfast.data.roles import ROLE_CODE, ROLE_PROMPT, ROLE_SCAFFOLD, ROLE_SPAN, ROLE_SUBCODE
from pvfast.objectives.config import ObjectiveConfig

_ROLES = (ROLE_PROMPT, ROLE_SCAFFOLD, ROLE_CODE, ROLE_SUBCODE, ROLE_SPAN)  # ids -1..3, looked up at id + 1


def token_weights(roles: torch.Tensor, diff: torch.Tensor | None, config: ObjectiveConfig) -> torch.Tensor:
    """(...,) float32 weights of tokens with role ids ``roles`` (int) and diff flags ``diff`` (bool or None).

    Prompt tokens (ROLE_PROMPT) get weight 0 with token weighting on (they are never scored); an unknown
    role id is an error.
    """
    if diff is not None and diff.shape != roles.shape:
        raise ValueError(f"token_weights: diff flags {tuple(diff.shape)} and roles {tuple(roles.shape)} differ")
    if not config.token_weighting:
        return torch.ones(roles.shape, dtype=torch.float32, device=roles.device)
    roles = roles.long()
    if roles.numel() and (int(roles.min()) < ROLE_PROMPT or int(roles.max()) > ROLE_SPAN):
        raise ValueError(f"token_weights: role ids must lie in [{ROLE_PROMPT}, {ROLE_SPAN}], "
                         f"got [{int(roles.min())}, {int(roles.max())}]")
    cfg = config.token_weights
    table = torch.tensor([0.0] + [cfg.role_weight(role) for role in _ROLES[1:]], dtype=torch.float32,
                         device=roles.device)
    weights = table[roles + 1]
    if diff is not None:
        weights = torch.where(diff.to(weights.device), weights * cfg.w_diff, weights)
    return weights
