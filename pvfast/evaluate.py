"""Evaluate extraction outputs against gold data (SPEC §5): Code / Sub-code / Span P/R/F1, mean ± std.

Two modes, both scoring with :mod:`pvfast.eval.metrics` and writing one JSON report plus a printed table:

Score precomputed outputs, one file per seed (JSONL, one ``{"id": ..., "output": ...}`` per line)::

    python -m pvfast.evaluate --data data/pv-synth/test.jsonl \\
        --predictions preds-seed0.jsonl preds-seed1.jsonl preds-seed2.jsonl --out report.json

Generate greedily with a model (the chat template, max 1024 new tokens), optionally with one peft adapter
per seed on the same base model::

    python -m pvfast.evaluate --data data/pv-synth/test.jsonl --model Qwen/Qwen2.5-1.5B-Instruct \\
        --adapter runs/po-seed0 runs/po-seed1 --batch-size 16 --out report.json \\
        --save-predictions preds-seed0.jsonl preds-seed1.jsonl

On the CPU with the tiny test model (random weights: expect format errors, not scores)::

    python -m pvfast.data synth --n 40 --seed 0 --out /tmp/pv-synth
    python -m pvfast.evaluate --data /tmp/pv-synth/test.jsonl --limit 4 --max-new-tokens 16 \\
        --model "$(python -c 'from pvfast.model.tiny import tiny_model_dir; print(tiny_model_dir("qwen2"))')"

``--data`` is required in both modes: a report is only meaningful against a named gold file (make the
synthetic one with ``python -m pvfast.data synth``). The options are the keys of
:class:`pvfast.config.commands.EvaluateCommandConfig`, read like the trainer's: defaults < ``--config FILE``
(YAML/JSON with the same keys) < ``--key value``; ``--help-keys`` lists them with the values a command line
resolves to, and an unknown key or a bad value is one ``error:`` line naming it.

Every id of the data must have exactly one prediction in each predictions file and every predicted id
must be in the data; otherwise the run stops with an error naming both files and some of the ids. Message
and span text are never printed unless ``--show-text`` is given (then every message whose prediction is
not exactly right is listed).

Exit status: 0 on success, 2 when the command line, a config, data or predictions file is refused.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from pvfast.config.cli import parse_command
from pvfast.config.commands import EVALUATE_ALIASES, EvaluateCommandConfig
from pvfast.data.io import DataError, load_examples
from pvfast.data.jsonfmt import ParseResult
from pvfast.data.predictions import align_predictions, read_predictions, write_predictions
from pvfast.data.records import Annotation, Example
from pvfast.eval.metrics import render_table
from pvfast.eval.scoring import evaluate_outputs, report_json

PROG = "python -m pvfast.evaluate"
EXIT_INVALID_DATA = 2
EXIT_CODES = {0: "done: the table is printed (and the report written with --out)",
              EXIT_INVALID_DATA: "the command line, a config, data or predictions file was refused"}


def _format_triples(annotations: Sequence[Annotation]) -> str:
    return "; ".join(f"{a.code} / {a.subcode} / {a.span!r}" for a in annotations) or "(none)"


def _print_text(source: str, examples: Sequence[Example], parsed: Sequence[ParseResult]) -> None:
    """Every message whose prediction differs from gold (as label+span sets) or has format errors."""
    print(f"\n--- messages not exactly right in {source} ---")
    for ex, pred in zip(examples, parsed):
        if set(pred.annotations) == set(ex.annotations) and not pred.errors:
            continue
        print(f"[{ex.id}] direction={ex.direction} message={ex.message!r}")
        print(f"  gold: {_format_triples(ex.annotations)}")
        print(f"  pred: {_format_triples(pred.annotations)}")
        for error in pred.errors:
            print(f"  format error: {error}")


def _generated_runs(cfg: EvaluateCommandConfig, examples: list[Example]) -> list[tuple[str, list[str]]]:
    from pvfast.model.generation import generate_completions, load_model_for_generation

    template = None
    if cfg.template is not None:
        from pvfast.data.prompt import PromptTemplate

        template = PromptTemplate.from_file(cfg.template)
    runs = []
    for k, adapter in enumerate(cfg.adapter or [None]):
        model, tokenizer = load_model_for_generation(cfg.model, adapter, dtype=cfg.dtype, device=cfg.device,
                                                     load_in_4bit=cfg.load_in_4bit)
        # GenerationConfig's fields are generate_completions' keyword arguments (one definition).
        outputs = generate_completions(model, tokenizer, examples, template=template,
                                       **dataclasses.asdict(cfg.generation))
        del model
        source = f"{cfg.model}" + (f" + {adapter}" if adapter is not None else "")
        if cfg.save_predictions:
            path = write_predictions(cfg.save_predictions[k], [ex.id for ex in examples], outputs)
            print(f"wrote {len(outputs)} predictions -> {path}", file=sys.stderr)
        runs.append((source, outputs))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_command(argv, EvaluateCommandConfig, prog=PROG, description=__doc__, aliases=EVALUATE_ALIASES,
                        exit_codes=EXIT_CODES, bad_config_exit=EXIT_INVALID_DATA)
    try:
        examples, _ = load_examples(cfg.data)
        if cfg.limit is not None:
            examples = examples[:cfg.limit]
        if cfg.predictions:
            runs = []
            for path in cfg.predictions:
                outputs = align_predictions(examples, read_predictions(path), predictions_path=path,
                                            data_path=cfg.data)
                runs.append((path, outputs))
        else:
            runs = _generated_runs(cfg, examples)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID_DATA

    scored = []
    for source, outputs in runs:
        report, parsed = evaluate_outputs(examples, outputs, cfg.dedup_spans)
        scored.append((source, report))
        if cfg.show_text:
            _print_text(source, examples, parsed)
    settings = {"data": cfg.data, "n_messages": len(examples), "limit": cfg.limit,
                "mode": "predictions" if cfg.predictions else "generate", "dedup_spans": cfg.dedup_spans}
    if cfg.model is not None:
        settings.update(model=cfg.model, adapters=list(cfg.adapter), batch_size=cfg.generation.batch_size,
                        max_new_tokens=cfg.generation.max_new_tokens, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
                        template=cfg.template)
    result = report_json(scored, settings)
    if cfg.out is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(render_table([r for _, r in scored]))
    if cfg.out is not None:
        print(f"\nreport -> {cfg.out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
