"""pvfast: fast, exact trainer for token-critical structured generation (PV-Miner / TAB-PO)."""

__version__ = "0.1.0"
