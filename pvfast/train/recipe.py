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

import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pvfast.config.overrides import ConfigError
from pvfast.config.sections import DataConfig, ModelConfig, OptimConfig, PairConfig, RunConfig
from pvfast.config.serialize import config_to_dict, save_config
from pvfast.config.trainer import format_config, load_config, parse_cli
from pvfast.data.io import write_preferences
from pvfast.data.jsonfmt import parse_output
from pvfast.data.pairs import make_preference_records, tables_from_outputs, write_confusion_csv
from pvfast.data.records import Example, PreferenceRecord
from pvfast.eval.metrics import render_table
from pvfast.eval.scoring import evaluate_outputs, report_json
from pvfast.model.generation import generate_completions
from pvfast.model.loading import ModelLoadError, load_model, load_tokenizer, model_source
from pvfast.model.reference import precompute_reference, reference_stats
from pvfast.objectives.class_balance import attach_class_balance, class_balance_weights
from pvfast.objectives.config import ObjectiveConfig
from pvfast.objectives.fused_loss import FusedTokenPOLoss
from pvfast.packing.loss_batch import preference_groups, sft_groups
from pvfast.train import distributed as dist
from pvfast.train.checkpoint import latest_checkpoint, merge_adapter
from pvfast.train.data import StageData, build_batches, load_stage_data
from pvfast.train.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_MODEL,
    EXIT_NON_FINITE,
    EXIT_OK,
    EXIT_SIGNAL_BASE,
    BadInput,
    Interrupted,
    NonFiniteLoss,
    signal_handlers,
)
from pvfast.train.layout import ADAPTER_DIR, CONFIG_FILE, MERGED_DIR, REFERENCE_CACHE_FILE, REPORT_FILE, SFT_MERGED_DIR
from pvfast.train.loop import train_loop
from pvfast.train.metrics_log import MetricsLog


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
                                     overwrite=not run.resume, autocast_mode=run.autocast)
        log.say(f"reference: {len(cache)} packs scored once in {time.perf_counter() - started:.1f}s -> {cache_path}")
        reference = lambda cpu_batch, batch, mask: cache.get(cpu_batch, device=ctx.device)  # noqa: E731
    elif loss_fn.needs_reference:
        reference = lambda cpu_batch, batch, mask: reference_stats(model, batch, loss_fn, mask)  # noqa: E731
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
        if ctx.is_main:
            print(format_config(cfg), flush=True)
            save_config(cfg, Path(cfg.run.output_dir) / CONFIG_FILE)
        with signal_handlers():
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
