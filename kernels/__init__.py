"""Triton kernels, installed as ``pvfast.kernels`` (never as a top-level ``kernels`` package)."""

import os


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``).

    The interpreter cannot run bf16/fp16 ``tl.dot`` correctly, so launchers pass an upcast flag then.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
