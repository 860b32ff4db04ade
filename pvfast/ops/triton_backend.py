"""Triton backend: the protocol of ``pvfast.ops.backend`` over the launchers in ``pvfast.kernels``.

CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Besides the seven protocol functions it has the
fused ``linear_segment_stats_fwd`` (the statistics reduced inside the linear forward). ``config`` fixes
the tile sizes of the linear kernels (default: per dtype, ``pvfast.kernels.linear_token_logprobs``).
"""

from __future__ import annotations

import torch

from pvfast.kernels import linear_token_logprobs as linear
from pvfast.kernels import segment_stats as seg
from pvfast.kernels import token_logprobs as tok


class TritonBackend:
    name = "triton"

    def __init__(self, config: linear.LinearConfig | None = None, token_block_v: int = tok.BLOCK_V):
        self.config = config
        self.token_block_v = token_block_v

    def token_logprobs_fwd(self, logits, targets, ignore_index: int):
        return tok.token_logprobs_forward(logits, targets, ignore_index, self.token_block_v)

    def token_logprobs_bwd(self, logits, targets, lse, grad_logp, ignore_index: int):
        return tok.token_logprobs_backward(logits, targets, lse, grad_logp, ignore_index, self.token_block_v)

    def linear_token_logprobs_fwd(self, hidden, weight, targets, ignore_index: int, softcap: float):
        logp, lse, _, _ = linear.linear_forward(hidden, weight, targets, ignore_index, softcap, config=self.config)
        return logp, lse

    def linear_token_logprobs_fwd_with_grad(self, hidden, weight, targets, ignore_index: int, softcap: float):
        logp, lse, _, direction = linear.linear_forward(hidden, weight, targets, ignore_index, softcap,
                                                        with_grad=True, config=self.config)
        return logp, lse, direction

    def linear_token_logprobs_bwd(self, hidden, weight, targets, lse, grad_logp, ignore_index: int, softcap: float,
                                  need_weight_grad: bool):
        grad_hidden, grad_weight = linear.linear_backward(
            hidden, weight, targets, lse, grad_logp, ignore_index, softcap, need_hidden_grad=True,
            need_weight_grad=need_weight_grad, config=self.config)
        if grad_weight is None:
            grad_weight = torch.empty(0, dtype=weight.dtype, device=weight.device)
        return grad_hidden, grad_weight

    def linear_segment_stats_fwd(self, hidden, weight, targets, weights, segment_ids, num_segments: int,
                                 log_tau: float, ignore_index: int, softcap: float, with_grad: bool):
        return linear.linear_forward(hidden, weight, targets, ignore_index, softcap, with_grad=with_grad,
                                     weights=weights, segment_ids=segment_ids, num_segments=num_segments,
                                     log_tau=log_tau, config=self.config)

    @staticmethod
    def segment_stats_fwd(logp, weights, segment_ids, num_segments: int, log_tau: float):
        return seg.segment_stats_forward(logp, weights, segment_ids, num_segments, log_tau)

    @staticmethod
    def segment_stats_bwd(logp, weights, segment_ids, grad_stats, log_tau: float):
        return seg.segment_stats_backward(logp.float().contiguous(), weights, segment_ids,
                                          grad_stats.float().contiguous(), log_tau)
