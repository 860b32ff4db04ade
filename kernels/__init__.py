"""Triton kernels, installed as ``pvfast.kernels`` (never as a top-level ``kernels`` package)."""
