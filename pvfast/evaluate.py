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
synthetic one with ``python -m pvfast.data synth``). Every id of the data must have exactly one
prediction in each predictions file and every predicted id must be in the data; otherwise the run stops
with an error naming both files and some of the ids. Message and span text are never printed unless
``--show-text`` is given (then every message whose prediction is not exactly right is listed).

Exit status: 0 on success, 2 when a data or predictions file is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from pvfast.data.io import DataError, load_examples
from pvfast.data.jsonfmt import ParseResult
from pvfast.data.predictions import align_predictions, read_predictions, write_predictions
from pvfast.data.records import Annotation, Example
from pvfast.eval.metrics import render_table
from pvfast.eval.scoring import evaluate_outputs, report_json
from pvfast.model.generation import add_generation_arguments, generate_completions, load_model_for_generation

EXIT_INVALID_DATA = 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pvfast.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="gold data: pvfast SFT JSONL or the published save_to_disk layout")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, nargs="+", metavar="FILE",
                        help="JSONL files of {id, output}, one per seed; scored without a model")
    source.add_argument("--model", help="model directory (or name) to generate with")
    parser.add_argument("--adapter", type=Path, nargs="+", metavar="DIR",
                        help="peft adapter directories on top of --model, one run per adapter")
    add_generation_arguments(parser)
    parser.add_argument("--save-predictions", type=Path, nargs="+", metavar="FILE",
                        help="write the generated outputs (one file per run) as {id, output} JSONL")
    parser.add_argument("--limit", type=int, default=None,
                        help="generate for the first N messages of --data only (a quick check)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--dedup-spans", action="store_true",
                        help="span level: collapse identical spans per message before matching (off: SPEC §5)")
    parser.add_argument("--show-text", action="store_true",
                        help="print message, gold and predicted triples of wrong messages (patient text!)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is None:
        for flag, value in (("--adapter", args.adapter), ("--save-predictions", args.save_predictions),
                            ("--template", args.template), ("--load-in-4bit", args.load_in_4bit or None),
                            ("--limit", args.limit)):
            if value is not None:
                parser.error(f"{flag} needs --model (it only applies when generating)")
    n_runs = len(args.adapter) if args.adapter else 1
    if args.save_predictions is not None and len(args.save_predictions) != n_runs:
        parser.error(f"--save-predictions needs one file per run ({n_runs}), got {len(args.save_predictions)}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")


def _generated_runs(args: argparse.Namespace, examples: list[Example]) -> list[tuple[str, list[str]]]:
    template = None
    if args.template is not None:
        from pvfast.data.prompt import PromptTemplate

        template = PromptTemplate.from_file(args.template)
    runs = []
    for k, adapter in enumerate(args.adapter or [None]):
        model, tokenizer = load_model_for_generation(args.model, adapter, dtype=args.dtype, device=args.device,
                                                     load_in_4bit=args.load_in_4bit)
        outputs = generate_completions(model, tokenizer, examples, batch_size=args.batch_size,
                                       max_new_tokens=args.max_new_tokens, template=template)
        del model
        source = f"{args.model}" + (f" + {adapter}" if adapter is not None else "")
        if args.save_predictions is not None:
            path = write_predictions(args.save_predictions[k], [ex.id for ex in examples], outputs)
            print(f"wrote {len(outputs)} predictions -> {path}", file=sys.stderr)
        runs.append((source, outputs))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        examples, _ = load_examples(args.data)
        if args.limit is not None:
            examples = examples[:args.limit]
        if args.predictions is not None:
            runs = []
            for path in args.predictions:
                outputs = align_predictions(examples, read_predictions(path), predictions_path=os.fspath(path),
                                            data_path=os.fspath(args.data))
                runs.append((os.fspath(path), outputs))
        else:
            runs = _generated_runs(args, examples)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID_DATA

    scored = []
    for source, outputs in runs:
        report, parsed = evaluate_outputs(examples, outputs, args.dedup_spans)
        scored.append((source, report))
        if args.show_text:
            _print_text(source, examples, parsed)
    settings = {"data": os.fspath(args.data), "n_messages": len(examples), "limit": args.limit,
                "mode": "predictions" if args.predictions is not None else "generate",
                "dedup_spans": args.dedup_spans}
    if args.model is not None:
        settings.update(model=args.model, adapters=[os.fspath(a) for a in args.adapter or []],
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                        load_in_4bit=args.load_in_4bit,
                        template=os.fspath(args.template) if args.template else None)
    result = report_json(scored, settings)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(render_table([r for _, r in scored]))
    if args.out is not None:
        print(f"\nreport -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
