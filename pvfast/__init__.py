"""pvfast: fast, exact trainer for token-critical structured generation (PV-Miner / TAB-PO).

Public entry points for other trainers::

    from pvfast import FusedTokenPOLoss, causal_lm_rows, PairIndex
"""

__version__ = "0.1.0"

# Resolved lazily so that `import pvfast` (and the data tools) never import Triton or the kernels.
_LAZY = {
    "FusedTokenPOLoss": "pvfast.objectives.fused_loss",
    "ScoringRows": "pvfast.objectives.fused_loss",
    "causal_lm_rows": "pvfast.objectives.fused_loss",
    "PairIndex": "pvfast.objectives.losses",
    "compute_objective": "pvfast.objectives.losses",
    "TabpoConfig": "pvfast.objectives.losses",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pvfast' has no attribute {name!r}")
