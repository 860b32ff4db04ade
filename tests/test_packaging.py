"""Packaging: the repo's ``kernels/`` folder is ``pvfast.kernels`` only, never a top-level ``kernels``.

transformers and bitsandbytes probe for Hugging Face's ``kernels`` package; a top-level package of that
name (installed, or found through the working directory) would be taken for it. These checks run in
fresh interpreters, with the working directory inside and outside the repo.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvfast.model.tiny import tiny_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
import transformers
from transformers.utils import is_kernels_available
import pvfast.kernels
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "kernels_available": is_kernels_available(),
    "kernels_spec": spec.origin if spec else None,
    "pvfast_kernels_file": pvfast.kernels.__file__,
}))
"""

LOAD_4BIT = """
import json
import bitsandbytes as bnb
import torch
from pvfast.model.tiny import load_tiny_tokenizer
from pvfast.testing import load_tiny_model
model = load_tiny_model("llama", quant="nf4")
ids = load_tiny_tokenizer("llama")("patient message", return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(json.dumps({
    "n_linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()),
    "finite": bool(torch.isfinite(logits).all()),
}))
"""


def _run(code, cwd):
    # -c puts the working directory first on sys.path, exactly like an interactive session there.
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def tiny_llama_built():
    tiny_model_dir("llama")  # build once here, so the subprocess only loads


def test_repo_kernels_folder_does_not_fool_transformers_in_repo_root():
    assert (REPO_ROOT / "kernels" / "__init__.py").is_file()
    out = _run(PROBE, REPO_ROOT)
    # The folder is importable as plain `kernels` from here (cwd on sys.path), yet transformers says no.
    assert out["kernels_spec"] == str(REPO_ROOT / "kernels" / "__init__.py")
    assert out["kernels_available"] is False
    assert Path(out["pvfast_kernels_file"]).resolve() == (REPO_ROOT / "kernels" / "__init__.py").resolve()


def test_4bit_loading_works_from_repo_root():
    out = _run(LOAD_4BIT, REPO_ROOT)
    assert out["n_linear4bit"] > 0
    assert out["finite"]


def test_no_top_level_kernels_outside_the_repo(tmp_path):
    out = _run(PROBE, tmp_path)
    assert out["kernels_spec"] is None
    assert out["kernels_available"] is False
    assert Path(out["pvfast_kernels_file"]).resolve() == (REPO_ROOT / "kernels" / "__init__.py").resolve()


def test_distribution_declares_pvfast_only():
    dist = importlib.metadata.distribution("pvfast")
    assert (dist.read_text("top_level.txt") or "").split() == ["pvfast"]
    installed = [str(f) for f in dist.files or []]
    assert not [f for f in installed if f.split("/")[0] == "kernels" or f.startswith("kernels.")]
