"""Shape, dtype and device checks of the public ops (shared by every backend; errors name the argument).

Value checks (targets in [0, V) or ignore_index, segment ids below M) cost a device synchronisation on a
GPU, so they are not here: the C++ backend always does them, the Triton launchers follow
``PVFAST_CHECK_INDICES`` (see :mod:`pvfast.kernels`), the torch backend raises from indexing.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_logits_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"token_logprobs: logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs: targets must be (N,) = ({logits.shape[0]},), "
                         f"got shape {tuple(targets.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"token_logprobs: logits must be float32/float16/bfloat16, got {logits.dtype}")
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"token_logprobs: targets must be int32 or int64, got {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"token_logprobs: logits on {logits.device} but targets on {targets.device}")


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_token_logprobs: hidden must be (N, H) and weight (V, H), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_token_logprobs: hidden size mismatch: hidden (N, {hidden.shape[1]}) "
                         f"vs weight (V, {weight.shape[1]})")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_token_logprobs: targets must be (N,) = ({hidden.shape[0]},), "
                         f"got {tuple(targets.shape)}")
    if hidden.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"linear_token_logprobs: hidden and weight must share a float32/float16/bfloat16 "
                        f"dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.dtype not in INDEX_DTYPES:
        raise TypeError(f"linear_token_logprobs: targets must be int32 or int64, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"linear_token_logprobs: tensors on different devices: hidden {hidden.device}, "
                         f"weight {weight.device}, targets {targets.device}")


def check_softcap(softcap: float | None, op: str) -> float:
    """The protocol's softcap value: c for a finite c > 0, 0.0 for None (no capping)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap <= 0:
        raise ValueError(f"{op}: softcap must be None (off) or a finite number > 0 (Gemma 2's "
                         f"final_logit_softcapping, e.g. 30.0), got {softcap!r}")
    return float(softcap)


def check_segment_vectors(num_tokens: int, device: torch.device, weights: torch.Tensor,
                          segment_ids: torch.Tensor, num_segments: int, op: str) -> None:
    """Checks on the per-token weights and segment ids shared by the standalone and fused ops."""
    if weights.shape != (num_tokens,) or segment_ids.shape != (num_tokens,):
        raise ValueError(f"{op}: weights and segment_ids must be ({num_tokens},), got "
                         f"{tuple(weights.shape)} and {tuple(segment_ids.shape)}")
    if weights.device != device or segment_ids.device != device:
        raise ValueError(f"{op}: weights on {weights.device} and segment_ids on {segment_ids.device}, "
                         f"expected {device}")
    if not weights.is_floating_point():
        raise TypeError(f"{op}: weights must be floating point, got {weights.dtype}")
    if segment_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: segment_ids must be int32 or int64, got {segment_ids.dtype}")
    if num_segments < 0:
        raise ValueError(f"{op}: num_segments must be >= 0, got {num_segments}")


def check_segment_inputs(logp: torch.Tensor, weights: torch.Tensor, segment_ids: torch.Tensor,
                         num_segments: int) -> None:
    if logp.dim() != 1 or not logp.is_floating_point():
        raise ValueError(f"segment_stats: logp must be a 1-D float tensor, got {logp.dtype} "
                         f"of shape {tuple(logp.shape)}")
    check_segment_vectors(logp.shape[0], logp.device, weights, segment_ids, num_segments, "segment_stats")
