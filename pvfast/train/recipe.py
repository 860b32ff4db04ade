"""``python -m pvfast.train.recipe``: SFT, preference optimization (TAB-PO and baselines), or the whole pipeline.

Run commands::

    python -m pvfast.train.recipe                                   # pipeline, preset "tiny": CPU, a few minutes
    python -m pvfast.train.recipe sft --run.device cpu --optim.max_steps 20 --run.output_dir runs/sft-cpu
    python -m pvfast.train.recipe sft --preset qwen2.5-1.5b --data.train train.jsonl --data.validation val.jsonl
    python -m pvfast.train.recipe po --preset llama-3.1-8b --sft_adapter runs/sft/adapter --data.train prefs.jsonl \\
        --po.objective dpo --po.precompute_ref
    python -m pvfast.train.recipe pipeline --preset qwen2.5-1.5b --run.resume          # continue an interrupted run
    torchrun --nproc_per_node 2 -m pvfast.train.recipe pipeline --preset qwen2.5-1.5b  # DDP, one process per GPU
    torchrun --nproc_per_node 2 -m pvfast.train.recipe sft --run.device cpu            # DDP on the CPU (gloo)

What a run does, top to bottom (``main``)::

    parse the command line -> resolve the config (print it, save it as output_dir/config.json)
    read every data file (refused files stop here, exit 2, before any model is loaded)
    stage sft       examples -> tree-packed SFT batches -> train a LoRA -> output_dir/adapter
    stage po        SFT adapter merged into the base (the reference = that model) -> preference records
                    (from data.train, or built from the SFT model's validation predictions, SPEC §4)
                    -> tree-packed pair batches -> train a new LoRA on top -> output_dir/adapter
    stage pipeline  sft (output_dir/sft) -> po (output_dir/po) -> greedy evaluation on the test split
                    (table printed, output_dir/eval_report.json)

Why PO trains a new adapter on the merged SFT model: the reference of SPEC §3 is the SFT model, and with the
SFT adapter folded into the base weights, "the policy with its adapters disabled" (the reference pass of
:func:`pvfast.model.reference.reference_stats`) is exactly that model, with no second copy of the weights. For
``--model.quant nf4`` the merge is done in full precision (:func:`pvfast.train.checkpoint.merge_adapter` never
merges into 4-bit weights) and the merged model is quantized again when it is loaded, as QLoRA does.

Each training stage writes into its directory: ``metrics.jsonl`` (a packing line, then one line per logged
step), ``training_curves.png``, ``checkpoints/step-*`` (every ``run.save_every`` steps and at the end),
``adapter/`` (PEFT format) and, with ``run.merge_adapter``, ``merged/`` (a standalone full-precision model;
for PO the adapter is merged into the PO base, so ``po/merged`` is the final SFT + PO model).
``--run.resume`` continues each stage from its newest complete checkpoint (a finished stage is skipped);
without it a directory holding an earlier run's checkpoints is refused (exit 2) unless ``--run.overwrite``
(the ``tiny`` demo preset sets it) removes them. ``--run.stop_after_steps N`` ends an invocation
after N optimizer steps with a checkpoint (time-boxed jobs on shared machines); ``--run.resume`` goes on
from there to the same weights as an uninterrupted run (bitwise on the CPU). Gradient accumulation:
``--optim.tokens_per_step T`` sums micro-batches until T scored tokens, each weighted by its share of the
step's pairs (PO) or scored tokens (SFT). Patient message and span text are never logged.

Exit status: 0 done (or stopped by ``run.stop_after_steps`` with a checkpoint), 1 model cannot be loaded,
2 bad config or data (nothing was trained), 3 non-finite loss (the step and the batch's record ids are
printed; the last good checkpoint is kept), 130 / 143 interrupted by SIGINT / SIGTERM after saving a
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pvfast.config.stages import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    config_to_dict,
    format_config,
    load_config,
    parse_cli,
    save_config,
)
from pvfast.data.io import (
    DataError,
    load_examples,
    load_preferences,
    read_jsonl,
    write_preferences,
)
from pvfast.data.jsonfmt import parse_output
from pvfast.data.pairs import (
    PairConfig,
    make_preference_records,
    tables_from_outputs,
    write_confusion_csv,
)
from pvfast.data.prompt import PromptTemplate, TemplateError
from pvfast.data.records import Example, PreferenceRecord
from pvfast.data.synth import default_corpus, split_corpus
from pvfast.eval.metrics import render_table
from pvfast.eval.scoring import evaluate_outputs, report_json
from pvfast.model.forward import lm_head_weight, packed_attention_mask
from pvfast.model.generation import generate_completions
from pvfast.model.loading import (
    ModelLoadError,
    load_model,
    load_tokenizer,
    model_source,
)
from pvfast.model.reference import precompute_reference, reference_stats
from pvfast.objectives.class_balance import attach_class_balance, class_balance_weights
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.objectives.losses import ObjectiveConfig
from pvfast.packing.loss_batch import (
    LossBatch,
    PackingStats,
    epoch_order,
    fit_to_budget,
    make_loss_batches,
    preference_groups,
    sft_groups,
)
from pvfast.packing.tree import CompletionGroup
from pvfast.train import distributed as dist
from pvfast.train.checkpoint import (
    TrainState,
    config_differences,
    latest_checkpoint,
    load_checkpoint,
    merge_adapter,
    read_checkpoint_config,
    save_checkpoint,
)

EXIT_OK = 0
EXIT_MODEL = 1
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_SIGNAL_BASE = 128  # + signal number: 130 for SIGINT, 143 for SIGTERM (the shell convention)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
REPORT_FILE = "eval_report.json"
REFERENCE_CACHE_FILE = "reference_cache.safetensors"
SFT_MERGED_DIR = "sft_merged"  # the PO stage's base: SFT adapter folded into the base weights
# Resolved-config keys that may change between a run and its resumption without a warning.
_RESUME_KEYS_IGNORED = ("run.resume", "run.stop_after_steps")


class BadInput(Exception):
    """Config, template or data the run cannot use; printed as is, exit 2."""


class NonFiniteLoss(RuntimeError):
    """A micro-batch produced a NaN or infinite loss; names the step and the records (ids only)."""

    def __init__(self, step: int, record_ids: Sequence[str], value: float):
        shown = list(record_ids[:8]) + (["..."] if len(record_ids) > 8 else [])
        where = f"in the batch of records {shown}" if record_ids else "on another rank"
        super().__init__(f"non-finite loss ({value}) at optimizer step {step} {where}; "
                         f"stopping without applying it (the last good checkpoint is kept)")
        self.step = step


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at ``step``."""

    def __init__(self, signum: int, step: int, path: Path | None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}; checkpoint {path}")
        self.signum = signum


