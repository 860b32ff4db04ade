"""The training loop: plan the optimizer steps, run them, checkpoint; one readable function.

"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pvfast.config.sections import OptimConfig
from pvfast.model.forward import final_logit_softcap, lm_head_weight, packed_attention_mask
from pvfast.model.precision import autocast
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import LossBatch, epoch_order
from pvfast.train import distributed as dist
from pvfast.train.checkpoint import TrainState, collect_rng_state, load_checkpoint, save_checkpoint
from pvfast.train.errors import STOP, BadInput, Interrupted, NonFiniteLoss, NonFiniteUpdate, deferred_signals
from pvfast.train.faults import fault_point
from pvfast.train.layout import PLOT_FILE
from pvfast.train.metrics_log import peak_memory_mb, plot_curves


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
    without a count is summed. Exact whatever the pack split and the number of ranks. The sums stay on the
    device (no host sync per micro-batch) until :meth:`reduce` reads them once.
    """

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.summed: set[str] = set()
        self.sums: torch.Tensor | None = None  # [loss_sum, normalizer, value·count..., count...] in float64
        self.normalizer = 0.0  # Σ normalizer over micro-batches and ranks, set by reduce

    def add(self, out, counted: bool = True) -> None:
        if self.names is None:
            self.names = sorted(out.metrics)
            self.summed = {n for n in self.names if out.metric_counts.get(n) is None}
        one = torch.ones((), dtype=torch.float64, device=out.loss_sum.device)
        counts = [one if n in self.summed else out.metric_counts[n].detach().to(torch.float64) for n in self.names]
        values = [out.metrics[n].detach().to(torch.float64) * c for n, c in zip(self.names, counts)]
        row = torch.stack([out.loss_sum.detach().to(torch.float64), out.normalizer.detach().to(torch.float64),
                           *values, *counts])
        row = row if counted else torch.zeros_like(row)
        self.sums = row if self.sums is None else self.sums + row

    def reduce(self, ctx) -> dict[str, float]:
        """Sum over the ranks (one all-reduce, one host read), then the step's loss and metric values."""
        total = dist.all_reduce_sum(self.sums, ctx).tolist()
        loss_sum, self.normalizer = total[0], total[1]
        k = len(self.names)
        values, counts = total[2:2 + k], total[2 + k:]
        out = {name: (value if name in self.summed else value / max(count, 1e-30))
               for name, value, count in zip(self.names, values, counts)}
        out["loss"] = loss_sum / self.normalizer
        return out


def accumulate_step(model, local: Sequence[LossBatch], loss_fn: FusedTokenPOLoss,
                    reference: Callable | None, ctx, autocast_mode: str, step_number: int,
                    padding: Sequence[bool] | None = None) -> dict[str, float]:
    """Forward and backward of one optimizer step's micro-batches on this rank.

    Leaves in every trainable parameter's ``.grad`` the gradient of the step's objective over ALL its
    micro-batches on ALL ranks, Σ loss_sum / Σ normalizer (:class:`pvfast.objectives.losses.ObjectiveOutput`):
    the same gradient whatever the pack split and the number of ranks. Returns the step's loss and metrics.
    Raises NonFiniteLoss (on every rank together) before a non-finite loss reaches the gradients.
    ``padding[k]``: micro-batch k only keeps the ranks in step (:func:`pvfast.train.distributed.shard_padding`,
    a repeat at the end of an epoch): it runs forward and backward for DDP's sake and adds nothing.
    """
    inner = dist.unwrap(model)
    device = ctx.device
    totals = StepTotals()
    padding = [False] * len(local) if padding is None else list(padding)
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
            (out.loss_sum * 0.0 if padding[k] else out.loss_sum).backward()
        totals.add(out, counted=not padding[k])  # a padding micro-batch adds zeros (and the metric names)
    sums = totals.reduce(ctx)
    # DDP averaged the ranks' gradients; times world_size / Σ normalizer gives ∇(Σ loss_sum / Σ normalizer).
    scale = ctx.world_size / totals.normalizer
    for param in inner.parameters():
        if param.grad is not None:
            param.grad.mul_(scale)
    return sums


