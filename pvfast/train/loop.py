"""The training loop: plan the optimizer steps, run them, checkpoint; one readable function.

"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pvfast.config.sections import OptimConfig, RunConfig
from pvfast.config.serialize import config_differences
from pvfast.model.forward import final_logit_softcap, lm_head_weight, packed_attention_mask
from pvfast.model.precision import autocast
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import LossBatch, epoch_order
from pvfast.train import distributed as dist
from pvfast.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from pvfast.train.errors import STOP, BadInput, Interrupted, NonFiniteLoss
from pvfast.train.layout import PLOT_FILE
from pvfast.train.metrics_log import MetricsLog, _peak_memory_mb, plot_curves

# Resolved-config keys that may change between a run and its resumption without a warning.
_RESUME_KEYS_IGNORED = ("run.resume", "run.stop_after_steps")


@dataclass(frozen=True)
class Step:
    """One optimizer step: epoch, the first round's index in the epoch order, and how many rounds.

    A round is one micro-batch per rank (rank r takes position r of the round); with one process a round
    is one micro-batch.
    """

    epoch: int
    cursor: int
    rounds: int


def plan_steps(batches: Sequence[LossBatch], optim: OptimConfig, seed: int, world_size: int) -> list[Step]:
    """Every optimizer step of the run, a pure function of the packs, the config and the seed.

    Gradient accumulation by token budget: rounds are added to a step until their scored tokens (all ranks
    together) reach ``optim.tokens_per_step``; the last step of an epoch may be short. Planning over the
    whole run up front gives the schedule its exact length and makes resuming a lookup.
    """
    plan: list[Step] = []
    per_epoch = -(-len(batches) // world_size)
    for epoch in range(optim.epochs):
        order = epoch_order(len(batches), seed, epoch)
        start, tokens = 0, 0
        for r in range(per_epoch):
            tokens += sum(batches[order[i % len(order)]].packed.num_scored
                          for i in range(r * world_size, (r + 1) * world_size))
            if optim.tokens_per_step is None or tokens >= optim.tokens_per_step or r == per_epoch - 1:
                plan.append(Step(epoch, start, r + 1 - start))
                start, tokens = r + 1, 0
    return plan if optim.max_steps is None else plan[:optim.max_steps]


def lr_multiplier(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine/linear decay to 0 (or constant)."""
    warmup = math.ceil(optim.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never 0: the first step already moves the weights
    if optim.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total - warmup, 1)
    if optim.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StepTotals:
    """One optimizer step's loss and metrics as sums over its micro-batches, then over the ranks.

    The loss is Σ loss_sum / Σ normalizer; a metric that is a mean is Σ (mean · count) / Σ count, a metric
    without a count is summed. Exact whatever the pack split and the number of ranks.
    """

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.normalizer = 0.0
        self.values: dict[str, float] = {}
        self.counts: dict[str, float | None] = {}

    def add(self, out, loss_sum: float) -> None:
        self.loss_sum += loss_sum
        self.normalizer += float(out.normalizer)
        for name, value in out.metrics.items():
            count = out.metric_counts.get(name)
            weight = 1.0 if count is None else float(count)
            self.values[name] = self.values.get(name, 0.0) + float(value) * weight
            if count is None:
                self.counts[name] = None
            else:
                self.counts[name] = (self.counts.get(name) or 0.0) + weight

    def reduce(self, ctx) -> dict[str, float]:
        """Sum over the ranks (one all-reduce), then the step's loss and metric values."""
        names = sorted(self.values)
        local = [self.loss_sum, self.normalizer, *(self.values[n] for n in names),
                 *(self.counts[n] or 0.0 for n in names)]
        total = dist.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=ctx.device), ctx).tolist()
        self.loss_sum, self.normalizer = total[0], total[1]
        values, counts = total[2:2 + len(names)], total[2 + len(names):]
        out = {name: (value if self.counts[name] is None else value / max(count, 1e-30))
               for name, value, count in zip(names, values, counts)}
        out["loss"] = self.loss_sum / self.normalizer
        return out