# --------------------------------------------------------------------------------------------------
# Signals: set a flag, act on it between optimizer steps (a checkpoint mid-step would be inconsistent)
# --------------------------------------------------------------------------------------------------


class _StopFlag:
    signum: int | None = None


_STOP = _StopFlag()


def _on_signal(signum, frame) -> None:
    if _STOP.signum is not None:  # a second signal: the user insists, stop now without a checkpoint
        raise KeyboardInterrupt
    _STOP.signum = signum


@contextlib.contextmanager
def _signal_handlers():
    _STOP.signum = None
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------------
# Data: everything read and validated before a model is loaded
# --------------------------------------------------------------------------------------------------


@dataclass
class StageData:
    """The examples and records of a run; None where the stage does not need them."""

    train: list[Example] | None  # SFT targets, and the examples PO pairs are built from
    preferences: list[PreferenceRecord] | None  # ready preference records (po stage with a records file)
    validation: list[Example] | None  # where the SFT model's confusions are mined (SPEC §4)
    test: list[Example] | None  # final evaluation (SPEC §5)
    template: PromptTemplate | None


def _load(loader, path: str, skip_invalid: bool, what: str):
    try:
        items, problems = loader(path, skip_invalid=skip_invalid)
    except DataError as err:
        raise BadInput(f"data.{what} {path}: {err}") from None
    if problems:
        print(f"data.{what} {path}: skipped {len(problems)} invalid records (data.skip_invalid)")
    return items