def _all_finite(tensors, device: torch.device) -> torch.Tensor:
    """A 0-dim bool tensor: every value of every tensor is finite (computed on the device, no host sync)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if flags else torch.tensor(True, device=device)


def check_update(grads_finite: torch.Tensor, params: Sequence[torch.Tensor], ctx, step_number: int) -> None:
    """After ``optimizer.step()``: stop (every rank together) when the step's gradients or the updated weights
    hold a NaN or an infinity. A finite loss does not make a finite update (a huge learning rate overflows the
    weights), and a checkpoint of such weights would be resumed from as good. One host sync per step."""
    flags = torch.stack([grads_finite.to(ctx.device), _all_finite((p.detach() for p in params), ctx.device)])
    flags = flags.float()
    if ctx.world_size > 1:  # agree, or a rank that stops leaves the others waiting in an all-reduce
        flags = dist.all_reduce_mean(flags, ctx)
    grads_ok, weights_ok = (flags == 1.0).tolist()
    if not grads_ok:
        raise NonFiniteUpdate(step_number, "gradients")
    if not weights_ok:
        raise NonFiniteUpdate(step_number, "weights after the update")


def check_resume_plan(batches: Sequence[LossBatch], stage) -> None:
    """Refuse (BadInput) a checkpoint that was not saved at the start of one of this run's planned steps: it
    belongs to a run with other data or batching settings. Reads the verified train state; writes nothing."""
    state = stage.resume.state
    if state is None:
        return
    plan = plan_steps(batches, stage.optim, stage.run.seed, stage.ctx.world_size)
    if state.step < len(plan) and (plan[state.step].epoch, plan[state.step].cursor) != (state.epoch,
                                                                                      state.batch_cursor):
        raise BadInput(f"{stage.resume.path}: saved at epoch {state.epoch}, batch {state.batch_cursor}, which is not "
                       f"the start of step {state.step} of this run's plan (other data or batching settings); "
                       f"resume with the settings it was saved with, or start over with --run.overwrite")


@contextlib.contextmanager
def _progress_bar(ctx, total: int, initial: int, title: str):
    """A tqdm bar on rank 0 (None elsewhere), closed however the block ends."""
    if not ctx.is_main:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc=title, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@dataclass
class LoopResult:
    finished: bool  # False: stopped early by run.stop_after_steps (a checkpoint was saved)
    state: TrainState


def train_loop(model, batches: list[LossBatch], loss_fn: FusedTokenPOLoss, reference: Callable | None,
               stage) -> LoopResult:
    """Train ``model``'s trainable (LoRA) weights on ``batches``; checkpoints in ``stage.out_dir``.

    ``stage`` (:class:`pvfast.train.recipe.Stage`) holds the config sections, the rank context, the output
    folder, the metrics log and the verified checkpoint to resume from.

    ``model`` is the (possibly DDP-wrapped, :func:`pvfast.train.distributed.wrap_model`) peft model;
    ``reference(cpu_batch, batch, mask)`` gives the (M, 7) reference statistics of a batch (``cpu_batch`` as
    packed, ``batch`` on the device, the attention mask of both passes), None for reference-free objectives.
    One optimizer step minimises Σ loss_sum / Σ normalizer over all its micro-batches and ranks
    (:class:`StepTotals`), so its gradient is that of the objective over all its records, however they split.
    """
    optim, run, ctx, log = stage.optim, stage.run, stage.ctx, stage.log
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
    checkpoint = stage.resume.path  # verified in full by the recipe (pvfast.train.recipe.check_stage)
    if checkpoint is not None:  # this rank's RNG state; the adapter must fit the model (CheckpointError)
        state = load_checkpoint(checkpoint, inner, optimizer, scheduler, rank=ctx.rank, check_hashes=False)
    check_resume_plan(batches, stage)

    started_at = state.step
    orders: dict[int, list[tuple[int, bool]]] = {}
    model.train()
    with _progress_bar(ctx, total, state.step, stage.title) as progress, deferred_signals():
        while state.step < total:
            step = plan[state.step]
            if step.epoch not in orders:
                order = epoch_order(len(batches), run.seed, step.epoch)
                orders = {step.epoch: list(zip(dist.shard(order, ctx), dist.shard_padding(len(order), ctx)))}
            share = orders[step.epoch][step.cursor:step.cursor + step.rounds]
            local = [batches[i] for i, _ in share]
            tick = time.perf_counter()
            sums = accumulate_step(model, local, loss_fn, reference, ctx, run.autocast, state.step + 1,
                                   padding=[pad for _, pad in share])
            tokens = sum(b.packed.tree_tokens for b in local)
            pairs = sum(b.num_pairs for b in local)
            fault_point(f"{stage.name}.step")
            grad_norm = None
            if optim.grad_clip is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
            lr = scheduler.get_last_lr()[0]
            grads_finite = _all_finite((p.grad for p in params if p.grad is not None), device)
            optimizer.step()
            check_update(grads_finite, params, ctx, state.step + 1)  # nothing of a non-finite step is ever saved
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
                      "tokens_per_s": tokens * ctx.world_size / elapsed,
                      "pairs_per_s": pairs * ctx.world_size / elapsed,
                      "peak_mem_mb": peak_memory_mb(device), "step_time_s": elapsed}
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
                rng_states = dist.gather_objects(collect_rng_state(), ctx)  # every rank resumes with its own
                path = save_checkpoint(stage.out_dir, state, inner, optimizer, scheduler, stage.config_dict,
                                       keep_last=run.keep_last, is_main_process=ctx.is_main,
                                       rng_states=rng_states)
                dist.barrier(ctx)
                if STOP.signum is not None:
                    raise Interrupted(STOP.signum, state.step, path)
                if stop_now and state.step < total:
                    log.say(f"stopped after {run.stop_after_steps} steps (run.stop_after_steps); checkpoint {path}; "
                            f"continue with --run.resume")
                    return LoopResult(False, state)
    if ctx.is_main:
        plot_curves(log.steps(), log.path.parent / PLOT_FILE, stage.title)
    return LoopResult(True, state)
