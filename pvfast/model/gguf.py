"""GGUF checkpoints as a model source: converted once into a cached safetensors Hugging Face folder.

``--model.name_or_path some.gguf`` (a ``.gguf`` file, or a folder holding exactly one) is turned into an
ordinary local model folder the first time it is used; from then on NF4 quantisation, LoRA, merging and
generation see a plain safetensors model::

    some.gguf --(transformers: from_pretrained(folder, gguf_file=name), dequantised to float32)-->
        state dict --> fresh *ForCausalLM(config) --> save_pretrained (safetensors)
        tokenizer (+ chat template) --> save_pretrained
    $PVFAST_CACHE_DIR/gguf (default ~/.cache/pvfast/gguf)/<file stem>-<key>/
        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        chat_template.jinja  gguf_source.json

``<key>`` hashes the file's content (SHA-256), the converter version and the transformers version, so a
changed file or a new dequantiser converts again and a stale folder is never read; a renamed or moved
copy of the same file reuses the folder. The folder is built under a temporary name and renamed into
place (:func:`pvfast.atomic.atomic_dir`); two processes racing keep the first (identical) copy.

Why a fresh model: ``save_pretrained`` refuses a model loaded from GGUF (its config carries a GGUF
quantisation entry), so the dequantised weights are moved into a model built from the same config
without that entry.

Before any tensor is read, the file's metadata is checked: an architecture transformers cannot load from
GGUF, or a tensor type the ``gguf`` package cannot dequantise, is a :class:`GGUFError` that names the file,
the architecture or the tensor and type, and what is supported.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

GGUF_SUFFIX = ".gguf"
CONVERTER_VERSION = 1  # bump when the conversion below changes what it writes
SOURCE_FILE = "gguf_source.json"  # written into every converted folder: where it came from


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message names the file and the reason."""


def cache_root() -> Path:
    """``$PVFAST_CACHE_DIR/gguf`` or ``~/.cache/pvfast/gguf``."""
    base = os.environ.get("PVFAST_CACHE_DIR")
    return Path(base) / "gguf" if base else Path.home() / ".cache" / "pvfast" / "gguf"


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the single ``*.gguf`` in a folder without a
    ``config.json``; None when ``path`` is not a GGUF source. Several ``.gguf`` files in one folder are an
    error (which one is meant?)."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if path.is_dir() and not (path / "config.json").is_file():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
        if len(files) > 1:
            raise GGUFError(f"{path}: holds {len(files)} GGUF files ({', '.join(p.name for p in files)}); "
                            f"pass the file itself as model.name_or_path")
        return files[0] if files else None
    return None


@functools.lru_cache(maxsize=16)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (memoised per process on path, size and modification time)."""
    stat = os.stat(path)
    return _content_hash(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def _supported_quant_types() -> set:
    from gguf import GGMLQuantizationType, quants

    # gguf.quants.dequantize handles F32 and F16 itself and every type with a registered implementation.
    return {GGMLQuantizationType.F32, GGMLQuantizationType.F16} | set(getattr(quants, "_type_traits", {}))


def check_gguf(path: str | os.PathLike) -> dict:
    """Read the metadata of ``path``: ``{"architecture", "name", "tensor_types"}``; GGUFError when
    transformers cannot load the architecture or a tensor type cannot be dequantised."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as err:
        raise GGUFError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf): {err}") from err
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as err:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from err
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{path}: no general.architecture entry in its metadata")
    architecture = field.contents()
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if architecture not in supported:
        raise GGUFError(f"{path}: architecture {architecture!r} cannot be loaded from GGUF by transformers "
                        f"(supported: {', '.join(supported)}); convert the original checkpoint instead")
    name_field = reader.fields.get("general.name")
    name = name_field.contents() if name_field is not None else None
    ok = _supported_quant_types()
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype not in ok:
            raise GGUFError(f"{path}: tensor {tensor.name!r} is stored as {qtype.name}, which the gguf package "
                            f"cannot dequantise (supported: {', '.join(sorted(t.name for t in ok))})")
        types[qtype.name] = types.get(qtype.name, 0) + 1
    return {"architecture": architecture, "name": name, "tensor_types": types}


def _cache_key(digest: str) -> str:
    import transformers

    h = hashlib.sha256(f"{digest} converter={CONVERTER_VERSION} transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


def converted_dir(path: str | os.PathLike) -> Path:
    """Where the conversion of ``path`` is cached (it may not exist yet)."""
    path = Path(path)
    return cache_root() / f"{path.stem}-{_cache_key(content_hash(path))}"


def convert_gguf(path: str | os.PathLike, log=print) -> Path:
    """The safetensors folder of the GGUF file ``path``, converting it on first use (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    final_dir = converted_dir(path)
    if (final_dir / "config.json").is_file():
        return final_dir
    info = check_gguf(path)
    from pvfast.atomic import atomic_dir

    log(f"{path.name}: converting GGUF ({info['architecture']}, "
        f"{', '.join(f'{n} {t}' for t, n in info['tensor_types'].items())}) to a safetensors folder "
        f"-> {final_dir} (once)")
    with atomic_dir(final_dir, exists="keep") as tmp_dir:
        _convert_into(path, tmp_dir)
        (tmp_dir / SOURCE_FILE).write_text(json.dumps({
            "file": path.name, "sha256": content_hash(path), "converter_version": CONVERTER_VERSION, **info,
        }, indent=1) + "\n", encoding="utf-8")
    return final_dir


def _convert_into(path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise GGUFError(f"{path}: transformers cannot load it ({type(err).__name__}: {err})") from err
    config = loaded.config
    config.quantization_config = None  # the GGUF entry that makes save_pretrained refuse
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    # Build the plain model without allocating weights twice, then take the dequantised tensors as they are.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise GGUFError(f"{path}: converted weights do not match {type(fresh).__name__}: missing "
                        f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    if getattr(tokenizer, "chat_template", None) is None:
        raise GGUFError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template); pvfast formats "
                        f"prompts with the model's chat template, so it needs an instruct/chat model")
    tokenizer.save_pretrained(out_dir)