def _is_preference_file(path: str) -> bool:
    """Whether a JSONL file's first object is a preference record (has "chosen") rather than an example."""
    if not Path(path).is_file():
        return False  # a saved dataset directory holds examples (the published layout)
    try:
        rows, _ = read_jsonl(path)
    except DataError:
        return False  # load_examples reports the problem
    return bool(rows) and "chosen" in rows[0][1]


def load_stage_data(stage: str, data: DataConfig, needs_test: bool) -> StageData:
    """Read and validate every file the stage uses; synthetic splits fill the unset ones."""
    template = None
    if data.template is not None:
        try:
            template = PromptTemplate.from_file(data.template)
        except (OSError, TemplateError) as err:
            raise BadInput(f"data.template {data.template}: {err}") from None
    synthetic = None
    if data.train is None or data.validation is None or (needs_test and data.test is None):
        synthetic = split_corpus(default_corpus(data.synthetic_n, data.synthetic_seed), data.synthetic_seed)

    def examples(split: str) -> list[Example]:
        path = getattr(data, split)
        return list(synthetic[split]) if path is None else _load(load_examples, path, data.skip_invalid, split)

    train = preferences = validation = None
    if stage == "po" and data.train is not None and _is_preference_file(data.train):
        preferences = _load(load_preferences, data.train, data.skip_invalid, "train")
    else:
        train = examples("train")
        if stage != "sft":
            validation = examples("validation")
    test = examples("test") if needs_test else None
    return StageData(train, preferences, validation, test, template)


# --------------------------------------------------------------------------------------------------
# Batches: tokenize, check lengths against the budgets, pack
# --------------------------------------------------------------------------------------------------


def _cap_completions(group: CompletionGroup, max_tokens: int, truncate: bool) -> CompletionGroup:
    longest = max(len(c) for c in group.completions)
    if longest <= max_tokens:
        return group
    if not truncate:
        raise BadInput(f"{group.key!r}: a completion has {longest} tokens, over data.max_completion_tokens "
                       f"{max_tokens}; raise it or allow cutting tails with --data.truncate")
    weights = None if group.weights is None else [w[:max_tokens] for w in group.weights]
    return CompletionGroup(group.prompt_ids, [c[:max_tokens] for c in group.completions], weights, group.key)


def fit_groups(groups: list[CompletionGroup], data: DataConfig) -> tuple[list[CompletionGroup], int]:
    """Groups within the completion cap and the token budget; over-long ones are an error unless
    ``data.truncate``. Returns the groups and how many were truncated (reported at start)."""
    fitted, truncated = [], 0
    for group in groups:
        capped = _cap_completions(group, data.max_completion_tokens, data.truncate)
        try:
            capped = fit_to_budget(capped, data.token_budget, data.truncate)
        except ValueError as err:
            raise BadInput(f"data.token_budget: {err}") from None
        truncated += any(len(a) != len(b) for a, b in zip(capped.completions, group.completions))
        fitted.append(capped)
    return fitted, truncated


def build_batches(groups, data: DataConfig, kind: str, tokenizer, log: "MetricsLog") -> list[LossBatch]:
    groups, truncated = fit_groups(groups, data)
    batches = make_loss_batches(groups, data.token_budget, kind, pad_id=tokenizer.pad_token_id or 0)
    stats = PackingStats.from_batches(batches, data.token_budget)
    log.write({"event": "packing", "kind": kind, "truncated_records": truncated, **stats.as_dict()})
    log.say(f"packing ({kind}): {len(groups)} records -> {stats.batches} packs of <= {data.token_budget} tokens, "
            f"fill {stats.fill:.0%}; {stats.tree_tokens} tokens run instead of {stats.unshared_tokens} unshared "
            f"({stats.savings:.0%} saved, {stats.compression:.1f}x)"
            + (f"; {truncated} records truncated (data.truncate)" if truncated else ""))
    return batches


# --------------------------------------------------------------------------------------------------
# Logging: metrics.jsonl on rank 0, and the plot
# --------------------------------------------------------------------------------------------------


