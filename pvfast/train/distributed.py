"""More than one process: PyTorch DDP under ``torchrun`` (NCCL on GPUs, gloo on the CPU).

    torchrun --nproc_per_node 8 -m pvfast.train po ...        # one process per GPU, NCCL
    torchrun --nproc_per_node 2 -m pvfast.train --device cpu  # two CPU processes, gloo

Every rank loads the same base model and the same LoRA init (seeded), builds the same packs in the same
order, and takes its own share of them (:func:`shard`). After each backward DDP averages the adapter
gradients over the ranks, so every rank applies the same AdamW update and the adapters stay identical; only
rank 0 logs and writes checkpoints (``ctx.is_main``).

How a step goes through DDP
---------------------------
DDP averages gradients only for a backward whose graph was built by a call of the *DDP wrapper* (its
forward arms the gradient hooks). pvfast's packed forward runs the decoder directly, which would bypass the
wrapper and leave every rank with its own gradient, silently. So :func:`wrap_model` wraps the model in
:class:`PackedDecoder` (an ``nn.Module`` whose forward is :func:`pvfast.model.forward.packed_forward`) and DDP wraps
that; :func:`packed_hidden` is the one call the trainer makes for the policy pass, wrapped or not::

    ctx = setup_distributed()                       # world_size 1 without torchrun
    model = wrap_model(load_lora_model(...).to(ctx.device), ctx)
    for index in shard(epoch_order(len(batches), seed, epoch), ctx):
        batch = batches[index].to(ctx.device)
        mask = packed_attention_mask(unwrap(model), batch.packed)
        ref = reference_stats(unwrap(model), batch, loss_fn, mask)            # no grad: no DDP needed
        hidden = packed_hidden(model, batch.packed, mask)                     # through DDP: grads sync
        out = loss_fn(batch.scoring_rows(hidden), lm_head_weight(unwrap(model)), batch.pairs, ref)
        out.loss_sum.backward()                    # all-reduce here; then grads *= world_size / Σ normalizer
    cleanup(ctx)

Gradient accumulation: wrap the backward of every micro-batch but the last of an optimizer step in
``model.no_sync()`` (one all-reduce per step instead of one per micro-batch). DDP's all-reduce is a *mean*
over ranks; the trainer (:func:`pvfast.train.loop.accumulate_step`) backpropagates each micro-batch's loss
*sum*, all-reduces the step's normaliser and scales the averaged gradient by world_size / Σ normaliser, so the
update is that of the objective over every record of the step, however the ranks split them.

Equal step counts: every rank must run the same number of synchronised backwards, or the ranks that finish
early leave the others waiting in an all-reduce forever. :func:`shard` therefore pads the item list by
wrapping around to its start until it divides evenly (the ``DistributedSampler`` convention); the trainer
runs those repeats (:func:`shard_padding`) with a zero loss and counts nothing of them, so no item is
weighted twice.

Frozen weights are not broadcast: DDP normally copies every parameter from rank 0 at construction. Under
LoRA the base weights are frozen and every rank loads them from the same checkpoint, so only trainable
parameters (the adapters, seeded identically) and buffers are synchronised; this also keeps bitsandbytes'
4-bit weights (whose quantisation state is not a tensor DDP knows about) out of the broadcast.

FSDP for models that do not fit one GPU — documented, NOT implemented
--------------------------------------------------------------------
DDP keeps a whole copy of the model on every GPU. For Llama-3.3-70B in 4-bit (~35 GB of weights plus
activations at a 16k token budget) that is too much for one 80 GB card in training; the path is FSDP, and
pvfast does not implement it yet (``pvfast.train.recipe`` refuses nothing here: it simply has no FSDP option).
What it would take:

1. QLoRA weights FSDP can shard: load with ``BitsAndBytesConfig(load_in_4bit=True,
   bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16,
   bnb_4bit_quant_storage=torch.bfloat16)``. The storage dtype makes the packed 4-bit weights bf16 tensors,
   so FSDP can flatten them together with the bf16 LoRA and norm weights (FSDP needs one dtype per flat
   parameter).
2. ``FullyShardedDataParallel(model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
   transformer_layer_cls={LlamaDecoderLayer})`` (``Qwen2DecoderLayer`` for Qwen2): one FSDP unit per decoder
   layer, so only one layer's full weights are gathered at a time; ``use_orig_params=True`` because only
   the LoRA parameters train (frozen and trainable weights share flat parameters, and the optimizer must
   see the original LoRA tensors); ``limit_all_gathers=True``; bf16 ``MixedPrecision`` for parameters,
   fp32 for the gradient reduction of the adapters.
3. Gradient checkpointing per decoder layer (``apply_activation_checkpointing`` with the same layer check),
   the packed forward through the FSDP root (the same rule as DDP above: :class:`PackedDecoder` as the root
   module), and the reference pass with adapters disabled under ``no_grad`` (it gathers the same shards).
4. Checkpoints: only the adapter is saved, gathered on rank 0 with ``FullStateDictConfig(offload_to_cpu=
   True, rank0_only=True)``; the optimizer state through ``FSDP.optim_state_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pvfast.model.forward import packed_forward
from pvfast.packing.tree import PackedBatch

DEVICE_PREFS = ("auto", "cuda", "cpu")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run.

    rank: global rank in [0, world_size); world_size: number of processes (1 without torchrun);
    local_rank: rank on this machine (the CUDA device index); device: this process's device;
    is_main: rank 0, the process that logs and writes checkpoints.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when a process group is in use (world_size > 1)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def _pick_device(device_pref: str, local_rank: int) -> torch.device:
    if device_pref not in DEVICE_PREFS:
        raise ValueError(f"device must be one of {DEVICE_PREFS}, got {device_pref!r}")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s); start at most "
                           f"{count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", local_rank)


def setup_distributed(device_pref: str = "auto") -> DistContext:
    """Read torchrun's environment and join the process group; a plain single process without torchrun.

    ``device_pref``: "auto" (CUDA when available, else CPU), "cuda" or "cpu". On CUDA the process's device
    is ``cuda:LOCAL_RANK`` (set as the current device) and the backend NCCL; on the CPU the backend is gloo.
    Without torchrun's variables (or with WORLD_SIZE=1) nothing is initialised and world_size is 1.
    A process group that is already initialised (e.g. by the caller) is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
                         f"LOCAL_RANK={local_rank}")
    device = _pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; start the run with "
                               f"torchrun (which sets {', '.join(_TORCHRUN_VARS)})")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def shard(items: Sequence, ctx: DistContext) -> list:
    """This rank's share of ``items``: every rank gets ``ceil(len(items) / world_size)`` of them.

    Rank r takes positions r, r + W, r + 2W, ... of ``items`` padded by wrapping around to its start
    (position i is ``items[i % len(items)]``), so shares are disjoint until the padding, cover every item,
    and have equal lengths: DDP needs every rank to run the same number of steps (module docstring). Every
    rank must pass the same sequence in the same order (e.g. ``epoch_order(n, seed, epoch)``). Empty
    ``items`` give an empty share on every rank.
    """
    n = len(items)
    if n == 0:
        return []
    per_rank = -(-n // ctx.world_size)
    return [items[i % n] for i in range(ctx.rank, per_rank * ctx.world_size, ctx.world_size)]


def shard_padding(n: int, ctx: DistContext) -> list[bool]:
    """Aligned with ``shard(items, ctx)`` for ``len(items) == n``: whether each position of this rank's share
    is padding (a wrapped-around repeat). The trainer runs such a micro-batch for DDP's sake and counts
    nothing of it, so an epoch's objective covers every item exactly once."""
    if n == 0:
        return []
    per_rank = -(-n // ctx.world_size)
    return [i >= n for i in range(ctx.rank, per_rank * ctx.world_size, ctx.world_size)]


class PackedDecoder(nn.Module):
    """The module DDP wraps: ``forward(batch, attention_mask) -> (L, H)`` last hidden states.

    Its forward is :func:`pvfast.model.forward.packed_forward` on ``self.model`` (a causal LM, peft-wrapped or
    not), so the packed policy pass goes through DDP's forward and its gradients are all-reduced.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, attention_mask=None) -> torch.Tensor:
        return packed_forward(self.model, batch, attention_mask)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(PackedDecoder(model))`` when world_size > 1, else ``model`` unchanged.

    ``model`` must already be on ``ctx.device``. ``find_unused_parameters=False``: every trainable parameter
    (every LoRA adapter) takes part in every packed forward, and searching the graph for unused ones costs a
    traversal per step. Only parameters with ``requires_grad`` are broadcast from rank 0 and all-reduced
    (module docstring). Run the policy pass with :func:`packed_hidden`.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    root = PackedDecoder(model)
    frozen = [name for name, p in root.named_parameters() if not p.requires_grad]
    if len(frozen) == sum(1 for _ in root.parameters()):
        raise ValueError("wrap_model: the model has no trainable parameters (attach the LoRA adapters first)")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(root, frozen)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(root, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside :func:`wrap_model`'s wrapper (the model itself when it is not wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, PackedDecoder):
        model = model.model
    return model


def packed_hidden(model: nn.Module, batch: PackedBatch, attention_mask=None) -> torch.Tensor:
    """(L, H) last hidden states of the policy on one packed row, through DDP when ``model`` is wrapped.

    Use this, not :func:`pvfast.model.forward.packed_forward` on the inner model, for every pass whose loss is
    backpropagated: only a forward through the wrapper makes the backward all-reduce the gradients.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model(batch, attention_mask)
    return packed_forward(model, batch, attention_mask)


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, as a new tensor (for logging losses and metrics; no autograd).

    With world_size 1 the (detached) tensor itself is returned. Integer tensors are refused: their mean
    is not an integer.
    """
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}")
    if not ctx.distributed:
        return tensor.detach()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(ctx.world_size)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, as a new tensor (no autograd); the tensor itself with one process."""
    if not ctx.distributed:
        return tensor.detach()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj, ctx: DistContext) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, e.g. RNG states for a
    checkpoint); ``[obj]`` in a single process."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if not ctx.distributed:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op in a single process or when none is initialised)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _current_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def rank0_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only (the rank from the process group, else from $RANK, else 0)."""
    if _current_rank() == 0:
        print(*args, **kwargs)
