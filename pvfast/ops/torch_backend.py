"""Torch backend: the chunked PyTorch implementation of the backend protocol (``pvfast.ops.backend``).

fp32 math on any device. Memory: one TORCH_CHUNK_TOKENS × V fp32 logits chunk at a time, plus an fp32
copy of a bf16/fp16 weight (V × H) for the duration of a call. The statistics are the contract's own
torch functions (:func:`pvfast.objectives.stats.segment_stats_sums` / ``segment_stats_grad``), not a copy.
"""

from __future__ import annotations

import torch

from pvfast.objectives.stats import segment_stats_grad, segment_stats_sums

# Tokens per chunk: bounds the temporaries to TORCH_CHUNK_TOKENS × V fp32 (1024 × 150k ≈ 600 MB) instead of N × V.
TORCH_CHUNK_TOKENS = 1024


def _chunks(n: int):
    size = TORCH_CHUNK_TOKENS
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def capped_logits(hidden32: torch.Tensor, weight32: torch.Tensor, softcap: float) -> torch.Tensor:
    """z = h·Wᵀ, then z' = c·tanh(z/c) when softcap c > 0 (Gemma 2's final-logit soft-capping)."""
    z = hidden32 @ weight32.T
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def _slope(z: torch.Tensor, softcap: float) -> torch.Tensor | None:
    """dz'/dz = 1 − (z'/c)² at capped logits z' (None without capping)."""
    return 1.0 - (z / softcap) ** 2 if softcap > 0 else None


def _logp_lse(z: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """fp32 logits chunk (n, V) → (ℓ, lse), both 0 on ignored rows."""
    active = targets != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, torch.where(active, targets, 0).long()[:, None]).squeeze(1)
    return torch.where(active, picked - lse, 0.0), torch.where(active, lse, 0.0)


def _dlogits(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
             ignore_index: int, softcap: float = 0.0) -> torch.Tensor:
    """dL/dz = g·(onehot(y) − softmax(z'))·dz'/dz for an fp32 chunk; zero rows for ignored targets."""
    active = targets != ignore_index
    grad = torch.where(active, grad_logp.float(), 0.0)
    dz = -grad[:, None] * torch.exp(z - lse[:, None])
    dz.scatter_add_(1, torch.where(active, targets, 0).long()[:, None], grad[:, None])
    slope = _slope(z, softcap)
    return dz if slope is None else dz * slope


class TorchBackend:
    """The seven protocol functions in chunked PyTorch (see ``pvfast.ops.backend`` for the convention)."""

    name = "torch"

    @staticmethod
    def token_logprobs_fwd(logits, targets, ignore_index: int):
        n = logits.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for c in _chunks(n):
            logp[c], lse[c] = _logp_lse(logits[c].float(), targets[c], ignore_index)
        return logp, lse

    @staticmethod
    def token_logprobs_bwd(logits, targets, lse, grad_logp, ignore_index: int):
        grad_logits = torch.empty_like(logits)
        for c in _chunks(logits.shape[0]):
            grad_logits[c] = _dlogits(logits[c].float(), targets[c], lse[c], grad_logp[c], ignore_index)
        return grad_logits

    @staticmethod
    def linear_token_logprobs_fwd(hidden, weight, targets, ignore_index: int, softcap: float):
        n = hidden.shape[0]
        weight32 = weight.float()
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        for c in _chunks(n):
            z = capped_logits(hidden[c].float(), weight32, softcap)
            logp[c], lse[c] = _logp_lse(z, targets[c], ignore_index)
        return logp, lse

    @staticmethod
    def linear_token_logprobs_fwd_with_grad(hidden, weight, targets, ignore_index: int, softcap: float):
        """(ℓ, lse, direction (N, H) fp32 = dℓ_t/dh_t = (onehot − softmax)·slope·W); zero rows where ignored."""
        n = hidden.shape[0]
        weight32 = weight.float()
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        direction = torch.empty(n, weight.shape[1], dtype=torch.float32, device=hidden.device)
        for c in _chunks(n):
            z = capped_logits(hidden[c].float(), weight32, softcap)
            logp[c], lse[c] = _logp_lse(z, targets[c], ignore_index)
            # g = 1 gives dℓ/dz; a zero row for ignored targets
            dz = _dlogits(z, targets[c], lse[c], torch.ones_like(lse[c]), ignore_index, softcap)
            direction[c] = dz @ weight32
        return logp, lse, direction

    @staticmethod
    def linear_token_logprobs_bwd(hidden, weight, targets, lse, grad_logp, ignore_index: int, softcap: float,
                                  need_weight_grad: bool):
        weight32 = weight.float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight32) if need_weight_grad else None
        for c in _chunks(hidden.shape[0]):
            h32 = hidden[c].float()
            z = capped_logits(h32, weight32, softcap)
            dz = _dlogits(z, targets[c], lse[c], grad_logp[c], ignore_index, softcap)
            grad_hidden[c] = dz @ weight32
            if need_weight_grad:
                grad_weight += dz.T @ h32
        grad_weight = (grad_weight.to(weight.dtype) if need_weight_grad
                       else torch.empty(0, dtype=weight.dtype, device=weight.device))
        return grad_hidden, grad_weight

    @staticmethod
    def segment_stats_fwd(logp, weights, segment_ids, num_segments: int, log_tau: float):
        return segment_stats_sums(logp.float(), weights.float(), segment_ids, num_segments, log_tau)

    @staticmethod
    def segment_stats_bwd(logp, weights, segment_ids, grad_stats, log_tau: float):
        return segment_stats_grad(logp.float(), weights.float(), segment_ids, grad_stats.float(), log_tau)