def accumulate_step(model, local: Sequence[LossBatch], loss_fn: FusedTokenPOLoss,
                    reference: Callable | None, ctx, autocast_mode: str, step_number: int) -> dict[str, float]:
    """Forward and backward of one optimizer step's micro-batches on this rank.

    Leaves in every trainable parameter's ``.grad`` the gradient of the step's objective over ALL its
    micro-batches on ALL ranks, Σ loss_sum / Σ normalizer (:class:`pvfast.objectives.losses.ObjectiveOutput`):
    the same gradient whatever the pack split and the number of ranks. Returns the step's loss and metrics.
    Raises NonFiniteLoss (on every rank together) before a non-finite loss reaches the gradients.
    """
    inner = dist.unwrap(model)
    device = ctx.device
    totals = StepTotals()
    for k, cpu_batch in enumerate(local):
        batch = cpu_batch.to(device)
        mask = packed_attention_mask(inner, batch.packed)  # shared by the reference and policy passes
        # DDP all-reduces on the last micro-batch of the step only (one sync per optimizer step).
        sync = contextlib.nullcontext() if k == len(local) - 1 or not hasattr(model, "no_sync") \
            else model.no_sync()
        with sync:
            # Reference and policy under one precision: with LoRA B = 0 they agree to the bit.
            with autocast(autocast_mode, device):
                ref = reference(cpu_batch, batch, mask) if reference is not None else None
                hidden = dist.packed_hidden(model, batch.packed, mask)
                out = loss_fn(batch.scoring_rows(hidden), lm_head_weight(inner, allow_softcap=True), batch.pairs,
                              ref, softcap=final_logit_softcap(inner))
            loss_sum = out.loss_sum.item()  # one sync per micro-batch: needed to refuse a NaN before it lands
            finite = math.isfinite(loss_sum)
            if ctx.world_size > 1:  # all ranks stop together, or the others wait in the next all-reduce
                finite = dist.all_reduce_mean(torch.tensor(float(finite), device=device), ctx).item() == 1.0
            if not finite:
                raise NonFiniteLoss(step_number, cpu_batch.record_ids if not math.isfinite(loss_sum) else (),
                                    loss_sum)
            # The step's objective is one ratio over every micro-batch of every rank: backpropagate the sums
            # now, divide once the step's total normalizer is known (below).
            out.loss_sum.backward()
        totals.add(out, loss_sum)
    sums = totals.reduce(ctx)
    # DDP averaged the ranks' gradients; times world_size / Σ normalizer gives ∇(Σ loss_sum / Σ normalizer).
    scale = ctx.world_size / totals.normalizer
    for param in inner.parameters():
        if param.grad is not None:
            param.grad.mul_(scale)
    return sums


@dataclass
class LoopResult:
    finished: bool  # False: stopped early by run.stop_after_steps (a checkpoint was saved)
    state: TrainState


