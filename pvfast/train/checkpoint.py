"""Training checkpoints: atomic save, rotation, exact resume, and merging the adapter into the base.

A checkpoint is one directory under ``<output_dir>/checkpoints/``::

    step-000123/
        adapter/                  PEFT format: PeftModel.from_pretrained(base, "step-000123/adapter")
            adapter_config.json
            adapter_model.safetensors
        optimizer.pt              optimizer.state_dict()
        scheduler.pt              scheduler.state_dict()            (absent when saved without one)
        rng.pt                    python random, numpy, torch CPU and CUDA generator states, per rank
        train_state.json          TrainState: step, epoch, batch cursor, tokens seen, extra
        config.json               the resolved run config
        COMPLETE                  manifest written last: size and sha256 of every file above

Atomicity: everything is written into a hidden ``.tmp-step-000123-*`` directory beside the final one,
each file is fsynced, ``COMPLETE`` is written last, and the directory is renamed into place (a rename
within one filesystem is atomic on POSIX). A crash at any point leaves either no ``step-000123`` or a
complete one (plus a hidden temporary that the next save, or the trainer's start, removes). A checkpoint
holding a NaN or an infinity is never written: ``save_checkpoint`` checks the adapter weights and the
optimizer state first (:class:`pvfast.train.errors.NonFinite`).

Damage, one rule (:func:`find_resume_checkpoint`): resuming verifies the checkpoints newest first, each
in full (manifest, every file's size and sha256, train state), reports every one it rejects and why, and
uses the newest good one. Truncated, byte-flipped and deleted files are all caught by the manifest (a
flipped byte by its hash); a damaged manifest rejects its checkpoint. When ``step-*`` directories exist
but none is good, the trainer refuses to start over (exit 4) rather than silently train from step 0.
Rejected directories are left in place (the next save of that step replaces it atomically); rotation
deletes only checkpoints whose files have their manifest sizes.

Multi-process runs: only rank 0 writes (``is_main_process``); the caller must put a barrier after
``save_checkpoint`` if other ranks read the directory next. Each rank's RNG state can be saved by
gathering ``collect_rng_state()`` from every rank and passing the list as ``rng_states``; on resume each
rank restores its own entry (``load_checkpoint(..., rank=r)``).

Resume, as the trainer does it::

    found = find_resume_checkpoint(output_dir)          # verified newest first; found.rejected says why
    if found.path is not None:
        diffs = config_differences(read_checkpoint_config(found.path), current_config)   # caller decides
        state = load_checkpoint(found.path, model, optimizer, scheduler, rank=rank)
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import random
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pvfast import atomic
from pvfast.config.serialize import config_to_dict
from pvfast.train.errors import CheckpointError, NonFinite, writing
from pvfast.train.faults import fault_point
from pvfast.train.layout import ADAPTER_DIR, CHECKPOINTS_DIR, CONFIG_FILE

MANIFEST_NAME = "COMPLETE"
MANIFEST_CHECKSUM = "manifest_sha256"  # the manifest's own hash, over its other keys
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAIN_STATE_FILE = "train_state.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's name for safetensors adapter weights
# Files every checkpoint has (the manifest must list them; the scheduler is optional).
REQUIRED_FILES = (f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS_FILE}", OPTIMIZER_FILE,
                  RNG_FILE, TRAIN_STATE_FILE, CONFIG_FILE)

FORMAT_NAME = "pvfast-checkpoint"
FORMAT_VERSION = 1

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_HASH_CHUNK_BYTES = 1 << 20

# Files that make up a Hugging Face tokenizer; merge_adapter copies the tokenizer when any is present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class ResumePoint:
    """What :func:`find_resume_checkpoint` found: the newest good checkpoint, and the ones it rejected."""

    path: Path | None  # None: nothing to resume from
    rejected: tuple[tuple[Path, str], ...]  # (checkpoint, why), newest first
    state: TrainState | None = None  # the train state of ``path``, as verified

    @property
    def step(self) -> int:
        return 0 if self.path is None else int(_STEP_DIR_RE.match(self.path.name).group(1))


@dataclass
class TrainState:
    """Where training stands; enough, with the saved optimizer/scheduler/RNG, to continue exactly.

    ``batch_cursor`` indexes the epoch's deterministic micro-batch order: the first micro-batch the
    resumed run has to process (so ``batch_cursor == 0`` means the epoch has not started).
    """

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch the cursor points into (0-based)
    batch_cursor: int = 0  # index of the next micro-batch in this epoch's batch order
    tokens_seen: int = 0  # tokens trained on so far (all ranks together, as the caller counts them)
    extra: dict = field(default_factory=dict)  # anything else the trainer needs back; JSON-serialisable

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<dict>") -> "TrainState":
        """Inverse of ``to_dict``; unknown or missing fields are errors naming ``source``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise CheckpointError(f"{source}: train state has unknown fields {unknown} / missing fields {missing}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# RNG states


def collect_rng_state() -> dict:
    """This process's generator states: python ``random``, numpy's global, torch CPU, every CUDA device.

    The numpy key array is stored as an int64 tensor so the file loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping, source: str = "<rng state>") -> None:
    """Set every generator ``collect_rng_state`` captured; warn where CUDA devices do not match."""
    random.setstate(_as_python_random_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    saved_cuda = state.get("torch_cuda") or []
    have_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved_cuda) != have_cuda:
        warnings.warn(
            f"{source}: saved {len(saved_cuda)} CUDA generator states, this process sees {have_cuda} "
            f"CUDA devices; restoring the first {min(len(saved_cuda), have_cuda)} (resume is not bit-exact)",
            stacklevel=2,
        )
    for device, cuda_state in enumerate(saved_cuda[:have_cuda]):
        torch.cuda.set_rng_state(cuda_state, device)


def _as_python_random_state(saved) -> tuple:
    # random.setstate wants (version, tuple_of_ints, gauss_next); pickling keeps tuples, but be lenient
    # with lists in case a state went through JSON somewhere.
    version, internal, gauss_next = saved
    return (version, tuple(internal), gauss_next)


# --------------------------------------------------------------------------------------------------
# Durable file writing


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"config value {value!r} of type {type(value).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------------------------------
# Finding checkpoints


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _read_manifest(path: Path) -> dict:
    """The parsed ``COMPLETE`` manifest of checkpoint ``path``; CheckpointError if absent or invalid."""
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_NAME} manifest; the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format version {manifest.get('version')}, this pvfast reads {FORMAT_VERSION}"
        )
    if MANIFEST_CHECKSUM in manifest and manifest[MANIFEST_CHECKSUM] != _manifest_checksum(manifest):
        raise CheckpointError(f"{manifest_path}: damaged manifest (its own sha256 differs)")
    files = manifest.get("files")  # checkpoints written before the manifest had a checksum are read as they are
    well_formed = isinstance(files, dict) and isinstance(manifest.get("step"), int) and all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values())
    if not well_formed:
        raise CheckpointError(f"{manifest_path}: damaged manifest (no step, or a file entry without bytes/sha256)")
    missing = sorted(set(REQUIRED_FILES) - set(files))
    if missing:
        raise CheckpointError(f"{manifest_path}: damaged manifest (does not list {', '.join(missing)})")
    return manifest


def _verify_files(path: Path, manifest: dict, check_hashes: bool) -> None:
    """Every file the manifest lists exists with its size (and, if asked, its sha256)."""
    for rel, expected in manifest["files"].items():
        file_path = path / rel
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: listed in the manifest but missing")
        size = file_path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file_path}: {size} bytes, the manifest says {expected['bytes']} (truncated?)")
        if check_hashes and _sha256(file_path) != expected["sha256"]:
            raise CheckpointError(f"{file_path}: sha256 differs from the manifest (file corrupt)")


def _read_train_state(path: Path, manifest: dict) -> TrainState:
    train_state_path = path / TRAIN_STATE_FILE
    try:
        state_data = json.loads(train_state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{train_state_path}: cannot read the train state ({err})") from err
    if not isinstance(state_data, dict):
        raise CheckpointError(f"{train_state_path}: not a train state (a JSON object)")
    state = TrainState.from_dict(state_data, source=str(train_state_path))
    if state.step != manifest["step"]:
        raise CheckpointError(f"{train_state_path}: step {state.step} but the manifest says {manifest['step']}")
    return state


def verify_checkpoint(path: str | os.PathLike, check_hashes: bool = True) -> TrainState:
    """Check checkpoint ``path`` in full without loading it into a model; its TrainState, or CheckpointError.

    Manifest, every listed file's size and (``check_hashes``) sha256, the train state and its step against the
    manifest and the directory name. What remains for :func:`load_checkpoint` is whether it fits the model.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    _verify_files(path, manifest, check_hashes)
    state = _read_train_state(path, manifest)
    match = _STEP_DIR_RE.match(path.name)
    if match is not None and int(match.group(1)) != state.step:
        raise CheckpointError(f"{path}: holds step {state.step}, not the step of its name")
    return state


def is_complete_checkpoint(path: str | os.PathLike, check_hashes: bool = False) -> bool:
    """True when ``path`` has a valid manifest and every listed file with its recorded size."""
    path = Path(path)
    try:
        manifest = _read_manifest(path)
        _verify_files(path, manifest, check_hashes)
    except CheckpointError:
        return False
    return True


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory under ``root``, ascending by step."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest (lowest step) first."""
    return [path for _, path in _step_dirs(checkpoints_dir(output_dir)) if is_complete_checkpoint(path)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None. Incomplete directories are skipped."""
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def find_resume_checkpoint(output_dir: str | os.PathLike) -> ResumePoint:
    """The newest checkpoint that passes :func:`verify_checkpoint` (hashes included), and every newer one it
    rejected with the reason, newest first. Reading stops at the first good one (older ones are not read)."""
    rejected = []
    for _, path in reversed(_step_dirs(checkpoints_dir(output_dir))):
        try:
            state = verify_checkpoint(path, check_hashes=True)
        except CheckpointError as err:
            rejected.append((path, str(err)))
            continue
        return ResumePoint(path, tuple(rejected), state)
    return ResumePoint(None, tuple(rejected))


# --------------------------------------------------------------------------------------------------
# Saving


def _unwrap_peft_model(model: torch.nn.Module):
    """The PeftModel inside DDP / torch.compile wrappers; TypeError if there is none."""
    from peft import PeftModel

    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            break
    if not isinstance(model, PeftModel):
        raise TypeError(f"checkpoints hold a peft adapter; expected a PeftModel, got {type(model).__name__}")
    return model


def _write_checkpoint_files(
    tmp: Path, state: TrainState, model, optimizer, scheduler, config: dict, rng_states: list[dict]
) -> None:
    """Write every checkpoint file but the manifest into ``tmp``, fsynced."""
    model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
    atomic.fsync_tree(tmp / ADAPTER_DIR)
    _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if scheduler is not None:
        _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
    _torch_save(rng_states, tmp / RNG_FILE)
    _write_text(tmp / TRAIN_STATE_FILE, json.dumps(state.to_dict(), indent=2, default=_json_default))
    _write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))


def _write_manifest(tmp: Path, step: int) -> None:
    files = {}
    for file_path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = file_path.relative_to(tmp).as_posix()
        files[rel] = {"bytes": file_path.stat().st_size, "sha256": _sha256(file_path)}
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "step": step, "files": files}
    manifest[MANIFEST_CHECKSUM] = _manifest_checksum(manifest)
    _write_text(tmp / MANIFEST_NAME, json.dumps(manifest, indent=2))


def _manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's own content, so damage to the manifest is reported as such (not as a file)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _rotate(root: Path, keep_last: int | None, just_written: Path) -> None:
    """Keep the ``keep_last`` highest-step complete checkpoints and always the one just written."""
    if keep_last is None:
        return
    complete = [path for _, path in _step_dirs(root) if is_complete_checkpoint(path)]
    for path in complete[: max(len(complete) - keep_last, 0)]:
        if path != just_written:
            atomic.remove_dir(path)
    atomic.fsync_path(root)


def save_checkpoint(
    output_dir: str | os.PathLike,
    state: TrainState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    config_dict: Any,
    *,
    keep_last: int | None = 3,
    is_main_process: bool = True,
    rng_states: list[dict] | None = None,
) -> Path:
    """Write ``output_dir/checkpoints/step-<state.step>/`` atomically and rotate old checkpoints.

    Args:
        model: a peft ``PeftModel`` (possibly inside DDP or ``torch.compile``); only the adapter is saved.
        scheduler: an LR scheduler with ``state_dict()``, or None.
        config_dict: the resolved run config, a mapping or a dataclass instance (saved as JSON).
        keep_last: complete checkpoints to keep, highest steps first (>= 1), or None to keep all.
            The checkpoint just written is never deleted.
        is_main_process: False on every rank but 0: nothing is written (put a barrier after this call
            before other ranks read the checkpoint); the path rank 0 writes is returned.
        rng_states: one ``collect_rng_state()`` per rank, indexed by rank (gathered by the caller);
            default: this process's state only, which ``load_checkpoint`` restores for rank 0.

    Returns the final checkpoint directory. An exception mid-write removes the temp directory and
    leaves earlier checkpoints as they were.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    if state.step < 0:
        raise ValueError(f"TrainState.step must be >= 0, got {state.step}")
    root = checkpoints_dir(output_dir)
    final = root / checkpoint_dir_name(state.step)
    if not is_main_process:
        return final
    peft_model = _unwrap_peft_model(model)
    config = config_to_dict(config_dict)  # before any file is written: a bad config fails cleanly
    json.dumps(state.to_dict(), default=_json_default)  # same for an unserialisable TrainState.extra
    rng_states = [collect_rng_state()] if rng_states is None else list(rng_states)
    _refuse_non_finite(final, state.step, peft_model, optimizer)

    with writing(final, f"checkpoint {final.name}"):
        root.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temporaries(root)  # left by a save or a rotation that was killed (single writer)
        with atomic.atomic_dir(final, exists="replace") as tmp:
            _write_checkpoint_files(tmp, state, peft_model, optimizer, scheduler, config, rng_states)
            fault_point("checkpoint.write", tmp / OPTIMIZER_FILE)
            _write_manifest(tmp, state.step)  # last: its presence says every other file is complete
        _rotate(root, keep_last, final)
    return final


def _non_finite_tensors(tensors) -> int:
    """How many of ``tensors`` hold a NaN or an infinity (one reduction per tensor, one host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return 0 if not flags else int((~torch.stack(flags)).sum().item())


def _refuse_non_finite(final: Path, step: int, peft_model, optimizer) -> None:
    """A checkpoint is resumed from as good: never write one that holds a NaN or an infinity."""
    weights = [p.detach() for p in peft_model.parameters() if p.requires_grad]
    moments = [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    bad_weights, bad_moments = _non_finite_tensors(weights), _non_finite_tensors(moments)
    if bad_weights or bad_moments:
        what = f"{bad_weights} adapter weight tensors" if bad_weights else f"{bad_moments} optimizer state tensors"
        raise NonFinite(f"{final}: not saved: {what} hold NaN or infinity at step {step}; the last checkpoint "
                        f"saved before it is the one to resume from; lower --optim.lr or set --optim.grad_clip",
                        step)


# --------------------------------------------------------------------------------------------------
# Loading


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {err})") from err


def _adapter_weights_path(adapter_dir: Path, adapter_name: str) -> Path:
    # peft's save_pretrained layout: "default" at the top, other adapters in a subfolder of their name.
    sub = adapter_dir if adapter_name == "default" else adapter_dir / adapter_name
    return sub / ADAPTER_WEIGHTS_FILE


_SHAPE_ADVICE = ("load it with the LoRA settings it was saved with (model.lora_r, model.lora_targets; see the "
                 "checkpoint's config.json), or start over with --run.overwrite")


def load_adapter_weights(adapter_dir: str | os.PathLike, model: torch.nn.Module) -> None:
    """Copy saved LoRA weights (safetensors) into the adapters of an existing ``PeftModel``, in place.

    Every adapter in ``model.peft_config`` must be in ``adapter_dir`` with exactly the model's keys
    and shapes; anything else is a CheckpointError naming the file.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    peft_model = _unwrap_peft_model(model)
    for adapter_name in peft_model.peft_config:
        weights_path = _adapter_weights_path(adapter_dir, adapter_name)
        if not weights_path.is_file():
            raise CheckpointError(f"{weights_path}: adapter {adapter_name!r} weights missing")
        try:
            saved = load_file(weights_path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from err
        expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{weights_path}: adapter {adapter_name!r} does not fit the model: "
                f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}; "
                f"{_SHAPE_ADVICE}"
            )
        wrong_shapes = [k for k in expected if tuple(expected[k].shape) != tuple(saved[k].shape)]
        if wrong_shapes:
            k = wrong_shapes[0]
            raise CheckpointError(
                f"{weights_path}: {len(wrong_shapes)} adapter tensors have other shapes than the model's, "
                f"e.g. {k}: saved {tuple(saved[k].shape)}, model {tuple(expected[k].shape)}; {_SHAPE_ADVICE}"
            )
        set_peft_model_state_dict(peft_model, saved, adapter_name=adapter_name)


def read_checkpoint_config(path: str | os.PathLike) -> dict:
    """The resolved config saved with checkpoint ``path``."""
    config_path = Path(path) / CONFIG_FILE
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: cannot read the checkpoint config ({err})") from err


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    *,
    restore_rng: bool = True,
    rank: int = 0,
    check_hashes: bool = True,
) -> TrainState:
    """Restore a checkpoint into existing objects and return its TrainState.

    Loads the adapter weights into ``model`` (a ``PeftModel`` built with the same LoRA config), the
    optimizer and scheduler states (None skips one), and, with ``restore_rng``, this rank's generator
    states. The manifest and every file's size and sha256 (``check_hashes``) are verified first, so a
    missing or corrupt checkpoint raises CheckpointError naming the path before anything is changed.
    The saved config is not compared here: see ``read_checkpoint_config`` and
    :func:`pvfast.config.serialize.config_differences`.
    """
    path = Path(path)
    state = verify_checkpoint(path, check_hashes)

    rng_states = _load_pt(path / RNG_FILE) if restore_rng else None
    if rng_states is not None and not 0 <= rank < len(rng_states):
        raise CheckpointError(f"{path / RNG_FILE}: holds RNG states for {len(rng_states)} ranks, asked for rank {rank} "
                              f"(saved by a run with another number of processes); resume with the same "
                              f"--nproc_per_node")
    optimizer_state = _load_pt(path / OPTIMIZER_FILE) if optimizer is not None else None
    scheduler_path = path / SCHEDULER_FILE
    if scheduler is not None and not scheduler_path.is_file():
        raise CheckpointError(f"{scheduler_path}: missing (checkpoint saved without a scheduler)")
    scheduler_state = _load_pt(scheduler_path) if scheduler is not None else None

    load_adapter_weights(path / ADAPTER_DIR, model)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not fit the optimizer ({err})") from err
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    if rng_states is not None:
        restore_rng_state(rng_states[rank], source=str(path / RNG_FILE))
    return state


