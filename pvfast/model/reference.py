"""Reference statistics for the reference-adjusted objectives: on the fly, or precomputed once and cached.

The reference is the SFT model. Under LoRA it is the same network with the adapters disabled (torchtune's
LoRA-DPO recipe does the same), so no second copy of the weights is held. Its (M, 7) per-completion
statistics come from the same tree-packed row (:func:`pvfast.model.forward.packed_forward`) and the same fused
op (:meth:`FusedTokenPOLoss.statistics`, hence the same token weights and gate threshold) as the policy's,
under ``torch.no_grad`` and in eval mode (no dropout).

Precomputing (``--precompute-ref``): :func:`precompute_reference` scores every batch once before training
and stores the statistics in one safetensors file; a step then reads them with
:meth:`ReferenceCache.get` instead of running a reference forward. An entry's key follows from what the
statistics depend on: a SHA-256 of the batch's content (token ids, tree structure, scoring rows, token roles
and diff flags) and a hash of the objective settings that turn them into statistics
(``ObjectiveConfig.statistics_settings``: gate τ, token weighting and its weights). A cache computed from
other data, another token budget or other settings has no entry for the batch and is refused with an
error, never read as a wrong reference.

File layout (safetensors, tensors only)::

    stats/<sha256 of batch content>-<settings hash>   (M, 7) float32, rows in the batch's segment order
    metadata: format, entries
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from pvfast.atomic import TMP_PREFIX
from pvfast.model.forward import final_logit_softcap, lm_head_weight, packed_forward
from pvfast.model.precision import autocast, autocast_dtype
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import LossBatch

CACHE_FORMAT = "pvfast-reference-v2"  # v2: keys carry the objective settings; v1 files are recomputed
_HASHED_FIELDS = ("input_ids", "position_ids", "subtree_end", "score_positions", "score_targets",
                  "score_segments", "score_roles", "score_diff")  # everything the statistics of a row depend on


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode inside the block (no dropout), every module's own training flag restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def frozen_model_stats(model, batch: LossBatch, loss_fn: FusedTokenPOLoss, attention_mask=None) -> torch.Tensor:
    """(M, 7) statistics of ``model`` as it is (no grad, eval mode) on ``batch``.

    ``attention_mask``: the mask of :func:`pvfast.model.forward.packed_attention_mask` to reuse (the policy pass
    of the same row builds the same one).
    """
    with torch.no_grad(), _eval_mode(model):
        hidden = packed_forward(model, batch.packed, attention_mask)
        return loss_fn.statistics(batch.scoring_rows(hidden), lm_head_weight(model, allow_softcap=True),
                                  softcap=final_logit_softcap(model))


def reference_stats(model, batch: LossBatch, loss_fn: FusedTokenPOLoss, attention_mask=None) -> torch.Tensor:
    """(M, 7) reference statistics: ``model`` with its LoRA adapters disabled, no grad, on ``batch``.

    Raises TypeError for a model without adapters (a plain model *is* its own policy, so disabling nothing
    would give a zero margin): wrap it with peft, or precompute a cache from the reference model with
    ``precompute_reference(..., disable_adapters=False)``. Raises ValueError for a reference-free objective.
    """
    if not loss_fn.needs_reference:
        raise ValueError(f"objective {loss_fn.objective!r} is reference-free; it takes no reference statistics")
    if not hasattr(model, "disable_adapter"):
        raise TypeError(f"reference_stats needs a peft model (the reference is the same network with its LoRA "
                        f"adapters disabled), got {type(model).__name__}; wrap it with peft, or precompute a "
                        f"reference cache from the reference model (precompute_reference(..., "
                        f"disable_adapters=False))")
    with model.disable_adapter():
        return frozen_model_stats(model, batch, loss_fn, attention_mask)


def batch_key(batch: LossBatch) -> str:
    """SHA-256 (hex) of a row's content: tokens, tree, scoring rows, roles and diff flags.

    Computed once per batch object and kept on it (a copy made by ``LossBatch.to`` keeps it), so a step
    looks its reference up without hashing, or copying device tensors back, again.
    """
    if batch.content_key is None:
        batch.content_key = _content_hash(batch)
    return batch.content_key


def _content_hash(batch: LossBatch) -> str:
    digest = hashlib.sha256()
    for name in _HASHED_FIELDS:
        tensor = getattr(batch.packed, name).detach().cpu().contiguous()
        # dtype and shape in the hash: equal bytes under a different layout are different content
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def settings_key(loss_fn: FusedTokenPOLoss) -> str:
    """A short hash of the objective settings that shape the statistics of an unchanged batch (gate τ, token
    weighting and its weights: ``ObjectiveConfig.statistics_settings``)."""
    settings = json.dumps(loss_fn.config.statistics_settings(), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def entry_key(batch: LossBatch, loss_fn: FusedTokenPOLoss) -> str:
    """The cache key of ``batch`` under ``loss_fn``: its content hash and the objective's settings hash."""
    return f"{batch_key(batch)}-{settings_key(loss_fn)}"