class MetricsLog:
    """Rank 0 appends one JSON object per line; other ranks write nothing."""

    def __init__(self, out_dir: Path, is_main: bool, resume_step: int | None = None):
        self.path = out_dir / METRICS_FILE
        self.is_main = is_main
        if is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            kept = []
            if resume_step is not None and self.path.is_file():  # drop steps the resumed run redoes
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    if record.get("step", 0) <= resume_step and record.get("event") != "packing":
                        kept.append(line)
            self.path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.is_main:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def steps(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
        return [r for r in records if "step" in r]


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Loss, learning rate, the objective's quality metric and throughput against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("lr", "learning rate"),
              ("reward_accuracy" if any("reward_accuracy" in r for r in records) else "logp_mean", None),
              ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel(label or key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


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


def _units(batch: LossBatch) -> int:
    """What the batch's loss is a mean over: pairs (PO) or scored tokens (SFT)."""
    return batch.num_pairs if batch.kind == "po" else batch.packed.num_scored


@dataclass
class LoopResult:
    finished: bool  # False: stopped early by run.stop_after_steps (a checkpoint was saved)
    state: TrainState


def train_loop(model, batches: list[LossBatch], loss_fn: FusedTokenPOLoss,
               reference: Callable[[LossBatch, object], torch.Tensor] | None, optim: OptimConfig, run: RunConfig,
               out_dir: Path, ctx, config_dict: dict, log: MetricsLog, title: str) -> LoopResult:
    """Train ``model``'s trainable (LoRA) weights on ``batches``; checkpoints in ``out_dir``.

    ``model`` is the (possibly DDP-wrapped, :func:`pvfast.train.distributed.wrap_model`) peft model;
    ``reference(batch, mask)`` gives the (M, 7) reference statistics of a batch, None for reference-free
    objectives.
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

    # bf16 autocast on GPU only: CPU runs stay in the weights' dtype, bitwise reproducible.
    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

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
        step_units = sum(_units(b) for b in local)
        tick = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = pairs = 0
        for k, cpu_batch in enumerate(local):
            batch = cpu_batch.to(device)
            mask = packed_attention_mask(inner, batch.packed)  # shared by the reference and policy passes
            ref = reference(batch, mask) if reference is not None else None
            # DDP all-reduces on the last micro-batch of the step only (one sync per optimizer step).
            sync = contextlib.nullcontext() if k == len(local) - 1 or not hasattr(model, "no_sync") \
                else model.no_sync()
            with sync:
                with autocast():
                    hidden = dist.packed_hidden(model, batch.packed, mask)
                    out = loss_fn(batch.scoring_rows(hidden), lm_head_weight(inner), batch.pairs, ref,
                                  batch.example_weights)
                loss_value = out.loss.item()  # one sync per micro-batch: needed to refuse a NaN before it lands
                finite = math.isfinite(loss_value)
                if ctx.world_size > 1:  # all ranks stop together, or the others wait in the next all-reduce
                    finite = dist.all_reduce_mean(torch.tensor(float(finite), device=device), ctx).item() == 1.0
                if not finite:
                    raise NonFiniteLoss(state.step + 1, cpu_batch.record_ids if not math.isfinite(loss_value)
                                        else (), loss_value)
                # Each micro-batch's loss is a mean over its units; weight it so the step's gradient is
                # that of the mean over all units of the step.
                (out.loss * (_units(cpu_batch) / step_units)).backward()
            share = _units(cpu_batch) / step_units
            for name, value in out.metrics.items():
                sums[name] = sums.get(name, 0.0) + float(value) * share
            tokens += cpu_batch.packed.tree_tokens
            pairs += cpu_batch.num_pairs
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
        if ctx.world_size > 1:  # log the mean over ranks of each metric
            keys = sorted(sums)
            reduced = dist.all_reduce_mean(torch.tensor([sums[k] for k in keys], device=device), ctx)
            sums = dict(zip(keys, reduced.tolist()))
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
        if state.step % run.save_every == 0 or state.step == total or stop_now or _STOP.signum is not None:
            path = save_checkpoint(out_dir, state, inner, optimizer, scheduler, config_dict,
                                   keep_last=run.keep_last, is_main_process=ctx.is_main)
            dist.barrier(ctx)
            if _STOP.signum is not None:
                raise Interrupted(_STOP.signum, state.step, path)
            if stop_now and state.step < total:
                log.say(f"stopped after {run.stop_after_steps} steps (run.stop_after_steps); checkpoint {path}; "
                        f"continue with --run.resume")
                return LoopResult(False, state)
    if progress is not None:
        progress.close()
    if ctx.is_main:
        plot_curves(log.steps(), log.path.parent / PLOT_FILE, title)
    return LoopResult(True, state)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fresh_start(out_dir: Path, run: RunConfig, ctx, log: MetricsLog) -> None:
    """Without --run.resume a stage starts over: an earlier run's checkpoints in its directory are removed
    only with --run.overwrite (a forgotten --run.resume must never delete a long run)."""
    old = out_dir / "checkpoints"
    if not run.resume and old.is_dir() and any(old.iterdir()):
        if not run.overwrite:
            raise BadInput(f"{old} holds checkpoints of an earlier run: pass --run.resume to continue it, "
                              f"--run.overwrite to start over (deleting them), or another --run.output_dir")
        if ctx.is_main:
            log.say(f"{old}: removing the checkpoints of an earlier run (--run.overwrite)")
            shutil.rmtree(old)
    dist.barrier(ctx)


def _finish_adapter(model, tokenizer, out_dir: Path, base_source: str, run: RunConfig, ctx,
                    log: MetricsLog) -> Path:
    """Write the trained adapter (PEFT format) and, with run.merge_adapter, the merged full model."""
    adapter_dir = out_dir / ADAPTER_DIR
    if ctx.is_main:
        dist.unwrap(model).save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
        log.say(f"adapter -> {adapter_dir}")
        if run.merge_adapter:
            merged = out_dir / MERGED_DIR
            if merged.exists():
                shutil.rmtree(merged)
            merge_adapter(base_source, adapter_dir, merged)
            log.say(f"merged full-precision model -> {merged}")
    dist.barrier(ctx)
    return adapter_dir


def run_sft(model_cfg: ModelConfig, data_cfg: DataConfig, optim: OptimConfig, run: RunConfig,
            objective_config: ObjectiveConfig, data: StageData, out_dir: Path, ctx, config_dict: dict):
    """Train the SFT adapter; returns (model, tokenizer, adapter dir), adapter dir None when stopped early."""
    log = MetricsLog(out_dir, ctx.is_main, resume_step=_resume_step(out_dir, run))
    _fresh_start(out_dir, run, ctx, log)
    tokenizer = load_tokenizer(model_cfg)
    weights = (class_balance_weights(data.train, objective_config.class_balance)
               if objective_config.class_balance.enabled else None)
    groups = sft_groups(data.train, tokenizer, objective_config.token_weights, data.template,
                        example_weights=weights)
    batches = build_batches(groups, data_cfg, "sft", tokenizer, log)
    seed_everything(run.seed)  # the same LoRA init on every rank
    model = load_model(model_cfg, ctx.device)
    loss_fn = FusedTokenPOLoss("sft", objective_config)
    result = train_loop(dist.wrap_model(model, ctx), batches, loss_fn, None, optim, run, out_dir, ctx, config_dict,
                        log, "sft")
    if not result.finished:
        return model, tokenizer, None
    return model, tokenizer, _finish_adapter(model, tokenizer, out_dir, model_source(model_cfg), run, ctx, log)


def _resume_step(out_dir: Path, run: RunConfig) -> int | None:
    if not run.resume:
        return None
    path = latest_checkpoint(out_dir)
    return 0 if path is None else int(path.name.split("-")[1])


def _merged_sft_base(model_cfg: ModelConfig, sft_adapter: str, out_dir: Path, run: RunConfig, ctx) -> str:
    """The SFT adapter merged into the base in full precision (re-quantized at load for nf4)."""
    merged = out_dir / SFT_MERGED_DIR
    if ctx.is_main:
        if merged.exists() and not (run.resume and (merged / "config.json").is_file()):
            shutil.rmtree(merged)  # stale: from another SFT adapter
        if not merged.exists():
            merge_adapter(model_source(model_cfg), sft_adapter, merged)
    dist.barrier(ctx)
    return str(merged)


def build_preferences(model, tokenizer, data: StageData, pairs: PairConfig, run: RunConfig, out_dir: Path,
                      log: MetricsLog) -> list[PreferenceRecord]:
    """SPEC §4: greedy predictions of the SFT model on validation -> confusion tables -> records."""
    outputs = generate_completions(dist.unwrap(model), tokenizer, data.validation, batch_size=run.eval_batch_size,
                                   max_new_tokens=run.eval_max_new_tokens, template=data.template)
    code_table, sub_table = tables_from_outputs(data.validation, outputs)
    records = make_preference_records(data.train, code_table, sub_table, pairs)
    if not records:
        raise BadInput(f"no preference records could be made from {len(data.train)} training examples")
    if log.is_main:
        write_confusion_csv(out_dir / "confusion_code.csv", code_table, pairs.smoothing)
        write_confusion_csv(out_dir / "confusion_subcode.csv", sub_table, pairs.smoothing)
        write_preferences(out_dir / "preferences.jsonl", records)
    log.say(f"pairs: {code_table.total} code and {sub_table.total} sub-code confusions on "
            f"{len(data.validation)} validation messages -> {len(records)} records, "
            f"{sum(len(r.rejected) for r in records)} pairs")
    return records


def _with_class_balance(records: list[PreferenceRecord], config: ObjectiveConfig,
                        train: list[Example] | None) -> list[PreferenceRecord]:
    """Class-balance weights counted over the training examples' gold annotations (chosen side)."""
    if not config.class_balance.enabled:
        return records
    if train is not None:
        gold = {ex.id: ex.annotations for ex in train}
        annotations = [gold[r.id] for r in records]
    else:
        annotations = [parse_output(r.chosen).annotations for r in records]
    return attach_class_balance(records, config.class_balance, annotations)


def run_po(model_cfg: ModelConfig, data_cfg: DataConfig, optim: OptimConfig, run: RunConfig, pairs: PairConfig,
           objective: str, objective_config: ObjectiveConfig, precompute_ref: bool, sft_adapter: str | None,
           data: StageData, out_dir: Path, ctx, config_dict: dict):
    """Preference optimization on the (merged) SFT model; returns (model, tokenizer, adapter dir or None)."""
    log = MetricsLog(out_dir, ctx.is_main, resume_step=_resume_step(out_dir, run))
    _fresh_start(out_dir, run, ctx, log)
    tokenizer = load_tokenizer(model_cfg)
    base = model_source(model_cfg) if sft_adapter is None else _merged_sft_base(model_cfg, sft_adapter, out_dir,
                                                                                run, ctx)
    seed_everything(run.seed)  # the same LoRA init on every rank
    # A fresh LoRA has B = 0, so before training this model *is* the SFT model: it mines the pairs too.
    model = load_model(model_cfg, ctx.device, base)
    records = data.preferences
    if records is None:
        records = build_preferences(model, tokenizer, data, pairs, run, out_dir, log)
    records = _with_class_balance(records, objective_config, data.train)
    groups = preference_groups(records, tokenizer, objective_config.token_weights, data.template)
    batches = build_batches(groups, data_cfg, "po", tokenizer, log)
    loss_fn = FusedTokenPOLoss(objective, objective_config)
    reference = None
    if loss_fn.needs_reference and precompute_ref:
        cache_path = out_dir / (REFERENCE_CACHE_FILE if ctx.world_size == 1
                                else f"reference_cache.rank{ctx.rank}.safetensors")
        started = time.perf_counter()
        cache = precompute_reference(model, batches, loss_fn, cache_path, device=ctx.device,
                                     overwrite=not run.resume)
        log.say(f"reference: {len(cache)} packs scored once in {time.perf_counter() - started:.1f}s -> {cache_path}")
        reference = lambda batch, mask: cache.get(batch)  # noqa: E731
    elif loss_fn.needs_reference:
        reference = lambda batch, mask: reference_stats(model, batch, loss_fn, mask)  # noqa: E731
    result = train_loop(dist.wrap_model(model, ctx), batches, loss_fn, reference, optim, run, out_dir, ctx,
                        config_dict, log, objective)
    if not result.finished:
        return model, tokenizer, None
    return model, tokenizer, _finish_adapter(model, tokenizer, out_dir, base, run, ctx, log)


def evaluate_model(model, tokenizer, data: StageData, run: RunConfig, out_dir: Path, source: str, ctx) -> None:
    """SPEC §5 on the test split: greedy generation, parse, score; table printed, JSON report written."""
    if not ctx.is_main:
        return
    examples = data.test if run.eval_max_examples is None else data.test[:run.eval_max_examples]
    outputs = generate_completions(dist.unwrap(model), tokenizer, examples, batch_size=run.eval_batch_size,
                                   max_new_tokens=run.eval_max_new_tokens, template=data.template)
    report, _ = evaluate_outputs(examples, outputs)
    print(render_table([report]), flush=True)
    settings = {"source": source, "n_messages": len(examples), "max_new_tokens": run.eval_max_new_tokens}
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(report_json([(source, report)], settings), indent=2) + "\n", encoding="utf-8")
    print(f"evaluation report -> {path}", flush=True)


def run_stage(stage: str, cfg, ctx) -> int:
    """Load the data, then run the stage; returns the exit status."""
    out_dir = Path(cfg.run.output_dir)
    config_dict = config_to_dict(cfg)
    needs_test = cfg.run.evaluate and (stage == "pipeline" or cfg.data.test is not None or cfg.data.train is None)
    data = load_stage_data(stage, cfg.data, needs_test)  # bad files stop here, before any model
    if stage == "sft":
        model, tokenizer, adapter = run_sft(cfg.model, cfg.data, cfg.optim, cfg.run, cfg.sft.objective_config,
                                            data, out_dir, ctx, config_dict)
    elif stage == "po":
        model, tokenizer, adapter = run_po(cfg.model, cfg.data, cfg.optim, cfg.run, cfg.pairs, cfg.po.objective,
                                           cfg.po.objective_config, cfg.po.precompute_ref, cfg.sft_adapter, data,
                                           out_dir, ctx, config_dict)
    else:
        sft_dir, po_dir = out_dir / "sft", out_dir / "po"
        adapter = sft_dir / ADAPTER_DIR
        if cfg.run.resume and (adapter / "adapter_config.json").is_file():
            print(f"sft: finished earlier ({adapter}); resuming with po")
        else:
            _, _, adapter = run_sft(cfg.model, cfg.data, cfg.optim, cfg.run, cfg.sft.objective_config, data,
                                    sft_dir, ctx, config_dict)
            if adapter is None:
                return EXIT_OK
        model, tokenizer, adapter = run_po(cfg.model, cfg.data, cfg.optim, cfg.run, cfg.pairs, cfg.po.objective,
                                           cfg.po.objective_config, cfg.po.precompute_ref, str(adapter), data,
                                           po_dir, ctx, config_dict)
    if adapter is not None and data.test is not None:
        evaluate_model(model, tokenizer, data, cfg.run, out_dir, str(adapter), ctx)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pvfast.train.recipe``; returns the exit status (module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        stage, config_file, preset, overrides = parse_cli(argv)
        cfg = load_config(stage, config_file, overrides, preset)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ctx = dist.setup_distributed(cfg.run.device)
    try:
        if ctx.is_main:
            print(format_config(cfg), flush=True)
            save_config(cfg, Path(cfg.run.output_dir) / "config.json")
        with _signal_handlers():
            return run_stage(stage, cfg, ctx)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_MODEL
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NON_FINITE
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return EXIT_SIGNAL_BASE + err.signum
    finally:
        dist.cleanup(ctx)


if __name__ == "__main__":
    sys.exit(main())
