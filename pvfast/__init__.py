"""pvfast: fast, exact trainer for token-critical structured generation (PV-Miner / TAB-PO).

Public entry points for other trainers (README "The fused loss in your own trainer")::

    from pvfast import FusedTokenPOLoss, causal_lm_rows, collate_pair_groups, TabpoConfig, PairIndex

The layers, lowest first (README "Architecture"): ``data`` (records, codebook, tokenization, corpus, pair
mining), ``objectives`` (statistics contract, configs, token and class-balance weights, the exact objectives,
the fused loss module), ``ops`` + ``kernels`` (fused ops: torch reference, C++, Triton), ``packing`` (prefix
trees, loss batches, padded batches), ``model`` (loading, packed forward, reference, generation), ``eval``,
``train`` (the recipe), ``config`` (torch-free configuration, read by all).
"""

__version__ = "0.1.0"

# Resolved lazily so that `import pvfast` (and the data tools) never import torch, Triton or the kernels.
_LAZY = {
    "FusedTokenPOLoss": "pvfast.objectives.fused_loss",
    "ScoringRows": "pvfast.objectives.fused_loss",
    "causal_lm_rows": "pvfast.objectives.fused_loss",
    "PairIndex": "pvfast.objectives.losses",
    "compute_objective": "pvfast.objectives.losses",
    "token_weights": "pvfast.objectives.weights",
    "class_balance_table": "pvfast.objectives.class_balance",
    "collate_pair_groups": "pvfast.packing.padded",
    "PaddedPairBatch": "pvfast.packing.padded",
    "tokenize_pair_group": "pvfast.data.tokenization",
    **{name: "pvfast.objectives.config" for name in (
        "TabpoConfig", "DpoConfig", "IpoConfig", "CalDpoConfig", "DpoPositiveConfig", "SimpoConfig", "SftConfig",
        "TokenWeightConfig", "ClassBalanceConfig")},
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pvfast' has no attribute {name!r}")