# --------------------------------------------------------------------------------------------------
# Merging


def _resolve_adapter_dir(adapter_dir: Path) -> Path:
    """Accept a checkpoint directory as well as the adapter directory inside it."""
    nested = adapter_dir / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file() and (nested / "adapter_config.json").is_file():
        return nested
    return adapter_dir


def _has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def merge_adapter(
    base_model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    exists: str = "refuse",
) -> Path:
    """Merge a LoRA adapter into its base model and save a standalone model (safetensors).

    The base is loaded at ``dtype`` in full precision, never 4-bit, even if training used NF4: merging
    into quantized weights would round the update away. ``merge_and_unload`` folds ``B @ A * scale``
    into each target weight; the result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    The tokenizer is copied from ``adapter_dir`` if it has one, else from ``base_model_dir``. The model
    is written into a temp directory beside ``out_dir`` and renamed into place; an existing non-empty
    ``out_dir`` is an error unless ``exists="replace"`` (swapped atomically, :func:`pvfast.atomic.publish_dir`).
    ``adapter_dir`` may also be a checkpoint directory. Returns ``out_dir``.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter_dir = _resolve_adapter_dir(Path(adapter_dir))
    out_dir = Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter directory)")
    if exists != "replace" and out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: merge output directory exists and is not empty")
    base_config = AutoConfig.from_pretrained(base_model_dir, trust_remote_code=False)
    if getattr(base_config, "quantization_config", None):
        raise ValueError(f"{base_model_dir}: base model is stored quantized; merging needs full-precision weights")

    base = AutoModelForCausalLM.from_pretrained(
        base_model_dir, dtype=dtype, trust_remote_code=False, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()

    if exists != "replace" and out_dir.exists():
        out_dir.rmdir()  # empty (checked above)
    with atomic.atomic_dir(out_dir, exists=exists) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        fault_point("merge.write", tmp)
        tokenizer_source = adapter_dir if _has_tokenizer(adapter_dir) else Path(base_model_dir)
        if _has_tokenizer(tokenizer_source):
            AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=False).save_pretrained(tmp)
    return out_dir
