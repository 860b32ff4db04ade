"""``python -m pvfast.train``: SFT, preference optimization (TAB-PO and baselines), or the whole pipeline.

Run commands::

    python -m pvfast.train                                   # pipeline, preset "tiny": CPU, a few minutes
    python -m pvfast.train sft --run.device cpu --optim.max_steps 20 --run.output_dir runs/sft-cpu
    python -m pvfast.train sft --preset qwen2.5-1.5b --data.train train.jsonl --data.validation val.jsonl
    python -m pvfast.train po --preset llama-3.1-8b --sft_adapter runs/sft/adapter --data.train prefs.jsonl \\
        --po.objective dpo --po.precompute_ref
    python -m pvfast.train pipeline --preset qwen2.5-1.5b --run.resume          # continue an interrupted run
    torchrun --nproc_per_node 2 -m pvfast.train pipeline --preset qwen2.5-1.5b  # DDP, one process per GPU
    torchrun --nproc_per_node 2 -m pvfast.train sft --run.device cpu            # DDP on the CPU (gloo)

What a run does, top to bottom (:func:`run`)::

    check    parse the config; read and validate every data file; check each stage's output folder (earlier
             checkpoints without --run.resume; with it, verify the checkpoints newest first); tokenize and fit
             every record the run already has to the token budget. A refusal stops here (exit 2 or 4) and
             leaves every output folder exactly as it was: nothing is written before this point.
    open     print and save the config (output_dir/config.json), remove what killed writes left behind
             (hidden .tmp-* / .trash-* folders), start each stage's metrics.jsonl
    sft      examples -> tree-packed SFT batches -> train a LoRA -> output_dir/adapter
    po       SFT adapter merged into the base (the reference = that model) -> preference records (from
             data.train, or built from the SFT model's validation predictions, SPEC §4) -> tree-packed pair
             batches -> train a new LoRA on top -> output_dir/adapter
    pipeline sft (output_dir/sft) -> po (output_dir/po) -> greedy evaluation on the test split
             (table printed, output_dir/eval_report.json)

Why PO trains a new adapter on the merged SFT model: the reference of SPEC §3 is the SFT model, and with the
SFT adapter folded into the base weights, "the policy with its adapters disabled" (the reference pass of
:func:`pvfast.model.reference.reference_stats`) is exactly that model, with no second copy of the weights. For
``--model.quant nf4`` the merge is done in full precision (:func:`pvfast.train.checkpoint.merge_adapter` never
merges into 4-bit weights) and the merged model is quantized again when it is loaded, as QLoRA does.

Outputs. Each training stage writes into its directory: ``metrics.jsonl`` (a packing line, then one line per
logged step), ``training_curves.png``, ``checkpoints/step-*`` (every ``run.save_every`` steps and at the end),
``adapter/`` (PEFT format) and, with ``run.merge_adapter``, ``merged/`` (a standalone full-precision model; for
PO the adapter is merged into the PO base, so ``po/merged`` is the final SFT + PO model). Every file and folder
appears whole or not at all (:mod:`pvfast.atomic`): a kill at any moment leaves the previous state plus a hidden
temporary that the next start removes. A checkpoint never holds a NaN or an infinity.

Resume. ``--run.resume`` continues each stage from its newest good checkpoint (in the pipeline a finished SFT
stage is skipped): the checkpoints are verified newest first (every file's size and sha256), each rejected one
is reported with the reason, and when checkpoints exist but none is good the run refuses (exit 4) instead of
starting over.
Without ``--run.resume`` a directory holding an earlier run's checkpoints is refused (exit 2) unless
``--run.overwrite`` (the ``tiny`` demo preset sets it) removes them. A run folder may be moved between
invocations. ``--run.stop_after_steps N`` ends an invocation after N optimizer steps with a checkpoint
(time-boxed jobs on shared machines). Resumed, stopped-and-resumed and killed-and-resumed runs end with the
adapter of an uninterrupted run, bitwise on the CPU (SFT and PO; under torchrun every rank's RNG state is in
the checkpoint). Gradient accumulation: ``--optim.tokens_per_step T`` sums micro-batches until T scored tokens;
the step's gradient is that of the objective over all of them (:mod:`pvfast.train.loop`). Patient message and
span text are never logged.

Exit status (:mod:`pvfast.train.errors`, listed by ``--help``): 0 done (or stopped by ``run.stop_after_steps``
with a checkpoint), 1 model cannot be loaded, 2 bad config or data, or an output folder the run may not touch
(nothing written), 3 non-finite loss, gradient or weights (nothing of that step saved; the error names the last
finite step), 4 no usable checkpoint (all damaged, or it does not fit the model), 5 an output cannot be written
(disk full, permission denied), 130 / 143 interrupted by SIGINT / SIGTERM after saving a checkpoint. Each
expected failure is one ``error:`` line naming the file and what to do.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pvfast import atomic
from pvfast.config.overrides import ConfigError
from pvfast.config.presets import PRESET_NOTES
from pvfast.config.sections import DataConfig, ModelConfig, OptimConfig, PairConfig, RunConfig
from pvfast.config.serialize import config_differences, config_to_dict, save_config
from pvfast.config.trainer import format_config, load_config, parse_cli
from pvfast.data.io import write_preferences
from pvfast.data.pairs import make_preference_records, tables_from_outputs, write_confusion_csv
from pvfast.data.records import Example, PreferenceRecord
from pvfast.eval.metrics import render_comparison, render_table
from pvfast.eval.scoring import evaluate_outputs, report_json
from pvfast.model.forward import resolve_attn_implementation
from pvfast.model.generation import generate_completions
from pvfast.model.loading import load_model, load_tokenizer, model_source
from pvfast.model.reference import precompute_reference, reference_stats
from pvfast.objectives.class_balance import chosen_annotations, class_balance_table
from pvfast.objectives.config import ObjectiveConfig
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import preference_groups, sft_groups
from pvfast.train import distributed as dist
from pvfast.train.checkpoint import ResumePoint, find_resume_checkpoint, merge_adapter, read_checkpoint_config
from pvfast.train.data import Packed, StageData, build_batches, load_stage_data
from pvfast.train.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_OK,
    BadInput,
    CheckpointError,
    failure,
    signal_handlers,
    writing,
)
from pvfast.train.faults import fault_point
from pvfast.train.layout import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    MERGED_DIR,
    REFERENCE_CACHE_FILE,
    REPORT_FILE,
    SFT_MERGED_DIR,
)
from pvfast.train.loop import check_resume_plan, train_loop
from pvfast.train.metrics_log import MetricsLog

# Resolved-config keys that may change between a run and its resumption without a warning (a moved run
# folder changes run.output_dir).
RESUME_KEYS_IGNORED = ("run.resume", "run.stop_after_steps", "run.output_dir")


@dataclass
class Stage:
    """One training stage: its config sections, where it runs (``ctx``), where it writes, what it resumes.

    Built and checked by :func:`check_stage` (writes nothing), opened by :func:`open_stage` (starts writing);
    :func:`pvfast.train.loop.train_loop` reads everything it needs from here.
    """

    name: str  # "sft" or "po": the metrics' packing kind and the fault-point prefix
    title: str  # progress bar and plot title: "sft" or the PO objective
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    run: RunConfig
    ctx: dist.DistContext
    out_dir: Path
    config_dict: dict  # the resolved run config, saved with every checkpoint
    log: MetricsLog
    resume: ResumePoint  # the verified checkpoint to continue from (path None: start at step 0)

    @property
    def adapter_dir(self) -> Path:
        return self.out_dir / ADAPTER_DIR

    @property
    def finished(self) -> bool:
        """A resumed stage whose adapter was written (the pipeline then goes on with the next stage)."""
        return self.run.resume and (self.adapter_dir / "adapter_config.json").is_file()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# check: everything that can refuse the run, before anything is written


def check_stage(name: str, title: str, out_dir: Path, cfg, ctx, config_dict: dict) -> Stage:
    """The stage, with its output folder checked; raises BadInput / CheckpointError, writes nothing.

    Without --run.resume an earlier run's checkpoints are refused unless --run.overwrite (a forgotten
    --run.resume must never delete a long run). With it, the checkpoints are verified newest first; each
    rejected one is reported, and if checkpoints exist but none is good the run refuses to start over.
    """
    run = cfg.run
    log = MetricsLog(out_dir, ctx.is_main)
    checkpoints = out_dir / CHECKPOINTS_DIR
    resume = ResumePoint(None, ())
    if not run.resume:
        if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()) \
                and not run.overwrite:
            raise BadInput(f"{checkpoints} holds checkpoints of an earlier run: pass --run.resume to continue it, "
                           f"--run.overwrite to start over (deleting them), or another --run.output_dir")
        return Stage(name, title, cfg.model, cfg.data, cfg.optim, run, ctx, out_dir, config_dict, log, resume)
    resume = find_resume_checkpoint(out_dir)
    for path, why in resume.rejected:
        log.say(f"warning: not resuming from {path.name}: {why}")
    if resume.path is None and resume.rejected:
        raise CheckpointError(f"{checkpoints}: --run.resume was asked but none of its {len(resume.rejected)} "
                              f"checkpoints is usable (newest: {resume.rejected[0][1]}); restore a good copy, or "
                              f"start over with --run.overwrite without --run.resume (deletes them)")
    if resume.path is not None:
        diffs = [k for k in config_differences(read_checkpoint_config(resume.path), config_dict)
                 if k not in RESUME_KEYS_IGNORED]
        if diffs:
            log.say(f"warning: resuming {resume.path} with a changed config: {', '.join(diffs)}")
    log.check()  # an unusable metrics.jsonl is refused now, not after the model is loaded
    return Stage(name, title, cfg.model, cfg.data, cfg.optim, run, ctx, out_dir, config_dict, log, resume)


def sft_batches(stage: Stage, data: StageData, objective_config: ObjectiveConfig, tokenizer) -> Packed:
    groups = sft_groups(data.train, tokenizer, data.template)
    packed = build_batches(groups, stage.data, "sft", tokenizer, data.sources.get("train"))
    packed.class_weights = class_balance_table([ex.id for ex in data.train], data.train,
                                               objective_config.class_balance)
    return packed


def po_batches(stage: Stage, data: StageData, records: list[PreferenceRecord], objective_config: ObjectiveConfig,
               tokenizer) -> Packed:
    groups = preference_groups(records, tokenizer, data.template)
    source = data.sources.get("train") if data.preferences is not None else None  # mined records: named by id
    packed = build_batches(groups, stage.data, "po", tokenizer, source)
    packed.class_weights = _preference_class_weights(records, objective_config, data.train)
    return packed


def _preference_class_weights(records: list[PreferenceRecord], config: ObjectiveConfig,
                              train: list[Example] | None) -> dict[str, float] | None:
    """Class-balance weights by record id (None when off), counted over the chosen annotations: the training
    examples' gold annotations when the records were mined from them, else the records' chosen JSON."""
    if not config.class_balance.enabled:
        return None
    if train is not None:
        gold = {ex.id: ex.annotations for ex in train}
        annotations = [gold[r.id] for r in records]
    else:
        annotations = chosen_annotations(records)
    return class_balance_table([r.id for r in records], annotations, config.class_balance)


# --------------------------------------------------------------------------------------------------
# open: the run is accepted; from here on it writes


def open_stage(stage: Stage, packed: Packed | None = None) -> None:
    """Remove what killed writes left in the stage's folder, the old checkpoints (--run.overwrite), start the
    metrics log (kept up to the resumed step) and report the packing."""
    ctx, out_dir, log = stage.ctx, stage.out_dir, stage.log
    if ctx.is_main:
        with writing(out_dir, f"{stage.name} stage folder"):
            out_dir.mkdir(parents=True, exist_ok=True)
            for folder in (out_dir, out_dir / CHECKPOINTS_DIR):
                for path in atomic.remove_stale_temporaries(folder):
                    log.say(f"removed {path} (left by an interrupted write)")
            old = out_dir / CHECKPOINTS_DIR
            if not stage.run.resume and old.is_dir() and any(old.iterdir()):
                log.say(f"{old}: removing the checkpoints of an earlier run (--run.overwrite)")
                atomic.remove_dir(old)
            log.start(stage.resume.step if stage.run.resume else None)
    dist.barrier(ctx)
    if stage.resume.path is not None:
        log.say(f"{stage.name}: resuming from {stage.resume.path} (step {stage.resume.step})")
    if packed is not None:
        packed.report(log, stage.data.token_budget)


# --------------------------------------------------------------------------------------------------
# train and save


def finish_adapter(stage: Stage, model, tokenizer, base_source: str) -> Path:
    """Write the trained adapter (PEFT format) and, with run.merge_adapter, the merged full model; each
    folder atomically."""
    adapter_dir = stage.adapter_dir
    if stage.ctx.is_main:
        with writing(adapter_dir, "final adapter"), atomic.atomic_dir(adapter_dir, exists="replace") as tmp:
            dist.unwrap(model).save_pretrained(tmp, safe_serialization=True)
            fault_point("adapter.write", tmp)
            tokenizer.save_pretrained(tmp)
        stage.log.say(f"adapter -> {adapter_dir}")
        if stage.run.merge_adapter:
            merged = stage.out_dir / MERGED_DIR
            with writing(merged, "merged model"):
                merge_adapter(base_source, adapter_dir, merged, exists="replace")
            stage.log.say(f"merged full-precision model -> {merged}")
    dist.barrier(stage.ctx)
    return adapter_dir


def run_sft(stage: Stage, packed: Packed, tokenizer, objective_config: ObjectiveConfig, before_training=None):
    """Train the SFT adapter; returns (model, adapter dir), adapter dir None when stopped early.
    ``before_training(model, tokenizer)`` sees the untouched model (fresh LoRA, B = 0) before any step."""
    seed_everything(stage.run.seed)  # the same LoRA init on every rank
    model = load_model(stage.model, stage.ctx.device)
    if before_training is not None:
        before_training(model, tokenizer)
    loss_fn = FusedTokenPOLoss("sft", objective_config, class_weights=packed.class_weights)
    result = train_loop(dist.wrap_model(model, stage.ctx), packed.batches, loss_fn, None, stage)
    if not result.finished:
        return model, None
    return model, finish_adapter(stage, model, tokenizer, model_source(stage.model))


def merged_sft_base(stage: Stage, sft_adapter: str) -> str:
    """The SFT adapter merged into the base in full precision (re-quantized at load for nf4); a resumed run
    reuses the one it wrote (always complete: written atomically)."""
    merged = stage.out_dir / SFT_MERGED_DIR
    if stage.ctx.is_main and not (stage.run.resume and (merged / "config.json").is_file()):
        with writing(merged, "SFT model merged into the base"):
            merge_adapter(model_source(stage.model), sft_adapter, merged, exists="replace")
    dist.barrier(stage.ctx)
    return str(merged)


def mine_preferences(stage: Stage, model, tokenizer, data: StageData, pairs: PairConfig):
    """SPEC §4: greedy predictions of the SFT model on validation -> confusion tables -> records.

    Returns the records and a function that writes the pair files (called once the records are accepted)."""
    run = stage.run
    outputs = generate_completions(dist.unwrap(model), tokenizer, data.validation, batch_size=run.eval_batch_size,
                                   max_new_tokens=run.eval_max_new_tokens, template=data.template,
                                   constrained=run.eval_constrained)
    fault_point("pairs.generate")
    code_table, sub_table = tables_from_outputs(data.validation, outputs)
    records = make_preference_records(data.train, code_table, sub_table, pairs)
    if not records:
        raise BadInput(f"no preference records could be made from {len(data.train)} training examples")

    def write() -> None:
        out_dir = stage.out_dir
        if stage.ctx.is_main:
            with writing(out_dir, "pair files"):
                write_confusion_csv(out_dir / "confusion_code.csv", code_table, pairs.smoothing)
                write_confusion_csv(out_dir / "confusion_subcode.csv", sub_table, pairs.smoothing)
                write_preferences(out_dir / "preferences.jsonl", records)
        stage.log.say(f"pairs: {code_table.total} code and {sub_table.total} sub-code confusions on "
                      f"{len(data.validation)} validation messages -> {len(records)} records, "
                      f"{sum(len(r.rejected) for r in records)} pairs")

    return records, write


def run_po(stage: Stage, data: StageData, po, pairs: PairConfig, sft_adapter: str | None,
           packed: Packed | None, tokenizer, before_training=None):
    """Preference optimization on the (merged) SFT model; returns (model, adapter dir or None).

    ``packed``: the batches of a preference file, built in the check phase; None: mine the records first.
    ``before_training(model, tokenizer)`` sees the starting (SFT) model before pairs are mined.
    """
    ctx = stage.ctx
    base = model_source(stage.model) if sft_adapter is None else merged_sft_base(stage, sft_adapter)
    seed_everything(stage.run.seed)  # the same LoRA init on every rank
    # A fresh LoRA has B = 0, so before training this model *is* the SFT model: it mines the pairs too.
    model = load_model(stage.model, ctx.device, base)
    if before_training is not None:
        before_training(model, tokenizer)
    if packed is None:
        records, write_pair_files = mine_preferences(stage, model, tokenizer, data, pairs)
        packed = po_batches(stage, data, records, po.objective_config, tokenizer)  # refused before any write
        write_pair_files()
        packed.report(stage.log, stage.data.token_budget)
    loss_fn = FusedTokenPOLoss(po.objective, po.objective_config, class_weights=packed.class_weights)
    reference = None
    if loss_fn.needs_reference and po.precompute_ref:
        cache_path = stage.out_dir / (REFERENCE_CACHE_FILE if ctx.world_size == 1
                                      else f"reference_cache.rank{ctx.rank}.safetensors")
        started = time.perf_counter()
        with writing(cache_path, "reference cache"):
            cache = precompute_reference(model, packed.batches, loss_fn, cache_path, device=ctx.device,
                                         overwrite=not stage.run.resume, autocast_mode=stage.run.autocast)
        stage.log.say(f"reference: {len(cache)} packs scored once in {time.perf_counter() - started:.1f}s "
                      f"-> {cache_path}")
        reference = lambda cpu_batch, batch, mask: cache.get(cpu_batch, loss_fn, device=ctx.device)  # noqa: E731
    elif loss_fn.needs_reference:
        reference = lambda cpu_batch, batch, mask: reference_stats(model, batch, loss_fn, mask)  # noqa: E731
    result = train_loop(dist.wrap_model(model, ctx), packed.batches, loss_fn, reference, stage)
    if not result.finished:
        return model, None
    return model, finish_adapter(stage, model, tokenizer, base)


def _score_test(model, tokenizer, data: StageData, run: RunConfig):
    examples = data.test if run.eval_max_examples is None else data.test[:run.eval_max_examples]
    outputs = generate_completions(dist.unwrap(model), tokenizer, examples, batch_size=run.eval_batch_size,
                                   max_new_tokens=run.eval_max_new_tokens, template=data.template,
                                   constrained=run.eval_constrained)
    return evaluate_outputs(examples, outputs)[0], len(examples)


def evaluate_model(model, tokenizer, data: StageData, run: RunConfig, out_dir: Path, source: str, ctx,
                   baselines: Sequence[tuple[str, object]] = (), final_name: str = "final") -> None:
    """SPEC §5 on the test split: greedy generation, parse, score; table printed, JSON report written.
    ``baselines`` (name, Report) pairs, e.g. the untouched and SFT models, are printed beside it."""
    if not ctx.is_main:
        return
    report, n_messages = _score_test(model, tokenizer, data, run)
    print(render_table([report]), flush=True)
    settings = {"source": source, "n_messages": n_messages, "max_new_tokens": run.eval_max_new_tokens,
                "constrained": run.eval_constrained}
    path = out_dir / REPORT_FILE
    payload = report_json([(source, report)], settings)
    if baselines:
        payload["baselines"] = [{"model": name, "report": r.to_dict()} for name, r in baselines]
        print(render_comparison([*baselines, (final_name, report)]), flush=True)
    with writing(path, "evaluation report"):
        atomic.write_text(path, json.dumps(payload, indent=2) + "\n")
    print(f"evaluation report -> {path}", flush=True)


class _BaselineScores:
    """``run.eval_baselines`` (pipeline): score the untouched base model and the SFT model on the test split
    right before each is trained, so the final table shows what SFT and PO each added."""

    def __init__(self, data: StageData, run: RunConfig, ctx):
        self.data, self.run, self.ctx, self.reports = data, run, ctx, []

    def hook(self, name: str):
        def score(model, tokenizer) -> None:
            if self.ctx.is_main:
                started = time.perf_counter()
                report, n = _score_test(model, tokenizer, self.data, self.run)
                self.reports.append((name, report))
                print(f"{name}: Code F1 {100 * report.code.f1:.2f}, Sub-code F1 {100 * report.subcode.f1:.2f}, "
                      f"Span F1 {100 * report.span.f1:.2f}, format errors {100 * report.format_error_rate:.2f}% "
                      f"({n} test messages, {time.perf_counter() - started:.0f}s)", flush=True)
            dist.barrier(self.ctx)
        return score


# --------------------------------------------------------------------------------------------------
# The run, top to bottom


def run(stage_name: str, cfg, ctx, preset: str | None = None) -> int:
    """Check everything, then write: returns the exit status (module docstring)."""
    out_dir = Path(cfg.run.output_dir)
    config_dict = config_to_dict(cfg)
    needs_test = cfg.run.evaluate and (stage_name == "pipeline" or cfg.data.test is not None or cfg.data.train is None)

    # check: inputs, output folders, lengths (nothing is written before this is done)
    try:  # an attention implementation the device cannot run is refused before any file is read or written
        resolve_attn_implementation(cfg.model.attn_implementation, ctx.device)
    except ValueError as err:
        raise BadInput(f"model.attn_implementation: {err}") from err
    data = load_stage_data(stage_name, cfg.data, needs_test)
    sft = po = None
    if stage_name in ("sft", "pipeline"):
        sft = check_stage("sft", "sft", out_dir / "sft" if stage_name == "pipeline" else out_dir, cfg, ctx,
                          config_dict)
    if stage_name in ("po", "pipeline"):
        po = check_stage("po", cfg.po.objective, out_dir / "po" if stage_name == "pipeline" else out_dir, cfg, ctx,
                         config_dict)
    tokenizer = load_tokenizer(cfg.model)
    sft_done = stage_name == "pipeline" and sft.finished
    sft_packed = sft_batches(sft, data, cfg.sft.objective_config, tokenizer) if sft and not sft_done else None
    po_packed = (po_batches(po, data, data.preferences, cfg.po.objective_config, tokenizer)
                 if po and data.preferences is not None else None)
    for stage, packed in ((sft, sft_packed), (po, po_packed)):
        if stage is not None and packed is not None:
            check_resume_plan(packed.batches, stage)  # a checkpoint of other data or batching is refused now

    # open: the run is accepted
    if ctx.is_main:
        print(format_config(cfg), flush=True)
        if preset in PRESET_NOTES:  # the expected duration of the preset's run
            print(f"preset {preset}: {PRESET_NOTES[preset]}", flush=True)
        with writing(out_dir / CONFIG_FILE, "resolved config"):
            atomic.remove_stale_temporaries(out_dir, [CONFIG_FILE, REPORT_FILE])
            save_config(cfg, out_dir / CONFIG_FILE)

    baselines = (_BaselineScores(data, cfg.run, ctx)
                 if stage_name == "pipeline" and cfg.run.eval_baselines and data.test is not None else None)
    if baselines is not None and ctx.is_main:
        print("run.eval_baselines: the untouched model and the SFT model are scored on the test split too")
    model = adapter = None
    sft_adapter = getattr(cfg, "sft_adapter", None)  # po stage only
    if sft is not None:
        if sft_done:
            sft.log.say(f"sft: finished earlier ({sft.adapter_dir}); resuming with po")
            adapter = sft.adapter_dir
        else:
            open_stage(sft, sft_packed)
            model, adapter = run_sft(sft, sft_packed, tokenizer, cfg.sft.objective_config,
                                     before_training=baselines and baselines.hook("untouched"))
            if adapter is None:
                return EXIT_OK  # stopped by run.stop_after_steps
        sft_adapter = str(adapter)
    if po is not None:
        open_stage(po, po_packed)
        model, adapter = run_po(po, data, cfg.po, cfg.pairs, sft_adapter, po_packed, tokenizer,
                                before_training=baselines and baselines.hook("after SFT"))
    if adapter is not None and model is not None and data.test is not None:
        evaluate_model(model, tokenizer, data, cfg.run, out_dir, str(adapter), ctx,
                       baselines=baselines.reports if baselines is not None else (),
                       final_name=f"after PO ({cfg.po.objective})" if stage_name == "pipeline" else "final")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pvfast.train``; returns the exit status (module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        stage, config_file, preset, overrides = parse_cli(argv, EXIT_CODES)
        cfg = load_config(stage, config_file, overrides, preset)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ctx = dist.setup_distributed(cfg.run.device)
    try:
        with signal_handlers():
            return run(stage, cfg, ctx, None if config_file is not None else preset)
    except Exception as err:
        mapped = failure(err)
        if mapped is None:
            raise  # not an expected failure: a bug, keep the traceback
        code, line = mapped
        print(line if ctx.is_main else f"[rank {ctx.rank}] {line}", file=sys.stderr, flush=True)
        return code
    finally:
        dist.cleanup(ctx)


if __name__ == "__main__":
    sys.exit(main())