def train_loop(model, batches: list[LossBatch], loss_fn: FusedTokenPOLoss,
               reference: Callable[[LossBatch, object], torch.Tensor] | None, optim: OptimConfig, run: RunConfig,
               out_dir: Path, ctx, config_dict: dict, log: MetricsLog, title: str) -> LoopResult:
    """Train ``model``'s trainable (LoRA) weights on ``batches``; checkpoints in ``out_dir``.

    ``model`` is the (possibly DDP-wrapped, :func:`pvfast.train.distributed.wrap_model`) peft model;
    ``reference(cpu_batch, batch, mask)`` gives the (M, 7) reference statistics of a batch (``cpu_batch`` as
    packed, ``batch`` on the device, the attention mask of both passes), None for reference-free objectives.
    One optimizer step minimises Σ loss_sum / Σ normalizer over all its micro-batches and ranks
    (:class:`StepTotals`), so its gradient is that of the objective over all its records, however they split.
    """
    inner = dist.unwrap(model)
    device = ctx.device
    params = [p for p in inner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay,
                                  fused=optim.fused and device.type == "cuda")  # one kernel for all tensors
    plan = plan_steps(batches, optim, run.seed, ctx.world_size)
    total = len(plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, optim))

    state = TrainState()
    checkpoint = latest_checkpoint(out_dir) if run.resume else None
    if checkpoint is not None:
        diffs = [k for k in config_differences(read_checkpoint_config(checkpoint), config_dict)
                 if k not in _RESUME_KEYS_IGNORED]
        if diffs:
            warnings.warn(f"resuming {checkpoint} with a changed config: {', '.join(diffs)}", stacklevel=2)
        state = load_checkpoint(checkpoint, inner, optimizer, scheduler, rank=ctx.rank)
        log.say(f"resumed from {checkpoint} at step {state.step}")
    if state.step < total and (plan[state.step].epoch, plan[state.step].cursor) != (state.epoch,
                                                                                      state.batch_cursor):
        raise BadInput(f"{checkpoint}: saved at epoch {state.epoch}, batch {state.batch_cursor}, which is not the "
                       f"start of step {state.step} of this run's plan (other data or batching settings)")

    progress = None
    if ctx.is_main:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=state.step, desc=title, dynamic_ncols=True)
    started_at = state.step
    orders: dict[int, list[int]] = {}
    model.train()
    while state.step < total:
        step = plan[state.step]
        if step.epoch not in orders:
            orders = {step.epoch: dist.shard(epoch_order(len(batches), run.seed, step.epoch), ctx)}
        local = [batches[i] for i in orders[step.epoch][step.cursor:step.cursor + step.rounds]]
        tick = time.perf_counter()
        sums = accumulate_step(model, local, loss_fn, reference, ctx, run.autocast, state.step + 1)
        tokens = sum(b.packed.tree_tokens for b in local)
        pairs = sum(b.num_pairs for b in local)
        grad_norm = None
        if optim.grad_clip is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - tick

        state.step += 1
        state.tokens_seen += tokens * ctx.world_size
        if state.step < total:
            state.epoch, state.batch_cursor = plan[state.step].epoch, plan[state.step].cursor
        else:
            state.epoch, state.batch_cursor = optim.epochs, 0
        record = {"step": state.step, "epoch": step.epoch, "lr": lr, **sums, "micro_batches": len(local),
                  "scored_tokens": sum(b.packed.num_scored for b in local) * ctx.world_size,
                  "tokens_per_s": tokens * ctx.world_size / elapsed, "pairs_per_s": pairs * ctx.world_size / elapsed,
                  "peak_mem_mb": _peak_memory_mb(device), "step_time_s": elapsed}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if state.step % run.log_every == 0 or state.step == total:
            log.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "margin", "reward_accuracy",
                                                                   "gated_fraction", "tokens_per_s", "lr")
                                  if k in record}, refresh=False)

        stop_now = run.stop_after_steps is not None and state.step - started_at >= run.stop_after_steps
        if state.step % run.save_every == 0 or state.step == total or stop_now or STOP.signum is not None:
            path = save_checkpoint(out_dir, state, inner, optimizer, scheduler, config_dict,
                                   keep_last=run.keep_last, is_main_process=ctx.is_main)
            dist.barrier(ctx)
            if STOP.signum is not None:
                raise Interrupted(STOP.signum, state.step, path)
            if stop_now and state.step < total:
                log.say(f"stopped after {run.stop_after_steps} steps (run.stop_after_steps); checkpoint {path}; "
                        f"continue with --run.resume")
                return LoopResult(False, state)
    if progress is not None:
        progress.close()
    if ctx.is_main:
        plot_curves(log.steps(), log.path.parent / PLOT_FILE, title)
    return LoopResult(True, state)
