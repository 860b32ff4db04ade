"""Loss-level benchmark cases: a DPO batch from hidden states, pvfast vs Liger's chunked loss vs naive.

The batch is P pairs of completions of T scored tokens each: hidden (2P, T, H) with the P chosen rows
first (Liger's layout), a frozen lm_head (V, H), and no reference model (reference log-probs 0) so that
all three providers compute the same sigmoid DPO loss on summed log-probs:

    naive    logits → float → log_softmax → gather → Σ per row → −log σ(β (Σ_c − Σ_r))
    pvfast   FusedTokenPOLoss("dpo") on scoring rows (fused-linear op + per-completion sums)
    liger    LigerFusedLinearDPOLoss(use_ref_model=False, compiled=False): chunked torch per pair
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from bench.cases import DTYPES

BETA = 0.1
LOSS_PROVIDERS = ("naive", "pvfast", "liger")


def loss_provider_available(provider: str) -> str | None:
    if provider == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if provider == "pvfast":
        from pvfast.ops.cpp_backend import cpp_available

        if not cpp_available() and not torch.cuda.is_available():
            return "pvfast._C is not built (the CPU path of the fused op)"
    return None


def _loss_fn(provider: str, p: int, t: int, v: int, device: str):
    if provider == "naive":
        def naive(hidden, weight, targets):
            logits = (hidden @ weight.T).float()
            logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0].sum(-1)
            return -F.logsigmoid(BETA * (logp[:p] - logp[p:])).mean()
        return naive
    if provider == "pvfast":
        from pvfast import FusedTokenPOLoss, PairIndex
        from pvfast.objectives.config import DpoConfig
        from pvfast.objectives.fused_loss import ScoringRows
        from pvfast.objectives.stats import NUM_STATS

        loss = FusedTokenPOLoss("dpo", DpoConfig(beta=BETA))
        segments = torch.arange(2 * p, device=device).repeat_interleave(t)
        weights = torch.ones(2 * p * t, device=device)
        pairs = PairIndex(torch.arange(p), torch.arange(p, 2 * p))
        ref = torch.zeros(2 * p, NUM_STATS, device=device)  # no reference model: log-ratios = log-probs

        def fused(hidden, weight, targets):
            rows = ScoringRows(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), weights, segments, 2 * p)
            return loss(rows, weight, pairs=pairs, ref_stats=ref).loss
        return fused
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=False)

        def liger_loss(hidden, weight, targets):
            out = liger(weight, hidden, targets)
            return out[0] if isinstance(out, tuple) else out
        return liger_loss
    raise ValueError(f"unknown provider {provider!r}; expected one of {LOSS_PROVIDERS}")


def build_loss_case(spec: dict, split_backward: bool = False):
    device = spec.get("device", "cpu")
    dtype = DTYPES[spec.get("dtype", "fp32")]
    p, t, h_dim, v = int(spec["P"]), int(spec["T"]), int(spec["H"]), int(spec["V"])
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    hidden = (torch.randn(2 * p, t, h_dim, generator=gen) / h_dim ** 0.25).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h_dim, generator=gen) / h_dim ** 0.25).to(device, dtype)
    targets = torch.randint(0, v, (2 * p, t), generator=gen).to(device)
    fn = _loss_fn(spec["provider"], p, t, v, device)

    def forward():
        return fn(hidden, weight, targets)

    def backward(loss):
        loss.backward()
        hidden.grad = None

    if split_backward:
        return forward, backward
    if spec.get("mode", "forward+backward") == "forward":
        return forward
    return lambda: backward(forward())


def loss_value(spec: dict) -> float:
    """The loss of one provider on the case's inputs (for the cross-check between providers)."""
    return float(build_loss_case(dict(spec, mode="forward"))().detach())