def reference_fingerprint(model, autocast_mode: str = "off", device: torch.device | str | None = None) -> str:
    """A short hash of what the reference statistics depend on beyond the batch and the objective: the
    reference weights (every non-LoRA parameter: names, shapes, dtypes and a sample of its values), the
    precision of the pass, the final-logit soft-capping and the attention implementation.

    A cache computed from another SFT model, precision or attention is refused by it, never read.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue  # the reference is the network with its adapters disabled
        flat = param.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", copy=True).contiguous()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = autocast_dtype(autocast_mode, device)
    config = getattr(model, "config", None)
    digest.update(f"precision={dtype};softcap={final_logit_softcap(model)};"
                  f"attention={getattr(config, '_attn_implementation', None)}".encode())
    return digest.hexdigest()[:16]


class ReferenceCache:
    """Precomputed reference statistics by batch content and objective settings (module docstring).

    ``get(batch, loss_fn) -> (M, 7)`` float32; a batch or a setting the cache was not computed for is a
    clear error, never a wrong reference.
    """

    def __init__(self, stats: dict[str, torch.Tensor], path: Path | None = None, fingerprint: str | None = None):
        self._stats = stats
        self.path = path
        self.fingerprint = fingerprint  # reference_fingerprint of the model and precision it was scored with

    def __len__(self) -> int:
        return len(self._stats)

    def has(self, batch: LossBatch, loss_fn: FusedTokenPOLoss) -> bool:
        return entry_key(batch, loss_fn) in self._stats

    def get(self, batch: LossBatch, loss_fn: FusedTokenPOLoss,
            device: torch.device | str | None = None) -> torch.Tensor:
        """(M, 7) statistics of ``batch`` (pass the CPU batch: its content is hashed once and kept) under
        ``loss_fn``'s settings, on ``device`` (default: the device of the batch's tensors)."""
        key = entry_key(batch, loss_fn)
        stats = self._stats.get(key)
        where = f"reference cache {self.path}" if self.path is not None else "reference cache"
        if stats is None:
            raise KeyError(f"{where} has no entry for this batch ({batch.packed.num_segments} completions, "
                           f"records {list(batch.record_ids[:3])}{'...' if len(batch.record_ids) > 3 else ''}, "
                           f"key {key[:12]}...{key[-16:]}): it was computed from other data, another token budget "
                           f"or other objective settings (token weights, gate τ); delete it and precompute again")
        if stats.shape[0] != batch.packed.num_segments:  # only a corrupted file gets here
            raise ValueError(f"{where}: entry {key[:12]} has {stats.shape[0]} rows for "
                             f"{batch.packed.num_segments} completions")
        return stats.to(batch.packed.input_ids.device if device is None else device)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
        tensors = {f"stats/{key}": value.detach().cpu().contiguous() for key, value in self._stats.items()}
        try:
            metadata = {"format": CACHE_FORMAT, "entries": str(len(self._stats)), "reference": self.fingerprint or ""}
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceCache:
        """Read a cache file (ValueError naming the file when it is not one of this format)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != CACHE_FORMAT:
                    raise ValueError(f"{path}: not a pvfast reference cache of this version (format "
                                     f"{metadata.get('format')!r}, expected {CACHE_FORMAT!r})")
                stats = {name.removeprefix("stats/"): handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path}: unreadable reference cache ({err})") from err
        return cls(stats, path, metadata.get("reference") or None)


def precompute_reference(
    model,
    batches: Iterable[LossBatch],
    loss_fn: FusedTokenPOLoss,
    cache_path: str | os.PathLike,
    *,
    disable_adapters: bool = True,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    autocast_mode: str = "off",
) -> ReferenceCache:
    """Score every batch once with the reference and store the statistics at ``cache_path``.

    Args:
        model: a peft model whose adapters are disabled for scoring (``disable_adapters=True``), or the
            reference model itself (``disable_adapters=False``, scored as it is).
        batches: the training batches (any device; each is moved to ``device`` for scoring).
        loss_fn: the loss of the run (its objective settings shape the statistics and are part of the key).
        device: where to score (None: where each batch already is).
        overwrite: replace an existing file that does not cover ``batches``; without it such a file is an
            error (it belongs to other data), and a file that covers every batch is reused as is.
        autocast_mode: the run's precision (``RunConfig.autocast``): the reference is scored under the same
            precision as the policy pass, so the two agree to the bit while the policy equals the reference.
    Returns:
        the cache, loaded back from disk (what a resumed run reads).
    """
    path = Path(cache_path)
    batches: Sequence[LossBatch] = list(batches)
    fingerprint = reference_fingerprint(model, autocast_mode, device)
    cache = None
    if path.exists() and not overwrite:
        try:
            cache = ReferenceCache.load(path)
        except ValueError as err:  # an older format or a damaged file: the reference is derived data
            warnings.warn(f"{err}; scoring the reference again", stacklevel=2)
    if cache is not None:
        if cache.fingerprint != fingerprint:
            raise ValueError(f"{path} was scored with another reference model, precision or attention "
                             f"(fingerprint {cache.fingerprint}, this run {fingerprint}); delete it or pass "
                             f"overwrite=True")
        missing = sum(not cache.has(batch, loss_fn) for batch in batches)
        if missing:
            raise ValueError(f"{path} exists but has no entry for {missing} of {len(batches)} batches (it was "
                             f"computed from other data or objective settings); delete it or pass overwrite=True")
        return cache
    score = reference_stats if disable_adapters else frozen_model_stats
    stats = {}
    for batch in batches:
        key = entry_key(batch, loss_fn)
        if key not in stats:  # identical rows (e.g. duplicated records) are scored once
            scored = batch if device is None else batch.to(device)
            with autocast(autocast_mode, scored.packed.input_ids.device):
                stats[key] = score(model, scored, loss_fn).float().cpu()
    ReferenceCache(stats, fingerprint=fingerprint).save(path)
    return ReferenceCache.load(path)
